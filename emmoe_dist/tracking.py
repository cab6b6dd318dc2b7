"""Experiment tracking: a small interface whose default is W&B in offline mode.

Records on disk are the source of truth (the trainer writes `metrics.jsonl` itself); a
tracker is a view. Only rank 0 tracks; other ranks get `NullTracker`, so call sites never
check ranks. Secrets never reach the tracker: configs are logged as given, and API keys live
only in the environment (the config holds the variable's name, not its value).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from emmoe_dist.config import TrackingConfig


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...
    def images(self, paths: Mapping[str, str]) -> None: ...
    def summary(self, values: Mapping[str, Any]) -> None: ...
    def finish(self) -> None: ...


class NullTracker:
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def images(self, paths: Mapping[str, str]) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        name: str,
        config: Mapping[str, Any],
        folder: str,
        job_type: str,
    ) -> None:
        import wandb

        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            group=cfg.group,
            name=name,
            config=dict(config),
            dir=folder,
            mode=cfg.mode,
            job_type=job_type,
            reinit="finish_previous",
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def images(self, paths: Mapping[str, str]) -> None:
        import wandb

        self.run.log({name: wandb.Image(path) for name, path in paths.items()})

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def finish(self) -> None:
        self.run.finish()


def make_tracker(
    cfg: TrackingConfig,
    *,
    is_main: bool,
    name: str,
    config: Mapping[str, Any],
    folder: str,
    job_type: str = "train",
) -> Tracker:
    if not is_main or cfg.backend == "none":
        return NullTracker()
    return WandbTracker(cfg, name=name, config=config, folder=folder, job_type=job_type)
