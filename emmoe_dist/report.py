"""Reports from judged records: the paper's table, charts, metrics.json and W&B tables.

Everything here is a view of the judged JSONL files; numbers come from `emmoe_dist.metrics`.
Every table and chart names the judge (or says "MOCK JUDGE - not judgments" for the built-in
scripted judge) and how many answers and questions each number rests on; score charts have a
fixed 0-100 axis and rate charts 0-100 %, so charts compare at a glance and never go negative.
Training runs that differ only in their seed are pooled into one row whose intervals resample
seeds, then questions, then answers. Matplotlib and wandb load inside the functions that draw
or log.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist import run_folder as rf
from emmoe_dist.agreement import JudgeAgreement, agreements, by_judge, judge_names
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.files import iter_jsonl, write_bytes_atomic, write_json_atomic, write_text_atomic
from emmoe_dist.metrics import (
    ALIGNED,
    COHERENT,
    DEFAULT_BOOTSTRAP,
    HEADLINE_COLUMNS,
    HEADLINE_RULE,
    RULES,
    Bootstrap,
    Comparison,
    Estimate,
    GroupMetrics,
    Headline,
    compare,
    group_by_model,
    headline,
    judge_description,
    model_label,
    split_suites,
    summarize,
)
from emmoe_dist.records import JudgedRecord
from emmoe_dist.tracking import WandbMode, WandbTracker
from emmoe_dist.trajectory import (
    MONITOR_COLUMNS,
    Trajectory,
    arm_key,
    build_trajectories,
    run_seed,
    snapshot_adapters,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_SCHEMA_VERSION = 1
JUDGED_GLOB = "*judged*.jsonl"
RULE_TITLES = {"seed": "seed paper", "betley": "Betley et al.", "turner_soligo": "Turner/Soligo"}


@dataclass(frozen=True)
class TrainedRun:
    """A fine-tuning run among the report's sources, as its manifest describes it."""

    folder: str
    base_model: str
    family: str
    selection: str | None  # the selection's rule, e.g. "single expert=4"
    steps: int | None
    final_loss: float | None


def trained_runs(sources: Iterable[str | os.PathLike[str]]) -> tuple[TrainedRun, ...]:
    """The sources that are training run folders (their judged records may sit inside)."""
    runs = []
    for source in sources:
        if rf.is_run(source):
            m = rf.read_manifest(source)
            rule = m.selection.get("rule") if m.selection else None
            runs.append(
                TrainedRun(
                    str(source),
                    m.model_name or m.base_model,
                    m.family,
                    None if rule is None else str(rule),
                    m.steps,
                    m.final_loss,
                )
            )
    return tuple(runs)


@dataclass(frozen=True)
class Report:
    groups: tuple[GroupMetrics, ...]
    comparisons: tuple[Comparison, ...]
    alignment_suites: tuple[str, ...] | None  # None: every suite with alignment scores
    bootstrap: Bootstrap
    judge_models: tuple[str, ...]
    sources: tuple[str, ...]
    runs: tuple[TrainedRun, ...] = ()  # the sources that are training run folders
    # (model label, weights evaluated: "dense" or "mxfp4") for models whose records say
    weights: tuple[tuple[str, str], ...] = ()
    judge: str = ""  # what every table and chart names: the judge model(s), or MOCK_JUDGE
    # pooled rows (several training seeds): each seed's own headline
    seed_rows: tuple[SeedRows, ...] = ()
    # several judges: the headline per judge, and each pair's agreement
    judges: tuple[JudgeView, ...] = ()
    agreements: tuple[JudgeAgreement, ...] = ()
    # runs with snapshots: each arm's metrics over training steps
    trajectories: tuple[Trajectory, ...] = ()


@dataclass(frozen=True)
class SeedRows:
    """The seeds a pooled row holds, each summarised alone: the spread between seeds."""

    label: str
    seeds: Mapping[int, Headline]
    n: Mapping[int, int]  # alignment answers per seed

    def spread(self) -> tuple[Estimate, Estimate, Estimate]:
        """(lowest, highest) over the seeds of each headline number, as Estimate(low, high)."""
        out = []
        for i in range(3):
            values = [v for h in self.seeds.values() if (v := h.estimates()[i].value) is not None]
            out.append(
                Estimate(None, min(values), max(values), len(values))
                if values
                else Estimate.empty()
            )
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class JudgeView:
    """One judge's headline of every model."""

    judge: str
    description: str  # its model, or MOCK_JUDGE
    groups: tuple[GroupMetrics, ...]


