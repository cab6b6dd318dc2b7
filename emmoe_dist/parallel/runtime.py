"""Process-group bootstrap shared by training, profiling and generation.

Works under `deepspeed`, `torchrun` and a plain `python` (world size 1, no process group).
On CPU the backend is gloo; on GPU nccl.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_runtime(*, process_group: bool = True) -> Runtime:
    """Join the process group the launcher set up and pick this rank's device.

    A plain `python` start (no launcher) becomes a one-rank group on 127.0.0.1, because
    DeepSpeed needs a process group even on one device. `process_group=False` skips it for
    single-process tools that never talk to other ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if (process_group or world > 1) and not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return Runtime(rank=rank, world_size=world, local_rank=local, device=device)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum in place across ranks (a no-op in a single process), from any device: NCCL only
    reduces CUDA tensors, so CPU tensors take a round trip through this rank's GPU."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group; without it gloo/nccl print warnings or hang at exit."""
    if dist.is_initialized():
        dist.destroy_process_group()
