"""The shared LM-head pass of CE and every logit term: only at selected positions, in chunks.

The union of the positions that CE and the logit terms select is gathered once; the student's LM
head (and the dense teacher's) runs on those rows only, ``chunk_size`` rows at a time. Each chunk
is wrapped in activation checkpointing, so full (N, V) logits of both models never exist at once,
in forward or backward (a chunk's logits are recomputed in backward). ``chunk_size=None`` is the
plain path (one chunk, no checkpointing): same functions, same values.

A top-k teacher (``ModelView.topk_ids`` / ``topk_logprobs``) replaces the teacher's LM head by its
stored top-k per position; the logit terms then use their sparse form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llavadi.distill.positions import prediction_rows, require_mapped
from llavadi.distill.selection import IGNORE_INDEX, shifted_labels
from llavadi.distill.view import ModelView

Tensor = torch.Tensor


def _slot_masks(student: ModelView, labels: Tensor, ce: bool, terms: list) -> Tensor:
    """(B*T, n_slots) membership of every position in CE (first, when on) and each logit term's selection."""
    masks = ([shifted_labels(labels) != IGNORE_INDEX] if ce else [])
    masks += [term.selection().mask(student.token_types) for term in terms]
    return torch.stack(masks, dim=-1).reshape(-1, len(masks))


def _teacher_inputs(student: ModelView, teacher: ModelView, rows: Tensor, needs_teacher: Tensor,
                    device: torch.device) -> tuple[Tensor, ...]:
    """The teacher's rows matching the student's: last hidden states (dense) or top-k ids and log-probs."""
    types_s, types_t = student.token_types, teacher.token_types
    batch, length = types_s.shape
    rows_t = prediction_rows(types_s, types_t)[rows]
    require_mapped(rows_t[needs_teacher], (rows // length)[needs_teacher], types_s, types_t, "logit terms")
    rows_t = rows_t.clamp_min(0)
    t_len = types_t.shape[1]
    if teacher.is_topk:
        k = teacher.topk_ids.shape[-1]
        where = teacher.topk_ids.device
        return (teacher.topk_ids.reshape(batch * t_len, k)[rows_t.to(where)].to(device),
                teacher.topk_logprobs.reshape(batch * t_len, k)[rows_t.to(where)].detach().to(device))
    if teacher.last_hidden is None or teacher.lm_head is None:
        raise ValueError("logit terms need the teacher's last hidden state and LM head, or its top-k ids and log-probs")
    t_hidden = teacher.last_hidden.detach()  # rows stay on the teacher's device: its LM head runs there
    return (t_hidden.reshape(batch * t_len, -1)[rows_t.to(t_hidden.device)],)


def _chunk_sums(student: ModelView, teacher: ModelView | None, slots: list, hidden_chunk: Tensor,
                target_chunk: Tensor, member_chunk: Tensor, *teacher_chunk: Tensor) -> Tensor:
    """(n_slots,) sums of CE and each logit term over one chunk of rows."""
    logits_s = student.lm_head(hidden_chunk).float()
    sparse = teacher is not None and teacher.is_topk
    logits_t = None
    if teacher_chunk and not sparse:
        with torch.no_grad():
            logits_t = teacher.lm_head(teacher_chunk[0]).float().to(logits_s.device)
        if logits_t.shape[-1] != logits_s.shape[-1]:
            raise ValueError(f"student vocabulary {logits_s.shape[-1]} != teacher vocabulary {logits_t.shape[-1]}: "
                             "logit terms need a shared tokenizer and LM head size")
    out = []
    for j, term in enumerate(slots):
        sel = member_chunk[:, j]
        if not bool(sel.any()):  # this chunk has no row of this slot
            out.append(logits_s.sum() * 0.0)
        elif term is None:
            out.append(F.cross_entropy(logits_s[sel], target_chunk[sel], reduction="sum"))
        elif sparse:
            out.append(term.sparse(logits_s[sel], teacher_chunk[0][sel], teacher_chunk[1][sel]).sum())
        else:
            out.append(term.dense(logits_s[sel], logits_t[sel]).sum())
    return torch.stack(out)


def logit_sums(student: ModelView, teacher: ModelView | None, labels: Tensor, ce: bool, terms: list,
               chunk_size: int | None) -> list[Tensor]:
    """Sums of CE (first, when `ce`) and of each logit term over their selected positions."""
    slots = ([None] if ce else []) + list(terms)
    if not slots:
        return []
    if student.last_hidden is None or student.lm_head is None:
        raise ValueError("CE and logit terms need the student's last hidden state and LM head")
    batch, length, width = student.last_hidden.shape
    member_full = _slot_masks(student, labels, ce, terms)
    rows = member_full.any(dim=-1).nonzero().squeeze(1)
    member = member_full[rows]
    hidden_s = student.last_hidden.reshape(batch * length, width)[rows]
    row_targets = shifted_labels(labels).reshape(-1)[rows]
    teacher_inputs: tuple[Tensor, ...] = ()
    if terms:
        needs_teacher = member[:, 1 if ce else 0:].any(dim=-1)
        teacher_inputs = _teacher_inputs(student, teacher, rows, needs_teacher, hidden_s.device)

    def run_chunk(*args):
        return _chunk_sums(student, teacher, slots, *args)

    totals = hidden_s.new_zeros(len(slots), dtype=torch.float32) + student.last_hidden.sum() * 0.0
    step = chunk_size or max(rows.shape[0], 1)
    for start in range(0, rows.shape[0], step):
        args = (hidden_s[start:start + step], row_targets[start:start + step], member[start:start + step])
        args += tuple(x[start:start + step] for x in teacher_inputs)
        if chunk_size is None:
            totals = totals + run_chunk(*args)
        else:  # recompute the chunk's logits in backward instead of storing them
            totals = totals + checkpoint(run_chunk, *args, use_reentrant=False)
    return list(totals.unbind(0))
