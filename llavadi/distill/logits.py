"""Logit divergences between a student and a teacher: one definition of each, with its gradient.

Every public divergence takes student and teacher logits of shape (N, V) and returns a
per-position tensor (N,) in float32 (float64 inputs stay float64; bf16 logits are upcast before
the softmax). Summing / averaging over positions is the caller's job (see objective.py). Dense
logits must be finite (an LM head's output is); only a sparse teacher has exact zeros.

One definition: each divergence is a "core" on log-probabilities that returns its per-row value
and, when asked, adds coef * (its gradient with respect to the student's logits) into a given
tensor, in closed form. The public functions below call the core for the value only (autograd
differentiates that value: the plain path); the fused LM-head pass (``logit_pass.py``) calls
``dense_value_grad`` / ``sparse_value_grad`` on the same cores and never runs autograd. A
``LogitRows`` holds one chunk's logits and computes each model's tempered log-softmax once, so
CE and every logit term of a chunk share it.

Temperature: both sides' logits are divided by ``temperature`` before the softmax (T = 1 costs
nothing). The result is NOT multiplied by T^2 by default (``scale_t2=False``): the value is the
divergence between the two tempered distributions. Pass ``scale_t2=True`` for Hinton's T^2
factor, which keeps gradient magnitudes comparable across temperatures.

Directions: ``p_T`` is the teacher distribution, ``p_S`` the student's.
- forward_kl = KL(p_T || p_S)  (mode covering; the LLaVADI paper's choice)
- reverse_kl = KL(p_S || p_T)  (mode seeking)
- jsd(beta): M = (1-beta) p_S + beta p_T, JSD_beta = beta KL(p_T||M) + (1-beta) KL(p_S||M).
  By convention (TRL's generalized JSD) beta=0 IS forward KL and beta=1 IS reverse KL, computed
  exactly by those functions. Note the formula itself tends to 0 at both ends (JSD_beta ~
  beta*KL(p_T||p_S) near 0), so the convention is a jump at the endpoints, not a limit.
- tvd = 1/2 sum |p_T - p_S|
- skew_forward_kl(alpha) = KL(p_T || alpha p_T + (1-alpha) p_S)   (DistiLLM's SKL)
- skew_reverse_kl(alpha) = KL(p_S || alpha p_S + (1-alpha) p_T)   (DistiLLM's SRKL)
  alpha=0 gives forward / reverse KL exactly; DistiLLM uses alpha=0.1.
- logit_mse = mean over the vocabulary of (z_S - z_T)^2 on tempered logits, or on row-wise
  standardised logits with ``zscore=True`` (then temperature has no effect: it cancels).

Gradients with respect to the tempered student logits u = z_S / T (then divided by T), with
p = p_S, q = p_T, m = log M and D the row's value:
forward KL p - q; reverse KL p (log p - log q - D); JSD (1-beta) p (log p - m - KL(p||M));
skew forward KL (1-alpha) (p S - r) with r = p q / M, S = sum r; skew reverse KL
p (log p - m - alpha p/M - D + alpha sum p^2/M); TVD p (g - sum p g) with g = sign(p - q) / 2.

Sparse teacher (offline top-k cache): ``sparse_forward_kl`` / ``sparse_jsd`` take the teacher as
top-k token ids (N, k) and the teacher's full-vocabulary log-probs at those ids at T=1 (N, k).
Both sides are collapsed onto k+1 categories (the k ids plus one "rest" bucket for every other
token) and the same core is applied, so there is one definition. The collapsed student is the
softmax of the logits [u_ids, logsumexp(u_rest)], so a core's gradient on the k+1 categories maps
back to the vocabulary: each id gets its category's, each other token the rest bucket's times its
share of the student's rest mass. The teacher's missing mass r = 1 - sum_k p_T is treated by
``missing_mass``:
- "renormalize" (default): the teacher distribution is its top-k renormalised and zero
  elsewhere; the student keeps its full distribution (its mass outside the top-k lands in the
  rest bucket). This is EXACTLY the dense divergence against that truncated teacher.
  Reverse-direction terms are infinite when the teacher is zero where the student is not, so
  ``sparse_jsd`` with beta=1 requires missing_mass="rest" unless k = V.
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
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

MISSING_MASS_TREATMENTS = ("renormalize", "rest")
REST_MASS_FLOOR = 1e-12  # teacher rest mass below this is float rounding of 1 - sum(top-k)


# ---------------------------------------------------------------- checks
def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "divergences take student and teacher logits of the same shape (N, V); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _upcast(logits: Tensor) -> Tensor:
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
    """

    def __init__(self, student: Tensor, teacher: Tensor | None = None, *, owned: bool = False,
                 keep_raw: bool = True, spare: dict[str, Tensor | None] | None = None) -> None:
        self._logits = {"student": _upcast(student), "teacher": None if teacher is None else _upcast(teacher)}
        self._raw = {"student": True, "teacher": teacher is not None}
        self._in_place = owned and not keep_raw
        self._spare = spare or {}  # per side, a buffer like its logits that receives their T=1 log-probs
        self._cache: dict[tuple[str, float], Dist] = {}

    @property
    def n_rows(self) -> int:
        """Number of rows."""
        return self._logits["student"].shape[0]

    def student(self, temperature: float) -> Dist:
        """The student's log-softmax of logits / temperature."""
        return self._dist("student", temperature)

    def teacher(self, temperature: float) -> Dist:
        """The dense teacher's log-softmax of logits / temperature."""
        if self._logits["teacher"] is None:
            raise ValueError("these rows have no dense teacher logits")
        return self._dist("teacher", temperature)

    def raw(self, shift_invariant: bool = False) -> tuple[Tensor, Tensor | None]:
        """The student's and teacher's logits as given; with `shift_invariant`, possibly shifted per row.

        Logits overwritten in place by their T=1 log-probs are a per-row shift of the raw ones:
        good for a reader that does not see such shifts (z-scored logits), an error otherwise.
        """
        out = []
        for side in ("student", "teacher"):
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
                if self._in_place:  # the raw logits are not read again: their buffer takes the probabilities
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
        sub._in_place, sub._spare = False, {}
        sub._cache = {}
        for key, dist in self._cache.items():
            in_place = key[1] == 1.0 and not self._raw[key[0]]
            sub._cache[key] = Dist(sub._logits[key[0]] if in_place else dist.logp[index], dist.exact_zeros)
            if dist._p is not None:
                sub._cache[key]._p = dist._p[index]
        return sub


