"""Forward hooks that are always removed: the routing profiler, activation taps and steering
all observe or edit a model through hooks, and a hook left behind would silently change every
later forward of that model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self

from torch import nn
from torch.utils.hooks import RemovableHandle

Hook = Callable[[nn.Module, Any, Any], Any]


class ForwardHooks:
    """A context manager that registers (module, hook) pairs on entry and removes them on exit,
    errors included. Subclasses may compute their pairs in `hook_targets` instead."""

    def __init__(self, targets: Iterable[tuple[nn.Module, Hook]] = ()) -> None:
        self._targets = list(targets)
        self._handles: list[RemovableHandle] = []

    def hook_targets(self) -> Iterable[tuple[nn.Module, Hook]]:
        return self._targets

    def __enter__(self) -> Self:
        self._handles = [module.register_forward_hook(hook) for module, hook in self.hook_targets()]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


_GRAPH_SAFE = "emmoe_graph_safe"


def graph_safe(hook: Hook) -> Hook:
    """Mark a hook whose effect is pure tensor work on tensors that outlive the call, so that a
    CUDA graph captured through it replays it correctly (steering adds a stored vector). A hook
    with Python side effects (appending to a list, counting) runs once at capture and never on
    replay: leave it unmarked, and the generation engine runs without graphs."""
    setattr(hook, _GRAPH_SAFE, True)
    return hook


def hooks_replay_safely(model: nn.Module) -> bool:
    """True when every forward (pre-)hook on `model`'s modules is marked `graph_safe`.

    torch has no public way to list a module's hooks; its `_forward_hooks` and
    `_forward_pre_hooks` dictionaries are read, never changed."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            if any(not getattr(h, _GRAPH_SAFE, False) for h in hooks.values()):
                return False
    return True
