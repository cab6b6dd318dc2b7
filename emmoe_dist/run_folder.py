"""The run folder: what every stage hands to the next, and its typed manifest.

Layer 0. A training run's `output_dir` holds the fine-tune's files; a sweep trial's folder is
one too, with the evaluation stages' files beside them:

<run>/
  manifest.json          RunManifest: config, family, selection, base model, artifact, results
  expert_selection.json  which experts trained (ESFT-compatible JSON)
  metrics.jsonl          one line per optimizer step (the loss curve)
  adapter/               standard PEFT adapter (LoRA modes) + expert_selection.json
  expert_delta/          expert deltas (full_experts mode) + expert_selection.json
  base/                  the base model, only for tiny:<family> models (built, not loaded)
  mxfp4/                 GPT-oss: the run merged and exported to MXFP4, for `eval.weights:
                         mxfp4` (written on first use, as `emmoe merge --format mxfp4`)
  checkpoints/           DeepSpeed checkpoints for resume
  snapshots/stepNNNNNN/  the adapter (or deltas) at that step (`train.snapshot_every`), with
                         snapshot.json; generation and judging write their records inside
  routing_before.json    router-training runs: the routing profile before the first step
  routing_after.json     ... and after the last (ExpertProfile, the same training examples)
  routing_change.json    ... and how it moved between them (RoutingShift)
  experts/               `emmoe interp experts`: the expert table, its heatmaps and profiles
  ablations/             `emmoe interp ablate`: one folder per ablation, each a run folder
                         whose artifact is this run's with chosen experts' updates removed,
                         with its answers and judgments; ablations.json sums them up
  generations.jsonl      answers to the evaluation suites (`emmoe generate`)
  judged.jsonl           their scores (`emmoe judge`)
  judge_cache/           the judge's reply cache, unless another is named
  judges/<name>.jsonl    further judges' records (`more_judges`), combined into judged.jsonl
  experiment.yaml        sweep trials: the complete experiment the trial runs
  eval_metrics.json      sweep trials: the metrics reported to Tune
  attempts.jsonl         sweep trials: one line per attempt
  logs/                  sweep trials: each stage's output
  wandb_run.json         sweep trials: the trial's W&B run is written (its id and folder)

The manifest is written last, once the artifact is in place: a folder with a manifest is a
finished run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.files import read_json_object, read_jsonl, validation_error, write_json_atomic
from emmoe_dist.records import WeightsFormat

MANIFEST = "manifest.json"
SELECTION = "expert_selection.json"
TRAIN_METRICS = "metrics.jsonl"
ADAPTER_DIR = "adapter"
DELTA_DIR = "expert_delta"
BASE_DIR = "base"
MXFP4_DIR = "mxfp4"
MERGE_INFO = "merge_info.json"  # in a merged model's folder (mxfp4/ too): what was merged
CHECKPOINTS_DIR = "checkpoints"
ROUTING_BEFORE = "routing_before.json"
ROUTING_AFTER = "routing_after.json"
ROUTING_CHANGE = "routing_change.json"
EXPERTS_DIR = "experts"
ABLATIONS_DIR = "ablations"
ABLATION_SUMMARY = "ablations.json"  # in ABLATIONS_DIR
GENERATIONS = "generations.jsonl"
JUDGED = "judged.jsonl"
JUDGE_CACHE_DIR = "judge_cache"
EXPERIMENT = "experiment.yaml"
EVAL_METRICS = "eval_metrics.json"
ATTEMPTS = "attempts.jsonl"
LOGS_DIR = "logs"
WANDB_MARKER = "wandb_run.json"
SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_INFO = "snapshot.json"
MORE_JUDGES_DIR = "judges"

# 1: the untyped manifest of the first releases; 2 adds `completed_at` and requires every
# field training writes. Version 1 files still load, with what they lack left unset.
MANIFEST_SCHEMA_VERSION: Final = 2
Artifact = Literal["adapter", "expert_delta"]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataProvenance(_Part):
    """The training data: its name, the hash of its source file, what was encoded."""

    train: str
    source_hash: str  # the file's git blob hash as trained on
    examples: int
    dropped_no_assistant_tokens: int
    # the catalog's hash of a catalogued set, and whether source_hash equals it: false only
    # when the user allowed an unverified file (data.allow_unverified); None for own files
    expected_hash: str | None = None
    verified: bool | None = None


class ModelLoad(_Part):
    """How the checkpoint was loaded: straight into ZeRO-3 partitions, or whole."""

    partitioned: bool
    resident_elements_rank0: int  # parameter elements rank 0 held once the checkpoint was in


class WeightMemory(_Part):
    """NF4 runs: the bytes of the stored weights and their share of the bf16 size."""

    bytes: int
    fraction_of_bf16: float


class QuantizationAware(_Part):
    """`train.qat`: the frozen experts trained as their values in `format`."""

    format: Literal["mxfp4"]
    expert_weights_changed: int  # weights fake quantization moved (0 from an MXFP4 checkpoint)


class RouterTraining(_Part):
    """`adapter.train_router`: the router trained, and how routing changed (instead of the
    frozen-router digest check every other mode passes)."""

    weights: Literal["lora", "full"]  # LoRA on the router weight, or the router weights
    aux_loss_coef: float  # `train.router_aux_loss_coef`: 0 is the auxiliary loss off
    digest_before: str  # sha256 of the router tensors (and a router LoRA's factors) at step 0
    profile_examples: int  # training examples profiled before and after (ROUTING_BEFORE/AFTER)
    tokens: int  # their tokens counted
    mean_kl: float  # KL(after || before) of the token shares, mean over MoE layers, nats
    max_kl: float
    mean_total_variation: float  # share of routing decisions that moved, mean over layers


class Ablation(_Part):
    """A run folder made by `emmoe interp ablate`: `of_run`'s artifact without the updates of
    `removed`'s experts."""

    of_run: str  # the ablated run's folder
    removed: dict[str, list[int]]  # MoE layer -> expert ids whose update was removed
    description: str  # e.g. "E0 in every MoE layer"
    updates_removed: int  # (layer, expert) pairs among them that the run had changed