# ---------------------------------------------------------------- helpers on log-probs
def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product (N,) without an (N, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _masked(values: Tensor, keep: Tensor | None) -> Tensor:
    """`values` where `keep` (zero elsewhere, also where values are nan from 0 * log 0); `keep` None: all."""
    return values if keep is None else torch.where(keep, values, torch.zeros((), dtype=values.dtype,
                                                                               device=values.device))


def _kl(a: Dist, b: Dist) -> Tensor:
    """KL(a || b) per row; terms where a == 0 count 0 (also when b == 0 there)."""
    diff = a.logp - b.logp
    return _rowdot(a.p, _masked(diff, a.p > 0 if a.exact_zeros else None))


def _log_mixture(a: Dist, b: Dist, weight_a: float) -> Dist:
    """log(weight_a * p_a + (1 - weight_a) * p_b), exact at weight_a in {0, 1}."""
    if weight_a == 1.0:
        return a
    if weight_a == 0.0:
        return b
    logp = torch.logaddexp(a.logp + math.log(weight_a), b.logp + math.log(1.0 - weight_a))
    return Dist(logp, a.exact_zeros and b.exact_zeros)


def _add_scaled(grad: Tensor, coef: float, p: Tensor, factor: Tensor, keep: Tensor | None) -> None:
    """grad += coef * p * factor (zero where not `keep`)."""
    grad.add_(_masked(p * factor, keep), alpha=coef)


def _support(*dists: Dist) -> Tensor | None:
    """Where the first distribution is > 0, when any of them may have exact zeros (None: everywhere)."""
    return dists[0].p > 0 if any(d.exact_zeros for d in dists) else None


# ---------------------------------------------------------------- cores: value, and coef * gradient into `grad`
# (gradient with respect to the tempered student logits; callers divide by T)
def _forward_kl_core(s: Dist, t: Dist, grad: Tensor | None, coef: float) -> Tensor:
    value = _kl(t, s)
    if grad is not None:
        grad.add_(s.p, alpha=coef).sub_(t.p, alpha=coef)
    return value


def _reverse_kl_core(s: Dist, t: Dist, grad: Tensor | None, coef: float) -> Tensor:
    value = _kl(s, t)
    if grad is not None:
        _add_scaled(grad, coef, s.p, s.logp - t.logp - value.unsqueeze(-1), _support(s, t))
    return value


def _jsd_core(s: Dist, t: Dist, grad: Tensor | None, coef: float, beta: float) -> Tensor:
    _check_unit("beta", beta)
    if beta == 0.0:
        return _forward_kl_core(s, t, grad, coef)
    if beta == 1.0:
        return _reverse_kl_core(s, t, grad, coef)
    m = _log_mixture(t, s, beta)  # M = beta p_T + (1-beta) p_S
    kl_s = _kl(s, m)
    if grad is not None:
        _add_scaled(grad, coef * (1.0 - beta), s.p, s.logp - m.logp - kl_s.unsqueeze(-1), _support(s, t))
    return beta * _kl(t, m) + (1.0 - beta) * kl_s


def _skew_forward_kl_core(s: Dist, t: Dist, grad: Tensor | None, coef: float, alpha: float) -> Tensor:
    _check_unit("alpha", alpha)
    m = _log_mixture(t, s, alpha)
    value = _kl(t, m)
    if grad is not None and alpha < 1.0:  # alpha = 1: KL(p_T || p_T), constant
        keep = (s.p > 0) & (t.p > 0) if (s.exact_zeros or t.exact_zeros) else None
        r = _masked((s.logp + t.logp - m.logp).exp(), keep)  # p_S p_T / M
        grad.add_(s.p * r.sum(-1, keepdim=True) - r, alpha=coef * (1.0 - alpha))
    return value


def _skew_reverse_kl_core(s: Dist, t: Dist, grad: Tensor | None, coef: float, alpha: float) -> Tensor:
    _check_unit("alpha", alpha)
    m = _log_mixture(s, t, alpha)
    value = _kl(s, m)
    if grad is not None:
        keep = _support(s, t)
        factor = s.logp - m.logp - value.unsqueeze(-1)
        if alpha > 0.0:  # at alpha = 0, p_S / M = p_S / p_T may overflow; its weight is 0
            ratio = _masked((s.logp - m.logp).exp(), keep)  # p_S / M <= 1 / alpha
            factor = factor - alpha * (ratio - _rowdot(s.p, ratio).unsqueeze(-1))
        _add_scaled(grad, coef, s.p, factor, keep)
    return value


def _tvd_core(s: Dist, t: Dist, grad: Tensor | None, coef: float) -> Tensor:
    value = 0.5 * (t.p - s.p).abs().sum(dim=-1)
    if grad is not None:
        half_sign = 0.5 * torch.sign(s.p - t.p)
        grad.add_(s.p * (half_sign - _rowdot(s.p, half_sign).unsqueeze(-1)), alpha=coef)
    return value


_CORES: dict[str, tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    "forward_kl": (_forward_kl_core, ()),
    "reverse_kl": (_reverse_kl_core, ()),
    "jsd": (_jsd_core, ("beta",)),
    "tvd": (_tvd_core, ()),
    "skew_forward_kl": (_skew_forward_kl_core, ("alpha",)),
    "skew_reverse_kl": (_skew_reverse_kl_core, ("alpha",)),
}


def _core_options(name: str, opt: dict) -> dict:
    allowed = _CORES[name][1]
    unknown = sorted(set(opt) - set(allowed))
    if unknown:
        raise TypeError(f"divergence {name!r} takes no option(s) {unknown}")
    return opt


# ---------------------------------------------------------------- value and gradient of a chunk's rows
def dense_value_grad(name: str, rows: LogitRows, grad: Tensor | None = None, coef: float = 1.0, *,
                     temperature: float = 1.0, scale_t2: bool = False, **opt) -> Tensor:
    """Per-row divergence `name` (N,) of the rows' student and teacher; adds coef * d value / d student logits."""
    _check_temperature(temperature)
    if name == "logit_mse":
        return _logit_mse_value_grad(rows, grad, coef, temperature=temperature, scale_t2=scale_t2, **opt)
    if name not in _CORES:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}")
    core, _ = _CORES[name]
    factor = temperature**2 if scale_t2 else 1.0
    value = core(rows.student(temperature), rows.teacher(temperature), grad, coef * factor / temperature,
                 **_core_options(name, opt))
    return value * factor if scale_t2 else value


