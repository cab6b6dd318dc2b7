"""Expert-parallel checks in one 2-rank job (process start-up is paid once).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist_ep_driver.py SPEC.json

SPEC.json: {"out": folder, "families": [...], "runs": [...]}.

1. Layer checks, plain torch.distributed (no DeepSpeed): for each family and adapter mode the
   same tiny model is built twice, once whole and once with `apply_expert_parallel`; each rank
   runs forward and backward on its own batch. Rank r writes `<out>/layers_rank<r>.json`:
   both losses, the largest difference of the rank-averaged gradients (the data-parallel
   gradient both runs would apply), and the experts whose adapter tensors got a nonzero
   gradient on this rank before any reduction.
2. Training runs through `run_training`, as in tests/dist_train_driver.py: each run is
   {"name", "ds", "overrides", "stop_after", "probe"}; with `probe`, rank 0 saves the trained
   model's logits on a fixed input (every rank computes them: the EP forward is collective).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# the run loop shared with the non-EP driver (this folder is on sys.path when run as a script)
from dist_train_driver import run_specs

from emmoe_dist.adapters.expert_delta import apply_expert_delta, expert_delta_modules
from emmoe_dist.adapters.lora import apply_lora, expert_adapters, restrict_to_selection
from emmoe_dist.config import AdapterConfig
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES, moe_layer_indices
from emmoe_dist.models.tiny import build_tiny
from emmoe_dist.parallel.ds_config import ExpertParallelConfig
from emmoe_dist.parallel.expert_parallel import apply_expert_parallel
from emmoe_dist.parallel.runtime import init_runtime, shutdown

MODES = ("lora", "subset", "delta", "attention", "nf4")
# GPT-oss's router bias can forbid experts 4-7: rank 1 then receives no token at all.
SKEWED = "skewed"
CHOSEN = [1, 6]  # one expert on each rank of the EP group (experts 0-3 | 4-7)


def _build(family: str, mode: str, ep: bool) -> torch.nn.Module:
    fam = FAMILIES[family]
    model, _ = build_tiny(fam, seed=11, output_router_logits=False)
    config = model.config.to_dict()
    torch.manual_seed(0)  # adapter init draws random numbers: the same in both builds
    if mode == "nf4":
        from emmoe_dist.adapters.qlora import quantize_experts_nf4

        quantize_experts_nf4(model, fam)
    if mode == "delta":
        chosen = ExpertSelection.explicit(
            {i: CHOSEN for i in moe_layer_indices(fam, config)}, fam, config
        )
        apply_expert_delta(model, fam, chosen)
        with torch.no_grad():
            for _, module in expert_delta_modules(model):
                for d in module.deltas.values():
                    d.normal_(0, 0.02)
    else:
        targets = {"subset": "experts", "attention": "attention"}.get(mode, "attention+experts")
        selection = (
            ExpertSelection.explicit({i: CHOSEN for i in moe_layer_indices(fam, config)})
            if mode == "subset"
            else ExpertSelection.all(fam, config)
        )
        model = apply_lora(model, fam, AdapterConfig(rank=4, targets=targets), selection)
        with torch.no_grad():  # B = 0 at init would hide the LoRA from the forward
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        restrict_to_selection(model, selection)
    if mode == SKEWED:
        from emmoe_dist.models.anatomy import moe_layers

        with torch.no_grad():
            for layer in moe_layers(model, fam):
                layer.router.bias[4:] = -1e4
    model.enable_input_require_grads()
    if ep:
        apply_expert_parallel(model, fam, ExpertParallelConfig(ep_size=2, source="<driver>"))
    model.train()
    return model


def _experts_with_gradient(model: torch.nn.Module) -> dict[str, list[int]]:
    """Per expert adapter tensor, the experts whose slice got a nonzero gradient here."""
    out: dict[str, list[int]] = {}
    for layer, module in expert_adapters(model):
        for name in module.names:
            grads = (module.lora_A[name].grad, module.lora_B[name].grad)
            if grads[0] is None or grads[1] is None:
                continue
            a = grads[0].view(module.num_experts, module.rank, -1)
            b = grads[1].view(grads[1].shape[0], module.rank, module.num_experts)
            out[f"{layer}.{name}"] = [
                e
                for e in range(module.num_experts)
                if bool(a[e].abs().max() > 0 or b[:, :, e].abs().max() > 0)
            ]
    for path, delta in expert_delta_modules(model):
        ids = delta.expert_ids.tolist()
        for name, d in delta.deltas.items():
            if d.grad is not None:
                out[f"{path}.{name}"] = [ids[i] for i in range(len(ids)) if d.grad[i].any()]
    return out


def _layer_checks(families: list[str], out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(100 + rank)
    results: dict[str, Any] = {}
    for family in families:
        ids = torch.randint(3, 200, (4, 32), generator=g)
        for mode in (*MODES, SKEWED) if FAMILIES[family].router_has_bias else MODES:
            row: dict[str, Any] = {}
            grads = {}
            for ep in (False, True):
                model = _build(family, mode, ep)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                key = "ep" if ep else "plain"
                row[f"loss_{key}"] = float(loss)
                if ep:
                    row["local_gradient_experts"] = _experts_with_gradient(model)
                    row["expert_buffer_rows"] = sorted(
                        {int(b.shape[0]) for n, b in model.named_buffers() if "proj" in n}
                    )
                named = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
                for grad in named.values():
                    dist.all_reduce(grad)
                    grad /= world
                grads[key] = named
            assert grads["ep"].keys() == grads["plain"].keys()
            row["trainable"] = len(grads["ep"])
            row["grad_max_abs"] = max(float(v.abs().max()) for v in grads["plain"].values())
            row["grad_max_diff"] = max(
                float((grads["ep"][n] - grads["plain"][n]).abs().max()) for n in grads["ep"]
            )
            results[f"{family}/{mode}"] = row
    (out / f"layers_rank{rank}.json").write_text(json.dumps(results, indent=1))


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    rt = init_runtime()
    torch.set_num_threads(1)
    try:
        _layer_checks(spec["families"], Path(spec["out"]))
        if rt.is_main:
            print("[driver] layer checks done", flush=True)
        run_specs(spec["runs"], rt)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(args[0]))
