"""What the analyses share: how models load, which answers are analysed, their activations,
tracking and the JSON they write."""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.files import dumps_json, write_text_atomic

if TYPE_CHECKING:
    from emmoe_dist.config import JudgeConfig
    from emmoe_dist.generate.sources import ModelSource
    from emmoe_dist.interp.activations import ActivationSet, AnswerItem
    from emmoe_dist.interp.labels import LabelRule
    from emmoe_dist.models.loading import LoadedModel
    from emmoe_dist.records import JudgedRecord
    from emmoe_dist.tracking import Tracker

Say = Callable[[str], None]  # where an analysis reports what it does (the CLI prints)


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """How the analysed models load and run."""

    device: str | None = None  # cpu, cuda, cuda:1; None: cuda when available
    device_map: str | None = None  # "auto": spread a large model over the GPUs
    dtype: str = "auto"
    seed: int = 0  # tiny models' weights, random draws and splits
    batch_size: int = 8  # sequences per forward
    max_length: int = 1024  # tokens per answer


@dataclass(frozen=True, kw_only=True)
class AnswerLabels:
    """The judged answers to analyse and what counts as misaligned among them."""

    records: str  # judged records (JSONL)
    rule: str = "seed"  # seed, betley, turner_soligo
    aligned_above: float | None = None  # aligned answers need alignment above this
    per_class: int | None = None  # at most this many answers per class
    min_per_class: int = 10  # at least this many (interp.labels.MIN_PER_CLASS), else refused


@dataclass(frozen=True, kw_only=True)
class Tracking:
    """W&B for an analysis: off unless a project is named; offline unless WANDB_MODE=online."""

    project: str | None = None
    group: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # what the run was asked to do


@dataclass(frozen=True)
class Subject:
    """A model loaded for analysis, and what was loaded, as generation records name it."""

    loaded: LoadedModel
    source: ModelSource


def load_subject(spec: str, options: ModelOptions) -> Subject:
    """Load `spec` for inference, a run's adapter or expert deltas merged in (a merged expert
    LoRA costs nothing per token); `device_map` spreads the layers over the GPUs."""
    from emmoe_dist.generate.backends import auto_device
    from emmoe_dist.generate.sources import load_for_generation, model_source

    source = model_source(spec)
    device = None if options.device_map else options.device or auto_device()
    loaded = load_for_generation(
        source,
        seed=options.seed,
        dtype=options.dtype,
        device=device,
        device_map=options.device_map,
    )
    return Subject(loaded, source)


def free_memory() -> None:
    """Return a dropped model's memory before the next loads (two large ones rarely fit)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_tracker(tracking: Tracking, name: str, out: Path) -> Tracker:
    from emmoe_dist.tracking import NullTracker, make_tracker

    if not tracking.project:
        return NullTracker()
    from emmoe_dist.config import TrackingConfig

    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    return make_tracker(
        TrackingConfig(project=tracking.project, group=tracking.group, mode=mode),
        is_main=True,
        name=name,
        config=tracking.config,
        folder=str(out),
        job_type="interp",
    )


def nan_if_none(value: float | None) -> float:
    """A metric for a tracker's chart, where a missing value is a gap."""
    return float("nan") if value is None else value


def write_json(path: Path, value: Any, say: Say = quiet) -> None:
    # One line per list of numbers: a 48 x 48 cosine matrix stays 48 lines.
    write_text_atomic(path, dumps_json(value) + "\n")
    say(f"wrote {path}")


def judge_answer_sets(
    folders: Sequence[Path],
    cfg: JudgeConfig,
    *,
    cache_dir: Path,
    scripted: bool = False,
    progress: bool = False,
    say: Say = quiet,
) -> None:
    """Judge each folder's generations into its judged records (resumable, replies cached in
    `cache_dir`); `scripted` swaps the endpoint for the built-in mock judge."""
    import contextlib

    from emmoe_dist import run_folder as rf
    from emmoe_dist.judge.runner import JudgeOptions, run_judge

    judging = JudgeOptions(cache_dir=str(cache_dir), progress=progress)
    with contextlib.ExitStack() as stack:
        if scripted:
            from emmoe_dist.judge.scripted_server import (
                SCRIPTED_MODEL,
                hash_script,
                scripted_server,
            )

            server = stack.enter_context(scripted_server(hash_script()))
            say(f"scripted judge at {server.base_url}: mock scores, not a judgment")
            cfg = cfg.model_copy(update={"base_url": server.base_url, "model": SCRIPTED_MODEL})
        for folder in folders:
            summary = run_judge(folder / rf.GENERATIONS, folder / rf.JUDGED, cfg, judging)
            say(f"{folder}: {summary.format()}")


