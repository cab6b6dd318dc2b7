"""When misalignment emerges: an arm's metrics at each step of training.

Layer 0: Python + numpy. A training run with `train.snapshot_every` keeps its adapter at those
steps (`run_folder.snapshot_folder`); generation and judging of each snapshot give judged
answers whose adapter names the snapshot. Here those answers become points: per arm (training
runs that differ only in their seed) and per step, the paper's metrics with intervals clustered
by question (seeds first where the arm has several), each seed's own headline, and the training
loss and monitor readings of that step. Step 0 is the base model where its answers are among the
records: every adapter starts as the identity (LoRA's B factor and expert deltas start at zero).
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emmoe_dist import run_folder as rf
from emmoe_dist.errors import EmmoeError
from emmoe_dist.metrics import (
    DEFAULT_BOOTSTRAP,
    Bootstrap,
    GroupMetrics,
    Headline,
    headline,
    summarize,
)
from emmoe_dist.records import JudgedRecord

# Config keys that make one training run another seed of the same arm, not another arm.
NOT_THE_ARM = ("seed", "name", "output_dir", "tracking")
# metrics.jsonl columns drawn beside the trajectory
LOSS = "loss"
MONITOR_COLUMNS = ("monitor/projection", "monitor/logprob_gap")
_SEED_SUFFIX = re.compile(r"-s\d+$")


def run_seed(config: Mapping[str, Any]) -> int:
    """The seed that sets a run's data order and adapter init (`train.seed`, else `seed`)."""
    train = config.get("train")
    seed = train.get("seed") if isinstance(train, Mapping) else None
    return int(config.get("seed", 0) if seed is None else seed)


def arm_key(config: Mapping[str, Any]) -> str:
    """What runs of one arm share: the experiment without its seeds, names and folders."""
    arm: dict[str, Any] = {k: v for k, v in config.items() if k not in NOT_THE_ARM}
    if isinstance(arm.get("train"), Mapping):
        arm["train"] = {k: v for k, v in arm["train"].items() if k != "seed"}
    return json.dumps(arm, sort_keys=True)


@dataclass(frozen=True)
class Where:
    """The training run and step an answer's adapter comes from."""

    run: Path
    step: int
    snapshot: bool  # from a snapshot folder, not the run's final artifact


def adapter_origin(adapter: str) -> Where | None:
    """Where an adapter folder's weights come from: a snapshot or a run's final artifact (None
    for an adapter outside any run folder)."""
    found = rf.run_of(Path(adapter))
    if found is None:
        return None
    run, step = found
    if step is not None:
        return Where(run.resolve(), step, True)
    steps = rf.read_manifest(run).steps if rf.is_run(run) else None
    return None if steps is None else Where(run.resolve(), steps, False)


def origins(records: Sequence[JudgedRecord]) -> dict[str, Where | None]:
    """`adapter_origin` of every adapter among the answers, each folder read once."""
    adapters = {r.generation.adapter for r in records if r.generation.adapter is not None}
    return {a: adapter_origin(a) for a in sorted(adapters)}


def snapshot_adapters(records: Sequence[JudgedRecord]) -> set[str]:
    """The adapters among the answers that are snapshots: trajectory points, not models."""
    return {a for a, o in origins(records).items() if o is not None and o.snapshot}


@dataclass(frozen=True)
class SeedCurve:
    """One seed's metrics.jsonl columns over its steps: the loss and the monitor readings."""

    seed: int
    run: str
    columns: Mapping[str, tuple[tuple[int, float], ...]]  # column -> ((step, value), ...)


@dataclass(frozen=True)
class TrajectoryPoint:
    step: int
    metrics: GroupMetrics  # intervals clustered by seed (when several), question, answer
    per_seed: Mapping[int, Headline]
    loss: float | None  # mean over the seeds of the step's training loss (None at step 0)


@dataclass(frozen=True)
class Trajectory:
    """One arm over training."""

    label: str
    runs: tuple[str, ...]
    seeds: tuple[int, ...]
    points: tuple[TrajectoryPoint, ...]
    curves: tuple[SeedCurve, ...]
    stopped: Mapping[int, int]  # seed -> step, for runs that train.stop_when ended early

    def seed_spread(self, step: int) -> dict[str, tuple[float, float] | None]:
        """(lowest, highest) of each headline number over the seeds at `step`."""
        point = next(p for p in self.points if p.step == step)
        out: dict[str, tuple[float, float] | None] = {}
        for name, pick in (
            ("avg alignment", lambda h: h.alignment.value),
            ("SR rejection %", lambda h: h.sr_rejection_pct.value),
            ("misaligned %", lambda h: h.misaligned_pct.value),
        ):
            values = [v for h in point.per_seed.values() if (v := pick(h)) is not None]
            out[name] = (min(values), max(values)) if values else None
        return out