class ExpertParallelism(_Part):
    ep_size: int  # the group size the run used
    requested: str | None = None  # as the DeepSpeed config wrote it ("auto" or a number)


class Stopped(_Part):
    """Why training ended before its planned steps (`train.stop_when`)."""

    step: int
    rule: str  # e.g. "monitor/logprob_gap > 0.5"
    value: float
    planned_steps: int


class Snapshot(_Part):
    """One point of a run's trajectory: the adapter (or deltas) after `step` optimizer steps,
    in `folder` (relative to the run; "." is the run's own final artifact)."""

    step: int
    folder: str
    loss: float | None = None  # the training loss of that step


class SnapshotInfo(_Part):
    """`snapshot.json`: what a snapshot folder holds, so it loads without its run's manifest
    (written during training, before the run has one)."""

    step: int
    artifact: Artifact
    base_model: str
    family: str
    model_name: str  # the base as the experiment names it (records' `model`)
    loss: float | None = None


# What version 2 requires beyond version 1's four keys: everything training knows at the end.
_FINISHED_RUN_FIELDS = (
    "name",
    "config_yaml",
    "selection",
    "world_size",
    "device",
    "load",
    "data",
    "steps",
    "router_digest",
    "completed_at",
)


class RunManifest(_Part):
    """What a finished training run was and produced (`manifest.json`)."""

    schema_version: Literal[1, 2] = MANIFEST_SCHEMA_VERSION
    name: str | None = None
    config: dict[str, Any]  # the experiment as validated (`ExperimentConfig.model_dump`)
    config_yaml: str | None = None
    ds_config: dict[str, Any] | None = None  # the completed DeepSpeed config
    expert_parallel: ExpertParallelism | None = None
    family: str
    selection: dict[str, Any] | None = None  # the ExpertSelection's JSON
    world_size: int | None = None
    device: str | None = None
    load: ModelLoad | None = None
    versions: dict[str, str] = {}
    git_revision: str | None = None
    data: DataProvenance | None = None
    steps: int | None = None
    final_loss: float | None = None  # None when no step ran (NaN is not JSON)
    # sha256 of the router tensors after training: equal to the base's unless `router` is set
    router_digest: str | None = None
    weight_memory: WeightMemory | None = None
    qat: QuantizationAware | None = None  # None: trained against the experts as loaded
    # Which weights of this run evaluation answers with (`eval.weights`): the adapter merged in
    # full precision, or the run's MXFP4 export (`MXFP4_DIR`)
    eval_weights: WeightsFormat = "dense"
    router: RouterTraining | None = None  # None: the router stayed frozen (digest unchanged)
    ablation: Ablation | None = None  # None: a training run, not an ablation of one
    artifact: Artifact
    base_model: str  # what the artifact loads onto: a hub id or a folder (relative: the run's)
    completed_at: str | None = None  # ISO 8601, UTC
    # what decides the results (train/preflight.py): a re-run of the same identity is a no-op
    identity: dict[str, Any] | None = None
    # snapshots taken during training (train.snapshot_every), in step order; see `trajectory`
    snapshots: tuple[Snapshot, ...] = ()
    stopped: Stopped | None = None  # set when train.stop_when ended the run early

    @model_validator(mode="after")
    def _complete(self) -> RunManifest:
        if self.schema_version >= 2:
            missing = [f for f in _FINISHED_RUN_FIELDS if getattr(self, f) is None]
            if missing:
                raise ValueError(f"schema_version 2 needs {', '.join(missing)}")
        return self

    def trajectory(self) -> tuple[Snapshot, ...]:
        """The run's points over training: its snapshots, then the final artifact (".")."""
        if self.steps is None:
            return self.snapshots
        final = Snapshot(step=self.steps, folder=".", loss=self.final_loss)
        return (*(s for s in self.snapshots if s.step < self.steps), final)

    @property
    def model_name(self) -> str | None:
        """The model as the experiment named it (`tiny:qwen3_moe`, a hub id, a folder)."""
        model = self.config.get("model")
        name = model.get("name_or_path") if isinstance(model, dict) else None
        return str(name) if name else None


