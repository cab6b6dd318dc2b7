"""One MoE layer's experts with per-expert LoRA, as one autograd function with its own backward.

`reference_pass` is the plain PyTorch version: gather the rows of each (token, expert) pair,
grouped GEMMs for the frozen base and for each LoRA factor, autograd for the rest. It is what
the fused pass is tested against, and what runs when a caller asks for it.

`fused_pass` computes the same function, and differs where the profile of a training step
said the time went:
- no host sync: the grouped-GEMM offsets come from a sorted search on the device
  (`torch.bincount` sizes its output from the largest id, which copies it to the host in
  every MoE layer of every pass and drains the GPU queue);
- fewer passes over the `[pairs, width]` activations: each LoRA term is added in place into
  the base GEMM's output, and backward computes the input gradient through base and LoRA with
  the same grouped GEMMs and the factor gradients as grouped GEMMs over the token axis
  (2-D x 2-D with offsets), instead of autograd's separate add, scale and transpose kernels;
- less saved memory: it keeps the layer input (alive anyway), the pre-activation gate/up
  output and the two rank-r intermediates; the gathered rows and the activation are
  recomputed in backward, which is cheap next to the GEMMs;
- deterministic sums: a token's k expert outputs (and its k input-gradient rows) are summed
  in token order, not with atomics (`index_add_` on CUDA adds in arbitrary order).

Factor layouts are the grouped ones: `A [E, in, r']`, `B [E, r', out]`, r' the rank padded
to grouped_mm's 16-byte alignment with zeros (the padding rows never change: their gradient
is zero because the matching factor entries are zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from emmoe_dist.adapters.qlora import NF4Weight

Gate = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Pairs:
    """The (token, expert) pairs of a layer, sorted by expert (stable: token order within).

    `order` and `top_k` describe pairs that are every source row's k choices (one process);
    rows received by expert parallelism carry any number of local pairs each, and leave
    them None (sums then go through `index_add`).
    """

    rows: torch.Tensor  # source row of each pair
    ids: torch.Tensor  # expert of each pair
    offs: torch.Tensor  # int32 [E]: cumulative pairs per expert, grouped_mm's offsets
    order: torch.Tensor | None = None  # position of each pair in the flat [rows * k] layout
    top_k: int | None = None


def sort_pairs(top_k_index: torch.Tensor, num_experts: int) -> Pairs:
    """Pairs grouped by expert, with offsets computed on the device (no host sync)."""
    k = top_k_index.shape[-1]
    ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
    bounds = torch.arange(num_experts, device=ids.device, dtype=ids.dtype)
    offs = torch.searchsorted(ids, bounds, right=True).to(torch.int32)
    return Pairs(rows=order // k, ids=ids, offs=offs, order=order, top_k=k)


@dataclass(frozen=True)
class ExpertWeights:
    """A layer's frozen expert tensors as stored: `[E, out, in]`, or `[E, in, out]` when
    `transposed` (GPT-oss); biases `[E, width]` or None.

    The stored tensors are kept, not dense views of them: an NF4 tensor (QLoRA) is
    dequantized inside each pass that needs it, so no dense copy lives from forward to
    backward.
    """

    gate_up_stored: torch.Tensor
    down_stored: torch.Tensor
    transposed: bool
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def _as_in_out(self, w: torch.Tensor) -> torch.Tensor:
        dense = w.dequantize() if isinstance(w, NF4Weight) else w
        return dense if self.transposed else dense.transpose(-2, -1)

    def gate_up(self) -> torch.Tensor:
        """`[E, in, 2I]`, applied as `x @ w[e]`."""
        return self._as_in_out(self.gate_up_stored)

    def down(self) -> torch.Tensor:
        """`[E, I, out]`, applied as `x @ w[e]`."""
        return self._as_in_out(self.down_stored)


@dataclass(frozen=True)
class LoraFactors:
    """Grouped LoRA factors of one layer: A `[E, in, r']`, B `[E, r', out]` per projection."""

    a1: torch.Tensor
    b1: torch.Tensor
    a2: torch.Tensor
    b2: torch.Tensor
    scaling: float


def _mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x, w, offs=offs)


def _wgrad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert `x_eᵀ · dy_e` over each expert's rows: `[E, x width, dy width]`.

    An expert with no rows gets exact zeros whatever the kernel leaves in its slot.
    """
    out = F.grouped_mm(x.t(), dy, offs=offs)
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    return out * (counts > 0).to(out.dtype).view(-1, 1, 1)


