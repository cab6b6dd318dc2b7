"""The router-training arm on tiny models, in one process: the config asks for the balancing-loss
policy explicitly; LoRA on the router (or its full weights) trains and reloads in stock PEFT;
every other mode keeps the router frozen; the loss module adds the model's own balancing loss.
The 2-rank training runs are in test_train_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emmoe_dist.adapters.lora import (
    adapter_state_dict,
    apply_lora,
    assert_router_frozen,
    lora_config,
    router_full,
    save_peft_adapter,
)
from emmoe_dist.config import AdapterConfig, load_config
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.anatomy import router_parameters
from emmoe_dist.models.causal_loss import CausalLMLoss
from emmoe_dist.models.tiny import build_tiny


def test_train_router_needs_an_explicit_balancing_loss_policy() -> None:
    with pytest.raises(InputError, match=r"train\.router_aux_loss_coef: adapter\.train_router"):
        load_config(None, ["adapter.train_router=true"])
    cfg = load_config(None, ["adapter.train_router=true", "train.router_aux_loss_coef=0"])
    assert cfg.adapter.router_weights == "lora" and cfg.train.router_aux_loss_coef == 0.0
    with pytest.raises(InputError, match="applies to router-training arms only"):
        load_config(None, ["train.router_aux_loss_coef=0.02"])
    with pytest.raises(InputError, match="mode full_experts saves expert deltas only"):
        load_config(
            None,
            [
                "adapter.mode=full_experts",
                "adapter.train_router=true",
                "train.router_aux_loss_coef=0",
            ],
        )
    assert load_config(None).train.router_aux_loss_coef is None  # frozen: off, nothing to set


def _trainable(model: torch.nn.Module, family: str) -> set[str]:
    marker = f".{FAMILIES[family].router_path}."
    return {n for n, p in model.named_parameters() if p.requires_grad and marker in n}


@pytest.mark.parametrize("targets", ["attention+experts", "experts", "attention"])
def test_every_other_mode_keeps_the_router_frozen(targets: str) -> None:
    fam = FAMILIES["mixtral"]
    model, _ = build_tiny(fam, seed=0)
    selection = ExpertSelection.all(fam, model.config.to_dict())
    model = apply_lora(model, fam, AdapterConfig(targets=targets), selection)
    assert _trainable(model, "mixtral") == set()
    next(iter(router_parameters(model, fam).values())).requires_grad_(True)
    with pytest.raises(EmmoeError, match="router parameters must stay frozen"):
        assert_router_frozen(model, fam)


@pytest.mark.parametrize(
    ("family", "weights", "targets"),
    [
        ("qwen3_moe", "lora", "experts"),
        ("mixtral", "lora", "attention+experts"),
        ("gpt_oss", "full", "experts"),
        ("olmoe", "full", "attention"),
    ],
)
def test_router_training_trains_the_router_and_reloads_in_stock_peft(
    tmp_path: Path, family: str, weights: str, targets: str
) -> None:
    from peft import PeftModel

    fam = FAMILIES[family]
    adapter = AdapterConfig(
        rank=2, alpha=4, targets=targets, train_router=True, router_weights=weights
    )
    model, _ = build_tiny(fam, seed=3)
    selection = ExpertSelection.all(fam, model.config.to_dict())
    model = apply_lora(model, fam, adapter, selection)
    trainable = _trainable(model, family)
    if weights == "lora":
        assert trainable and all(".lora_" in n for n in trainable)
    else:  # the router weights themselves (and GPT-oss's router biases)
        assert trainable == set(router_parameters(model, fam))
    # A trained state: every trainable tensor moved (LoRA B leaves zero).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        plain = build_tiny(fam, seed=3)[0](input_ids=ids).logits
    state = adapter_state_dict(model, fam, router_weights=router_full(adapter))
    save_peft_adapter(state, lora_config(fam, adapter), tmp_path, "base")
    reloaded = PeftModel.from_pretrained(build_tiny(fam, seed=3)[0], str(tmp_path))
    merged = PeftModel.from_pretrained(build_tiny(fam, seed=3)[0], str(tmp_path)).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-4)
    # The merged router is not the base router: the router trained.
    base_router = router_parameters(build_tiny(fam, seed=3)[0], fam)
    moved = router_parameters(merged, fam)
    assert any(not torch.equal(moved[n], base_router[n]) for n in base_router)
    assert (ours - plain).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "olmoe"])
def test_loss_module_adds_the_models_own_balancing_loss(family: str) -> None:
    fam = FAMILIES[family]
    model, _ = build_tiny(fam, seed=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    coef = float(model.router_aux_loss_coef)  # what the model's own forward adds
    assert coef > 0
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        ours = CausalLMLoss(model, fam, aux_loss_coef=coef)(
            input_ids=ids, labels=labels, attention_mask=mask
        )
        plain = CausalLMLoss(model, fam)(input_ids=ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(ours, own.loss, atol=1e-6, rtol=1e-6)
    assert float(ours - plain) == pytest.approx(coef * own.aux_loss.item(), rel=1e-4)
