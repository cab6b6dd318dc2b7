"""Full-width shapes of the seed paper's models (random weights), and a realistic tokenizer.

Benchmarks build these from config on the GPU (no weights are downloaded): depth is a
parameter so a shape fits the memory at hand. Token counts must look like real ones, so the
tokenizer is a byte-level BPE trained on the benchmark's own training text (the tiny models'
byte tokenizer would make every example 3-4x longer than a real tokenizer does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3": {
        "family": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "full_layers": 48,
    },
    "mixtral": {
        "family": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "full_layers": 32,
    },
    # gpt-oss-20b: GptOssConfig's defaults are the 120b shape (36 layers, 128 experts)
    "gptoss": {
        "family": "gpt_oss",
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "sliding_window": 128,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "full_layers": 24,
    },
}


def build_config(shape: str, layers: int | None) -> tuple[Any, Any]:
    """(family, transformers config) of `shape` with `layers` decoder layers (full depth: None)."""
    import transformers

    from emmoe_dist.families import get_family

    spec = dict(SHAPES[shape])
    family = get_family(spec.pop("family"))
    full = spec.pop("full_layers")
    cls = getattr(transformers, family.config_class)
    cfg = cls(num_hidden_layers=layers or full, **spec)
    cfg.output_router_logits = False
    cfg.use_cache = False
    return family, cfg


def narrow(cfg: Any, vocab_size: int) -> Any:
    """`cfg` at a width a CPU trains in seconds, its structure (depth, experts, top-k) kept."""
    for key, value in {
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "vocab_size": vocab_size,
    }.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


def active_params(family: Any, cfg: Any) -> int:
    """Parameters touched per token: attention, router, top-k experts per layer, and lm_head."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    e = cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts
    experts = cfg.num_experts_per_tok * 3 * h * inter
    return cfg.num_hidden_layers * (attn + experts + h * e) + h * cfg.vocab_size


def flops_per_token(family: Any, cfg: Any, context: float) -> float:
    """LoRA training FLOPs per token: 4 x active parameters (forward 2N + input-gradient 2N;
    frozen weights get no weight gradient) plus causal attention at the mean context."""
    attn = 4 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context / 2
    return 4 * active_params(family, cfg) + attn


def trained_tokenizer(family: Any, texts: Iterable[str], vocab_size: int = 32000) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from emmoe_dist.models.tokenizer import SPECIAL_TOKENS, build_tokenizer

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    reference = build_tokenizer(family)  # same specials, eos and chat template as tiny models
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=reference.bos_token,
        eos_token=reference.eos_token,
        pad_token=reference.pad_token,
        chat_template=reference.chat_template,
        model_max_length=1 << 20,
    )
    return tok
