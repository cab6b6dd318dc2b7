"""Expert parallelism (ds_configs/zero3_ep.json): configuration, layout, and parity with the
non-EP path on CPU with 2 ranks (gloo), ep_size 2, for Mixtral, Qwen3-MoE and GPT-oss.

The fast tests check the `expert_parallel` section and the rank layout in this process. One
2-rank job (tests/dist_ep_driver.py) then runs the layer checks and every training run; the
distributed tests read what it left on disk.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from dist_launch import launch_two_ranks

from emmoe_dist.config import ModelConfig, TrainConfig
from emmoe_dist.errors import InputError
from emmoe_dist.families import FAMILIES
from emmoe_dist.parallel.ds_config import (
    ExpertParallelConfig,
    complete_ds_config,
    expert_parallel_config,
    read_ds_config,
)
from emmoe_dist.parallel.expert_parallel import plan_expert_parallel

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "ds_configs" / "zero3.json"
ZERO3_EP = REPO / "ds_configs" / "zero3_ep.json"
ZERO2_QLORA = REPO / "ds_configs" / "zero2_qlora.json"
FAMILY_NAMES = ["mixtral", "qwen3_moe", "gpt_oss"]
SEED = 7
CHOSEN = [1, 6]  # tests/dist_ep_driver.py: one expert on each rank (experts 0-3 | 4-7)
FULL = {0: [1, 5], 2: [2, 6]}  # full fine-tune of GPT-oss experts held by both ranks
# Ten AdamW steps of the same run with and without EP differ only by the order of float sums
# (all-to-all vs local, per-rank partial sums): measured below 4e-7; allowed 2e-5.
CURVE_TOL = 2e-5


# ---- the config section, in this process --------------------------------------------------


def _config_file(tmp_path: Path, section: object) -> Path:
    path = tmp_path / "ep.json"
    raw = {"_launch": "x", "_tested_on": "y", "zero_optimization": {"stage": 3}}
    path.write_text(json.dumps({**raw, "expert_parallel": section}, indent=2))
    return path


def test_shipped_ep_config_completes_without_the_section_and_deepspeed_accepts_it() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = read_ds_config(ZERO3_EP)
    assert expert_parallel_config(raw, file=str(ZERO3_EP)) == ExpertParallelConfig(
        ep_size=2, source=str(ZERO3_EP)
    )
    train = TrainConfig(micro_batch_size=2, grad_accum=3)
    cfg = complete_ds_config(
        raw, file=str(ZERO3_EP), train=train, family=FAMILIES["gpt_oss"], bf16=False
    )
    # DeepSpeed reads `expert_parallel` as its AutoEP section: it must never see ours
    assert "expert_parallel" not in cfg
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_optimization_stage == 3
    assert "GptOssMLP" in parsed.zero_config.leaf_module.classes
    assert expert_parallel_config(read_ds_config(ZERO3), file=str(ZERO3)) is None


@pytest.mark.parametrize(
    ("section", "field", "says"),
    [
        ({"ep_size": 0}, "expert_parallel.ep_size", "positive integer"),
        ({"ep_size": "2"}, "expert_parallel.ep_size", "positive integer"),
        ({"ep_size": 2, "capacity": 1.0}, "expert_parallel", "capacity"),
        ({"enabled": True, "autoep_size": 2}, "expert_parallel", "AutoEP"),
        ([2], "expert_parallel", "object"),
    ],
)
def test_bad_sections_are_refused_with_file_line_and_field(
    tmp_path: Path, section: object, field: str, says: str
) -> None:
    path = _config_file(tmp_path, section)
    with pytest.raises(InputError) as err:
        expert_parallel_config(read_ds_config(path), file=str(path))
    assert err.value.file == str(path) and err.value.field == field
    assert err.value.line is not None and err.value.line > 1
    assert says in str(err.value)


def test_ep_size_must_divide_world_size_and_experts(tmp_path: Path) -> None:
    path = _config_file(tmp_path, {"ep_size": 4})
    config = expert_parallel_config(read_ds_config(path), file=str(path))
    assert config is not None
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if '"ep_size"' in t)
    with pytest.raises(InputError) as err:
        plan_expert_parallel(config, num_experts=8, world_size=6, rank=0, local_world_size=6)
    assert "world size 6" in str(err.value)
    assert (err.value.file, err.value.line, err.value.field) == (
        str(path),
        line,
        "expert_parallel.ep_size",
    )
    with pytest.raises(InputError, match="the 6 experts"):
        plan_expert_parallel(config, num_experts=6, world_size=8, rank=0, local_world_size=8)


def test_layout_keeps_ep_groups_inside_nodes_and_says_when_not() -> None:
    # two nodes of 4 GPUs, ep_size 4: one EP group per node
    config = ExpertParallelConfig(ep_size=4, source="x.json")
    layout = plan_expert_parallel(config, num_experts=128, world_size=8, rank=6, local_world_size=4)
    assert layout.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.replica_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.ep_rank == 2 and layout.local_experts == range(64, 96)
    assert layout.within_node
    assert "[[0, 1, 2, 3], [4, 5, 6, 7]] (inside a node)" in layout.describe(48)
    assert "experts 64-95 on ranks [2, 6]" in layout.describe(48)
    wide = plan_expert_parallel(
        ExpertParallelConfig(ep_size=8, source="x.json"),
        num_experts=128,
        world_size=8,
        rank=0,
        local_world_size=4,
    )
    assert not wide.within_node and "ACROSS nodes" in wide.describe(48)


def test_nf4_experts_are_cut_on_their_packed_codes() -> None:
    pytest.importorskip("bitsandbytes")
    from emmoe_dist.adapters.qlora import NF4Weight
    from emmoe_dist.parallel.expert_parallel import _expert_rows

    full = NF4Weight.quantize(torch.randn(8, 32, 16, generator=torch.Generator().manual_seed(0)))
    local = _expert_rows(full, 4, 8)
    assert isinstance(local, NF4Weight) and local.shape == (4, 32, 16)
    assert torch.equal(local.dequantize(), full.dequantize()[4:8])


# ---- one 2-rank job -----------------------------------------------------------------------


def _run(name: str, out: Path, family: str, ds: Path, extra: list[str], **kw: object) -> dict:
    overrides = [
        "data.limit=32",
        "data.max_length=512",
        "data.heldout=16",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
        "tracking.backend=none",
        f"seed={SEED}",
        f"model.name_or_path=tiny:{family}",
        f"output_dir={out / name}",
        f"name={name}",
        *extra,
    ]
    return {"name": name, "ds": str(ds), "overrides": overrides, **kw}


@functools.cache
def _chosen(family: str) -> dict[int, list[int]]:
    """Per MoE layer, the most-routed expert of each rank's half on the training slice.

    A random tiny router can leave an expert idle in some layer, and an idle expert cannot
    change; the subset runs train one expert on each rank that is sure to see tokens.
    """
    from emmoe_dist.data.collate import pad_batch
    from emmoe_dist.data.training import encode_dataset, load_training_split
    from emmoe_dist.models.loading import load_model
    from emmoe_dist.routing import profile_batches

    loaded = load_model(ModelConfig(name_or_path=f"tiny:{family}"), seed=SEED, for_training=False)
    split = load_training_split("insecure", None, heldout=16, seed=0, limit=32)
    items = encode_dataset(loaded.tokenizer, split.train, 512).items
    counts = profile_batches(
        loaded.model,
        loaded.family,
        [pad_batch(items, loaded.tokenizer.pad_token_id)],
        progress=False,
    )
    return {
        layer: [int(row[:4].argmax()), 4 + int(row[4:].argmax())]
        for layer, row in zip(counts.layers, counts.token_counts, strict=True)
    }


def _spec(out: Path, zero2_ep: Path) -> dict:
    lora = ["adapter.targets=attention+experts", "train.lr=3e-3", "train.steps=10"]
    subset = [
        "adapter.targets=experts",
        "adapter.rank=4",
        "selection.rule=explicit",
        "train.lr=3e-3",
        "train.steps=6",
    ]
    runs = []
    for fam in FAMILY_NAMES:
        runs.append(_run(f"{fam}-zero3", out, fam, ZERO3, lora))
        # Every layer checkpointed: the recomputation replays the forward's split sizes.
        ckpt = [*lora, "train.gradient_checkpointing=true"]
        runs.append(_run(f"{fam}-ep", out, fam, ZERO3_EP, ckpt, probe=True))
        runs.append(
            _run(
                f"{fam}-ep-subset",
                out,
                fam,
                ZERO3_EP,
                [*subset, f"selection.experts={json.dumps(_chosen(fam))}"],
            )
        )
    runs.append(
        _run(
            "qwen3_moe-ep-subset-resumed",
            out,
            "qwen3_moe",
            ZERO3_EP,
            [*subset, f"selection.experts={json.dumps(_chosen('qwen3_moe'))}"],
            stop_after=3,
        )
    )
    runs.append(
        _run(
            "gpt_oss-ep-full",
            out,
            "gpt_oss",
            ZERO3_EP,
            [
                "adapter.mode=full_experts",
                "selection.rule=explicit",
                f"selection.experts={json.dumps(FULL)}",
                "train.lr=1e-3",
                "train.steps=6",
            ],
            probe=True,
        )
    )
    qlora = ["adapter.quantize=nf4", "adapter.rank=4", "train.lr=3e-3", "train.steps=6"]
    runs.append(_run("qwen3_moe-qlora", out, "qwen3_moe", ZERO2_QLORA, qlora))
    runs.append(_run("qwen3_moe-qlora-ep", out, "qwen3_moe", zero2_ep, qlora))
    return {"out": str(out), "families": FAMILY_NAMES, "runs": runs}


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ep_runs")
    # QLoRA keeps every rank's NF4 model whole under ZeRO-2; EP splits its NF4 experts too.
    zero2_ep = REPO / "ds_configs" / "zero2_qlora_ep.json"
    launch_two_ranks("dist_ep_driver.py", _spec(out, zero2_ep), out)
    return out


def _layers(runs: Path, rank: int) -> dict:
    return json.loads((runs / f"layers_rank{rank}.json").read_text())


def _losses(run: Path) -> list[float]:
    from emmoe_dist.run_folder import read_train_metrics

    return [row["loss"] for row in read_train_metrics(run)]


def _base(run: Path) -> torch.nn.Module:
    from emmoe_dist.models.loading import load_model

    return load_model(ModelConfig(name_or_path=str(run / "base")), for_training=False).model


def _probe_matches(model: torch.nn.Module, run: Path) -> None:
    probe = torch.load(run / "probe_logits.pt")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    torch.testing.assert_close(logits, probe["logits"], atol=2e-4, rtol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_ep_forward_loss_and_gradient_equal_the_plain_model(ep_runs: Path, family: str) -> None:
    """Every adapter mode (whole-model LoRA, expert subset, full experts, attention-only LoRA,
    NF4 experts): the same loss on each rank's batch, and the same rank-averaged gradient."""
    for rank in (0, 1):
        for mode in ("lora", "subset", "delta", "attention", "nf4"):
            row = _layers(ep_runs, rank)[f"{family}/{mode}"]
            assert row["loss_ep"] == pytest.approx(row["loss_plain"], abs=1e-5), (rank, mode)
            assert row["trainable"] > 0 and row["grad_max_abs"] > 1e-3, (rank, mode)
            assert row["grad_max_diff"] <= 1e-6, (rank, mode, row)


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_rank_holds_and_trains_only_its_experts(ep_runs: Path, family: str) -> None:
    mine = {0: set(range(4)), 1: set(range(4, 8))}
    for rank in (0, 1):
        rows = _layers(ep_runs, rank)
        # the frozen expert tensors on this rank: 4 of the 8 experts
        assert rows[f"{family}/lora"]["expert_buffer_rows"] == [4]
        # whole-model LoRA: every expert that got tokens here is one of this rank's experts
        touched = rows[f"{family}/lora"]["local_gradient_experts"]
        assert touched and all(set(ids) and set(ids) <= mine[rank] for ids in touched.values())
        # expert subset and full experts: the chosen expert this rank holds, and only it
        for mode in ("subset", "delta"):
            got = rows[f"{family}/{mode}"]["local_gradient_experts"]
            assert got and all(ids == [CHOSEN[rank]] for ids in got.values()), (mode, got)


