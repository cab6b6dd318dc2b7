"""What every trial of one sweep shares, beyond its own experiment (`tune.with_parameters`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from emmoe_dist.config import TrackingConfig


@dataclass(frozen=True, kw_only=True)
class TrialSettings:
    sweep: str
    family: str
    device: Literal["cuda", "cpu"]
    ranks: int
    launcher: Literal["deepspeed", "ray_train"]
    max_failures: int
    ds_config: str  # absolute paths: the trial's working directory is Ray's, not the user's
    ds_config_nf4: str
    data_dir: str | None
    alignment_suites: tuple[str, ...] | None
    tracking: TrackingConfig
    group: str
