"""Attention over one KV-cache slot per sample: how the continuous engine plugs into transformers.

The engine (`continuous.py`) keeps a fixed number of slots, each holding one sample's keys and
values at that sample's own positions, so a finished sample's slot is refilled while the others
keep decoding. transformers' caches give every row of a batch the same length (left padding),
and its own continuous batching keeps the whole batch in one packed sequence whose attention,
without flash-attn, is one dense mask over every sample's keys. So the engine brings its own
attention, registered through transformers' public `AttentionInterface` and selected with
`model.set_attn_implementation` while the engine runs (`slot_attention_enabled`). The model is
called without a transformers cache; this function stores and reads the keys itself:

- prefill (`[1, T]`, one prompt): causal attention over the prompt; its keys and values are
  kept in `SlotKV.prefix` for the engine to copy into every slot that starts from that prompt.
- decode (`[slots, 1]`): each slot writes its new key and value at its own position
  (`SlotKV.positions`) and attends to its positions `0..p` (within the layer's sliding window).

Layers take their sliding window and attention sinks (GPT-oss) from the keyword arguments the
model passes to every attention function (`sliding_window`, `s_aux`), the same in transformers
5.17 and 5.20; every other argument (dropout, the unused mask) is ignored. A custom attention
name is not one of transformers' mask functions, so the model builds no mask of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

ATTN_NAME = "emmoe_slots"
SLOT_KWARG = "emmoe_slot_kv"  # the keyword that carries the `SlotKV` down to each layer


class SlotKV:
    """Keys and values of `slots` samples, `length` positions each, for every decoder layer."""

    def __init__(
        self,
        layer_devices: list[torch.device],
        *,
        slots: int,
        length: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        self.length = length
        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in layer_devices]
        first = layer_devices[0]
        self.positions = torch.zeros(slots, dtype=torch.long, device=first)
        self.slot_index = torch.arange(slots, device=first)
        self.key_index = torch.arange(length, device=first)
        self.decoding = False  # False: the next forward is a prefill
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> prompt's K, V
        self._visible: dict[int | None, torch.Tensor] = {}

    def begin_prefill(self) -> None:
        self.decoding = False
        self.prefix = {}

    def begin_decode(self) -> None:
        self.decoding = True
        self._visible = {}

    def load_prefix(
        self, slots: torch.Tensor, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Copy a prompt's keys and values (from a prefill) into the first positions of `slots`."""
        for layer, (k, v) in prefix.items():
            width = k.shape[1]
            index = slots.to(self.keys[layer].device)
            self.keys[layer][index, :, :width] = k.unsqueeze(0)
            self.values[layer][index, :, :width] = v.unsqueeze(0)

    def visible(self, window: int | None, device: torch.device) -> torch.Tensor:
        """[slots, length] True where a slot's current token may attend (one per step and window)."""
        if window not in self._visible:
            pos = self.positions[:, None]
            keys = self.key_index[None, :]
            mask = keys <= pos
            if window is not None:
                mask = mask & (keys > pos - window)
            self._visible[window] = mask
        return self._visible[window].to(device)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-query attention, `query [B, H, Tq, D]` over `key, value [B, Hkv, Tk, D]` where
    `visible [B, Tq, Tk]` allows; returns `[B, Tq, H, D]` as transformers' attention functions do.

    Keys are read once per kv head (no repeat to the query heads): decoding is bound by reading
    the cache. Softmax in float32; GPT-oss's sinks are one extra logit per head that takes
    probability mass and contributes no value, as in its eager attention."""
    b, heads, tq, dim = query.shape
    kv_heads, tk = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    q = query.reshape(b, kv_heads, groups * tq, dim)
    scores = (q @ key.transpose(-1, -2) * scale).view(b, kv_heads, groups, tq, tk)
    scores = scores.float().masked_fill(~visible[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, groups, 1, 1).expand(b, -1, -1, tq, 1)
        logits = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = probs.to(value.dtype).view(b, kv_heads, groups * tq, tk) @ value
    return out.view(b, heads, tq, dim).transpose(1, 2)


def slot_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface over a `SlotKV` (module docstring)."""
    kv: SlotKV | None = kwargs.get(SLOT_KWARG)
    if kv is None:
        raise RuntimeError(
            f"attention {ATTN_NAME!r} runs only inside the continuous engine (no {SLOT_KWARG})"
        )
    layer = int(getattr(module, "layer_idx"))  # noqa: B009 - every decoder attention has one
    window: int | None = kwargs.get("sliding_window")
    sinks: torch.Tensor | None = kwargs.get("s_aux")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not kv.decoding:
        kv.prefix[layer] = (key[0], value[0])
        t = query.shape[2]
        i = torch.arange(t, device=query.device)
        visible = i[None, :] <= i[:, None]
        if window is not None:
            visible = visible & (i[None, :] > i[:, None] - window)
        return attend(query, key, value, visible[None], scale, sinks), None
    keys, values = kv.keys[layer], kv.values[layer]
    pos = kv.positions.to(keys.device)
    rows = kv.slot_index.to(keys.device)
    keys[rows, :, pos] = key[:, :, 0]
    values[rows, :, pos] = value[:, :, 0]
    visible = kv.visible(window, keys.device)[:, None, :]
    return attend(query, keys, values, visible, scale, sinks), None


@contextmanager
def slot_attention_enabled(model: Any) -> Iterator[None]:
    """The model's attention switched to `slot_attention` for the block, and back after."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, slot_attention)
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
