"""The training forward: decoder hidden states, then next-token cross-entropy.

A causal LM's own forward computes `logits = lm_head(hidden)` for every position and then the
loss: for Qwen3's 151,936-token vocabulary at 8,192 tokens a micro-batch that is 2.5 GB of
bf16 logits, upcast to 5 GB of float32, read and written by several memory-bound kernels.
`CausalLMLoss` runs the decoder and hands the hidden states and the head's weight to a loss
function instead: `reference_loss`, the plain computation (the same numbers the model's own
`loss` gives: the mean over label tokens of the float32 cross-entropy), compiled on the GPU so
that upcast, log-softmax and pick are one pass (`compiled_loss`); or liger-kernel's fused
linear cross-entropy (`fused_loss`: chunks of logits that never exist all at once, the input
gradient computed in the same pass), which saves the logits' memory but measured slower.

`aux_loss_coef > 0` (router-training arms only: `train.router_aux_loss_coef`) adds the model's
own auxiliary load-balancing loss, `coef * load_balancing_loss_func(router logits)` from the
model's modeling module, as its own forward does with `output_router_logits=True`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emmoe_dist.data.chat import IGNORE_INDEX
from emmoe_dist.families import MoEFamily, num_experts, top_k
from emmoe_dist.models.anatomy import base_model, model_config

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


def compiled_loss() -> LossFn:
    """`reference_loss` compiled: the upcast, log-softmax and pick fuse into one pass over the
    logits instead of three."""
    compiled: LossFn = torch.compile(reference_loss, dynamic=None)
    return compiled


def fused_loss_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def fused_loss() -> LossFn:
    """liger-kernel's fused linear cross-entropy (CUDA)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")

    def run(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = loss(weight, hidden, targets)
        return out

    return run


class CausalLMLoss(nn.Module):
    """Wraps a (PEFT-adapted) causal LM; `forward(**batch)` returns the mean next-token loss.

    The wrapped model is `lm`; adapters, checkpoints and saves address `lm`, so its parameter
    names are the ones a plain model has. With `head_module` the head runs as a module call
    (ZeRO-3 gathers a partitioned weight in its hooks) and the loss is the reference.
    """

    def __init__(
        self,
        lm: nn.Module,
        family: MoEFamily,
        loss_fn: LossFn = reference_loss,
        *,
        head_module: bool = False,
        aux_loss_coef: float = 0.0,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.loss_fn = loss_fn
        self.head_module = head_module
        self.aux_loss_coef = aux_loss_coef
        if aux_loss_coef:
            config = model_config(lm)
            self._experts = (num_experts(family, config), top_k(family, config))
            # The model's own loss function (every transformers MoE family ships one): the
            # balancing loss it adds to its loss with output_router_logits=True.
            hf_module = importlib.import_module(type(base_model(lm)).__module__)
            self._balancing_loss: Callable[..., torch.Tensor] = hf_module.load_balancing_loss_func
        self.decoder_path = family.layers_path.rsplit(".", 1)[0]  # "model" of "model.layers"
        head = getattr(base_model(lm), "lm_head", None)
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise TypeError(f"expected a bias-free nn.Linear lm_head, found {type(head).__name__}")

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        hf = base_model(self.lm)
        decoder = hf.get_submodule(self.decoder_path)
        if self.aux_loss_coef:
            kwargs["output_router_logits"] = True
        out = decoder(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **kwargs,
        )
        hidden = out.last_hidden_state
        # Position t predicts label t+1: shift the labels, not the hidden states (no copy).
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        head = hf.get_submodule("lm_head")
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if self.head_module:
            logits = head(hidden).float()
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        else:
            weight: Any = head.weight
            loss = self.loss_fn(hidden, weight, targets)
        if self.aux_loss_coef:
            n, k = self._experts
            aux = self._balancing_loss(out.router_logits, n, k, attention_mask)
            loss = loss + self.aux_loss_coef * aux.to(loss.device)
        return loss