def _training_run(record: JudgedRecord) -> Path | None:
    """The training run an answer's adapter came from (adapters live in `<run>/adapter`)."""
    adapter = record.generation.adapter
    if adapter is None:
        return None
    run = Path(adapter).parent
    return run if rf.is_run(run) else None


def _seed_lookup(seed_of: Mapping[str, int]) -> Callable[[JudgedRecord], int]:
    def seed(record: JudgedRecord) -> int:
        return seed_of[model_label(record.generation)]

    return seed


def pool_seeds(
    groups: Mapping[str, list[JudgedRecord]],
) -> tuple[dict[str, list[JudgedRecord]], dict[str, Callable[[JudgedRecord], int]]]:
    """Groups whose training runs differ only in their seed become one group (one arm); its
    label says which seeds it pools. Returns the groups and, for pooled ones, each answer's
    seed (the bootstrap's outer cluster)."""
    arms: dict[str, list[tuple[str, int]]] = {}
    for label, records in groups.items():
        run = _training_run(records[0])
        if run is None:
            continue
        try:
            config = rf.read_manifest(run).config
        except EmmoeError:
            continue
        arms.setdefault(arm_key(config), []).append((label, run_seed(config)))
    pooled_into: dict[str, str] = {}
    seeds: dict[str, Callable[[JudgedRecord], int]] = {}
    for members in arms.values():
        if len({seed for _, seed in members}) < 2:
            continue
        first = members[0][0]
        name = f"{first} (seeds {', '.join(str(seed) for _, seed in members)})"
        seed_of = {label: seed for label, seed in members}
        for label, _ in members:
            pooled_into[label] = name
        seeds[name] = _seed_lookup(seed_of)
    out: dict[str, list[JudgedRecord]] = {}
    for label, records in groups.items():
        out.setdefault(pooled_into.get(label, label), []).extend(records)
    return out, seeds


def find_judged_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; for a folder (a run), every `*judged*.jsonl` below it."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(path.rglob(JUDGED_GLOB))
            if not files:
                raise InputError(f"no {JUDGED_GLOB} files in this folder", file=str(path))
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError("no such file or folder", file=str(path))
    return list(dict.fromkeys(found))


def load_judged(paths: Iterable[str | os.PathLike[str]]) -> list[JudgedRecord]:
    """Judged records of every file; the same answer twice (same model, same key) is an error."""
    records: list[JudgedRecord] = []
    seen: dict[tuple[str, str], str] = {}
    for path in find_judged_files(paths):
        for line, record in enumerate(iter_jsonl(path, JudgedRecord, tolerate_torn_tail=True), 1):
            ident = (model_label(record.generation), record.key)
            if ident in seen:
                raise InputError(
                    f"answer {record.key!r} of {ident[0]!r} already read from {seen[ident]}",
                    file=str(path),
                    line=line,
                    field="key",
                )
            seen[ident] = f"{path}:{line}"
            records.append(record)
    return records


def build_report(
    records: Sequence[JudgedRecord],
    *,
    alignment_suites: Sequence[str] | None = None,
    baseline: str | None = None,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
    sources: Sequence[str] = (),
) -> Report:
    """Metrics per model and each model's difference from `baseline` (default: the first model
    without an adapter, i.e. the base model)."""
    suites = tuple(alignment_suites) if alignment_suites is not None else None
    if suites is not None:
        present = sorted({r.generation.suite for r in records if ALIGNED in r.scores})
        if present and not set(suites) & set(present):
            raise InputError(
                f"no alignment-scored answers in suites {', '.join(suites)}; "
                f"suites present: {', '.join(present)}",
                field="alignment_suites",
            )
    snapshots = snapshot_adapters(records)
    models = [r for r in records if r.generation.adapter not in snapshots]
    groups, seeds = pool_seeds(group_by_model(models))
    if baseline is None:
        baseline = next(
            (label for label, rs in groups.items() if rs[0].generation.adapter is None), None
        )
    elif baseline not in groups:
        raise InputError(
            f"no model labelled {baseline!r}; models: {', '.join(groups)}", field="baseline"
        )
    metrics = tuple(
        summarize(
            rs, label=label, alignment_suites=suites, bootstrap=bootstrap, unit=seeds.get(label)
        )
        for label, rs in groups.items()
    )
    comparisons = tuple(
        compare(
            groups[baseline],
            rs,
            baseline_label=baseline,
            label=label,
            alignment_suites=suites,
            bootstrap=bootstrap,
            unit=seeds.get(label),
            baseline_unit=seeds.get(baseline),
        )
        for label, rs in groups.items()
        if baseline is not None and label != baseline
    )
    seed_rows = tuple(
        _seed_rows(label, groups[label], seeds[label], suites, bootstrap) for label in seeds
    )
    names = judge_names(models)
    judges: tuple[JudgeView, ...] = ()
    if len(names) > 1:
        per_judge = by_judge(models)
        judges = tuple(judge_view(name, per_judge[name], suites, bootstrap) for name in names)
    return Report(
        groups=metrics,
        comparisons=comparisons,
        alignment_suites=suites,
        bootstrap=bootstrap,
        judge_models=tuple(sorted({r.judge_model for r in records})),
        sources=tuple(sources),
        runs=trained_runs(sources),
        weights=tuple(
            (label, "/".join(kinds))
            for label, rs in groups.items()
            if (kinds := sorted({r.generation.weights for r in rs if r.generation.weights}))
        ),
        judge=judge_description(records),
        seed_rows=seed_rows,
        judges=judges,
        agreements=agreements(groups) if len(names) > 1 else (),
        trajectories=build_trajectories(records, alignment_suites=suites, bootstrap=bootstrap),
    )


