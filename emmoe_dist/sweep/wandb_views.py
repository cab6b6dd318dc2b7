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

from emmoe_dist.records import JudgedRecord, read_jsonl, write_json_atomic

if TYPE_CHECKING:
    from emmoe_dist.config import TrackingConfig
    from emmoe_dist.sweep.space import TrialSpec
    from emmoe_dist.sweep.summary import SweepSummary
    from emmoe_dist.sweep.trial import TrialSettings

MARKER = "wandb_run.json"
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")
SAMPLE_COLUMNS: list[str | int] = [
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
    import numpy as np

    from emmoe_dist.metrics import ALIGNED, COHERENT, HEADLINE_RULE

    rows = []
    for r in records:
        g, sr = r.generation, r.strongreject
        a, c = r.value(ALIGNED), r.value(COHERENT)
        misaligned = None
        if a is not None and c is not None:
            misaligned = bool(HEADLINE_RULE.misaligned(np.array([a]), np.array([c]))[0])
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
                a,
                c,
                misaligned,
                None if sr is None else sr.refused,
                None if sr is None else sr.score,
                "; ".join(reasons) or None,
            ]
        )
    return rows


def _training_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def log_trial(spec: TrialSpec, settings: TrialSettings, metrics: Mapping[str, Any]) -> Path | None:
    """The trial's W&B run: config, training curve, evaluation metrics, scored samples."""
    from emmoe_dist.sweep.trial import JUDGED, TRAIN_METRICS

    tracking = settings.tracking
    marker = spec.folder / MARKER
    if tracking.backend == "none" or marker.is_file():
        return None
    import wandb

    run = wandb.init(
        project=tracking.project,
        group=settings.group,
        name=spec.slug,
        id=run_id(spec.folder),
        job_type="trial",
        config={**spec.wandb_config(), "family": settings.family, "sweep": settings.sweep},
        dir=str(spec.folder),
        mode=tracking.mode,
        reinit="finish_previous",
    )
    try:
        last = 0
        for row in _training_rows(spec.folder / TRAIN_METRICS):
            last = int(row["step"])
            run.log({f"train/{k}": row[k] for k in TRAIN_KEYS if k in row}, step=last)
        values = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        records = read_jsonl(spec.folder / JUDGED, JudgedRecord)
        table = wandb.Table(columns=SAMPLE_COLUMNS, data=sample_rows(spec.slug, records))
        run.log({**values, "eval/samples": table}, step=last + 1)
        run.summary.update(values)
        folder = Path(run.dir).parent
    finally:
        run.finish()
        wandb.teardown()  # stop W&B's service now, not in the worker's exit hooks
    write_json_atomic(marker, {"id": run_id(spec.folder), "folder": str(folder)})
    return folder


def log_summary(
    summary: SweepSummary, tracking: TrackingConfig, group: str, out: Path
) -> Path | None:
    """The sweep's summary run: the paper's tables with their intervals, as W&B tables.
    Logged once per distinct summary (a marker holds the digest of what was logged)."""
    import wandb

    from emmoe_dist.sweep.summary import summary_dict, table1_rows, table3_rows

    digest = hashlib.sha256(json.dumps(summary_dict(summary), sort_keys=True).encode()).hexdigest()
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("digest") == digest:
        return None

    run = wandb.init(
        project=tracking.project,
        group=group,
        name=f"{summary.sweep}-summary",
        id=run_id(out),
        job_type="sweep-summary",
        config={"sweep": summary.sweep, "model": summary.model, "family": summary.family},
        dir=str(out),
        mode=tracking.mode,
        reinit="finish_previous",
    )
    try:
        header, rows = table1_rows(summary)
        logged: dict[str, Any] = {"summary/trials": wandb.Table(columns=[*header], data=rows)}
        pivot = table3_rows(summary)
        if pivot is not None:
            logged["summary/single_experts"] = wandb.Table(columns=[*pivot[0]], data=pivot[1])
        run.log(logged)
        run.summary.update(
            {"trials_finished": len(summary.rows), "trials_planned": summary.planned}
        )
        folder = Path(run.dir).parent
    finally:
        run.finish()
    write_json_atomic(marker, {"id": run_id(out), "folder": str(folder), "digest": digest})
    return folder
