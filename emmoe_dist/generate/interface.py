"""What every generation backend takes and returns: token ids in, token ids out.

Prompts are rendered (and tokenized) once, by `prompts.py`, for every backend; answers are
decoded by `prompts.decode_sample`. A backend only samples, so the transformers and vLLM
backends see identical prompts and produce records of one schema.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from emmoe_dist.config import EvalConfig


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """How to sample; the same for every request of one run."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    # > 0 suppresses end-of-sequence until that many tokens exist (benchmarks: fixed length).
    min_new_tokens: int = 0
    # > 0 returns the top-k log-probabilities of every generated token (raw: before
    # temperature and top-p, as vLLM and the OpenAI API report them).
    top_logprobs: int = 0

    @classmethod
    def from_eval(cls, cfg: EvalConfig) -> SamplingOptions:
        return cls(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """One answer to draw: the prompt's token ids and the seed of this sample."""

    key: str
    prompt_ids: tuple[int, ...]
    seed: int
    adapter: str | None = None  # a LoRA adapter folder applied per request (vLLM only)
    # a steering condition applied per request (`per_request_steering` generators only):
    # an index into the generator's `RowSteering` conditions
    condition: int = 0


@dataclass(frozen=True, kw_only=True)
class RawSample:
    """What a backend returns for one request: the generated ids, stop token excluded."""

    key: str
    token_ids: tuple[int, ...]
    stopped: bool  # True: ended by an end-of-sequence token; False: hit max_new_tokens
    # per generated token, its top-k (token text, log-probability) pairs
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] | None = None


class Generator(Protocol):
    """A sampling backend. `generate` yields finished samples in groups, as soon as each group
    is done, so the caller can write them to disk before the next one starts."""

    backend: str  # the name written into every record ("transformers", "vllm")
    # True: requests name their LoRA adapter (vLLM); False: the weights already hold it
    per_request_adapters: bool
    # True: requests name a steering condition, applied to their rows only (the continuous
    # transformers engine built with a `RowSteering`)
    per_request_steering: bool
    tokenizer: PreTrainedTokenizerBase  # renders prompts and decodes answers for this model

    def generate(
        self, requests: Sequence[SampleRequest], options: SamplingOptions
    ) -> Iterator[list[RawSample]]: ...

    def close(self) -> None: ...
