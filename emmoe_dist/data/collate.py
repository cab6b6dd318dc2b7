"""Batches of encoded chats as tensors, padded on the right."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emmoe_dist.data.chat import IGNORE_INDEX, EncodedChat


def pad_batch(items: Sequence[EncodedChat], pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `labels` (IGNORE_INDEX on padding), right-padded.

    Packed items also give `position_ids` (padding restarts at 0, a segment of its own). To
    keep packed examples from attending to each other, call the model with `position_ids`,
    no `attention_mask` and `use_cache=False` (see `pack_encoded`); right padding needs no
    mask under causal attention: no real token attends to a later one, and padded labels are
    ignored.
    """
    if not items:
        raise ValueError("pad_batch needs at least one item")
    packed = [it.position_ids is not None for it in items]
    if any(packed) and not all(packed):
        raise ValueError("a batch mixes packed and unpacked items")
    width = max(len(it) for it in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    positions = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it)
        input_ids[row, :n] = torch.tensor(it.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(it.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
        if it.position_ids is not None:
            positions[row, :n] = torch.tensor(it.position_ids, dtype=torch.long)
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if all(packed):
        batch["position_ids"] = positions
    return batch
