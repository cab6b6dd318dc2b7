"""Tiny random MoE models of every registered family, for tests and CPU smoke runs.

The shape comes from `MoEFamily.tiny`; vocabulary and special-token ids come from the local
byte-level tokenizer, so a tiny model and its tokenizer always agree.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily, get_family
from emmoe_dist.models.tokenizer import build_tokenizer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast


def _family(family: MoEFamily | str) -> MoEFamily:
    return family if isinstance(family, MoEFamily) else get_family(family)


def tiny_config(
    family: MoEFamily | str, vocab_size: int | None = None, **overrides: Any
) -> PretrainedConfig:
    """The family's tiny transformers config; `overrides` win over the registry's values.

    `vocab_size` defaults to the local tokenizer's size; bos/eos/pad ids always come from that
    tokenizer (without them transformers warns on every generate call).
    """
    import transformers

    fam = _family(family)
    tok = build_tokenizer(fam)
    config_class = getattr(transformers, fam.config_class)
    values: dict[str, Any] = {
        **fam.tiny,
        "vocab_size": vocab_size if vocab_size is not None else len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **overrides,
    }
    config: PretrainedConfig = config_class(**values)
    return config


def build_tiny(
    family: MoEFamily | str, seed: int = 0, **overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random fp32 model (deterministic for a given seed) and its tokenizer.

    The global RNG is left untouched, so building a model never changes a caller's random stream.
    """
    from transformers import AutoModelForCausalLM

    fam = _family(family)
    config = tiny_config(fam, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()  # as `from_pretrained` returns it
    return model, build_tokenizer(fam)


def save_tiny(family: MoEFamily | str, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer with `save_pretrained`, as a real checkpoint folder.

    The folder appears complete or not at all: it is written beside the target, then renamed.
    """
    target = Path(path)
    if target.exists() and any(target.iterdir()):
        raise EmmoeError(f"{target}: folder exists and is not empty; choose a new path")
    model, tokenizer = build_tiny(family, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
