"""Ray Serve: vLLM engines behind one OpenAI-compatible route (`/v1/chat/completions`,
`/v1/models`), serving base models, merged models and the LoRA adapters of a sweep from
local folders.

Ray Serve LLM (`ray.serve.llm`) loads adapters only from object stores (s3/gs/azure) and
`ray[llm]` 2.60 pins the CUDA `vllm==0.29.0`; so each `ModelServer` replica holds its own
`vllm.AsyncLLMEngine` and maps served names to `LoRARequest`s for local adapter folders.
An `OpenAIRouter` replica takes the HTTP requests and forwards each to the engine that serves
its `model`. Replicas and GPUs per replica come from `ServeOptions`.

    with serving([ServedModel(name="base", path="runs/merged")], ServeOptions(port=8000)) as url:
        openai.OpenAI(base_url=url, api_key="-").chat.completions.create(model="base", ...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from emmoe_dist.errors import EmmoeError
from emmoe_dist.generate.vllm_backend import VllmEngineOptions
from emmoe_dist.ray_local import LOOPBACK, connect_or_start
from emmoe_dist.serve.protocol import ChatRequest, Choice, chat_completion

APP_NAME = "emmoe"
ROUTER_CPUS = 0.1


@dataclass(frozen=True, kw_only=True)
class ServedModel:
    """A base (or merged) model folder served as `name`, with LoRA adapters by name."""

    name: str
    path: str
    adapters: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [self.name, *self.adapters]


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1  # engine replicas per served model
    gpus_per_replica: float = 0.0  # 0 on CPU; vLLM's tensor_parallel_size follows it on GPUs
    cpus_per_replica: float = 1.0
    # Requests in flight per engine replica. Ray Serve's default (5) would starve the engine:
    # continuous batching needs every waiting request inside vLLM, which queues them itself.
    max_ongoing_requests: int = 1024
    engine: VllmEngineOptions = field(default_factory=VllmEngineOptions)


class ModelServer:
    """One vLLM engine (one base model) and its adapters; a Ray Serve replica."""

    def __init__(self, model: ServedModel, engine: VllmEngineOptions) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from emmoe_dist.generate.prompts import stop_token_ids
        from emmoe_dist.generate.vllm_backend import is_fused_moe_adapter, on_cpu

        if model.adapters and on_cpu():
            raise EmmoeError(
                "vLLM's CPU build cannot apply LoRA to MoE experts: serve merged models"
            )
        fused = {name: is_fused_moe_adapter(path) for name, path in model.adapters.items()}
        kwargs = engine.engine_kwargs(
            model.path, lora=bool(model.adapters), fused_moe_lora=any(fused.values())
        )
        self.model = model
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._lora: dict[str, Any] = {}
        if model.adapters:
            from vllm.lora.request import LoRARequest

            for i, (name, path) in enumerate(sorted(model.adapters.items()), start=1):
                self._lora[name] = LoRARequest(
                    lora_name=name,
                    lora_int_id=i,
                    lora_path=str(Path(path).resolve()),
                    is_3d_lora_weight=fused[name],
                )

    async def chat(self, request: ChatRequest) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from emmoe_dist.generate.interface import RawSample
        from emmoe_dist.generate.prompts import decode_sample, prompt_ids, render_prompt

        text = render_prompt(self.tokenizer, request.messages, thinking=request.thinking)
        ids = prompt_ids(self.tokenizer, text)
        params = SamplingParams(
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            seed=request.seed,
            stop_token_ids=sorted(self.stop_ids),
            logprobs=request.top_logprobs if request.logprobs else None,
            skip_special_tokens=True,
        )
        # With n > 1 the engine streams each sample as it progresses: keep the latest of each.
        latest: dict[int, Any] = {}
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=list(ids)),
            params,
            request_id=uuid.uuid4().hex,
            lora_request=self._lora.get(request.model),
        ):
            latest.update({o.index: o for o in output.outputs})
        if len(latest) != request.n:
            raise EmmoeError(f"the engine returned {len(latest)} of {request.n} samples")
        choices = []
        for _, out in sorted(latest.items()):
            tokens = list(out.token_ids)
            stopped = out.finish_reason == "stop"
            while stopped and tokens and tokens[-1] in self.stop_ids:
                tokens.pop()
            raw = RawSample(key="", token_ids=tuple(tokens), stopped=stopped)
            decoded = decode_sample(self.tokenizer, raw, thinking=request.thinking)
            choices.append(
                Choice(
                    text=decoded.answer,
                    finish_reason=decoded.finish_reason,
                    n_tokens=len(tokens),
                    logprobs=self._logprobs(out, tokens, request.top_logprobs)
                    if request.logprobs
                    else None,
                )
            )
        return chat_completion(request.model, choices, len(ids))

    @staticmethod
    def _logprobs(
        out: Any, tokens: Sequence[int], k: int
    ) -> list[tuple[str, float, tuple[tuple[str, float], ...]]] | None:
        from emmoe_dist.generate.vllm_backend import top_logprob_pairs

        if out.logprobs is None:
            return None
        content: list[tuple[str, float, tuple[tuple[str, float], ...]]] = []
        for token, position in zip(tokens, out.logprobs, strict=False):
            chosen = position.get(token)
            text = str(chosen.decoded_token or "") if chosen is not None else ""
            value = float(chosen.logprob) if chosen is not None else float("-inf")
            content.append((text, value, top_logprob_pairs(position, k)))
        return content


def build_app(models: Sequence[ServedModel], options: ServeOptions) -> Any:
    """The Serve application: one `ModelServer` deployment per model behind `OpenAIRouter`."""
    from ray import serve

    from emmoe_dist.serve.router import OpenAIRouter

    names = [n for m in models for n in m.names()]
    if len(set(names)) != len(names):
        raise EmmoeError(f"served model names must be unique, got {names}")
    engine = options.engine
    if options.gpus_per_replica >= 1:
        engine = dataclasses.replace(engine, tensor_parallel_size=int(options.gpus_per_replica))
    server: Any = serve.deployment(ModelServer)
    handles = {
        m.name: server.options(
            name=f"model-{i}",
            num_replicas=options.replicas,
            max_ongoing_requests=options.max_ongoing_requests,
            ray_actor_options={
                "num_cpus": options.cpus_per_replica,
                "num_gpus": options.gpus_per_replica,
            },
        ).bind(m, engine)
        for i, m in enumerate(models)
    }
    served = {name: m.name for m in models for name in m.names()}
    router = cast(Any, OpenAIRouter).options(
        name="router",
        # the router only forwards: it must hold every replica's requests at once
        max_ongoing_requests=options.max_ongoing_requests * options.replicas * len(models),
        ray_actor_options={"num_cpus": ROUTER_CPUS},
    )
    return router.bind(handles, served)


def start_ray(
    address: str | None = None, *, num_cpus: int | None = None, host: str = LOOPBACK
) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), or start a local one bound to `host`
    (127.0.0.1: unreachable from the network); True when a local one was started here."""
    if address or os.environ.get("RAY_ADDRESS"):
        return connect_or_start(address)
    return connect_or_start(
        host=host,
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024 if num_cpus and num_cpus <= 4 else None,
    )


