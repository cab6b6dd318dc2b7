"""QLoRA storage for MoE models: attention and fused experts held in 4-bit NF4, LoRA on top.

bitsandbytes quantizes only `nn.Linear` (bitsandbytes issue 1849), so under
`BitsAndBytesConfig` the fused 3-D expert tensors, about 96% of Mixtral's weights, stay bf16.
Here they get their own storage: `NF4Weight`, a frozen tensor that keeps the packed 4-bit
codes and one fp32 scale per block, and turns into a dense tensor only inside the op that
reads it: one expert at a time in the eager per-expert loop (`w[e]`), the whole layer for
grouped_mm and batched_mm.

Why a tensor subclass and not a `torch.nn.utils.parametrize` parametrization (which is what
`bitsandbytes.nn.parametrize.replace_parameter_4bit` registers): PEFT 0.21's `ParamWrapper`,
the LoRA on `target_parameters`, registers its own parametrization for each forward. On a
tensor that is already parametrized, (a) short names such as `mlp.experts.gate_up_proj` match
nothing (a warning, no expert LoRA), (b) it never removes its single-adapter proxy again, so
the second forward fails, (c) the inner of the two nested wrappers reads its weight under the
outer wrapper's parametrization cache, so its LoRA silently never applies, and (d) the
wrappers nest in name order, not parameter order, so adapter keys differ from a bf16 run's.
To PEFT an `NF4Weight` is an ordinary parameter: the LoRA delta adds onto the dequantized
weight, and the adapter is laid out exactly as in bf16.

Order, as the trainer applies it: `quantize_linear_nf4` (or `bnb_config()` at `from_pretrained`)
and `quantize_experts_nf4`, then LoRA, so PEFT wraps `Linear4bit` with its 4-bit LoRA layer.
Gradient checkpointing keeps one layer dequantized at a time; without it every layer's
dequantized experts stay alive until backward. Every rank holds the whole NF4 model, so QLoRA
trains with ZeRO-0/1/2 (ZeRO-3 would partition the weights by replacing their storage).

Persisting: the NF4 base is never saved (only adapters are; a run re-quantizes its base on
load), and no `dequantize_for_merge` exists on purpose: `emmoe merge` folds a QLoRA adapter
into a freshly loaded bf16 base. Merging into dequantized NF4 weights would bake the
quantization error into every weight the adapter never touched, so writes into an
`NF4Weight` raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only
from tqdm import tqdm

from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily
from emmoe_dist.models.anatomy import base_model, decoder_layers, moe_layers

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

NF4_BLOCKSIZE = 64  # elements per absmax scale: bitsandbytes' and QLoRA's default


def _dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    blocksize: int,
) -> torch.Tensor:
    from bitsandbytes.functional import QuantState, dequantize_4bit

    # Flat, then reshaped: bitsandbytes 0.50's CPU kernel misplaces the scales when a block
    # spans two rows (last dim not a multiple of the blocksize), e.g. 0.4 error for [64, 32].
    flat = torch.Size([math.prod(shape)])
    state = QuantState(
        absmax=absmax.float(), shape=flat, dtype=dtype, blocksize=blocksize, quant_type="nf4"
    )
    return dequantize_4bit(packed, state).view(shape)


class NF4Weight(torch.Tensor):
    """A frozen weight stored as NF4: `packed` uint8 (two codes a byte) and fp32 `absmax` per block.

    It reports the logical shape and compute dtype, so modules and PEFT use it like the dense
    weight it replaces. Any op dequantizes it first, except the ones that keep it packed
    (detach, clone, moving device or dtype) and `w[e]`, which dequantizes expert `e` only.
    Writing into it raises: the base stays frozen.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int

    # Ops must reach __torch_dispatch__ as plain aten calls; the default __torch_function__
    # would re-wrap their dense results as NF4Weight.
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(
        cls,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: Sequence[int],
        dtype: torch.dtype,
        blocksize: int,
    ) -> NF4Weight:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined,no-any-return]
            cls, torch.Size(shape), dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: Sequence[int],
        dtype: torch.dtype,
        blocksize: int,
    ) -> None:
        self.packed, self.absmax, self.blocksize = packed, absmax, blocksize

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        *,
        blocksize: int = NF4_BLOCKSIZE,
        dtype: torch.dtype | None = None,
    ) -> NF4Weight:
        """NF4 storage of `weight`, read back as `dtype` (default: the weight's own dtype)."""
        from bitsandbytes.functional import quantize_4bit

        packed, state = quantize_4bit(
            weight.detach().contiguous(), blocksize=blocksize, quant_type="nf4"
        )
        return cls(packed, state.absmax, weight.shape, dtype or weight.dtype, blocksize)

    def dequantize(self) -> torch.Tensor:
        return _dequantize(self.packed, self.absmax, self.shape, self.dtype, self.blocksize)

    def expert(self, index: int) -> torch.Tensor:
        """`self[index]` along dim 0, dequantizing only that slice when it spans whole blocks."""
        index = index % self.shape[0]
        per = math.prod(self.shape[1:])
        if per % self.blocksize:
            return self.dequantize()[index]
        start = index * per
        return _dequantize(
            self.packed[start // 2 : (start + per) // 2],
            self.absmax[start // self.blocksize : (start + per) // self.blocksize],
            self.shape[1:],
            self.dtype,
            self.blocksize,
        )

    def storage_bytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.absmax)

    def _like(self, packed: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> NF4Weight:
        return NF4Weight(packed, absmax, self.shape, dtype, self.blocksize)

    # `Module.to()` and DeepSpeed move a parameter by assigning `.data`, which replaces only
    # the C++ tensor; carry the packed storage along with it.
    @property  # type: ignore[override]
    def data(self) -> torch.Tensor:
        return torch.Tensor.data.__get__(self)  # type: ignore[attr-defined,no-any-return]

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if not isinstance(value, NF4Weight):
            raise EmmoeError(
                "NF4 weights cannot take dense storage (ZeRO-3 partitions parameters that way); "
                "train QLoRA with ZeRO-2, e.g. ds_configs/zero2_qlora.json"
            )
        self.packed, self.absmax, self.blocksize = value.packed, value.absmax, value.blocksize
        torch.Tensor.data.__set__(self, value)  # type: ignore[attr-defined]

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"blocksize={self.blocksize}, device={self.device})"
        )

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        special = _PACKED_OPS.get(func)
        if special is not None:
            result = special(*args, **kwargs)
            if result is not NotImplemented:
                return result
        _refuse_writes(func, args, kwargs)
        args, kwargs = tree_map_only(NF4Weight, NF4Weight.dequantize, (args, kwargs))
        return func(*args, **kwargs)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _refuse_writes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    schema = func._schema
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, NF4Weight) and arg.alias_info is not None and arg.alias_info.is_write:
            raise EmmoeError(
                f"{func}: NF4 base weights are frozen and cannot be written; merge a QLoRA "
                f"adapter into a freshly loaded bf16 base instead (emmoe merge)"
            )


