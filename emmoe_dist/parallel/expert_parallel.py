"""Expert parallelism: each rank of an EP group holds E/ep experts; tokens travel to them.

What is split, and what is not (docs/expert_parallelism.md has the measurements):

- The frozen fused expert tensors (and GPT-oss's expert biases) are cut to this rank's
  experts and kept as non-persistent buffers. ZeRO-3 partitions, gathers and broadcasts
  parameters only, so these slices never enter its per-layer all-gathers (the gathers that
  fetch every expert of a layer on every rank are what limits ZeRO-3 on MoE models), are
  never averaged as if replicated, and never reach a checkpoint.
- Everything trainable stays a parameter that ZeRO-3 manages exactly as in the non-EP run:
  attention LoRA, the expert LoRA factors of all E experts in PEFT's fused layout (about 1%
  of a layer's expert bytes at rank 8), expert deltas. A rank computes with its local
  experts' rows only, so the gradient it produces is exactly zero elsewhere; ZeRO's
  reduce-scatter sums over all ranks and divides by the world size, which counts every
  token's contribution once and divides by the same number as without EP. The gradient is
  the non-EP gradient with no EP-specific reduction, clipping or optimizer to get wrong, and
  adapters are saved by the ordinary path in the ordinary layout.
- The router runs replicated, exactly as in the HF block (no capacity, no dropping, no
  jitter): the block calls `experts(hidden, top_k_index, top_k_weights)` as always.

One MoE layer's experts (`ExpertDispatcher`): swap per-rank counts with the EP group, send
each token's hidden row once to every rank that owns one of its experts (all-to-all), run
grouped GEMMs over the local experts, weight each output by its routing score and sum a
token's local experts, send one row per token back (all-to-all) and sum per token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from emmoe_dist.adapters.expert_delta import ExpertDelta
from emmoe_dist.adapters.expert_pass import ExpertWeights, LoraFactors, Pairs, fused_pass
from emmoe_dist.adapters.grouped_lora import GroupedLoraExperts
from emmoe_dist.adapters.qlora import NF4Weight
from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import ExpertLayout, MoEFamily, num_experts
from emmoe_dist.models.anatomy import model_config, moe_layers
from emmoe_dist.models.checkpointing import same_in_recompute
from emmoe_dist.parallel.ds_config import ExpertParallelConfig

# ---- layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertParallelLayout:
    """Which ranks exchange tokens and which experts each holds.

    EP groups are runs of `ep_size` consecutive ranks: launchers number the ranks of a node
    consecutively, so an EP group stays inside a node whenever `ep_size` divides the
    ranks per node, and the all-to-all never crosses the slower inter-node links.
    """

    world_size: int
    rank: int
    ep_size: int
    num_experts: int
    local_world_size: int  # ranks per node

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    def experts_of(self, ep_rank: int) -> range:
        n = self.experts_per_rank
        return range(ep_rank * n, (ep_rank + 1) * n)

    @property
    def local_experts(self) -> range:
        return self.experts_of(self.ep_rank)

    def ep_groups(self) -> list[list[int]]:
        p = self.ep_size
        return [list(range(g * p, (g + 1) * p)) for g in range(self.world_size // p)]

    def replica_groups(self) -> list[list[int]]:
        """Ranks holding the same experts (one per EP group)."""
        return [list(range(i, self.world_size, self.ep_size)) for i in range(self.ep_size)]

    @property
    def within_node(self) -> bool:
        return self.local_world_size % self.ep_size == 0

    def describe(self, moe_layers: int) -> str:
        held = [self.experts_of(i) for i in range(self.ep_size)]
        holdings = "; ".join(
            f"experts {r.start}-{r.stop - 1} on ranks {ranks}"
            for r, ranks in zip(held, self.replica_groups(), strict=True)
        )
        where = (
            "inside a node"
            if self.within_node
            else f"ACROSS nodes ({self.local_world_size} ranks per node)"
        )
        return (
            f"[emmoe] expert parallel: ep_size {self.ep_size} of {self.world_size} ranks, "
            f"{self.num_experts} experts in each of {moe_layers} MoE layers; all-to-all groups "
            f"{self.ep_groups()} ({where}); {holdings}; dense weights and every trainable "
            f"tensor: ZeRO over all {self.world_size} ranks"
        )


def plan_expert_parallel(
    config: ExpertParallelConfig,
    *,
    num_experts: int,
    world_size: int,
    rank: int,
    local_world_size: int,
) -> ExpertParallelLayout:
    """The layout for `config`, or an error naming the config file when it cannot be built."""
    p = config.resolve(num_experts=num_experts, local_world_size=local_world_size)
    if world_size % p:
        raise config.error(
            f"{p} does not divide the world size {world_size}: every EP group needs {p} ranks"
        )
    if num_experts % p:
        raise config.error(
            f"{p} does not divide the {num_experts} experts of each MoE layer: every rank of an "
            f"EP group must hold the same number of experts"
        )
    return ExpertParallelLayout(
        world_size=world_size,
        rank=rank,
        ep_size=p,
        num_experts=num_experts,
        local_world_size=local_world_size,
    )


def ep_process_group(layout: ExpertParallelLayout) -> Any:
    """This rank's all-to-all group. Every rank creates every group, in the same order
    (`new_group` is collective); a group of its own keeps the all-to-alls off the
    communicator ZeRO uses for its gathers."""
    mine = None
    for ranks in layout.ep_groups():
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            mine = group
    return mine


def local_world_size(world_size: int) -> int:
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return world_size


# ---- moving tokens --------------------------------------------------------------------------


def _exchange(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` whose backward sends the gradients home by the reverse exchange.

    Written here because `torch.distributed.nn.functional.all_to_all_single` (which does the
    same on gloo and nccl) is deprecated in torch 2.13 in favour of a private module.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
) -> torch.Tensor:
    """Send rows `x[sum(in_splits[:i]) : ...]` to rank i of `group`; differentiable."""
    out: torch.Tensor = _AllToAll.apply(x, out_splits, in_splits, group)
    return out


def _histogram(
    values: torch.Tensor, bins: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Counts (or summed integer `weights`) of 0..bins-1 without a host sync (`bincount`
    sizes its output on the host)."""
    ones = torch.ones_like(values) if weights is None else weights
    return torch.zeros(bins, dtype=torch.long, device=values.device).index_add_(0, values, ones)


