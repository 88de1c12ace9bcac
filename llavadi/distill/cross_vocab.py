"""Logit distillation across vocabularies: ULD and GOLD on paired answer spans, chunked, closed-form gradients.

The teacher and the student read the same answer text but tokenize it differently; the data pairs
their answer tokens into groups that cover the same bytes (``llavadi.data.token_alignment``). Per
group each side gives one distribution over its own vocabulary, merged over the group's tokens by
the chain rule (GOLD's merge): the full next-token distribution at one token of the group times
the scalar probabilities of the group's other (actual) tokens,

    log M_g = log p(. | row of the base token) + sum_{other tokens k} log p(token_k | its row),

with ``merge: first`` (default) the base is the group's first token: both models then predict
from the same text, the text before the group. ``last`` takes the last token (TRL's "bayesian").
M_g is not normalised (its mass is the probability of completing the span); both divergences
below read it as it is, as GOLD does. All probabilities are softmax(logits / temperature).

- ``uld`` (Universal Logit Distillation, Boizard et al. 2024): the L1 (Wasserstein-1) distance
  between the two merged rows sorted in decreasing order and padded with zeros to one length,
  over the top ``top_k`` of each side (0: the whole vocabulary, exactly the paper's).
- ``gold`` (TRL's GOLD hybrid): tokens whose strings match (an id map between the vocabularies)
  compared exactly by the generalised JSD (beta; 0 forward KL, 1 reverse KL) of the merged rows
  restricted to them; the other tokens of each side by ULD over their top ``top_k``; weighted
  ``matched_weight`` / ``unmatched_weight`` (default: the share of the teacher's vocabulary that
  matches, and the rest).

Gradients are closed form. With G = d value / d log M (per student token of the row),
d / d logits of the base row is G - p * sum(G), and of each other row sum(G) * (onehot(token) - p),
divided by the temperature. The pass runs over chunks of groups; per chunk the rows' logits of
both sides are computed, used and dropped, and the gradient is projected onto the student's hidden
states and LM-head weight at once: nothing of size positions x vocabulary outlives a chunk.

A top-k teacher (offline cache) gives its top-k ids and log-probs per row instead of logits: its
merged row is zero outside the base row's top-k; a group's other tokens read their log-prob in
their row's top-k, or the smallest of it when absent (an upper bound). Temperature reshapes the
top-k (softmax of log-prob / T) and keeps its total mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llavadi.data.token_alignment import ALIGNMENT_KEY
from llavadi.distill.positions import corresponding_positions, require_mapped

Tensor = torch.Tensor
MERGES = ("first", "last")


# ---------------------------------------------------------------- divergences of merged rows
def sorted_l1(log_s: Tensor, log_t: Tensor, top_k: int, grad_log: Tensor | None = None,
              coef: float = 1.0, columns: Tensor | None = None) -> Tensor:
    """Per row, sum_i |s_(i) - t_(i)| of both rows' probabilities sorted decreasing, zero-padded, first top_k (0: all).

    Rows are given as log-probabilities (-inf: zero). Adds coef * d value / d log_s into `grad_log`,
    at `columns[j]` for column j of log_s when given (log_s holds some columns of grad_log's rows).
    Sorting the logs sorts the probabilities: only the top_k kept are exponentiated.
    """
    k_s = log_s.shape[-1] if top_k == 0 else min(top_k, log_s.shape[-1])
    k_t = log_t.shape[-1] if top_k == 0 else min(top_k, log_t.shape[-1])
    if top_k == 0:
        top_s, idx = torch.sort(log_s, dim=-1, descending=True)
        top_t = torch.sort(log_t, dim=-1, descending=True).values
    else:
        top_s, idx = torch.topk(log_s, k_s, dim=-1)
        top_t = torch.topk(log_t, k_t, dim=-1).values
    vs = top_s.exp_()
    width = max(k_s, k_t) if top_k == 0 else top_k
    diff = _pad(vs, width) - _pad(top_t.exp_(), width)
    if grad_log is not None:
        if columns is not None:
            idx = columns.to(idx.device)[idx]
        grad_log.scatter_add_(-1, idx, torch.sign(diff[:, :k_s]).mul_(vs).mul_(coef))
    return diff.abs_().sum(-1)


def _pad(x: Tensor, width: int) -> Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def generalized_jsd(log_a: Tensor, log_b: Tensor, beta: float, grad_log: Tensor | None = None,
                    coef: float = 1.0) -> Tensor:
    """Per row, beta KL(b || m) + (1 - beta) KL(a || m), m = beta b + (1 - beta) a, of unnormalised rows a (student), b.

    beta 0 is KL(b || a), beta 1 KL(a || b) (TRL's convention). Adds coef * d value / d log_a into `grad_log`.
    Entries where b is 0 (log_b -inf, a top-k teacher) contribute only through a.
    """
    a, b = log_a.exp(), log_b.exp()
    if beta == 0.0:
        value = _rowdot(b, (log_b - log_a).nan_to_num_(nan=0.0, neginf=0.0))
        grad = b.neg_()
    elif beta == 1.0:
        d_a = log_a - log_b
        value = _rowdot(a, d_a)
        grad = d_a.add_(1.0).mul_(a)
    else:  # two row-sized temporaries, reused in place: log m, then the two log ratios
        log_m, d_a = log_b + math.log(beta), log_a + math.log1p(-beta)
        torch.logaddexp(log_m, d_a, out=log_m)
        torch.sub(log_a, log_m, out=d_a)
        d_b = torch.sub(log_b, log_m, out=log_m).nan_to_num_(nan=0.0, neginf=0.0)
        value = beta * _rowdot(b, d_b) + (1.0 - beta) * _rowdot(a, d_a)
        del log_m, d_b, b
        grad = d_a.mul_(a).mul_(1.0 - beta)
    if grad_log is not None:
        grad_log.add_(grad, alpha=coef)
    return value


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product (N,) without an (N, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@dataclass(frozen=True)
class MatchedTokens:
    """Tokens of the two vocabularies with the same string: student_ids[i] is teacher_ids[i]."""

    student_ids: Tensor  # (M,) long
    teacher_ids: Tensor  # (M,) long
    teacher_size: int  # rows of the teacher's LM head


def matched_tokens(student_tokenizer, teacher_tokenizer, teacher_size: int | None = None) -> MatchedTokens:
    """The ids of the token strings both vocabularies hold; `teacher_size`: the teacher's LM-head rows."""
    vocab_s, vocab_t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    shared = sorted(set(vocab_s) & set(vocab_t), key=vocab_t.get)
    return MatchedTokens(torch.tensor([vocab_s[t] for t in shared], dtype=torch.long),
                         torch.tensor([vocab_t[t] for t in shared], dtype=torch.long),
                         teacher_size or len(teacher_tokenizer))


def gold_divergence(log_s: Tensor, log_t: Tensor, matched: MatchedTokens, top_k: int, beta: float,
                    weights: tuple[float, float] | None, grad_log: Tensor | None = None, coef: float = 1.0) -> Tensor:
    """Per row, w_m * JSD_beta(matched columns) + w_u * ULD(unmatched columns, top_k); weights None: TRL's adaptive."""
    w_m, w_u = weights if weights is not None else _adaptive(matched, log_t.shape[-1])
    ids_s, ids_t = matched.student_ids.to(log_s.device), matched.teacher_ids.to(log_t.device)
    value = torch.zeros(log_s.shape[0], dtype=log_s.dtype, device=log_s.device)
    if len(ids_s) and w_m:
        grad_m = None if grad_log is None else torch.zeros(log_s.shape[0], len(ids_s), dtype=log_s.dtype,
                                                           device=log_s.device)
        value = value + w_m * generalized_jsd(log_s.index_select(-1, ids_s), log_t.index_select(-1, ids_t), beta,
                                              grad_m, coef * w_m)
        if grad_log is not None:
            grad_log.index_add_(-1, ids_s, grad_m)
            del grad_m
    if w_u:  # the other tokens of each side (zero-padded to one length by sorted_l1)
        rest_s, rest_t = _complement(ids_s, log_s.shape[-1]), _complement(ids_t, log_t.shape[-1])
        value = value + w_u * sorted_l1(log_s.index_select(-1, rest_s), log_t.index_select(-1, rest_t), top_k,
                                        grad_log, coef * w_u, columns=rest_s)
    return value


def _complement(ids: Tensor, size: int) -> Tensor:
    """The columns 0..size-1 not in `ids`, ascending."""
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(1)


def _adaptive(matched: MatchedTokens, teacher_size: int) -> tuple[float, float]:
    """TRL's default weights: the matched share of the teacher's vocabulary, and the rest."""
    share = len(matched.teacher_ids) / max(1, teacher_size)
    return share, 1.0 - share


# ---------------------------------------------------------------- which rows a group reads
@dataclass
class SideRows:
    """One side's rows of a list of groups: each token of a group, its prediction row, the token, its group."""

    rows: Tensor  # (n,) flat rows (b * T + position - 1) predicting each token
    tokens: Tensor  # (n,) the token ids
    group: Tensor  # (n,) the group of each entry
    is_base: Tensor  # (n,) bool: the row whose full distribution the group keeps
    starts: Tensor  # (G + 1,) entries of group g are starts[g]:starts[g+1]


def side_rows(batch_index: Tensor, first: Tensor, last: Tensor, ids: Tensor, merge: str) -> SideRows:
    """The rows of every group (token positions first..last of sample batch_index) on one side; `ids` (B, T)."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    counts = last - first + 1
    group = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.zeros(len(counts) + 1, dtype=torch.long)
    starts[1:] = counts.cumsum(0)
    offset = torch.arange(int(starts[-1])) - starts[group]
    length = ids.shape[1]
    flat = batch_index[group] * length + first[group] + offset
    is_base = offset == 0 if merge == "first" else offset == (counts[group] - 1)
    return SideRows(flat - 1, ids.reshape(-1)[flat], group, is_base, starts)


@dataclass
class PairedGroups:
    """The groups of one micro-batch: (n_groups, 5) (sample, s_first, s_last, t_first, t_last), and both sides' ids."""

    groups: Tensor
    student_ids: Tensor
    teacher_ids: Tensor

    @classmethod
    def from_batch(cls, batch: dict, teacher_prefix: str = "teacher_") -> PairedGroups | None:
        """The batch's paired answer spans (None when its views share one tokenization)."""
        if ALIGNMENT_KEY not in batch:
            return None
        return cls(batch[ALIGNMENT_KEY].cpu(), batch["input_ids"].cpu(), batch[teacher_prefix + "input_ids"].cpu())

    def rows(self, merge: str) -> tuple[SideRows, SideRows]:
        """Student and teacher rows of every group."""
        g = self.groups
        return (side_rows(g[:, 0], g[:, 1], g[:, 2], self.student_ids, merge),
                side_rows(g[:, 0], g[:, 3], g[:, 4], self.teacher_ids, merge))

    def __len__(self) -> int:
        return self.groups.shape[0]

    def span_ends(self, student_length: int, teacher_length: int) -> tuple[Tensor, Tensor]:
        """Flat student and teacher rows of each group's last token (both sides have read the same text there)."""
        g = self.groups
        return g[:, 0] * student_length + g[:, 2], g[:, 0] * teacher_length + g[:, 4]


def identity_groups(student_types: Tensor, teacher_types: Tensor, group_mask: Tensor) -> PairedGroups:
    """One group per selected student token and its teacher counterpart (one tokenizer: the k-th token of its type)."""
    mapped = corresponding_positions(student_types, teacher_types)
    b, pos = group_mask.nonzero(as_tuple=True)
    t_pos = mapped[b, pos]
    require_mapped(t_pos, b, student_types, teacher_types, "uld/gold")
    groups = torch.stack([b, pos, pos, t_pos, t_pos], dim=1)
    return PairedGroups(groups, torch.zeros_like(student_types), torch.zeros_like(teacher_types))


# ---------------------------------------------------------------- the chunked pass
@dataclass
class TeacherSignal:
    """The teacher at its rows: hidden states (B * T_t, H) and LM head, or top-k ids and log-probs (B * T_t, k)."""

    hidden: Tensor | None = None
    head: tuple[Tensor, Tensor | None] | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    size: int = 0  # its vocabulary (LM-head rows)


def _merged(logp: Tensor, entries: SideRows, part: slice, first_group: int, teacher_topk: Tensor | None = None
            ) -> Tensor:
    """(groups, V) merged log-rows of a chunk: base row's log-probs + the group's other tokens' log-probs."""
    device = logp.device
    is_base = entries.is_base[part]
    other_host = (~is_base).nonzero().squeeze(1)
    if not len(other_host):  # one token per group: the rows themselves
        return logp
    merged = logp[is_base.nonzero().squeeze(1).to(device)]
    other, tokens = other_host.to(device), entries.tokens[part][other_host].to(device)
    if teacher_topk is None:
        picked = logp[other, tokens]
    else:  # a top-k row: the token's log-prob if cached, else the smallest cached one (an upper bound)
        rows, ids = logp[other], teacher_topk[other]
        found = rows.masked_fill(ids != tokens.unsqueeze(-1), float("-inf")).amax(-1)
        picked = torch.where(torch.isfinite(found), found, rows.amin(-1))
    add = torch.zeros(merged.shape[0], dtype=merged.dtype, device=device)
    add.index_add_(0, (entries.group[part][other_host] - first_group).to(device), picked)
    return merged.add_(add.unsqueeze(-1))


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / temperature), in place on the logits (owned by the caller's chunk)."""
    if temperature != 1.0:
        logits.div_(temperature)
    return torch.log_softmax(logits, -1)


def _chunks(student: SideRows, teacher: SideRows, step: int) -> list[tuple[int, int]]:
    """Ranges of groups whose rows fit `step` rows on each side (at least one group per chunk)."""
    n_groups = len(student.starts) - 1
    out, g = [], 0
    while g < n_groups:
        fit_s = int(torch.searchsorted(student.starts, student.starts[g] + step, right=True)) - 1
        fit_t = int(torch.searchsorted(teacher.starts, teacher.starts[g] + step, right=True)) - 1
        end = min(max(min(fit_s, fit_t), g + 1), n_groups)
        out.append((g, end))
        g = end
    return out


class AlignedPass:
    """Per chunk of groups: both sides' logits at their rows, merged rows, the divergence and its projected gradient."""

    def __init__(self, divergence, temperature: float, student: SideRows, teacher: SideRows, signal: TeacherSignal,
                 step: int) -> None:
        self.divergence, self.temperature = divergence, temperature
        self.student, self.teacher, self.signal, self.step = student, teacher, signal, step

    def _teacher_rows(self, part: slice, first: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        rows = self.teacher.rows[part]
        sig, temp = self.signal, self.temperature
        with torch.no_grad():
            if sig.head is not None:
                h = sig.hidden[rows.to(sig.hidden.device)]
                logp = _log_softmax(torch.nn.functional.linear(h, *sig.head).to(device=device, dtype=dtype), temp)
                return _merged(logp, self.teacher, part, first)
            ids = sig.topk_ids[rows.to(sig.topk_ids.device)].to(device).long()
            lp = sig.topk_logprobs[rows.to(sig.topk_logprobs.device)].to(device=device, dtype=dtype)
            shaped = torch.log_softmax(lp / temp, -1) + torch.logsumexp(lp, -1, keepdim=True)  # keeps the top-k mass
            merged = _merged(shaped, self.teacher, part, first, teacher_topk=ids)
            base = self.teacher.is_base[part].nonzero().squeeze(1).to(device)
            dense = torch.full((merged.shape[0], sig.size), float("-inf"), device=device, dtype=dtype)
            return dense.scatter_(-1, ids[base], merged)

    def run(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]):
        """(sum of the groups' values, gradients of hidden / weight / bias or None)."""
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.zeros_like(hidden) if needs[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if needs[2] and bias is not None else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for g0, g1 in _chunks(self.student, self.teacher, self.step):
            part_s = slice(int(self.student.starts[g0]), int(self.student.starts[g1]))
            part_t = slice(int(self.teacher.starts[g0]), int(self.teacher.starts[g1]))
            rows = self.student.rows[part_s].to(hidden.device)
            h = hidden[rows]
            logp = _log_softmax(torch.nn.functional.linear(h, weight, bias).to(acc), self.temperature)
            log_s = _merged(logp, self.student, part_s, g0)
            log_t = self._teacher_rows(part_t, g0, logp.device, logp.dtype)
            grad_log = torch.zeros_like(log_s) if any(needs) else None
            total = total + self.divergence(log_s, log_t, grad_log).sum()
            del log_s, log_t  # (the merged rows: the chunk's logp is still read below)
            if grad_log is None:
                continue
            grad = self._logit_grad(logp, grad_log, part_s, g0)
            del logp, grad_log
            if grad_h is not None:
                grad_h.index_copy_(0, rows, (grad.to(weight.dtype) @ weight).to(grad_h.dtype))
            if grad_w is not None:
                grad_w.addmm_(grad.t(), h.to(acc))
            if grad_b is not None:
                grad_b.add_(grad.sum(0))
            del grad  # nothing of this chunk outlives it: the next chunk's buffers take its place
        grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                 None if grad_b is None else grad_b.to(bias.dtype))
        return total, grads

    def _logit_grad(self, logp: Tensor, grad_log: Tensor, part: slice, first: int) -> Tensor:
        """d value / d logits of the chunk's rows: base rows G - p sum(G), other rows sum(G) (onehot - p); / T.

        Written into `logp` (the chunk's log-probs, read no more): one row-sized buffer less."""
        sum_g = grad_log.sum(-1)
        group = (self.student.group[part] - first).to(logp.device)
        grad = logp.exp_().mul_(-sum_g[group].unsqueeze(-1))
        is_base = self.student.is_base[part].to(logp.device)
        grad.index_add_(0, is_base.nonzero().squeeze(1), grad_log)
        other = (~is_base).nonzero().squeeze(1)
        if len(other):
            tokens = self.student.tokens[part].to(logp.device)[other]
            grad.index_put_((other, tokens), sum_g[group[other]], accumulate=True)
        return grad.div_(self.temperature)


class AlignedLoss(torch.autograd.Function):
    """The aligned pass's sum; gradients computed in the forward pass, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, work: AlignedPass) -> Tensor:
        total, grads = work.run(hidden, weight, bias, tuple(ctx.needs_input_grad[:3]))
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grads, ctx.grads = ctx.grads, None
        return (*(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads), None)


def aligned_sum(work: AlignedPass, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The pass's sum, differentiable with respect to the student's hidden states and LM head."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        return AlignedLoss.apply(hidden, weight, bias, work)
    return work.run(hidden, weight, bias, (False, False, False))[0]
