"""The training monitor's reading, afterwards: the same probes (an experiment's
`train.monitor`) read from any model, a run, or one of its snapshots. The reading a run logged
at step N and the one read here from its snapshot N are the same function of the same weights
(tests/test_dynamics_distributed.py holds them to 1e-5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist.analyze.common import (
    ModelOptions,
    Say,
    free_memory,
    load_subject,
    quiet,
    write_json,
)
from emmoe_dist.errors import InputError

if TYPE_CHECKING:
    from emmoe_dist.config import ExperimentConfig

MONITOR_FILE = "monitor.json"


@dataclass(frozen=True, kw_only=True)
class MonitorOptions:
    model: str  # checkpoint folder, hub id, tiny:<family>, a run folder or a snapshot folder
    # the experiment file whose `train.monitor` section names the probes; None: the one the
    # run (of a run or snapshot folder) trained with
    experiment: str | None = None
    overrides: tuple[str, ...] = ()
    out: str | None = None  # folder for monitor.json; None: nothing written
    run: ModelOptions = field(default_factory=ModelOptions)


def _experiment(options: MonitorOptions) -> ExperimentConfig:
    from emmoe_dist import run_folder as rf
    from emmoe_dist.config import ExperimentConfig, load_config

    if options.experiment is not None:
        return load_config(options.experiment, options.overrides)
    found = rf.run_of(Path(options.model))
    if found is None or not rf.is_run(found[0]):
        raise InputError(
            "is not a finished run or one of its snapshots: name the experiment (--config)",
            file=options.model,
        )
    return ExperimentConfig.model_validate(rf.read_manifest(found[0]).config)


def run_monitor(options: MonitorOptions, say: Say = quiet) -> dict[str, Any]:
    """The monitor's metrics on `options.model` (the keys training writes to metrics.jsonl)."""
    from emmoe_dist.interp.monitor import reading_row, reading_sums
    from emmoe_dist.models.loading import load_tokenizer, model_config_dict
    from emmoe_dist.train.monitor import build_probes

    cfg = _experiment(options)
    if cfg.train.monitor is None:
        raise InputError(
            "has no train.monitor section: nothing to read",
            file=options.experiment or options.model,
        )
    subject = load_subject(options.model, options.run)
    family, hf_config = model_config_dict(subject.source.base)
    probes = build_probes(cfg, load_tokenizer(subject.source.base), hf_config)
    assert probes is not None
    try:
        loaded = subject.loaded
        sums = reading_sums(
            loaded.model,
            loaded.family,
            probes,
            batch_size=options.run.batch_size,
            pad_id=int(loaded.tokenizer.pad_token_id or 0),
        )
    finally:
        del subject
        free_memory()
    row = reading_row(sums, probes)
    result = {
        "model": options.model,
        "family": family.name,
        "experiment": options.experiment,
        "probes": len(probes.prompts),
        "references": len(probes.references),
        "layers": list(probes.layers),
        "reading": row,
    }
    if options.out is not None:
        write_json(Path(options.out) / MONITOR_FILE, result, say)
    return result
