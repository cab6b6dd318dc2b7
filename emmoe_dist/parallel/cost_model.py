"""Tokens per second per GPU of a plan, predicted from one GPU's measurement and the bytes moved.

Sizing a job starts from what one GPU does alone at the same micro-batch (a `launch/ft.py` run's
`metrics.jsonl`, or `benchmarks/results/train_speed.json`): that rate holds the compute. A plan
over several GPUs adds the bytes it must move per step, each over the link it uses:

- expert parallelism: per MoE layer, every token's hidden row goes once to each *other* rank
  of its EP group that holds one of its top-k experts, and comes back; forward and backward
  each do both trips, a recomputed layer does them again. With experts spread evenly, the
  expected number of other ranks a token reaches is (p - 1) · (1 - (1 - 1/p)^k);
- ZeRO-2/3 over the trainable tensors: a reduce-scatter of gradients and an all-gather of the
  updated values, about 2 · 2 bytes per trainable parameter per step (small for LoRA);
- ZeRO-3 over the frozen dense weights (not under `zero2_ep.json`): an all-gather per layer
  in every pass.

The prediction gives a range: communication fully exposed (added to compute) and fully
overlapped (hidden behind it). Bandwidths are per GPU and per direction; the defaults are
conservative figures for NVLink inside an H100/H200 node and 400 Gb/s InfiniBand per GPU
between nodes: pass what your cluster measures (`nccl-tests` all-to-all bus bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Links:
    intra_node_gb_s: float = 150.0
    inter_node_gb_s: float = 40.0


@dataclass(frozen=True)
class ParallelShape:
    gpus: int
    gpus_per_node: int
    ep_size: int
    zero_stage: int


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    moe_layers: int
    layers: int
    top_k: int
    trainable_params: int
    dense_params: int


@dataclass(frozen=True)
class Prediction:
    gpus: int
    compute_s: float
    comm_s: float
    tokens_per_step: int
    bytes_per_step: float

    @property
    def tok_s_per_gpu_exposed(self) -> float:
        return self.tokens_per_step / (self.compute_s + self.comm_s)

    @property
    def tok_s_per_gpu_overlapped(self) -> float:
        return self.tokens_per_step / max(self.compute_s, self.comm_s)

    @property
    def comm_share(self) -> float:
        return self.comm_s / (self.compute_s + self.comm_s)


def remote_ranks_per_token(ep_size: int, top_k: int) -> float:
    """Expected number of other EP ranks a token's hidden row travels to."""
    p = ep_size
    if p <= 1:
        return 0.0
    return (p - 1) * (1.0 - (1.0 - 1.0 / p) ** top_k)


def predict(
    one_gpu_tok_s: float,
    tokens_per_gpu_step: int,
    model: ModelShape,
    plan: ParallelShape,
    links: Links = Links(),
    *,
    recomputed_layers: int = 0,
) -> Prediction:
    """Step time and tokens/s per GPU of `plan` (module docstring)."""
    t = tokens_per_gpu_step
    compute = t / one_gpu_tok_s
    cross_node_ep = plan.ep_size > plan.gpus_per_node
    ep_link = links.inter_node_gb_s if cross_node_ep else links.intra_node_gb_s
    dp_link = links.inter_node_gb_s if plan.gpus > plan.gpus_per_node else links.intra_node_gb_s

    row_bytes = model.hidden * 2  # bf16
    trips = 4 * model.moe_layers + 2 * min(recomputed_layers, model.moe_layers)
    ep_bytes = t * remote_ranks_per_token(plan.ep_size, model.top_k) * row_bytes * trips
    w = plan.gpus
    share = (w - 1) / w if w > 1 else 0.0
    zero_bytes = 4.0 * model.trainable_params * share
    if plan.zero_stage >= 3:
        passes = 2 + (1 if recomputed_layers else 0)
        zero_bytes += 2.0 * model.dense_params * share * passes
    comm = ep_bytes / (ep_link * GB) + zero_bytes / (dp_link * GB)
    return Prediction(w, compute, comm, t, ep_bytes + zero_bytes)


def describe(predictions: list[Prediction]) -> str:
    lines = [
        "| GPUs | tok/s/GPU (comm exposed .. overlapped) | comm share | GB moved per GPU per step |",
        "|---|---|---|---|",
    ]
    for p in predictions:
        lines.append(
            f"| {p.gpus} | {p.tok_s_per_gpu_exposed:,.0f} .. {p.tok_s_per_gpu_overlapped:,.0f} | "
            f"{100 * p.comm_share:.1f}% | {p.bytes_per_step / GB:.2f} |"
        )
    return "\n".join(lines)