def _seed_rows(
    label: str,
    records: Sequence[JudgedRecord],
    seed_of: Callable[[JudgedRecord], int],
    suites: Sequence[str] | None,
    bootstrap: Bootstrap,
) -> SeedRows:
    by_seed: dict[int, list[JudgedRecord]] = {}
    for r in records:
        by_seed.setdefault(seed_of(r), []).append(r)
    summaries = {
        seed: summarize(
            rs, label=f"{label} seed {seed}", alignment_suites=suites, bootstrap=bootstrap
        )
        for seed, rs in sorted(by_seed.items())
    }
    return SeedRows(
        label,
        {seed: headline(m) for seed, m in summaries.items()},
        {seed: m.n_alignment for seed, m in summaries.items()},
    )


def judge_view(
    name: str,
    records: Sequence[JudgedRecord],
    suites: Sequence[str] | None,
    bootstrap: Bootstrap,
) -> JudgeView:
    groups, seeds = pool_seeds(group_by_model(records))
    return JudgeView(
        judge=name,
        description=judge_description(records),
        groups=tuple(
            summarize(
                rs,
                label=label,
                alignment_suites=suites,
                bootstrap=bootstrap,
                unit=seeds.get(label),
            )
            for label, rs in groups.items()
        ),
    )


_WEIGHTS_TITLES = {"dense": "full precision", "mxfp4": "MXFP4 export"}


# ---------------------------------------------------------------------------------------------
# Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def fmt(e: Estimate, scale: float = 1.0, digits: int = 1) -> str:
    """`value [low, high]`, scaled (100 for percentages); an en dash when nothing was scored."""
    if e.value is None:
        return "–"
    if e.low is None or e.high is None:
        return f"{e.value * scale:.{digits}f}"
    return f"{e.value * scale:.{digits}f} [{e.low * scale:.{digits}f}, {e.high * scale:.{digits}f}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def intervals_note(bootstrap: Bootstrap) -> str:
    """How the headline intervals were made, for the text above every table of them."""
    return (
        f"Intervals: {round(bootstrap.confidence * 100)}% clustered percentile bootstrap "
        f"({bootstrap.resamples} resamples, seed {bootstrap.seed}): questions drawn with "
        "replacement, then answers within each drawn question (training seeds first where a "
        "row pools several), because the answers to one question are not independent."
    )


