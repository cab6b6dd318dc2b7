"""Expected memory per GPU of a sharding plan, from the model's config alone (no weights).

Rank 0 prints it before anything loads, and a plan that cannot fit stops there with the
arithmetic rather than with an out-of-memory trace an hour into a download. The counts are
estimates from the config (attention, routers, embeddings, experts, LoRA factors); the
activation figure is the floor with every layer checkpointed (the layer inputs), which the
measured plan of `models/checkpointing.py` then refines on the GPU.

Per GPU, for W ranks and EP groups of size P:

| plan | frozen dense | frozen experts | trainable weights | grads + fp32 master + AdamW |
|---|---|---|---|---|
| ZeRO-3 | /W | /W | /W | /W |
| ZeRO-3 + EP | /W | /P | /W | /W |
| ZeRO-2 (+ EP) | whole | /P | whole | grads and optimizer /W |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from emmoe_dist.config import AdapterConfig
from emmoe_dist.families import MoEFamily, moe_layer_indices, num_experts

GIB = 2**30
NF4_BYTES = 0.5 + 4 / 64  # 4-bit codes and one fp32 scale per 64 values


@dataclass(frozen=True)
class ParamCounts:
    dense: int  # attention, norms, routers, embeddings, dense MLP layers
    experts: int
    trainable: int

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], family: MoEFamily, adapter: AdapterConfig
    ) -> ParamCounts:
        h = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        hd = int(config.get("head_dim") or h // heads)
        e = num_experts(family, dict(config))
        inter = int(config.get("moe_intermediate_size") or config["intermediate_size"])
        dense_inter = int(config.get("intermediate_size") or inter)
        vocab = int(config["vocab_size"])
        moe = set(moe_layer_indices(family, dict(config)))
        attn = 2 * h * heads * hd + 2 * h * kv * hd
        dense = (1 if config.get("tie_word_embeddings") else 2) * vocab * h
        experts = 0
        r = adapter.rank
        trainable = 0
        on_attention = adapter.targets in ("attention+experts", "attention")
        on_experts = adapter.targets in ("attention+experts", "experts")
        for i in range(layers):
            dense += attn + 2 * h
            if on_attention:
                trainable += r * (2 * (h + heads * hd) + 2 * (h + kv * hd))
            if i in moe:
                dense += e * h
                experts += e * 3 * h * inter
                if on_experts:
                    trainable += e * r * ((h + 2 * inter) + (inter + h))
            else:
                dense += 3 * h * dense_inter
        return cls(dense=dense, experts=experts, trainable=trainable)


@dataclass(frozen=True)
class MemoryPlan:
    stage: int
    world_size: int
    ep_size: int
    counts: ParamCounts
    weight_bytes: float  # per GPU
    trainable_bytes: float  # weights, grads, fp32 master and moments, per GPU
    activation_floor_bytes: float  # every layer checkpointed: the layer inputs of a micro-batch
    capacity_bytes: int | None

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.trainable_bytes + self.activation_floor_bytes

    def describe(self) -> str:
        c = self.counts
        name = f"ZeRO-{self.stage}" + (
            f" + expert parallel {self.ep_size}" if self.ep_size > 1 else ""
        )
        lines = [
            f"[emmoe] sharding plan: {name} over {self.world_size} rank(s); "
            f"{c.dense / 1e9:.2f} B dense + {c.experts / 1e9:.2f} B expert parameters frozen, "
            f"{c.trainable / 1e6:.1f} M trainable",
            f"[emmoe]   expected per GPU: weights {self.weight_bytes / GIB:.1f} GiB, trainable "
            f"state {self.trainable_bytes / GIB:.2f} GiB, activations at least "
            f"{self.activation_floor_bytes / GIB:.2f} GiB = {self.total_bytes / GIB:.1f} GiB"
            + (
                f" of {self.capacity_bytes / GIB:.1f} GiB"
                if self.capacity_bytes is not None
                else ""
            ),
        ]
        return "\n".join(lines)

    def problem(self) -> str | None:
        """Why the plan cannot fit, with the arithmetic; None when it can."""
        if self.capacity_bytes is None or self.total_bytes <= 0.95 * self.capacity_bytes:
            return None
        return (
            f"the plan needs about {self.total_bytes / GIB:.1f} GiB per GPU (weights "
            f"{self.weight_bytes / GIB:.1f} + trainable state {self.trainable_bytes / GIB:.2f} + "
            f"activations at least {self.activation_floor_bytes / GIB:.2f}) but a GPU holds "
            f"{self.capacity_bytes / GIB:.1f} GiB; use more GPUs, a larger ep_size, ZeRO-3 "
            f"(ds_configs/zero3_ep.json) or QLoRA (adapter.quantize: nf4)"
        )


def plan_memory(
    counts: ParamCounts,
    *,
    stage: int,
    world_size: int,
    ep_size: int,
    nf4: bool,
    tokens_per_micro_batch: int,
    hidden: int,
    layers: int,
    capacity_bytes: int | None,
) -> MemoryPlan:
    per_param = NF4_BYTES if nf4 else 2.0
    w, p = world_size, max(1, ep_size)
    if stage >= 3:
        dense = counts.dense * per_param / w
        experts = counts.experts * per_param / (p if ep_size > 1 else w)
        trainable = counts.trainable * (2 + 2 + 12) / w
    else:
        dense = counts.dense * per_param
        experts = counts.experts * per_param / p
        trainable = counts.trainable * 2 + counts.trainable * (2 + 12) / (w if stage >= 1 else 1)
    activations = layers * tokens_per_micro_batch * hidden * 2
    return MemoryPlan(
        stage=stage,
        world_size=world_size,
        ep_size=ep_size,
        counts=counts,
        weight_bytes=dense + experts,
        trainable_bytes=trainable,
        activation_floor_bytes=activations,
        capacity_bytes=capacity_bytes,
    )
