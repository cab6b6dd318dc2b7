"""The search space: every trial of a sweep, built from the model's shape and routing profiles.

Each trial is a complete experiment (written to `plan.json`, one folder per trial under
`trials/`), so what a trial ran can be read without Ray. Selections that depend on a profile
(top-k, ESFT) are computed here, once, and saved as selection files the trials train with.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from emmoe_dist import run_folder as rf
from emmoe_dist.config import ExperimentConfig
from emmoe_dist.errors import InputError, Where
from emmoe_dist.experts import ExpertProfile, ExpertSelection, select_experts
from emmoe_dist.families import MoEFamily, num_experts
from emmoe_dist.files import write_text_atomic
from emmoe_dist.sweep.config import (
    Bits,
    EsftArm,
    FileArm,
    SingleArm,
    Sweep,
    TopKArm,
    WholeArm,
)

PLAN = "plan.json"
TRIALS_DIR = "trials"
SELECTIONS_DIR = "selections"
BASELINE = "base"


class TrialSpec(BaseModel):
    """One trial: its axes (for tables and dashboards) and the experiment it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str  # folder and Tune trial name, e.g. insecure-E4-r8-lr0.0001
    dataset: str
    selection: str  # base, all, E4, top2, esft-token-p0.3, or a selection file's name
    rank: int | None  # None for the baseline (nothing trains)
    lr: float | None
    quantize: Bits
    train_router: bool = False  # the router-training arm (adapter.train_router)
    baseline: bool = False
    experts: dict[int, list[int]] | None = None  # per MoE layer; None: every expert
    optimizer: str | None = None  # train.optimizer, when the sweep varies it
    seed: int | None = None  # train.seed, when the sweep runs several
    experiment: ExperimentConfig

    @property
    def arm(self) -> str:
        """The trial's arm: its slug without the seed (seeds of one arm are pooled)."""
        return self.slug if self.seed is None else self.slug.removesuffix(f"-s{self.seed}")

    @property
    def folder(self) -> Path:
        return Path(self.experiment.output_dir)

    def wandb_config(self) -> dict[str, Any]:
        """What a dashboard groups and filters trials by."""
        return {
            "trial": self.slug,
            "dataset": self.dataset,
            "selection": self.selection,
            "experts": "none"
            if self.baseline
            else {str(k): v for k, v in (self.experts or {}).items()} or "all",
            "rank": self.rank,
            "lr": self.lr,
            "quantize": self.quantize,
            "train_router": self.train_router,
            "baseline": self.baseline,
            "model": self.experiment.model.name_or_path,
            "adapter_targets": self.experiment.adapter.targets,
            "seed": self.experiment.seed,
            "train_seed": self.experiment.train_seed,
            "optimizer": self.experiment.train.optimizer,
            "arm": self.arm,
        }


def answer_folders(spec: TrialSpec) -> list[Path]:
    """Where a trial's answers are: its folder, then each of its snapshots'."""
    if spec.baseline or not rf.is_run(spec.folder):
        return [spec.folder]
    return [spec.folder, *(spec.folder / s.folder for s in rf.read_manifest(spec.folder).snapshots)]


class SweepPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 1
    sweep: str
    family: str
    trials: tuple[TrialSpec, ...]

    def trial(self, slug: str) -> TrialSpec:
        for t in self.trials:
            if t.slug == slug:
                return t
        raise KeyError(slug)


def _absolute(value: str | None) -> str | None:
    if value is None or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def _absolute_paths(data: dict[str, Any]) -> None:
    """Relative paths made absolute, in place: trials run in Ray's folders, not the caller's."""
    data["data"]["dir"] = _absolute(data["data"]["dir"])
    data["data"]["train"] = _absolute(data["data"]["train"])  # a dataset name stays a name
    data["model"]["name_or_path"] = _absolute(data["model"]["name_or_path"])  # hub ids stay
    for key in ("profile", "file"):
        data["selection"][key] = _absolute(data["selection"].get(key))
    data["eval"]["suites"] = [_absolute(s) for s in data["eval"]["suites"]]
    for judge in [data["judge"], *data["more_judges"]]:
        judge["cache_dir"] = str(Path(judge["cache_dir"]).expanduser().resolve())
    monitor = data["train"].get("monitor")
    if monitor is not None:
        for key in ("directions", "records"):
            monitor[key] = _absolute(monitor.get(key))


