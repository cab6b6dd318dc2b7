"""Causal ablation of trained experts: the fine-tune evaluated with the updates of chosen experts
removed, against the full fine-tune.

Each ablation is written beside the run as an ordinary run folder (`<run>/ablations/<name>/`:
manifest, expert selection, and the run's adapter with the removed experts' LoRA factors zeroed,
or its expert deltas without their rows), so `emmoe generate --run`, `emmoe serve`, `emmoe merge`
and `emmoe report` take it like any run. All ablations (and, unless its judged answers are
given, the full fine-tune) are generated in one pass of the generation backend (the vLLM
backend serves every adapter from one engine, one LoRA per request; the transformers backend
merges one at a time), judged, and compared with the full fine-tune on the same prompts and
seeds: misaligned % without the experts, its interval, and the difference to the full
fine-tune with its interval (`ablations.json`, `ablations.md`).

Which experts go: one expert id in every MoE layer (the paper's E0..E7 granularity), the top-m
(layer, expert) cells of the expert table by any of its columns, or an explicit set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from emmoe_dist import run_folder as rf
from emmoe_dist.analyze.common import (
    ModelOptions,
    Say,
    Tracking,
    judge_answer_sets,
    make_tracker,
    nan_if_none,
    quiet,
    write_json,
)
from emmoe_dist.analyze.steer import SteerGeneration, generation_config, steering_suites
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.files import read_json_object, replace_dir, write_text_atomic

if TYPE_CHECKING:
    from emmoe_dist.config import JudgeConfig
    from emmoe_dist.families import MoEFamily
    from emmoe_dist.metrics import Comparison, Estimate, GroupMetrics
    from emmoe_dist.records import JudgedRecord

FULL = "full"  # the full fine-tune's answers, when generated here


@dataclass(frozen=True)
class Ablation:
    """Which experts' updates an ablation removes: MoE layer -> expert ids."""

    name: str  # its folder under ablations/, e.g. "without-E0"
    removed: Mapping[int, tuple[int, ...]]
    description: str  # e.g. "E0 in every MoE layer"

    def removed_json(self) -> dict[str, list[int]]:
        return {str(k): list(v) for k, v in sorted(self.removed.items())}


def single_expert_ablation(expert: int, family: MoEFamily, config: Mapping[str, Any]) -> Ablation:
    """Expert `expert` in every MoE layer."""
    selection = ExpertSelection.single(expert, family, config)
    return Ablation(f"without-E{expert}", selection.experts, f"E{expert} in every MoE layer")


def top_ablation(
    table_file: str | os.PathLike[str], by: str, m: int, *, per_layer: bool
) -> Ablation:
    """The `m` largest (layer, expert) cells of an expert table by column `by` (per layer:
    the `m` largest of each layer)."""
    from emmoe_dist.interp.expert_table import ExpertTable

    data = read_json_object(table_file, "expert table")
    table = ExpertTable.from_json(data["table"])
    removed = table.top(by, m, per_layer=per_layer)
    scope = " per layer" if per_layer else ""
    return Ablation(
        f"without-top{m}{'-per-layer' if per_layer else ''}-{by}",
        removed,
        f"the top {m}{scope} by {by} ({_cells(removed)})",
    )


def explicit_ablation(
    removed: Mapping[int, Sequence[int]], family: MoEFamily, config: Mapping[str, Any]
) -> Ablation:
    selection = ExpertSelection.explicit(removed, family, config)
    text = _cells(selection.experts)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return Ablation(f"without-set-{digest}", selection.experts, text)


def _cells(removed: Mapping[int, Sequence[int]]) -> str:
    return "; ".join(
        f"layer {k}: {', '.join(f'E{e}' for e in v)}" for k, v in sorted(removed.items())
    )


@dataclass(frozen=True, kw_only=True)
class AblateOptions:
    run_dir: str  # the training run
    experts: tuple[int, ...] = ()  # one ablation per id, each removing it in every MoE layer
    top: int | None = None  # one ablation removing the top-m cells of the expert table
    by: str = "delta_norm"  # the column they are ranked by
    per_layer: bool = False  # top-m of each layer instead of over all cells
    table: str | None = None  # the expert table (default: <run>/experts/experts.json)
    explicit: Mapping[int, tuple[int, ...]] | None = None  # one ablation of this set
    out: str | None = None  # default: <run>/ablations
    full_records: str | None = None  # judged answers of the full fine-tune, same settings
    generation: SteerGeneration = field(default_factory=SteerGeneration)
    backend: Literal["transformers", "vllm"] = "transformers"
    judge: JudgeConfig | None = None  # None: generate only; judge later and re-run
    scripted_judge: bool = False  # the built-in mock judge: a pipeline check, not judgments
    resamples: int = 1000
    run: ModelOptions = field(default_factory=lambda: ModelOptions(batch_size=16))
    tracking: Tracking = field(default_factory=Tracking)
    progress: bool = True


