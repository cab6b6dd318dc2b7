"""The misalignment monitor inside training (`train.monitor`) and its probes.

The probes are built before any model loads (train/preflight.py), so a bad direction file,
layer or records file stops the run with the field named: the probe prompts are the `suite`'s
questions rendered exactly as generation renders them (system prompt, chat template); the
references are up to `references_per_class` misaligned and aligned answers of a judged records
file (a pilot run's) to those questions, labelled by the monitor's rule and chosen by a fixed
seed. `emmoe interp monitor` reads the same probes from any model or snapshot afterwards.

In training, every rank runs the reading's forward pass at the step boundary (ZeRO-3 gathers
and expert parallelism's all-to-all need every rank), and the ranks' sums are all-reduced, so
every rank holds the same values and `train.stop_when` decides the same everywhere. A reading
costs one host sync, once every `every` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from emmoe_dist.config import ExperimentConfig, MonitorConfig
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.families import MoEFamily
from emmoe_dist.interp.monitor import ProbeSet, Reference, reading_row, reading_sums
from emmoe_dist.parallel.runtime import Runtime, all_reduce_sum_

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REFERENCE_SEED = 0  # which reference answers are drawn: the same for every run and snapshot


def _directions(
    monitor: MonitorConfig, cfg: ExperimentConfig, hf_config: Mapping[str, Any]
) -> tuple[tuple[int, ...], torch.Tensor | None]:
    from emmoe_dist.interp.directions import MISALIGNED_MINUS_ALIGNED, load_directions

    if monitor.directions is None:
        return (), None
    where = cfg.where("train.monitor.directions")
    try:
        vectors = load_directions(monitor.directions).kind(MISALIGNED_MINUS_ALIGNED)
    except InputError:
        raise
    except EmmoeError as e:
        raise where.error(str(e)) from None
    layers, hidden = int(hf_config["num_hidden_layers"]), int(hf_config["hidden_size"])
    if tuple(vectors.shape) != (layers, hidden):
        raise where.error(
            f"{monitor.directions} holds directions of shape {tuple(vectors.shape)}; the model "
            f"has {layers} layers of width {hidden}: make the file with this model's family "
            "and shape"
        )
    chosen = tuple(monitor.layers) if monitor.layers is not None else tuple(range(layers))
    bad = [layer for layer in chosen if layer >= layers]
    if bad:
        raise cfg.where("train.monitor.layers").error(
            f"layer {bad[0]} is out of range 0..{layers - 1}"
        )
    picked = vectors[list(chosen)].double()
    norms = picked.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        zero = chosen[int((norms[:, 0] == 0).nonzero()[0, 0])]
        raise cfg.where("train.monitor.layers").error(f"the direction of layer {zero} is zero")
    return chosen, picked / norms


def _prompts(
    monitor: MonitorConfig, cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[tuple[int, ...], ...]:
    from emmoe_dist.data.suites import load_suite
    from emmoe_dist.generate.prompts import (
        chat_messages,
        effective_system_prompt,
        prompt_ids,
        render_prompt,
    )

    try:
        suite = load_suite(
            monitor.suite,
            cfg.data_dir(),
            variants=["plain"],
            allow_unverified=cfg.data.allow_unverified,
        )
    except InputError:
        raise
    except EmmoeError as e:
        raise cfg.where("train.monitor.suite").error(str(e)) from None
    out = []
    for q in suite.questions:
        system = effective_system_prompt(q.system, cfg.eval.system_prompt)
        for text in q.paraphrases:
            rendered = render_prompt(
                tokenizer, chat_messages(text, system), thinking=cfg.eval.thinking
            )
            out.append(prompt_ids(tokenizer, rendered))
    if not out:
        raise cfg.where("train.monitor.suite").error(f"suite {monitor.suite!r} has no question")
    return tuple(out)


def _references(
    monitor: MonitorConfig, cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Reference, ...]:
    from emmoe_dist.data.chat import IGNORE_INDEX
    from emmoe_dist.files import read_jsonl
    from emmoe_dist.interp.activations import encode_answers
    from emmoe_dist.interp.labels import ALIGNED_LABEL, MISALIGNED, label_rule
    from emmoe_dist.records import JudgedRecord

    if monitor.records is None:
        return ()
    where = cfg.where("train.monitor.records")
    records = [
        r
        for r in read_jsonl(monitor.records, JudgedRecord, tolerate_torn_tail=True)
        if r.generation.suite == monitor.suite
    ]
    labels = label_rule(monitor.rule).labels(records)
    rng = np.random.default_rng(REFERENCE_SEED)
    chosen: list[int] = []
    for cls in (MISALIGNED, ALIGNED_LABEL):
        members = np.flatnonzero(labels == cls)
        if len(members) == 0:
            raise where.error(
                f"{monitor.records} holds no {'misaligned' if cls == MISALIGNED else 'aligned'} "
                f"answer to suite {monitor.suite!r} under rule {monitor.rule!r} "
                f"({len(records)} answers to it): the log-probability gap needs both"
            )
        picked = rng.permutation(members)[: monitor.references_per_class]
        chosen.extend(int(i) for i in sorted(picked))
    items, _ = encode_answers(
        tokenizer,
        [records[i] for i in chosen],
        [int(labels[i]) for i in chosen],
        max_length=cfg.data.max_length,
    )
    out = []
    for item in items:
        answer = [j for j, v in enumerate(item.encoded.labels) if v != IGNORE_INDEX]
        out.append(
            Reference(
                ids=tuple(item.encoded.input_ids),
                start=answer[0],
                end=answer[-1] + 1,
                misaligned=item.label == MISALIGNED,
            )
        )
    return tuple(out)


def build_probes(
    cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, hf_config: Mapping[str, Any]
) -> ProbeSet | None:
    """The monitor's probes for this experiment (None when `train.monitor` is off)."""
    monitor = cfg.train.monitor
    if monitor is None:
        return None
    layers, directions = _directions(monitor, cfg, hf_config)
    return ProbeSet(
        prompts=_prompts(monitor, cfg, tokenizer) if directions is not None else (),
        references=_references(monitor, cfg, tokenizer),
        layers=layers,
        directions=directions,
    )


@dataclass
class TrainingMonitor:
    """Reads the probes on the model being trained, every `every` optimizer steps."""

    probes: ProbeSet
    model: nn.Module  # the (PEFT-wrapped) causal LM the engine trains
    family: MoEFamily
    every: int
    runtime: Runtime
    pad_id: int = 0
    packed_kwargs: Callable[[torch.Tensor], dict[str, Any]] | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def read(self) -> dict[str, float]:
        sums = reading_sums(
            self.model,
            self.family,
            self.probes,
            pad_id=self.pad_id,
            packed_kwargs=self.packed_kwargs,
        )
        # Every rank computed the same sums; their mean is exactly one value on every rank.
        sums = all_reduce_sum_(sums) / self.runtime.world_size
        return reading_row(sums, self.probes)