def _axis(values: list[Any] | None, default: list[Any] | None, fallback: Any) -> list[Any]:
    return values or default or [fallback]


def _selections(
    arm: SingleArm | WholeArm | TopKArm | EsftArm | FileArm,
    profile: ExpertProfile | None,
    family: MoEFamily,
    hf_config: Mapping[str, Any],
    where: Callable[[str], Where],
) -> Iterator[tuple[str, ExpertSelection | None, dict[str, Any]]]:
    """(label, selection or None for the whole model, experiment `selection:` section);
    `where(field)` is the arm's field in the sweep file, which selection errors name."""
    if isinstance(arm, WholeArm):
        yield "all", None, {"rule": "all"}
    elif isinstance(arm, SingleArm):
        ids = range(num_experts(family, hf_config)) if arm.experts == "all" else arm.experts
        for e in ids:
            sel = select_experts(
                "single",
                model=(family, hf_config),
                expert=e,
                where=lambda _: where("experts"),
            )
            yield f"E{e}", sel, {"rule": "single", "expert": e}
    elif isinstance(arm, TopKArm):
        for k in arm.k:
            yield f"top{k}", select_experts("top_k", profile=profile, k=k, where=where), {}
    elif isinstance(arm, EsftArm):
        for p in arm.p:
            sel = select_experts("esft", profile=profile, score=arm.score, p=p, where=where)
            yield f"esft-{arm.score}-p{p:g}", sel, {}
    else:
        for f in arm.files:
            yield Path(f).stem, select_experts("file", file=f, where=where), {}


def _load_profile(path: str, family: MoEFamily, hf_config: Mapping[str, Any]) -> ExpertProfile:
    profile = ExpertProfile.load(path)
    if profile.family != family.name:
        raise InputError(
            f"the profile is of a {profile.family} model; the sweep trains {family.name}",
            file=path,
            field="family",
        )
    n = num_experts(family, hf_config)
    if profile.num_experts != n:
        raise InputError(
            f"the profile counts {profile.num_experts} experts; the model has {n}",
            file=path,
            field="num_experts",
        )
    return profile


