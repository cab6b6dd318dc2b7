"""Attention over packed sequences without padding and without attending across documents.

Training packs several examples into each row (`data/training.py`); their `position_ids`
restart at 0 at every example. With `sdpa`, transformers turns the restarts into a
block-diagonal `[batch, 1, seq, seq]` mask, which rules out the flash kernel and makes every
head read a dense mask. Here the rows are flattened into one stream of segments and handed to
PyTorch's variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`), which
skips the masked blocks altogether.

It plugs in through transformers' public `AttentionInterface` (a registered name, picked by
`model.set_attn_implementation`); the segment boundaries are computed once per micro-batch on
the host from `position_ids` (`segment_kwargs`), so no layer copies anything back from the
GPU. The kernel is CUDA-only; `varlen_reference` is the plain PyTorch function with the same
contract (per-segment causal `scaled_dot_product_attention`), used on CPU and in tests.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

ATTN_NAME = "emmoe_varlen"

Kernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor
]


def segment_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """Cumulative segment starts of the flattened rows, and the longest segment (host-side).

    A segment starts wherever a position is 0, and at the start of every row.
    """
    flat = position_ids.detach().to("cpu").reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    row_starts = torch.arange(0, flat.numel(), position_ids.shape[-1])
    starts = torch.unique(torch.cat([starts, row_starts]))
    bounds = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int(bounds.diff().max())
    return {
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    """Causal attention within each segment: `q [tokens, Hq, D]`, `k, v [tokens, Hkv, D]`."""
    groups = q.shape[1] // k.shape[1]
    out = []
    bounds = cu.tolist()
    for lo, hi in itertools.pairwise(bounds):
        qs, ks, vs = (t[lo:hi].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
    return torch.cat(out, dim=1).transpose(0, 1)


def flash_varlen() -> Kernel:
    """PyTorch's varlen flash attention, adapted to the keyword set of the installed torch."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    gqa = "enable_gqa" in params

    def kernel(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu: torch.Tensor,
        longest: int,
        scale: float,
    ) -> torch.Tensor:
        if not gqa and k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        extra: dict[str, Any] = {"scale": scale}
        if gqa:
            extra["enable_gqa"] = True
        if "is_causal" in params:
            extra["is_causal"] = True
        else:
            extra["window_size"] = (-1, 0)
        out = varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
        assert isinstance(out, torch.Tensor)  # no auxiliary outputs were asked for
        return out

    return kernel


def varlen_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def make_attention(kernel: Kernel) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function in transformers' interface over `kernel`."""

    @torch.compiler.disable  # segment lengths change per micro-batch (models/compile.py)
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            raise ValueError(
                f"attention {ATTN_NAME!r} needs the segment boundaries of packed rows "
                "(cu_seq_lens_q, from packed_attention.segment_kwargs)"
            )
        window = kwargs.get("sliding_window")
        if (window is not None and window < kwargs["max_length_q"]) or hasattr(module, "sinks"):
            raise ValueError(f"attention {ATTN_NAME!r} has no sliding window or sinks")
        batch, heads, seq, dim = query.shape
        q, k, v = (
            t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value)
        )
        scale = scaling if scaling is not None else dim**-0.5
        out = kernel(q, k, v, cu, kwargs["max_length_q"], scale)
        return out.view(batch, seq, heads, dim), None

    return attention


def use_packed_attention(model: Any, kernel: Kernel) -> None:
    """Register `kernel` under `ATTN_NAME` and switch `model` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, make_attention(kernel))
    model.set_attn_implementation(ATTN_NAME)
