"""Data-parallel evaluation: under `torchrun` or `accelerate launch`, each process answers a share of the batches.

Questions are sorted and cut into batches exactly as one process cuts them; batch k goes to the
process k mod world_size and the results are gathered back and put in order. Every batch is the
same batch a one-process run generates, so the answers, scores and KL are identical to one
process's, whatever the number of processes.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """Which batches this process runs: batch k when k % world == rank."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Whether this process runs batch `batch_index`."""
        return batch_index % self.world == self.rank

    def gather(self, local: dict[int, Any]) -> dict[int, Any]:
        """Every process's {batch index: result} merged, on every process."""
        if self.world == 1:
            return dict(local)
        parts: list = [None] * self.world
        dist.all_gather_object(parts, local)
        merged: dict[int, Any] = {}
        for part in parts:
            merged.update(part)
        return merged

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj`, on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


ONE_PROCESS = Shard()


def start_data_parallel(device: str = "auto") -> tuple[Shard, str]:
    """This process's shard and device; joins the process group when launched as several processes.

    `torchrun` and `accelerate launch` set WORLD_SIZE, RANK and LOCAL_RANK. With a GPU, `auto`
    and `cuda` become this process's `cuda:LOCAL_RANK`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ONE_PROCESS, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available() and device in ("auto", "cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size()), device


def stop_data_parallel(shard: Shard) -> None:
    """Leave the process group (after a barrier: a process leaving early aborts gloo at exit)."""
    if shard.world > 1 and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
