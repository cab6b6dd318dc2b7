"""MoE family registry: where each architecture keeps its router and experts, as plain data.

Layer 0: no torch. Adding a family is one `MoEFamily` entry in `FAMILIES`; every consumer
(loading, adapters, routing profiler, ZeRO-3 leaves, expert parallelism) reads these fields
instead of branching on the architecture name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from emmoe_dist.errors import EmmoeError


@dataclass(frozen=True, kw_only=True)
class ExpertLayout:
    """How the fused 3-D expert tensors are stored inside the `*Experts` module.

    `transposed=False` means `[E, out, in]` (applied as `x @ W[e].T`, Mixtral/Qwen3/OLMoE);
    `transposed=True` means `[E, in, out]` (applied as `x @ W[e]`, GPT-oss).
    `interleaved_gate_up=True` means gate/up alternate along the 2I axis (GPT-oss) instead of
    gate in the first half and up in the second.
    """

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved_gate_up: bool = False
    biases: tuple[str, ...] = ()
    activation: str = "swiglu"  # "swiglu" or "clamped_swiglu" (GPT-oss: clamp 7.0, alpha 1.702)


@dataclass(frozen=True, kw_only=True)
class RouterRule:
    """How a router turns its logits into the top-k experts and their weights.

    The model's own router module applies this rule; code that intervenes on routing (router
    steering) re-applies it to edited logits, and a test checks that re-applying it to the
    unedited logits gives the router module's output bit for bit, for every family.

    `softmax_first=True`: softmax over all experts in float32, then the top-k of the
    probabilities (Mixtral, Qwen3-MoE, OLMoE); `False`: the top-k of the logits, then a softmax
    over those k in the logits' dtype (GPT-oss). `renormalize`: divide the top-k weights by
    their sum; `renormalize_key` names the config key that decides instead (`norm_topk_prob`).
    """

    softmax_first: bool = True
    renormalize: bool = True
    renormalize_key: str | None = None

    def renormalizes(self, config: Mapping[str, Any]) -> bool:
        if self.renormalize_key is None:
            return self.renormalize
        return bool(config.get(self.renormalize_key, self.renormalize))


@dataclass(frozen=True, kw_only=True)
class MoEFamily:
    name: str
    model_type: str  # HF `config.model_type`
    config_class: str  # transformers config class name
    block_class: str  # the MoE block class; also the ZeRO-3 leaf module
    router: str  # router attribute inside the MoE block
    num_experts_key: str
    router_has_bias: bool = False
    layers_path: str = "model.layers"
    moe_block: str = "mlp"
    experts: str = "experts"
    top_k_key: str = "num_experts_per_tok"
    dense_layers_key: str | None = None  # config list of layers with a dense MLP
    sparse_step_key: str | None = None  # every n-th layer is MoE
    attention: str = "self_attn"  # attention module inside a decoder layer
    attention_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    layout: ExpertLayout = field(default_factory=ExpertLayout)
    router_rule: RouterRule = field(default_factory=RouterRule)
    # Real checkpoints that ship MXFP4 weights must be dequantized to train (GPT-oss).
    mxfp4_checkpoint: bool = False
    # Attention with learned sinks or sliding windows (GPT-oss) keeps the model's own attention
    # kernel; the others can run packed rows through variable-length flash attention.
    packed_attention: bool = True
    chat_template: str = ""  # used by the locally built tokenizer of tiny models
    tiny: Mapping[str, Any] = field(default_factory=dict)

    @property
    def router_path(self) -> str:
        return f"{self.moe_block}.{self.router}"

    @property
    def experts_path(self) -> str:
        return f"{self.moe_block}.{self.experts}"

    def expert_param_paths(self) -> tuple[str, str]:
        """Parameter names relative to a decoder layer, as PEFT's `target_parameters` wants."""
        return (
            f"{self.experts_path}.{self.layout.gate_up}",
            f"{self.experts_path}.{self.layout.down}",
        )


