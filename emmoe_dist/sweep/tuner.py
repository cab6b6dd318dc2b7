"""The sweep driver: the Ray Tune run of every planned trial, started fresh or restored.

One Tune trial per planned trial (`param_space` is a grid over trial names). A trial holds
`trial.ranks` GPUs of one node and `trial.cpus` CPUs (on a CPU cluster, max(ranks, cpus)
CPUs), or, with `trial.launcher: ray_train`, CPUs only while its Ray Train workers take GPUs on
any nodes; `max_concurrent_trials` is the cluster's GPUs // ranks unless the sweep file says.
Failed trials retry from their last checkpoint (`FailureConfig(max_failures)`); a sweep folder
with Tune state is restored with `Tuner.restore(..., resume_errored=True)`, so finished trials
are never run again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.sweep.config import Sweep, TrialResources
from emmoe_dist.sweep.settings import TrialSettings
from emmoe_dist.sweep.space import SweepPlan

TUNE_DIR = "tune"


@dataclass(frozen=True)
class ClusterShape:
    gpus: float
    cpus: float
    most_gpus_on_a_node: float

    @property
    def device(self) -> Literal["cuda", "cpu"]:
        return "cuda" if self.gpus > 0 else "cpu"


def cluster_shape() -> ClusterShape:
    import ray

    total = ray.cluster_resources()
    per_node = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return ClusterShape(
        gpus=float(total.get("GPU", 0.0)),
        cpus=float(total.get("CPU", 0.0)),
        most_gpus_on_a_node=max(per_node, default=0.0),
    )


def trial_resources(res: TrialResources, shape: ClusterShape) -> dict[str, float]:
    """What one trial reserves: its ranks' GPUs (all on one node) and its CPUs. A Ray Train
    trial reserves CPUs only: its workers and its generation task ask for their own GPUs."""
    if res.launcher == "ray_train":
        return {"CPU": res.cpus}
    if shape.device == "cuda":
        return {"CPU": res.cpus, "GPU": float(res.ranks)}
    return {"CPU": float(max(res.cpus, res.ranks))}


def concurrency(res: TrialResources, shape: ClusterShape) -> int:
    """Trials at once: as many as the cluster's GPUs (or CPUs) hold, unless the file says."""
    if res.max_concurrent is not None:
        return res.max_concurrent
    if shape.device == "cuda":
        return max(1, math.floor(shape.gpus / res.ranks))
    per_trial = trial_resources(res, shape)["CPU"]
    if res.launcher == "ray_train":
        per_trial += res.ranks  # each Ray Train worker takes a CPU
    return max(1, math.floor(shape.cpus / per_trial))


def check_fits(sweep: Sweep, shape: ClusterShape) -> None:
    res = sweep.config.trial
    if (
        res.launcher == "deepspeed"
        and shape.device == "cuda"
        and res.ranks > shape.most_gpus_on_a_node
    ):
        raise InputError(
            f"a trial trains on {res.ranks} GPUs of one node; the largest node has "
            f"{shape.most_gpus_on_a_node:g} (trial.launcher: ray_train spans nodes)",
            file=sweep.file,
            field="trial.ranks",
        )


def make_settings(sweep: Sweep, plan: SweepPlan, shape: ClusterShape) -> TrialSettings:
    """Settings every trial shares; paths made absolute (trials run in Ray's folders)."""
    cfg = sweep.config
    data_dir = sweep.experiment.data_dir()
    if data_dir is None:
        raise EmmoeError(
            "no data directory: set data.dir (the sweep's patch) or EMMOE_DATA_DIR in the "
            "environment of the sweep's driver (`ray job submit --runtime-env-json "
            '\'{"env_vars": {"EMMOE_DATA_DIR": "/shared/data"}}\'`)'
        )
    return TrialSettings(
        sweep=cfg.name,
        family=plan.family,
        device=shape.device,
        ranks=cfg.trial.ranks,
        launcher=cfg.trial.launcher,
        max_failures=cfg.trial.max_failures,
        ds_config=str(Path(cfg.trial.ds_config).resolve()),
        ds_config_nf4=str(Path(cfg.trial.ds_config_nf4).resolve()),
        data_dir=str(data_dir.resolve()),
        alignment_suites=tuple(cfg.alignment_suites) if cfg.alignment_suites else None,
        tracking=cfg.tracking,
        group=cfg.group,
    )


def check_judge_keys(plan: SweepPlan) -> None:
    """Fail before any GPU hour is spent when a remote judge has no key in the environment
    (the driver's environment stands for the nodes': set keys there, never in a runtime env,
    which the dashboard shows)."""
    from emmoe_dist.judge.client import resolve_api_key

    for judge in {
        t.experiment.judge.model_dump_json(): t.experiment.judge for t in plan.trials
    }.values():
        resolve_api_key(judge)


def _trial_name(trial: Any) -> str:
    return str(trial.config["trial"])


@dataclass(frozen=True)
class SweepOutcome:
    finished: tuple[str, ...]
    failed: dict[str, str]  # trial -> error
    unfinished: tuple[str, ...]  # neither: the sweep was interrupted before they ended
    restored: bool
    path: Path

    @property
    def complete(self) -> bool:
        return not self.failed and not self.unfinished


def run_sweep(sweep: Sweep, plan: SweepPlan) -> SweepOutcome:
    """Run (or resume) every trial of `plan` on the connected Ray cluster."""
    from ray import tune

    from emmoe_dist.sweep.trial import run_trial

    shape = cluster_shape()
    check_fits(sweep, shape)
    settings = make_settings(sweep, plan, shape)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, settings=settings),
        trial_resources(sweep.config.trial, shape),
    )
    path = sweep.output_dir / TUNE_DIR
    restored = tune.Tuner.can_restore(str(path))
    if restored:
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.slug for t in plan.trials])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrency(sweep.config.trial, shape),
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(sweep.output_dir),
                failure_config=tune.FailureConfig(max_failures=sweep.config.trial.max_failures),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    finished, failed = [], {}
    for i in range(len(grid)):
        result = grid[i]
        slug = str((result.config or {})["trial"])
        if result.error is not None:
            failed[slug] = str(result.error).strip().splitlines()[-1]
        elif (result.metrics or {}).get("stage") == "evaluate":
            finished.append(slug)
    unfinished = tuple(
        t.slug for t in plan.trials if t.slug not in finished and t.slug not in failed
    )
    return SweepOutcome(tuple(finished), failed, unfinished, restored, path)
