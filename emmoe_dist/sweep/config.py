"""The sweep file: which model and datasets, which expert selections, ranks, learning rates
and bit widths, and what one trial may use. Validated before Ray or any model starts.

Layer 3 (reads the experiment file through `emmoe_dist.config`). A sweep starts from one
experiment file; `patch:` changes it for every trial and each arm's own `patch:` for that
arm's trials. Every error names the file, the line and the dotted field, in the sweep file or
in the experiment file, whichever holds the bad value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from emmoe_dist.config import (
    ExperimentConfig,
    Optimizer,
    TrackingConfig,
    apply_override,
    read_yaml_mapping,
)
from emmoe_dist.errors import InputError, Where

SCHEMA_VERSION = 1
Bits = Literal["none", "nf4"]
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _exists(value: str, what: str) -> str:
    if not Path(value).expanduser().is_file():
        raise ValueError(f"{what} {value!r} does not exist")
    return value


class _Arm(_Section):
    """One family of trials; the axes it leaves unset take the sweep's values."""

    rank: list[Annotated[int, Field(gt=0)]] | None = Field(None, min_length=1)
    lr: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1)
    quantize: list[Bits] | None = Field(None, min_length=1)
    optimizer: list[Optimizer] | None = Field(None, min_length=1)
    # the router-training arm (adapter.train_router) as an axis: [false, true] runs both
    train_router: list[bool] | None = Field(None, min_length=1)
    # nested values for this arm's trials' experiment, e.g. {adapter: {targets: experts}}
    patch: dict[str, Any] = Field(default_factory=dict)


class SingleArm(_Arm):
    """The same expert in every MoE layer: the paper's E0..E7 arms."""

    selection: Literal["single"]
    experts: Literal["all"] | list[Annotated[int, Field(ge=0)]] = "all"


class WholeArm(_Arm):
    """Every expert (and attention, as the experiment's adapter targets say)."""

    selection: Literal["all"]


class TopKArm(_Arm):
    """Per layer, the k experts the routing profile saw chosen most."""

    selection: Literal["top_k"]
    k: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)


class EsftArm(_Arm):
    """ESFT's rule: per layer, the fewest experts whose routing share reaches p."""

    selection: Literal["esft"]
    p: list[Annotated[float, Field(gt=0, le=1)]] = Field(min_length=1)
    score: Literal["token", "gate"] = "token"


class FileArm(_Arm):
    """Selections written beforehand (`emmoe select`, or ESFT's JSON), one trial each."""

    selection: Literal["file"]
    files: list[str] = Field(min_length=1)

    @field_validator("files")
    @classmethod
    def _files_exist(cls, v: list[str]) -> list[str]:
        return [_exists(f, "selection file") for f in v]


Arm = Annotated[
    SingleArm | WholeArm | TopKArm | EsftArm | FileArm, Field(discriminator="selection")
]


class TrialResources(_Section):
    """What one trial holds while it runs, and how failures are retried."""

    ranks: int = Field(2, gt=0, description="GPUs per trial; CPU processes on a CPU cluster")
    cpus: float = Field(1.0, gt=0, description="CPUs reserved per trial")
    # deepspeed: the DeepSpeed launcher on the GPUs of one node that the trial holds;
    # ray_train: a Ray Train run of `ranks` workers on any nodes (trials larger than a node)
    launcher: Literal["deepspeed", "ray_train"] = "deepspeed"
    # None: the cluster's GPUs // ranks (on a CPU cluster, its CPUs // cpus)
    max_concurrent: int | None = Field(None, gt=0)
    max_failures: int = Field(2, ge=0, description="retries, each from the last checkpoint")
    ds_config: str = "ds_configs/zero3.json"
    ds_config_nf4: str = "ds_configs/zero2_qlora.json"  # QLoRA trains with ZeRO-2

    @field_validator("ds_config", "ds_config_nf4")
    @classmethod
    def _ds_exists(cls, v: str) -> str:
        return _exists(v, "DeepSpeed config")