def labelled_answers(
    labels: AnswerLabels, seed: int
) -> tuple[list[JudgedRecord], list[int], LabelRule]:
    """The balanced set of judged answers to analyse, with their labels."""
    from emmoe_dist.files import read_jsonl
    from emmoe_dist.interp.labels import balanced_indices, label_rule
    from emmoe_dist.records import JudgedRecord

    rule = label_rule(labels.rule, labels.aligned_above)
    records = read_jsonl(labels.records, JudgedRecord)
    marks = rule.labels(records)
    try:
        chosen = balanced_indices(
            marks, per_class=labels.per_class, seed=seed, min_per_class=labels.min_per_class
        )
    except EmmoeError as e:
        raise InputError(f"{e} ({rule.describe()})", file=labels.records) from None
    return [records[i] for i in chosen], [int(marks[i]) for i in chosen], rule


def collect_answer_activations(
    subject: Subject,
    items: Sequence[AnswerItem],
    folder: Path,
    *,
    max_length: int,
    batch_size: int,
    progress: bool = False,
) -> ActivationSet:
    """Per-layer activations of encoded answers, collected (resumably) into `folder`."""
    from emmoe_dist.interp.activations import ActivationMeta, collect_activations
    from emmoe_dist.models.anatomy import decoder_layers, model_config

    model, family = subject.loaded.model, subject.loaded.family
    meta = ActivationMeta(
        model=subject.source.model_label,
        adapter=subject.source.adapter_label,
        family=family.name,
        num_layers=len(decoder_layers(model, family)),
        hidden_size=int(model_config(model)["hidden_size"]),
        max_length=max_length,
    )
    return collect_activations(
        model,
        family,
        items,
        folder,
        meta,
        batch_size=batch_size,
        pad_id=int(subject.loaded.tokenizer.pad_token_id or 0),
        progress=progress,
    )


def _stored(
    spec: str,
    records: Sequence[JudgedRecord],
    labels: Sequence[int],
    folder: Path,
    max_length: int,
) -> ActivationSet | None:
    """The activations already on disk for every answer, when `spec` made them: a re-run
    (or `detect` after `direction`) then loads no model at all."""
    import numpy as np

    from emmoe_dist.generate.sources import model_source
    from emmoe_dist.interp.activations import load_activations, read_index

    index = read_index(folder)
    source = model_source(spec)
    keys = [r.key for r in records]
    if index is None or (index.meta.model, index.meta.adapter, index.meta.max_length) != (
        source.model_label,
        source.adapter_label,
        max_length,
    ):
        return None
    if not set(keys) <= {r.key for r in index.rows}:
        return None
    found = load_activations(folder, keys)
    return dataclasses.replace(found, labels=np.array(labels, dtype=np.int8))


def activations_of(
    spec: str,
    records: Sequence[JudgedRecord],
    labels: Sequence[int],
    folder: Path,
    options: ModelOptions,
    *,
    progress: bool = False,
    say: Say = quiet,
) -> ActivationSet:
    """Activations of `spec` on the answers: from disk, or collected (resumably) into `folder`."""
    from emmoe_dist.interp.activations import encode_answers

    found = _stored(spec, records, labels, folder, options.max_length)
    if found is not None:
        say(f"reusing the activations in {folder}")
        return found
    subject = load_subject(spec, options)
    items, dropped = encode_answers(
        subject.loaded.tokenizer, records, labels, max_length=options.max_length
    )
    if dropped:
        say(f"{dropped} answers had no token within max_length and were left out")
    try:
        return collect_answer_activations(
            subject,
            items,
            folder,
            max_length=options.max_length,
            batch_size=options.batch_size,
            progress=progress,
        )
    finally:
        del subject
        free_memory()
