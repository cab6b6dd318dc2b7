"""The generation backend for a run: one vLLM engine (or a Ray Data job of engines) for many
sources on one base, or the transformers backend with one source merged in.

`emmoe generate`, `emmoe serve` and the sweep's generation stage build their generators here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emmoe_dist.config import TINY_PREFIX
from emmoe_dist.errors import EmmoeError

if TYPE_CHECKING:
    from emmoe_dist.config import ExperimentConfig
    from emmoe_dist.generate.interface import Generator
    from emmoe_dist.generate.runner import GenerationSummary, SuiteSet
    from emmoe_dist.generate.sources import ModelSource


@dataclass(frozen=True, kw_only=True)
class VllmLaunch:
    """How the vLLM backend runs, beyond the experiment's model and seed."""

    gpu_memory_utilization: float | None = None  # None: vLLM's default for the device
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    ray_data_replicas: int = 0  # >0: a Ray Data job over this many engine replicas


def vllm_generator(
    cfg: ExperimentConfig, sources: list[ModelSource], launch: VllmLaunch, cache: Path
) -> Generator:
    """One engine on the shared base, with every source's adapter available per request."""
    from emmoe_dist.generate.vllm_backend import VllmEngineOptions, VllmGenerator

    # A folder named two ways (relative and absolute) is one base.
    bases = {
        str(Path(n).resolve()) if Path(n).exists() else n
        for n in (s.base.name_or_path for s in sources)
    }
    if len(bases) != 1:
        raise EmmoeError(
            f"the runs were trained on different bases ({sorted(bases)}): one per call"
        )
    routed = [s.label for s in sources if s.trains_router]
    if routed:
        raise EmmoeError(
            f"vLLM applies no LoRA to routers, and {routed[0]} trained its router: merge the "
            "run (`emmoe merge RUN --out DIR`) and generate with model.name_or_path=DIR, or "
            "use --backend transformers"
        )
    if any(s.expert_delta is not None for s in sources):
        raise EmmoeError(
            "vLLM serves LoRA adapters, not expert deltas: merge the run "
            "(`emmoe merge RUN --out DIR`) and generate with model.name_or_path=DIR"
        )
    engine = VllmEngineOptions(
        dtype=cfg.model.dtype,
        seed=cfg.seed,
        gpu_memory_utilization=launch.gpu_memory_utilization,
        max_model_len=launch.max_model_len,
        tensor_parallel_size=launch.tensor_parallel_size,
    )
    model = materialized_model(sources[0], cfg.seed, cache)
    adapters = [s.adapter for s in sources if s.adapter is not None]
    if launch.ray_data_replicas:
        from emmoe_dist.generate.ray_data_backend import RayDataGenerator

        return RayDataGenerator(
            model, adapters=adapters, engine=engine, replicas=launch.ray_data_replicas
        )
    return VllmGenerator(model, adapters=adapters, engine=engine)


def transformers_generator(
    cfg: ExperimentConfig, source: ModelSource, device: str | None = None
) -> Generator:
    """The source loaded for inference (its adapter merged in) on `device` (default: auto),
    decoded by `eval.transformers_engine`."""
    from emmoe_dist.generate.sources import load_for_generation

    loaded = load_for_generation(source, seed=cfg.seed, device=device or auto_device())
    if cfg.eval.transformers_engine == "generate":
        from emmoe_dist.generate.transformers_backend import TransformersGenerator

        return TransformersGenerator(loaded.model, loaded.tokenizer, batch_size=cfg.eval.batch_size)
    from emmoe_dist.generate.continuous import ContinuousGenerator

    return ContinuousGenerator(loaded.model, loaded.tokenizer, batch_size=cfg.eval.batch_size)


def generate_sources(
    cfg: ExperimentConfig,
    targets: list[tuple[ModelSource, Path]],
    suites: SuiteSet,
    *,
    device: str | None = None,
    launch: VllmLaunch | None = None,
    progress: bool = True,
) -> list[GenerationSummary]:
    """Every target's answers into its own file with `cfg.eval.backend`: one vLLM engine (or
    Ray Data job) for all of them, each adapter per request; or the transformers backend, one
    source merged at a time."""
    from emmoe_dist.generate.runner import run_generation, run_generation_many

    if cfg.eval.backend == "vllm":
        shared = vllm_generator(
            cfg, [s for s, _ in targets], launch or VllmLaunch(), targets[0][1].parent
        )
        try:
            return run_generation_many(
                cfg, shared, shared.tokenizer, targets, suites, progress=progress
            )
        finally:
            shared.close()
    summaries = []
    for source, out in targets:
        generator = transformers_generator(cfg, source, device)
        try:
            summaries.append(
                run_generation(
                    cfg, generator, generator.tokenizer, source, suites, out, progress=progress
                )
            )
        finally:
            generator.close()
    return summaries


def materialized_model(source: ModelSource, seed: int, cache: Path) -> str:
    """vLLM loads folders and hub ids: a `tiny:<family>` model is saved once beside the output."""
    name = source.base.name_or_path
    if not name.startswith(TINY_PREFIX):
        return name
    from emmoe_dist.models.tiny import save_tiny

    family = name.removeprefix(TINY_PREFIX)
    folder = cache / f".tiny-{family}-seed{seed}"
    if not (folder / "config.json").is_file():
        save_tiny(family, folder, seed=seed)
    return str(folder)


def auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
