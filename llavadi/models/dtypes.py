"""Names of the floating-point types a recipe or a command line may give, and their torch dtypes."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of a name in DTYPES (None stays None: the checkpoint's own dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]
