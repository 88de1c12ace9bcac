"""Logit divergences between a student and a teacher: one definition of each, per position.

Every public divergence takes student and teacher logits of shape (N, V) and returns a
per-position tensor (N,) in float32 whatever the input dtype (bf16 logits are upcast before the
softmax). Summing / averaging over positions is the caller's job (see objective.py).

Temperature: both sides' logits are divided by ``temperature`` before the softmax. The result
is NOT multiplied by T^2 by default (``scale_t2=False``): the value is the divergence between
the two tempered distributions. Pass ``scale_t2=True`` for Hinton's T^2 factor, which keeps
gradient magnitudes comparable across temperatures.

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

Sparse teacher (offline top-k cache): ``sparse_forward_kl`` / ``sparse_jsd`` take the teacher as
top-k token ids (N, k) and the teacher's full-vocabulary log-probs at those ids at T=1 (N, k).
Both sides are collapsed onto k+1 categories (the k ids plus one "rest" bucket for every other
token) and the dense log-prob core of the same divergence is applied, so there is one
definition. The teacher's missing mass r = 1 - sum_k p_T is treated by ``missing_mass``:
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


# ---------------------------------------------------------------- helpers on log-probs
def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "divergences take student and teacher logits of the same shape (N, V); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _tempered_logprobs(logits: Tensor, temperature: float) -> Tensor:
    """float32 log-softmax of logits / temperature over the last dimension."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _finish(value: Tensor, temperature: float, scale_t2: bool) -> Tensor:
    return value * (temperature**2) if scale_t2 else value


def _kl_rows(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probs; terms where a == 0 count 0 (also when b == 0 there)."""
    p_a = logp_a.exp()
    support = p_a > 0
    # mask the inputs (not only the product) so that 0 * (-inf) never appears, not even in backward
    diff = torch.where(support, logp_a, torch.zeros_like(logp_a)) - torch.where(
        support, logp_b, torch.zeros_like(logp_b)
    )
    return (p_a * diff).sum(dim=-1)


def _log_mixture(logp_a: Tensor, logp_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * p_a + (1 - weight_a) * p_b), exact at weight_a in {0, 1}."""
    if weight_a == 1.0:
        return logp_a
    if weight_a == 0.0:
        return logp_b
    stacked = torch.stack([logp_a + math.log(weight_a), logp_b + math.log(1.0 - weight_a)])
    return torch.logsumexp(stacked, dim=0)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# ---------------------------------------------------------------- cores on log-probs
# The dense and sparse public functions both call these: one definition per divergence.
def _forward_kl_core(logp_s: Tensor, logp_t: Tensor) -> Tensor:
    return _kl_rows(logp_t, logp_s)


def _reverse_kl_core(logp_s: Tensor, logp_t: Tensor) -> Tensor:
    return _kl_rows(logp_s, logp_t)


def _jsd_core(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    _check_unit("beta", beta)
    if beta == 0.0:
        return _forward_kl_core(logp_s, logp_t)
    if beta == 1.0:
        return _reverse_kl_core(logp_s, logp_t)
    logp_m = _log_mixture(logp_t, logp_s, beta)  # M = beta p_T + (1-beta) p_S
    return beta * _kl_rows(logp_t, logp_m) + (1.0 - beta) * _kl_rows(logp_s, logp_m)


def _skew_forward_kl_core(logp_s: Tensor, logp_t: Tensor, alpha: float) -> Tensor:
    _check_unit("alpha", alpha)
    return _kl_rows(logp_t, _log_mixture(logp_t, logp_s, alpha))


def _skew_reverse_kl_core(logp_s: Tensor, logp_t: Tensor, alpha: float) -> Tensor:
    _check_unit("alpha", alpha)
    return _kl_rows(logp_s, _log_mixture(logp_s, logp_t, alpha))


# ---------------------------------------------------------------- dense divergences
def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, scale_t2: bool = False
) -> Tensor:
    """KL(p_T || p_S) per position, (N,) float32."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    value = _forward_kl_core(
        _tempered_logprobs(student_logits, temperature), _tempered_logprobs(teacher_logits, temperature)
    )
    return _finish(value, temperature, scale_t2)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, scale_t2: bool = False
) -> Tensor:
    """KL(p_S || p_T) per position, (N,) float32."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    value = _reverse_kl_core(
        _tempered_logprobs(student_logits, temperature), _tempered_logprobs(teacher_logits, temperature)
    )
    return _finish(value, temperature, scale_t2)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> Tensor:
    """Generalised Jensen-Shannon divergence with mixture weight beta on the teacher, (N,)."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    value = _jsd_core(
        _tempered_logprobs(student_logits, temperature), _tempered_logprobs(teacher_logits, temperature), beta
    )
    return _finish(value, temperature, scale_t2)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, scale_t2: bool = False) -> Tensor:
    """Total variation distance 1/2 sum |p_T - p_S| per position, (N,)."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    p_s = _tempered_logprobs(student_logits, temperature).exp()
    p_t = _tempered_logprobs(teacher_logits, temperature).exp()
    return _finish(0.5 * (p_t - p_s).abs().sum(dim=-1), temperature, scale_t2)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> Tensor:
    """DistiLLM skew KL: KL(p_T || alpha p_T + (1-alpha) p_S) per position, (N,)."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    value = _skew_forward_kl_core(
        _tempered_logprobs(student_logits, temperature), _tempered_logprobs(teacher_logits, temperature), alpha
    )
    return _finish(value, temperature, scale_t2)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> Tensor:
    """DistiLLM skew reverse KL: KL(p_S || alpha p_S + (1-alpha) p_T) per position, (N,)."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    value = _skew_reverse_kl_core(
        _tempered_logprobs(student_logits, temperature), _tempered_logprobs(teacher_logits, temperature), alpha
    )
    return _finish(value, temperature, scale_t2)


