"""What a model costs to run: parameters, weight and peak memory, generation latency and throughput.

`measure_cost` answers the same questions as the evaluation (greedy, the eval's prompts and
`max_new_tokens`) on the first questions of the set, after one untimed warm-up answer:
- latency at batch 1: ms per answer and generated tokens/s, answering `n_latency` questions one by one;
- throughput at the eval batch size: ms per answer and tokens/s over up to two full batches;
- peak memory while answering one full batch: the model's weights plus the most memory its
  generation holds at once: on CUDA from the allocator's peak (less what was resident before, so
  another model on the same device is not counted); elsewhere from the bytes of every tensor
  storage the model's operators create, counted until it is freed (CPU has no allocator statistics).
Generated tokens include the end-of-answer token. Timings are wall-clock on whatever else the
machine is doing: compare models measured in the same run.
"""

from __future__ import annotations

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llavadi.eval.generate import generate_answer_ids

DEFAULT_LATENCY_QUESTIONS = 16


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parameter_counts(model: torch.nn.Module) -> dict:
    """Parameters in total and per part (vision tower, projector, language model), as the model's family names them."""
    from llavadi.models.families import FAMILIES

    parts = {"vision_tower": 0, "projector": 0, "language_model": 0, "other": 0}
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    if family is None:
        return {"total": sum(p.numel() for p in model.parameters()), "other": sum(p.numel() for p in model.parameters())}
    found = family.parts(model)
    owner = {id(p): "language_model" for m in found.language for p in m.parameters()}
    owner.update({id(p): "vision_tower" for p in found.vision.parameters()})
    owner.update({id(p): "projector" for p in [*found.projector.parameters(), *found.projector_params]})
    for p in model.parameters():
        parts[owner.get(id(p), "other")] += p.numel()
    return {"total": sum(parts.values()), **{k: v for k, v in parts.items() if v or k != "other"}}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created by operators while active, until each is freed.

    `peak` = `base` (bytes already resident, e.g. the weights) + the most such bytes alive at once.
    """

    def __init__(self, base: int = 0):
        super().__init__()
        self.base = self.current = self.peak = base
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._live:  # views and in-place results share a counted storage
                continue
            self._live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)  # the storage's Python object lives as long as its memory
        return out


def _peak_memory(bundle, questions, batch_size: int, max_new_tokens: int) -> tuple[int, str]:
    """Peak bytes while answering one batch, and how they were measured."""
    device = next(bundle.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)  # every model on the device, the teacher's too
        generate_answer_ids(bundle, questions, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
        torch.cuda.synchronize(device)
        grown = torch.cuda.max_memory_allocated(device) - resident
        return int(weight_bytes(bundle.model) + grown), "cuda_allocator"
    with LiveTensorBytes(base=weight_bytes(bundle.model)) as meter:
        generate_answer_ids(bundle, questions, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
    return int(meter.peak), "live_tensors"


def _timed_generation(bundle, questions, batch_size: int, max_new_tokens: int) -> dict:
    device = next(bundle.model.parameters()).device
    _synchronize(device)
    t0 = time.perf_counter()
    answers = generate_answer_ids(bundle, questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  progress=False)
    _synchronize(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(a) for a in answers)
    return {"batch_size": batch_size, "answers": len(questions), "tokens": tokens,
            "ms_per_answer": round(1000.0 * seconds / len(questions), 3),
            "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None}


def measure_cost(bundle, questions: list, batch_size: int, max_new_tokens: int,
                 n_latency: int = DEFAULT_LATENCY_QUESTIONS) -> dict:
    """Parameters, weight bytes, peak memory, latency at batch 1 and throughput at `batch_size` (see module doc)."""
    if not questions:
        raise ValueError("measure_cost needs at least one question")
    if batch_size < 1 or n_latency < 1:
        raise ValueError(f"batch_size and n_latency must be >= 1, got {batch_size} and {n_latency}")
    model = bundle.model
    generate_answer_ids(bundle, questions[:1], batch_size=1, max_new_tokens=max_new_tokens, progress=False)  # warm-up
    batch = questions[:batch_size]
    peak, method = _peak_memory(bundle, batch, batch_size, max_new_tokens)
    return {
        "parameters": parameter_counts(model),
        "weight_bytes": weight_bytes(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "peak_memory_bytes": peak,
        "peak_memory_method": method,
        "batch_1": _timed_generation(bundle, questions[:n_latency], 1, max_new_tokens),
        "batch_eval": _timed_generation(bundle, questions[:2 * batch_size], batch_size, max_new_tokens),
        "max_new_tokens": max_new_tokens,
    }


def measure_costs(student, teacher, questions: list, batch_size: int, max_new_tokens: int) -> dict:
    """`{"cost": ...}` of the student and, given a teacher, `"teacher_cost"` measured next to it (same run)."""
    out = {"cost": measure_cost(student, questions, batch_size, max_new_tokens)}
    if teacher is not None:
        out["teacher_cost"] = measure_cost(teacher, questions, batch_size, max_new_tokens)
    return out
