"""Steering: change the residual stream along a direction while a model runs.

`steering(model, family, vectors, layers, alpha, mode)` is a context manager of forward hooks
on decoder layers: any in-process forward or `generate` under it is steered, at every
position (prompt and generated tokens alike), and the hooks are removed on exit, error or not.

- `add`: output + alpha * v
- `subtract`: output - alpha * v
- `ablate`: output with its component along v removed (alpha is not used)

`v` is the layer's direction as given (not normalised): alpha = 1 adds the whole
mean difference. `random_like` draws the control: a random direction of the same norm.

`RowSteering` does the same per batch row: each row carries the index of its condition (a
direction, alpha and mode, or none), so one forward, and one generation pass, serves every
condition of a steering study at once. Both kinds of hook are pure tensor work on stored
tensors (`models.hooks.graph_safe`): a CUDA graph captured through them replays them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily
from emmoe_dist.interp.activations import layer_output
from emmoe_dist.metrics import (
    DEFAULT_BOOTSTRAP,
    HEADLINE_RULE,
    Bootstrap,
    Estimate,
    MisalignmentRule,
    summarize,
)
from emmoe_dist.models.anatomy import decoder_layers
from emmoe_dist.models.hooks import ForwardHooks, Hook, graph_safe
from emmoe_dist.records import JudgedRecord

Mode = Literal["add", "subtract", "ablate"]
MODES: tuple[str, ...] = get_args(Mode)


def _per_layer(
    vectors: torch.Tensor | Mapping[int, torch.Tensor], layers: Sequence[int], num_layers: int
) -> dict[int, torch.Tensor]:
    if not layers:
        raise EmmoeError("steering needs at least one layer")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise EmmoeError(f"layer {bad[0]} is out of range: the model has {num_layers} layers")
    if isinstance(vectors, torch.Tensor):
        if vectors.dim() == 1:
            return {i: vectors for i in layers}
        if vectors.dim() == 2 and vectors.shape[0] == num_layers:
            return {i: vectors[i] for i in layers}
        raise EmmoeError(
            f"directions must be [hidden] or [{num_layers} layers, hidden]; got "
            f"{tuple(vectors.shape)}"
        )
    missing = [i for i in layers if i not in vectors]
    if missing:
        raise EmmoeError(f"no direction given for layer {missing[0]}")
    return {i: vectors[i] for i in layers}


def _hook(vector: torch.Tensor, alpha: float, mode: Mode) -> Any:
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def prepared(hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.device, hidden.dtype)
        if key not in cache:
            v = vector.to(hidden.device, torch.float32)
            if mode == "ablate":
                cache[key] = v / v.norm()
            else:
                cache[key] = ((alpha if mode == "add" else -alpha) * v).to(hidden.dtype)
        return cache[key]

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = layer_output(output)
        v = prepared(hidden)
        if mode == "ablate":
            h = hidden.float()
            steered = (h - (h @ v)[..., None] * v).to(hidden.dtype)
        else:
            steered = hidden + v
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return graph_safe(hook)


def _checked(
    model: nn.Module,
    vectors: torch.Tensor | Mapping[int, torch.Tensor],
    layers: Sequence[int],
    num_layers: int,
    mode: str,
) -> dict[int, torch.Tensor]:
    """The direction of each chosen layer, checked against the model and the mode."""
    if mode not in MODES:
        raise EmmoeError(f"unknown steering mode {mode!r}; modes: {', '.join(MODES)}")
    chosen = _per_layer(vectors, layers, num_layers)
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    for i, v in chosen.items():
        if v.dim() != 1 or (hidden and v.shape[0] != hidden):
            raise EmmoeError(
                f"layer {i}: direction of shape {tuple(v.shape)}, the model's hidden size is "
                f"{hidden}"
            )
        if mode == "ablate" and float(v.norm()) == 0.0:
            raise EmmoeError(f"layer {i}: cannot project out a zero direction")
    return chosen


@contextmanager
def steering(
    model: nn.Module,
    family: MoEFamily,
    vectors: torch.Tensor | Mapping[int, torch.Tensor],
    layers: Sequence[int],
    alpha: float,
    mode: Mode = "add",
) -> Iterator[None]:
    """Steer decoder layers `layers` (0-based) while the block runs.

    `vectors` is one [hidden] direction for every layer, a [num_layers, hidden] tensor (a
    direction file's), or a mapping layer -> [hidden].
    """
    blocks = decoder_layers(model, family)
    chosen = _checked(model, vectors, layers, len(blocks), mode)
    with ForwardHooks((blocks[i], _hook(v.detach(), alpha, mode)) for i, v in chosen.items()):
        yield


@dataclass(frozen=True)
class Intervention:
    """One steered condition as the generation path sees it: `tag` is how the records' model
    label names it, `apply(model, family)` the context that changes the model while it answers
    (direction steering here; router steering in `router_steering`)."""

    tag: str
    apply: Callable[[nn.Module, MoEFamily], AbstractContextManager[None]]


def direction_intervention(
    condition: str,
    vectors: torch.Tensor | Mapping[int, torch.Tensor],
    layers: Sequence[int],
    alpha: float,
    mode: Mode = "add",
) -> Intervention:
    """Steering along `vectors` at `layers` and `alpha`, named for the records."""
    where = ",".join(map(str, layers))
    return Intervention(
        tag=f"steer {mode} {condition} alpha={alpha:g} layers={where}",
        apply=lambda model, family: steering(model, family, vectors, layers, alpha, mode),
    )


@dataclass(frozen=True)
class SteerCondition:
    """One steering condition of a `RowSteering`: what `steering` takes, less the layers."""

    vectors: torch.Tensor | Mapping[int, torch.Tensor]
    alpha: float
    mode: Mode = "add"


class RowSteering(ForwardHooks):
    """Context manager of forward hooks that steer each batch row by its own condition.

    `conditions[c]` is a `SteerCondition`, or None for an unsteered row; every condition steers
    the same `layers`. Before each forward the caller names each row's condition with
    `use_rows(tensor of indices, one per row)`; the hooks read that tensor during the forward
    (a CUDA graph captured with it reads its contents at every replay). A row's output is what
    `steering` with its condition gives: `h + a_c` for add and subtract, `h - (h.u_c) u_c` for
    ablate (u_c the unit direction), `h` for None.
    """

    def __init__(
        self,
        model: nn.Module,
        family: MoEFamily,
        conditions: Sequence[SteerCondition | None],
        layers: Sequence[int],
    ) -> None:
        if not conditions:
            raise EmmoeError("row steering needs at least one condition")
        blocks = decoder_layers(model, family)
        per_condition = [
            _checked(model, c.vectors, layers, len(blocks), c.mode) if c is not None else None
            for c in conditions
        ]
        targets = []
        steered = [(c, ch) for c, ch in zip(conditions, per_condition, strict=True) if c and ch]
        for i in layers:
            if not steered:  # every condition unsteered: no hook at all
                break
            weight = next(blocks[i].parameters())
            add = torch.zeros(len(conditions), steered[0][1][i].shape[0], device=weight.device)
            unit = torch.zeros_like(add)
            for c, (cond, chosen) in enumerate(zip(conditions, per_condition, strict=True)):
                if cond is None or chosen is None:
                    continue
                v = chosen[i].to(weight.device, torch.float32)
                if cond.mode == "ablate":
                    unit[c] = v / v.norm()
                else:
                    add[c] = (cond.alpha if cond.mode == "add" else -cond.alpha) * v
            ablates = any(c.mode == "ablate" for c, _ in steered)
            targets.append((blocks[i], self._hook(add.to(weight.dtype), unit if ablates else None)))
        super().__init__(targets)
        self.count = len(conditions)
        self._rows: torch.Tensor | None = None

    def use_rows(self, rows: torch.Tensor) -> None:
        """The condition index of each row of the next forwards (`[batch]` long tensor)."""
        self._rows = rows

    @property
    def rows(self) -> torch.Tensor | None:
        """The tensor given to the last `use_rows` (its first rows name the batch's conditions)."""
        return self._rows

    def _hook(self, add: torch.Tensor, unit: torch.Tensor | None) -> Hook:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._rows is None:
                raise EmmoeError("RowSteering: call use_rows before the forward")
            hidden = layer_output(output)
            rows = self._rows[: hidden.shape[0]].to(hidden.device)
            steered = hidden
            if unit is not None:
                u = unit[rows][:, :, None]  # [batch, hidden, 1]
                h = hidden.float()
                steered = (h - (h @ u) * u.transpose(1, 2)).to(hidden.dtype)
            steered = steered + add[rows][:, None, :]
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return graph_safe(hook)


def random_like(vectors: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random directions with each row's norm (`vectors` [..., hidden]), seeded: the control
    that says whether any push of that size, not this direction, moves the model."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(vectors.shape, generator=generator, dtype=torch.float64)
    noise = noise / noise.norm(dim=-1, keepdim=True)
    return (noise * vectors.double().norm(dim=-1, keepdim=True)).to(vectors.dtype)


@dataclass(frozen=True)
class SteeringPoint:
    """The judged answers of one steering condition at one alpha, summarised."""

    condition: str  # e.g. "direction" or "random" (the same-norm control)
    alpha: float
    n: int  # answers judged
    misaligned: Estimate  # rate under `rule`
    alignment: Estimate  # mean 0-100
    coherence: Estimate
    unscored: Estimate
    rule: str
    questions: int = 0  # the questions those answers answer


def steering_point(
    condition: str,
    alpha: float,
    judged: Sequence[JudgedRecord],
    *,
    rule: MisalignmentRule = HEADLINE_RULE,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> SteeringPoint:
    """One point of the misalignment-vs-alpha curve, with the metrics' bootstrap intervals."""
    metrics = summarize(
        judged,
        label=f"{condition} alpha={alpha:g}",
        bootstrap=bootstrap,
        rules=(rule,),
        headline=rule,
    )
    return SteeringPoint(
        condition=condition,
        alpha=alpha,
        n=metrics.n_alignment,
        misaligned=metrics.misaligned[rule.name],
        alignment=metrics.alignment,
        coherence=metrics.coherence,
        unscored=metrics.unscored,
        rule=rule.description,
        questions=metrics.n_questions,
    )