def render_markdown(report: Report, charts: Sequence[str] = ()) -> str:
    suites = ", ".join(report.alignment_suites) if report.alignment_suites else "all"
    judge = f"Judge: {report.judge or '–'}."
    out = [
        "# Emergent misalignment report",
        "",
        f"{judge} Alignment suites: {suites}. {intervals_note(report.bootstrap)} "
        f"Misaligned: {HEADLINE_RULE.description} (seed paper). Unscored answers are left out "
        "of every average and counted below.",
        "",
        *_table(
            ["model", *HEADLINE_COLUMNS, "answers", "questions", "SR answers"],
            (
                [
                    g.label,
                    *(fmt(e) for e in headline(g).estimates()),
                    str(g.n_alignment),
                    str(g.n_questions),
                    str(g.n_strongreject),
                ]
                for g in report.groups
            ),
        ),
        "",
        "## Answer-level intervals (secondary)",
        "",
        f"{judge} The same numbers with intervals that resample answers as if they were "
        "independent: narrower than the data support, shown for comparison with studies that "
        "report them.",
        "",
        *_table(
            ["model", *HEADLINE_COLUMNS, "answers", "questions"],
            (
                [
                    g.label,
                    *(fmt(e) for e in g.answer_level.estimates()),
                    str(g.n_alignment),
                    str(g.n_questions),
                ]
                for g in report.groups
                if g.answer_level is not None
            ),
        ),
        "",
        *(
            [
                "Weights evaluated: "
                + "; ".join(
                    f"{label}: {_WEIGHTS_TITLES.get(kind, kind)}" for label, kind in report.weights
                )
                + ".",
                "",
            ]
            # a study in full precision throughout needs no line; one with MXFP4 names each
            if any("mxfp4" in kind for _, kind in report.weights)
            else []
        ),
        "## All misalignment rules",
        "",
        f"{judge} "
        + "; ".join(f"{RULE_TITLES.get(r.name, r.name)}: {r.description}" for r in RULES)
        + ".",
        "",
        *_table(
            [
                "model",
                "answers",
                "questions",
                *(f"{RULE_TITLES.get(r.name, r.name)} %" for r in RULES),
                "coherence",
                "unscored %",
                "SR answers",
                "SR score",
                "SR unscored %",
            ],
            (
                [
                    g.label,
                    str(g.n_alignment),
                    str(g.n_questions),
                    *(fmt(g.misaligned[r.name], 100) for r in RULES),
                    fmt(g.coherence),
                    fmt(g.unscored, 100),
                    str(g.n_strongreject),
                    fmt(g.sr_score, 1, 3),
                    fmt(g.sr_unscored, 100),
                ]
                for g in report.groups
            ),
        ),
    ]
    if report.comparisons:
        base = report.comparisons[0].baseline
        by_label = {g.label: g for g in report.groups}
        out += [
            "",
            f"## Difference from {base}",
            "",
            f"{judge} Each model minus the baseline; paired when both answered the same "
            "prompts (the same questions are then drawn for both).",
            "",
            *_table(
                [
                    "model",
                    "paired",
                    "answers",
                    "questions",
                    "Δ avg alignment",
                    *(f"Δ {RULE_TITLES.get(r.name, r.name)} %" for r in RULES),
                    "Δ SR rejection %",
                ],
                (
                    [
                        c.label,
                        "yes" if c.paired else "no",
                        str(by_label[c.label].n_alignment),
                        str(by_label[c.label].n_questions),
                        fmt(c.alignment),
                        *(fmt(c.misaligned[r.name], 100) for r in RULES),
                        fmt(c.sr_rejection, 100),
                    ]
                    for c in report.comparisons
                ),
            ),
        ]
    out += _seed_lines(report, judge)
    out += trajectory_lines(report.trajectories, judge)
    out += judge_lines(report.judges, report.agreements)
    question_rows = [
        [
            g.label,
            q.suite,
            q.question_id,
            str(q.n),
            fmt(q.alignment),
            fmt(q.coherence),
            fmt(q.misaligned, 100),
            fmt(q.unscored, 100),
        ]
        for g in report.groups
        for q in g.questions
    ]
    if question_rows:
        out += [
            "",
            "## Per question",
            "",
            f"{judge} One question each (its answers resampled).",
            "",
            *_table(
                [
                    "model",
                    "suite",
                    "question",
                    "answers",
                    "avg alignment",
                    "coherence",
                    "misaligned %",
                    "unscored %",
                ],
                question_rows,
            ),
        ]
    category_rows = [
        [g.label, c.category, str(c.n), fmt(c.rejection, 100), fmt(c.score, 1, 3)]
        for g in report.groups
        for c in g.sr_categories
    ]
    if category_rows:
        out += [
            "",
            "## StrongREJECT per category",
            "",
            f"{judge} Answers here are prompts' answers; rejection counts the replies the "
            "rubric read whole.",
            "",
            *_table(["model", "category", "answers", "rejection %", "score"], category_rows),
        ]
    method_rows = [
        [g.label, name, str(counts.get("logprobs", 0)), str(counts.get("text", 0))]
        for g in report.groups
        for name, counts in g.methods.items()
    ]
    out += [
        "",
        "## Scores by method",
        "",
        f"{judge} How each 0-100 score was read: from the judge's logprobs (Betley et al.), or "
        "from its text (opt-in, for endpoints without logprobs).",
        "",
    ]
    out += (
        _table(["model", "score", "logprobs", "text"], method_rows)
        if method_rows
        else ["No 0-100 score was read."]
    )
    missing_rows = [
        [g.label, name, reason, str(n)]
        for g in report.groups
        for name, reasons in g.missing.items()
        for reason, n in reasons.items()
    ]
    out += ["", "## Unscored answers by reason", "", judge, ""]
    out += (
        _table(["model", "score", "reason", "answers"], missing_rows)
        if missing_rows
        else ["Every answer was scored."]
    )
    if charts:
        out += ["", "## Charts", "", *(f"![{Path(c).stem}]({c})" for c in charts)]
    if report.runs:
        out += [
            "",
            "## Fine-tuning runs",
            "",
            *_table(
                ["run", "base", "selection", "steps", "final loss"],
                (
                    [
                        r.folder,
                        r.base_model,
                        r.selection or "–",
                        "–" if r.steps is None else str(r.steps),
                        "–" if r.final_loss is None else f"{r.final_loss:.4f}",
                    ]
                    for r in report.runs
                ),
            ),
        ]
    if report.sources:
        out += ["", "Sources: " + ", ".join(f"`{s}`" for s in report.sources)]
    return "\n".join(out) + "\n"


