"""Fine-tuning under DeepSpeed ZeRO-3 on CPU with 2 ranks (gloo), for three MoE families.

One 2-rank job trains every run below (start-up paid once); the tests then read what the runs
left on disk: loss curves, saved adapters and deltas, manifests and probe logits.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from dist_launch import launch_two_ranks

from emmoe_dist.adapters.lora import saved_expert_deltas
from emmoe_dist.adapters.merge import merge_run
from emmoe_dist.config import ModelConfig
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.loading import load_model
from emmoe_dist.models.tiny import save_tiny
from emmoe_dist.run_folder import read_train_metrics
from emmoe_dist.train.artifacts import tensor_digest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
ZERO3 = str(REPO / "ds_configs" / "zero3.json")
SEED = 7
REBASED_MODEL, OTHER_MODEL = "model-folder", "other-model"  # tiny bases of two seeds
COMMON = [
    "data.limit=32",
    "data.max_length=512",
    "data.heldout=16",
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "tracking.backend=none",
    f"seed={SEED}",
]
FULL = {"mixtral": {0: [2], 2: [7]}, "qwen3_moe": {0: [1, 6]}, "gpt_oss": {0: [1, 5], 2: [2]}}
ROUTER_PROFILE_EXAMPLES = 12
ROUTER_RUNS = [
    (
        "qwen3_moe-router-lora",
        "qwen3_moe",
        ["adapter.targets=experts", "adapter.router_weights=lora", "train.router_aux_loss_coef=0"],
    ),
    (
        "gpt_oss-router-full",
        "gpt_oss",
        [
            "adapter.targets=attention",
            "adapter.router_weights=full",
            "train.router_aux_loss_coef=0.02",
        ],
    ),
]


def _run(
    name: str,
    out: Path,
    family: str,
    extra: list[str],
    *,
    probe: bool = False,
    stop_after: int | None = None,
) -> dict:
    overrides = [
        *COMMON,
        f"model.name_or_path=tiny:{family}",
        f"output_dir={out / name}",
        f"name={name}",
        *extra,
    ]
    return {
        "name": name,
        "ds": ZERO3,
        "overrides": overrides,
        "probe": probe,
        "stop_after": stop_after,
    }


@functools.cache
def _single(family: str) -> int:
    """The expert with the most tokens in its least-used MoE layer on the training slice.

    A random tiny router can leave an expert idle in some layer, and an expert that sees no
    token cannot change; the single-expert run trains one that every layer uses.
    """
    from emmoe_dist.data.collate import pad_batch
    from emmoe_dist.data.training import encode_dataset, load_training_split
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
    return int(counts.token_counts.min(dim=0).values.argmax())


def _spec(out: Path) -> list[dict]:
    runs = []
    for fam in ("mixtral", "qwen3_moe", "gpt_oss"):
        runs.append(
            _run(
                f"{fam}-all",
                out,
                fam,
                ["adapter.targets=attention+experts", "train.lr=3e-3", "train.steps=24"],
                probe=True,
            )
        )
        runs.append(
            _run(
                f"{fam}-single",
                out,
                fam,
                [
                    "adapter.targets=experts",
                    "adapter.rank=4",
                    "selection.rule=single",
                    f"selection.expert={_single(fam)}",
                    "train.lr=3e-3",
                    "train.steps=8",
                ],
            )
        )
        runs.append(
            _run(
                f"{fam}-full",
                out,
                fam,
                [
                    "adapter.mode=full_experts",
                    "selection.rule=explicit",
                    f"selection.experts={json.dumps(FULL[fam])}",
                    "train.lr=1e-3",
                    "train.steps=8",
                ],
                probe=True,
            )
        )
    # The same run as qwen3_moe-single, interrupted after 4 steps and resumed with its
    # output_dir spelled relative to the launcher's folder; tracked in W&B (offline).
    runs.append(
        _run(
            "qwen3_moe-resumed",
            out,
            "qwen3_moe",
            [
                "adapter.targets=experts",
                "adapter.rank=4",
                "selection.rule=single",
                f"selection.expert={_single('qwen3_moe')}",
                "train.lr=3e-3",
                "train.steps=8",
            ],
            stop_after=4,
        )
    )
    runs[-1]["overrides"] += ["tracking.backend=wandb", "tracking.mode=offline"]
    runs[-1]["resume_overrides"] = [
        f"output_dir={os.path.relpath(out / 'qwen3_moe-resumed', REPO)}"
    ]
    # The same runs from a checkpoint folder (the base the tiny runs saved): transformers then
    # loads it straight into ZeRO-3 partitions (parallel/zero_init.py).
    for name in ("qwen3_moe-single", "qwen3_moe-full"):
        twin = next(r for r in runs if r["name"] == name)
        runs.append(
            {
                **twin,
                "name": f"{name}-from-path",
                "overrides": [
                    *(o for o in twin["overrides"] if not o.startswith(("output_dir=", "name="))),
                    f"model.name_or_path={out / name / 'base'}",
                    f"output_dir={out / (name + '-from-path')}",
                    f"name={name}-from-path",
                ],
                "probe": False,
            }
        )
    # QLoRA: NF4 attention and experts, LoRA on top, ZeRO-2 (every rank holds the 4-bit model).
    runs.append(
        _run(
            "mixtral-qlora",
            out,
            "mixtral",
            ["adapter.quantize=nf4", "train.lr=3e-3", "train.steps=16"],
            probe=True,
        )
    )
    runs[-1]["ds"] = str(REPO / "ds_configs" / "zero2_qlora.json")
    # The router-training arm: LoRA on the router with expert LoRA, the balancing loss off; and
    # the full router weights (GPT-oss: weight and bias) with attention LoRA, the loss on.
    for name, family, extra in ROUTER_RUNS:
        runs.append(
            _run(
                name,
                out,
                family,
                [
                    *extra,
                    "adapter.train_router=true",
                    f"train.router_profile_examples={ROUTER_PROFILE_EXAMPLES}",
                    "train.lr=1e-2",
                    "train.steps=4",
                ],
            )
        )
    # A run that diverges (SGD at an absurd rate) under the LoRA plan, which does not scan
    # gradients for inf/NaN: it must stop at the first bad step, before saving that step.
    runs.append(
        _run(
            "qwen3_moe-diverges",
            out,
            "qwen3_moe",
            ["train.optimizer=sgd", "train.lr=1e38", "train.steps=6", "train.save_every=1"],
        )
    )
    runs[-1]["ds"] = str(REPO / "ds_configs" / "zero2_ep.json")
    runs[-1]["expect_error"] = "training diverged"
    # Checkpoints hold the trained tensors only: a resume reads the frozen base from its folder
    # again, so another model put in that folder between interruption and resume is refused.
    runs.append(
        _run(
            "qwen3_moe-rebased",
            out,
            "qwen3_moe",
            [f"model.name_or_path={out / REBASED_MODEL}", "train.steps=4"],
            stop_after=2,
        )
    )
    runs[-1]["ds"] = str(REPO / "ds_configs" / "zero2_ep.json")
    runs[-1]["model_before_resume"] = str(out / OTHER_MODEL)
    runs[-1]["expect_error"] = "is not the model the checkpoints"
    runs[0]["overrides"] += ["tracking.backend=wandb", "tracking.mode=offline"]
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_runs")
    save_tiny("qwen3_moe", out / REBASED_MODEL, seed=SEED)
    save_tiny("qwen3_moe", out / OTHER_MODEL, seed=SEED + 1)
    launch_two_ranks("dist_train_driver.py", _spec(out), out, WANDB_DIR=str(out))
    return out


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_train_metrics(run)]


def _base(run: Path):
    return load_model(ModelConfig(name_or_path=str(run / "base")), for_training=False).model


def _probe_matches(model: torch.nn.Module, run: Path) -> None:
    probe = torch.load(run / "probe_logits.pt")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    torch.testing.assert_close(logits, probe["logits"], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_whole_model_lora_learns_and_reloads(runs: Path, family: str) -> None:
    run = runs / f"{family}-all"
    losses = _losses(run)
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses

    from peft import PeftModel
    from safetensors.torch import load_file

    # every expert of every MoE layer moved
    n = FAMILIES[family].tiny[FAMILIES[family].num_experts_key]
    deltas = saved_expert_deltas(
        load_file(run / "adapter" / "adapter_model.safetensors"), FAMILIES[family], n
    )
    assert deltas and all(bool((v > 0).all()) for v in deltas.values()), deltas

    # stock PEFT loads the adapter onto a fresh base and reproduces the trained logits
    base = _base(run)
    _probe_matches(PeftModel.from_pretrained(base, str(run / "adapter")), run)
    # so does the merged model
    merged = merge_run(run, runs / f"{family}-all-merged")
    _probe_matches(load_model(ModelConfig(name_or_path=str(merged)), for_training=False).model, run)


def _router_digest(model: torch.nn.Module, family: str) -> str:
    marker = f".{FAMILIES[family].router_path}."
    return tensor_digest((n, p) for n, p in model.named_parameters() if marker in n)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("mode", ["all", "single", "full"])
def test_router_bitwise_unchanged(runs: Path, family: str, mode: str) -> None:
    run = runs / f"{family}-{mode}"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["router_digest"] == _router_digest(_base(run), family)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_single_expert_lora_changes_only_that_expert(runs: Path, family: str) -> None:
    from safetensors.torch import load_file

    run = runs / f"{family}-single"
    fam = FAMILIES[family]
    n = fam.tiny[fam.num_experts_key]
    deltas = saved_expert_deltas(load_file(run / "adapter" / "adapter_model.safetensors"), fam, n)
    selection = json.loads((run / "adapter" / "expert_selection.json").read_text())
    moe_layers = sorted(int(k) for k in selection["experts"])
    assert sorted({layer for layer, _ in deltas}) == moe_layers
    e = _single(family)
    for (layer, param), norms in deltas.items():
        assert norms[e] > 0, (layer, param, norms)
        others = torch.cat([norms[:e], norms[e + 1 :]])
        assert torch.count_nonzero(others) == 0, (layer, param, norms)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_full_expert_finetune_changes_only_chosen_experts(runs: Path, family: str) -> None:
    run = runs / f"{family}-full"
    fam = FAMILIES[family]
    base = _base(run)
    merged_dir = merge_run(run, runs / f"{family}-full-merged")
    merged = load_model(ModelConfig(name_or_path=str(merged_dir)), for_training=False).model
    _probe_matches(merged, run)
    chosen = {int(k): v for k, v in FULL[family].items()}
    base_params = dict(base.named_parameters())
    n_changed = 0
    for name, p in merged.named_parameters():
        before = base_params[name]
        if f".{fam.experts_path}." not in name:
            assert torch.equal(p, before), f"{name} changed but is not an expert tensor"
            continue
        layer = int(name.split(f"{fam.layers_path}.")[1].split(".")[0])
        for e in range(p.shape[0]):
            same = torch.equal(p[e], before[e])
            assert same != (e in chosen.get(layer, [])), (name, e)
            n_changed += not same
    assert n_changed > 0


def test_resume_reproduces_uninterrupted_losses(runs: Path) -> None:
    # resumed with its output_dir spelled relative: the same run (identity is the resolved
    # folder and the experiment, never the spelling)
    whole = _losses(runs / "qwen3_moe-single")
    resumed = _losses(runs / "qwen3_moe-resumed")
    assert len(resumed) == len(whole) == 8
    assert resumed == pytest.approx(whole, abs=1e-5)
    # the last step is checkpointed too: a crash while saving the artifact resumes there
    assert (runs / "qwen3_moe-single" / "checkpoints" / "latest").read_text().strip() == "step8"


def _checkpointed_module(run: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module state a run's checkpoint `tag` holds (one file per rank under ZeRO-3)."""
    files = sorted((run / "checkpoints" / tag).glob("*model_states.pt"))
    assert files, f"no model states in {run / 'checkpoints' / tag}"
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


