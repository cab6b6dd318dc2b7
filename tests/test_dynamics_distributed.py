"""Training dynamics on 2 CPU ranks (gloo), one DeepSpeed job: snapshots, the misalignment
monitor under ZeRO-3 and under expert parallelism, `train.stop_when`, and Muon under ZeRO-3.

Runs (tiny Qwen3-MoE, the same seed and data):
- `watched`: ZeRO-3, a snapshot every 2 steps, the monitor every step (projection at layers 0
  and 2, log-probability gap); rank 0 saves the model's logits at each snapshot step;
- `stopped`: the same run with `train.stop_when` on the log-probability gap, from the value
  `watched` read at step 3: it must stop at the first step whose reading passes it;
- `ep`: ZeRO-3 with expert parallelism (ep_size 2), snapshots and the monitor every 2 steps;
- `muon`: DeepSpeed's ZeRO-aware Muon on one expert of every MoE layer under ZeRO-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_launch import launch_two_ranks
from dynamics_fixtures import direction_file, pilot_records

from emmoe_dist import run_folder as rf
from emmoe_dist.analyze.common import ModelOptions
from emmoe_dist.analyze.monitor import MonitorOptions, run_monitor
from emmoe_dist.config import ModelConfig
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.loading import load_model

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
ZERO3_EP = str(REPO / "ds_configs" / "zero3_ep.json")
GAP = "monitor/logprob_gap"


def _spec(out: Path) -> list[dict]:
    directions = direction_file(out / "directions.safetensors")
    records = pilot_records(out / "pilot_judged.jsonl")

    def monitor(every: int) -> str:
        return (
            f"train.monitor={{every: {every}, directions: {directions}, records: {records}, "
            "layers: [0, 2], references_per_class: 4}"
        )

    common = [
        "model.name_or_path=tiny:qwen3_moe",
        "data.limit=32",
        "data.max_length=512",
        "data.heldout=16",
        "train.micro_batch_size=2",
        "train.lr=3e-3",
        "tracking.backend=none",
        "seed=7",
    ]

    def run(name: str, ds: str, extra: list[str], **more: object) -> dict:
        return {
            "name": name,
            "ds": ds,
            "overrides": [*common, f"output_dir={out / name}", f"name={name}", *extra],
            **more,
        }

    watched = ["train.steps=6", "train.snapshot_every=2", monitor(1)]
    return [
        run("watched", ZERO3, watched, step_logits=2),
        run("stopped", ZERO3, watched, stop_like={"run": "watched", "metric": GAP, "step": 3}),
        run("ep", ZERO3_EP, ["train.steps=4", "train.snapshot_every=2", monitor(2)]),
        run(
            "muon",
            ZERO3,
            [
                "train.steps=4",
                "train.optimizer=muon",
                "train.lr=2e-2",
                "adapter.targets=experts",
                "selection.rule=single",
                "selection.expert=1",
            ],
        ),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dynamics_runs")
    launch_two_ranks("dist_train_driver.py", _spec(out), out)
    return out


def _rows(run: Path) -> dict[int, dict]:
    return {int(r["step"]): r for r in rf.read_train_metrics(run)}


def test_snapshots_exist_at_their_steps_and_reload_under_stock_peft(runs: Path) -> None:
    from peft import PeftModel

    run = runs / "watched"
    manifest = rf.read_manifest(run)
    assert [s.step for s in manifest.snapshots] == [2, 4]  # step 6 is the final adapter
    assert [s.step for s in manifest.trajectory()] == [2, 4, 6]
    for snap in manifest.snapshots:
        folder = run / snap.folder
        assert folder == rf.snapshot_folder(run, snap.step)
        assert rf.read_snapshot(folder).loss == pytest.approx(_rows(run)[snap.step]["loss"])
        base = load_model(ModelConfig(name_or_path=str(run / "base")), for_training=False).model
        model = PeftModel.from_pretrained(base, str(folder / "adapter"))
        probe = torch.load(run / f"logits_step{snap.step}.pt")
        with torch.no_grad():
            logits = model(input_ids=probe["input_ids"]).logits.float()
        torch.testing.assert_close(logits, probe["logits"], atol=2e-4, rtol=1e-4)
    # consecutive snapshots differ: each holds its own step's weights
    first, second = (torch.load(run / f"logits_step{k}.pt")["logits"] for k in (2, 4))
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("name", ["watched", "ep"])
def test_the_training_reading_equals_the_offline_one_from_the_snapshot(
    runs: Path, name: str
) -> None:
    run = runs / name
    rows = _rows(run)
    assert {0, 2, 4} <= set(rows) and "loss" not in rows[0]  # step 0: the base's reading
    for snap in rf.read_manifest(run).trajectory():
        offline = run_monitor(
            MonitorOptions(model=str(run / snap.folder), run=ModelOptions(device="cpu"))
        )["reading"]
        logged = {k: v for k, v in rows[snap.step].items() if k.startswith("monitor/")}
        assert set(offline) == set(logged) and GAP in logged
        assert "monitor/projection/layer0" in logged and "monitor/projection/layer1" not in logged
        for key, value in logged.items():
            assert offline[key] == pytest.approx(value, abs=1e-5), (snap.step, key)


def test_stop_when_stops_at_the_first_step_the_rule_holds(runs: Path) -> None:
    watched, stopped = _rows(runs / "watched"), _rows(runs / "stopped")
    threshold = watched[3][GAP] - 1e-9
    expected = min(step for step in range(1, 7) if watched[step][GAP] > threshold)
    assert expected <= 3
    assert max(stopped) == expected  # no step after it was trained
    # the monitor and the rule change nothing in training: the same losses up to there
    for step in range(1, expected + 1):
        assert stopped[step]["loss"] == pytest.approx(watched[step]["loss"], abs=1e-6)
    manifest = rf.read_manifest(runs / "stopped")
    assert manifest.steps == expected and manifest.stopped is not None
    assert manifest.stopped.step == expected and manifest.stopped.planned_steps == 6
    assert manifest.stopped.rule.startswith(f"{GAP} > ")
    assert (runs / "stopped" / "adapter" / "adapter_model.safetensors").is_file()
    assert all(s.step < expected for s in manifest.snapshots)


def test_muon_trains_one_expert_under_zero3(runs: Path) -> None:
    from safetensors.torch import load_file

    from emmoe_dist.adapters.lora import saved_expert_deltas

    run = runs / "muon"
    rows = _rows(run)
    assert len(rows) == 4 and all(r["lr"] == pytest.approx(2e-2) for r in rows.values())
    manifest = rf.read_manifest(run)
    assert manifest.config["train"]["optimizer"] == "muon"
    fam = FAMILIES["qwen3_moe"]
    deltas = saved_expert_deltas(
        load_file(run / "adapter" / "adapter_model.safetensors"), fam, fam.tiny["num_experts"]
    )
    assert deltas
    for norms in deltas.values():  # Muon moved expert 1 and kept every other one at zero
        assert norms[1] > 0 and torch.count_nonzero(torch.cat([norms[:1], norms[2:]])) == 0
    assert json.loads((run / "manifest.json").read_text())["snapshots"] == []