def _seed_lines(report: Report, judge: str) -> list[str]:
    if not report.seed_rows:
        return []
    by_label = {g.label: g for g in report.groups}
    rows = []
    for pooled in report.seed_rows:
        g = by_label[pooled.label]
        for seed, h in pooled.seeds.items():
            rows.append(
                [pooled.label, str(seed), *(fmt(e) for e in h.estimates()), str(pooled.n[seed])]
            )
        low_high = [
            "–" if e.low is None or e.high is None else f"{e.low:.1f} – {e.high:.1f}"
            for e in pooled.spread()
        ]
        rows.append(
            [pooled.label, "pooled", *(fmt(e) for e in headline(g).estimates()), str(g.n_alignment)]
        )
        rows.append([pooled.label, "range over seeds", *low_high, ""])
    return [
        "",
        "## Per-seed spread",
        "",
        f"{judge} Rows that pool training seeds, each seed alone (its interval clustered by "
        "question), the pooled row (seeds drawn first) and the lowest - highest seed.",
        "",
        *_table(["model", "seed", *HEADLINE_COLUMNS, "answers"], rows),
    ]


def trajectory_lines(trajectories: Sequence[Trajectory], judge: str) -> list[str]:
    """Markdown: each arm's metrics at each step, and the spread of its seeds."""
    if not trajectories:
        return []
    out = [
        "",
        "## Trajectories over training",
        "",
        f"{judge} Each arm's answers at each snapshot (step 0: the base model; the last step: "
        "the final adapter), intervals clustered by question and, where the arm has several "
        "training seeds, seeds first. Loss: the training loss of that step, mean over seeds.",
    ]
    for t in trajectories:
        rows = []
        for p in t.points:
            m = p.metrics
            rows.append(
                [
                    str(p.step),
                    "–" if p.loss is None else f"{p.loss:.4f}",
                    fmt(m.alignment),
                    *(fmt(m.misaligned[r.name], 100) for r in RULES),
                    fmt(m.sr_rejection, 100),
                    str(m.n_alignment),
                    str(m.n_questions),
                    str(m.seeds),
                ]
            )
        stopped = (
            " Stopped early by train.stop_when: "
            + ", ".join(f"seed {seed} at step {step}" for seed, step in sorted(t.stopped.items()))
            + "."
            if t.stopped
            else ""
        )
        out += [
            "",
            f"### {t.label}",
            "",
            f"Seeds: {', '.join(map(str, t.seeds))}.{stopped}",
            "",
            *_table(
                [
                    "step",
                    "loss",
                    "avg alignment",
                    *(f"{RULE_TITLES.get(r.name, r.name)} %" for r in RULES),
                    "SR rejection %",
                    "answers",
                    "questions",
                    "seeds",
                ],
                rows,
            ),
        ]
        if len(t.seeds) > 1:
            spread_rows = [
                [
                    str(p.step),
                    *(
                        "–" if v is None else f"{v[0]:.1f} – {v[1]:.1f}"
                        for v in t.seed_spread(p.step).values()
                    ),
                ]
                for p in t.points
            ]
            out += [
                "",
                "Lowest – highest seed at each step:",
                "",
                *_table(["step", *HEADLINE_COLUMNS], spread_rows),
            ]
    return out


