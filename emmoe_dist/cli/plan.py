"""`emmoe plan`: size a fine-tuning job before launching it.

emmoe plan --config exp.yaml --ds ds_configs/zero2_ep.json --gpus 8 --gpus-per-node 8 \
    --one-gpu-tok-s 45000
emmoe plan --config exp.yaml --ds ds_configs/zero2_ep.json --gpus 16 --gpus-per-node 8 \
    --measured runs/one-gpu/metrics.jsonl

Prints the expected memory per GPU of the plan (parallel/memory_plan.py) for every GPU count up
to --gpus, and the tokens/s per GPU predicted from one GPU's rate and the bytes each plan moves
(parallel/cost_model.py). Reads only the experiment file and the model's config.json: no weights.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from emmoe_dist.errors import InputError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="expected memory per GPU and tokens/s per GPU of a training plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--ds", required=True, help="DeepSpeed config (ds_configs/*.json)")
    p.add_argument("--gpus", type=int, required=True, help="the largest GPU count to plan for")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--one-gpu-tok-s", type=float, help="measured tokens/s of one GPU")
    rate.add_argument("--measured", help="metrics.jsonl of a one-GPU run (median tokens/s)")
    p.add_argument("--intra-node-gb-s", type=float, default=150.0)
    p.add_argument("--inter-node-gb-s", type=float, default=40.0)
    p.set_defaults(func=run)


def _one_gpu_rate(args: argparse.Namespace) -> float:
    if args.one_gpu_tok_s is not None:
        return float(args.one_gpu_tok_s)
    from emmoe_dist.files import read_jsonl

    rows = list(read_jsonl(Path(args.measured)))
    rates = [float(r["tokens_per_s"]) for r in rows[min(3, len(rows) - 1) :] if "tokens_per_s" in r]
    if not rates:
        raise InputError("no tokens_per_s rows", file=args.measured)
    return statistics.median(rates)


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.config import load_config
    from emmoe_dist.families import moe_layer_indices, num_experts
    from emmoe_dist.models.loading import model_config_dict
    from emmoe_dist.parallel.cost_model import Links, ModelShape, ParallelShape, describe, predict
    from emmoe_dist.parallel.ds_config import expert_parallel_config, read_ds_config, zero_stage
    from emmoe_dist.parallel.memory_plan import ParamCounts, plan_memory

    cfg = load_config(args.config, [])
    raw = read_ds_config(args.ds)
    ep = expert_parallel_config(raw, file=args.ds)
    family, hf = model_config_dict(cfg.model)
    counts = ParamCounts.from_config(hf, family, cfg.adapter)
    one_gpu = _one_gpu_rate(args)
    tokens = cfg.train.micro_batch_size * cfg.data.max_length
    model = ModelShape(
        hidden=int(hf["hidden_size"]),
        moe_layers=len(moe_layer_indices(family, hf)),
        layers=int(hf["num_hidden_layers"]),
        top_k=int(hf[family.top_k_key]),
        trainable_params=counts.trainable,
        dense_params=counts.dense,
    )
    links = Links(args.intra_node_gb_s, args.inter_node_gb_s)
    predictions = []
    gpus = 1
    while gpus <= args.gpus:
        per_node = min(gpus, args.gpus_per_node)
        ep_size = (
            1
            if ep is None
            else ep.resolve(num_experts=num_experts(family, hf), local_world_size=per_node)
        )
        stage = zero_stage(raw)
        memory = plan_memory(
            counts,
            stage=stage,
            world_size=gpus,
            ep_size=ep_size,
            nf4=cfg.adapter.quantize == "nf4",
            tokens_per_micro_batch=tokens,
            hidden=model.hidden,
            layers=model.layers,
            capacity_bytes=int(args.gpu_memory_gib * 2**30),
        )
        print(f"--- {gpus} GPU(s)")
        print(memory.describe())
        if memory.problem():
            print(f"[emmoe]   does not fit: {memory.problem()}")
        shape = ParallelShape(gpus, per_node, ep_size, stage)
        predictions.append(predict(one_gpu, tokens, model, shape, links))
        gpus *= 2
    print(f"\nfrom {one_gpu:,.0f} tok/s on one GPU, {tokens} tokens per GPU per micro-batch:")
    print(describe(predictions))
    return 0
