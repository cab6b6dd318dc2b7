"""A tokenizer built locally, with no hub access, for tiny models.

Byte-level: every UTF-8 byte is one token, so any text round-trips exactly and no training
corpus is needed; the special tokens of the family's chat format are single tokens, as in the
real tokenizers, so label masking and generation prompts behave as they do on real models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emmoe_dist.families import MoEFamily

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# One set for every family keeps token ids stable across families; unused ones are harmless.
SPECIAL_TOKENS = (
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "[INST]",
    "[/INST]",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<think>",
    "</think>",
)

# Per chat format: the token that ends an assistant turn (generation stops there).
_EOS_BY_FORMAT = {"<|im_end|>": "<|im_end|>", "<|return|>": "<|return|>"}


def _eos_token(family: MoEFamily) -> str:
    for marker, eos in _EOS_BY_FORMAT.items():
        if marker in family.chat_template:
            return eos
    return "</s>"


def build_tokenizer(family: MoEFamily) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token=_eos_token(family),
        pad_token="<pad>",
        chat_template=family.chat_template,
        # Callers truncate to their own max_length; a small value here only makes transformers
        # warn about every long example it is asked to encode before truncation.
        model_max_length=1 << 20,
    )
    tok.padding_side = "left"  # generation pads on the left; training builds its own batches
    return tok
