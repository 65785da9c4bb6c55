"""torch.distributed for the sharded stages: `torchrun --nproc-per-node K` (and multi-node torchrun).

    ctx = init_distributed(device)     # from torchrun's environment; a single process when there is none
    mine = ctx.shard(range(n_batches)) # round-robin share of global work items
    everyone = ctx.all_gather(obj)     # every rank's object, in rank order
    if ctx.is_main: write(...)         # rank 0 gathers and writes

Backends: NCCL when the device is a GPU, gloo on the CPU. Work is always split into GLOBAL items
(Gen mini-batches, evaluation batches, compare grid cells) whose contents depend only on the item's
index, so every item is computed exactly as one process computes it, whichever rank runs it: K
processes give the images and predictions of one (bit for bit with the same per-process thread count
and the same device type).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["DistContext", "DistributedError", "SINGLE", "env_local_rank", "init_distributed", "leave_process_group", "shutdown"]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """torch.distributed could not be set up from the environment; the message says what to fix."""

    user_facing = True


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run. world_size 1 means no process group (plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every world_size-th item starting at its rank."""
        return list(items[self.rank::self.world_size])

    def all_gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (pickled; tensors should be on the CPU)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} ({self.backend})" if self.active else "1 process"


SINGLE = DistContext()


def env_local_rank() -> int:
    """LOCAL_RANK from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); SINGLE when WORLD_SIZE is absent or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), env_local_rank()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise DistributedError("this torch build has no NCCL; run the GPU processes with a CUDA build of torch")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot join the torchrun process group (rank {rank} of {world}, {backend}): "
                                   f"{str(e).splitlines()[0]}") from None
    return DistContext(rank, world, local, backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after a final barrier, so no rank exits while others still gather)."""
    if ctx.active:
        leave_process_group(wait=True)


def leave_process_group(wait: bool = True) -> None:
    """Leave torch.distributed's default process group if this process joined one; `wait`: after a
    barrier (the normal end), else at once (an error: another rank may never reach the barrier)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