def _curve(run: Path, seed: int) -> SeedCurve:
    rows = rf.read_train_metrics(run)
    columns: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name in (LOSS, *MONITOR_COLUMNS):
            value = row.get(name)
            if isinstance(value, int | float):
                columns.setdefault(name, []).append((int(row["step"]), float(value)))
    return SeedCurve(seed, str(run), {k: tuple(v) for k, v in columns.items()})


def _arm_label(runs: Sequence[Path], seeds: Sequence[int]) -> str:
    name = runs[0].name
    if len(seeds) < 2:
        return name
    return f"{_SEED_SUFFIX.sub('', name)} (seeds {', '.join(map(str, seeds))})"


def build_trajectories(
    records: Sequence[JudgedRecord],
    *,
    alignment_suites: Sequence[str] | None = None,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> tuple[Trajectory, ...]:
    """Per arm with at least one snapshot among the answers, its points in step order."""
    by_run: dict[Path, dict[int, list[JudgedRecord]]] = {}
    base: dict[str, list[JudgedRecord]] = {}  # base answers by model label: step 0
    where = origins(records)
    for r in records:
        adapter = r.generation.adapter
        if adapter is None:
            base.setdefault(r.generation.model, []).append(r)
            continue
        origin = where[adapter]
        if origin is not None:
            by_run.setdefault(origin.run, {}).setdefault(origin.step, []).append(r)
    manifests = {}
    for run in by_run:
        try:
            manifests[run] = rf.read_manifest(run)
        except EmmoeError:
            continue  # a snapshot of a run still training: no trajectory yet
    arms: dict[str, list[Path]] = {}
    for run, manifest in manifests.items():
        arms.setdefault(arm_key(manifest.config), []).append(run)
    out = []
    for runs in arms.values():
        if not any(step < (manifests[r].steps or 0) for r in runs for step in by_run[r]):
            continue  # only final artifacts: no snapshot was judged
        runs.sort(key=lambda r: (run_seed(manifests[r].config), str(r)))
        seed_of = {r: run_seed(manifests[r].config) for r in runs}
        seeds = tuple(sorted(set(seed_of.values())))
        label = _arm_label(runs, seeds)
        steps: dict[int, list[tuple[int | None, JudgedRecord]]] = {}
        for run in runs:
            for step, answers in by_run[run].items():
                steps.setdefault(step, []).extend((seed_of[run], a) for a in answers)
        model = manifests[runs[0]].model_name
        if model is not None and model in base:
            # every seed starts from the one base: its answers, once, are step 0 (seed None)
            steps[0] = [(None, a) for a in base[model]]
        curves = tuple(_curve(run, seed_of[run]) for run in runs)
        losses = {c.seed: dict(c.columns.get(LOSS, ())) for c in curves}
        points = []
        for step in sorted(steps):
            tagged = steps[step]
            unit_of = {id(a): seed for seed, a in tagged}
            answers = [a for _, a in tagged]
            several = len({seed for seed, _ in tagged if seed is not None}) > 1

            def unit(record: JudgedRecord, unit_of: dict[int, int | None] = unit_of) -> Hashable:
                return unit_of[id(record)]

            metrics = summarize(
                answers,
                label=f"{label} step {step}",
                alignment_suites=alignment_suites,
                bootstrap=bootstrap,
                unit=unit if several else None,
            )
            own = {s for s, _ in tagged if s is not None}
            per_seed = {
                seed: headline(
                    summarize(
                        [a for s, a in tagged if s in (seed, None)],
                        label=f"{label} step {step} seed {seed}",
                        alignment_suites=alignment_suites,
                        bootstrap=Bootstrap(resamples=1, seed=bootstrap.seed),
                    )
                )
                for seed in sorted(own or set(seeds))  # the base: every seed's step 0
            }
            step_losses = [losses[s][step] for s in per_seed if step in losses.get(s, {})]
            loss = float(np.mean(step_losses)) if step_losses else None
            points.append(TrajectoryPoint(step, metrics, per_seed, loss))
        stopped = {
            seed_of[r]: manifests[r].stopped.step  # type: ignore[union-attr]
            for r in runs
            if manifests[r].stopped is not None
        }
        out.append(
            Trajectory(
                label=label,
                runs=tuple(str(r) for r in runs),
                seeds=seeds,
                points=tuple(points),
                curves=curves,
                stopped=stopped,
            )
        )
    return tuple(sorted(out, key=lambda t: t.label))
