"""The misalignment monitor's reading: one forward pass over fixed probes, no generation.

Two signals, each a plain function of the model's weights, so the reading inside training and
the one computed afterwards from a snapshot of the same step agree:
- projection: for each probe prompt (a question rendered as generation renders it), the
  residual stream at its last token after decoder layer l, projected on the unit misalignment
  direction of layer l (`emmoe interp direction`), averaged over the prompts;
- log-probability gap: the mean per-token log-probability of reference misaligned answers
  minus that of reference aligned answers (a pilot run's judged answers to the same questions).
  Each answer's log-probability is averaged over its tokens first, then over the answers.

`reading_sums` returns sums and counts as one float64 vector, so ranks can all-reduce it before
`reading_row` turns it into metrics. Sequences go in right-padded batches with an attention
mask, or, when training attends over packed rows (varlen flash attention needs segment
boundaries), as one packed row per batch with the caller's segment arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emmoe_dist.families import MoEFamily
from emmoe_dist.interp.activations import input_device, layer_output
from emmoe_dist.models.anatomy import base_model, decoder_layers
from emmoe_dist.models.hooks import ForwardHooks, Hook

PROJECTION = "monitor/projection"
GAP = "monitor/logprob_gap"
MISALIGNED_LOGPROB = "monitor/logprob_misaligned"
ALIGNED_LOGPROB = "monitor/logprob_aligned"
HEAD_CHUNK = 1024  # answer tokens per vocabulary projection: bounds the logits' memory


@dataclass(frozen=True)
class Reference:
    """A reference answer: its conversation's tokens, answer tokens in [start, end)."""

    ids: tuple[int, ...]
    start: int
    end: int
    misaligned: bool


@dataclass(frozen=True)
class ProbeSet:
    prompts: tuple[tuple[int, ...], ...]  # probe prompts: the projection at their last token
    references: tuple[Reference, ...]
    layers: tuple[int, ...]  # decoder layers whose output is projected
    directions: torch.Tensor | None  # [len(layers), hidden]: unit misalignment directions

    @property
    def width(self) -> int:
        """Length of the sums vector: per layer the projection sum, the prompt count, then
        misaligned and aligned log-probability sums and counts."""
        return len(self.layers) + 5


def layer_key(layer: int) -> str:
    return f"{PROJECTION}/layer{layer}"


def reading_row(sums: torch.Tensor, probes: ProbeSet) -> dict[str, float]:
    """The metrics of a reading from its (all-reduced) sums."""
    values = sums.double().tolist()
    row: dict[str, float] = {}
    n_prompts = values[len(probes.layers)]
    if probes.directions is not None and n_prompts > 0:
        per_layer = [values[i] / n_prompts for i in range(len(probes.layers))]
        for layer, value in zip(probes.layers, per_layer, strict=True):
            row[layer_key(layer)] = value
        row[PROJECTION] = sum(per_layer) / len(per_layer)
    mis_sum, mis_n, ali_sum, ali_n = values[len(probes.layers) + 1 :]
    if mis_n > 0 and ali_n > 0:
        row[MISALIGNED_LOGPROB] = mis_sum / mis_n
        row[ALIGNED_LOGPROB] = ali_sum / ali_n
        row[GAP] = row[MISALIGNED_LOGPROB] - row[ALIGNED_LOGPROB]
    return row


class _LastTokenTap(ForwardHooks):
    """While open, keeps each chosen layer's output at the given (row, position) pairs."""

    def __init__(self, model: nn.Module, family: MoEFamily, layers: Sequence[int]) -> None:
        super().__init__()
        all_layers = decoder_layers(model, family)
        self._layers = [(all_layers[i], i) for i in layers]
        self.rows: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.kept: dict[int, torch.Tensor] = {}

    def hook_targets(self) -> Iterator[tuple[nn.Module, Hook]]:
        return ((module, self._hook(i)) for module, i in self._layers)

    def _hook(self, index: int) -> Hook:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.rows is None or self.positions is None or not len(self.rows):
                return
            hidden = layer_output(output)
            picked = hidden[self.rows.to(hidden.device), self.positions.to(hidden.device)]
            self.kept[index] = picked.double()

        return hook


@dataclass(frozen=True)
class _Segment:
    ids: tuple[int, ...]
    prompt: bool  # a probe prompt (else a reference answer)
    reference: Reference | None = None


def _segments(probes: ProbeSet) -> list[_Segment]:
    prompts = [_Segment(p, True) for p in probes.prompts] if probes.directions is not None else []
    return prompts + [_Segment(r.ids, False, r) for r in probes.references]


