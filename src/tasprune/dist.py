"""Running one search or training on several processes (torchrun), or on one.

`torchrun --nproc_per_node N ...` starts N processes with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. `init_from_env()` joins them into
one process group (NCCL on CUDA, gloo on CPU) and returns a `Dist`; without
torchrun it returns the single-process `Dist` (rank 0 of 1), whose collectives
are no-ops, so the same loop code runs either way.

Data sharding follows torch's DistributedSampler: every rank draws the same
permutation of the epoch (same seed), drops the last `len % world_size` indices,
and keeps every `world_size`-th one from its rank. Batched by `global_batch /
world_size`, the ranks' k-th batches together are exactly the k-th global batch
of a single-process run with the same seed.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

__all__ = ["Dist", "env_rank", "init_from_env", "launched_by_torchrun",
           "leave_process_group", "per_rank_batch"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; `Dist()` is the single-process case."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of `indices` (DistributedSampler with drop_last=True)."""
        if not self.enabled:
            return indices
        usable = len(indices) - len(indices) % self.world_size
        return indices[:usable][self.rank::self.world_size]

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def average_gradients(self, params: Any) -> None:
        """Average the .grad of `params` over ranks in one flat all-reduce."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.enabled:
            torch_dist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int | None:
    """This process's rank as torchrun set it, or None when not launched by torchrun."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else None


def init_from_env(device_type: str = "cpu") -> Dist:
    """Join the torchrun process group (once per process) or return the single `Dist()`.

    `device_type` picks the backend: "cuda" uses NCCL (and sets this process's GPU
    to LOCAL_RANK), anything else gloo.
    """
    if not launched_by_torchrun():
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                local_rank=local_rank)


def leave_process_group() -> None:
    """Destroy the torchrun process group if this process joined one (at exit).

    Unreachable objects that hold the group (a DistributedDataParallel wrapper sits in
    a reference cycle) are collected first: freed after the group, at interpreter exit,
    they can abort the process (SIGABRT, "terminate called without an active exception").
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()


def per_rank_batch(global_batch: int, dist: Dist) -> int:
    """The batch each rank runs so that together they make `global_batch`."""
    if global_batch % dist.world_size:
        raise ValueError(f"batch size {global_batch} does not split over {dist.world_size} "
                         f"processes; use a multiple of {dist.world_size} (the batch size is "
                         "the global one, summed over processes)")
    return global_batch // dist.world_size
