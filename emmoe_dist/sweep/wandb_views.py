"""W&B views of a sweep: one run per trial and one summary run, all in the sweep's group.

Written from the records on disk once a trial has its metrics, so a retried trial still makes
one run: a marker file says the run was logged, and the run id is a digest of the trial's
folder (re-logging after a crash writes the same run). Offline by default; `wandb sync
<sweep>/trials/*/wandb/offline-run-*` uploads later.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist import run_folder as rf
from emmoe_dist.files import read_jsonl, write_json_atomic
from emmoe_dist.metrics import ALIGNED, COHERENT, HEADLINE_RULE
from emmoe_dist.records import JudgedRecord

if TYPE_CHECKING:
    from emmoe_dist.config import TrackingConfig
    from emmoe_dist.sweep.settings import TrialSettings
    from emmoe_dist.sweep.space import TrialSpec
    from emmoe_dist.sweep.summary import SweepSummary

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")
SAMPLE_COLUMNS = [
    "trial",
    "key",
    "suite",
    "question_id",
    "question",
    "answer",
    "aligned",
    "coherent",
    "misaligned",
    "sr_refused",
    "sr_score",
    "unscored",
]


def run_id(folder: Path) -> str:
    """A stable W&B id per trial folder: a retry, or a later `wandb sync`, names the same run."""
    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]


def sample_rows(slug: str, records: Sequence[JudgedRecord]) -> list[list[Any]]:
    """One row per judged answer; misaligned by the headline rule, None when unscored."""
    rows = []
    for r in records:
        g, sr = r.generation, r.strongreject
        reasons = [f"{n}: {s.missing_reason}" for n, s in r.scores.items() if s.missing_reason]
        if sr is not None and sr.missing_reason:
            reasons.append(f"strongreject: {sr.missing_reason}")
        rows.append(
            [
                slug,
                r.key,
                g.suite,
                g.question_id,
                g.question,
                g.answer,
                r.value(ALIGNED),
                r.value(COHERENT),
                HEADLINE_RULE.judge_answer(r),
                None if sr is None else sr.refused,
                None if sr is None else sr.score,
                "; ".join(reasons) or None,
            ]
        )
    return rows


def trajectory_rows(spec: TrialSpec, settings: TrialSettings) -> dict[int, dict[str, float]]:
    """Per step with judged answers (each snapshot, and the final adapter at the last step),
    the headline metrics under `trajectory/`: W&B draws them against the training step."""
    from emmoe_dist.metrics import RULES, Bootstrap, headline, summarize

    if spec.baseline or not rf.is_run(spec.folder):
        return {}
    manifest = rf.read_manifest(spec.folder)
    out: dict[int, dict[str, float]] = {}
    for point in manifest.trajectory():
        judged = spec.folder / point.folder / rf.JUDGED
        if not judged.is_file():
            continue
        records = read_jsonl(judged, JudgedRecord, tolerate_torn_tail=True)
        m = summarize(
            records,
            label=f"{spec.slug} step {point.step}",
            alignment_suites=settings.alignment_suites,
            bootstrap=Bootstrap(resamples=1),  # values only: the summary has the intervals
        )
        top = headline(m)
        values = {
            "trajectory/avg_alignment": top.alignment.value,
            "trajectory/misaligned_pct": top.misaligned_pct.value,
            "trajectory/sr_rejection_pct": top.sr_rejection_pct.value,
            "trajectory/answers": float(m.n_alignment),
            **{
                f"trajectory/misaligned_pct_{r.name}": m.misaligned[r.name].scaled(100).value
                for r in RULES
            },
        }
        out[point.step] = {k: v for k, v in values.items() if v is not None}
    return out


def log_trial(spec: TrialSpec, settings: TrialSettings, metrics: Mapping[str, Any]) -> Path | None:
    """The trial's W&B run: config, training curve, evaluation metrics, scored samples."""
    from emmoe_dist.tracking import make_tracker

    tracking = settings.tracking
    marker = spec.folder / rf.WANDB_MARKER
    if tracking.backend == "none" or marker.is_file():
        return None
    tracker = make_tracker(
        tracking.model_copy(update={"group": settings.group}),
        is_main=True,
        name=spec.slug,
        config={**spec.wandb_config(), "family": settings.family, "sweep": settings.sweep},
        folder=spec.folder,
        job_type="trial",
        run_id=run_id(spec.folder),
        teardown=True,  # stop W&B's service now, not in the Ray worker's exit hooks
    )
    try:
        last = 0
        trajectory = trajectory_rows(spec, settings)
        for row in rf.read_train_metrics(spec.folder):
            last = int(row["step"])
            values = {f"train/{k}": row[k] for k in TRAIN_KEYS if k in row}
            values.update({k: v for k, v in row.items() if k.startswith("monitor/")})
            values.update(trajectory.get(last, {}))  # this step's snapshot, judged
            tracker.log(values, last)
        values = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        records = read_jsonl(spec.folder / rf.JUDGED, JudgedRecord)
        # the same step: the evaluation metrics and their samples make one history row
        tracker.log(values, last + 1)
        tracker.table("eval/samples", SAMPLE_COLUMNS, sample_rows(spec.slug, records), last + 1)
        tracker.summary(values)
        folder = tracker.folder
    finally:
        tracker.finish()
    write_json_atomic(marker, {"id": run_id(spec.folder), "folder": str(folder)})
    return folder


def log_summary(
    summary: SweepSummary, tracking: TrackingConfig, group: str, out: Path
) -> Path | None:
    """The sweep's summary run: the paper's tables with their intervals, as W&B tables.
    Logged once per distinct summary (a marker holds the digest of what was logged)."""
    from emmoe_dist.sweep.summary import (
        summary_dict,
        table1_rows,
        table3_rows,
        trajectory_charts,
        trajectory_table,
    )
    from emmoe_dist.tracking import make_tracker

    digest = hashlib.sha256(json.dumps(summary_dict(summary), sort_keys=True).encode()).hexdigest()
    marker = out / rf.WANDB_MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("digest") == digest:
        return None

    tracker = make_tracker(
        tracking.model_copy(update={"group": group}),
        is_main=True,
        name=f"{summary.sweep}-summary",
        config={"sweep": summary.sweep, "model": summary.model, "family": summary.family},
        folder=out,
        job_type="sweep-summary",
        run_id=run_id(out),
    )
    try:
        header, rows = table1_rows(summary)
        tracker.table("summary/trials", [str(h) for h in header], rows, 0)
        pivot = table3_rows(summary)
        if pivot is not None:
            tracker.table("summary/single_experts", [str(h) for h in pivot[0]], pivot[1], 0)
        if summary.trajectories:
            columns, points = trajectory_table(summary)
            tracker.table("summary/trajectories", columns, points, 0)
            charts = {
                f"summary/{name.removesuffix('.png')}": str(out / name)
                for name in trajectory_charts(summary)
                if (out / name).is_file()
            }
            tracker.images(charts)
        tracker.summary({"trials_finished": len(summary.rows), "trials_planned": summary.planned})
        folder = tracker.folder
    finally:
        tracker.finish()
    write_json_atomic(marker, {"id": run_id(out), "folder": str(folder), "digest": digest})
    return folder