def resource_needs(models: Sequence[ServedModel], options: ServeOptions) -> dict[str, float]:
    """CPUs and GPUs the application reserves: every engine replica, and the router."""
    replicas = options.replicas * len(models)
    return {
        "CPU": replicas * options.cpus_per_replica + ROUTER_CPUS,
        "GPU": replicas * options.gpus_per_replica,
    }


def check_resources(
    models: Sequence[ServedModel], options: ServeOptions, available: Mapping[str, float]
) -> None:
    """Refuse, with the arithmetic, an application the cluster cannot place: Ray Serve would
    otherwise wait forever for a replica no node can take."""
    needs = resource_needs(models, options)
    short = [k for k, v in needs.items() if v > available.get(k, 0.0) + 1e-9]
    if not short:
        return
    per = f"{options.cpus_per_replica:g} CPU + {options.gpus_per_replica:g} GPU"
    raise EmmoeError(
        f"{len(models)} model(s) x {options.replicas} replica(s) x ({per}) + "
        f"{ROUTER_CPUS:g} CPU for the router = {needs['CPU']:g} CPUs and {needs['GPU']:g} GPUs; "
        f"the Ray cluster has {available.get('CPU', 0.0):g} CPUs and "
        f"{available.get('GPU', 0.0):g} GPUs. Lower --replicas or --gpus-per-replica, serve "
        "fewer --model folders, or add nodes"
    )


def run_app(models: Sequence[ServedModel], options: ServeOptions) -> str:
    """Deploy the application and wait until every replica is up; returns the /v1 base URL."""
    from ray import serve

    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(build_app(models, options), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{options.host}:{options.port}/v1"


@contextlib.contextmanager
def serving(
    models: Sequence[ServedModel],
    options: ServeOptions,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    ray_host: str = LOOPBACK,
) -> Iterator[str]:
    """Serve `models` for the duration of the block, then shut Serve (and a Ray started here)
    down; yields the OpenAI base URL."""
    started_here = start_ray(address, num_cpus=num_cpus, host=ray_host)  # before ray's import
    import ray
    from ray import serve

    try:
        check_resources(models, options, ray.cluster_resources())
        yield run_app(models, options)
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()