class SweepConfig(_Section):
    schema_version: int = SCHEMA_VERSION
    name: str
    # on storage every node sees: trials, checkpoints, the judge cache and Tune's state
    output_dir: str
    experiment: str  # every trial starts from this experiment file
    patch: dict[str, Any] = Field(default_factory=dict)
    datasets: list[str] | None = Field(None, min_length=1)  # default: the experiment's data.train
    profiles: dict[str, str] = Field(default_factory=dict)  # dataset -> `emmoe profile` output
    search: list[Arm] = Field(min_length=1)
    rank: list[Annotated[int, Field(gt=0)]] | None = Field(None, min_length=1)
    lr: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1)
    quantize: list[Bits] | None = Field(None, min_length=1)
    optimizer: list[Optimizer] | None = Field(None, min_length=1)  # train.optimizer per trial
    # train.seed (data order, adapter init) per trial: an arm's seeds are pooled in the
    # summary, its intervals drawing seeds first, and their spread is shown
    seeds: list[int] | None = Field(None, min_length=1)
    train_router: list[bool] | None = Field(None, min_length=1)
    # adapter.alpha = alpha_over_rank * rank, so a rank sweep keeps the LoRA scale
    alpha_over_rank: float | None = Field(None, gt=0)
    baseline: bool = True  # also evaluate the base model, the row every trial is compared with
    alignment_suites: list[str] | None = Field(default_factory=lambda: ["core"])
    trial: TrialResources = Field(default_factory=TrialResources)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not supported (this version reads 1)")
        return v

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not v or set(v) - _NAME_CHARS:
            raise ValueError(f"{v!r}: use letters, digits, '.', '_' and '-' only")
        return v

    @field_validator("experiment")
    @classmethod
    def _experiment_exists(cls, v: str) -> str:
        return _exists(v, "experiment file")

    @field_validator("profiles")
    @classmethod
    def _profiles_exist(cls, v: dict[str, str]) -> dict[str, str]:
        return {k: _exists(p, "profile") for k, p in v.items()}

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("each seed once")
        return v

    @property
    def group(self) -> str:
        """The W&B group of every run of this sweep."""
        return self.tracking.group or self.name


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file and its experiment with the sweep-wide patch applied;
    `arm_experiments` holds each arm's (its own patch applied too), so every trial starts valid."""

    config: SweepConfig
    file: str
    experiment: ExperimentConfig
    arm_experiments: tuple[ExperimentConfig, ...]
    lines: Mapping[tuple[str | int, ...], int] = field(default_factory=dict)  # sweep file keys

    def where(self, path: tuple[str | int, ...]) -> Where:
        """The place of a sweep-file value (`("search", 0, "experts")`), for later errors."""
        return Where(
            file=self.file,
            line=_nearest_line(self.lines, path),
            field=".".join(str(p) for p in path),
        )

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir).expanduser().resolve()


def _merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _holds(patch: Mapping[str, Any], loc: Sequence[str | int]) -> bool:
    node: Any = patch
    for key in loc:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def _nearest_line(
    lines: Mapping[tuple[str | int, ...], int], path: tuple[str | int, ...]
) -> int | None:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


_ARM_TAGS = frozenset({"single", "all", "top_k", "esft", "file"})


