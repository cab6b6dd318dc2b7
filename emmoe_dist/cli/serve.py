"""`emmoe serve`: an OpenAI-compatible endpoint on Ray Serve for generation or a self-hosted judge.

    emmoe serve --config exp.yaml --run runs/e0 --run runs/e4 --replicas 2 --gpus-per-replica 1
    emmoe serve --config exp.yaml --model merged-e4=runs/e4/merged      # vLLM on CPU: merged only

The config's model is served under its experiment `name` (or `--name`); every `--run` adds its
adapter, served under the run folder's name; every `--model NAME=DIR` adds another engine.
Joins the Ray cluster at `--address` / $RAY_ADDRESS, or starts a local one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _named(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models and adapters behind an OpenAI-compatible route (Ray Serve + vLLM)",
    )
    p.add_argument("--config", help="experiment YAML: its model is the base that is served")
    p.add_argument("--name", help="the served name of the config's model (default: its name)")
    p.add_argument(
        "--run", action="append", default=[], help="a training run whose adapter to serve"
    )
    p.add_argument("--adapter", action="append", default=[], type=_named, metavar="NAME=DIR")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        type=_named,
        metavar="NAME=DIR",
        help="another model folder (e.g. a merged run) served by its own engine",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for a cluster)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="engine replicas per served model")
    p.add_argument(
        "--gpus-per-replica", type=float, default=None, help="default: 1 on GPU, 0 on CPU"
    )
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        help="requests in flight per engine replica; vLLM batches and queues them (default: 1024)",
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local one)")
    p.add_argument(
        "--ray-host",
        default="127.0.0.1",
        help="the address a local Ray cluster started here listens on (default: 127.0.0.1, "
        "unreachable from the network; --host is the HTTP route's)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM memory share")
    p.add_argument("--max-model-len", type=int, help="vLLM: longest prompt + answer in tokens")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dtype=bfloat16")
    p.set_defaults(func=run)


VLLM_INSTALL = (
    "GPUs: `pip install vllm` in this environment; CPU: `bash scripts/install_vllm_cpu.sh`, then "
    "run `.venv-vllm/bin/emmoe serve ...`"
)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from emmoe_dist.errors import EmmoeError

    if importlib.util.find_spec("vllm") is None:  # before any model or cluster is touched
        raise EmmoeError(
            f"emmoe serve runs vLLM engines, and vLLM is not installed for {sys.executable}. "
            f"Install it: {VLLM_INSTALL}"
        )
    from emmoe_dist.config import load_config
    from emmoe_dist.generate.backends import materialized_model
    from emmoe_dist.generate.sources import ModelSource, from_run
    from emmoe_dist.generate.vllm_backend import VllmEngineOptions, on_cpu
    from emmoe_dist.serve.app import ServedModel, ServeOptions, serving

    cfg = load_config(args.config, args.overrides)
    adapters = dict(args.adapter)
    for run_dir in args.run:
        source = from_run(run_dir)
        if source.adapter is None:
            from emmoe_dist.errors import EmmoeError

            raise EmmoeError(
                f"{run_dir}: expert deltas are not adapters; `emmoe merge` it and --model"
            )
        adapters[Path(run_dir).name] = str(source.adapter)
    base = ModelSource(base=cfg.model, model_label=cfg.model.name_or_path)
    models = [
        ServedModel(
            name=args.name or cfg.name,
            path=materialized_model(base, cfg.seed, Path(cfg.output_dir)),
            adapters=adapters,
        ),
        *(ServedModel(name=name, path=path) for name, path in args.model),
    ]
    cpu = on_cpu()
    options = ServeOptions(
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests or ServeOptions.max_ongoing_requests,
        gpus_per_replica=args.gpus_per_replica
        if args.gpus_per_replica is not None
        else (0 if cpu else 1),
        engine=VllmEngineOptions(
            dtype=cfg.model.dtype,
            seed=cfg.seed,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
        ),
    )
    with serving(models, options, address=args.address, ray_host=args.ray_host) as url:
        names = ", ".join(n for m in models for n in m.names())
        print(f"serving {names} at {url} (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("shutting down", flush=True)
    return 0
