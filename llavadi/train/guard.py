"""What a training stage must not let pass silently: non-finite steps, samples replaced at load time.

`StepGuard` is a TrainerCallback the DistillTrainer installs. Before every optimiser step it looks
at the step's micro-batch losses and the gradient norm (one device sync per step; the Trainer's
own NaN filter, turned off by DistillTrainer so a NaN is logged as NaN, synced per micro-batch).
A non-finite step stops the run with `NonFiniteLossError` naming the step, the terms and the
samples, before the optimiser can write NaN into the weights, so the last checkpoint stays good;
with `max_skips` > 0 up to that many such steps are skipped instead: every gradient is dropped
(the optimiser then leaves all weights and moments alone), the step's losses are taken out of
the logged means, and the step is listed in the stage's report. With several processes the
decision is all-reduced, so every rank stops or skips together.

The guard also keeps what the stage's report needs across resumes (the loss summed over all
steps, skipped steps, replaced samples); `ledger()` is stored in each checkpoint's marker.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from llavadi.distributed import is_distributed

SHOWN_IDS = 8
logger = logging.getLogger("llavadi")


class NonFiniteLossError(RuntimeError):
    """Training stopped at a step whose loss or gradient was NaN or infinite."""


def gather_lists(items: list) -> list:
    """The concatenation of every process's `items` (the list itself with one process)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return list(items)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(items))
    return [x for part in everyone for x in part]


def _any_rank(flag: bool, device) -> bool:
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _value(v) -> float:
    return float(v.detach().float().cpu()) if isinstance(v, torch.Tensor) else float(v)