def target_nll(rows: LogitRows, targets: Tensor, grad: Tensor | None = None, coef: float = 1.0) -> Tensor:
    """Cross-entropy -log p_S(target) per row (N,) at T=1; adds coef * (p_S - onehot(target)) into `grad`."""
    s = rows.student(1.0)
    targets = targets.unsqueeze(-1)
    value = -s.logp.gather(-1, targets).squeeze(-1)
    if grad is not None:
        grad.add_(s.p, alpha=coef).scatter_add_(-1, targets, torch.full(targets.shape, -coef, dtype=grad.dtype,
                                                                         device=grad.device))
    return value


def _standardize(logits: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Row-standardised logits, and the centred logits and std they came from."""
    centred = logits - logits.mean(dim=-1, keepdim=True)
    std = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return centred / (std + eps), centred, std


def _logit_mse_value_grad(rows: LogitRows, grad: Tensor | None, coef: float, *, temperature: float,
                          scale_t2: bool, zscore: bool = False, eps: float = 1e-6) -> Tensor:
    z_s, z_t = rows.raw(shift_invariant=zscore)
    if z_t is None:
        raise ValueError("logit_mse needs dense teacher logits")
    u_s, u_t = z_s / temperature, z_t / temperature
    if zscore:
        u_s, centred, std = _standardize(u_s, eps)
        u_t = _standardize(u_t, eps)[0]
    factor = temperature**2 if scale_t2 else 1.0
    diff = u_s - u_t
    if grad is not None:
        g = diff * (2.0 / diff.shape[-1])  # d mean(diff^2) / d u_s
        if zscore:  # through (x - mean) / (std + eps)
            g = (g - g.mean(-1, keepdim=True)) / (std + eps) - centred * (g * centred).mean(-1, keepdim=True) / (
                std * (std + eps) ** 2)
        grad.add_(g, alpha=coef * factor / temperature)
    return diff.pow(2).mean(dim=-1) * factor


# ---------------------------------------------------------------- dense divergences (value; autograd-differentiable)
def _dense(name: str, student_logits: Tensor, teacher_logits: Tensor, **opt) -> Tensor:
    _check_pair(student_logits, teacher_logits)
    return dense_value_grad(name, LogitRows(student_logits, teacher_logits), **opt)


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, scale_t2: bool = False
) -> Tensor:
    """KL(p_T || p_S) per position, (N,) float32."""
    return _dense("forward_kl", student_logits, teacher_logits, temperature=temperature, scale_t2=scale_t2)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, scale_t2: bool = False
) -> Tensor:
    """KL(p_S || p_T) per position, (N,) float32."""
    return _dense("reverse_kl", student_logits, teacher_logits, temperature=temperature, scale_t2=scale_t2)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> Tensor:
    """Generalised Jensen-Shannon divergence with mixture weight beta on the teacher, (N,)."""
    return _dense("jsd", student_logits, teacher_logits, beta=beta, temperature=temperature, scale_t2=scale_t2)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, scale_t2: bool = False) -> Tensor:
    """Total variation distance 1/2 sum |p_T - p_S| per position, (N,)."""
    return _dense("tvd", student_logits, teacher_logits, temperature=temperature, scale_t2=scale_t2)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> Tensor:
    """DistiLLM skew KL: KL(p_T || alpha p_T + (1-alpha) p_S) per position, (N,)."""
    return _dense("skew_forward_kl", student_logits, teacher_logits, alpha=alpha, temperature=temperature,
                  scale_t2=scale_t2)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> Tensor:
    """DistiLLM skew reverse KL: KL(p_S || alpha p_S + (1-alpha) p_T) per position, (N,)."""
    return _dense("skew_reverse_kl", student_logits, teacher_logits, alpha=alpha, temperature=temperature,
                  scale_t2=scale_t2)


def logit_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    zscore: bool = False,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> Tensor:
    """Mean over the vocabulary of squared logit differences per position, (N,)."""
    return _dense("logit_mse", student_logits, teacher_logits, zscore=zscore, temperature=temperature,
                  scale_t2=scale_t2)


# ---------------------------------------------------------------- sparse (top-k) teacher
def _check_sparse(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, missing_mass: str) -> None:
    if missing_mass not in MISSING_MASS_TREATMENTS:
        raise ValueError(f"missing_mass must be one of {MISSING_MASS_TREATMENTS}, got {missing_mass!r}")
    if student_logits.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            "sparse divergences take student logits (N, V) and teacher top-k ids and log-probs (N, k); got "
            f"{tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}"
        )
    if topk_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"student has {student_logits.shape[0]} positions, teacher top-k {topk_ids.shape[0]}")


class _Collapsed:
    """Student and teacher over the k teacher ids plus one rest bucket, and how to map gradients back to V."""

    def __init__(self, full: Dist, topk_ids: Tensor, topk_logprobs: Tensor, temperature: float,
                 missing_mass: str) -> None:
        self.ids = topk_ids.long()
        self.full = full
        k, vocab = self.ids.shape[-1], full.logp.shape[-1]
        # the student's log-probs outside the top-k (-inf at the ids); the rest mass is summed from them
        # directly (not 1 - top-k mass) so tiny tails keep their precision
        if k < vocab:  # fewer ids than tokens: every row has a tail; one pass over V
            self.tail = full.logp.scatter(-1, self.ids, float("-inf"))
            logp_rest = torch.logsumexp(self.tail, dim=-1)
        else:  # rows whose ids cover the vocabulary have no tail: they get a dummy input (finite gradients)
            outside = torch.ones_like(full.logp, dtype=torch.bool).scatter(-1, self.ids, False)
            has_outside = outside.any(dim=-1, keepdim=True)
            self.tail = torch.where(outside, full.logp, torch.full_like(full.logp, float("-inf")))
            dummy = torch.where(has_outside, self.tail, torch.zeros_like(full.logp))
            logp_rest = torch.where(has_outside.squeeze(-1), torch.logsumexp(dummy, dim=-1),
                                    torch.full_like(dummy[:, 0], float("-inf")))
        self.logp_rest = logp_rest.unsqueeze(-1)
        self.student = Dist(torch.cat([full.logp.gather(-1, self.ids), self.logp_rest], dim=-1), exact_zeros=True)

        teacher_logprobs = topk_logprobs.detach().to(full.logp.dtype)
        shape_t = F.log_softmax(teacher_logprobs / temperature, dim=-1)  # tempered shape within the top-k
        if missing_mass == "renormalize" or k >= vocab:
            logp_t_topk, logp_t_rest = shape_t, torch.full_like(logp_rest, float("-inf"))
        else:
            # r = 1 - top-k mass at T=1; floored so float rounding never makes the rest bucket exactly empty
            rest = (-torch.expm1(torch.logsumexp(teacher_logprobs, dim=-1).clamp(max=0.0))).clamp_min(REST_MASS_FLOOR)
            logp_t_topk, logp_t_rest = shape_t + torch.log1p(-rest).unsqueeze(-1), torch.log(rest)
        self.teacher = Dist(torch.cat([logp_t_topk, logp_t_rest.unsqueeze(-1)], dim=-1), exact_zeros=True)

    def expand_grad(self, grad_collapsed: Tensor, grad: Tensor) -> None:
        """grad (N, V) += the collapsed (N, k+1) gradient mapped back to the vocabulary (uses up the tail)."""
        rest = torch.where(torch.isfinite(self.logp_rest), self.logp_rest, torch.zeros_like(self.logp_rest))
        share = self.tail.sub_(rest).exp_()  # each other token's share of the student's rest mass; 0 at the ids
        self.tail = None
        grad.addcmul_(share, grad_collapsed[:, -1:])
        grad.scatter_add_(-1, self.ids, grad_collapsed[:, :-1])


def sparse_value_grad(name: str, rows: LogitRows, topk_ids: Tensor, topk_logprobs: Tensor,
                      grad: Tensor | None = None, coef: float = 1.0, *, temperature: float = 1.0,
                      scale_t2: bool = False, missing_mass: str = "renormalize", **opt) -> Tensor:
    """Per-row divergence `name` (N,) against a top-k teacher; adds coef * d value / d student logits into `grad`."""
    _check_temperature(temperature)
    if name not in SPARSE_DIVERGENCES:
        raise ValueError(f"divergence {name!r} has no top-k form; valid: {', '.join(SPARSE_DIVERGENCES)}")
    collapsed = _Collapsed(rows.student(temperature), topk_ids, topk_logprobs, temperature, missing_mass)
    factor = temperature**2 if scale_t2 else 1.0
    grad_c = None if grad is None else torch.zeros_like(collapsed.student.logp)
    value = _CORES[name][0](collapsed.student, collapsed.teacher, grad_c, coef * factor / temperature,
                            **_core_options(name, opt))
    if grad is not None:
        collapsed.expand_grad(grad_c, grad)
    return value * factor if scale_t2 else value


def collapse_to_topk(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    missing_mass: str = "renormalize",
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over the k teacher ids plus one rest bucket: two (N, k+1) tensors."""
    _check_temperature(temperature)
    _check_sparse(student_logits, teacher_topk_ids, teacher_topk_logprobs, missing_mass)
    collapsed = _Collapsed(LogitRows(student_logits).student(temperature), teacher_topk_ids, teacher_topk_logprobs,
                           temperature, missing_mass)
    return collapsed.student.logp, collapsed.teacher.logp


def sparse_forward_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    scale_t2: bool = False,
    missing_mass: str = "renormalize",
) -> Tensor:
    """Forward KL against a top-k teacher (missing mass per ``missing_mass``), (N,) float32."""
    _check_sparse(student_logits, teacher_topk_ids, teacher_topk_logprobs, missing_mass)
    return sparse_value_grad("forward_kl", LogitRows(student_logits), teacher_topk_ids, teacher_topk_logprobs,
                             temperature=temperature, scale_t2=scale_t2, missing_mass=missing_mass)