def _standardize(logits: Tensor, eps: float = 1e-6) -> Tensor:
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, unbiased=False, keepdim=True)
    return (logits - mean) / (std + eps)


def logit_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    zscore: bool = False,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> Tensor:
    """Mean over the vocabulary of squared logit differences per position, (N,)."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    if zscore:
        z_s, z_t = _standardize(z_s), _standardize(z_t)
    return _finish((z_s - z_t).pow(2).mean(dim=-1), temperature, scale_t2)


# ---------------------------------------------------------------- sparse (top-k) teacher
def _log_mass_outside(logp_full: Tensor, topk_ids: Tensor) -> Tensor:
    """log of the probability mass outside the top-k ids, per row (-inf with zero gradient when k covers V)."""
    outside = torch.ones_like(logp_full, dtype=torch.bool).scatter(-1, topk_ids, False)
    has_outside = outside.any(dim=-1, keepdim=True)
    # summed directly (not 1 - top-k mass) so tiny tails keep their precision; rows without a tail get a dummy input
    masked = torch.where(outside, logp_full, torch.full_like(logp_full, float("-inf")))
    masked = torch.where(has_outside, masked, torch.zeros_like(logp_full))
    return torch.where(
        has_outside.squeeze(-1), torch.logsumexp(masked, dim=-1), torch.full_like(masked[:, 0], float("-inf"))
    )


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
    if missing_mass not in MISSING_MASS_TREATMENTS:
        raise ValueError(f"missing_mass must be one of {MISSING_MASS_TREATMENTS}, got {missing_mass!r}")
    if (
        student_logits.dim() != 2
        or teacher_topk_ids.dim() != 2
        or teacher_topk_ids.shape != teacher_topk_logprobs.shape
    ):
        raise ValueError(
            "sparse divergences take student logits (N, V) and teacher top-k ids and log-probs (N, k); got "
            f"{tuple(student_logits.shape)}, {tuple(teacher_topk_ids.shape)}, {tuple(teacher_topk_logprobs.shape)}"
        )
    if teacher_topk_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(f"student has {student_logits.shape[0]} positions, teacher top-k {teacher_topk_ids.shape[0]}")
    logp_s_full = _tempered_logprobs(student_logits, temperature)
    logp_s_topk = logp_s_full.gather(-1, teacher_topk_ids.long())
    logp_s_rest = _log_mass_outside(logp_s_full, teacher_topk_ids.long())

    teacher_logprobs = teacher_topk_logprobs.detach().float()
    shape_t = F.log_softmax(teacher_logprobs / temperature, dim=-1)  # tempered shape within the top-k
    k, vocab = teacher_topk_ids.shape[-1], student_logits.shape[-1]
    if missing_mass == "renormalize" or k >= vocab:
        logp_t_topk = shape_t
        logp_t_rest = torch.full_like(logp_s_rest, float("-inf"))
    else:
        # r = 1 - top-k mass at T=1; floored so float rounding never makes the rest bucket exactly empty
        rest = (-torch.expm1(torch.logsumexp(teacher_logprobs, dim=-1).clamp(max=0.0))).clamp_min(REST_MASS_FLOOR)
        logp_t_topk = shape_t + torch.log1p(-rest).unsqueeze(-1)
        logp_t_rest = torch.log(rest)
    logp_s = torch.cat([logp_s_topk, logp_s_rest.unsqueeze(-1)], dim=-1)
    logp_t = torch.cat([logp_t_topk, logp_t_rest.unsqueeze(-1)], dim=-1)
    return logp_s, logp_t


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
    logp_s, logp_t = collapse_to_topk(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature=temperature, missing_mass=missing_mass
    )
    return _finish(_forward_kl_core(logp_s, logp_t), temperature, scale_t2)


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
    if beta == 1.0 and missing_mass == "renormalize" and teacher_topk_ids.shape[-1] < student_logits.shape[-1]:
        raise ValueError(
            "sparse jsd with beta=1 (reverse KL) against a renormalised top-k teacher is infinite wherever "
            "the student has mass outside the top-k; use missing_mass='rest' or beta < 1"
        )
    logp_s, logp_t = collapse_to_topk(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, temperature=temperature, missing_mass=missing_mass
    )
    return _finish(_jsd_core(logp_s, logp_t, beta), temperature, scale_t2)


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
