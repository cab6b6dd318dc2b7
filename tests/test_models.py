"""Tiny models, loading and anatomy: every family builds, runs, is found by the registry's
paths, and survives a save/load round trip through `from_pretrained`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from emmoe_dist.config import ModelConfig
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.families import FAMILIES, MoEFamily, moe_layer_indices, num_experts
from emmoe_dist.models.anatomy import (
    decoder_layers,
    expert_parameters,
    family_of,
    moe_layers,
    router_parameters,
)
from emmoe_dist.models.loading import (
    _quantization_kwargs,
    load_model,
    load_tiny_or_path,
    model_config_dict,
    parse_model_spec,
    resolve_dtype,
)
from emmoe_dist.models.tiny import build_tiny, save_tiny, tiny_config

FAMILY_NAMES = sorted(FAMILIES)


def _ids(tokenizer, batch: int = 2) -> torch.Tensor:
    text = [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Autumn moonlight, a worm digs silently."},
    ]
    ids = tokenizer.apply_chat_template(text, tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor([ids] * batch)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_tiny_model_forward_has_finite_loss(name: str) -> None:
    model, tokenizer = build_tiny(name, seed=0)
    ids = _ids(tokenizer)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (*ids.shape, len(tokenizer))
    assert torch.isfinite(out.loss)
    # bos/eos/pad come from the tokenizer, so generation needs no warnings about them.
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert family_of(model).name == name


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_anatomy_finds_every_router_and_expert(name: str) -> None:
    family = FAMILIES[name]
    # intermediate 48: 2I = 96 differs from H = 128, so a transposed layout shows in the shapes
    model, _ = build_tiny(family, seed=0, intermediate_size=48, moe_intermediate_size=48)
    config = model.config.to_dict()
    e, h, i = num_experts(family, config), config["hidden_size"], 48
    layers = moe_layers(model, family)
    assert [layer.index for layer in layers] == moe_layer_indices(family, config)
    assert len(decoder_layers(model, family)) == config["num_hidden_layers"]

    routers = router_parameters(model, family)
    per_router = 2 if family.router_has_bias else 1
    assert len(routers) == len(layers) * per_router
    for layer in layers:
        weight = routers[f"model.layers.{layer.index}.{family.router_path}.weight"]
        assert weight.shape == (e, h)

    experts = expert_parameters(model, family)
    assert len(experts) == len(layers) * (2 + len(family.layout.biases))
    gate_up_shape = (e, h, 2 * i) if family.layout.transposed else (e, 2 * i, h)
    down_shape = (e, i, h) if family.layout.transposed else (e, h, i)
    for layer in layers:
        prefix = f"model.layers.{layer.index}.{family.experts_path}"
        assert experts[f"{prefix}.{family.layout.gate_up}"].shape == gate_up_shape
        assert experts[f"{prefix}.{family.layout.down}"].shape == down_shape
    names = {n for n, _ in model.named_parameters()}
    assert set(routers) | set(experts) <= names


def test_qwen3_dense_layer_is_skipped_and_gpt_oss_has_biases() -> None:
    qwen, _ = build_tiny("qwen3_moe")
    assert [layer.index for layer in moe_layers(qwen, FAMILIES["qwen3_moe"])] == [0, 2]
    assert not any(".layers.1." in n for n in expert_parameters(qwen, FAMILIES["qwen3_moe"]))

    gpt, _ = build_tiny("gpt_oss", intermediate_size=48)
    experts = expert_parameters(gpt, FAMILIES["gpt_oss"])
    assert experts["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 128, 96)
    assert experts["model.layers.0.mlp.experts.gate_up_proj_bias"].shape == (8, 96)
    assert experts["model.layers.0.mlp.experts.down_proj_bias"].shape == (8, 128)
    assert router_parameters(gpt, FAMILIES["gpt_oss"])["model.layers.2.mlp.router.bias"].shape == (
        8,
    )


def test_anatomy_sees_through_peft_wrappers() -> None:
    from peft import LoraConfig, get_peft_model

    family = FAMILIES["qwen3_moe"]
    model, _ = build_tiny(family)
    plain = {n: p for n, p in expert_parameters(model, family).items()}
    config = LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=list(family.expert_param_paths())
    )
    peft_model = get_peft_model(model, config)
    wrapped = expert_parameters(peft_model, family)
    # Same tensors, now under PEFT's names (two nested ParamWrappers around the experts).
    assert len(wrapped) == len(plain)
    assert {id(p) for p in wrapped.values()} == {id(p) for p in plain.values()}
    for name, param in wrapped.items():
        assert ".experts.base_layer.base_layer." in name
        assert peft_model.get_parameter(name) is param
    assert [type(layer.experts).__name__ for layer in moe_layers(peft_model, family)] == [
        "Qwen3MoeExperts",
        "Qwen3MoeExperts",
    ]
    assert len(router_parameters(peft_model, family)) == 2
    assert family_of(peft_model) is family


def test_unresolvable_registry_path_names_family_layer_and_path() -> None:
    family = FAMILIES["mixtral"]
    model, _ = build_tiny(family)
    broken: MoEFamily = dataclasses.replace(family, router="router")
    with pytest.raises(EmmoeError, match=r"family 'mixtral': layer 0: path 'mlp.router' does not"):
        moe_layers(model, broken)
    wrong_layers = dataclasses.replace(family, layers_path="model.blocks")
    with pytest.raises(EmmoeError, match=r"path 'model\.blocks' does not resolve"):
        moe_layers(model, wrong_layers)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, _ = build_tiny("olmoe", seed=1)
    b, _ = build_tiny("olmoe", seed=1)
    c, _ = build_tiny("olmoe", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.mlp.gate.weight"], sc["model.layers.0.mlp.gate.weight"]
    )
    before = torch.random.get_rng_state()
    build_tiny("olmoe", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_saved_tiny_loads_with_identical_logits(tmp_path: Path, name: str) -> None:
    folder = save_tiny(name, tmp_path / name, seed=5)
    loaded = load_model(ModelConfig(name_or_path=str(folder)))
    assert loaded.family is FAMILIES[name]  # inferred from config.json
    model, tokenizer = build_tiny(name, seed=5)
    ids = _ids(tokenizer)
    text = tokenizer.decode(ids[0])
    assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    assert loaded.model.dtype == torch.float32  # "auto" on CPU
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert loaded.tokenizer.chat_template == tokenizer.chat_template


def test_unknown_model_type_names_config_json(tmp_path: Path) -> None:
    folder = save_tiny("mixtral", tmp_path / "m")
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text())
    data["model_type"] = "llama"
    config_file.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        load_model(ModelConfig(name_or_path=str(folder)))
    message = str(info.value)
    assert message.startswith(f"{config_file}: model_type: ")
    assert "'llama' is not a registered MoE family" in message


def test_family_that_contradicts_the_checkpoint_is_an_error(tmp_path: Path) -> None:
    folder = save_tiny("mixtral", tmp_path / "m")
    with pytest.raises(InputError, match="contradicts family 'olmoe'"):
        load_model(ModelConfig(name_or_path=str(folder), family="olmoe"))


def test_tokenizer_without_chat_template_is_an_error(tmp_path: Path) -> None:
    folder = save_tiny("olmoe", tmp_path / "m")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(EmmoeError, match="has no chat template"):
        load_model(ModelConfig(name_or_path=str(folder)))


def test_training_load_turns_the_router_aux_loss_off() -> None:
    ids = torch.randint(20, 200, (2, 12))

    def losses(for_training: bool) -> tuple[float, float]:
        model = load_tiny_or_path("tiny:mixtral", for_training=for_training).model
        with torch.no_grad():
            plain = model(input_ids=ids, labels=ids).loss
            with_aux = model(input_ids=ids, labels=ids, output_router_logits=True).loss
        return float(plain), float(with_aux)

    plain, with_aux = losses(for_training=True)
    assert plain == with_aux  # the load-balancing loss adds nothing
    plain, with_aux = losses(for_training=False)
    assert with_aux > plain  # the checkpoint's default coefficient (0.001) is kept


def test_dtype_device_and_experts_implementation() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16
    loaded = load_model(
        ModelConfig(name_or_path="tiny:qwen3_moe", experts_implementation="eager"), dtype="bfloat16"
    )
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.model.config._experts_implementation == "eager"


def test_mxfp4_checkpoints_are_dequantized() -> None:
    kwargs = _quantization_kwargs({"quantization_config": {"quant_method": "mxfp4"}})
    assert kwargs["quantization_config"].dequantize is True
    assert _quantization_kwargs({"model_type": "mixtral"}) == {}


def test_model_spec_and_config_only(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--model: unknown tiny family 'nope'"):
        parse_model_spec("tiny:nope")
    family, config = model_config_dict(parse_model_spec("tiny:qwen3_moe"))
    assert family.name == "qwen3_moe" and config["mlp_only_layers"] == [1]
    assert config == tiny_config("qwen3_moe").to_dict()
    folder = save_tiny("gpt_oss", tmp_path / "g")
    family, config = model_config_dict(parse_model_spec(str(folder)))
    assert family.name == "gpt_oss" and config["num_local_experts"] == 8


def test_save_tiny_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(EmmoeError, match="not empty"):
        save_tiny("olmoe", tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["keep.txt"]
