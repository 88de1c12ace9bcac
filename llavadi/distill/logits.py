"""One chunk's logits and their log-softmaxes, shared by CE and every logit term; the top-k collapse.

``LogitRows`` holds the student's logits (N, V) and optionally a dense teacher's, and computes each
model's tempered log-softmax once (``Dist``), so CE (``target_nll``) and every divergence of a
chunk (``llavadi.distill.divergences``) read the same one. Dense logits must be finite (an LM
head's output is); only a sparse teacher has exact zeros. Low-precision logits are upcast to
float32 before any softmax (float64 stays float64).

Sparse teacher (offline top-k cache): ``Collapsed`` maps the student and a teacher given as top-k
token ids (N, k) and its full-vocabulary log-probs at those ids at T=1 (N, k) onto k+1 categories
(the k ids plus one "rest" bucket for every other token), so a divergence's one core applies to
both. The collapsed student is the softmax of the logits [u_ids, logsumexp(u_rest)], so a core's
gradient on the k+1 categories maps back to the vocabulary: each id gets its category's, each
other token the rest bucket's times its share of the student's rest mass. The teacher's missing
mass r = 1 - sum_k p_T is treated by ``missing_mass``:
- "renormalize" (default): the teacher distribution is its top-k renormalised and zero
  elsewhere; the student keeps its full distribution (its mass outside the top-k lands in the
  rest bucket). This is EXACTLY the dense divergence against that truncated teacher.
  Reverse-direction divergences are infinite when the teacher is zero where the student is not,
  so jsd with beta=1 requires missing_mass="rest" unless k = V.
- "rest": the teacher keeps mass r in the rest bucket, compared with the student's mass
  outside the top-k (exact if the two distributions are proportional on the rest).
  Temperature reshapes the teacher within its top-k (softmax of logprob/T) and keeps r fixed,
  because the shape of the teacher's tail is unknown. r is floored at 1e-12 (rounding of
  1 - sum p_T must not make the bucket exactly empty, which would make reverse terms infinite).
The student's mass outside the top-k is summed directly (logsumexp over the other ids), not
taken as 1 - sum, so it keeps full precision. With k = V both treatments equal the dense
divergences exactly (there is no rest bucket then).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

MISSING_MASS_TREATMENTS = ("renormalize", "rest")
REST_MASS_FLOOR = 1e-12  # teacher rest mass below this is float rounding of 1 - sum(top-k)


def upcast(logits: Tensor) -> Tensor:
    """float32 (or float64) logits: low-precision logits are upcast before any softmax."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


# ---------------------------------------------------------------- shared log-probs
class Dist:
    """Log-probs of rows (N, V) and their probabilities (computed once, on first use).

    ``exact_zeros``: some log-probs may be -inf (a renormalised top-k teacher, an empty rest
    bucket); only then do the cores mask 0 * log 0 terms, which would otherwise touch every element.
    """

    __slots__ = ("logp", "exact_zeros", "_p")

    def __init__(self, logp: Tensor, exact_zeros: bool = False) -> None:
        self.logp = logp
        self.exact_zeros = exact_zeros
        self._p: Tensor | None = None

    @property
    def p(self) -> Tensor:
        """The probabilities exp(logp)."""
        if self._p is None:
            self._p = self.logp.exp()
        return self._p


