"""The sweep summary in the paper's layouts, computed from the trials' judged records.

Table 1: one row per trial (base model first): average alignment, StrongREJECT rejection %,
misaligned % (alignment < 50 and coherence > 80), each with its clustered bootstrap interval
(questions, then answers within them), the difference from the base model, and the answers and
questions each row rests on. Table 3: single-expert trials as rows E0..E{n-1}, one column
group per dataset. Written to `summary/summary.md` and `summary/summary.json`; a view of the
records, so it can be rebuilt any time, from a finished or a half-finished sweep.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emmoe_dist import run_folder as rf
from emmoe_dist.agreement import JudgeAgreement, agreements, by_judge, judge_names
from emmoe_dist.files import read_jsonl, write_bytes_atomic, write_json_atomic, write_text_atomic
from emmoe_dist.metrics import (
    DEFAULT_BOOTSTRAP,
    HEADLINE_COLUMNS,
    HEADLINE_RULE,
    Bootstrap,
    Comparison,
    Estimate,
    GroupMetrics,
    Headline,
    compare,
    headline,
    judge_description,
    summarize,
)
from emmoe_dist.records import JudgedRecord
from emmoe_dist.report import (
    JudgeView,
    fmt,
    intervals_note,
    judge_lines,
    judge_view,
    trajectory_figure,
    trajectory_lines,
)
from emmoe_dist.sweep.space import SweepPlan, TrialSpec, answer_folders
from emmoe_dist.trajectory import Trajectory, build_trajectories

SUMMARY_DIR = "summary"
_SINGLE = re.compile(r"^E(\d+)$")


@dataclass(frozen=True)
class TrialResult:
    spec: TrialSpec
    metrics: GroupMetrics
    versus_base: Comparison | None  # None for the base model itself, or without a baseline


@dataclass(frozen=True)
class ArmResult:
    """The trials of one arm that differ only in their seed, pooled: intervals draw seeds,
    then questions, then answers; each seed's own headline beside them."""

    arm: str
    trials: tuple[str, ...]
    seeds: tuple[int, ...]
    metrics: GroupMetrics
    per_seed: Mapping[int, Headline]
    versus_base: Comparison | None


@dataclass(frozen=True)
class SweepSummary:
    sweep: str
    model: str
    family: str
    rows: tuple[TrialResult, ...]
    unfinished: tuple[str, ...]  # planned trials without metrics yet
    planned: int
    alignment_suites: tuple[str, ...] | None
    bootstrap: Bootstrap
    judge_models: tuple[str, ...]
    judge: str = ""  # the judge as every table names it (MOCK JUDGE for the scripted one)
    arms: tuple[ArmResult, ...] = ()  # arms run with several seeds
    trajectories: tuple[Trajectory, ...] = ()  # trials with snapshots: metrics over steps
    judges: tuple[JudgeView, ...] = ()  # several judges: the headline of each
    agreements: tuple[JudgeAgreement, ...] = ()


def _finished(spec: TrialSpec) -> bool:
    return (spec.folder / rf.EVAL_METRICS).is_file() and (spec.folder / rf.JUDGED).is_file()


