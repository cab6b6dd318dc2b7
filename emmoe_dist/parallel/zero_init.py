"""Loading a checkpoint straight into ZeRO-3 partitions (`deepspeed.zero.Init`).

Without this every rank loads the whole model onto its own device before DeepSpeed partitions
it: a Mixtral-8x7B (93 GB in bf16) cannot be fine-tuned on 80 GB GPUs however many there
are. Inside `partitioned_loading`, transformers' `from_pretrained` builds the model under
`zero.Init` (each parameter is partitioned as it is created, so a device never holds more than
its share) and copies the checkpoint in one module at a time through
`GatheredParameters` from rank 0. transformers decides this from a live `HfDeepSpeedConfig`,
which it holds only by weak reference: the object lives exactly as long as the block.

Adapters are applied afterwards on the partitioned model: our expert wrappers read shapes from
`ds_shape`, PEFT's LoRA on `nn.Linear` from `in_features`/`out_features`, and the new adapter
tensors are partitioned by `deepspeed.initialize` like any parameter created outside `zero.Init`.
Not used for tiny models (built, not loaded), QLoRA (ZeRO-2: every rank holds the 4-bit model)
or expert parallelism (each rank cuts its experts from the whole tensors before DeepSpeed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


@contextmanager
def partitioned_loading(ds_config: Mapping[str, Any]) -> Iterator[None]:
    """`from_pretrained` inside the block loads into ZeRO-3 partitions (module docstring).

    `ds_config` is the completed config handed to `deepspeed.initialize` (no "auto" values):
    zero.Init takes the partitions' dtype and placement from it.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    live = HfDeepSpeedConfig(dict(ds_config))
    if not is_deepspeed_zero3_enabled():
        raise RuntimeError("partitioned loading needs a ZeRO stage 3 config")
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del live


def resident_elements(module: Any) -> int:
    """Parameter elements this rank holds: the whole model unpartitioned, its share after
    ZeRO-3 has partitioned it (a partitioned parameter's local tensor is its placeholder)."""
    total = 0
    for p in module.parameters():
        ds_tensor = getattr(p, "ds_tensor", None)
        total += int(ds_tensor.numel()) if ds_tensor is not None else int(p.numel())
    return total
