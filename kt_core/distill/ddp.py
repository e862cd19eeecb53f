"""Multi-GPU sites: one process per device with torch.distributed DDP, torchrun-compatible.

A site with several GPUs runs its local training or distillation as `torchrun --nproc-per-node N
...` (or `spawn(fn, N)` here, which sets the same environment): each process reads RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, joins a process group (NCCL on CUDA, gloo on
the CPU), trains on its DistributedSampler shard, and DDP averages gradients. Only rank 0 writes
files. `kt_core.distill.loop.fit` takes the rank, the world size and `wrap` from here.

DP-SGD under DDP is Opacus' business (DPDDP + DistributedDPOptimizer: each process clips its
per-sample gradients, rank 0 alone adds the noise, the sum is all-reduced); the participant plugs
it in through `fit(privatize=...)`, since kt_core does not do privacy.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from kt_core.distill.device import DeviceError, resolve_device

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(ValueError):
    """The torchrun environment is incomplete or inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "DistContext":
        """The torchrun variables; none set means one process. With WORLD_SIZE > 1 all five are needed."""
        if "WORLD_SIZE" not in environ:
            return cls()

        def integer(name: str, default: int | None = None) -> int:
            raw = environ.get(name)
            if raw is None:
                if default is None:
                    raise DistributedSetupError(f"{name}: not set (torchrun sets {', '.join(ENV_VARS)})")
                return default
            try:
                return int(raw)
            except ValueError:
                raise DistributedSetupError(f"{name}: not an integer: {raw!r}") from None

        world = integer("WORLD_SIZE")
        if world < 1:
            raise DistributedSetupError(f"WORLD_SIZE: must be >= 1, got {world}")
        if world == 1:
            return cls()
        rank, local = integer("RANK"), integer("LOCAL_RANK", 0)
        if not 0 <= rank < world:
            raise DistributedSetupError(f"RANK: {rank} is not in [0, WORLD_SIZE={world})")
        addr = environ.get("MASTER_ADDR")
        if not addr:
            raise DistributedSetupError("MASTER_ADDR: not set")
        return cls(rank, world, local, addr, integer("MASTER_PORT"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(ctx: DistContext, device_name: str = "auto") -> torch.device:
    """Join the process group (when distributed) and return this process's device: with CUDA,
    GPU LOCAL_RANK, so that one node's processes do not share a GPU."""
    device = resolve_device(device_name)
    if device.type == "cuda" and ctx.distributed:
        if ctx.local_rank >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK {ctx.local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                              "start at most one process per GPU")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if ctx.distributed and not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device), init_method=f"tcp://{ctx.master_addr}:{ctx.master_port}",
                                rank=ctx.rank, world_size=ctx.world_size)
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrapper(ctx: DistContext, device: torch.device) -> Callable[[nn.Module], nn.Module] | None:
    """What `fit(ddp_wrap=...)` needs: wrap the student in DDP (None when not distributed)."""
    if not ctx.distributed:
        return None

    def wrap(model: nn.Module) -> nn.Module:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    return wrap


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    fn(*args)


def spawn(fn: Callable, world_size: int, args: tuple = (), port: int | None = None,
          start_method: str = "spawn") -> None:
    """Run `fn(*args)` in `world_size` processes on this machine with the torchrun environment
    set, and wait for them; an exception in any process is raised here. With "spawn" (the safe
    default: CUDA cannot be forked) `fn` must be a module-level function; "fork" starts in a
    fraction of the time and suits CPU-only callers that have not touched CUDA."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise DistributedSetupError(f"world size must be >= 1, got {world_size}")
    mp.start_processes(_entry, args=(fn, world_size, port or free_port(), args), nprocs=world_size, join=True,
                       start_method=start_method)