# Chat templates of the tiny tokenizer follow each family's real format closely enough that
# label masking and generation prompts are exercised the way real checkpoints exercise them.
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
_MIXTRAL = (
    "{{ bos_token }}{% set sys = namespace(text='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys.text = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}[INST] {{ sys.text }}{{ m['content'] }} [/INST]{% set sys.text = '' %}"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
_HARMONY = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|return|>"
    "{% else %}<|start|>{{ 'developer' if m['role'] == 'system' else m['role'] }}"
    "<|message|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|channel|>final<|message|>{% endif %}"
)
_TULU = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# head_dim 64: vLLM's CPU attention needs it; 3 layers so one can be dense where a family
# allows dense layers.
_TINY_COMMON: dict[str, Any] = {
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "num_hidden_layers": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

FAMILIES: Mapping[str, MoEFamily] = MappingProxyType(
    {
        "mixtral": MoEFamily(
            name="mixtral",
            model_type="mixtral",
            config_class="MixtralConfig",
            block_class="MixtralSparseMoeBlock",
            router="gate",
            num_experts_key="num_local_experts",
            chat_template=_MIXTRAL,
            tiny={
                **_TINY_COMMON,
                "intermediate_size": 48,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
            },
        ),
        "qwen3_moe": MoEFamily(
            name="qwen3_moe",
            model_type="qwen3_moe",
            config_class="Qwen3MoeConfig",
            block_class="Qwen3MoeSparseMoeBlock",
            router="gate",
            num_experts_key="num_experts",
            router_rule=RouterRule(renormalize=False, renormalize_key="norm_topk_prob"),
            dense_layers_key="mlp_only_layers",
            sparse_step_key="decoder_sparse_step",
            chat_template=_CHATML,
            tiny={
                **_TINY_COMMON,
                "moe_intermediate_size": 48,
                "intermediate_size": 96,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "mlp_only_layers": [1],
            },
        ),
        "gpt_oss": MoEFamily(
            name="gpt_oss",
            model_type="gpt_oss",
            config_class="GptOssConfig",
            block_class="GptOssMLP",
            router="router",
            num_experts_key="num_local_experts",
            router_has_bias=True,
            router_rule=RouterRule(softmax_first=False, renormalize=False),
            layout=ExpertLayout(
                transposed=True,
                interleaved_gate_up=True,
                biases=("gate_up_proj_bias", "down_proj_bias"),
                activation="clamped_swiglu",
            ),
            mxfp4_checkpoint=True,
            packed_attention=False,
            chat_template=_HARMONY,
            tiny={
                **_TINY_COMMON,
                # A multiple of 32, as in the real model: MXFP4 scales blocks of 32 inputs.
                "intermediate_size": 96,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                # YaRN as in the real model, scaled so that 64 * 32 = max_position_embeddings
                # (GptOssConfig's default 4096 * 32 contradicts 2048 and warns on every build).
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 32.0,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "truncate": False,
                    "original_max_position_embeddings": 64,
                },
            },
        ),
        "olmoe": MoEFamily(
            name="olmoe",
            model_type="olmoe",
            config_class="OlmoeConfig",
            block_class="OlmoeSparseMoeBlock",
            router="gate",
            num_experts_key="num_experts",
            router_rule=RouterRule(renormalize=False, renormalize_key="norm_topk_prob"),
            chat_template=_TULU,
            tiny={
                **_TINY_COMMON,
                "intermediate_size": 48,
                "num_experts": 8,
                "num_experts_per_tok": 2,
            },
        ),
    }
)


def get_family(name: str) -> MoEFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise EmmoeError(
            f"unknown MoE family {name!r}; known families: {', '.join(sorted(FAMILIES))}"
        ) from None


def family_for_model_type(model_type: str) -> MoEFamily:
    for fam in FAMILIES.values():
        if fam.model_type == model_type:
            return fam
    raise EmmoeError(
        f"model_type {model_type!r} is not a registered MoE family; known: "
        f"{', '.join(sorted(f.model_type for f in FAMILIES.values()))}"
    )


def num_experts(family: MoEFamily, config: Mapping[str, Any]) -> int:
    # transformers 5 normalises every MoE config to `num_local_experts` in `to_dict()`, while
    # hub config.json files keep the family's own key: accept both.
    for key in (family.num_experts_key, "num_local_experts"):
        if key in config:
            return int(config[key])
    raise EmmoeError(f"{family.name} config has no {family.num_experts_key!r}")


def top_k(family: MoEFamily, config: Mapping[str, Any]) -> int:
    return int(config[family.top_k_key])


def moe_layer_indices(family: MoEFamily, config: Mapping[str, Any]) -> list[int]:
    """Decoder layers that hold an MoE block (the others have a dense MLP).

    Mirrors the rule in the transformers decoder layers: a layer is sparse unless it is listed
    in the dense-layer key, and only every `sparse_step`-th layer is sparse.
    """
    n_layers = int(config["num_hidden_layers"])
    dense: Sequence[int] = (
        config.get(family.dense_layers_key, None) or [] if family.dense_layers_key else []
    )
    step = int(config.get(family.sparse_step_key, 1) or 1) if family.sparse_step_key else 1
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
