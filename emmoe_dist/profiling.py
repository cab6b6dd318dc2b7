"""Pipeline stage 1: profile the base model's expert routing on a training set.

Runs alone (`python -m emmoe_dist.cli.main profile ...`) or on several ranks
(`torchrun --nproc_per_node N -m emmoe_dist.cli.main profile ...`): each rank profiles every
N-th example, the counts are summed across ranks, and rank 0 writes the profile.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertProfile
from emmoe_dist.families import MoEFamily
from emmoe_dist.models.loading import load_tiny_or_path
from emmoe_dist.parallel.runtime import Runtime, all_reduce_sum_, init_runtime
from emmoe_dist.routing import RoutingCounts, profile_batches

if TYPE_CHECKING:
    from torch import nn

    from emmoe_dist.data.chat import EncodedChat


def _batches(
    items: Sequence[EncodedChat], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    from emmoe_dist.data.collate import pad_batch

    # Longest first: similar lengths share a batch, so little compute goes to padding.
    ordered = sorted(items, key=lambda item: len(item.input_ids), reverse=True)
    for start in range(0, len(ordered), batch_size):
        yield pad_batch(ordered[start : start + batch_size], pad_id)


def _sum_over_ranks(counts: RoutingCounts, device: torch.device) -> RoutingCounts:
    # nccl reduces only device tensors; gloo takes CPU ones.
    token_counts = all_reduce_sum_(counts.token_counts.to(device)).cpu()
    gate_sums = all_reduce_sum_(counts.gate_sums.to(device)).cpu()
    return RoutingCounts(counts.layers, token_counts, gate_sums, counts.top_k)


def profile_items(
    model: nn.Module,
    family: MoEFamily,
    items: Sequence[EncodedChat],
    *,
    pad_id: int,
    batch_size: int,
    include_prompt: bool,
    runtime: Runtime,
) -> RoutingCounts:
    """Profile this rank's stride of `items` and return the counts summed over all ranks."""
    mine = items[runtime.rank :: runtime.world_size]
    counts = profile_batches(
        model,
        family,
        _batches(mine, batch_size, pad_id),
        include_prompt=include_prompt,
        progress=runtime.is_main,
        total=-(-len(mine) // batch_size),
    )
    return _sum_over_ranks(counts, runtime.device)


def run_profile(
    model_spec: str,
    data: str,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    max_length: int = 1024,
    batch_size: int = 8,
    include_prompt: bool = False,
    out: str | os.PathLike[str] = "profile.json",
    plot: str | os.PathLike[str] | None = None,
    *,
    runtime: Runtime | None = None,
    allow_unverified: bool = False,
) -> ExpertProfile:
    """Profile `model_spec` (tiny:<family>, folder or hub id) on `data` (a dataset name or a
    chat JSONL file); rank 0 writes `out` (and the heatmap `plot`). Returns the profile. The
    data is read and checked against the catalog before the model loads."""
    from emmoe_dist.data.training import encode_dataset, load_training_split

    split = load_training_split(
        data,
        Path(data_dir) if data_dir is not None else None,
        heldout=0,
        seed=0,
        limit=limit,
        allow_unverified=allow_unverified,
    )
    runtime = runtime or init_runtime(process_group=False)
    device_map = None
    if runtime.world_size == 1 and torch.cuda.device_count() > 1:
        # One process and several GPUs: spread a model too large for one GPU over all of them.
        device_map = "auto"
    loaded = load_tiny_or_path(
        model_spec,
        for_training=False,
        device=None if device_map else runtime.device,
        device_map=device_map,
    )
    encoded = encode_dataset(loaded.tokenizer, split.train, max_length)
    if runtime.is_main and encoded.dropped:
        print(
            f"profile: {encoded.dropped} examples had no assistant token within "
            f"{max_length} tokens and were left out",
            file=sys.stderr,
        )
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = loaded.tokenizer.eos_token_id
    counts = profile_items(
        loaded.model,
        loaded.family,
        encoded.items,
        pad_id=int(pad_id),
        batch_size=batch_size,
        include_prompt=include_prompt,
        runtime=runtime,
    )
    if counts.tokens == 0:
        raise EmmoeError(f"no tokens were counted on {data!r}; check the data and --max-length")
    profile = counts.to_profile(
        model=model_spec,
        family=loaded.family.name,
        dataset=split.name,
        dataset_hash=split.source_hash,
        include_prompt=include_prompt,
    ).model_copy(
        update={"dataset_expected_hash": split.expected_hash, "dataset_verified": split.verified}
    )
    if runtime.is_main:
        profile.save(out)
        if plot is not None:
            from emmoe_dist.routing_plots import plot_share_heatmap

            plot_share_heatmap(profile, plot)
    return profile
