"""What a training run checks before any model loads, and the identity of a run.

Everything that can fail on the user's input fails here, with the file, line and field the
user wrote: the expert selection (against the model's config only), the training data (read,
checked against the catalog, encoded with the tokenizer alone, enough for one optimizer step),
and whether the output folder already holds this run:

- a finished run of the same experiment: re-running it is a no-op (nothing is retrained or
  rewritten); a finished run of another experiment is refused;
- checkpoints of the same experiment: the run resumes; of another experiment: refused.

A run's identity is what decides its results: the experiment's settings with paths resolved
(never their spelling) and without the ones that only say where outputs go or how they are
watched, the training data's content hash, and the experts the selection chose.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist import run_folder as rf
from emmoe_dist.config import ExperimentConfig
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.experts import ExpertSelection, select_experts
from emmoe_dist.families import MoEFamily
from emmoe_dist.files import read_json_object, write_json_atomic

if TYPE_CHECKING:
    from emmoe_dist.data.chat import EncodedChat
    from emmoe_dist.data.training import TrainingSplit
    from emmoe_dist.interp.monitor import ProbeSet

# Settings that say where outputs go, how a run is watched or how fast it computes (a resume
# after an out-of-memory may change those), not what it trains.
_NOT_IDENTITY = {
    (): ("name", "output_dir", "tracking", "eval", "judge", "more_judges"),
    ("model",): ("experts_implementation",),
    ("data",): ("dir", "allow_unverified"),
    # the monitor reads without changing the weights; snapshots only copy them
    ("train",): (
        "save_every",
        "log_every",
        "profile_step",
        "gradient_checkpointing",
        "compile",
        "snapshot_every",
        "monitor",
    ),
    ("selection",): ("profile", "file"),  # the chosen experts stand for them
}
IDENTITY_FILE = "identity.json"  # in the checkpoints folder: what its checkpoints trained


def training_identity(
    config: Mapping[str, Any], *, data_hash: str, experts: Mapping[str, Any]
) -> dict[str, Any]:
    """The identity of a run (module docstring) from its validated config (`model_dump`)."""
    identity = json.loads(json.dumps(config))
    for parents, keys in _NOT_IDENTITY.items():
        node = identity
        for key in parents:
            node = node.get(key, {})
        for key in keys:
            node.pop(key, None)
    model = identity.get("model", {})
    name = str(model.get("name_or_path", ""))
    if name and Path(name).expanduser().exists():  # a local folder: where it is, not its spelling
        model["name_or_path"] = str(Path(name).expanduser().resolve())
    data = identity.get("data", {})
    if "/" in str(data.get("train", "")) or str(data.get("train", "")).endswith(".jsonl"):
        data["train"] = "own file"  # its content hash is below
    return {
        "config": identity,
        "data_hash": data_hash,
        "experts": {str(k): list(v) for k, v in experts.items()},
    }


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, value in a, value in b) of the first place two identities differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            found = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if a == b else (path, a, b)


def _describe(difference: tuple[str, Any, Any]) -> str:
    key, there, here = difference
    key = key.removeprefix("config.")
    return f"{key} is {json.dumps(there)} there, {json.dumps(here)} here"


@dataclass(frozen=True)
class Finished:
    """The output folder holds a finished run of this very experiment."""

    manifest: rf.RunManifest


@dataclass(frozen=True)
class Prepared:
    """Everything checked and read before the model loads."""

    family: MoEFamily
    hf_config: dict[str, Any]
    selection: ExpertSelection
    split: TrainingSplit
    items: list[EncodedChat]
    dropped: int
    identity: dict[str, Any]
    probes: ProbeSet | None = None  # train.monitor's probes


def _selection(
    cfg: ExperimentConfig, family: MoEFamily, hf_config: dict[str, Any]
) -> ExpertSelection:
    rule = cfg.selection
    return select_experts(
        rule.rule,
        model=(family, hf_config),
        where=lambda name: cfg.where(f"selection.{name}"),
        **rule.model_dump(exclude={"rule"}),
    )


def _check_finished(out: Path, identity: dict[str, Any], cfg: ExperimentConfig) -> Finished | None:
    if not rf.is_run(out):
        return None
    manifest = rf.read_manifest(out)
    before = manifest.identity
    if before is None:  # manifests written before runs recorded their identity
        experts = (manifest.selection or {}).get("experts", {})
        data_hash = manifest.data.source_hash if manifest.data else identity["data_hash"]
        before = training_identity(manifest.config, data_hash=data_hash, experts=experts)
    difference = first_difference(before, identity)
    if difference is not None:
        raise cfg.where("output_dir").error(
            f"{out} holds a finished run of another experiment ({_describe(difference)}); "
            "choose another output_dir"
        )
    return Finished(manifest)


def check_checkpoints(out: Path, identity: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Checkpoints in the output folder must be of this experiment to be resumed."""
    path = out / rf.CHECKPOINTS_DIR / IDENTITY_FILE
    if not path.is_file():
        return
    before = read_json_object(path, "checkpoint identity")
    difference = first_difference(before, identity)
    if difference is not None:
        raise cfg.where("output_dir").error(
            f"{out / rf.CHECKPOINTS_DIR} holds checkpoints of another experiment "
            f"({_describe(difference)}); resume with the same settings or choose another "
            "output_dir"
        )


