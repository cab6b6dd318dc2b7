"""`torch.compile` of the decoder layers, for the elementwise work between the GEMMs.

A profile of a LoRA step on an MoE model puts over a third of the GPU time in small kernels:
RMSNorm's float32 round trips, rotary embeddings, PEFT's LoRA adds on attention, residual
adds, the router's softmax and top-k. Compiling each decoder layer fuses them. Two parts run
eagerly inside the compiled layers and are marked so: the fused expert pass (its own
autograd function, `adapters/expert_pass.py`) and the packed-attention kernel call, whose
segment lengths change with every micro-batch.
"""

from __future__ import annotations

from torch import nn

from emmoe_dist.families import MoEFamily
from emmoe_dist.models.anatomy import decoder_layers


def compile_decoder_layers(model: nn.Module, family: MoEFamily) -> int:
    """Compile every decoder layer in place (lazily, at its first call); returns how many.

    A layer the compiler cannot handle runs eagerly (with the compiler's warning) rather than
    stopping a run: compilation is a speed-up, never a requirement.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    layers = decoder_layers(model, family)
    for layer in layers:
        layer.compile(dynamic=None)
    return len(layers)
