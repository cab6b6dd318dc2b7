"""How routing moved between the base and the fine-tuned model: both profiled on the same
tokens; per MoE layer, the KL divergence of the token-share distributions and the change of
each expert's share; whether the trained experts (the run's selection) moved most."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist import run_folder as rf
from emmoe_dist.analyze.common import (
    ModelOptions,
    Say,
    Subject,
    Tracking,
    free_memory,
    load_subject,
    make_tracker,
    quiet,
    write_json,
)
from emmoe_dist.errors import EmmoeError

if TYPE_CHECKING:
    from emmoe_dist.experts import ExpertProfile
    from emmoe_dist.interp.routing_shift import RoutingShift


@dataclass(frozen=True, kw_only=True)
class RoutingShiftOptions:
    model: str  # checkpoint folder, hub id, tiny:<family> or a training run folder
    out: str
    records: str | None = None  # generation or judged records: their answers are profiled
    data: str | None = None  # or a training set (name or chat JSONL): its examples
    data_dir: str | None = None  # default: $EMMOE_DATA_DIR
    allow_unverified_data: bool = False  # a training set whose hash is not the catalog's
    base: str | None = None  # default: the run's base when `model` is a run
    selection: str | None = None  # default: the run's expert_selection.json
    limit: int = 500  # N examples (a training set's: after its seeded shuffle)
    include_prompt: bool = False  # count prompt tokens too (default: answer tokens only)
    epsilon: float = 1e-6  # additive smoothing of token shares before the KL divergence
    permutations: int = 2000
    run: ModelOptions = field(default_factory=ModelOptions)
    tracking: Tracking = field(default_factory=Tracking)
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.records is None) == (self.data is None):
            raise EmmoeError("profile either records or a training set, not both or neither")


@dataclass(frozen=True)
class RoutingShiftResult:
    shift: RoutingShift
    base: ExpertProfile
    tuned: ExpertProfile
    plots: dict[str, Path]


def _data_dir(options: RoutingShiftOptions) -> Path | None:
    return Path(options.data_dir) if options.data_dir else None


def _profiled_inputs(options: RoutingShiftOptions) -> tuple[str, str]:
    """(dataset name, hash of what is profiled): a profile on disk is reused only when the
    inputs and the settings that shape its counts are the same."""
    from emmoe_dist.catalog import git_blob_sha1

    if options.records:
        name, source = Path(options.records).stem, git_blob_sha1(options.records)
    else:
        from emmoe_dist.data.training import training_file

        assert options.data is not None
        name, path = training_file(
            options.data, _data_dir(options), allow_unverified=options.allow_unverified_data
        )
        source = git_blob_sha1(path)
    settings = (
        f"{source}|limit={options.limit}|max_length={options.run.max_length}"
        f"|prompt={options.include_prompt}"
    )
    return name, hashlib.sha256(settings.encode()).hexdigest()[:16]


def _items(tokenizer: Any, options: RoutingShiftOptions) -> list[Any]:
    """The encoded examples or answers to profile."""
    from emmoe_dist.data.chat import encode_chat
    from emmoe_dist.files import iter_jsonl
    from emmoe_dist.interp.activations import chat_messages
    from emmoe_dist.records import GenerationRecord, JudgedRecord

    max_length = options.run.max_length
    if options.data:
        from emmoe_dist.data.training import encode_dataset, load_training_split

        split = load_training_split(
            options.data,
            _data_dir(options),
            heldout=0,
            seed=0,
            limit=options.limit,
            allow_unverified=options.allow_unverified_data,
        )
        return encode_dataset(tokenizer, split.train, max_length).items
    assert options.records is not None
    first = next(iter_jsonl(options.records), {})
    generations = (
        [r.generation for r in iter_jsonl(options.records, JudgedRecord)]
        if "generation" in first
        else list(iter_jsonl(options.records, GenerationRecord))
    )
    items = []
    for g in generations[: options.limit]:
        enc = encode_chat(tokenizer, chat_messages(g), max_length)
        if enc is not None:
            items.append(enc)
    return items


def profile_routing(
    subject: Subject,
    items: Sequence[Any],
    *,
    dataset: str,
    dataset_hash: str,
    batch_size: int,
    include_prompt: bool = False,
    progress: bool = False,
) -> ExpertProfile:
    """The routing profile of `subject` on encoded examples, longest first in padded batches."""
    from emmoe_dist.data.collate import pad_batch
    from emmoe_dist.routing import profile_batches

    ordered = sorted(items, key=len, reverse=True)
    pad = int(subject.loaded.tokenizer.pad_token_id or 0)
    counts = profile_batches(
        subject.loaded.model,
        subject.loaded.family,
        (pad_batch(ordered[s : s + batch_size], pad) for s in range(0, len(ordered), batch_size)),
        include_prompt=include_prompt,
        progress=progress,
        total=-(-len(ordered) // batch_size),
    )
    return counts.to_profile(
        model=subject.source.label,
        family=subject.loaded.family.name,
        dataset=dataset,
        dataset_hash=dataset_hash,
        include_prompt=include_prompt,
    )


def _profile(spec: str, role: str, options: RoutingShiftOptions, say: Say) -> ExpertProfile:
    from emmoe_dist.experts import ExpertProfile
    from emmoe_dist.generate.sources import model_source

    name, digest = _profiled_inputs(options)
    path = Path(options.out) / f"{role}_profile.json"
    if path.is_file():
        found = ExpertProfile.load(path)
        if (found.model, found.dataset_hash) == (model_source(spec).label, digest):
            say(f"reusing {path}")
            return found
    subject = load_subject(spec, options.run)
    items = _items(subject.loaded.tokenizer, options)
    if not items:
        raise EmmoeError("no example has a token left to profile within max_length")
    profile = profile_routing(
        subject,
        items,
        dataset=name,
        dataset_hash=digest,
        batch_size=options.run.batch_size,
        include_prompt=options.include_prompt,
        progress=options.progress,
    )
    del subject
    free_memory()
    profile.save(path)
    say(f"wrote {path}")
    return profile


def run_routing_shift(options: RoutingShiftOptions, say: Say = quiet) -> RoutingShiftResult:
    from emmoe_dist.experts import ExpertSelection
    from emmoe_dist.generate.sources import run_base
    from emmoe_dist.interp.plots import plot_routing_shift
    from emmoe_dist.interp.routing_shift import routing_shift
    from emmoe_dist.routing_plots import plot_share_diff

    out = Path(options.out)
    base_spec = options.base or run_base(options.model)
    if base_spec is None:
        raise EmmoeError("a base model is needed when the model is not a training run folder")
    selection = (
        ExpertSelection.load(options.selection)
        if options.selection
        else rf.read_selection(options.model)
    )
    tuned = _profile(options.model, "tuned", options, say)
    base = _profile(base_spec, "base", options, say)
    shift = routing_shift(
        base,
        tuned,
        epsilon=options.epsilon,
        trained=selection,
        permutations=options.permutations,
        seed=options.run.seed,
    )
    write_json(out / "routing_shift.json", shift.to_json(), say)
    plots = {
        "routing_shift": plot_routing_shift(shift, out / "routing_shift.png"),
        "routing_share_diff": plot_share_diff(base, tuned, out / "routing_share_diff.png"),
    }
    say(f"wrote {', '.join(str(p) for p in plots.values())}")
    tracker = make_tracker(options.tracking, f"interp routing-shift {tuned.model}", out)
    for layer in shift.layers:
        tracker.log(
            {"routing/kl": layer.kl, "routing/total_variation": layer.total_variation},
            layer.layer,
        )
    tracker.images({k: str(v) for k, v in plots.items()})
    tracker.summary(
        {"mean_trained_auroc": shift.mean_trained_auroc, "permutation_p": shift.permutation_p}
    )
    tracker.finish()
    return RoutingShiftResult(shift, base, tuned, plots)