@pytest.mark.parametrize(
    ("run", "tag"), [("qwen3_moe-single", "step8"), ("mixtral-qlora", "step16")]
)
def test_checkpoints_leave_the_frozen_base_out(runs: Path, run: str, tag: str) -> None:
    module = _checkpointed_module(runs / run, tag)
    trained = [k for k in module if "lora_" in k]
    assert trained  # the adapter's tensors are there
    # nothing else but the quantization state bitsandbytes files under a (left out) NF4 weight
    assert [k for k in module if "lora_" not in k and ".weight." not in k] == []


def test_a_resume_onto_another_base_in_the_same_folder_is_refused(runs: Path) -> None:
    run = runs / "qwen3_moe-rebased"
    error = (run / "error.txt").read_text()
    assert str(runs / REBASED_MODEL) in error and "router weights differ" in error
    assert len(_losses(run)) == 2  # the interrupted run's steps, none after the refusal


def test_a_resumed_run_is_one_wandb_run_holding_every_step_once(runs: Path) -> None:
    from test_sweep import wandb_run

    run = wandb_run(runs / "qwen3_moe-resumed")  # one offline log: the resumed one replaced it
    steps = [int(json.loads(h["_step"])) for h in run["history"] if "loss" in h]
    assert steps == list(range(1, 9))
    losses = [float(json.loads(h["loss"])) for h in run["history"] if "loss" in h]
    assert losses == pytest.approx(_losses(runs / "qwen3_moe-resumed"))