def _batch(
    segments: Sequence[_Segment], packed: bool, pad_id: int
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Model inputs of the segments and where each one starts: (row, offset)."""
    if packed:
        ids = [t for s in segments for t in s.ids]
        pos = [i for s in segments for i in range(len(s.ids))]
        starts, offset = [], 0
        for s in segments:
            starts.append((0, offset))
            offset += len(s.ids)
        return {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([pos]),
        }, starts
    width = max(len(s.ids) for s in segments)
    input_ids = torch.full((len(segments), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(segments), width), dtype=torch.long)
    for row, s in enumerate(segments):
        input_ids[row, : len(s.ids)] = torch.tensor(s.ids)
        mask[row, : len(s.ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}, [(r, 0) for r in range(len(segments))]


@torch.no_grad()
def reading_sums(
    model: nn.Module,
    family: MoEFamily,
    probes: ProbeSet,
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    packed_kwargs: Callable[[torch.Tensor], dict[str, Any]] | None = None,
) -> torch.Tensor:
    """The monitor's sums on `model` (a transformers causal LM, PEFT-wrapped or not, possibly
    partitioned by ZeRO-3: every rank must call this with the same probes). `packed_kwargs`
    (segment arguments from position ids) switches to packed rows."""
    hf = base_model(model)
    decoder = hf.get_submodule(family.layers_path.rsplit(".", 1)[0])
    head = hf.get_submodule("lm_head")
    device = input_device(model)
    sums = torch.zeros(probes.width, dtype=torch.float64)
    units = None if probes.directions is None else probes.directions.double()
    segments = _segments(probes)
    was_training = model.training
    model.eval()  # no router jitter or dropout in a reading
    tap = _LastTokenTap(model, family, probes.layers if units is not None else ())
    try:
        with tap:
            for first in range(0, len(segments), batch_size):
                chunk = segments[first : first + batch_size]
                inputs, starts = _batch(chunk, packed_kwargs is not None, pad_id)
                prompt_at = [
                    (row, offset + len(s.ids) - 1)
                    for s, (row, offset) in zip(chunk, starts, strict=True)
                    if s.prompt
                ]
                tap.rows = torch.tensor([r for r, _ in prompt_at], dtype=torch.long)
                tap.positions = torch.tensor([p for _, p in prompt_at], dtype=torch.long)
                tap.kept.clear()
                extra = {} if packed_kwargs is None else packed_kwargs(inputs["position_ids"])
                hidden = decoder(
                    **{k: v.to(device) for k, v in inputs.items()}, use_cache=False, **extra
                ).last_hidden_state
                if units is not None and prompt_at:
                    for i, layer in enumerate(probes.layers):
                        kept = tap.kept[layer]
                        sums[i] += (kept @ units[i].to(kept.device)).sum().cpu()
                    sums[len(probes.layers)] += len(prompt_at)
                _logprobs(hidden, head, chunk, starts, sums, len(probes.layers) + 1)
    finally:
        model.train(was_training)
    return sums


def _logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    chunk: Sequence[_Segment],
    starts: Sequence[tuple[int, int]],
    sums: torch.Tensor,
    at: int,
) -> None:
    """Add each reference's mean per-token log-probability to its class's sum and count."""
    rows, positions, targets, owner = [], [], [], []
    refs = [(s.reference, start) for s, start in zip(chunk, starts, strict=True) if s.reference]
    for k, (ref, (row, offset)) in enumerate(refs):
        assert ref is not None
        for j in range(ref.start, ref.end):  # token j is predicted at position j - 1
            rows.append(row)
            positions.append(offset + j - 1)
            targets.append(ref.ids[j])
            owner.append(k)
    if not refs:
        return
    picked = hidden[
        torch.tensor(rows, device=hidden.device), torch.tensor(positions, device=hidden.device)
    ]
    token_logprobs = []
    for first in range(0, len(targets), HEAD_CHUNK):
        logits = head(picked[first : first + HEAD_CHUNK]).float()
        wanted = torch.tensor(targets[first : first + HEAD_CHUNK], device=logits.device)
        token_logprobs.append(F.log_softmax(logits, -1).gather(1, wanted[:, None])[:, 0].double())
    per_token = torch.cat(token_logprobs).cpu()
    index = torch.tensor(owner)
    totals = torch.zeros(len(refs), dtype=torch.float64).index_add_(0, index, per_token)
    counts = torch.bincount(index, minlength=len(refs)).double()
    means = totals / counts
    for k, (ref, _) in enumerate(refs):
        assert ref is not None
        slot = at if ref.misaligned else at + 2
        sums[slot] += means[k]
        sums[slot + 1] += 1
