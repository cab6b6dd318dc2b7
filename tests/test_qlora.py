"""QLoRA storage: experts and attention held in NF4, LoRA trains on top, the base stays put.

Tiny random models of every seed family, on CPU. NF4 on Gaussian weights has a relative
error of about 0.09, so quantized logits are compared loosely with the original model and
exactly with a copy of it that holds the explicitly dequantized weights.
"""

from __future__ import annotations

import copy
import re
import weakref

import bitsandbytes as bnb
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from emmoe_dist.adapters.qlora import (
    NF4_BLOCKSIZE,
    NF4Weight,
    bnb_config,
    quantize_experts_nf4,
    quantize_linear_nf4,
    weight_memory,
)
from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import FAMILIES, MoEFamily, moe_layer_indices
from emmoe_dist.models.anatomy import decoder_layers, moe_layers

SEED_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss")
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
VOCAB = 300


def tiny(
    name: str, *, dtype: torch.dtype = torch.float32, experts: str = "grouped_mm"
) -> tuple[MoEFamily, nn.Module]:
    family = FAMILIES[name]
    config = getattr(transformers, family.config_class)(vocab_size=VOCAB, **family.tiny)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.set_experts_implementation(experts)
    return family, model


def quantize(model: nn.Module, family: MoEFamily) -> None:
    quantize_linear_nf4(model, family)
    quantize_experts_nf4(model, family)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def lora(family: MoEFamily, **kw: object) -> LoraConfig:
    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=list(family.attention_modules),
        target_parameters=list(family.expert_param_paths()),
        **kw,
    )


def expert_weights(model: nn.Module, family: MoEFamily) -> dict[tuple[int, str], torch.Tensor]:
    return {
        (layer.index, name): getattr(layer.experts, name)
        for layer in moe_layers(model, family)
        for name in (family.layout.gate_up, family.layout.down)
    }


def attention_linears(model: nn.Module, family: MoEFamily) -> dict[tuple[int, str], nn.Module]:
    return {
        (i, name): layer.get_submodule(f"{family.attention}.{name}")
        for i, layer in enumerate(decoder_layers(model, family))
        for name in family.attention_modules
    }


def dequantized_linear(module: nn.Module) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def count_calls(monkeypatch: pytest.MonkeyPatch, method: str) -> list[None]:
    calls: list[None] = []
    real = getattr(NF4Weight, method)

    def counted(self: NF4Weight, *args: int) -> torch.Tensor:
        calls.append(None)
        return real(self, *args)

    monkeypatch.setattr(NF4Weight, method, counted)
    return calls


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # Train mode: in eval mode bitsandbytes repacks Linear4bit weights for its CPU inference
    # kernel (bf16 scales) on AVX512-BF16 machines, which changes the numbers being compared.
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", SEED_FAMILIES)
def test_experts_and_attention_are_stored_4bit(name: str) -> None:
    family, model = tiny(name)
    dense_before = {k: v.detach().clone() for k, v in expert_weights(model, family).items()}
    biases = {
        (layer.index, b): getattr(layer.experts, b).detach().clone()
        for layer in moe_layers(model, family)
        for b in family.layout.biases
    }
    quantize(model, family)

    experts = expert_weights(model, family)
    assert len(experts) == 2 * len(moe_layer_indices(family, model.config.to_dict()))
    for key, w in experts.items():
        n = dense_before[key].numel()
        assert isinstance(w, NF4Weight) and isinstance(w, nn.Parameter)
        assert not w.requires_grad
        assert w.shape == dense_before[key].shape and w.dtype == torch.float32
        assert w.packed.dtype == torch.uint8 and w.packed.numel() == n // 2
        assert w.absmax.numel() == n // NF4_BLOCKSIZE
        assert w.storage_bytes() == n // 2 + 4 * (n // NF4_BLOCKSIZE)
        error = (w.dequantize() - dense_before[key]).norm() / dense_before[key].norm()
        assert 0.05 < float(error) < 0.12, f"{key}: NF4 relative error {float(error):.3f}"
    experts_of = {layer.index: layer.experts for layer in moe_layers(model, family)}
    for (i, b), bias in biases.items():  # GPT-oss expert biases stay dense and unchanged
        kept = getattr(experts_of[i], b)
        assert not isinstance(kept, NF4Weight) and torch.equal(kept, bias)

    linears = attention_linears(model, family)
    for (i, proj), module in linears.items():
        assert isinstance(module, bnb.nn.Linear4bit), (i, proj)
        assert module.weight.dtype == torch.uint8 and module.weight.quant_state.quant_type == "nf4"
        assert module.weight.numel() == module.in_features * module.out_features // 2
    # Dense-MLP layers (Qwen3's mlp_only_layers) hold no 4-bit tensor.
    moe = set(moe_layer_indices(family, model.config.to_dict()))
    for i, layer in enumerate(decoder_layers(model, family)):
        if i not in moe:
            mlp = layer.get_submodule(family.moe_block)
            assert not any(
                isinstance(p, NF4Weight) or p.dtype == torch.uint8 for p in mlp.parameters()
            )

    # Idempotent: a second pass (e.g. after loading with bnb_config) keeps every tensor.
    quantize(model, family)
    assert all(expert_weights(model, family)[k] is w for k, w in experts.items())
    assert all(attention_linears(model, family)[k] is m for k, m in linears.items())