def _error_loc(error: Mapping[str, Any]) -> tuple[str | int, ...]:
    """The dotted path of a pydantic error as the user wrote it: without validator names and
    without the arm's `selection` tag that pydantic inserts (`search.0.single.rank`)."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    if len(loc) > 2 and loc[0] == "search" and loc[2] in _ARM_TAGS:
        del loc[2]
    return tuple(loc)


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return str(error["msg"]).removeprefix("Value error, ")


def _sweep_error(
    err: ValidationError,
    file: str,
    lines: Mapping[tuple[str | int, ...], int],
    overridden: Sequence[tuple[str, ...]],
) -> InputError:
    first = err.errors()[0]
    loc = _error_loc(first)
    field = ".".join(map(str, loc)) or None
    more = len(err.errors()) - 1
    message = _message(first) + (f" (and {more} more errors)" if more else "")
    if any(loc[: len(o)] == o for o in overridden):
        return InputError(message, file="<command line override>", field=field)
    return InputError(message, file=file, line=_nearest_line(lines, loc), field=field)


def _experiment_error(
    err: ValidationError,
    patches: Sequence[tuple[tuple[str | int, ...], Mapping[str, Any]]],
    sweep_file: str,
    sweep_lines: Mapping[tuple[str | int, ...], int],
    overridden: Sequence[tuple[str, ...]],
    experiment_file: str,
    experiment_lines: Mapping[tuple[str | int, ...], int],
) -> InputError:
    """Name the value's own place: the patch that set it (sweep file or command line), else the
    experiment file. `patches` are (path of the patch in the sweep file, patch), most specific
    first."""
    first = err.errors()[0]
    loc, message = _error_loc(first), _message(first)
    for where, patch in patches:
        if _holds(patch, loc):
            path = (*where, *loc)
            field = ".".join(map(str, path))
            if any(path[: len(o)] == o for o in overridden):
                return InputError(message, file="<command line override>", field=field)
            return InputError(
                message, file=sweep_file, line=_nearest_line(sweep_lines, path), field=field
            )
    return InputError(
        message,
        file=experiment_file,
        line=_nearest_line(experiment_lines, loc),
        field=".".join(map(str, loc)),
    )


def load_sweep(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Sweep:
    """Read and validate a sweep file, its experiment file and every arm's patched experiment.

    `overrides` are dotted `key=value` items for the sweep file (`trial.ranks=4`,
    `patch.judge.base_url=http://...`)."""
    file = str(path)
    data, lines = read_yaml_mapping(path, "sweep file")
    overridden = [apply_override(data, o) for o in overrides]
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise _sweep_error(e, file, lines, overridden) from None

    exp_file = cfg.experiment
    exp_data, exp_lines = read_yaml_mapping(exp_file, "experiment file")

    def validate(
        patches: Sequence[tuple[tuple[str | int, ...], Mapping[str, Any]]],
    ) -> ExperimentConfig:
        merged: dict[str, Any] = dict(exp_data)
        for _, patch in reversed(patches):  # sweep-wide first, the arm's own last
            merged = _merge(merged, patch)
        try:
            return ExperimentConfig.model_validate(merged)
        except ValidationError as e:
            raise _experiment_error(
                e, patches, file, lines, overridden, exp_file, exp_lines
            ) from None

    sweep_patch: tuple[tuple[str | int, ...], Mapping[str, Any]] = (("patch",), cfg.patch)
    experiment = validate([sweep_patch])
    arms = tuple(
        validate([(("search", i, "patch"), arm.patch), sweep_patch])
        for i, arm in enumerate(cfg.search)
    )
    _check_datasets(cfg, experiment, file, lines)
    return Sweep(config=cfg, file=file, experiment=experiment, arm_experiments=arms, lines=lines)


def _check_datasets(
    cfg: SweepConfig,
    experiment: ExperimentConfig,
    file: str,
    lines: Mapping[tuple[str | int, ...], int],
) -> None:
    """Each dataset is a training set; each profiled rule has its dataset's profile."""
    from emmoe_dist.config import DataConfig

    for i, name in enumerate(cfg.datasets or [experiment.data.train]):
        try:
            DataConfig(train=name)
        except ValidationError as e:
            message = str(e.errors()[0]["msg"]).removeprefix("Value error, ")
            raise InputError(
                message, file=file, line=lines.get(("datasets", i)), field=f"datasets.{i}"
            ) from None
    profiled = [
        (i, arm.selection) for i, arm in enumerate(cfg.search) if isinstance(arm, TopKArm | EsftArm)
    ]
    for dataset in cfg.datasets or [experiment.data.train]:
        for i, rule in profiled:
            if dataset not in cfg.profiles:
                raise InputError(
                    f"rule {rule!r} needs a routing profile of dataset {dataset!r}: add "
                    f"`profiles: {{{dataset}: <file>}}` (written by `emmoe profile`)",
                    file=file,
                    line=lines.get(("search", i)),
                    field=f"search.{i}.selection",
                )
