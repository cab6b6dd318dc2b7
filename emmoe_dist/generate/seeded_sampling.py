"""Sampling with one seed per sequence inside a batched `transformers` generate call.

`generate(do_sample=True)` draws every row from the one global torch RNG, so a sample depends on
its batch neighbours and on the order of batches: no answer could be re-drawn alone. Here each
row's random number at step t is a hash of (its seed, t), computed on the device for the whole
batch at once, and the token is drawn by inverting the row's cumulative distribution. The
draw happens in a logits processor that leaves only the chosen token finite, so `generate`
runs greedily (`do_sample=False`) and keeps its KV cache, padding and stopping logic.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_U24 = float(1 << 24)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) without int64 overflow: c split in 16-bit halves."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply, two rounds) on int64 lanes."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_uniform(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One float32 in (0, 1) per seed, a pure function of (seed, step) on any device; `step` is
    one int for every row or a tensor of one step per row (continuous batching mixes rows at
    different steps).

    24 bits of resolution: a token of probability below 6e-8 is (almost) never drawn.
    """
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    h = _mix32(_mix32(_mix32(lo) ^ hi) ^ (step & _MASK32))
    return ((h >> 8).to(torch.float32) + 0.5) / _U24


def draw_tokens(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    *,
    temperature: float,
    top_p: float,
) -> torch.Tensor:
    """Token ids [B], one per row, drawn from softmax(logits / T) restricted to the top-p
    nucleus, with each row's seeded uniform; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order: torch.Tensor | None = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass strictly above each token: the first always stays
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    u = seeded_uniform(seeds, step) * cdf[:, -1]
    picked = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
    if order is not None:
        picked = order.gather(-1, picked)
    return picked.squeeze(-1)


class SeededSampler:
    """A transformers logits processor: draws each row's token (module docstring) and records
    the raw top-k log-probabilities when asked."""

    def __init__(
        self,
        seeds: torch.Tensor,
        prompt_width: int,
        *,
        temperature: float,
        top_p: float,
        top_logprobs: int = 0,
    ) -> None:
        self.seeds = seeds
        self.prompt_width = prompt_width
        self.temperature, self.top_p = temperature, top_p
        self.top_logprobs = top_logprobs
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (values, ids) [B, k] per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        if self.top_logprobs:
            top = torch.log_softmax(scores.float(), dim=-1).topk(self.top_logprobs, dim=-1)
            self.steps.append((top.values.cpu(), top.indices.cpu()))
        picked = draw_tokens(
            scores, self.seeds, step, temperature=self.temperature, top_p=self.top_p
        )
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked[:, None], 0.0)