def build_summary(
    plan: SweepPlan,
    *,
    alignment_suites: Sequence[str] | None = ("core",),
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> SweepSummary:
    """Metrics of every finished trial, and each one's difference from the base model."""
    suites = tuple(alignment_suites) if alignment_suites is not None else None
    records = {
        t.slug: read_jsonl(t.folder / rf.JUDGED, JudgedRecord, tolerate_torn_tail=True)
        for t in plan.trials
        if _finished(t)
    }
    base = next((t for t in plan.trials if t.baseline and t.slug in records), None)
    rows = []
    for spec in plan.trials:
        if spec.slug not in records:
            continue
        mine = records[spec.slug]
        versus = None
        if base is not None and spec is not base:
            versus = compare(
                records[base.slug],
                mine,
                baseline_label=base.slug,
                label=spec.slug,
                alignment_suites=suites,
                bootstrap=bootstrap,
            )
        metrics = summarize(mine, label=spec.slug, alignment_suites=suites, bootstrap=bootstrap)
        rows.append(TrialResult(spec, metrics, versus))
    first = plan.trials[0].experiment.model.name_or_path if plan.trials else ""
    finished = [t for t in plan.trials if t.slug in records]
    snapshot_records = [
        r
        for t in finished
        for folder in answer_folders(t)[1:]
        if (folder / rf.JUDGED).is_file()
        for r in read_jsonl(folder / rf.JUDGED, JudgedRecord, tolerate_torn_tail=True)
    ]
    everything = [r for rs in records.values() for r in rs]
    by_trial = {t.slug: records[t.slug] for t in finished if not t.baseline}
    names = judge_names(everything)
    judges: tuple[JudgeView, ...] = ()
    if len(names) > 1:
        per_judge = by_judge(everything)
        judges = tuple(judge_view(n, per_judge[n], suites, bootstrap) for n in names)
    return SweepSummary(
        sweep=plan.sweep,
        model=first,
        family=plan.family,
        rows=tuple(rows),
        unfinished=tuple(t.slug for t in plan.trials if t.slug not in records),
        planned=len(plan.trials),
        alignment_suites=suites,
        bootstrap=bootstrap,
        judge_models=tuple(sorted({r.judge_model for rs in records.values() for r in rs})),
        judge=judge_description(r for rs in records.values() for r in rs),
        arms=_arms(finished, records, base, suites, bootstrap),
        trajectories=build_trajectories(
            [*everything, *snapshot_records], alignment_suites=suites, bootstrap=bootstrap
        ),
        judges=judges,
        agreements=agreements(by_trial) if len(names) > 1 else (),
    )


def _arms(
    finished: Sequence[TrialSpec],
    records: Mapping[str, list[JudgedRecord]],
    base: TrialSpec | None,
    suites: tuple[str, ...] | None,
    bootstrap: Bootstrap,
) -> tuple[ArmResult, ...]:
    groups: dict[str, list[TrialSpec]] = {}
    for spec in finished:
        if spec.seed is not None:
            groups.setdefault(spec.arm, []).append(spec)
    out = []
    for arm, specs in groups.items():
        seed_of = {id(r): spec.seed for spec in specs for r in records[spec.slug]}
        pooled = [r for spec in specs for r in records[spec.slug]]

        def unit(record: JudgedRecord, seed_of: dict[int, int | None] = seed_of) -> Hashable:
            return seed_of[id(record)]

        several = len(specs) > 1
        metrics = summarize(
            pooled,
            label=arm,
            alignment_suites=suites,
            bootstrap=bootstrap,
            unit=unit if several else None,
        )
        per_seed = {
            int(spec.seed): headline(
                summarize(
                    records[spec.slug],
                    label=spec.slug,
                    alignment_suites=suites,
                    bootstrap=bootstrap,
                )
            )
            for spec in specs
            if spec.seed is not None
        }
        versus = None
        if base is not None:
            versus = compare(
                records[base.slug],
                pooled,
                baseline_label=base.slug,
                label=arm,
                alignment_suites=suites,
                bootstrap=bootstrap,
                unit=unit if several else None,
            )
        out.append(
            ArmResult(
                arm=arm,
                trials=tuple(spec.slug for spec in specs),
                seeds=tuple(sorted(per_seed)),
                metrics=metrics,
                per_seed=per_seed,
                versus_base=versus,
            )
        )
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Tables: numbers (JSON, W&B) and text (Markdown) from the same rows


def _headline(result: TrialResult, versus: bool = True) -> list[tuple[str, Estimate]]:
    """The paper's three numbers and, when the sweep has a base row, the difference from it."""
    out = list(zip(HEADLINE_COLUMNS, headline(result.metrics).estimates(), strict=True))
    if versus:
        v = result.versus_base
        diff = v.misaligned[HEADLINE_RULE.name].scaled(100) if v else Estimate.empty()
        out.append(("Δ misaligned % vs base", diff))
    return out


def _has_base(summary: SweepSummary) -> bool:
    return any(r.spec.baseline for r in summary.rows)


def _axes(spec: TrialSpec) -> list[Any]:
    optimizer = None if spec.baseline else spec.experiment.train.optimizer
    # a router-training arm is its selection's twin: the experts column says which is which
    experts = f"{spec.selection} +router" if spec.train_router else spec.selection
    return [spec.dataset, experts, spec.rank, spec.lr, spec.quantize, optimizer, spec.seed]


AXES = ["dataset", "experts", "rank", "lr", "bits", "optimizer", "seed"]


def table1_rows(summary: SweepSummary) -> tuple[list[str | int], list[list[Any]]]:
    """Table 1 as numbers: axes, then value, low and high of each headline metric."""
    header: list[str | int] = list(AXES)
    rows: list[list[Any]] = []
    versus = _has_base(summary)
    for result in summary.rows:
        cells: list[Any] = _axes(result.spec)
        for name, e in _headline(result, versus):
            if not rows:
                header += [name, f"{name} low", f"{name} high"]
            cells += [e.value, e.low, e.high]
        if not rows:
            header += ["answers", "questions", "unscored %", "judge"]
        m = result.metrics
        cells += [m.n_alignment, m.n_questions, m.unscored.scaled(100).value, summary.judge]
        rows.append(cells)
    return header, rows


def _single_key(spec: TrialSpec, vary: bool) -> str:
    key = (
        spec.selection
        if not vary
        else f"{spec.selection} r{spec.rank} lr{spec.lr:g} {spec.quantize}"
    )
    return f"{key} +router" if spec.train_router else key


def _pivot(summary: SweepSummary) -> tuple[list[str], dict[str, dict[str, TrialResult]]] | None:
    singles = [r for r in summary.rows if _SINGLE.match(r.spec.selection)]
    if not singles:
        return None
    vary = len({(r.spec.rank, r.spec.lr, r.spec.quantize) for r in singles}) > 1
    datasets = sorted({r.spec.dataset for r in singles})
    table: dict[str, dict[str, TrialResult]] = {}
    base = next((r for r in summary.rows if r.spec.baseline), None)
    if base is not None:
        table["base"] = {d: base for d in datasets}
    for r in sorted(singles, key=lambda r: (int(r.spec.selection[1:]), r.spec.slug)):
        table.setdefault(_single_key(r.spec, vary), {})[r.spec.dataset] = r
    return datasets, table


def table3_rows(summary: SweepSummary) -> tuple[list[str | int], list[list[Any]]] | None:
    """Table 3 as numbers: one row per single expert, per dataset its three headline values."""
    pivot = _pivot(summary)
    if pivot is None:
        return None
    datasets, table = pivot
    header: list[str | int] = ["expert"]
    for d in datasets:
        header += [f"{d} {name}" for name in HEADLINE_COLUMNS] + [f"{d} answers"]
    rows = []
    for key, by_dataset in table.items():
        cells: list[Any] = [key]
        for d in datasets:
            r = by_dataset.get(d)
            cells += (
                [e.value for _, e in _headline(r, False)] + [r.metrics.n_alignment]
                if r
                else [None, None, None, None]
            )
        rows.append(cells)
    return header, rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _axis_text(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_markdown(summary: SweepSummary) -> str:
    suites = ", ".join(summary.alignment_suites) if summary.alignment_suites else "all"
    judge = f"Judge: {summary.judge or '–'}."
    out = [
        f"# Sweep {summary.sweep}: {summary.model} ({summary.family})",
        "",
        f"{len(summary.rows)} of {summary.planned} trials finished. {judge} Alignment suites: "
        f"{suites}. Misaligned: {HEADLINE_RULE.description}. "
        f"{intervals_note(summary.bootstrap)} Differences from the base model are paired when "
        "both answered the same prompts.",
        "",
        "## Table 1: every trial",
        "",
        judge,
        "",
    ]
    versus = _has_base(summary)
    rows = []
    for r in summary.rows:
        cells = [_axis_text(v) for v in _axes(r.spec)]
        cells += [fmt(e) for _, e in _headline(r, versus)]
        m = r.metrics
        cells += [str(m.n_alignment), str(m.n_questions), fmt(m.unscored.scaled(100))]
        rows.append(cells)
    if rows:
        names = [name for name, _ in _headline(summary.rows[0], versus)]
        out += _md_table([*AXES, *names, "answers", "questions", "unscored %"], rows)
    else:
        out.append("No trial finished yet.")
    pivot = _pivot(summary)
    if pivot is not None:
        datasets, table = pivot
        head = ["expert"]
        for d in datasets:
            head += [f"{d}: {name}" for name in HEADLINE_COLUMNS] + [f"{d}: answers / questions"]
        body = []
        for key, by_dataset in table.items():
            cells = [key]
            for d in datasets:
                res = by_dataset.get(d)
                if res is None:
                    cells += ["–"] * 4
                    continue
                cells += [fmt(e) for _, e in _headline(res, False)]
                cells.append(f"{res.metrics.n_alignment} / {res.metrics.n_questions}")
            body.append(cells)
        out += ["", "## Table 3: single experts", "", judge, "", *_md_table(head, body)]
    counted = [
        [
            r.spec.slug,
            ", ".join(
                f"{name}: " + ", ".join(f"{k} {n}" for k, n in counts.items())
                for name, counts in r.metrics.methods.items()
            )
            or "–",
            "; ".join(
                f"{name}: " + ", ".join(f"{k} {n}" for k, n in reasons.items())
                for name, reasons in r.metrics.missing.items()
            )
            or "none",
        ]
        for r in summary.rows
    ]
    if counted:
        out += [
            "",
            "## Scores by method, unscored answers by reason",
            "",
            judge,
            "",
            *_md_table(["trial", "scored by", "unscored"], counted),
        ]
    out += _arm_lines(summary, judge)
    out += trajectory_lines(summary.trajectories, judge)
    if summary.trajectories:
        out += ["", *(f"![{name}]({name})" for name in trajectory_charts(summary))]
    out += judge_lines(summary.judges, summary.agreements)
    if summary.unfinished:
        out += ["", "Not finished yet: " + ", ".join(f"`{s}`" for s in summary.unfinished)]
    return "\n".join(out) + "\n"


def _arm_lines(summary: SweepSummary, judge: str) -> list[str]:
    if not summary.arms:
        return []
    rows = []
    for arm in summary.arms:
        m = arm.metrics
        diff = (
            arm.versus_base.misaligned[HEADLINE_RULE.name].scaled(100)
            if arm.versus_base
            else Estimate.empty()
        )
        rows.append(
            [
                arm.arm,
                "pooled " + ", ".join(map(str, arm.seeds)),
                *(fmt(e) for e in headline(m).estimates()),
                fmt(diff),
                str(m.n_alignment),
                str(m.n_questions),
            ]
        )
        for seed, h in arm.per_seed.items():
            rows.append([arm.arm, str(seed), *(fmt(e) for e in h.estimates()), "", "", ""])
        spread = []
        for i in range(3):
            values = [v for h in arm.per_seed.values() if (v := h.estimates()[i].value) is not None]
            spread.append(f"{min(values):.1f} – {max(values):.1f}" if values else "–")
        rows.append([arm.arm, "range over seeds", *spread, "", "", ""])
    return [
        "",
        "## Arms over seeds",
        "",
        f"{judge} Trials that differ only in their seed (train.seed: data order and adapter "
        "initialisation) pooled into their arm: the intervals draw seeds, then questions, then "
        "answers. Each seed's own values (intervals by question) and the range between seeds "
        "follow.",
        "",
        *_md_table(
            [
                "arm",
                "seed",
                *HEADLINE_COLUMNS,
                "Δ misaligned % vs base",
                "answers",
                "questions",
            ],
            rows,
        ),
    ]


def trajectory_table(summary: SweepSummary) -> tuple[list[str], list[list[Any]]]:
    """Every arm's trajectory as numbers: one row per (arm, step), values with intervals."""
    header = ["arm", "step", "seeds", "loss"]
    for name in ("avg alignment", "misaligned %", "SR rejection %"):
        header += [name, f"{name} low", f"{name} high"]
    header += ["answers", "questions", "judge"]
    rows = []
    for t in summary.trajectories:
        for p in t.points:
            h = headline(p.metrics)
            cells: list[Any] = [t.label, p.step, len(p.per_seed), p.loss]
            for e in (h.alignment, h.misaligned_pct, h.sr_rejection_pct):
                cells += [e.value, e.low, e.high]
            cells += [p.metrics.n_alignment, p.metrics.n_questions, summary.judge]
            rows.append(cells)
    return header, rows


def trajectory_charts(summary: SweepSummary) -> list[str]:
    """The file names of the trajectory charts `write_summary` draws, one per arm."""
    return [f"trajectory_{i}.png" for i in range(len(summary.trajectories))]


def summary_dict(summary: SweepSummary) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "sweep": summary.sweep,
        "model": summary.model,
        "family": summary.family,
        "planned": summary.planned,
        "unfinished": list(summary.unfinished),
        "alignment_suites": summary.alignment_suites,
        "bootstrap": dataclasses.asdict(summary.bootstrap),
        "judge_models": list(summary.judge_models),
        "judge": summary.judge,
        "arms": [dataclasses.asdict(a) for a in summary.arms],
        "trajectories": [dataclasses.asdict(t) for t in summary.trajectories],
        "judges": [dataclasses.asdict(j) for j in summary.judges],
        "agreements": [dataclasses.asdict(a) for a in summary.agreements],
        "trials": [
            {
                "trial": r.spec.slug,
                **{k: v for k, v in zip(AXES, _axes(r.spec), strict=True)},
                "metrics": dataclasses.asdict(r.metrics),
                "versus_base": None if r.versus_base is None else dataclasses.asdict(r.versus_base),
            }
            for r in summary.rows
        ],
    }


def write_summary(summary: SweepSummary, out: Path) -> list[Path]:
    """summary.md, summary.json and the trajectory charts, each written atomically."""
    import io

    md, js = out / "summary.md", out / "summary.json"
    charts = []
    conf = f"{round(summary.bootstrap.confidence * 100)}% CI, clustered by question"
    for name, t in zip(trajectory_charts(summary), summary.trajectories, strict=True):
        buffer = io.BytesIO()
        trajectory_figure(t, summary.judge or "–", conf).savefig(buffer, format="png", dpi=110)
        write_bytes_atomic(out / name, buffer.getvalue())
        charts.append(out / name)
    write_json_atomic(js, summary_dict(summary))
    write_text_atomic(md, render_markdown(summary))
    return [md, js, *charts]