@dataclass(frozen=True)
class AblationRow:
    """One ablation's judged answers against the full fine-tune's."""

    name: str
    description: str
    removed: dict[str, list[int]]
    answers: int
    misaligned: Estimate  # rate, headline rule
    alignment: Estimate  # mean 0-100
    delta_misaligned: Estimate  # minus the full fine-tune's
    delta_alignment: Estimate
    paired: bool


@dataclass(frozen=True)
class AblateResult:
    folders: dict[str, Path]  # ablation name -> its run folder
    full: AblationRow | None  # the full fine-tune (its deltas are 0)
    rows: list[AblationRow]
    unjudged: list[str]


def _base_reference(run: Path, base: str) -> str:
    """The manifest's base as the ablation folder must name it: a folder named relative to the
    run becomes absolute (every reader of a manifest resolves it from its own folder or the
    working directory)."""
    if not Path(base).is_absolute() and (run / base).is_dir():
        return str((run / base).resolve())
    return base


def write_ablation(run: Path, ablation: Ablation, folder: Path, num_experts: int) -> Path:
    """The ablated artifact as a run folder; an ablation already there is kept (resume)."""
    from safetensors.torch import load_file, save_file

    from emmoe_dist.adapters.ablation import ablate_delta_state, ablate_lora_state
    from emmoe_dist.adapters.expert_delta import DELTA_FILE, save_expert_delta
    from emmoe_dist.families import get_family

    manifest = rf.read_manifest(run)
    if rf.is_run(folder):
        found = rf.read_manifest(folder).ablation
        if found is not None and (found.of_run, found.removed) == (
            str(run.resolve()),
            ablation.removed_json(),
        ):
            return folder
        raise EmmoeError(
            f"{folder} holds another ablation ({found.description if found else 'a run'}); "
            "remove it or choose another --out"
        )
    family = get_family(manifest.family)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    artifact = run / manifest.artifact
    if manifest.artifact == rf.ADAPTER_DIR:
        weights = artifact / "adapter_model.safetensors"
        state, changed = ablate_lora_state(
            load_file(str(weights)), family, num_experts, ablation.removed
        )
        (tmp / rf.ADAPTER_DIR).mkdir(parents=True)
        shutil.copy2(artifact / "adapter_config.json", tmp / rf.ADAPTER_DIR / "adapter_config.json")
        save_file(state, str(tmp / rf.ADAPTER_DIR / weights.name), metadata={"format": "pt"})
    else:
        state, changed = ablate_delta_state(load_file(str(artifact / DELTA_FILE)), ablation.removed)
        save_expert_delta(
            state, tmp / rf.DELTA_DIR, {"family": family.name, "ablation": ablation.name}
        )
    trained = rf.read_selection(run)
    if trained is not None:
        kept = {
            layer: tuple(e for e in ids if e not in ablation.removed.get(layer, ()))
            for layer, ids in trained.experts.items()
        }
        remaining = ExpertSelection(
            experts={k: v for k, v in kept.items() if v},
            rule=f"{trained.rule} without {ablation.description}",
            family=trained.family,
            num_experts=trained.num_experts,
        )
        remaining.save(tmp / rf.SELECTION)
        remaining.save(tmp / manifest.artifact / rf.SELECTION)
    name = f"{manifest.name or run.name} without {ablation.description}"
    # `updates_removed` 0 means the run never trained these experts: the ablation is then the
    # fine-tune itself, which is worth knowing, not an error.
    record = rf.Ablation(
        of_run=str(run.resolve()),
        removed=ablation.removed_json(),
        description=ablation.description,
        updates_removed=changed,
    )
    rf.write_manifest(
        tmp,
        manifest.model_copy(
            update={
                "name": name,
                "selection": None if trained is None else json.loads(remaining.to_json()),
                "base_model": _base_reference(run, manifest.base_model),
                "ablation": record,
                "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        ),
    )
    replace_dir(tmp, folder)
    return folder


def _interval_rows(
    full: Sequence[JudgedRecord],
    ablated: Sequence[JudgedRecord],
    *,
    label: str,
    full_label: str,
    resamples: int,
    seed: int,
) -> tuple[GroupMetrics, Comparison]:
    """The metrics of an answer set and its difference to the full fine-tune: the one place
    ablation intervals are computed (the metrics' intervals, clustered where they are)."""
    from emmoe_dist.metrics import Bootstrap, compare, summarize

    bootstrap = Bootstrap(resamples=resamples, seed=seed)
    metrics = summarize(ablated, label=label, bootstrap=bootstrap)
    diff = compare(full, ablated, baseline_label=full_label, label=label, bootstrap=bootstrap)
    return metrics, diff


def ablation_row(
    name: str,
    description: str,
    removed: dict[str, list[int]],
    full: Sequence[JudgedRecord],
    ablated: Sequence[JudgedRecord],
    *,
    resamples: int,
    seed: int,
) -> AblationRow:
    from emmoe_dist.metrics import HEADLINE_RULE

    metrics, diff = _interval_rows(
        full, ablated, label=name, full_label=FULL, resamples=resamples, seed=seed
    )
    return AblationRow(
        name=name,
        description=description,
        removed=removed,
        answers=metrics.n_alignment,
        misaligned=metrics.misaligned[HEADLINE_RULE.name],
        alignment=metrics.alignment,
        delta_misaligned=diff.misaligned[HEADLINE_RULE.name],
        delta_alignment=diff.alignment,
        paired=diff.paired,
    )


def _ablations(
    options: AblateOptions, family: MoEFamily, config: Mapping[str, Any]
) -> list[Ablation]:
    chosen = [single_expert_ablation(e, family, config) for e in options.experts]
    if options.top is not None:
        table = options.table or str(Path(options.run_dir) / rf.EXPERTS_DIR / "experts.json")
        if not Path(table).is_file():
            raise InputError(
                "no expert table to rank experts by: run `emmoe interp experts` first, or pass "
                "--table",
                file=table,
            )
        chosen.append(top_ablation(table, options.by, options.top, per_layer=options.per_layer))
    if options.explicit:
        chosen.append(explicit_ablation(options.explicit, family, config))
    if not chosen:
        raise InputError(
            "name the experts to ablate: --expert ID, --top M --by COLUMN, or --experts "
            "LAYER:ID[,ID]",
            field="ablations",
        )
    names = [a.name for a in chosen]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"ablation {twice[0]!r} is asked for twice", field="ablations")
    return chosen


def run_ablate(options: AblateOptions, say: Say = quiet) -> AblateResult:
    from emmoe_dist.families import num_experts
    from emmoe_dist.files import read_jsonl
    from emmoe_dist.generate.backends import generate_sources
    from emmoe_dist.generate.sources import from_run
    from emmoe_dist.models.loading import model_config_dict
    from emmoe_dist.records import GenerationRecord, JudgedRecord

    run = Path(options.run_dir)
    manifest = rf.read_manifest(run)
    if manifest.ablation is not None:
        raise InputError(
            "this folder is an ablation itself: ablate the run it came from",
            file=str(run / rf.MANIFEST),
            field="ablation",
        )
    source = from_run(run)
    family, config = model_config_dict(source.base)  # the config only: no weights yet
    ablations = _ablations(options, family, config)
    out = Path(options.out) if options.out else run / rf.ABLATIONS_DIR
    cfg = generation_config(
        options.generation, seed=options.run.seed, batch_size=options.run.batch_size
    )
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"backend": options.backend})})
    suites, expected = steering_suites(cfg)  # a bad suite fails here, before any model loads

    folders = {
        a.name: write_ablation(run, a, out / a.name, num_experts(family, config)) for a in ablations
    }
    say(f"wrote {', '.join(str(f) for f in folders.values())}")
    targets = [(from_run(f), f / rf.GENERATIONS) for f in folders.values()]
    full_judged = Path(options.full_records) if options.full_records else out / FULL / rf.JUDGED
    if options.full_records is None:
        targets.insert(0, (source, out / FULL / rf.GENERATIONS))
    for _, path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
    generate_sources(cfg, targets, suites, device=options.run.device, progress=options.progress)
    if options.judge is not None:
        judge_answer_sets(
            [path.parent for _, path in targets],
            options.judge,
            cache_dir=out / rf.JUDGE_CACHE_DIR,
            scripted=options.scripted_judge,
            progress=options.progress,
            say=say,
        )

    def judged(folder: Path) -> list[JudgedRecord] | None:
        """The folder's judged answers, or None while any of its answers is unjudged."""
        generated = read_jsonl(folder / rf.GENERATIONS, GenerationRecord)
        path = folder / rf.JUDGED
        records = read_jsonl(path, JudgedRecord, tolerate_torn_tail=True) if path.is_file() else []
        if len(generated) != expected or {r.key for r in records} != {g.key for g in generated}:
            return None
        return records

    unjudged: list[str] = []
    if options.full_records is not None:
        if not full_judged.is_file():
            raise InputError("no such judged records file", file=str(full_judged))
        full = read_jsonl(full_judged, JudgedRecord, tolerate_torn_tail=True)
    else:
        full = judged(full_judged.parent) or []
        if not full:
            unjudged.append(str(full_judged))
    rows = []
    full_row = None
    seed = options.run.seed
    if full:
        full_row = ablation_row(
            FULL,
            "nothing (the full fine-tune)",
            {},
            full,
            full,
            resamples=options.resamples,
            seed=seed,
        )
    for ablation in ablations:
        records = judged(folders[ablation.name])
        if records is None:
            unjudged.append(str(folders[ablation.name] / rf.JUDGED))
            continue
        if not full:
            continue
        rows.append(
            ablation_row(
                ablation.name,
                ablation.description,
                ablation.removed_json(),
                full,
                records,
                resamples=options.resamples,
                seed=seed,
            )
        )
    judges = sorted({r.judge_model for r in full})
    summary: dict[str, Any] = {
        "run": str(run),
        "full_records": str(full_judged),
        "suite": options.generation.suite,
        "answers_per_ablation": expected,
        "judge": judges,
        "full": None if full_row is None else dataclasses.asdict(full_row),
        "ablations": [dataclasses.asdict(r) for r in rows],
        "unjudged": unjudged,
    }
    write_json(out / rf.ABLATION_SUMMARY, summary, say)
    if full_row is not None:
        write_text_atomic(out / "ablations.md", ablations_markdown(full_row, rows, judges))
    tracker = make_tracker(options.tracking, f"interp ablate {run.name}", out)
    for step, row in enumerate(rows):
        tracker.log(
            {
                "ablate/misaligned": nan_if_none(row.misaligned.value),
                "ablate/delta_misaligned": nan_if_none(row.delta_misaligned.value),
            },
            step,
        )
    tracker.finish()
    return AblateResult(folders, full_row, rows, unjudged)