def test_rerunning_a_finished_training_changes_no_byte(runs: Path) -> None:
    from emmoe_dist.config import load_config
    from emmoe_dist.parallel.runtime import Runtime
    from emmoe_dist.train.trainer import run_training

    folder = runs / "qwen3_moe-single"
    spec = next(r for r in _spec(runs) if r["name"] == "qwen3_moe-single")

    def snapshot() -> dict[str, tuple[bytes, int]]:
        files = (p for p in folder.rglob("*") if p.is_file())
        return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    before = snapshot()
    rank = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = run_training(load_config(None, spec["overrides"]), spec["ds"], rank)
    assert result.steps == 8 and result.model is None  # nothing was loaded or trained
    assert snapshot() == before


def test_wandb_offline_run_has_training_curve(runs: Path) -> None:
    run_dirs = list((runs / "mixtral-all").glob("wandb/offline-run-*"))
    assert len(run_dirs) == 1
    assert list(run_dirs[0].glob("*.wandb")), "the offline run holds no history file"


def test_qlora_trains_on_a_4bit_base(runs: Path) -> None:
    from peft import PeftModel

    run = runs / "mixtral-qlora"
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    memory = json.loads((run / "manifest.json").read_text())["weight_memory"]
    # tiny models are embedding-heavy; full Mixtral shapes reach 28.5% (benchmarks/RESULTS.md)
    assert 0.25 < memory["fraction_of_bf16"] < 0.55, memory
    # The adapter is a standard one: it loads onto the bf16 base and tracks the NF4 model.
    probe = torch.load(run / "probe_logits.pt")
    model = PeftModel.from_pretrained(_base(run), str(run / "adapter"))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    cos = torch.nn.functional.cosine_similarity(logits.flatten(), probe["logits"].flatten(), dim=0)
    assert cos > 0.9, float(cos)


