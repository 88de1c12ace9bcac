"""The shared LM-head pass of CE and every logit term: only at selected positions, in chunks, fused.

The union of the positions that CE and the logit terms select is gathered once; within a chunk, a
slot that reads every row reads the chunk itself (rows are copied only for a slot reading some).
Each "slot" (CE first when on, then each logit term) has a coefficient c_j = weight_j / global
count_j, known before the pass (the objective's normalisers), so the pass returns the loss share
sum_j c_j * sum_j and the detached per-slot sums (for logging).

Fused path (default, ``FusedLogitLoss``): per chunk of selected rows, the student's logits (one
matmul) and the dense teacher's (one matmul, no grad, computed once), one log-softmax per model
and temperature shared by CE and every term (``logits.LogitRows``), each slot's per-row values
AND sum_j c_j * (their gradient w.r.t. the student logits) in closed form; then that gradient is
projected to the chunk's hidden rows and to the LM-head weight (two matmuls). Backward only
scales the stored gradients: four large matmuls per chunk, no recompute, and nothing of size
positions x vocabulary outlives a chunk. Logits are the LM head's output in the model's dtype (as
the model's own forward gives them), upcast to float32 for the softmax; gradients are accumulated
in float32 and returned in the input dtypes.

Plain path (``fused=False``): the logits of all selected rows at once, each slot's sum by
``F.cross_entropy`` / the term's ``dense`` / ``sparse`` and autograd: the reference the fused path
is tested against.

A top-k teacher (``ModelView.topk_ids`` / ``topk_logprobs``) replaces the teacher's LM head by its
stored top-k per position; the logit terms then use their sparse form.

Same tokenizer up to additions (a ``SharedVocab``, ``llavadi.distill.vocab``): both LM heads are
read in shared-first row order; the logit terms compare the two distributions over the shared
tokens (the teacher's logits are computed over its shared rows only), CE reads the student's
whole vocabulary, and two more sums come back after the slots': the teacher's and the student's
probability mass outside the shared tokens, over the rows of the first logit term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llavadi.config import DEFAULT_CHUNK_MIB
from llavadi.distill.logits import LogitRows, target_nll, upcast
from llavadi.distill.positions import prediction_rows, require_mapped
from llavadi.distill.selection import IGNORE_INDEX, shifted_labels
from llavadi.distill.view import ModelView
from llavadi.distill.vocab import SharedVocab

Tensor = torch.Tensor


def head_weights(view: ModelView) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight (V, H) and bias (V,) or None: the one place the pass reads them.

    Sharding engines hand it over whole, once per forward (llavadi.train.engines): under ZeRO-3 the
    student's head is an external parameter of the trainable module, gathered for its whole forward
    and backward, and the teacher's is a gathered copy; FSDP2 unshards the root module's parameters
    (the head among them) for its forward. A sharded weight here was read outside those.
    """
    head = view.lm_head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the {view.who}'s LM head is a {type(head).__name__}, not an nn.Linear: the logit pass "
                         "computes logits as hidden @ weight.T + bias and cannot honour a head that does more (e.g. "
                         "an adapter on it); merge it first")
    weight = head.weight
    if _is_dtensor(weight) or weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"the {view.who}'s LM head weight is sharded ({type(weight).__name__} of shape "
                         f"{tuple(weight.shape)}): the logit pass reads it whole; run it inside the forward of the "
                         "module the engine shards (DistillationModule), where FSDP2 and ZeRO-3 have gathered it")
    return weight, head.bias


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(tensor, DTensor)