def _alias(t: NF4Weight) -> NF4Weight:
    return t._like(t.packed, t.absmax, t.dtype)


def _clone(t: NF4Weight, **_: Any) -> NF4Weight:
    return t._like(t.packed.clone(), t.absmax.clone(), t.dtype)


def _to_copy(
    t: NF4Weight,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    non_blocking: bool = False,
    **_: Any,
) -> NF4Weight | Any:
    dtype = dtype or t.dtype
    if not dtype.is_floating_point:
        return NotImplemented  # a cast to an integer dtype reads the dense values
    device = device or t.device
    return t._like(
        t.packed.to(device, non_blocking=non_blocking),
        t.absmax.to(device, non_blocking=non_blocking),
        dtype,
    )


def _select(t: NF4Weight, dim: int, index: int) -> torch.Tensor | Any:
    return t.expert(index) if dim == 0 else NotImplemented


def _set_same(t: NF4Weight, source: torch.Tensor) -> NF4Weight | Any:
    # `parametrize.register_parametrization` (PEFT registers LoRA that way) sets a tensor to itself.
    return t if source is t else NotImplemented


_aten = torch.ops.aten
_PACKED_OPS: dict[Any, Callable[..., Any]] = {
    _aten.detach.default: _alias,
    _aten.alias.default: _alias,
    _aten.clone.default: _clone,
    _aten._to_copy.default: _to_copy,
    _aten.select.int: _select,
    _aten.set_.source_Tensor: _set_same,
}


# ---- the two transformations -------------------------------------------------------------


