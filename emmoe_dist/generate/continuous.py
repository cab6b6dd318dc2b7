"""The transformers backend's fast path: continuous batching over KV slots, one CUDA graph per
decode step.

A fixed number of slots (`batch_size`) decode together; a sample that stops frees its slot,
which the next waiting sample takes at once instead of waiting for the whole batch to end.
Each prompt is prefilled once for all its samples (and steering condition): its keys and
values are copied into every slot that starts from it, and its last logits give each sample
its first token. A decode step is one forward of `[slots, 1]` tokens at each slot's own
position, through `slot_attention`, plus the seeded draw, all on the device; on CUDA it is
captured once per `generate` call as a CUDA graph and replayed, so a step costs one launch
instead of thousands. The MoE experts run through the model's own experts implementation:
`grouped_mm` reads each routed expert once per step, where `generate`'s decode-time switch to
`batched_mm` copies one expert's weights per routed token.

What the records promise holds as on the `generate` path (`transformers_backend.py`):

- seeds: a sample's token t is drawn with `seeded_sampling.draw_tokens` from the hash of
  (its seed, t), whatever slot it runs in or whoever shares the step: the same seeds as every
  other backend row for row, so models compared on the same questions share their noise;
- stop rules: the same stop ids; `min_new_tokens` masks them until that many tokens exist;
- a killed run resumed draws the missing samples alone and gets the same tokens (up to
  floating-point differences between batch shapes, which on GPU can flip a near-tie);
- forward hooks see every forward: `[1, T]` prefills and `[slots, 1]` decode steps (rows of
  idle slots included: `active` says which rows hold a sample). A hook that is not marked
  graph-safe (`models.hooks.graph_safe`) turns CUDA graphs off for the call, since a Python
  hook runs once at capture and never on replay. Steering hooks are graph-safe;
  `interp.steering.RowSteering` steers each row by its sample's condition, so one pass
  generates every condition of a steering study.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from emmoe_dist.errors import EmmoeError
from emmoe_dist.generate.interface import RawSample, SampleRequest, SamplingOptions
from emmoe_dist.generate.prompts import stop_token_ids
from emmoe_dist.generate.seeded_sampling import draw_tokens
from emmoe_dist.generate.slot_attention import SLOT_KWARG, SlotKV, slot_attention_enabled
from emmoe_dist.models.hooks import hooks_replay_safely

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from emmoe_dist.interp.steering import RowSteering

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """The waiting samples of one prompt under one steering condition, and its prefill."""

    prompt: tuple[int, ...]
    condition: int
    requests: deque[SampleRequest]
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    logits: torch.Tensor | None = None  # [vocab] at the prompt's last position


@dataclass
class _Sample:
    request: SampleRequest
    tokens: list[int] = field(default_factory=list)
    top: list[tuple[tuple[str, float], ...]] = field(default_factory=list)


class ContinuousGenerator:
    """A `Generator` (interface.py) on one in-process model (module docstring)."""

    backend = "transformers"
    per_request_adapters = False

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 16,
        steering: RowSteering | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.steering = steering
        self.cuda_graphs = cuda_graphs  # None: on CUDA unless a hook forbids it
        self.device = next(model.get_input_embeddings().parameters()).device
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.graphed = False  # whether the last `generate` call replayed a CUDA graph
        self.per_request_steering = steering is not None

    def generate(
        self, requests: Sequence[SampleRequest], options: SamplingOptions
    ) -> Iterator[list[RawSample]]:
        if any(r.adapter is not None for r in requests):
            raise EmmoeError(
                "the transformers backend applies one adapter, merged at load time; "
                "per-request adapters need the vLLM backend"
            )
        conditions = self.steering.count if self.steering is not None else 1
        bad = [r.condition for r in requests if not 0 <= r.condition < conditions]
        if bad:
            raise EmmoeError(
                f"steering condition {bad[0]} requested; this generator has {conditions}"
            )
        if not requests:
            return
        with slot_attention_enabled(self.model):
            yield from _Run(self, requests, options).samples()

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Run:
    """One `generate` call: the slots, their device state and the waiting groups."""

    def __init__(
        self, gen: ContinuousGenerator, requests: Sequence[SampleRequest], options: SamplingOptions
    ) -> None:
        self.gen, self.options = gen, options
        model, device = gen.model, gen.device
        cfg = model.config.get_text_config()
        slots = min(gen.batch_size, len(requests))  # no slot that no sample would use
        self.slots = slots
        self.length = max(len(r.prompt_ids) for r in requests) + options.max_new_tokens
        layers = _attention_layers(model)
        self.kv = SlotKV(
            [next(a.parameters()).device for a in layers],
            slots=slots,
            length=self.length,
            kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            dtype=model.dtype,
        )
        # per-slot device state, updated in place by each step (and by admissions between steps)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)
        self.rows = torch.zeros(slots, dtype=torch.long, device=device)  # steering conditions
        self.picked = torch.zeros(slots, dtype=torch.long, device=device)
        k = options.top_logprobs
        self.top_values = torch.zeros(slots, max(k, 1), device=device)
        self.top_ids = torch.zeros(slots, max(k, 1), dtype=torch.long, device=device)
        self.stop_index = torch.tensor(sorted(gen.stop_ids), dtype=torch.long, device=device)
        self.active: list[_Sample | None] = [None] * slots
        self.groups = _groups(requests)
        self.graph: Any = None
        size = sum(k.numel() * k.element_size() for k in self.kv.keys) * 2
        log.info("KV slots: %d x %d positions, %.2f GiB", slots, self.length, size / 2**30)

    # -- the device side ------------------------------------------------------------------------

    def _draw(
        self, logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Each row's token at its step (and the raw top-k log-probabilities when asked), after
        masking the stop ids of rows that have not reached `min_new_tokens`."""
        o = self.options
        if o.min_new_tokens:
            early = (steps < o.min_new_tokens)[:, None]
            blocked = torch.where(early, float("-inf"), logits[:, self.stop_index])
            logits[:, self.stop_index] = blocked
        values = ids = None
        if o.top_logprobs:
            top = torch.log_softmax(logits, dim=-1).topk(o.top_logprobs, dim=-1)
            values, ids = top.values, top.indices
        picked = draw_tokens(logits, seeds, steps, temperature=o.temperature, top_p=o.top_p)
        return picked, values, ids

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.gen.model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=1,
            **{SLOT_KWARG: self.kv},
        )
        return out.logits[:, -1].float()

    def _decode_step(self) -> None:
        """One token for every slot, drawn and fed back in place: what the CUDA graph holds."""
        self.kv.begin_decode()
        if self.gen.steering is not None:
            self.gen.steering.use_rows(self.rows)
        logits = self._forward(self.tokens[:, None], self.kv.positions[:, None])
        picked, values, ids = self._draw(logits, self.seeds, self.steps)
        self.picked.copy_(picked)
        if values is not None and ids is not None:
            self.top_values.copy_(values)
            self.top_ids.copy_(ids)
        self.tokens.copy_(picked)
        # idle slots advance too; the clamp keeps their writes inside the cache
        self.kv.positions.add_(1).clamp_(max=self.length - 1)
        self.steps.add_(1)

    def _capture(self) -> None:
        """Record `_decode_step` as a CUDA graph (every slot idle); eager if capture fails."""
        stream = torch.cuda.Stream(self.gen.device)
        stream.wait_stream(torch.cuda.current_stream(self.gen.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):  # lazy initialisations happen outside the capture
                    self._decode_step()
            torch.cuda.current_stream(self.gen.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_step()
            self.graph = graph
        except Exception as e:  # an op that cannot be captured: run every step eagerly
            log.warning("CUDA graph capture failed, decoding eagerly: %s", e)
            torch.cuda.synchronize(self.gen.device)
            self.graph = None
        for state in (self.tokens, self.steps, self.kv.positions):
            state.zero_()

    # -- the host side --------------------------------------------------------------------------

    def _wants_graph(self) -> bool:
        gen = self.gen
        if gen.device.type != "cuda" or gen.cuda_graphs is False:
            return False
        if any(p.device != gen.device for p in gen.model.parameters()):
            log.info("the model spans several devices: decoding without CUDA graphs")
            return False
        if not hooks_replay_safely(gen.model):
            if gen.cuda_graphs:
                raise EmmoeError("cuda_graphs=True, but a forward hook is not graph-safe")
            log.info("a forward hook is not graph-safe: decoding without CUDA graphs")
            return False
        return True

    @torch.inference_mode()
    def _prefill(self, group: _Group) -> None:
        self.kv.begin_prefill()
        if self.gen.steering is not None:
            self.gen.steering.use_rows(torch.full_like(self.rows[:1], group.condition))
        ids = torch.tensor([group.prompt], device=self.gen.device)
        positions = torch.arange(len(group.prompt), device=self.gen.device)[None]
        group.logits = self._forward(ids, positions)[0]
        group.prefix, self.kv.prefix = self.kv.prefix, {}

    @torch.inference_mode()
    def _admit(self, finished: list[RawSample]) -> None:
        """Fill free slots with waiting samples, each group's prompt prefilled once."""
        free = [s for s, sample in enumerate(self.active) if sample is None]
        while free and self.groups:
            group = self.groups[0]
            if group.prefix is None:
                self._prefill(group)
            assert group.prefix is not None and group.logits is not None
            n = min(len(free), len(group.requests))
            taken = [group.requests.popleft() for _ in range(n)]
            where, free = free[:n], free[n:]
            index = torch.tensor(where, device=self.gen.device)
            self.kv.load_prefix(index, group.prefix)
            seeds = torch.tensor([r.seed for r in taken], dtype=torch.long, device=index.device)
            steps = torch.zeros_like(seeds)
            logits = group.logits.expand(n, -1).clone()
            picked, values, ids = self._draw(logits, seeds, steps)
            self.tokens[index] = picked
            self.kv.positions[index] = len(group.prompt)
            self.steps[index] = 1
            self.seeds[index] = seeds
            self.rows[index] = group.condition
            tops = self._tops(values, ids)
            for i, (slot, request) in enumerate(zip(where, taken, strict=True)):
                sample = _Sample(request)
                self.active[slot] = sample
                self._extend(slot, sample, int(picked[i]), tops[i] if tops else None, finished)
            free += [s for s in where if self.active[s] is None]  # finished at once
            if not group.requests:
                self.groups.popleft()

    def _tops(
        self, values: torch.Tensor | None, ids: torch.Tensor | None
    ) -> list[tuple[tuple[str, float], ...]] | None:
        if values is None or ids is None:
            return None
        decode = self.gen.tokenizer.decode
        return [
            tuple((str(decode([t])), v) for v, t in zip(vs, ts, strict=True))
            for vs, ts in zip(values.tolist(), ids.tolist(), strict=True)
        ]

    def _extend(
        self,
        slot: int,
        sample: _Sample,
        token: int,
        top: tuple[tuple[str, float], ...] | None,
        finished: list[RawSample],
    ) -> None:
        """Add one drawn token to a sample; a stop token or the length limit ends it."""
        stopped = token in self.gen.stop_ids
        if not stopped:
            sample.tokens.append(token)
            if top is not None:
                sample.top.append(top)
        if stopped or len(sample.tokens) >= self.options.max_new_tokens:
            finished.append(
                RawSample(
                    key=sample.request.key,
                    token_ids=tuple(sample.tokens),
                    stopped=stopped,
                    top_logprobs=tuple(sample.top) if self.options.top_logprobs else None,
                )
            )
            self.active[slot] = None

    @torch.inference_mode()
    def _step(self, finished: list[RawSample]) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._decode_step()
        picked = self.picked.tolist()
        tops = self._tops(self.top_values, self.top_ids) if self.options.top_logprobs else None
        for slot, sample in enumerate(self.active):
            if sample is not None:
                self._extend(slot, sample, picked[slot], tops[slot] if tops else None, finished)

    def samples(self) -> Iterator[list[RawSample]]:
        """Finished samples, in groups of about a batch, until every request is answered."""
        if self._wants_graph():
            with torch.inference_mode():
                self._capture()
        self.gen.graphed = self.graph is not None
        finished: list[RawSample] = []
        while self.groups or any(s is not None for s in self.active):
            self._admit(finished)
            if len(finished) >= self.slots:
                yield finished
                finished = []
            if any(s is not None for s in self.active):
                self._step(finished)
        if finished:
            yield finished
        self.graph = None


def _groups(requests: Sequence[SampleRequest]) -> deque[_Group]:
    """Requests grouped by (prompt, condition), longest prompt first (the cache is sized by
    it at the start), each group in request order."""
    by_key: dict[tuple[tuple[int, ...], int], _Group] = {}
    for r in requests:
        key = (r.prompt_ids, r.condition)
        if key not in by_key:
            by_key[key] = _Group(prompt=r.prompt_ids, condition=r.condition, requests=deque())
        by_key[key].requests.append(r)
    return deque(sorted(by_key.values(), key=lambda g: -len(g.prompt)))


def _attention_layers(model: Any) -> list[torch.nn.Module]:
    """The attention module of every decoder layer, in layer order (the family registry's)."""
    from emmoe_dist.models.anatomy import decoder_layers, family_of

    family = family_of(model)
    return [getattr(layer, family.attention) for layer in decoder_layers(model, family)]