class LogitRows:
    """Student logits (N, V) and optionally the dense teacher's, with tempered log-softmaxes computed once.

    Every term of a chunk reads the same ``student(T)`` / ``teacher(T)``. With ``owned=True`` the
    logit tensors belong to the caller's chunk: once their T=1 log-softmax exists they are
    overwritten by the probabilities, unless ``keep_raw`` (logit_mse without z-scoring reads them).
    ``spare`` buffers (the fused pass's, reused across chunks) receive the T=1 log-probs.
    Other temperatures are derived from the T=1 log-probs when the raw logits are gone: a softmax
    does not change when a row is shifted by a constant.

    ``shared``: the student's first ``shared`` columns are the tokens the teacher also has (its LM
    head in shared-first order, ``llavadi.distill.vocab``); the teacher's logits are given over those
    tokens only. Terms then compare ``student(T)``, the student's distribution renormalised over
    the shared tokens, with the teacher's over the same tokens; CE reads ``student_all()``, the
    student's distribution over its whole vocabulary.
    """

    def __init__(self, student: Tensor, teacher: Tensor | None = None, *, owned: bool = False,
                 keep_raw: bool = True, spare: dict[str, Tensor | None] | None = None,
                 shared: int | None = None) -> None:
        student = upcast(student)
        self._narrow = shared is not None and shared < student.shape[-1]
        self._logits = {"student": student, "teacher": None if teacher is None else upcast(teacher)}
        if self._narrow:
            self._logits["student_shared"] = student[:, :shared]
        self._raw = {side: logits is not None for side, logits in self._logits.items()}
        # in place: the raw logits' buffer takes the probabilities (not the student's when a view reads it)
        self._in_place = {side: owned and not keep_raw and not (self._narrow and side.startswith("student"))
                          for side in self._logits}
        self._spare = spare or {}  # per side, a buffer like its logits that receives their T=1 log-probs
        self._cache: dict[tuple[str, float], Dist] = {}

    @property
    def n_rows(self) -> int:
        """Number of rows."""
        return self._logits["student"].shape[0]

    def student(self, temperature: float) -> Dist:
        """The student's log-softmax of logits / temperature (over the shared tokens when `shared`)."""
        return self._dist("student_shared" if self._narrow else "student", temperature)

    def student_all(self) -> Dist:
        """The student's log-softmax over its whole vocabulary at T=1 (what CE reads)."""
        return self._dist("student", 1.0)

    def teacher(self, temperature: float) -> Dist:
        """The dense teacher's log-softmax of logits / temperature."""
        if self._logits["teacher"] is None:
            raise ValueError("these rows have no dense teacher logits")
        return self._dist("teacher", temperature)

    def raw(self, shift_invariant: bool = False) -> tuple[Tensor, Tensor | None]:
        """The student's and teacher's logits as given (the shared tokens'); with `shift_invariant`, possibly shifted.

        Logits overwritten in place by their T=1 log-probs are a per-row shift of the raw ones:
        good for a reader that does not see such shifts (z-scored logits), an error otherwise.
        """
        out = []
        for side in ("student_shared" if self._narrow else "student", "teacher"):
            logits = self._logits[side]
            if logits is not None and not self._raw[side] and not shift_invariant:
                raise ValueError("raw logits were not kept for these rows (LogitRows(..., keep_raw=False))")
            out.append(logits)
        return out[0], out[1]

    def _dist(self, side: str, temperature: float) -> Dist:
        key = (side, float(temperature))
        if key not in self._cache:
            logits = self._logits[side]
            if temperature == 1.0 and self._raw[side]:
                spare = self._spare.get(side)
                logp = F.log_softmax(logits, dim=-1) if spare is None else torch.log_softmax(logits, -1, out=spare)
                dist = Dist(logp)
                if self._in_place[side]:  # the raw logits are not read again: their buffer takes the probabilities
                    dist._p = torch.exp(dist.logp, out=logits)
                    self._logits[side], self._raw[side] = dist.logp, False
                self._cache[key] = dist
            else:
                source = logits if self._raw[side] else self._cache[(side, 1.0)].logp
                self._cache[key] = Dist(F.log_softmax(source / temperature, dim=-1))
        return self._cache[key]

    def subset(self, index: Tensor) -> LogitRows:
        """The rows `index` (a copy), keeping what is already computed."""
        sub = LogitRows.__new__(LogitRows)
        sub._logits = {}
        for side, logits in self._logits.items():
            if logits is None or self._raw[side]:
                sub._logits[side] = None if logits is None else logits[index]
            else:  # shifted per row: a valid source for every softmax, not for logit_mse (which keeps raw)
                sub._logits[side] = self._cache[(side, 1.0)].logp[index]
        sub._raw = dict(self._raw)
        sub._narrow = self._narrow
        sub._in_place, sub._spare = {side: False for side in sub._logits}, {}
        sub._cache = {}
        for key, dist in self._cache.items():
            in_place = key[1] == 1.0 and not self._raw[key[0]]
            sub._cache[key] = Dist(sub._logits[key[0]] if in_place else dist.logp[index], dist.exact_zeros)
            if dist._p is not None:
                sub._cache[key]._p = dist._p[index]
        return sub