def quantize_experts_nf4(
    model: nn.Module,
    family: MoEFamily,
    *,
    blocksize: int = NF4_BLOCKSIZE,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Store every fused expert tensor of every MoE layer as a frozen `NF4Weight`, in place.

    The expert biases (GPT-oss) stay as they are: they are tiny. `compute_dtype` is the dtype
    the experts read (default: each tensor's current dtype). Tensors already in NF4 are kept.
    """
    for layer in tqdm(
        moe_layers(model, family), desc="NF4 experts", unit="layer", disable=None, leave=False
    ):
        for name in (family.layout.gate_up, family.layout.down):
            weight = getattr(layer.experts, name)
            if isinstance(weight, NF4Weight):
                continue
            nf4 = NF4Weight.quantize(weight, blocksize=blocksize, dtype=compute_dtype)
            setattr(layer.experts, name, nn.Parameter(nf4, requires_grad=False))


def quantize_linear_nf4(model: nn.Module, family: MoEFamily) -> None:
    """Replace the attention projections by bitsandbytes `Linear4bit` (NF4), in place.

    Projections that are already `Linear4bit` (loaded with `bnb_config()`) are left alone.
    Must run before LoRA: PEFT picks its 4-bit LoRA layer when it wraps the projection.
    """
    import bitsandbytes as bnb

    for i, layer in enumerate(decoder_layers(model, family)):
        attention = layer.get_submodule(family.attention)
        for name in family.attention_modules:
            linear = attention.get_submodule(name)
            if isinstance(linear, bnb.nn.Linear4bit):
                continue
            if type(linear) is not nn.Linear:
                raise EmmoeError(
                    f"layer {i}: {family.attention}.{name} is a {type(linear).__name__}, not an "
                    f"nn.Linear; quantize before adding LoRA"
                )
            setattr(attention, name, _linear4bit(linear))
    # The flag transformers' own 4-bit loader sets; PEFT reads it to use its Linear4bit LoRA.
    loaded: Any = base_model(model)
    loaded.is_loaded_in_4bit = True


def _linear4bit(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight
    # compress_statistics=False: plain fp32 absmax, as bnb_config() (no double quantization).
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=weight.dtype,
        compress_statistics=False,
        quant_type="nf4",
        device="meta",
    )
    packed: Any = bnb.nn.Params4bit(
        weight.detach(),
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=False,
        quant_type="nf4",
        module=q,
    )
    q.weight = packed.to(weight.device)  # moving an unquantized Params4bit quantizes it
    q.bias = linear.bias
    q.train(linear.training)
    return q


def bnb_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """NF4 for every `nn.Linear` at `from_pretrained`, as in HF's QLoRA recipe.

    Packed into bf16 storage, the dtype of the rest of the model, which sharding engines
    expect; the fused experts still need `quantize_experts_nf4` after loading.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


# ---- memory --------------------------------------------------------------------------------

_MIB = 2**20


@dataclass(frozen=True)
class WeightMemory:
    """Bytes a model's weights take now, against the same weights in bf16."""

    quantized_bytes: int  # 4-bit codes and their scales
    unquantized_bytes: int  # every other parameter and buffer, in its own dtype
    bf16_bytes: int  # 2 bytes per logical element of every parameter and buffer

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.unquantized_bytes

    @property
    def fraction_of_bf16(self) -> float:
        return self.total_bytes / self.bf16_bytes if self.bf16_bytes else 0.0

    def __str__(self) -> str:
        return (
            f"weight memory: {self.total_bytes / _MIB:.1f} MiB "
            f"({100 * self.fraction_of_bf16:.1f}% of bf16, {self.bf16_bytes / _MIB:.1f} MiB)"
        )


def weight_memory(model: nn.Module) -> WeightMemory:
    """Measure parameters and buffers (each shared tensor once), split into 4-bit and not."""
    quantized = unquantized = elements = 0
    for tensor in _parameters_and_buffers(model):
        if isinstance(tensor, NF4Weight):
            quantized += tensor.storage_bytes()
            elements += tensor.numel()
        elif (state := _bnb_quant_state(tensor)) is not None:
            quantized += _nbytes(tensor) + _quant_state_bytes(state)
            elements += math.prod(state.shape)
        else:
            unquantized += _nbytes(tensor)
            elements += tensor.numel()
    return WeightMemory(
        quantized_bytes=quantized, unquantized_bytes=unquantized, bf16_bytes=2 * elements
    )


def _parameters_and_buffers(model: nn.Module) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def _bnb_quant_state(tensor: torch.Tensor) -> Any:
    """The QuantState of a quantized bitsandbytes `Params4bit`, else None (no bnb import)."""
    if not getattr(tensor, "bnb_quantized", False):
        return None
    return getattr(tensor, "quant_state", None)


def _quant_state_bytes(state: Any) -> int:
    return sum(_nbytes(v) for v in state.as_dict().values() if isinstance(v, torch.Tensor))