def _combine(y: torch.Tensor, pairs: Pairs, rows: int) -> torch.Tensor:
    """Sum the pair rows of each source row: back to top-k order, then a sum over k
    (deterministic), or an `index_add` when rows hold varying numbers of pairs."""
    if pairs.order is None or pairs.top_k is None:
        return y.new_zeros((rows, y.shape[-1])).index_add_(0, pairs.rows, y)
    flat = y.new_empty(y.shape).index_copy_(0, pairs.order, y)
    return flat.view(rows, pairs.top_k, -1).sum(1)


def _rows_by_expert(t: torch.Tensor, experts: int) -> torch.Tensor:
    """`[rows, E·r']` viewed as `[rows, E, r']`."""
    return t.view(t.shape[0], experts, -1)


class _FusedExpertLora(torch.autograd.Function):
    """Gather, gate/up (+LoRA), activation, down (+LoRA) for pairs sorted by expert.

    The two LoRA factors that touch a source row directly run at the row level, as dense
    GEMMs over all experts' factors side by side, instead of per (row, expert) pair:
    - A of gate/up: `x · [A_0 | A_1 | ... ]` gives every expert's rank-r projection of a row
      in one `[rows, E·r']` GEMM, and each pair picks its expert's r' columns; k times fewer
      rows are read than by a grouped GEMM over the pairs, and in backward the factor and
      input gradients are two dense GEMMs with that scattered layout;
    - B of down: each pair's weighted rank-r activation `w · (h·A2_e)` is scattered into row
      `[rows, E·r']` (a row's experts are distinct, so nothing collides), and one GEMM with
      `[B_0; B_1; ...]` adds every expert's LoRA output of a row at once, where the per-pair
      form writes and re-reads a `[pairs, out]` tensor.
    The extra multiply-adds over the other experts' zero columns are a few percent of the
    expert GEMMs; the bytes saved are several times the LoRA's own.

    Returns the unweighted base output of every pair `[pairs, out]` (the caller weights and
    combines it) and the already-weighted LoRA output of every source row `[rows, out]`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        w_pairs: torch.Tensor,
        a1: torch.Tensor,
        b1: torch.Tensor,
        a2: torch.Tensor,
        b2: torch.Tensor,
        pairs: Pairs,
        weights: ExpertWeights,
        scaling: float,
        gate: Gate,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        offs, n_exp = pairs.offs, a1.shape[0]
        w1 = weights.gate_up()
        dtype = w1.dtype
        xd = x.to(dtype)
        a1_rows = a1.permute(1, 0, 2).reshape(a1.shape[1], -1)  # [in, E·r']
        xa1 = _rows_by_expert(xd @ a1_rows, n_exp)[pairs.rows, pairs.ids]  # [pairs, r']
        g = _mm(xd[pairs.rows], w1, offs)
        del w1
        if weights.gate_up_bias is not None:
            g += weights.gate_up_bias[pairs.ids]
        g.add_(_mm(xa1, b1, offs), alpha=scaling)
        h = gate(g)
        xa2 = _mm(h, a2, offs)
        y = _mm(h, weights.down(), offs)
        if weights.down_bias is not None:
            y += weights.down_bias[pairs.ids]
        z = xa2.new_zeros((x.shape[0], n_exp, xa2.shape[-1]))
        z[pairs.rows, pairs.ids] = xa2 * w_pairs.to(dtype).unsqueeze(-1)
        lora_rows = (z.view(x.shape[0], -1) @ b2.reshape(-1, b2.shape[-1])).mul_(scaling)
        ctx.save_for_backward(x, w_pairs, a1, b1, a2, b2, g, xa1, xa2, z)
        ctx.pairs, ctx.weights, ctx.scaling, ctx.gate = pairs, weights, scaling, gate
        return y, lora_rows

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor, dlora: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, w_pairs, a1, b1, a2, b2, g, xa1, xa2, z = ctx.saved_tensors
        pairs: Pairs = ctx.pairs
        weights: ExpertWeights = ctx.weights
        s: float = ctx.scaling
        offs, n_exp, rows = pairs.offs, a1.shape[0], x.shape[0]
        dy = dy.contiguous().to(g.dtype)
        dlora = dlora.contiguous().to(g.dtype)

        # down's LoRA at the row level: lora_rows = s · z · [B_e], z = w · (h·A2) scattered
        db2 = (z.view(rows, -1).t() @ dlora).mul_(s).view(b2.shape)
        dz = _rows_by_expert(dlora @ b2.reshape(-1, b2.shape[-1]).t(), n_exp)[pairs.rows, pairs.ids]
        dw = (dz.float() * xa2.float()).sum(-1).mul_(s).to(w_pairs.dtype)
        dxa2 = dz.mul_(w_pairs.to(dz.dtype).unsqueeze(-1)).mul_(s)

        # down base and A2: y = h·W2, xa2 = h·A2
        dh = _mm(dy, weights.down().transpose(1, 2), offs)
        dh.add_(_mm(dxa2, a2.transpose(1, 2), offs))
        with torch.enable_grad():
            g_in = g.detach().requires_grad_(True)
            h = ctx.gate(g_in)
            (dg,) = torch.autograd.grad(h, g_in, dh)
        h = h.detach()
        da2 = _wgrad(h, dxa2, offs)
        del h, dh, dxa2, dz

        # gate/up: g = xs·W1 + s·xa1·B1, xa1 = the pair's columns of x·[A_e]
        dxa1 = _mm(dg, b1.transpose(1, 2), offs).mul_(s)
        db1 = _wgrad(xa1, dg, offs).mul_(s)
        dxs = _mm(dg, weights.gate_up().transpose(1, 2), offs)
        del dg
        dxa1_rows = dxa1.new_zeros((rows, n_exp, dxa1.shape[-1]))
        dxa1_rows[pairs.rows, pairs.ids] = dxa1
        dxa1_rows = dxa1_rows.view(rows, -1)
        xd = x.to(g.dtype)
        da1 = (xd.t() @ dxa1_rows).view(a1.shape[1], n_exp, -1).permute(1, 0, 2)

        dx = None
        if ctx.needs_input_grad[0]:
            a1_rows = a1.permute(1, 0, 2).reshape(a1.shape[1], -1)
            dx = _combine(dxs, pairs, rows).add_(dxa1_rows @ a1_rows.t()).to(x.dtype)
        return dx, dw, da1, db1, da2, db2, None, None, None, None


@torch.compiler.disable  # an eager island inside compiled layers (models/compile.py)
def fused_pass(
    x: torch.Tensor,
    pairs: Pairs,
    weights: ExpertWeights,
    lora: LoraFactors,
    gate: Gate,
    w_pairs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unweighted base output of every pair `[pairs, out]`, weighted LoRA output of every
    source row `[rows, out]`); see `_FusedExpertLora`."""
    y, lora_rows = _FusedExpertLora.apply(
        x, w_pairs, lora.a1, lora.b1, lora.a2, lora.b2, pairs, weights, lora.scaling, gate
    )
    return y, lora_rows


