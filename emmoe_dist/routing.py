"""Routing profiler: count which experts each MoE layer's router picks, on chosen tokens.

Every family's router module returns `(logits, scores, indices)` for the flattened
`[batch * seq, hidden]` input, where `scores[t]` are the top-k weights aligned with
`indices[t]`; a forward hook on the router reads the last two. The caller says, per batch,
which token positions count (`RoutingCounter.set_mask`): by default only assistant tokens,
never padding.

Layer 1: one process. Summing counts over ranks is the workflow's job (`emmoe_dist.profiling`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertProfile, LayerRouting
from emmoe_dist.families import MoEFamily, num_experts, top_k
from emmoe_dist.models.anatomy import model_config, moe_layers
from emmoe_dist.models.hooks import ForwardHooks, Hook

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RoutingCounts:
    """Per MoE layer (rows, in `layers` order) and expert (columns): top-k choices and gate sums."""

    layers: tuple[int, ...]
    token_counts: torch.Tensor  # [L, E] int64
    gate_sums: torch.Tensor  # [L, E] float64
    top_k: int

    @property
    def tokens(self) -> int:
        """Tokens counted: each made exactly `top_k` choices in every layer."""
        return int(self.token_counts[0].sum()) // self.top_k if self.layers else 0

    def to_profile(
        self, *, model: str, family: str, dataset: str, dataset_hash: str, include_prompt: bool
    ) -> ExpertProfile:
        counts = self.token_counts.tolist()
        gates = self.gate_sums.tolist()
        return ExpertProfile(
            model=model,
            family=family,
            dataset=dataset,
            dataset_hash=dataset_hash,
            tokens=self.tokens,
            top_k=self.top_k,
            num_experts=int(self.token_counts.shape[1]),
            include_prompt=include_prompt,
            layers=tuple(
                LayerRouting(layer=i, token_counts=tuple(c), gate_sums=tuple(g))
                for i, c, g in zip(self.layers, counts, gates, strict=True)
            ),
        )


class RoutingCounter(ForwardHooks):
    """Context manager: while open, every router call adds the masked tokens' choices.

    Accumulators stay on each router's device (no host sync per layer) until `counts()`.
    """

    def __init__(self, model: nn.Module, family: MoEFamily) -> None:
        config = model_config(model)
        self._layers = moe_layers(model, family)
        self._num_experts = num_experts(family, config)
        self._top_k = top_k(family, config)
        self._mask: torch.Tensor | None = None
        self._counts: dict[int, torch.Tensor] = {}
        self._gates: dict[int, torch.Tensor] = {}
        super().__init__()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Token positions that count in the next forward ([batch, seq] bool); None counts all."""
        self._mask = None if mask is None else mask.reshape(-1).bool()

    def hook_targets(self) -> Iterator[tuple[nn.Module, Hook]]:
        return ((layer.router, self._hook(layer.index)) for layer in self._layers)

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> None:
            _, scores, indices = output
            if self._mask is not None:
                if self._mask.numel() != indices.shape[0]:
                    raise EmmoeError(
                        f"layer {index}: the router saw {indices.shape[0]} tokens but the mask "
                        f"has {self._mask.numel()}; set a [batch, seq] mask for each batch"
                    )
                mask = self._mask.to(indices.device)
                indices, scores = indices[mask], scores[mask]
            if index not in self._counts:
                shape, dev = (self._num_experts,), indices.device
                self._counts[index] = torch.zeros(shape, dtype=torch.int64, device=dev)
                self._gates[index] = torch.zeros(shape, dtype=torch.float64, device=dev)
            flat = indices.reshape(-1)
            self._counts[index] += torch.bincount(flat, minlength=self._num_experts)
            self._gates[index].index_add_(0, flat, scores.reshape(-1).to(torch.float64))

        return hook

    def counts(self) -> RoutingCounts:
        """What was counted so far, on the CPU (zeros for a layer that never ran)."""
        shape = (len(self._layers), self._num_experts)
        token_counts = torch.zeros(shape, dtype=torch.int64)
        gate_sums = torch.zeros(shape, dtype=torch.float64)
        for row, layer in enumerate(self._layers):
            if layer.index in self._counts:
                token_counts[row] = self._counts[layer.index].cpu()
                gate_sums[row] = self._gates[layer.index].cpu()
        return RoutingCounts(
            layers=tuple(layer.index for layer in self._layers),
            token_counts=token_counts,
            gate_sums=gate_sums,
            top_k=self._top_k,
        )


def token_mask(batch: Mapping[str, torch.Tensor], include_prompt: bool = False) -> torch.Tensor:
    """Positions whose routing counts: assistant tokens (labels kept), or every real token.

    Labels sit on the token they label (transformers shifts them inside the loss), so position t
    counts when token t is an assistant token; the router at t is the one processing that token.
    """
    real = batch["attention_mask"].bool()
    if include_prompt:
        return real
    return real & (batch["labels"] != IGNORE_INDEX)


def _input_device(model: nn.Module) -> torch.device:
    # Under device_map="auto" layers sit on several GPUs; inputs go where the embeddings are.
    embeddings = cast(Callable[[], nn.Module], model.get_input_embeddings)()
    return next(embeddings.parameters()).device


@torch.inference_mode()
def profile_batches(
    model: nn.Module,
    family: MoEFamily,
    batches: Iterable[Mapping[str, torch.Tensor]],
    include_prompt: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> RoutingCounts:
    """Run `model` over padded batches (`input_ids`, `attention_mask`, `labels`) and count.

    `total` is the number of batches, for the progress bar when `batches` is a generator.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()  # jitter noise (Mixtral) and dropout would perturb the routing
    device = _input_device(model)
    try:
        with RoutingCounter(model, family) as counter:
            for batch in tqdm(
                batches, total=total, desc="profile", unit="batch", disable=not progress
            ):
                counter.set_mask(token_mask(batch, include_prompt))
                # logits_to_keep=1: the vocabulary projection is not needed, only the routers.
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                    logits_to_keep=1,
                )
            return counter.counts()
    finally:
        model.train(was_training)
