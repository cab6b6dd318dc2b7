"""Experiment tracking: a small interface whose default is W&B in offline mode.

Records on disk are the source of truth (the trainer writes `metrics.jsonl` itself); a
tracker is a view. Only rank 0 tracks; other ranks get `NullTracker`, so call sites never
check ranks. Secrets never reach the tracker: configs are logged as given, and API keys live
only in the environment (the config holds the variable's name, not its value).

This is the only module that imports wandb.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from emmoe_dist.config import TrackingConfig

WandbMode = Literal["online", "offline", "disabled"]


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        step: int | None = None,
    ) -> None: ...
    def images(self, paths: Mapping[str, str]) -> None: ...
    def summary(self, values: Mapping[str, Any]) -> None: ...
    def finish(self) -> None: ...

    @property
    def folder(self) -> Path | None:
        """Where the run's files are (None when nothing is tracked)."""
        ...

    @property
    def starting_step(self) -> int:
        """The first step this process may log: what a resumed run already holds is below."""
        ...


class NullTracker:
    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        step: int | None = None,
    ) -> None:
        pass

    def images(self, paths: Mapping[str, str]) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass

    @property
    def folder(self) -> Path | None:
        return None

    @property
    def starting_step(self) -> int:
        return 0


class WandbTracker:
    """One W&B run. `run_id` names it: a retry or a resumed run writes the same run, not a
    second one. Offline, every start writes a new local log; whoever reuses an id logs the
    whole history again (the trainer replays `metrics.jsonl`, see `replay_history`), so the
    newest log of an id replaces its earlier ones, which are removed: `wandb sync` then uploads
    each step once. `teardown` stops W&B's service at `finish` instead of in the process's exit
    hooks (a Ray worker lives on after its trial)."""

    def __init__(
        self,
        *,
        project: str,
        group: str | None,
        mode: WandbMode,
        name: str | None,
        config: Mapping[str, Any],
        folder: str | os.PathLike[str] | None,
        job_type: str,
        run_id: str | None = None,
        teardown: bool = False,
    ) -> None:
        import wandb

        if folder is not None:
            os.makedirs(folder, exist_ok=True)
        self._teardown = teardown
        self.run = wandb.init(
            project=project,
            group=group,
            name=name,
            id=run_id,
            config=dict(config),
            dir=None if folder is None else str(folder),
            mode=mode,
            job_type=job_type,
            reinit="finish_previous",
            resume="allow" if run_id is not None else None,
        )
        if run_id is not None and mode == "offline":
            self._remove_superseded(run_id)

    def _remove_superseded(self, run_id: str) -> None:
        import shutil

        current = Path(self.run.dir).parent
        for earlier in current.parent.glob(f"offline-run-*-{run_id}"):
            if earlier != current:
                shutil.rmtree(earlier, ignore_errors=True)

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        step: int | None = None,
    ) -> None:
        """A table of rows; logged at the same `step` as `log`, it lands in the same row."""
        import wandb

        table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self.run.log({name: table}, step=step)

    def images(self, paths: Mapping[str, str]) -> None:
        import wandb

        self.run.log({name: wandb.Image(path) for name, path in paths.items()})

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def finish(self) -> None:
        self.run.finish()
        if self._teardown:
            import wandb

            wandb.teardown()

    @property
    def folder(self) -> Path | None:
        return Path(self.run.dir).parent

    @property
    def starting_step(self) -> int:
        return int(self.run.starting_step)


def replay_history(tracker: Tracker, rows: Iterable[Mapping[str, Any]], every: int) -> None:
    """Log a resumed run's earlier steps (its `metrics.jsonl` rows) again, as the trainer
    logged them: an offline resume starts a new local log that must hold the whole history;
    online, W&B already has the steps below `starting_step` and they are skipped."""
    for row in rows:
        step = int(row["step"])
        if step % every == 0 and step >= tracker.starting_step:
            tracker.log({k: v for k, v in row.items() if isinstance(v, float | int)}, step)


def make_tracker(
    cfg: TrackingConfig,
    *,
    is_main: bool,
    name: str,
    config: Mapping[str, Any],
    folder: str | os.PathLike[str] | None,
    job_type: str = "train",
    run_id: str | None = None,
    teardown: bool = False,
) -> Tracker:
    if not is_main or cfg.backend == "none":
        return NullTracker()
    return WandbTracker(
        project=cfg.project,
        group=cfg.group,
        mode=cfg.mode,
        name=name,
        config=config,
        folder=folder,
        job_type=job_type,
        run_id=run_id,
        teardown=teardown,
    )