def reference_pass(
    x: torch.Tensor,
    pairs: Pairs,
    weights: ExpertWeights,
    lora: LoraFactors,
    gate: Gate,
) -> torch.Tensor:
    """The same function in plain PyTorch, differentiated by autograd."""
    offs = pairs.offs
    w1 = weights.gate_up()
    xs = x[pairs.rows].to(w1.dtype)
    g = _mm(xs, w1, offs)
    if weights.gate_up_bias is not None:
        g = g + weights.gate_up_bias[pairs.ids]
    g = g + lora.scaling * _mm(_mm(xs, lora.a1, offs), lora.b1, offs)
    h = gate(g)
    y = _mm(h, weights.down(), offs)
    if weights.down_bias is not None:
        y = y + weights.down_bias[pairs.ids]
    return y + lora.scaling * _mm(_mm(h, lora.a2, offs), lora.b2, offs)


def weighted_sum(y: torch.Tensor, pairs: Pairs, top_k_weights: torch.Tensor) -> torch.Tensor:
    """`Σ_k w_k · expert_k(x)` per token, from pair outputs sorted by expert.

    Written as a gather back to top-k order, a product and a sum over k: compiled, that is one
    kernel reading each pair's row once (a scatter-then-sum would write every row twice).
    """
    assert pairs.order is not None, "pairs of one process (sort_pairs)"
    tokens, k = top_k_weights.shape
    inverse = torch.empty_like(pairs.order)
    inverse[pairs.order] = torch.arange(pairs.order.numel(), device=inverse.device)
    w = top_k_weights.to(y.dtype).unsqueeze(-1)
    return (y[inverse].view(tokens, k, -1) * w).sum(1)
