"""MXFP4 (OCP microscaling FP4) for fused MoE expert weights: the codec, and the fake
quantization that quantization-aware training puts in front of the experts (`train.qat: mxfp4`).

Format, as GPT-oss checkpoints store it: every block of 32 consecutive weights along the
*input* dimension shares one power-of-two scale (an E8M0 byte, exponent + 127) and each
weight is a 4-bit E2M1 code (sign, then magnitude index into 0, 0.5, 1, 1.5, 2, 3, 4, 6), two
codes a byte, the even element in the low nibble. On disk a fused `[E, in, out]` expert tensor
`name` becomes `name_blocks` uint8 `[E, out, in/32, 16]` and `name_scales` uint8
`[E, out, in/32]`, which is what transformers' `Mxfp4Config` and vLLM read.

Encoding follows NVIDIA Model Optimizer's MXFP4 (the exporter of its gpt-oss QAT recipe):
scale exponent `ceil(log2(amax / 6))`, so the largest weight of a block lands at most on 6;
a weight halfway between two codes takes the smaller magnitude. Its *fake* quantization runs
only through a CUDA extension compiled on first use (nvidia-modelopt 0.47: "Skipping extension
modelopt_cuda_ext_mx because CUDA is not available"), so the same numerics are written here
in plain torch, and tests compare the bytes with the library's `MXFP4QTensor` where it is
installed. Decoding every value of a grid tensor and encoding it again gives the same values
(the round trip is the identity on MXFP4 weights), so fake-quantizing the dequantized experts
of a real GPT-oss checkpoint changes nothing.

Quantization-aware LoRA: the frozen expert weights are replaced once, before the adapters are
added, by `dequantize(quantize(W))` (`fake_quantize_experts`). The base never trains, so doing
it once is exactly doing it on every forward, at no cost per step; the LoRA factors stay in
high precision and learn against the weights the MXFP4 export will hold for every expert the
run did not change.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily

MXFP4_BLOCK = 32  # weights per shared scale
_SCALE_BIAS = 127  # E8M0: byte = exponent + 127
_E2M1_MAX = 6.0
# Magnitudes of the 8 E2M1 codes, then the sign bit (code | 8) negates them.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes: a value on a midpoint goes down (bucketize's
# right=False), as Model Optimizer rounds.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _check_blocks(length: int, what: str) -> None:
    if length % MXFP4_BLOCK:
        raise EmmoeError(
            f"{what}: MXFP4 needs the input dimension to be a multiple of {MXFP4_BLOCK}, got {length}"
        )


def quantize_mxfp4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `rows [..., K]` along its last dimension: (blocks uint8 `[..., K/32, 16]`,
    scales uint8 `[..., K/32]`)."""
    _check_blocks(rows.shape[-1], f"tensor of shape {tuple(rows.shape)}")
    x = rows.float().contiguous().unflatten(-1, (-1, MXFP4_BLOCK))
    amax = x.abs().amax(dim=-1)
    # An all-zero block gets the smallest scale (log2(0) = -inf is clamped), as in modelopt.
    exponent = torch.ceil(torch.log2(amax / _E2M1_MAX).clamp(min=-_SCALE_BIAS))
    scaled = x / torch.exp2(exponent).unsqueeze(-1)
    midpoints = torch.tensor(_MIDPOINTS, device=x.device)
    codes = torch.bucketize(scaled.abs(), midpoints, right=False).to(torch.uint8)
    codes |= (scaled < 0).to(torch.uint8) << 3
    codes = codes.flatten(-2).unflatten(-1, (-1, 2))
    packed = codes[..., 0] | (codes[..., 1] << 4)
    blocks = packed.unflatten(-1, (-1, MXFP4_BLOCK // 2)).contiguous()
    scales = (exponent + _SCALE_BIAS).to(torch.uint8)
    return blocks, scales


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode (blocks `[..., G, 16]`, scales `[..., G]`) into `[..., G*32]` of `dtype`."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise EmmoeError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match"
        )
    signed = torch.tensor([*_E2M1, *(-v for v in _E2M1)], device=blocks.device)
    b = blocks.to(torch.uint8)
    values = torch.stack((signed[(b & 0x0F).long()], signed[(b >> 4).long()]), dim=-1)
    values = values.flatten(-2)  # [..., G, 32]: low nibble first
    exponent = scales.to(torch.int32) - _SCALE_BIAS
    return torch.ldexp(values, exponent.unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quantize_mxfp4(rows: torch.Tensor) -> torch.Tensor:
    """`dequantize(quantize(rows))` along the last dimension, in the dtype of `rows`."""
    return dequantize_mxfp4(*quantize_mxfp4(rows), dtype=rows.dtype)


# ---- fused expert tensors ------------------------------------------------------------------


def _rows(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """One expert's weight as [out, in]: MXFP4 blocks run along the input dimension."""
    return weight.transpose(-2, -1) if transposed else weight


def quantize_expert_tensor(
    weight: torch.Tensor, *, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused expert tensor (`[E, in, out]` if `transposed`, else `[E, out, in]`) in the hub's
    MXFP4 layout: (blocks `[E, out, in/32, 16]`, scales `[E, out, in/32]`), one expert at a
    time so the float32 work space stays one expert large."""
    encoded = [quantize_mxfp4(_rows(w, transposed)) for w in weight.detach()]
    return torch.stack([b for b, _ in encoded]), torch.stack([s for _, s in encoded])


def dequantize_expert_tensor(
    blocks: torch.Tensor, scales: torch.Tensor, *, transposed: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The inverse of `quantize_expert_tensor`: the fused tensor in the model's layout."""
    rows = dequantize_mxfp4(blocks, scales, dtype)
    return rows.transpose(-2, -1).contiguous() if transposed else rows


def expert_weights(model: nn.Module, family: MoEFamily) -> Iterator[tuple[str, nn.Parameter]]:
    """(state-dict name, tensor) of every fused expert weight that MXFP4 stores (no biases)."""
    from emmoe_dist.models.anatomy import moe_layers

    for layer in moe_layers(model, family):
        for name in (family.layout.gate_up, family.layout.down):
            key = f"{family.layers_path}.{layer.index}.{family.experts_path}.{name}"
            yield key, getattr(layer.experts, name)


@torch.no_grad()
def fake_quantize_experts(model: nn.Module, family: MoEFamily) -> int:
    """Replace every frozen fused expert weight by `dequantize(quantize(W))`, in place.

    The QAT step of the training order: after loading, before adapters (which wrap the experts
    module and read these tensors as they are) and before DeepSpeed or expert parallelism.
    Returns how many weights differ from before (0 for a model loaded from MXFP4).
    """
    changed = 0
    for key, weight in expert_weights(model, family):
        if hasattr(weight, "ds_shape"):
            raise EmmoeError(
                f"{key} is a ZeRO-3 partition: fake-quantize the experts before DeepSpeed "
                f"partitions them"
            )
        for e in range(weight.shape[0]):
            rows = _rows(weight[e], family.layout.transposed)
            _check_blocks(rows.shape[-1], key)
            quantized = fake_quantize_mxfp4(rows)
            changed += int((quantized != rows).sum())
            rows.copy_(quantized)  # `rows` is a view of the parameter
    return changed
