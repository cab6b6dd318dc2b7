"""The transformers backend's `generate` engine (`eval.transformers_engine: generate`): batched
`generate` on one device, any machine, GPU or CPU. The default engine is `continuous.py`; this
one is transformers' own decode loop, kept to compare against and as a fallback.

Requests are sorted by prompt length (longest first, so a batch that does not fit fails at
once, not an hour in) and cut into batches of `batch_size`; each batch is left-padded and
generated in one call with per-row seeds (`seeded_sampling`). Adapters are merged into the
weights at load time (`sources.load_for_generation`): a merged expert LoRA costs nothing per
token, while PEFT's `target_parameters` forward rebuilds every expert's ΔW each step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from emmoe_dist.errors import EmmoeError
from emmoe_dist.generate.interface import RawSample, SampleRequest, SamplingOptions
from emmoe_dist.generate.prompts import stop_token_ids
from emmoe_dist.generate.seeded_sampling import SeededSampler

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class TransformersGenerator:
    backend = "transformers"
    per_request_adapters = False
    per_request_steering = False

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise EmmoeError("the tokenizer has no pad token: batched generation needs one")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)

    def generate(
        self, requests: Sequence[SampleRequest], options: SamplingOptions
    ) -> Iterator[list[RawSample]]:
        if any(r.adapter is not None for r in requests):
            raise EmmoeError(
                "the transformers backend applies one adapter, merged at load time; "
                "per-request adapters need the vLLM backend"
            )
        ordered = sorted(requests, key=lambda r: -len(r.prompt_ids))
        for start in range(0, len(ordered), self.batch_size):
            yield self._batch(ordered[start : start + self.batch_size], options)

    @torch.inference_mode()
    def _batch(self, batch: Sequence[SampleRequest], options: SamplingOptions) -> list[RawSample]:
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(r.prompt_ids) for r in batch)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every prompt ends at the same column
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        sampler = SeededSampler(
            torch.tensor([r.seed for r in batch], dtype=torch.long, device=self.device),
            width,
            temperature=options.temperature,
            top_p=options.top_p,
            top_logprobs=options.top_logprobs,
        )
        # A fresh config: a checkpoint's own sampling defaults (Qwen3 ships top_k 20,
        # temperature 0.6) must not leak in; sampling is the SeededSampler's alone.
        config = GenerationConfig(
            max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.min_new_tokens or None,
            do_sample=False,
            # Explicit: a checkpoint saved from training carries `use_cache: false`, and without
            # the cache every step re-runs the whole sequence (on GPUs through transformers'
            # decode-time `batched_mm` experts, which copies expert weights per token).
            use_cache=True,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=pad,
        )
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
        )
        generated = out[:, width:].tolist()
        return [
            self._sample(r, row, sampler, i)
            for i, (r, row) in enumerate(zip(batch, generated, strict=True))
        ]

    def _sample(
        self, request: SampleRequest, row: list[int], sampler: SeededSampler, index: int
    ) -> RawSample:
        stop = next((j for j, t in enumerate(row) if t in self.stop_ids), None)
        tokens = row if stop is None else row[:stop]
        top: Any = None
        if sampler.top_logprobs:
            top = tuple(
                tuple(
                    (self.tokenizer.decode([int(t)]), float(v))
                    for v, t in zip(values[index].tolist(), ids[index].tolist(), strict=True)
                )
                for values, ids in sampler.steps[: len(tokens)]
            )
        return RawSample(
            key=request.key, token_ids=tuple(tokens), stopped=stop is not None, top_logprobs=top
        )

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