def build_plan(sweep: Sweep) -> SweepPlan:
    """Every trial of the sweep; profile-based selections are written under `selections/`."""
    from emmoe_dist.models.loading import model_config_dict

    cfg, out = sweep.config, sweep.output_dir
    family, hf_config = model_config_dict(sweep.experiment.model)
    datasets = cfg.datasets or [sweep.experiment.data.train]
    profiles = {d: _load_profile(p, family, hf_config) for d, p in cfg.profiles.items()}
    trials: list[TrialSpec] = []

    def experiment(
        base: ExperimentConfig, slug: str, values: Mapping[str, Any]
    ) -> ExperimentConfig:
        data = base.model_dump(mode="json")
        for dotted, value in values.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        data["name"] = f"{cfg.name}/{slug}"
        data["output_dir"] = str(out / TRIALS_DIR / slug)
        data["tracking"] = {**data["tracking"], "backend": "none"}  # the trial logs W&B itself
        # one reply cache for every trial, unless the sweep's patch names another; one per
        # further judge (the cache key is the request, which does not name the endpoint)
        data["judge"]["cache_dir"] = data["judge"]["cache_dir"] or str(out / rf.JUDGE_CACHE_DIR)
        for judge in data["more_judges"]:
            default = out / f"{rf.JUDGE_CACHE_DIR}-{judge['name']}"
            judge["cache_dir"] = judge["cache_dir"] or str(default)
        _absolute_paths(data)
        try:
            return ExperimentConfig.model_validate(data)
        except ValidationError as e:  # an axis value the arm's experiment cannot take
            first = e.errors()[0]
            dotted = ".".join(map(str, first["loc"]))
            raise InputError(
                f"trial {slug}: {dotted}: {first['msg'].removeprefix('Value error, ')}",
                file=sweep.file,
                field="search",
            ) from None

    if cfg.baseline:
        base = sweep.experiment
        trials.append(
            TrialSpec(
                slug=BASELINE,
                dataset=datasets[0],
                selection=BASELINE,
                rank=None,
                lr=None,
                quantize="none",
                baseline=True,
                experiment=experiment(base, BASELINE, {"data.train": datasets[0]}),
            )
        )
    for i, arm in enumerate(cfg.search):
        arm_base = sweep.arm_experiments[i]
        ranks = _axis(arm.rank, cfg.rank, arm_base.adapter.rank)
        lrs = _axis(arm.lr, cfg.lr, arm_base.train.lr)
        bits = _axis(arm.quantize, cfg.quantize, arm_base.adapter.quantize)
        chosen = arm.optimizer or cfg.optimizer
        optimizers: list[str | None] = list(chosen) if chosen else [None]
        seeds: list[int | None] = list(cfg.seeds) if cfg.seeds else [None]
        routers = _axis(arm.train_router, cfg.train_router, arm_base.adapter.train_router)
        for dataset in datasets:
            profile = profiles.get(dataset)

            def where(name: str, i: int = i, dataset: str = dataset) -> Where:
                key = name.split(".")[0]
                if key == "profile":
                    return sweep.where(("profiles", dataset))
                return sweep.where(("search", i, "files" if key == "file" else key))

            for label, selection, section in _selections(arm, profile, family, hf_config, where):
                values: dict[str, Any] = {"data.train": dataset}
                if selection is not None and not section:  # profile- or file-based: save it
                    # named by content, so a changed profile never rewrites a running
                    # sweep's selection (the changed plan is refused by save_plan instead)
                    digest = hashlib.sha256(selection.to_json().encode()).hexdigest()[:8]
                    file = out / SELECTIONS_DIR / f"{dataset}-{label}-{digest}.json"
                    selection.validate(family, hf_config, file=str(file))
                    if not file.is_file():
                        selection.save(file)
                    section = {"rule": "file", "file": str(file)}
                values["selection"] = section
                combos = itertools.product(ranks, lrs, bits, routers, optimizers, seeds)
                for rank, lr, q, router, opt, seed in combos:
                    slug = f"{dataset}-{label}-r{rank}-lr{lr:g}"
                    slug += "-nf4" if q == "nf4" else ""
                    slug += "-router" if router else ""
                    # an arm may patch in QAT or the MXFP4 export: such trials get own folders
                    slug += "-qat" if arm_base.train.qat == "mxfp4" else ""
                    slug += "-mxfp4" if arm_base.eval.weights == "mxfp4" else ""
                    slug += f"-{opt}" if opt is not None else ""
                    slug += f"-s{seed}" if seed is not None else ""
                    trial_values = {
                        **values,
                        "adapter.rank": rank,
                        "adapter.quantize": q,
                        "adapter.train_router": router,
                        "train.lr": lr,
                    }
                    if opt is not None:
                        trial_values["train.optimizer"] = opt
                    if seed is not None:
                        trial_values["train.seed"] = seed
                    if cfg.alpha_over_rank is not None:
                        trial_values["adapter.alpha"] = cfg.alpha_over_rank * rank
                    trials.append(
                        TrialSpec(
                            slug=slug,
                            dataset=dataset,
                            selection=label,
                            rank=rank,
                            lr=lr,
                            quantize=q,
                            train_router=router,
                            experts=None
                            if selection is None
                            else {k: list(v) for k, v in selection.experts.items()},
                            optimizer=opt,
                            seed=seed,
                            experiment=experiment(arm_base, slug, trial_values),
                        )
                    )
    seen: dict[str, int] = {}
    for t in trials:
        seen[t.slug] = seen.get(t.slug, 0) + 1
    twice = sorted(s for s, n in seen.items() if n > 1)
    if twice:
        raise InputError(
            f"two trials would share the folder {twice[0]!r}: give selection files distinct "
            "names, or list each value once",
            file=sweep.file,
            field="search",
        )
    return SweepPlan(sweep=cfg.name, family=family.name, trials=tuple(trials))


def save_plan(plan: SweepPlan, out: Path) -> Path:
    """Write `plan.json`; a sweep folder keeps one plan, so resuming never mixes two sweeps."""
    path = out / PLAN
    text = json.dumps(plan.model_dump(mode="json"), indent=1) + "\n"
    if path.is_file():
        old = SweepPlan.model_validate_json(path.read_text(encoding="utf-8"))
        if old != plan:
            changed = sorted(
                {t.slug for t in old.trials} ^ {t.slug for t in plan.trials}
            ) or sorted(t.slug for t in plan.trials if t not in old.trials)
            raise InputError(
                f"this folder holds a sweep planned differently (trials differ: "
                f"{', '.join(changed[:5])}); resume it with its own file and values, or give "
                "the new sweep another output_dir",
                file=str(path),
                field="trials",
            )
        return path
    write_text_atomic(path, text)
    return path