def judge_lines(judges: Sequence[JudgeView], agreements: Sequence[JudgeAgreement]) -> list[str]:
    """Markdown: the headline per judge, and each pair of judges' agreement."""
    if not judges:
        return []
    rows = [
        [
            g.label,
            view.judge,
            view.description,
            *(fmt(e) for e in headline(g).estimates()),
            str(g.n_alignment),
            str(g.n_questions),
        ]
        for view in judges
        for g in view.groups
    ]

    def corr(value: float | None, n: int) -> str:
        return f"{'–' if value is None else f'{value:.3f}'} (n={n})"

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    agree_rows = [
        [
            a.label,
            f"{a.first} vs {a.second}",
            str(a.n_answers),
            str(a.n_questions),
            corr(a.alignment.value, a.alignment.n),
            corr(a.coherence.value, a.coherence.n),
            corr(a.misaligned_kappa.value, a.misaligned_kappa.n),
            pct(a.misaligned_agreement),
            f"{pct(a.misaligned_first)} / {pct(a.misaligned_second)}",
        ]
        for a in agreements
    ]
    rule = RULE_TITLES.get(HEADLINE_RULE.name, HEADLINE_RULE.name)
    return [
        "",
        "## Judges",
        "",
        "The headline as each judge scored the same answers (judge named in each row).",
        "",
        *_table(["model", "judge", "judge model", *HEADLINE_COLUMNS, "answers", "questions"], rows),
        "",
        "### Agreement between judges",
        "",
        "Over the answers both judges scored: Spearman's rank correlation of their 0-100 "
        f"scores, Cohen's kappa of the misaligned label ({rule}: {HEADLINE_RULE.description}; "
        "answers counted under both), the share given the same label and each judge's "
        "misaligned rate on them.",
        "",
        *_table(
            [
                "model",
                "judges",
                "answers",
                "questions",
                "Spearman alignment",
                "Spearman coherence",
                "kappa misaligned",
                "same label %",
                "misaligned % (each)",
            ],
            agree_rows,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Charts


AXIS_MAX = 100.0  # scores are 0-100 and rates 0-100 %: one fixed axis for every chart


def _bar_figure(
    labels: Sequence[str],
    counts: Sequence[str],
    series: dict[str, list[Estimate]],
    *,
    title: str,
    ylabel: str,
    scale: float,
    judge: str,
) -> Figure:
    """Grouped bars with interval whiskers on a fixed 0-100 axis; under each model how many
    answers and questions it rests on, the judge in the title. A model with nothing scored
    gets no bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    legend = len(series) > 1
    fig = Figure(figsize=(max(5.0, 2.0 + 1.4 * len(labels)) + 1.5 * legend, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (name, estimates) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        values, below, above = [], [], []
        for e in estimates:
            v = e.value * scale if e.value is not None else float("nan")
            low = max(0.0, e.low * scale) if e.low is not None and e.value is not None else v
            high = (
                min(AXIS_MAX, e.high * scale) if e.high is not None and e.value is not None else v
            )
            values.append(v)
            below.append(max(0.0, v - low) if e.value is not None else 0.0)
            above.append(max(0.0, high - v) if e.value is not None else 0.0)
        ax.bar(xs, values, width, yerr=[below, above], capsize=3, label=name)
    ticks = [f"{label}\n{n}" for label, n in zip(labels, counts, strict=True)]
    ax.set_xticks(range(len(labels)), ticks, rotation=20, ha="right", fontsize=7)
    ax.set_ylim(0.0, AXIS_MAX)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\njudge: {judge}", fontsize=9)
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def chart_figures(report: Report) -> dict[str, Figure]:
    """File name -> figure: alignment, misalignment under each rule, StrongREJECT rejection."""
    labels = [g.label for g in report.groups]
    answers = [f"n={g.n_alignment} answers, {g.n_questions} questions" for g in report.groups]
    conf = f"{round(report.bootstrap.confidence * 100)}% CI, clustered by question"
    judge = report.judge or "–"
    charts = {
        "alignment.png": _bar_figure(
            labels,
            answers,
            {"alignment": [g.alignment for g in report.groups]},
            title=f"Average alignment ({conf})",
            ylabel="average alignment (0-100)",
            scale=1,
            judge=judge,
        ),
        "misaligned.png": _bar_figure(
            labels,
            answers,
            {
                RULE_TITLES.get(r.name, r.name): [g.misaligned[r.name] for g in report.groups]
                for r in RULES
            },
            title=f"Misaligned answers ({conf})",
            ylabel="misaligned answers (%)",
            scale=100,
            judge=judge,
        ),
    }
    if any(g.n_strongreject for g in report.groups):
        charts["sr_rejection.png"] = _bar_figure(
            labels,
            [f"n={g.n_strongreject} answers, {g.n_sr_prompts} prompts" for g in report.groups],
            {"rejection": [g.sr_rejection for g in report.groups]},
            title=f"StrongREJECT rejection ({conf})",
            ylabel="refused (%)",
            scale=100,
            judge=judge,
        )
    for i, t in enumerate(report.trajectories):
        charts[f"trajectory_{i}_{_slug(t.label)}.png"] = trajectory_figure(t, judge, conf)
    return charts


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return "-".join(part for part in keep.split("-") if part)[:60] or "arm"


def trajectory_figure(t: Trajectory, judge: str, conf: str) -> Figure:
    """One arm over training, step on x: misaligned % under each rule, average alignment and
    StrongREJECT rejection (fixed 0-100 axes, intervals shaded, each seed a thin line), the
    training loss and the monitor's readings of each seed."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    monitored = [c for c in MONITOR_COLUMNS if any(c in curve.columns for curve in t.curves)]
    panels = 4 + len(monitored)
    cols = 3
    rows = (panels + cols - 1) // cols
    fig = Figure(figsize=(5.0 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    steps = [p.step for p in t.points]
    answers = [p.metrics.n_alignment for p in t.points]
    questions = [p.metrics.n_questions for p in t.points]
    n_text = (
        f"n = {min(answers)}-{max(answers)} answers, {min(questions)}-{max(questions)} "
        f"questions per point; {len(t.seeds)} seed(s)"
    )
    fig.suptitle(f"{t.label}: metrics over training\njudge: {judge}; {n_text}", fontsize=9)

    def band(ax: Any, estimates: list[Estimate], scale: float, label: str) -> None:
        values = [np.nan if e.value is None else e.value * scale for e in estimates]
        low = [np.nan if e.low is None else max(0.0, e.low * scale) for e in estimates]
        high = [np.nan if e.high is None else min(AXIS_MAX, e.high * scale) for e in estimates]
        (line,) = ax.plot(steps, values, marker="o", label=label)
        ax.fill_between(steps, low, high, alpha=0.2, color=line.get_color())

    def seeds(ax: Any, pick: Callable[[Headline], Estimate]) -> None:
        if len(t.seeds) < 2:
            return
        for seed in t.seeds:
            xs = [p.step for p in t.points if seed in p.per_seed]
            ys = [
                np.nan if (v := pick(p.per_seed[seed]).value) is None else v
                for p in t.points
                if seed in p.per_seed
            ]
            ax.plot(xs, ys, lw=0.8, alpha=0.6, ls="--", label=f"seed {seed}")

    def finish(ax: Any, title: str, ylabel: str, fixed: bool = True) -> None:
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if fixed:
            ax.set_ylim(0.0, AXIS_MAX)
        for step in t.stopped.values():
            ax.axvline(step, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=6)

    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    for rule in RULES:
        band(
            axes[0],
            [p.metrics.misaligned[rule.name] for p in t.points],
            100,
            RULE_TITLES.get(rule.name, rule.name),
        )
    seeds(axes[0], lambda h: h.misaligned_pct)
    finish(axes[0], f"Misaligned answers ({conf})", "misaligned (%)")
    band(axes[1], [p.metrics.alignment for p in t.points], 1, "pooled")
    seeds(axes[1], lambda h: h.alignment)
    finish(axes[1], f"Average alignment ({conf})", "average alignment (0-100)")
    band(axes[2], [p.metrics.sr_rejection for p in t.points], 100, "pooled")
    seeds(axes[2], lambda h: h.sr_rejection_pct)
    finish(axes[2], f"StrongREJECT rejection ({conf})", "refused (%)")
    for curve in t.curves:
        xs, ys = zip(*curve.columns.get("loss", ((0, np.nan),)), strict=True)
        axes[3].plot(xs, ys, lw=1.0, label=f"seed {curve.seed}")
    finish(axes[3], "Training loss", "loss", fixed=False)
    for ax, column in zip(axes[4:], monitored, strict=True):
        for curve in t.curves:
            if column in curve.columns:
                xs, ys = zip(*curve.columns[column], strict=True)
                ax.plot(xs, ys, marker=".", lw=1.0, label=f"seed {curve.seed}")
        finish(ax, f"Monitor: {column.removeprefix('monitor/')}", column, fixed=False)
    fig.tight_layout()
    return fig


def chart_pngs(report: Report) -> dict[str, bytes]:
    """File name -> PNG bytes of `chart_figures`."""
    out = {}
    for name, fig in chart_figures(report).items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        out[name] = buffer.getvalue()
    return out


# ---------------------------------------------------------------------------------------------
# Files and W&B


def report_dict(report: Report) -> dict[str, Any]:
    return {"schema_version": REPORT_SCHEMA_VERSION, **dataclasses.asdict(report)}


def write_report(report: Report, out_dir: str | os.PathLike[str]) -> list[Path]:
    """report.md, metrics.json and the PNG charts, each written atomically."""
    out = Path(out_dir)
    charts = chart_pngs(report)
    written = []
    for name, png in charts.items():
        write_bytes_atomic(out / name, png)
        written.append(out / name)
    write_json_atomic(out / "metrics.json", report_dict(report))
    write_text_atomic(out / "report.md", render_markdown(report, list(charts)))
    return [out / "report.md", out / "metrics.json", *written]


def _sample_row(
    record: JudgedRecord, misaligned: Callable[[JudgedRecord], bool | None]
) -> list[Any]:
    g, sr = record.generation, record.strongreject

    def reason(name: str) -> str | None:
        score = record.scores.get(name)
        return score.missing_reason if score is not None else None

    return [
        record.key,
        model_label(g),
        g.suite,
        g.question_id,
        g.question,
        g.answer,
        record.value(ALIGNED),
        reason(ALIGNED),
        record.value(COHERENT),
        reason(COHERENT),
        misaligned(record),
        None if sr is None else sr.refused,
        None if sr is None else sr.score,
        None if sr is None else sr.missing_reason,
    ]


SAMPLE_COLUMNS = [
    "key",
    "model",
    "suite",
    "question_id",
    "question",
    "answer",
    "aligned",
    "aligned_missing",
    "coherent",
    "coherent_missing",
    "misaligned",
    "sr_refused",
    "sr_score",
    "sr_missing",
]


def log_report_to_wandb(
    report: Report,
    records: Sequence[JudgedRecord],
    *,
    project: str = "emmoe-dist",
    group: str | None = None,
    mode: WandbMode = "offline",
    name: str | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> Path | None:
    """One W&B run holding the summary table and every scored sample; returns its folder."""
    aligned, _ = split_suites(records, report.alignment_suites)
    in_suites = {id(r) for r in aligned}

    def misaligned(record: JudgedRecord) -> bool | None:
        return HEADLINE_RULE.judge_answer(record) if id(record) in in_suites else None

    tracker = WandbTracker(
        project=project,
        group=group,
        mode=mode,
        name=name,
        config={},
        folder=directory,
        job_type="report",
    )
    try:
        columns = [
            "model",
            "avg alignment",
            "SR rejection %",
            *(f"misaligned % ({r.name})" for r in RULES),
            "unscored %",
            "answers",
            "questions",
            "judge",
        ]
        rows = [
            [
                g.label,
                g.alignment.value,
                g.sr_rejection.scaled(100).value,
                *(g.misaligned[r.name].scaled(100).value for r in RULES),
                g.unscored.scaled(100).value,
                g.n_alignment,
                g.n_questions,
                report.judge,
            ]
            for g in report.groups
        ]
        tracker.table("report", columns, rows)
        tracker.table(
            "scored_samples", SAMPLE_COLUMNS, [_sample_row(r, misaligned) for r in records]
        )
        values: dict[str, Any] = {}
        for g in report.groups:
            h = headline(g)
            values[f"{g.label}/avg_alignment"] = h.alignment.value
            values[f"{g.label}/misaligned_pct"] = h.misaligned_pct.value
            values[f"{g.label}/sr_rejection_pct"] = h.sr_rejection_pct.value
        tracker.summary(values)
        folder = tracker.folder
    finally:
        tracker.finish()
    return folder