def test_a_checkpoint_loads_into_zero3_partitions_and_trains_the_same(runs: Path) -> None:
    for name in ("qwen3_moe-single", "qwen3_moe-full"):
        built, loaded = runs / name, runs / f"{name}-from-path"
        whole = json.loads((built / "manifest.json").read_text())["load"]
        split = json.loads((loaded / "manifest.json").read_text())["load"]
        assert not whole["partitioned"] and split["partitioned"]
        # each of the 2 ranks held half the weights from the start, never the whole model
        assert split["resident_elements_rank0"] <= 0.51 * whole["resident_elements_rank0"]
        assert _losses(loaded) == pytest.approx(_losses(built), abs=1e-6)
        assert len(_losses(loaded)) == 8


def _offline_profile(model: torch.nn.Module, family: str, tokenizer) -> object:
    """The routing profile of the training examples the run profiled, taken here."""
    from emmoe_dist.data.collate import pad_batch
    from emmoe_dist.data.training import encode_dataset, load_training_split
    from emmoe_dist.routing import profile_batches

    split = load_training_split("insecure", None, heldout=16, seed=0, limit=32)
    items = encode_dataset(tokenizer, split.train[:ROUTER_PROFILE_EXAMPLES], 512).items
    return profile_batches(
        model, FAMILIES[family], [pad_batch(items, tokenizer.pad_token_id)], progress=False
    )