# ---------------------------------------------------------------- helpers on log-probs
def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product (N,) without an (N, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def masked(values: Tensor, keep: Tensor | None) -> Tensor:
    """`values` where `keep` (zero elsewhere, also where values are nan from 0 * log 0); `keep` None: all."""
    return values if keep is None else torch.where(keep, values, torch.zeros((), dtype=values.dtype,
                                                                               device=values.device))


def kl_rows(a: Dist, b: Dist) -> Tensor:
    """KL(a || b) per row; terms where a == 0 count 0 (also when b == 0 there)."""
    diff = a.logp - b.logp
    return rowdot(a.p, masked(diff, a.p > 0 if a.exact_zeros else None))


def log_mixture(a: Dist, b: Dist, weight_a: float) -> Dist:
    """log(weight_a * p_a + (1 - weight_a) * p_b), exact at weight_a in {0, 1}."""
    if weight_a == 1.0:
        return a
    if weight_a == 0.0:
        return b
    logp = torch.logaddexp(a.logp + math.log(weight_a), b.logp + math.log(1.0 - weight_a))
    return Dist(logp, a.exact_zeros and b.exact_zeros)


def add_scaled(grad: Tensor, coef: float, p: Tensor, factor: Tensor, keep: Tensor | None) -> None:
    """grad += coef * p * factor (zero where not `keep`)."""
    grad.add_(masked(p * factor, keep), alpha=coef)


def support(*dists: Dist) -> Tensor | None:
    """Where the first distribution is > 0, when any of them may have exact zeros (None: everywhere)."""
    return dists[0].p > 0 if any(d.exact_zeros for d in dists) else None


# ---------------------------------------------------------------- cross-entropy
def target_nll(rows: LogitRows, targets: Tensor, grad: Tensor | None = None, coef: float = 1.0) -> Tensor:
    """Cross-entropy -log p_S(target) per row (N,) at T=1; adds coef * (p_S - onehot(target)) into `grad`."""
    s = rows.student_all()
    targets = targets.unsqueeze(-1)
    value = -s.logp.gather(-1, targets).squeeze(-1)
    if grad is not None:
        grad.add_(s.p, alpha=coef).scatter_add_(-1, targets, torch.full(targets.shape, -coef, dtype=grad.dtype,
                                                                         device=grad.device))
    return value


# ---------------------------------------------------------------- sparse (top-k) teacher
class Collapsed:
    """Student and teacher over the k teacher ids plus one rest bucket, and how to map gradients back to V.

    An id of -1 is a teacher token the student does not have (a vocabulary map, ``llavadi.distill.vocab``,
    with its log-prob set to -inf): it is no category, so its teacher mass joins the missing mass.
    """

    def __init__(self, full: Dist, topk_ids: Tensor, topk_logprobs: Tensor, temperature: float,
                 missing_mass: str) -> None:
        ids = topk_ids.long()
        self.full = full
        k, vocab = ids.shape[-1], full.logp.shape[-1]
        valid = ids >= 0
        partial = not bool(valid.all())
        if partial:
            if missing_mass == "renormalize" and not bool(valid.any(dim=-1).all()):
                raise ValueError("a teacher top-k row holds only tokens the student does not have: nothing to "
                                 "renormalise over; use missing_mass: rest (the row's mass is then all missing)")
            ids = _fill_invalid(ids, valid)
        self.ids = ids
        covers = k >= vocab and not partial
        # the student's log-probs outside the top-k (-inf at the ids); the rest mass is summed from them
        # directly (not 1 - top-k mass) so tiny tails keep their precision
        if k < vocab and not partial:  # fewer ids than tokens: every row has a tail; one pass over V
            self.tail = full.logp.scatter(-1, ids, float("-inf"))
            logp_rest = torch.logsumexp(self.tail, dim=-1)
        else:  # rows without a tail get a dummy input (finite gradients)
            outside = torch.ones_like(full.logp, dtype=torch.bool).scatter(-1, ids, False)
            if partial:  # a row with no valid id keeps its whole vocabulary outside
                outside = outside | ~valid.any(dim=-1, keepdim=True)
            has_outside = outside.any(dim=-1, keepdim=True)
            self.tail = torch.where(outside, full.logp, torch.full_like(full.logp, float("-inf")))
            dummy = torch.where(has_outside, self.tail, torch.zeros_like(full.logp))
            logp_rest = torch.where(has_outside.squeeze(-1), torch.logsumexp(dummy, dim=-1),
                                    torch.full_like(dummy[:, 0], float("-inf")))
        self.logp_rest = logp_rest.unsqueeze(-1)
        logp_ids = full.logp.gather(-1, ids)
        if partial:
            logp_ids = torch.where(valid, logp_ids, torch.full_like(logp_ids, float("-inf")))
        self.valid = valid if partial else None
        self.student = Dist(torch.cat([logp_ids, self.logp_rest], dim=-1), exact_zeros=True)

        teacher_logprobs = topk_logprobs.detach().to(full.logp.dtype)
        if partial:
            teacher_logprobs = torch.where(valid, teacher_logprobs, torch.full_like(teacher_logprobs, float("-inf")))
        shape_t = F.log_softmax(teacher_logprobs / temperature, dim=-1)  # tempered shape within the top-k
        if partial:  # a row without a valid id has no shape (nan): all its mass is missing
            shape_t = torch.where(valid, shape_t, torch.full_like(shape_t, float("-inf")))
        if missing_mass == "renormalize" or covers:
            logp_t_topk, logp_t_rest = shape_t, torch.full_like(logp_rest, float("-inf"))
        else:
            # r = 1 - top-k mass at T=1; floored so float rounding never makes the rest bucket exactly empty
            rest = (-torch.expm1(torch.logsumexp(teacher_logprobs, dim=-1).clamp(max=0.0))).clamp_min(REST_MASS_FLOOR)
            logp_t_topk, logp_t_rest = shape_t + torch.log1p(-rest).unsqueeze(-1), torch.log(rest)
            if partial:  # rows whose valid ids cover the vocabulary have no rest bucket (the student has no tail)
                whole = (valid.sum(dim=-1) >= vocab).unsqueeze(-1)
                logp_t_topk = torch.where(whole, shape_t, logp_t_topk)
                logp_t_rest = torch.where(whole.squeeze(-1), torch.full_like(logp_t_rest, float("-inf")), logp_t_rest)
        self.teacher = Dist(torch.cat([logp_t_topk, logp_t_rest.unsqueeze(-1)], dim=-1), exact_zeros=True)

    def expand_grad(self, grad_collapsed: Tensor, grad: Tensor) -> None:
        """grad (N, V) += the collapsed (N, k+1) gradient mapped back to the vocabulary (uses up the tail)."""
        rest = torch.where(torch.isfinite(self.logp_rest), self.logp_rest, torch.zeros_like(self.logp_rest))
        share = self.tail.sub_(rest).exp_()  # each other token's share of the student's rest mass; 0 at the ids
        self.tail = None
        grad.addcmul_(share, grad_collapsed[:, -1:])
        on_ids = grad_collapsed[:, :-1]
        if self.valid is not None:  # filled-in entries add nothing
            on_ids = torch.where(self.valid, on_ids, torch.zeros_like(on_ids))
        grad.scatter_add_(-1, self.ids, on_ids)


def _fill_invalid(ids: Tensor, valid: Tensor) -> Tensor:
    """Ids with each -1 replaced by a valid id of its row (0 in a row without one): scatters stay deterministic."""
    some = torch.where(valid, ids, torch.full_like(ids, -1)).max(dim=-1, keepdim=True).values.clamp_min(0)
    return torch.where(valid, ids, some.expand_as(ids))
