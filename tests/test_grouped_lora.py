"""Factored expert LoRA equals PEFT's materialised ΔW, forward and backward, for every family.

The trained adapter is saved as a standard PEFT adapter; stock PEFT loads it and computes
the same logits; gradients of the factors agree with PEFT's own `target_parameters` LoRA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emmoe_dist.adapters.lora import (
    adapter_state_dict,
    apply_lora,
    expert_adapters,
    lora_config,
    save_peft_adapter,
    unselected_expert_max,
)
from emmoe_dist.config import AdapterConfig
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.tiny import build_tiny

FAMS = ["mixtral", "qwen3_moe", "gpt_oss", "olmoe"]


def _randomise_factors(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 40), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("targets", ["attention+experts", "experts"])
def test_saved_adapter_reloads_in_stock_peft(tmp_path: Path, family: str, targets: str) -> None:
    from peft import PeftModel

    fam = FAMILIES[family]
    adapter = AdapterConfig(rank=4, alpha=8, targets=targets)
    model, _ = build_tiny(fam, seed=3)
    selection = ExpertSelection.all(fam, model.config.to_dict())
    model = apply_lora(model, fam, adapter, selection)
    _randomise_factors(model)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"]).logits

    save_peft_adapter(adapter_state_dict(model, fam), lora_config(fam, adapter), tmp_path, "base")
    fresh, _ = build_tiny(fam, seed=3)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        theirs = peft_model(input_ids=batch["input_ids"]).logits
        plain = build_tiny(fam, seed=3)[0](input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3, "the adapter must change the logits"


@pytest.mark.parametrize("family", FAMS)
def test_factor_gradients_equal_peft_target_parameters(tmp_path: Path, family: str) -> None:
    from peft import PeftModel

    fam = FAMILIES[family]
    adapter = AdapterConfig(rank=2, alpha=4, targets="experts")
    model, _ = build_tiny(fam, seed=5)
    model = apply_lora(model, fam, adapter, ExpertSelection.all(fam, model.config.to_dict()))
    _randomise_factors(model, seed=2)
    save_peft_adapter(adapter_state_dict(model, fam), lora_config(fam, adapter), tmp_path, "base")
    peft_model = PeftModel.from_pretrained(
        build_tiny(fam, seed=5)[0], str(tmp_path), is_trainable=True
    )
    batch = _batch(model.config.vocab_size)
    model(**batch).loss.backward()
    peft_model(**batch).loss.backward()

    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    ours = adapter_state_dict(model, fam)  # values; map names to gradients below
    grads = {}
    for layer, module in expert_adapters(model):
        for i, param in enumerate(module.names):
            nest = "base_layer." * (len(module.names) - 1 - i)
            for ab, store in (("A", module.lora_A), ("B", module.lora_B)):
                grads[f"layers.{layer}.{fam.experts_path}.{nest}lora_{ab}"] = store[param].grad
    assert len(grads) == len([k for k in ours if "lora_" in k])
    for key, grad in grads.items():
        match = [g for n, g in peft_grads.items() if f"{key}.default.weight" in n]
        assert len(match) == 1, key
        torch.testing.assert_close(grad, match[0], atol=1e-6, rtol=1e-4)


def test_subset_keeps_unchosen_experts_exactly_zero() -> None:
    fam = FAMILIES["qwen3_moe"]
    model, _ = build_tiny(fam, seed=0)
    cfg = model.config.to_dict()
    selection = ExpertSelection.explicit({0: [3], 2: [1, 6]}, fam, cfg)
    model = apply_lora(model, fam, AdapterConfig(rank=4, alpha=8, targets="experts"), selection)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    batch = _batch(model.config.vocab_size)
    for _ in range(5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    assert unselected_expert_max(model, selection) == 0.0
    moved = {
        (layer, e)
        for layer, m in expert_adapters(model)
        for e in range(m.num_experts)
        if any(float(t.abs().max()) > 0 for n in m.names for t in m.factors(n, e)[1:])
    }
    assert moved == {(0, 3), (2, 1), (2, 6)}
