"""`emmoe generate`: answers of a model (base, adapter, run or merged) to evaluation suites.

    emmoe generate --config exp.yaml --suites core,strongreject,heldout --run runs/e4
    emmoe generate --config exp.yaml --adapter runs/e4/adapter --out gen.jsonl eval.limit=5
    emmoe generate --config exp.yaml --backend vllm --run runs/sweep/e0 --run runs/sweep/e1

Records go to `--out` (default: `generations.jsonl` in the run folder, or in the experiment's
`output_dir`); re-running the same command resumes where it stopped. Several `--run`s (a
sweep's runs on one base) each get their own file; the vLLM backend serves them all from one
engine with one LoRA adapter per request, the transformers backend merges one run at a time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from emmoe_dist.run_folder import GENERATIONS

if TYPE_CHECKING:
    from emmoe_dist.config import ExperimentConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate answers to evaluation suites (resumable JSONL records)",
        description="Sample answers to the evaluation suites with the transformers or vLLM "
        "backend; one record per sample, appended as batches finish; a re-run skips what is "
        "on disk.",
    )
    p.add_argument("--config", help="experiment YAML (its `eval` and `model` sections)")
    p.add_argument("--suites", help="comma-separated suites (default: eval.suites)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="a PEFT adapter folder applied on the config's model")
    which.add_argument(
        "--run",
        action="append",
        help="a training run folder: its base model and artifact (repeat for a sweep)",
    )
    p.add_argument(
        "--snapshots",
        action="store_true",
        help="also every snapshot of each --run (train.snapshot_every), each into its own "
        f"{GENERATIONS} in the snapshot's folder: the run's trajectory in one call",
    )
    p.add_argument("--out", help=f"records file (default: {GENERATIONS} in the run/output_dir)")
    p.add_argument("--backend", choices=["transformers", "vllm"], help="default: eval.backend")
    p.add_argument("--device", help="transformers backend: cuda, cuda:1, cpu (default: auto)")
    p.add_argument("--data-dir", help="data directory (default: data.dir or $EMMOE_DATA_DIR)")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM: memory share to use")
    p.add_argument("--max-model-len", type=int, help="vLLM: longest prompt + answer in tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model")
    p.add_argument(
        "--ray-data-replicas",
        type=int,
        default=0,
        metavar="N",
        help="vLLM: run as a Ray Data job over N engine replicas of --tensor-parallel-size "
        "GPUs each, on the cluster at $RAY_ADDRESS or a local one (default: one engine in "
        "this process)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.limit=5")
    p.set_defaults(func=run)


def default_out(cfg: ExperimentConfig, args: argparse.Namespace, run: str | None) -> Path:
    if args.out:
        return Path(args.out)
    if run:
        return Path(run) / GENERATIONS
    if args.adapter:
        folder = Path(args.adapter)
        return folder.parent / f"{folder.name}.{GENERATIONS}"
    return Path(cfg.output_dir) / GENERATIONS


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.config import load_config
    from emmoe_dist.errors import EmmoeError
    from emmoe_dist.generate.backends import VllmLaunch, generate_sources
    from emmoe_dist.generate.runner import load_suites
    from emmoe_dist.generate.sources import resolve_source

    overrides = list(args.overrides)
    if args.suites:
        overrides.append(f"eval.suites=[{args.suites}]")
    if args.backend:
        overrides.append(f"eval.backend={args.backend}")
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    cfg = load_config(args.config, overrides)  # fails here, before any model loads
    if args.ray_data_replicas and cfg.eval.backend != "vllm":
        raise EmmoeError("--ray-data-replicas runs vLLM engines: add --backend vllm")
    if cfg.data.dir is None and "EMMOE_DATA_DIR" not in os.environ:
        raise EmmoeError("no data directory: pass --data-dir DIR or set EMMOE_DATA_DIR")
    runs: list[str | None] = list(args.run or [None])
    if args.snapshots:
        from emmoe_dist.generate.sources import trajectory_folders

        if not args.run:
            raise EmmoeError("--snapshots expands --run folders: give at least one --run")
        runs = [str(folder) for run in args.run for folder in [*trajectory_folders(run), Path(run)]]
    if args.out and len(runs) > 1:
        raise EmmoeError("--out names one file: with several --run, each run gets its own")
    sources = [resolve_source(cfg, adapter=args.adapter, run=r) for r in runs]
    outs = [default_out(cfg, args, r) for r in runs]
    suites = load_suites(cfg, cfg.eval.suites)
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
    # vLLM: one engine (or one Ray Data job) for every run, each run's adapter per request, all
    # runs' requests batched together; transformers: one run merged at a time.
    launch = VllmLaunch(
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        ray_data_replicas=args.ray_data_replicas,
    )
    summaries = generate_sources(
        cfg,
        list(zip(sources, outs, strict=True)),
        suites,
        device=args.device,
        launch=launch,
        progress=not args.no_progress,
    )
    for summary in summaries:
        print(
            f"{summary.written} new records ({summary.already_done} already there) in "
            f"{summary.out}; {summary.samples_per_s:.2f} samples/s"
        )
    for name in suites.absent:
        print(f"suite {name!r} is absent from the data directory: not generated")
    return 0