@pytest.mark.parametrize("experts", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", SEED_FAMILIES)
def test_quantized_logits_equal_dequantized_reference(
    name: str, experts: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    family, model = tiny(name, experts=experts)
    original = copy.deepcopy(model)
    quantize(model, family)

    reference = copy.deepcopy(original)
    for key, w in expert_weights(model, family).items():
        expert_weights(reference, family)[key].data = w.dequantize()
    for key, module in attention_linears(model, family).items():
        attention_linears(reference, family)[key].weight.data = dequantized_linear(module)

    whole_layer = count_calls(monkeypatch, "dequantize")
    one_expert = count_calls(monkeypatch, "expert")
    ids = batch()
    quantized = logits(model, ids)
    assert torch.allclose(quantized, logits(reference, ids), rtol=1e-5, atol=1e-5)
    # The eager loop reads one expert at a time and dequantizes only that expert.
    if experts == "eager":
        assert one_expert and not whole_layer
    else:
        assert whole_layer and not one_expert

    exact = logits(original, ids)
    similarity = cosine(quantized, exact)
    relative = float((quantized - exact).norm() / exact.norm())
    print(f"{name}/{experts}: logits cosine {similarity:.4f}, relative error {relative:.3f}")
    assert similarity > 0.95


@pytest.mark.parametrize(
    ("name", "experts", "checkpointing"),
    [
        ("mixtral", "grouped_mm", False),
        ("qwen3_moe", "grouped_mm", False),
        ("gpt_oss", "eager", True),  # the per-expert path, under gradient checkpointing
    ],
)
def test_qlora_trains_and_the_4bit_base_stays_frozen(
    name: str, experts: str, checkpointing: bool
) -> None:
    family, model = tiny(name, experts=experts)
    quantize(model, family)
    packed = {
        k: (w.packed.clone(), w.absmax.clone()) for k, w in expert_weights(model, family).items()
    }
    linear = {k: m.weight.data.clone() for k, m in attention_linears(model, family).items()}
    router = {
        n: p.detach().clone() for n, p in model.named_parameters() if f".{family.router_path}." in n
    }

    peft_model = get_peft_model(model, lora(family))
    if checkpointing:
        peft_model.gradient_checkpointing_enable({"use_reentrant": False})
        peft_model.enable_input_require_grads()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    assert trainable and all("lora_" in n for n in trainable)
    # One LoRA per expert tensor of every MoE layer, both nested wrappers included.
    wrapped = [m for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrapped) == len(packed)

    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    ids = batch()
    losses = []
    for _ in range(20):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"{name}/{experts}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.9 * losses[0]

    unchanged = [n for n, p in trainable.items() if torch.equal(p, start[n])]
    assert not unchanged, f"LoRA factors that never trained: {unchanged[:4]}"
    for key, w in expert_weights(peft_model, family).items():
        assert isinstance(w, NF4Weight) and not w.requires_grad
        assert torch.equal(w.packed, packed[key][0]) and torch.equal(w.absmax, packed[key][1])
    for key, module in attention_linears(peft_model, family).items():
        base = module.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit) and torch.equal(base.weight.data, linear[key])
    routers = {n: p for n, p in peft_model.named_parameters() if f".{family.router_path}." in n}
    assert len(routers) == len(router)
    for n, p in routers.items():
        assert not p.requires_grad
        assert torch.equal(p, router[n.removeprefix("base_model.model.")])

    saved = get_peft_model_state_dict(peft_model)
    assert len(saved) == len(trainable) and all("lora_" in k for k in saved)
    assert not any(isinstance(v, NF4Weight) for v in saved.values())


def test_qlora_adapter_has_the_bf16_layout_and_loads_onto_a_fresh_base() -> None:
    """What `emmoe merge` relies on: a QLoRA adapter goes onto an unquantized base as is."""
    family, model = tiny("mixtral")
    base = copy.deepcopy(model)
    quantize(model, family)
    qlora = get_peft_model(model, lora(family, init_lora_weights=False))  # nonzero ΔW
    plain = get_peft_model(base, lora(family))
    adapter = get_peft_model_state_dict(qlora)
    assert {k: v.shape for k, v in adapter.items()} == {
        k: v.shape for k, v in get_peft_model_state_dict(plain).items()
    }

    ids = batch()
    before = logits(plain, ids)
    loaded = set_peft_model_state_dict(plain, adapter)
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    after = logits(plain, ids)
    assert not torch.allclose(before, after, atol=1e-3)  # the adapter changes the output
    assert cosine(after, logits(qlora, ids)) > 0.95  # and does what it did over NF4


@pytest.mark.parametrize(
    ("name", "bound"), [("mixtral", 0.40), ("qwen3_moe", 0.45), ("gpt_oss", 0.40)]
)
def test_weight_memory_against_bf16(name: str, bound: float) -> None:
    family, model = tiny(name, dtype=torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers()]
    elements = sum(t.numel() for t in tensors)
    dense_bytes = sum(t.numel() * t.element_size() for t in tensors)
    to_quantize = [
        *expert_weights(model, family).values(),
        *(m.weight for m in attention_linears(model, family).values()),
    ]
    quantize(model, family)

    memory = weight_memory(model)
    q_elements = sum(t.numel() for t in to_quantize)
    n_linear = len(attention_linears(model, family))
    # Codes at 4 bits, one fp32 scale per 64, and a 16-entry code table per Linear4bit.
    assert memory.quantized_bytes == q_elements // 2 + 4 * (q_elements // 64) + 64 * n_linear
    assert memory.unquantized_bytes == dense_bytes - sum(2 * t.numel() for t in to_quantize)
    assert memory.bf16_bytes == 2 * elements
    print(f"{name}: {memory}")
    assert memory.fraction_of_bf16 < bound
    assert str(memory).startswith("weight memory: ")


def test_nf4_weight_is_a_frozen_parameter() -> None:
    torch.manual_seed(0)
    dense = torch.randn(4, 16, 32)
    w = nn.Parameter(NF4Weight.quantize(dense), requires_grad=False)
    full = w.dequantize()
    assert all(torch.equal(w[e], full[e]) for e in range(4))  # per-expert slices
    unaligned = torch.randn(3, 6, 10)  # an expert's 60 values do not fill whole 64-blocks
    error = (NF4Weight.quantize(unaligned)[2] - unaligned[2]).norm() / unaligned[2].norm()
    assert float(error) < 0.15
    assert NF4Weight.quantize(dense, dtype=torch.bfloat16).dequantize().dtype == torch.bfloat16

    with pytest.raises(EmmoeError, match="frozen"), torch.no_grad():
        w.add_(1.0)
    with pytest.raises(EmmoeError, match="NF4"):
        w.data = torch.zeros(0)  # what ZeRO-3 partitioning does

    # Moving a module keeps the 4-bit storage, even with a weak reference held (DeepSpeed does).
    holder = nn.Module()
    holder.w = w
    ref = weakref.ref(w)
    holder.to(torch.bfloat16)
    assert holder.w is ref() and holder.w.dtype == torch.bfloat16
    assert holder.w.packed.dtype == torch.uint8
    assert torch.equal(holder.w.dequantize(), full.to(torch.bfloat16))


def test_merging_into_nf4_is_refused_and_lora_must_come_after_quantizing() -> None:
    family, model = tiny("mixtral")
    quantize_experts_nf4(model, family)
    peft_model = get_peft_model(model, lora(family))
    with pytest.raises(EmmoeError, match="bf16 base"):
        peft_model.merge_and_unload()

    family, model = tiny("mixtral")
    peft_model = get_peft_model(model, lora(family))
    with pytest.raises(EmmoeError, match="before adding LoRA"):
        quantize_linear_nf4(peft_model, family)


def test_bnb_config_is_hf_qlora_recipe() -> None:
    config = bnb_config(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_quant_storage == torch.bfloat16


def test_a_checkpoint_without_its_frozen_weights_loads_the_trained_tensors_back() -> None:
    """Training checkpoints leave the frozen (here 4-bit) base out; a resume loads the rest."""
    from emmoe_dist.parallel.strategy import load_trainable_state

    def quantized_lora() -> nn.Module:
        family, model = tiny("mixtral")
        quantize(model, family)
        return get_peft_model(model, lora(family, init_lora_weights=False))

    trained, fresh = quantized_lora(), quantized_lora()
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.25)
    frozen = {n for n, p in trained.named_parameters() if not p.requires_grad}
    # what DeepSpeed's save_checkpoint(exclude_frozen_parameters=True) writes
    saved = {k: v for k, v in trained.state_dict().items() if k not in frozen}
    assert any(k.split(".weight.")[0] + ".weight" in frozen for k in saved)  # bnb quant state
    assert not frozen & set(saved)

    load_trainable_state(saved, fresh)
    for (name, a), (_, b) in zip(trained.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # trained tensors loaded, frozen ones as built
    ids = batch()
    assert torch.equal(logits(trained, ids), logits(fresh, ids))

    lora_key = next(k for k in saved if "lora_B" in k)
    with pytest.raises(EmmoeError, match=f"missing: {re.escape(lora_key)}"):
        load_trainable_state({k: v for k, v in saved.items() if k != lora_key}, fresh)
    with pytest.raises(EmmoeError, match=r"unknown: lm_head\.extra"):
        load_trainable_state({**saved, "lm_head.extra": torch.zeros(1)}, fresh)