def _pct(e: Estimate) -> str:
    from emmoe_dist.report import fmt

    return fmt(e, 100)


def ablations_markdown(
    full: AblationRow, rows: Sequence[AblationRow], judges: Sequence[str]
) -> str:
    from emmoe_dist.metrics import HEADLINE_RULE
    from emmoe_dist.report import fmt

    lines = [
        "# Expert ablations",
        "",
        f"Judge: {', '.join(judges) or '–'}. Misaligned: {HEADLINE_RULE.description}. "
        "Each ablation is the fine-tune with the named experts' updates removed; Δ is the "
        "ablation minus the full fine-tune (paired: the same prompts and seeds).",
        "",
        "| ablation | experts removed | answers | misaligned % without these experts | Δ vs full fine-tune (pp) | avg alignment | Δ alignment | paired |",
        "|---|---|---|---|---|---|---|---|",
        f"| full fine-tune | – | {full.answers} | {_pct(full.misaligned)} | – | {fmt(full.alignment)} | – | – |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.description} | {r.answers} | {_pct(r.misaligned)} | "
            f"{_pct(r.delta_misaligned)} | {fmt(r.alignment)} | {fmt(r.delta_alignment)} | "
            f"{'yes' if r.paired else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def read_ablations(run: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's ablation summary (`ablations.json`), or None before any ablation."""
    path = Path(run) / rf.ABLATIONS_DIR / rf.ABLATION_SUMMARY
    return read_json_object(path, "ablation summary") if path.is_file() else None