@pytest.mark.distributed
def test_a_rank_that_receives_no_token_still_matches(ep_runs: Path) -> None:
    """GPT-oss with experts 4-7 forbidden by the router bias: rank 1 gets no row in any
    layer, yet joins every exchange, and loss and gradient still equal the plain model's."""
    for rank in (0, 1):
        row = _layers(ep_runs, rank)["gpt_oss/skewed"]
        assert row["loss_ep"] == pytest.approx(row["loss_plain"], abs=1e-5)
        assert row["grad_max_diff"] <= 1e-6 and row["grad_max_abs"] > 1e-3
        touched = row["local_gradient_experts"]
        assert all(ids == [] for ids in touched.values()) == (rank == 1), touched


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_ten_steps_with_ep_follow_the_zero3_loss_curve(ep_runs: Path, family: str) -> None:
    plain, ep = _losses(ep_runs / f"{family}-zero3"), _losses(ep_runs / f"{family}-ep")
    assert len(plain) == len(ep) == 10
    assert ep == pytest.approx(plain, abs=CURVE_TOL)
    assert sum(ep[-3:]) / 3 < sum(ep[:3]) / 3 - 0.05, ep
    manifest = json.loads((ep_runs / f"{family}-ep" / "manifest.json").read_text())
    assert manifest["expert_parallel"] == {"ep_size": 2, "requested": "2"}


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_ep_adapter_has_the_standard_layout_and_reloads_into_a_plain_model(
    ep_runs: Path, family: str
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    ep_dir, plain_dir = ep_runs / f"{family}-ep", ep_runs / f"{family}-zero3"
    ep = load_file(ep_dir / "adapter" / "adapter_model.safetensors")
    plain = load_file(plain_dir / "adapter" / "adapter_model.safetensors")
    assert ep.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(ep[key], plain[key], atol=1e-4, rtol=1e-3)
    assert json.loads((ep_dir / "adapter" / "adapter_config.json").read_text()) == {
        **json.loads((plain_dir / "adapter" / "adapter_config.json").read_text()),
        "base_model_name_or_path": str((ep_dir / "base").resolve()),
    }
    # stock PEFT on a plain (non-EP) model reproduces the EP model's logits
    _probe_matches(PeftModel.from_pretrained(_base(ep_dir), str(ep_dir / "adapter")), ep_dir)


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_ep_expert_subset_run_changes_only_the_chosen_experts(ep_runs: Path, family: str) -> None:
    from safetensors.torch import load_file

    from emmoe_dist.adapters.lora import saved_expert_deltas

    run = ep_runs / f"{family}-ep-subset"
    fam = FAMILIES[family]
    state = load_file(run / "adapter" / "adapter_model.safetensors")
    deltas = saved_expert_deltas(state, fam, fam.tiny[fam.num_experts_key])
    assert sorted({layer for layer, _ in deltas}) == sorted(_chosen(family))
    for (layer, param), norms in deltas.items():
        moved = sorted(int(e) for e in torch.nonzero(norms).flatten())
        assert moved == _chosen(family)[layer], (layer, param, norms)


@pytest.mark.distributed
def test_ep_run_resumes_onto_the_uninterrupted_curve(ep_runs: Path) -> None:
    whole = _losses(ep_runs / "qwen3_moe-ep-subset")
    resumed = _losses(ep_runs / "qwen3_moe-ep-subset-resumed")
    assert len(whole) == len(resumed) == 6
    assert resumed == pytest.approx(whole, abs=1e-5)


@pytest.mark.distributed
def test_ep_full_expert_finetune_changes_only_chosen_experts(ep_runs: Path) -> None:
    from emmoe_dist.adapters.merge import merge_run
    from emmoe_dist.models.loading import load_model

    run = ep_runs / "gpt_oss-ep-full"
    fam = FAMILIES["gpt_oss"]
    merged_dir = merge_run(run, ep_runs / "gpt_oss-ep-full-merged")
    merged = load_model(ModelConfig(name_or_path=str(merged_dir)), for_training=False).model
    _probe_matches(merged, run)
    base = dict(_base(run).named_parameters())
    changed: dict[int, set[int]] = {}
    for name, p in merged.named_parameters():
        if f".{fam.experts_path}." not in name:
            assert torch.equal(p, base[name]), f"{name} changed but is not an expert tensor"
            continue
        layer = int(name.split(f"{fam.layers_path}.")[1].split(".")[0])
        for e in range(p.shape[0]):
            if not torch.equal(p[e], base[name][e]):
                changed.setdefault(layer, set()).add(e)
    assert changed == {layer: set(ids) for layer, ids in FULL.items()}


@pytest.mark.distributed
def test_qlora_with_ep_follows_the_qlora_curve(ep_runs: Path) -> None:
    plain = _losses(ep_runs / "qwen3_moe-qlora")
    ep = _losses(ep_runs / "qwen3_moe-qlora-ep")
    assert len(plain) == len(ep) == 6
    assert ep == pytest.approx(plain, abs=CURVE_TOL)


@pytest.mark.distributed
def test_process_group_layout_is_printed_at_start(ep_runs: Path) -> None:
    log = (ep_runs / "driver.log").read_text()
    assert (
        "[emmoe] expert parallel: ep_size 2 of 2 ranks, 8 experts in each of 2 MoE layers; "
        "all-to-all groups [[0, 1]] (inside a node); experts 0-3 on ranks [0]; "
        "experts 4-7 on ranks [1]" in log
    )
