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

if TYPE_CHECKING:
    from emmoe_dist.config import ExperimentConfig
    from emmoe_dist.generate.interface import Generator
    from emmoe_dist.generate.sources import ModelSource

RECORDS_FILE = "generations.jsonl"


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
    p.add_argument("--out", help=f"records file (default: {RECORDS_FILE} in the run/output_dir)")
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
        return Path(run) / RECORDS_FILE
    if args.adapter:
        folder = Path(args.adapter)
        return folder.parent / f"{folder.name}.{RECORDS_FILE}"
    return Path(cfg.output_dir) / RECORDS_FILE


def vllm_generator(
    cfg: ExperimentConfig, sources: list[ModelSource], args: argparse.Namespace, cache: Path
) -> Generator:
    """One engine on the shared base, with every source's adapter available per request."""
    from emmoe_dist.errors import EmmoeError
    from emmoe_dist.generate.vllm_backend import VllmEngineOptions, VllmGenerator

    bases = {s.base.name_or_path for s in sources}
    if len(bases) != 1:
        raise EmmoeError(
            f"the runs were trained on different bases ({sorted(bases)}): one per call"
        )
    if any(s.expert_delta is not None for s in sources):
        raise EmmoeError(
            "vLLM serves LoRA adapters, not expert deltas: merge the run "
            "(`emmoe merge RUN --out DIR`) and generate with model.name_or_path=DIR"
        )
    engine = VllmEngineOptions(
        dtype=cfg.model.dtype,
        seed=cfg.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    model = materialized_model(sources[0], cfg.seed, cache)
    adapters = [s.adapter for s in sources if s.adapter is not None]
    if args.ray_data_replicas:
        from emmoe_dist.generate.ray_data_backend import RayDataGenerator

        return RayDataGenerator(
            model, adapters=adapters, engine=engine, replicas=args.ray_data_replicas
        )
    return VllmGenerator(model, adapters=adapters, engine=engine)


def transformers_generator(
    cfg: ExperimentConfig, source: ModelSource, args: argparse.Namespace
) -> Generator:
    from emmoe_dist.generate.sources import load_for_generation
    from emmoe_dist.generate.transformers_backend import TransformersGenerator

    loaded = load_for_generation(source, seed=cfg.seed, device=args.device or _auto_device())
    return TransformersGenerator(loaded.model, loaded.tokenizer, batch_size=cfg.eval.batch_size)


def materialized_model(source: ModelSource, seed: int, cache: Path) -> str:
    """vLLM loads folders and hub ids: a `tiny:<family>` model is saved once beside the output."""
    from emmoe_dist.config import TINY_PREFIX

    name = source.base.name_or_path
    if not name.startswith(TINY_PREFIX):
        return name
    from emmoe_dist.models.tiny import save_tiny

    family = name.removeprefix(TINY_PREFIX)
    folder = cache / f".tiny-{family}-seed{seed}"
    if not (folder / "config.json").is_file():
        save_tiny(family, folder, seed=seed)
    return str(folder)


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.config import load_config
    from emmoe_dist.errors import EmmoeError
    from emmoe_dist.generate.runner import load_suites, run_generation, run_generation_many
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
    if args.out and len(runs) > 1:
        raise EmmoeError("--out names one file: with several --run, each run gets its own")
    sources = [resolve_source(cfg, adapter=args.adapter, run=r) for r in runs]
    outs = [default_out(cfg, args, r) for r in runs]
    suites = load_suites(cfg, cfg.eval.suites)
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.eval.backend == "vllm":
        # One engine (or one Ray Data job) for every run: each run's adapter per request, all
        # runs' requests batched together.
        shared = vllm_generator(cfg, sources, args, outs[0].parent)
        try:
            summaries = run_generation_many(
                cfg,
                shared,
                shared.tokenizer,
                list(zip(sources, outs, strict=True)),
                suites,
                progress=not args.no_progress,
            )
        finally:
            shared.close()
    else:
        summaries = []
        for source, out in zip(sources, outs, strict=True):
            generator = transformers_generator(cfg, source, args)
            try:
                summaries.append(
                    run_generation(
                        cfg,
                        generator,
                        generator.tokenizer,
                        source,
                        suites,
                        out,
                        progress=not args.no_progress,
                    )
                )
            finally:
                generator.close()
    for summary in summaries:
        print(
            f"{summary.written} new records ({summary.already_done} already there) in "
            f"{summary.out}; {summary.samples_per_s:.2f} samples/s"
        )
    for name in suites.absent:
        print(f"suite {name!r} is absent from the data directory: not generated")
    return 0