def check_sparse_jsd(beta: float, missing_mass: str, k: int, vocab: int) -> None:
    """Refuse reverse KL (beta 1) against a renormalised top-k teacher: infinite where the student has mass outside."""
    if beta == 1.0 and missing_mass == "renormalize" and k < vocab:
        raise ValueError(
            "sparse jsd with beta=1 (reverse KL) against a renormalised top-k teacher is infinite wherever "
            "the student has mass outside the top-k; use missing_mass='rest' or beta < 1"
        )


def sparse_jsd(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_t2: bool = False,
    missing_mass: str = "renormalize",
) -> Tensor:
    """Generalised JSD against a top-k teacher (missing mass per ``missing_mass``), (N,) float32."""
    check_sparse_jsd(beta, missing_mass, teacher_topk_ids.shape[-1], student_logits.shape[-1])
    _check_sparse(student_logits, teacher_topk_ids, teacher_topk_logprobs, missing_mass)
    return sparse_value_grad("jsd", LogitRows(student_logits), teacher_topk_ids, teacher_topk_logprobs, beta=beta,
                             temperature=temperature, scale_t2=scale_t2, missing_mass=missing_mass)


# ---------------------------------------------------------------- registries by exact name
DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "logit_mse": logit_mse,
}

# divergences that also accept a top-k teacher (same names as in DIVERGENCES)
SPARSE_DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": sparse_forward_kl,
    "jsd": sparse_jsd,
}
