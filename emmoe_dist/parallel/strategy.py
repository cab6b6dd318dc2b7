"""The one object that owns DeepSpeed: engine creation, steps, gathers for saving, checkpoints.

The trainer talks only to `DeepSpeedStrategy`; model, adapter and data code never import
deepspeed. On CPU (tests, the embedded default) DeepSpeed runs with its CPU accelerator and
gloo; set `DS_ACCELERATOR=cpu` before launching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emmoe_dist.config import TrainConfig
from emmoe_dist.errors import EmmoeError
from emmoe_dist.parallel.ds_config import zero_stage
from emmoe_dist.parallel.runtime import Runtime


def lr_lambda(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Warmup then constant, linear or cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.scheduler == "constant":
            return 1.0
        span = max(1, total_steps - train.warmup_steps)
        frac = min(1.0, (step - train.warmup_steps) / span)
        if train.scheduler == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor


def optimizer_problem(name: str) -> str | None:
    """Why `train.optimizer` cannot run with the installed torch and DeepSpeed (None: it can).

    torch.optim.Muon (torch >= 2.9) refuses ZeRO's flat 1-D partitions, so Muon is DeepSpeed's
    ZeRO-aware one (deepspeed.runtime.zero.muon, DeepSpeed >= 0.18), which orthogonalizes each
    matrix's whole update before it is partitioned."""
    if name == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        return f"torch {torch.__version__} has no torch.optim.Adafactor (torch >= 2.5 has)"
    if name == "muon":
        try:
            from deepspeed.runtime.config import MUON_OPTIMIZER  # noqa: F401
        except ImportError:
            import deepspeed

            return (
                f"DeepSpeed {deepspeed.__version__} has no ZeRO-aware Muon (DeepSpeed >= 0.18 "
                "has; torch.optim.Muon cannot step ZeRO's flat partitions)"
            )
    return None


def _torch_optimizer(train: TrainConfig, params: list[nn.Parameter], cuda: bool) -> Any:
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=train.lr, momentum=train.momentum_value, weight_decay=train.weight_decay
        )
    if train.optimizer == "adafactor":
        # On ZeRO's flat partitions Adafactor keeps one second moment per element (its
        # unfactored form): the update rule stays Adafactor's, its memory saving does not.
        return torch.optim.Adafactor(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(
        params, lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.999), fused=cuda
    )


class DeepSpeedStrategy:
    def __init__(self, ds_config: dict[str, Any], runtime: Runtime) -> None:
        self.ds_config = ds_config
        self.runtime = runtime
        self.engine: Any = None

    @property
    def zero3(self) -> bool:
        return zero_stage(self.ds_config) == 3

    def setup(self, model: nn.Module, train: TrainConfig, total_steps: int) -> Any:
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        problem = optimizer_problem(train.optimizer)
        if problem is not None:
            raise EmmoeError(f"train.optimizer: {problem}")
        factor = lr_lambda(train, total_steps)

        def schedule(optimizer: torch.optim.Optimizer) -> Any:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

        if train.optimizer == "muon":
            # DeepSpeed builds its Muon from the config (it tags matrices `use_muon`; anything
            # else gets its auxiliary Adam); the schedule is applied to what it built.
            config = {
                **self.ds_config,
                "optimizer": {
                    "type": "Muon",
                    "params": {
                        "lr": train.lr,
                        "momentum": train.momentum_value,
                        "weight_decay": train.weight_decay,
                    },
                },
            }
            if self.zero3:
                # DeepSpeed's ZeRO-3 Muon needs whole gradients, not reduce-scattered shards.
                config["zero_optimization"] = {
                    **config["zero_optimization"],
                    "reduce_scatter": False,
                }
            self.engine, _, _, _ = deepspeed.initialize(
                model=model,
                model_parameters=params,
                lr_scheduler=schedule,
                config=config,
                dist_init_required=False,
            )
            return self.engine
        optimizer = _torch_optimizer(train, params, self.runtime.device.type == "cuda")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=schedule(optimizer),
            config=self.ds_config,
            dist_init_required=False,
        )
        return self.engine

    # --- one micro-batch -------------------------------------------------------------------
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        """Called after every micro-batch; DeepSpeed steps the optimizer at accumulation ends."""
        self.engine.step()

    @property
    def at_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def grad_norm(self) -> torch.Tensor | float | None:
        """The last step's global gradient norm as the engine holds it (often a device tensor,
        not read here: reading it waits for the step)."""
        norm = self.engine.get_global_grad_norm()
        return norm.detach() if isinstance(norm, torch.Tensor) else norm

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # --- saving ------------------------------------------------------------------------------
    @contextmanager
    def gathered(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Full values of (possibly ZeRO-3-partitioned) parameters inside the block."""
        if not self.zero3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    def trainable_state(
        self, model: nn.Module, select: Callable[[str], bool]
    ) -> dict[str, torch.Tensor]:
        """CPU copies of the named trainable tensors, gathered from all ranks (every rank calls)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and select(n)]
        with self.gathered([p for _, p in named]):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}

    def save_checkpoint(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        # DeepSpeed writes the tag folder, then the `latest` file: a crash mid-save leaves the
        # previous `latest` pointing at a complete checkpoint. Frozen weights are left out: a
        # resume loads them from the model again, as the run did (by default DeepSpeed writes
        # the whole module: 24 GB and 44 s per save for a 4-layer Mixtral LoRA on an H100,
        # benchmarks/RESULTS.md call F).
        self.engine.save_checkpoint(
            str(folder), tag=tag, client_state=client_state, exclude_frozen_parameters=True
        )

    @staticmethod
    def latest_tag(folder: Path) -> str | None:
        """The tag of the last complete checkpoint in `folder` (DeepSpeed's `latest` file)."""
        latest = folder / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def load_checkpoint(self, folder: Path) -> dict[str, Any] | None:
        if self.latest_tag(folder) is None:
            return None
        _, client_state = self.engine.load_checkpoint(
            str(folder),
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=load_trainable_state,
        )
        return client_state


def load_trainable_state(src: dict[str, Any], dst: nn.Module) -> None:
    """Load a checkpoint's module state that leaves out the frozen weights (`save_checkpoint`).

    Strict about everything else: each trainable tensor must be there, and no key may be
    unknown. A checkpoint written whole (with its frozen weights) loads whole. Entries filed
    under a frozen weight (bitsandbytes keeps an NF4 weight's quantization state as
    `<weight>.absmax` and the like) are skipped when the weight itself is absent.
    """
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    absent = frozen - set(src)
    kept = {k: v for k, v in src.items() if not _filed_under(k, absent)}
    result = dst.load_state_dict(kept, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise EmmoeError(
            "the checkpoint does not match the model: "
            + "; ".join(
                f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unknown", result.unexpected_keys))
                if keys
            )
        )


def _filed_under(key: str, names: set[str]) -> bool:
    """Whether `key` is `<name>.<something>` for one of `names`."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))