def rows_per_chunk(vocab: int, chunk_size: int | None, chunk_mib: float) -> int:
    """Selected positions per chunk: `chunk_size`, or as many as keep one model's fp32 logits within `chunk_mib` MiB."""
    if chunk_size is not None:
        return chunk_size
    return max(1, int(chunk_mib * 2**20) // (4 * vocab))


@dataclass
class _Rows:
    """The selected rows of one micro-batch, on the host: which positions, which slots, CE targets."""

    index: Tensor  # (n,) flat positions
    member: Tensor  # (n, n_slots) bool
    targets: Tensor  # (n,) CE targets (IGNORE_INDEX where CE does not read the row)

    @property
    def n(self) -> int:
        """Number of rows."""
        return self.member.shape[0]


def _select_rows(types: Tensor, labels: Tensor, ce: bool, terms: list) -> _Rows:
    """Rows that CE or a logit term reads, from the host copies of the student's token types and labels."""
    targets = shifted_labels(labels.cpu()).reshape(-1)
    masks = ([targets != IGNORE_INDEX] if ce else []) + [term.selection().mask(types).reshape(-1) for term in terms]
    member = torch.stack(masks, dim=-1)
    index = member.any(dim=-1).nonzero().squeeze(1)
    return _Rows(index, member[index], targets[index])


def _consecutive(index: Tensor) -> slice | None:
    """The host index as a slice when it is first, first + 1, ..., else None."""
    if len(index) and torch.equal(index, torch.arange(int(index[0]), int(index[0]) + len(index))):
        return slice(int(index[0]), int(index[0]) + len(index))
    return None


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """Rows `index` (on the host) of x: a view when they are consecutive, else a copy."""
    span = _consecutive(index)
    return x[span] if span is not None else x[index.to(x.device)]


@dataclass
class _TeacherRows:
    """The teacher's signal at the selected rows: a dense teacher's hidden states and LM head, or its top-k."""

    hidden: Tensor | None = None  # (B * T_t, H_t) last hidden states, on the teacher's device (its head runs there)
    index: Tensor | None = None  # (n,) host: the teacher row of each selected student row
    head: tuple[Tensor, Tensor | None] | None = None  # its LM head's weight and bias (the shared rows, with a map)
    other_head: tuple[Tensor, Tensor | None] | None = None  # with a map: its rows of tokens the student lacks
    topk_ids: Tensor | None = None  # (n, k) on the student's device (with a map: shared positions, -1 outside)
    topk_logprobs: Tensor | None = None
    topk_outside: Tensor | None = None  # (n,) with a map: the top-k mass on tokens the student lacks

    def hidden_rows(self, chunk: slice) -> Tensor:
        """The dense teacher's hidden states at the chunk's rows."""
        return _gather(self.hidden, self.index[chunk])


def _teacher_rows(types_s: Tensor, student: ModelView, teacher: ModelView, rows: _Rows, first_term: int,
                  vocab: SharedVocab | None) -> _TeacherRows:
    """The teacher's rows matching the student's: last hidden states (dense) or top-k ids and log-probs."""
    types_t = teacher.token_types.cpu()
    batch, length = types_s.shape
    rows_t = prediction_rows(types_s, types_t)[rows.index]
    needs_teacher = rows.member[:, first_term:].any(dim=-1)
    require_mapped(rows_t[needs_teacher], (rows.index // length)[needs_teacher], types_s, types_t, "logit terms")
    rows_t = rows_t.clamp_min(0)
    t_len = types_t.shape[1]
    if teacher.is_topk:
        k, device = teacher.topk_ids.shape[-1], student.last_hidden.device
        ids, logprobs = teacher.topk_ids.reshape(batch * t_len, k), teacher.topk_logprobs.reshape(batch * t_len, k)
        ids, logprobs = _gather(ids, rows_t).to(device), _gather(logprobs, rows_t).detach().to(device)
        if vocab is None:
            return _TeacherRows(topk_ids=ids, topk_logprobs=logprobs)
        mapped, mapped_logprobs = vocab.map_topk(ids, logprobs)  # the cache holds teacher ids: mapped when read
        outside = torch.where(mapped < 0, upcast(logprobs).exp(), torch.zeros((), device=device)).sum(-1)
        return _TeacherRows(topk_ids=mapped, topk_logprobs=mapped_logprobs, topk_outside=outside)
    if teacher.last_hidden is None or teacher.lm_head is None:
        raise ValueError("logit terms need the teacher's last hidden state and LM head, or its top-k ids and log-probs")
    head, other = head_weights(teacher), None
    if vocab is not None:
        vocab.check_heads(student.lm_head.weight.shape[0], head[0].shape[0])
        head, other = vocab.teacher_heads(*head)
    return _TeacherRows(hidden=teacher.last_hidden.detach().reshape(batch * t_len, -1), index=rows_t,
                        head=head, other_head=other)


class _Workspace:
    """The chunk-sized buffers of one pass, allocated once and reused by every chunk.

    Per model two (rows, V) buffers: the LM head writes its logits into the first, their log-softmax
    goes into the second, and (unless a term reads raw logits) their probabilities overwrite the first.
    Plus the gradient buffer. Reuse keeps the allocator out of the loop: no per-chunk page faults, and
    no heap fragmentation from chunk-sized blocks freed and allocated again.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, teacher_vocab: int | None,
                 gradient: bool) -> None:
        def buffers(n: int, width: int) -> list[Tensor]:
            return [torch.empty(rows, width, dtype=dtype, device=device) for _ in range(n)]

        self.student = buffers(2, vocab)
        self.teacher = buffers(2, teacher_vocab) if teacher_vocab else None
        self.grad = buffers(1, vocab)[0] if gradient else None


def _head_into(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """h @ weight.T + bias written into `out` (float32 or float64); a low-precision head computes in its dtype first."""
    if weight.dtype != out.dtype or weight.device != out.device:
        return out.copy_(F.linear(h, weight, bias))  # the model's logits, as its own forward gives them, upcast
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


class _ChunkedPass:
    """The fused pass's work: per chunk, logits, every slot's values and their weighted gradient, projected."""

    def __init__(self, slots: list, coefs: list[float], rows: _Rows, teacher: _TeacherRows | None, step: int,
                 vocab: SharedVocab | None = None) -> None:
        self.slots, self.coefs, self.rows, self.teacher, self.step = slots, coefs, rows, teacher, step
        self.keep_raw = any(term is not None and term.reads_raw_logits() for term in slots)
        self.vocab = vocab
        self.targets = rows.targets if vocab is None else vocab.student_targets(rows.targets)
        self.mass_slot = next((j for j, term in enumerate(slots) if term is not None), None)
        self.n_sums = len(slots) + (2 if vocab is not None and self.mass_slot is not None else 0)

    def run(self, hidden: Tensor, weight: Tensor, bias: Tensor | None,
            needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, tuple]:
        """(weighted total, per-slot sums (+ outside masses), gradients of hidden (all its rows) / weight / bias)."""
        device, acc, n_rows = hidden.device, torch.promote_types(weight.dtype, torch.float32), self.rows.n
        if self.vocab is not None:  # shared-first row order; the gradients are put back in the original order
            weight, bias = self.vocab.student_head(weight, bias)
        grad_h = torch.zeros_like(hidden) if needs[0] else None  # rows without a loss get zero
        grad_w = None
        if needs[1]:  # written by the first chunk (no separate zero-fill pass), zero when there is no chunk
            grad_w = torch.empty(weight.shape, dtype=acc, device=device) if n_rows else weight.new_zeros(weight.shape,
                                                                                                         dtype=acc)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=device) if needs[2] and bias is not None else None
        sums = torch.zeros(self.n_sums, dtype=acc, device=device)
        dense = self.teacher is not None and self.teacher.head is not None
        shared = self.vocab.n_shared if self.vocab is not None and self.vocab.student_narrowed else None
        work = _Workspace(min(self.step, n_rows), weight.shape[0], acc, device,
                          self.teacher.head[0].shape[0] if dense else None, any(needs))
        for start in range(0, n_rows, self.step):
            chunk = slice(start, min(start + self.step, n_rows))
            n = chunk.stop - start
            h = _gather(hidden, self.rows.index[chunk])  # gathered per chunk: no (positions, H) copy
            student = _head_into(work.student[0][:n], h, weight, bias)
            teacher = None
            if dense:
                with torch.no_grad():
                    h_t = self.teacher.hidden_rows(chunk)
                    teacher = _head_into(work.teacher[0][:n], h_t, *self.teacher.head)
            # the outside masses: what the log-softmaxes overwrite is read first, the rest from them after
            mass = self._outside_before(chunk, teacher, h_t if dense else None) if self.n_sums > len(self.slots) \
                else None
            rows = LogitRows(student, teacher, owned=True, keep_raw=self.keep_raw, shared=shared,
                             spare={"student": work.student[1][:n], "teacher": work.teacher and work.teacher[1][:n]})
            grad = None if work.grad is None else work.grad[:n].zero_()
            for j in range(len(self.slots)):
                self._slot(j, rows, chunk, grad, sums)
            if mass is not None:
                self._outside_after(mass, rows, sums)
            if grad is not None:
                _project(grad, h, weight, grad_h, self.rows.index[chunk], grad_w, grad_b, start == 0)
        total = _weighted_total(sums[:len(self.slots)], self.coefs)
        if self.vocab is not None:
            grad_w = None if grad_w is None else self.vocab.student_grad(grad_w)
            grad_b = None if grad_b is None else self.vocab.student_grad(grad_b)
        grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                 None if grad_b is None else grad_b.to(bias.dtype))
        return total, sums, grads

    @torch.no_grad()
    def _outside_before(self, chunk: slice, teacher: Tensor | None, h_t: Tensor | None) -> dict | None:
        """The first logit term's rows of this chunk; the teacher's first shared logit and log-sum-exp of its others."""
        member = self.rows.member[chunk, self.mass_slot]
        if not bool(member.any()):
            return None
        index = member.nonzero().squeeze(1)
        out = {"index": index, "chunk": chunk}
        if teacher is not None and self.teacher.other_head is not None:
            index_t = index.to(teacher.device)
            other = F.linear(h_t[index.to(h_t.device)], *self.teacher.other_head).to(teacher.dtype).to(teacher.device)
            # log-sum-exp of the shared logits = z_0 - log p_0 once the T=1 log-softmax exists: no extra pass over V
            out.update(first=teacher[index_t, :1].clone(), lse_other=torch.logsumexp(other, -1, keepdim=True))
        return out

    @torch.no_grad()
    def _outside_after(self, mass: dict, rows: LogitRows, sums: Tensor) -> None:
        """Each side's probability mass on tokens the other lacks, summed over the first logit term's rows."""
        index = mass["index"]
        if "first" in mass:
            logp = rows.teacher(1.0).logp  # computed already by terms at T=1
            lse_shared = mass["first"] - logp[index.to(logp.device), :1]
            lse_other = mass["lse_other"]
            sums[-2] += torch.exp(lse_other - torch.logaddexp(lse_shared, lse_other)).to(sums.device).sum()
        elif self.teacher.topk_outside is not None:  # a cache: the known part, the top-k ids the student lacks
            outside = self.teacher.topk_outside[mass["chunk"]]
            sums[-2] += outside[index.to(outside.device)].sum().to(sums.device)
        if self.vocab.student_narrowed:
            logp = rows.student_all().logp[index.to(sums.device)]
            sums[-1] += torch.logsumexp(logp[:, self.vocab.n_shared:], -1).exp().sum()

    def _slot(self, j: int, rows: LogitRows, chunk: slice, grad: Tensor | None, sums: Tensor) -> None:
        """Slot j's values on this chunk's rows into sums[j], and c_j * their gradient into `grad`."""
        member = self.rows.member[chunk, j]
        count = int(member.sum())
        if count == 0:
            return
        index = None if count == chunk.stop - chunk.start else member.nonzero().squeeze(1)
        sub = rows if index is None else rows.subset(index.to(sums.device))
        coef = self.coefs[j]
        slot_grad = None
        if grad is not None and coef != 0:
            slot_grad = grad if index is None else grad.new_zeros(count, grad.shape[1])
        value = self._values(self.slots[j], sub, chunk, index, slot_grad, coef, sums.device)
        sums[j] += value.sum()
        if index is not None and slot_grad is not None:
            grad.index_add_(0, index.to(grad.device), slot_grad)

    def _values(self, term, rows: LogitRows, chunk: slice, index: Tensor | None, grad: Tensor | None,
                coef: float, device: torch.device) -> Tensor:
        def pick(x: Tensor) -> Tensor:
            x = x[chunk]
            return x if index is None else x[index.to(x.device)]

        if term is None:
            return target_nll(rows, pick(self.targets).to(device), grad, coef)
        shared_grad = grad if grad is None or self.vocab is None or not self.vocab.student_narrowed else \
            grad[:, :self.vocab.n_shared]  # the terms' gradient lands on the shared columns
        if self.teacher.topk_ids is not None:
            return term.sparse_value_grad(rows, pick(self.teacher.topk_ids), pick(self.teacher.topk_logprobs),
                                          shared_grad, coef)
        return term.dense_value_grad(rows, shared_grad, coef)


def _weighted_total(sums: Tensor, coefs: list[float]) -> Tensor:
    """sum_j coefs[j] * sums[j], with the coefficients as Python numbers (no host-to-device copy)."""
    return sum((coef * sums[j] for j, coef in enumerate(coefs)), sums.new_zeros(()))


def _project(grad: Tensor, h: Tensor, weight: Tensor, grad_h: Tensor | None, index: Tensor, grad_w: Tensor | None,
             grad_b: Tensor | None, first: bool) -> None:
    """A chunk's logit gradient (n, V) to its hidden rows `index` of grad_h and into the weight and bias accumulators."""
    if grad_h is not None:
        grad_rows = (grad.to(weight.dtype) @ weight).to(grad_h.dtype)
        span = _consecutive(index)
        if span is not None:
            grad_h[span] = grad_rows
        else:
            grad_h.index_copy_(0, index.to(grad_h.device), grad_rows)
    if grad_w is not None:  # the first chunk writes the (uninitialised) accumulator: no separate zero-fill pass
        torch.addmm(grad_w, grad.t(), h.to(grad_w.dtype), beta=0.0 if first else 1.0, out=grad_w)
    if grad_b is not None:
        grad_b.add_(grad.sum(dim=0))


class FusedLogitLoss(torch.autograd.Function):
    """sum_j c_j * sum_j of CE and the logit terms; gradients computed in the forward pass, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, work: _ChunkedPass) -> tuple[Tensor, Tensor]:
        needs = tuple(ctx.needs_input_grad[:3])
        total, sums, grads = work.run(hidden, weight, bias, needs)
        ctx.grads = grads
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_sums: Tensor):
        grads, ctx.grads = ctx.grads, None
        # in place: the stored gradients are ours alone, so scaling them costs no memory
        return (*(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads), None)


def _plain_sums(slots: list, rows: _Rows, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                teacher: _TeacherRows | None, vocab: SharedVocab | None, teacher_head) -> Tensor:
    """(n_slots,) sums by autograd over the logits of all selected rows at once (the reference path).

    With a map, the logit terms read the shared tokens' columns of both models' full logits, and the
    two outside masses follow the slots' sums."""
    logits_s = upcast(F.linear(_gather(hidden, rows.index), weight, bias))
    logits_t = None
    if teacher is not None and teacher.head is not None:
        with torch.no_grad():
            logits_t = upcast(F.linear(teacher.hidden_rows(slice(None)), *teacher_head)).to(logits_s.device)
    cols_s = cols_t = None
    if vocab is not None:
        cols_s = vocab.shared_student_columns().to(logits_s.device)
        cols_t = vocab.shared_teacher_columns().to(logits_s.device)
    targets = rows.targets.to(logits_s.device)
    out = []
    for j, term in enumerate(slots):
        sel = rows.member[:, j].to(logits_s.device)
        if term is None:
            out.append(F.cross_entropy(logits_s[sel], targets[sel], reduction="sum"))
            continue
        s = logits_s[sel] if cols_s is None else logits_s[sel][:, cols_s]
        if teacher.topk_ids is not None:
            out.append(term.sparse(s, teacher.topk_ids[sel], teacher.topk_logprobs[sel]).sum())
        else:
            out.append(term.dense(s, logits_t[sel] if cols_t is None else logits_t[sel][:, cols_t]).sum())
    first = next((j for j, term in enumerate(slots) if term is not None), None)
    if vocab is not None and first is not None:
        sel = rows.member[:, first].to(logits_s.device)
        with torch.no_grad():
            if logits_t is not None:
                out.append((1 - torch.softmax(logits_t[sel], -1)[:, cols_t].sum(-1)).sum())
            else:
                out.append(teacher.topk_outside[sel].sum().to(logits_s.dtype))
            out.append((1 - torch.softmax(logits_s[sel], -1)[:, cols_s].sum(-1)).sum())
    return torch.stack(out)


def logit_loss(student: ModelView, teacher: ModelView | None, labels: Tensor, ce: bool, terms: list,
               coefs: list[float], chunk_size: int | None = None, chunk_mib: float = DEFAULT_CHUNK_MIB,
               fused: bool = True, vocab: SharedVocab | None = None) -> tuple[Tensor, Tensor]:
    """(sum_j coefs[j] * sum_j, detached per-slot sums) of CE (first, when `ce`) and each logit term.

    With `vocab` (same tokenizer up to additions) the sums end with the teacher's and the student's
    mass outside the shared tokens, summed over the first logit term's rows."""
    slots = ([None] if ce else []) + list(terms)
    if len(coefs) != len(slots):
        raise ValueError(f"{len(slots)} slots (CE and logit terms) but {len(coefs)} coefficients")
    if student.last_hidden is None or student.lm_head is None:
        raise ValueError("CE and logit terms need the student's last hidden state and LM head")
    zero = student.last_hidden.sum() * 0.0  # keeps the graph connected when nothing is selected
    if not slots:
        return zero, zero.new_zeros(0).detach()
    vocab = vocab if terms else None
    batch, length, width = student.last_hidden.shape
    types = student.token_types.cpu()  # row bookkeeping on the host: small copies once, no sync per chunk
    rows = _select_rows(types, labels, ce, terms)
    hidden = student.last_hidden.reshape(batch * length, width)  # a view: rows are gathered chunk by chunk
    weight, bias = head_weights(student)
    teacher_rows = _teacher_rows(types, student, teacher, rows, int(ce), vocab) if terms else None
    if vocab is not None:
        vocab.check_heads(weight.shape[0], None)
    elif teacher_rows is not None and teacher_rows.head is not None and teacher_rows.head[0].shape[0] != weight.shape[0]:
        raise ValueError(f"student vocabulary {weight.shape[0]} != teacher vocabulary {teacher_rows.head[0].shape[0]}"
                         ": logit terms without a vocabulary map need one tokenizer and LM-head size")
    if not fused:
        teacher_head = head_weights(teacher) if teacher_rows is not None and teacher_rows.head is not None else None
        sums = _plain_sums(slots, rows, hidden, weight, bias, teacher_rows, vocab, teacher_head)
        return zero + _weighted_total(sums[:len(slots)], coefs), sums.detach()
    work = _ChunkedPass(slots, coefs, rows, teacher_rows, rows_per_chunk(weight.shape[0], chunk_size, chunk_mib), vocab)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        total, sums = FusedLogitLoss.apply(hidden, weight, bias, work)
    else:
        total, sums, _ = work.run(hidden, weight, bias, (False, False, False))
    return zero + total, sums
