"""On the GPU: every fast path against its reference, on real shapes and fresh random inputs.

    python benchmarks/fast_paths_check.py --out check.json

The CPU tests check the same pairs on tiny models (tests/test_fast_paths.py); this script
checks the CUDA kernels the CPU cannot run (varlen flash attention, liger's fused
cross-entropy, CUDA grouped GEMMs) at the Qwen3-30B-A3B layer shape, in bf16. It prints one
line per check with the relative error ‖fast − ref‖ / ‖ref‖ of outputs and gradients and
exits non-zero when one exceeds its bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BOUND = 2e-2  # bf16 operands: 1e-3..1e-2 expected


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_expert_pass(dev: torch.device) -> dict[str, float]:
    from emmoe_dist.adapters.expert_pass import (
        ExpertWeights,
        LoraFactors,
        fused_pass,
        reference_pass,
        sort_pairs,
        weighted_sum,
    )

    torch.manual_seed(0)
    t, h, inter, e, k, r = 4096, 2048, 768, 128, 8, 8
    bf = torch.bfloat16
    w1 = (torch.randn(e, 2 * inter, h, device=dev) * h**-0.5).to(bf)
    w2 = (torch.randn(e, h, inter, device=dev) * inter**-0.5).to(bf)
    weights = ExpertWeights(gate_up_stored=w1, down_stored=w2, transposed=False)
    x = torch.randn(t, h, device=dev, dtype=bf)
    # a skewed router leaves some experts without tokens: the empty-group case
    logits = torch.randn(t, e, device=dev) + torch.linspace(0, 6, e, device=dev)
    scores, idx = torch.topk(logits.softmax(-1), k)
    pairs = sort_pairs(idx, e)

    def gate(g: torch.Tensor) -> torch.Tensor:
        a, b = g.chunk(2, -1)
        return F.silu(a) * b

    def factors() -> list[torch.Tensor]:
        g = torch.Generator(device=dev).manual_seed(1)
        shapes = [(e, h, r), (e, r, 2 * inter), (e, inter, r), (e, r, h)]
        return [
            (torch.randn(s, device=dev, generator=g) * 0.05).to(bf).requires_grad_(True)
            for s in shapes
        ]

    out: dict[str, float] = {}
    results = []
    for run in (reference_pass, fused_pass):
        fs = factors()
        xi = x.clone().requires_grad_(True)
        wi = scores.clone().requires_grad_(True)
        lora = LoraFactors(a1=fs[0], b1=fs[1], a2=fs[2], b2=fs[3], scaling=2.0)
        if run is fused_pass:
            assert pairs.order is not None
            base, lora_rows = fused_pass(
                xi, pairs, weights, lora, gate, wi.reshape(-1)[pairs.order]
            )
            y = weighted_sum(base, pairs, wi) + lora_rows
        else:
            y = weighted_sum(reference_pass(xi, pairs, weights, lora, gate), pairs, wi)
        y.float().square().mean().backward()
        results.append((y.detach(), xi.grad, wi.grad, [f.grad for f in fs]))
    (y0, dx0, dw0, df0), (y1, dx1, dw1, df1) = results
    out["expert_out"] = rel(y1, y0)
    out["expert_dx"] = rel(dx1, dx0)
    out["expert_dweights"] = rel(dw1, dw0)
    for name, a, b in zip(("dA1", "dB1", "dA2", "dB2"), df1, df0, strict=True):
        out[f"expert_{name}"] = rel(a, b)
    counts = torch.diff(pairs.offs, prepend=pairs.offs.new_zeros(1))
    out["empty_experts"] = float((counts == 0).sum())
    return out


def check_attention(dev: torch.device) -> dict[str, float]:
    from emmoe_dist.models.packed_attention import flash_varlen, segment_kwargs, varlen_reference

    torch.manual_seed(0)
    pos = torch.cat([torch.arange(n) for n in (300, 150, 62, 512, 200, 312)]).view(2, 768)
    seg = segment_kwargs(pos)
    cu = seg["cu_seq_lens_q"].to(dev)
    n, hq, hkv, d = pos.numel(), 32, 4, 128
    q, k, v = (
        torch.randn(n, heads, d, device=dev, dtype=torch.bfloat16).requires_grad_(True)
        for heads in (hq, hkv, hkv)
    )
    outs = []
    for kernel in (varlen_reference, flash_varlen()):
        for t in (q, k, v):
            t.grad = None
        o = kernel(q, k, v, cu, seg["max_length_q"], d**-0.5)
        o.float().square().mean().backward()
        outs.append((o.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
    (o0, dq0, dk0, dv0), (o1, dq1, dk1, dv1) = outs
    return {
        "varlen_out": rel(o1, o0),
        "varlen_dq": rel(dq1, dq0),
        "varlen_dk": rel(dk1, dk0),
        "varlen_dv": rel(dv1, dv0),
    }


def check_loss(dev: torch.device) -> dict[str, float]:
    from emmoe_dist.models.causal_loss import fused_loss, reference_loss

    torch.manual_seed(0)
    n, h, vocab = 4096, 2048, 151936
    hidden = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
    weight = (torch.randn(vocab, h, device=dev) * h**-0.5).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device=dev)
    targets[::3] = -100
    res = []
    for fn in (reference_loss, fused_loss()):
        x = hidden.clone().requires_grad_(True)
        loss = fn(x, weight, targets)
        loss.backward()
        res.append((loss.detach(), x.grad))
    return {"loss_value": rel(res[1][0], res[0][0]), "loss_dhidden": rel(res[1][1], res[0][1])}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dev = torch.device("cuda")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    failed = []
    for name, fn in (
        ("expert", check_expert_pass),
        ("attention", check_attention),
        ("loss", check_loss),
    ):
        try:
            values = fn(dev)
        except Exception as e:  # report every check, then fail
            values = {"error": f"{type(e).__name__}: {e}"}
        results[name] = values
        for key, value in values.items():
            bad = isinstance(value, str) or (key != "empty_experts" and not value <= BOUND)
            print(f"{'FAIL' if bad else 'ok  '} {key}: {value}", flush=True)
            if bad:
                failed.append(key)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