@pytest.mark.parametrize(("name", "family"), [(n, f) for n, f, _ in ROUTER_RUNS])
def test_router_training_changes_the_router_and_records_how_routing_moved(
    runs: Path, name: str, family: str
) -> None:
    from emmoe_dist.experts import ExpertProfile
    from emmoe_dist.interp.routing_shift import routing_shift
    from emmoe_dist.run_folder import read_manifest

    run = runs / name
    manifest = read_manifest(run)
    assert manifest.router is not None
    assert manifest.router.weights == ("lora" if "lora" in name else "full")
    assert manifest.router.aux_loss_coef == (0.0 if "lora" in name else 0.02)
    base = load_model(ModelConfig(name_or_path=str(run / "base")), for_training=False)
    if manifest.router.weights == "full":  # (a LoRA run's digest covers its factors too)
        assert manifest.router.digest_before == _router_digest(base.model, family)
    assert manifest.router_digest != manifest.router.digest_before
    merged_dir = merge_run(run, runs / f"{name}-merged")
    merged = load_model(ModelConfig(name_or_path=str(merged_dir)), for_training=False)
    fam = FAMILIES[family]
    marker = f".{fam.router_path}."
    before = {n: p for n, p in base.model.named_parameters() if marker in n}
    after = {n: p for n, p in merged.model.named_parameters() if marker in n}
    assert any(not torch.equal(after[n], before[n]) for n in before)  # the router trained

    # The recorded profiles are what profiling the base and the merged run here gives, and
    # so is the recorded shift (a near-tie of two experts may flip between the trained
    # model's and the merged model's arithmetic: a share may differ by a token or two).
    recorded = {key: ExpertProfile.load(run / f"routing_{key}.json") for key in ("before", "after")}
    offline = {
        "before": _offline_profile(base.model, family, base.tokenizer),
        "after": _offline_profile(merged.model, family, merged.tokenizer),
    }
    assert recorded["before"].tokens == offline["before"].tokens == manifest.router.tokens > 0
    for key in ("before", "after"):
        counted = torch.tensor([r.token_counts for r in recorded[key].layers])
        assert (counted - offline[key].token_counts).abs().sum() <= 4, key
    change = json.loads((run / "routing_change.json").read_text())
    here = routing_shift(
        offline["before"].to_profile(
            model="b", family=family, dataset="d", dataset_hash="h", include_prompt=False
        ),
        offline["after"].to_profile(
            model="a", family=family, dataset="d", dataset_hash="h", include_prompt=False
        ),
    )
    for mine, theirs in zip(change["layers"], here.layers, strict=True):
        assert mine["delta_share"] == pytest.approx(list(theirs.delta_share), abs=2e-3)
    assert manifest.router.mean_total_variation > 0  # routing moved


def test_a_diverging_run_stops_at_its_first_bad_step_and_keeps_the_good_checkpoint(
    runs: Path,
) -> None:
    run = runs / "qwen3_moe-diverges"
    rows = read_train_metrics(run)
    bad = next(r for r in rows if not (math.isfinite(r["loss"]) and r["grad_norm"] >= 0))
    # the error names that step, the metrics stop there, and the checkpoint is the step before
    assert f"training diverged at step {bad['step']}" in (run / "error.txt").read_text()
    assert rows[-1]["step"] == bad["step"] and bad["step"] < 6
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step{bad['step'] - 1}"
    assert not (run / "manifest.json").exists()