class StepGuard(TrainerCallback):
    """Stops (or skips, up to `max_skips`) optimisation steps whose loss or gradient is not finite."""

    def __init__(self, trainer, max_skips: int = 0) -> None:
        self.trainer = trainer
        self.max_skips = int(max_skips)
        self.window: list[tuple] = []  # (loss, terms, sample ids) of the micro-batches of this step
        self.grad_norm = None
        self._snapshot = None
        # what the stage's report needs, carried over resumes through checkpoint markers
        self.prior_loss_sum = 0.0
        self.prior_replaced: list[dict] = []  # all processes', from the checkpoint resumed
        self.replaced: list[dict] = []  # this process's, since then
        self.skipped: list[dict] = []  # the same on every process (the decision is all-reduced)
        self.interval_skipped = 0
        self.logged_at = 0  # global step of the last logged loss

    # ---- fed by the trainer
    def start_window(self) -> None:
        """A new optimisation step begins: remember the running sums to restore if it is skipped."""
        t = self.trainer
        self.window = []
        self.grad_norm = None
        self._snapshot = (t._tr_loss.clone() if isinstance(getattr(t, "_tr_loss", None), torch.Tensor) else None,
                          dict(t._term_sums), t._term_count)

    def record(self, loss: torch.Tensor, terms: dict, inputs: dict) -> None:
        """One micro-batch's loss, terms and samples (no device sync)."""
        self.window.append((loss.detach(), {k: v.detach() for k, v in terms.items()}, list(inputs.get("sample_ids", []))))
        for r in inputs.get("replaced_samples", ()):
            self.replaced.append(dict(r))
            logger.warning("sample %r could not be loaded and was replaced (%s)", r.get("sample_id"), r.get("reason"))

    # ---- the check, between the backward passes and the optimiser step
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Stop or skip the step if a micro-batch loss or the gradient norm is not finite (on any process)."""
        finite = torch.stack([torch.isfinite(loss).all() for loss, _, _ in self.window]).all() if self.window else True
        bad_grad = self.grad_norm is not None and not math.isfinite(_value(self.grad_norm))
        device = self.window[0][0].device if self.window else torch.device("cpu")
        if not _any_rank(not bool(finite) or bad_grad, device):
            return control
        step = state.global_step + 1
        what = self._describe(step, bad_grad)
        if len(self.skipped) >= self.max_skips:
            allowed = (f"{self.max_skips} were allowed and skipped already" if self.max_skips
                       else "set train.max_nonfinite_skips: N to skip up to N such steps instead")
            raise NonFiniteLossError(f"{what}. Stopped before the optimiser step: no weight took it, the last "
                                     f"checkpoint is kept, nothing is published ({allowed}). Lower the learning "
                                     "rate (rerun with --force: the stage starts afresh), or fix these samples "
                                     "(rerunning resumes from the last checkpoint).")
        self._skip(step, what)
        return control

    def _describe(self, step: int, bad_grad: bool) -> str:
        parts, ids = [], []
        for loss, terms, sample_ids in self.window:
            if not bool(torch.isfinite(loss).all()):
                bad = {k: _value(v) for k, v in terms.items() if not math.isfinite(_value(v))}
                parts.append(", ".join(f"{k}={v}" for k, v in bad.items()) or f"loss={_value(loss)}")
                ids.extend(sample_ids)
        if bad_grad:
            parts.append(f"gradient norm={_value(self.grad_norm)}")
            if not ids:
                ids = [i for _, _, sample_ids in self.window for i in sample_ids]
        shown = ", ".join(map(str, ids[:SHOWN_IDS])) + (f" (+{len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else "")
        rank = f" on rank {dist.get_rank()}" if is_distributed() else ""
        return f"step {step}: non-finite {'; '.join(parts) or 'loss on another rank'} (samples{rank}: {shown or '-'})"

    def _skip(self, step: int, what: str) -> None:
        """Drop the step: no gradient (the optimiser leaves weights and moments alone), its losses unlogged."""
        for p in self.trainer.model.parameters():
            p.grad = None
        tr_loss, term_sums, term_count = self._snapshot
        if tr_loss is not None:
            self.trainer._tr_loss.copy_(tr_loss)
        self.trainer._term_sums, self.trainer._term_count = term_sums, term_count
        self.skipped.append({"step": step, "what": what})
        self.interval_skipped += 1
        logger.warning("%s; step skipped (%d of at most %d)", what, len(self.skipped), self.max_skips)

    # ---- logging and the stage's totals
    def on_train_begin(self, args, state, control, **kwargs):
        """Logging intervals start at the step training starts from (a resume's checkpoint)."""
        self.logged_at = state.global_step
        return control

    def adjust_log(self, logs: dict, step: int) -> None:
        """Logged `loss` as the mean over the interval's steps that were not skipped (skipped ones added 0)."""
        if "loss" not in logs:
            return
        interval, self.logged_at = step - self.logged_at, step
        if self.interval_skipped:
            kept = interval - self.interval_skipped
            logs["loss"] = logs["loss"] * interval / kept if kept > 0 else float("nan")
            logs["nonfinite_steps_skipped"] = self.interval_skipped
            self.interval_skipped = 0

    def restore(self, ledger: dict | None) -> None:
        """Carry the totals of the checkpoint a resumed run starts from."""
        ledger = ledger or {}
        self.prior_loss_sum = float(ledger.get("loss_sum") or 0.0)
        self.skipped = list(ledger.get("nonfinite_skipped", []))
        self.prior_replaced = list(ledger.get("replaced_samples", []))
        self.replaced = []

    def ledger(self, loss_sum_this_run: float, step: int) -> dict:
        """The stage's totals up to `step` (collective with several processes: call on every rank)."""
        skipped, replaced = self.skipped, self.prior_replaced + gather_lists(self.replaced)
        loss_sum = self.prior_loss_sum + loss_sum_this_run
        counted = step - len(skipped)
        finite = math.isfinite(loss_sum)  # JSON has no NaN; a non-finite step never gets this far anyway
        return {"step": step, "loss_sum": loss_sum if finite else None, "counted_steps": counted,
                "train_loss": loss_sum / counted if counted > 0 and finite else None,
                "nonfinite_skipped": skipped, "replaced_samples": replaced}
