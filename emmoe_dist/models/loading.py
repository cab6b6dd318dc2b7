"""Load a model, its tokenizer and its MoE family from a `ModelConfig`.

`tiny:<family>` builds a small random model; anything else is a local checkpoint folder or a
hub id read with `from_pretrained`. The family comes from the config or the checkpoint's
`config.json`, so every later stage reads router and expert locations from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emmoe_dist.config import TINY_PREFIX, ModelConfig
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.families import FAMILIES, MoEFamily, get_family
from emmoe_dist.files import read_json_object
from emmoe_dist.models.tiny import build_tiny, tiny_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# `output_router_logits=True` adds `router_aux_loss_coef * load_balancing_loss` to the loss,
# which trains attention and experts towards balanced routing even with a frozen router.
_NO_AUX_LOSS = {"output_router_logits": False, "router_aux_loss_coef": 0.0}


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: MoEFamily


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """ "auto" is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if name != "auto":
        return _DTYPES[name]
    on_cuda = (
        torch.device(device).type == "cuda" if device is not None else (torch.cuda.is_available())
    )
    return torch.bfloat16 if on_cuda else torch.float32


def checkpoint_config_file(name_or_path: str, revision: str | None = None) -> Path:
    """The checkpoint's `config.json` (local folder, or the hub cache for a hub id)."""
    from transformers.utils import cached_file

    try:
        found = cached_file(name_or_path, "config.json", revision=revision)
    except OSError as e:
        raise EmmoeError(f"cannot read config.json of model {name_or_path!r}: {e}") from None
    if found is None:
        raise EmmoeError(f"model {name_or_path!r} has no config.json")
    return Path(found)


def checkpoint_family(model_cfg: ModelConfig) -> tuple[MoEFamily, Path, dict[str, Any]]:
    """The family of a checkpoint, from its `config.json` `model_type` (or `model_cfg.family`,
    which must agree), with the path and contents of that config.json."""
    path = checkpoint_config_file(model_cfg.name_or_path, model_cfg.revision)
    raw = read_json_object(path, "model config")
    model_type = raw.get("model_type")
    known = {f.model_type: f for f in FAMILIES.values()}
    if model_cfg.family is not None:
        family = get_family(model_cfg.family)
        if model_type != family.model_type:
            raise InputError(
                f"model_type {model_type!r} contradicts family {family.name!r} "
                f"(which expects {family.model_type!r})",
                file=str(path),
                field="model_type",
            )
        return family, path, raw
    if model_type not in known:
        raise InputError(
            f"model_type {model_type!r} is not a registered MoE family; known: "
            f"{', '.join(sorted(known))}",
            file=str(path),
            field="model_type",
        )
    return known[model_type], path, raw


def model_config_dict(model_cfg: ModelConfig) -> tuple[MoEFamily, dict[str, Any]]:
    """Family and full HF config (defaults filled in) without loading any weights."""
    if model_cfg.is_tiny:
        family = get_family(model_cfg.name_or_path.removeprefix(TINY_PREFIX))
        return family, dict(tiny_config(family).to_dict())
    from transformers import AutoConfig

    family, _, _ = checkpoint_family(model_cfg)
    config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    return family, dict(config.to_dict())


def _quantization_kwargs(raw_config: dict[str, Any]) -> dict[str, Any]:
    """MXFP4 checkpoints (GPT-oss) cannot be trained: dequantize to the load dtype."""
    quant = raw_config.get("quantization_config") or {}
    if quant.get("quant_method") != "mxfp4":
        return {}
    from transformers.utils.quantization_config import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def _load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
    if not tokenizer.chat_template:
        raise EmmoeError(
            f"the tokenizer of {model_cfg.name_or_path!r} has no chat template; training and "
            f"evaluation render conversations with it (use an instruct/chat checkpoint)"
        )
    return tokenizer


def load_model(
    model_cfg: ModelConfig,
    *,
    seed: int = 0,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    for_training: bool = True,
) -> LoadedModel:
    """Load (or build, for `tiny:<family>`) the model, its tokenizer and its family.

    `dtype` overrides `model_cfg.dtype`; `device_map="auto"` spreads a checkpoint too large for
    one GPU over all visible GPUs (one process); `seed` only matters for tiny models.
    With `for_training`, the router auxiliary loss is turned off (see `_NO_AUX_LOSS`).
    """
    torch_dtype = resolve_dtype(dtype or model_cfg.dtype, device)
    overrides: dict[str, Any] = dict(_NO_AUX_LOSS) if for_training else {}
    if model_cfg.experts_implementation is not None:
        overrides["experts_implementation"] = model_cfg.experts_implementation

    if model_cfg.is_tiny:
        family = get_family(model_cfg.name_or_path.removeprefix(TINY_PREFIX))
        model, tokenizer = build_tiny(family, seed, **overrides)
        # In place, as nn.Module.to is; transformers' wrapper of `to` confuses mypy.
        model.to(dtype=torch_dtype, device=device)  # type: ignore[call-arg]
        return LoadedModel(model=model, tokenizer=tokenizer, family=family)

    from transformers import AutoModelForCausalLM

    family, _, raw = checkpoint_family(model_cfg)
    if model_cfg.init == "random":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision)
        extra = {k: overrides.pop(k) for k in list(overrides) if k == "experts_implementation"}
        for key, value in overrides.items():
            setattr(config, key, value)
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **extra)
        return LoadedModel(model=model, tokenizer=_load_tokenizer(model_cfg), family=family)
    if device_map is None and device is not None:
        device_map = str(torch.device(device))
    quantization = _quantization_kwargs(raw)
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path,
        revision=model_cfg.revision,
        dtype=torch_dtype,
        device_map=device_map,
        **quantization,
        **overrides,
    )
    if quantization and any(p.dtype != torch_dtype for p in model.parameters()):
        # transformers (5.20) dequantizes MXFP4 experts to bf16 whatever dtype was asked for:
        # cast them, so that experts and the rest compute in one dtype.
        model.to(dtype=torch_dtype)  # type: ignore[call-arg]
    return LoadedModel(model=model, tokenizer=_load_tokenizer(model_cfg), family=family)


def parse_model_spec(spec: str, *, family: str | None = None, flag: str = "--model") -> ModelConfig:
    """A `ModelConfig` from a command-line `tiny:<family>` / folder / hub id argument."""
    from pydantic import ValidationError

    try:
        return ModelConfig(name_or_path=spec, family=family)
    except ValidationError as e:
        reasons = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise InputError(reasons, field=flag) from None


def load_tiny_or_path(spec: str, *, family: str | None = None, **kwargs: Any) -> LoadedModel:
    """`load_model` for a `--model` argument; keyword arguments as in `load_model`."""
    return load_model(parse_model_spec(spec, family=family), **kwargs)


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` would return, without the weights: training encodes (and
    checks) its data with it before any model loads."""
    if model_cfg.is_tiny:
        from emmoe_dist.models.tokenizer import build_tokenizer

        return build_tokenizer(get_family(model_cfg.name_or_path.removeprefix(TINY_PREFIX)))
    return _load_tokenizer(model_cfg)
