"""What the processes of a torch.distributed run share: whether there are several, and sums over them."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def sum_over_processes(values: dict, key: Callable[[Any], str] = str) -> dict[Any, float]:
    """Each value (a number or a 0-dim tensor) summed over all processes, as floats.

    Every process must pass the same keys; `key` names them so that all processes order them alike.
    One all-reduce of one float64 vector (on the current CUDA device under nccl); nothing when there
    is one process.
    """
    keys = sorted(values, key=key)
    if not is_distributed() or dist.get_world_size() == 1:
        return {k: float(values[k]) for k in keys}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device) for k in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked.tolist()))