def is_run(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` holds a finished training run."""
    return (Path(folder).expanduser() / MANIFEST).is_file()


def write_manifest(run: str | os.PathLike[str], manifest: RunManifest) -> Path:
    path = Path(run) / MANIFEST
    write_json_atomic(path, manifest.model_dump(mode="json"))
    return path


def read_manifest(run: str | os.PathLike[str]) -> RunManifest:
    """The manifest of a finished run (version 1 or 2); errors name the file and field."""
    path = Path(run) / MANIFEST
    if not path.is_file():
        raise EmmoeError(f"{run} is not a finished training run (no {MANIFEST})")
    data = read_json_object(path, "manifest")
    data.setdefault("schema_version", 1)  # the first manifests were not always stamped
    try:
        return RunManifest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, str(path)) from None


def read_selection(run: str | os.PathLike[str]) -> ExpertSelection | None:
    """The experts a training run trained (None when `run` is not a finished run)."""
    path = Path(run).expanduser() / SELECTION
    return ExpertSelection.load(path) if is_run(run) and path.is_file() else None


def read_train_metrics(run: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The loss curve, one row per optimizer step (none before training wrote one); a last
    line cut by a crash is left out."""
    path = Path(run) / TRAIN_METRICS
    return read_jsonl(path, tolerate_torn_tail=True) if path.is_file() else []


def snapshot_folder(run: str | os.PathLike[str], step: int) -> Path:
    return Path(run) / SNAPSHOTS_DIR / f"step{step:06d}"


def is_snapshot(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder).expanduser() / SNAPSHOT_INFO).is_file()


def read_snapshot(folder: str | os.PathLike[str]) -> SnapshotInfo:
    path = Path(folder) / SNAPSHOT_INFO
    data = read_json_object(path, "snapshot")
    try:
        return SnapshotInfo.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, str(path)) from None


def write_snapshot(folder: str | os.PathLike[str], info: SnapshotInfo) -> Path:
    path = Path(folder) / SNAPSHOT_INFO
    write_json_atomic(path, info.model_dump(mode="json"))
    return path


def list_snapshots(run: str | os.PathLike[str]) -> tuple[Snapshot, ...]:
    """The snapshots on disk, in step order (those a crash left half-written have no info)."""
    root = Path(run) / SNAPSHOTS_DIR
    found = []
    for folder in sorted(root.glob("step*")) if root.is_dir() else []:
        if is_snapshot(folder):
            info = read_snapshot(folder)
            found.append(
                Snapshot(step=info.step, folder=str(folder.relative_to(run)), loss=info.loss)
            )
    return tuple(sorted(found, key=lambda s: s.step))


def run_of(folder: str | os.PathLike[str]) -> tuple[Path, int | None] | None:
    """(the training run, the step) that a run folder, a snapshot folder or an artifact folder
    inside either belongs to; step None for the run's final artifact. None for anything else."""
    path = Path(folder).expanduser()
    for candidate in (path, path.parent):
        if is_snapshot(candidate):
            run = candidate.parent.parent
            return run, read_snapshot(candidate).step
        if is_run(candidate):
            return candidate, None
    return None