@dataclass(frozen=True)
class Routed:
    """What `dispatch` sent where, so that `combine` can bring the results back."""

    tokens: torch.Tensor  # source token of each sent row (rows grouped by destination rank)
    sent: list[int]  # rows sent to each rank of the EP group
    received: list[int]  # rows received from each rank
    pair_rows: torch.Tensor  # received row of each local (token, expert) pair
    offs: torch.Tensor  # int32 cumulative pairs per local expert (grouped_mm offsets)
    local_ids: torch.Tensor  # local expert of each pair, pairs in local-expert order
    weights: torch.Tensor  # routing weight of each pair


class ExpertDispatcher:
    """Sends tokens to the ranks owning their experts and brings the results back.

    A token goes to a rank once, however many of its top-k experts live there (top-8 of
    128 over 2 ranks: 2 rows sent instead of 8), with the (row, local expert, weight) of
    each of its pairs; the owner multiplies each expert's output by its routing weight and
    sums a token's local experts before sending one row back, so the return trip carries
    one row per (token, rank) too. The sums are HF's `sum_k w_k · expert_k(x)`, split by rank.
    """

    def __init__(self, layout: ExpertParallelLayout, group: Any) -> None:
        self.layout = layout
        self.group = group

    def dispatch(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> tuple[torch.Tensor, Routed]:
        """The rows received from every rank of the group; `Routed.pair_rows` lists the row of
        each local (token, expert) pair, grouped by local expert."""
        p, n_local = self.layout.ep_size, self.layout.experts_per_rank
        k = top_k_index.shape[-1]
        experts = top_k_index.reshape(-1)
        dest = experts // n_local
        # Pairs by destination rank, then token: a token's pairs for one rank are adjacent.
        dest, order = torch.sort(dest, stable=True)
        token = order // k
        first = torch.ones_like(dest, dtype=torch.bool)
        first[1:] = (dest[1:] != dest[:-1]) | (token[1:] != token[:-1])
        row = torch.cumsum(first, 0) - 1  # sent row of each pair
        # Rows per rank count each token's first pair there: a weighted histogram, since
        # `dest[first]` (boolean indexing) would copy its length to the host.
        rows_to = _histogram(dest, p, weights=first.long())
        counts = torch.stack([rows_to, _histogram(dest, p)], 1)
        got = _exchange(counts, [1] * p, [1] * p, self.group)  # [source, (rows, pairs)]
        # The one host sync of a dispatch: all_to_all_single takes its split sizes as ints.
        # A checkpointed layer's recomputation reuses the sizes its forward read.
        sizes: list[list[int]] = same_in_recompute(lambda: torch.cat([counts.T, got.T]).tolist())
        sent, sent_pairs, received, received_pairs = sizes
        # The source token of each sent row, scattered by row (a row's pairs share one token),
        # with the row count now known on the host: `token[first]` would sync again.
        tokens = token.new_empty(sum(sent)).index_put_((row,), token)
        x = all_to_all(hidden[tokens], received, sent, self.group)

        # Each pair's row index counts from the start of its destination's rows; the owner
        # adds the offset of the source's rows among everything it received.
        row_start = torch.cumsum(counts[:, 0], 0) - counts[:, 0]
        meta = torch.stack([row - row_start[dest], experts[order] - dest * n_local], 1)
        meta = _exchange(meta, received_pairs, sent_pairs, self.group)
        weights = all_to_all(
            top_k_weights.reshape(-1, 1)[order], received_pairs, sent_pairs, self.group
        )
        source_start = torch.cumsum(got[:, 0], 0) - got[:, 0]
        source = torch.repeat_interleave(
            torch.arange(p, device=hidden.device), got[:, 1], output_size=meta.shape[0]
        )
        local_ids, by_expert = torch.sort(meta[:, 1], stable=True)
        pair_rows = (meta[:, 0] + source_start[source])[by_expert]
        bounds = torch.arange(n_local, device=local_ids.device, dtype=local_ids.dtype)
        offs = torch.searchsorted(local_ids, bounds, right=True).to(torch.int32)
        routed = Routed(tokens, sent, received, pair_rows, offs, local_ids, weights[by_expert])
        return x, routed

    def combine(
        self,
        y: torch.Tensor,
        routed: Routed,
        hidden: torch.Tensor,
        row_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted expert outputs summed per received row (plus `row_extra`, a weighted term
        already per received row), sent home, summed per token."""
        y = y * routed.weights.to(y.dtype)
        rows = y.new_zeros((sum(routed.received), y.shape[-1])).index_add(0, routed.pair_rows, y)
        if row_extra is not None:
            rows = rows + row_extra.to(rows.dtype)
        back = all_to_all(rows, routed.sent, routed.received, self.group)
        return torch.zeros_like(hidden).index_add_(0, routed.tokens, back.to(hidden.dtype))


# ---- the local experts ----------------------------------------------------------------------


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`x [N, in]` times `w [G, in, out]` per group of rows.

    A rank that received no rows still takes part: a zero-row matmul stands in for grouped_mm
    (no kernel sees an empty input) and keeps the graph, and with it the reverse all-to-all
    that every rank of the group must join in backward.
    """
    if x.shape[0] == 0:
        return x @ w[0]
    return F.grouped_mm(x, w, offs=offs)


def _tensor_names(layout: ExpertLayout) -> tuple[str, ...]:
    return (layout.gate_up, layout.down, *layout.biases)


class _LocalExperts(nn.Module):
    """Forward shared by the three expert-parallel modules: dispatch, local experts, combine.

    `base_layer` is the family's own experts module cut to the local experts; its
    `_apply_gate` is the family's activation (GPT-oss: clamped SwiGLU on interleaved
    gate/up), so the local computation is the one transformers' grouped_mm path performs.
    """

    base_layer: nn.Module
    dispatcher: ExpertDispatcher
    expert_layout: ExpertLayout
    lora_scaling: float = 1.0

    def _adopt(
        self, adapter: nn.Module, shard: nn.Module, family: MoEFamily, dispatcher: ExpertDispatcher
    ) -> None:
        """Become `adapter` (its factors or deltas, see `_take_over`) over the local `shard`."""
        nn.Module.__init__(self)
        _take_over(self, adapter)
        self.base_layer = shard
        self.expert_layout = family.layout
        self.dispatcher = dispatcher

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's expert tensors (and biases) as the forward uses them."""
        return {n: getattr(self.base_layer, n) for n in _tensor_names(self.expert_layout)}

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        x, routed = self.dispatcher.dispatch(hidden_states, top_k_index, top_k_weights)
        tensors = self.local_tensors()
        lay = self.expert_layout
        w = tensors[lay.gate_up]
        lora = self.local_lora(w.dtype)
        if lora is not None and x.shape[0] > 0:
            # The local experts through the same fused pass as one process (expert_pass.py):
            # received rows are the sources, their local pairs are grouped by expert.
            weights = ExpertWeights(
                gate_up_stored=w,
                down_stored=tensors[lay.down],
                transposed=lay.transposed,
                gate_up_bias=tensors[lay.biases[0]] if lay.biases else None,
                down_bias=tensors[lay.biases[1]] if lay.biases else None,
            )
            pairs = Pairs(rows=routed.pair_rows, ids=routed.local_ids, offs=routed.offs)
            gate: Any = self.base_layer._apply_gate
            y, lora_rows = fused_pass(x, pairs, weights, lora, gate, routed.weights.reshape(-1))
            return self.dispatcher.combine(y, routed, hidden_states, lora_rows)
        xs = x[routed.pair_rows]
        h = self._local_project(xs, 0, tensors, routed, lora)
        apply_gate: Any = self.base_layer._apply_gate
        h = apply_gate(h)
        y = self._local_project(h, 1, tensors, routed, lora)
        return self.dispatcher.combine(y, routed, hidden_states)

    def local_lora(self, dtype: torch.dtype) -> LoraFactors | None:
        """Grouped factors of the local experts, if this module has an expert adapter."""
        return None

    def _local_project(
        self,
        x: torch.Tensor,
        which: int,
        tensors: Mapping[str, torch.Tensor],
        routed: Routed,
        lora: LoraFactors | None,
    ) -> torch.Tensor:
        lay = self.expert_layout
        name = (lay.gate_up, lay.down)[which]
        w = tensors[name]
        x = x.to(w.dtype)
        out = _grouped_mm(x, w if lay.transposed else w.transpose(-2, -1), routed.offs)
        if lay.biases:
            out = out + tensors[lay.biases[which]][routed.local_ids]
        if lora is not None:
            a, b = (lora.a1, lora.b1) if which == 0 else (lora.a2, lora.b2)
            out = out + lora.scaling * _grouped_mm(_grouped_mm(x, a, routed.offs), b, routed.offs)
        return out


def _take_over(new: nn.Module, old: nn.Module) -> None:
    """Give `new` the settings, submodules, parameters and buffers of `old` (the same objects).

    The expert-parallel modules subclass the adapter modules so that everything that finds
    adapters by type (state-dict export, selection masks, merges) keeps working, and they sit
    at the adapter's path, so saved keys are the non-EP keys. They adopt the adapter instead of
    running its constructor, which would create (and draw random numbers for) new factors.
    """
    persistent = old.state_dict(keep_vars=True).keys()
    for key, value in vars(old).items():
        if not key.startswith("_") and key != "training":
            setattr(new, key, value)
    for name, child in old.named_children():
        setattr(new, name, child)
    for name, param in old.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buf in old.named_buffers(recurse=False):
        new.register_buffer(name, buf, persistent=name in persistent)
    new.train(old.training)


class ExpertParallelExperts(_LocalExperts):
    """Local experts without an expert adapter (LoRA on attention only)."""

    def __init__(self, shard: nn.Module, family: MoEFamily, dispatcher: ExpertDispatcher) -> None:
        super().__init__()
        self.base_layer = shard
        self.expert_layout = family.layout
        self.dispatcher = dispatcher


class ExpertParallelLora(_LocalExperts, GroupedLoraExperts):
    """`GroupedLoraExperts` whose base holds the local experts only.

    The factors stay those of all E experts, in PEFT's fused layout, as ZeRO-3 parameters
    (module docstring); each forward uses the local experts' rows of them.
    """

    def __init__(
        self,
        adapter: GroupedLoraExperts,
        shard: nn.Module,
        family: MoEFamily,
        dispatcher: ExpertDispatcher,
    ) -> None:
        self._adopt(adapter, shard, family, dispatcher)
        self.lora_scaling = adapter.scaling

    def local_lora(self, dtype: torch.dtype) -> LoraFactors:
        return self.grouped_lora(dtype, self.dispatcher.layout.local_experts)


class ExpertParallelDelta(_LocalExperts, ExpertDelta):
    """`ExpertDelta` (full fine-tune of chosen experts) over the local experts.

    The deltas of all chosen experts stay ZeRO-3 parameters; a rank adds the rows of the
    chosen experts it holds and leaves the others' gradient at zero.
    """

    delta_rows: torch.Tensor  # positions in `expert_ids` of the chosen experts held here
    delta_local_ids: torch.Tensor  # their local expert ids

    def __init__(
        self,
        adapter: ExpertDelta,
        shard: nn.Module,
        family: MoEFamily,
        dispatcher: ExpertDispatcher,
    ) -> None:
        self._adopt(adapter, shard, family, dispatcher)
        local = dispatcher.layout.local_experts
        ids: list[int] = adapter.get_buffer("expert_ids").tolist()
        rows = [i for i, e in enumerate(ids) if e in local]
        self.register_buffer("delta_rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.register_buffer(
            "delta_local_ids",
            torch.tensor([ids[i] - local.start for i in rows], dtype=torch.long),
            persistent=False,
        )

    def local_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().local_tensors()
        if self.delta_rows.numel():
            for name in self.names:
                w = tensors[name]
                delta = self.deltas[name][self.delta_rows].to(w.dtype)
                tensors[name] = w.index_add(0, self.delta_local_ids, delta)
        return tensors


# ---- applying it ----------------------------------------------------------------------------


def _expert_rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of a fused expert tensor as a new tensor (the full one can be freed).

    An NF4 tensor is cut on its packed codes and scales, so the local experts keep exactly
    the quantized values they had; that needs every expert to span whole blocks.
    """
    if isinstance(t, NF4Weight):
        per = t.numel() // t.shape[0]
        if per % t.blocksize:
            raise EmmoeError(
                f"an NF4 expert of {per} elements spans partial blocks of {t.blocksize}; "
                f"cannot split its experts over ranks"
            )
        lo, hi = start * per, stop * per
        return NF4Weight(
            t.packed[lo // 2 : hi // 2].clone(),
            t.absmax[lo // t.blocksize : hi // t.blocksize].clone(),
            (stop - start, *t.shape[1:]),
            t.dtype,
            t.blocksize,
        )
    return t.detach()[start:stop].clone()


def shard_experts(experts: nn.Module, family: MoEFamily, layout: ExpertParallelLayout) -> nn.Module:
    """Cut a family's fused experts module to this rank's experts, in place.

    The slices become non-persistent buffers: invisible to ZeRO (module docstring) and to
    checkpoints, which hold trainable state only; a resumed run re-cuts them from its base.
    """
    local = layout.local_experts
    for name in _tensor_names(family.layout):
        full = getattr(experts, name)
        if hasattr(full, "ds_shape"):
            raise EmmoeError(
                "expert parallelism must be applied before DeepSpeed partitions the model"
            )
        if full.shape[0] != layout.num_experts:
            raise EmmoeError(
                f"{family.experts_path}.{name} has {full.shape[0]} experts, expected "
                f"{layout.num_experts}; was it sharded already?"
            )
        sliced = _expert_rows(full, local.start, local.stop)
        delattr(experts, name)
        experts.register_buffer(name, sliced, persistent=False)
    setattr(experts, "num_experts", len(local))  # noqa: B010 (a module attribute, not a tensor)
    return experts


def apply_expert_parallel(
    model: nn.Module, family: MoEFamily, config: ExpertParallelConfig
) -> ExpertParallelLayout:
    """Split every MoE layer's experts over EP groups of `config.ep_size` ranks, in place.

    Runs after the adapters (it adopts their expert modules and factors) and before
    DeepSpeed (ZeRO-3 must never see the rank-local slices as parameters). Every rank calls
    it; rank 0 prints the process-group layout.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    layout = plan_expert_parallel(
        config,
        num_experts=num_experts(family, model_config(model)),
        world_size=world,
        rank=rank,
        local_world_size=local_world_size(world),
    )
    layers = moe_layers(model, family)
    if rank == 0:
        print(layout.describe(len(layers)), flush=True)
    if layout.ep_size == 1:
        return layout
    dispatcher = ExpertDispatcher(layout, ep_process_group(layout))
    for layer in layers:
        current = getattr(layer.block, family.experts)
        shard = shard_experts(layer.experts, family, layout)
        module: nn.Module
        if isinstance(current, GroupedLoraExperts):
            module = ExpertParallelLora(current, shard, family, dispatcher)
        elif isinstance(current, ExpertDelta):
            module = ExpertParallelDelta(current, shard, family, dispatcher)
        elif current is layer.experts:
            module = ExpertParallelExperts(shard, family, dispatcher)
        else:
            raise EmmoeError(
                f"layer {layer.index}: cannot split experts wrapped in {type(current).__name__}"
            )
        setattr(layer.block, family.experts, module)
    return layout