def record_identity(out: Path, identity: dict[str, Any]) -> None:
    """Written beside the first checkpoint (rank 0): what a resume must match."""
    path = out / rf.CHECKPOINTS_DIR / IDENTITY_FILE
    if not path.is_file():
        write_json_atomic(path, identity)


def _too_small(
    cfg: ExperimentConfig, split: TrainingSplit, n: int, dropped: int, world_size: int
) -> InputError | None:
    needed = cfg.train.micro_batch_size * world_size * cfg.train.grad_accum
    if n >= needed:
        return None
    source = f"{split.name} ({split.source})"
    if n == 0 and dropped:
        return cfg.where("data.max_length").error(
            f"none of the {dropped} examples of {source} keeps an assistant token within "
            f"{cfg.data.max_length} tokens, so nothing would train; raise data.max_length"
        )
    why = (
        f"data.limit {cfg.data.limit} leaves {n}"
        if cfg.data.limit is not None
        else f"{source} has {n} usable examples"
    )
    if dropped:
        why += f" ({dropped} more had no assistant token within data.max_length)"
    return cfg.where("data.limit" if cfg.data.limit is not None else "data.train").error(
        f"{why}; one optimizer step needs {needed} (train.micro_batch_size "
        f"{cfg.train.micro_batch_size} x {world_size} ranks x train.grad_accum "
        f"{cfg.train.grad_accum})"
    )


def prepare(cfg: ExperimentConfig, world_size: int) -> Prepared | Finished:
    """Check and read everything a run needs before its model loads (module docstring)."""
    from emmoe_dist.data.training import encode_dataset, load_training_split
    from emmoe_dist.models.loading import load_tokenizer, model_config_dict
    from emmoe_dist.parallel.strategy import optimizer_problem
    from emmoe_dist.train.monitor import build_probes

    problem = optimizer_problem(cfg.train.optimizer)
    if problem is not None:
        raise cfg.where("train.optimizer").error(problem)
    family, hf_config = model_config_dict(cfg.model)  # the config only: no weights
    selection = _selection(cfg, family, hf_config)
    try:
        split = load_training_split(
            cfg.data.train,
            cfg.data_dir(),
            heldout=cfg.data.heldout,
            seed=cfg.data.split_seed,
            limit=cfg.data.limit,
            allow_unverified=cfg.data.allow_unverified,
        )
    except InputError:
        raise
    except EmmoeError as e:
        raise cfg.where("data.train").error(str(e)) from None
    identity = training_identity(
        cfg.model_dump(mode="json"),
        data_hash=split.source_hash,
        experts=json.loads(selection.to_json())["experts"],
    )
    out = Path(cfg.output_dir)
    finished = _check_finished(out, identity, cfg)
    if finished is not None:
        return finished
    check_checkpoints(out, identity, cfg)
    tokenizer = load_tokenizer(cfg.model)
    enc = encode_dataset(tokenizer, split.train, cfg.data.max_length, pack=cfg.data.pack)
    too_small = _too_small(cfg, split, len(enc.items), enc.dropped, world_size)
    if too_small is not None:
        raise too_small
    probes = build_probes(cfg, tokenizer, hf_config)
    return Prepared(family, hf_config, selection, split, enc.items, enc.dropped, identity, probes)
