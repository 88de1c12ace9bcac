"""Closed-form logit divergences: one class each, with its value, its gradient and its options.

A ``Divergence`` subclass with a ``name`` is a complete closed-form divergence: its options
(``Option``, declared once: the common ``temperature`` / ``scale_t2``, its ``own_options``, and
``missing_mass`` when it has a top-k form), its ``core`` on two distributions (the per-row value
and, when asked, coef * its gradient with respect to the student's tempered logits, added into a
given tensor), and cross-option rules. Every named subclass is also the logit term of the same
name (``llavadi.distill.terms.logit_terms`` builds one term per class): adding a closed-form
divergence is one class here plus its test.

Use:
- ``ForwardKL(temperature=2.0)(student_logits, teacher_logits)``: per-row values (N,) of dense
  logits (float32, or float64 for float64 inputs; bf16 is upcast), differentiable by autograd;
- ``JSD(beta=0.3).of_topk(student_logits, topk_ids, topk_logprobs)``: against a top-k teacher;
- ``dense(rows, grad, coef)`` / ``topk(rows, ids, logprobs, grad, coef)``: the fused LM-head pass
  (``logit_pass.py``) calls these on one chunk's ``LogitRows``; they share its log-softmaxes and
  add coef * the closed-form gradient into ``grad`` without autograd.

Temperature: both sides' logits are divided by ``temperature`` before the softmax. The value is
NOT multiplied by T^2 unless ``scale_t2`` (Hinton's factor, which keeps gradient magnitudes
comparable across temperatures). ``p_T`` is the teacher distribution, ``p_S`` the student's.

Gradients are with respect to the tempered student logits u = z_S / T (then divided by T), with
p = p_S, q = p_T, m = log M and D the row's value (each class's docstring gives its own).

Top-k teacher (``topk`` / ``of_topk``; an offline cache): both sides are collapsed onto the k ids
plus one rest bucket (``llavadi.distill.logits.Collapsed``) and the same ``core`` is applied, so
there is one definition; ``missing_mass`` says what the rest bucket holds (see ``Collapsed``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from llavadi.distill.logits import (
    MISSING_MASS_TREATMENTS,
    Collapsed,
    LogitRows,
    add_scaled,
    kl_rows,
    log_mixture,
    masked,
    rowdot,
    support,
)
from llavadi.distill.options import Option, validate_options

Tensor = torch.Tensor

TEMPERATURE = Option("temperature", float, 1.0, "both sides' logits are divided by it before the softmax",
                     low=0.0, low_open=True)
SCALE_T2 = Option("scale_t2", bool, False, "multiply by temperature^2 (Hinton), keeping gradient scale across T")
MISSING_MASS = Option("missing_mass", str, "renormalize",
                      "top-k teacher only: renormalise its top-k, or keep its missing mass in a rest bucket",
                      choices=MISSING_MASS_TREATMENTS)
BETA = Option("beta", float, 0.5, "mixture weight on the teacher: 0 is forward KL, 1 reverse KL", low=0.0, high=1.0)
ALPHA = Option("alpha", float, 0.1, "skew: weight of the first distribution in the mixture", low=0.0, high=1.0)
ZSCORE = Option("zscore", bool, False, "compare row-standardised logits (temperature then cancels)")
COMMON_OPTIONS = (TEMPERATURE, SCALE_T2)

_NAMED: list[type[Divergence]] = []  # named subclasses in definition order (each is a logit term)


def closed_form_divergences() -> tuple[type[Divergence], ...]:
    """Every named Divergence subclass, in definition order."""
    return tuple(_NAMED)


class Divergence:
    """A closed-form divergence of next-token distributions with its options (an instance holds their values)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    own_options: ClassVar[tuple[Option, ...]] = ()
    has_topk: ClassVar[bool] = False  # whether it has a top-k (collapsed) form
    options: ClassVar[tuple[Option, ...]] = COMMON_OPTIONS  # set per subclass from the three above

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.options = COMMON_OPTIONS + cls.own_options + ((MISSING_MASS,) if cls.has_topk else ())
        if cls.__dict__.get("name"):
            # core(s, t, grad, coef) on two distributions (per-row value; adds coef * d value / d u_S into
            # grad), or dense() of its own for a divergence that reads raw logits (logit_mse)
            if not callable(getattr(cls, "core", None)) and cls.dense is Divergence.dense:
                raise TypeError(f"divergence {cls.name!r} gives neither core() nor dense()")
            if cls.has_topk and not callable(getattr(cls, "core", None)):
                raise TypeError(f"divergence {cls.name!r} has a top-k form but no core() to apply to it")
            if any(d.name == cls.name for d in _NAMED):
                raise TypeError(f"divergence {cls.name!r} is defined twice")
            _NAMED.append(cls)

    def __init__(self, **options: Any) -> None:
        where = f"divergence {self.name!r}"
        self.opts = validate_options(self.options, options, where)
        self.check(self.opts, set(options), where)

    @classmethod
    def from_validated(cls, opts: dict[str, Any]) -> Divergence:
        """An instance from options already validated (every declared option present, as a term resolves them)."""
        missing = sorted({o.name for o in cls.options} - set(opts))
        if missing:
            raise ValueError(f"divergence {cls.name!r}: options {missing} missing")
        divergence = cls.__new__(cls)
        divergence.opts = dict(opts)
        return divergence

    @classmethod
    def check(cls, opts: dict[str, Any], given: set[str], where: str) -> None:
        """Cross-option rules (override); `given` are the option names set explicitly."""
        return None  # a hook: nothing to refuse by default

    def check_topk(self, where: str, covers_vocab: bool = False) -> None:
        """Refuse a top-k teacher for which the value is undefined (override); `covers_vocab`: k = V, no tail."""
        return None  # a hook: nothing to refuse by default

    def reads_raw_logits(self) -> bool:
        """Whether it reads logits themselves, not only their softmax (the fused pass then keeps them)."""
        return False

    @property
    def temperature(self) -> float:
        """The divergence's temperature."""
        return self.opts["temperature"]

    def _scale(self) -> float:
        return self.temperature**2 if self.opts["scale_t2"] else 1.0

    def dense(self, rows: LogitRows, grad: Tensor | None = None, coef: float = 1.0) -> Tensor:
        """Per-row values (N,) of the rows' student and dense teacher; adds coef * d value / d z_S into `grad`."""
        temperature, factor = self.temperature, self._scale()
        value = self.core(rows.student(temperature), rows.teacher(temperature), grad, coef * factor / temperature)
        return value * factor if factor != 1.0 else value

    def topk(self, rows: LogitRows, topk_ids: Tensor, topk_logprobs: Tensor, grad: Tensor | None = None,
             coef: float = 1.0) -> Tensor:
        """Per-row values (N,) against a top-k teacher (ids, T=1 log-probs); adds coef * the gradient into `grad`."""
        if not self.has_topk:
            raise ValueError(f"divergence {self.name!r} has no top-k form")
        temperature, factor = self.temperature, self._scale()
        collapsed = Collapsed(rows.student(temperature), topk_ids, topk_logprobs, temperature,
                              self.opts["missing_mass"])
        grad_c = None if grad is None else torch.zeros_like(collapsed.student.logp)
        value = self.core(collapsed.student, collapsed.teacher, grad_c, coef * factor / temperature)
        if grad is not None:
            collapsed.expand_grad(grad_c, grad)
        return value * factor if factor != 1.0 else value

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Per-row values (N,) of dense student and teacher logits (N, V); differentiable by autograd."""
        if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError("divergences take student and teacher logits of the same shape (N, V); got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        return self.dense(LogitRows(student_logits, teacher_logits))

    def of_topk(self, student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> Tensor:
        """Per-row values (N,) of student logits (N, V) against a top-k teacher (N, k); differentiable."""
        if student_logits.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape != topk_logprobs.shape:
            raise ValueError("top-k divergences take student logits (N, V) and teacher top-k ids and log-probs "
                             f"(N, k); got {tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, "
                             f"{tuple(topk_logprobs.shape)}")
        if topk_ids.shape[0] != student_logits.shape[0]:
            raise ValueError(f"student has {student_logits.shape[0]} positions, teacher top-k {topk_ids.shape[0]}")
        self.check_topk(f"divergence {self.name!r}", covers_vocab=topk_ids.shape[-1] >= student_logits.shape[-1])
        return self.topk(LogitRows(student_logits), topk_ids, topk_logprobs)


class ForwardKL(Divergence):
    """KL(p_T || p_S): mode covering; the LLaVADI paper's choice. Gradient p - q."""

    name = "forward_kl"
    summary = "KL(teacher || student) of next-token distributions"
    has_topk = True

    def core(self, s, t, grad, coef):
        value = kl_rows(t, s)
        if grad is not None:
            grad.add_(s.p, alpha=coef).sub_(t.p, alpha=coef)
        return value


class ReverseKL(Divergence):
    """KL(p_S || p_T): mode seeking. Gradient p (log p - log q - D)."""

    name = "reverse_kl"
    summary = "KL(student || teacher)"

    def core(self, s, t, grad, coef):
        value = kl_rows(s, t)
        if grad is not None:
            add_scaled(grad, coef, s.p, s.logp - t.logp - value.unsqueeze(-1), support(s, t))
        return value


class JSD(Divergence):
    """Generalised Jensen-Shannon divergence: M = (1-beta) p_S + beta p_T, beta KL(p_T||M) + (1-beta) KL(p_S||M).

    By TRL's convention beta=0 IS forward KL and beta=1 IS reverse KL, computed exactly by those
    classes; the formula itself tends to 0 at both ends (~beta KL(p_T||p_S) near 0), so the
    convention is a jump at the endpoints, not a limit. Gradient (1-beta) p (log p - m - KL(p||M)).
    """

    name = "jsd"
    summary = "generalised JSD with mixture weight beta on the teacher"
    own_options = (BETA,)
    has_topk = True

    def check_topk(self, where, covers_vocab=False):
        if self.opts["beta"] == 1.0 and self.opts["missing_mass"] == "renormalize" and not covers_vocab:
            raise ValueError(f"{where}: beta 1 (reverse KL) against a renormalised top-k teacher is infinite wherever "
                             "the student has mass outside the top-k; set missing_mass: rest or beta < 1")

    def core(self, s, t, grad, coef):
        beta = self.opts["beta"]
        if beta == 0.0:
            return ForwardKL.core(self, s, t, grad, coef)  # the endpoints by convention (the cores read no option)
        if beta == 1.0:
            return ReverseKL.core(self, s, t, grad, coef)
        m = log_mixture(t, s, beta)  # M = beta p_T + (1-beta) p_S
        kl_s = kl_rows(s, m)
        if grad is not None:
            add_scaled(grad, coef * (1.0 - beta), s.p, s.logp - m.logp - kl_s.unsqueeze(-1), support(s, t))
        return beta * kl_rows(t, m) + (1.0 - beta) * kl_s


class TVD(Divergence):
    """Total variation 1/2 sum |p_T - p_S|. Gradient p (g - sum p g), g = sign(p - q) / 2."""

    name = "tvd"
    summary = "total variation 1/2 sum |p_T - p_S|"

    def core(self, s, t, grad, coef):
        value = 0.5 * (t.p - s.p).abs().sum(dim=-1)
        if grad is not None:
            half_sign = 0.5 * torch.sign(s.p - t.p)
            grad.add_(s.p * (half_sign - rowdot(s.p, half_sign).unsqueeze(-1)), alpha=coef)
        return value


class SkewForwardKL(Divergence):
    """DistiLLM's skew KL (SKL): KL(p_T || alpha p_T + (1-alpha) p_S); alpha 0 is forward KL exactly.

    Gradient (1-alpha) (p S - r), r = p q / M, S = sum r.
    """

    name = "skew_forward_kl"
    summary = "KL(teacher || alpha teacher + (1-alpha) student)"
    own_options = (ALPHA,)

    def core(self, s, t, grad, coef):
        alpha = self.opts["alpha"]
        m = log_mixture(t, s, alpha)
        value = kl_rows(t, m)
        if grad is not None and alpha < 1.0:  # alpha = 1: KL(p_T || p_T), constant
            keep = (s.p > 0) & (t.p > 0) if (s.exact_zeros or t.exact_zeros) else None
            r = masked((s.logp + t.logp - m.logp).exp(), keep)  # p_S p_T / M
            grad.add_(s.p * r.sum(-1, keepdim=True) - r, alpha=coef * (1.0 - alpha))
        return value


class SkewReverseKL(Divergence):
    """DistiLLM's skew reverse KL (SRKL): KL(p_S || alpha p_S + (1-alpha) p_T); alpha 0 is reverse KL exactly.

    Gradient p (log p - m - alpha p/M - D + alpha sum p^2/M).
    """

    name = "skew_reverse_kl"
    summary = "KL(student || alpha student + (1-alpha) teacher)"
    own_options = (ALPHA,)

    def core(self, s, t, grad, coef):
        alpha = self.opts["alpha"]
        m = log_mixture(s, t, alpha)
        value = kl_rows(s, m)
        if grad is not None:
            keep = support(s, t)
            factor = s.logp - m.logp - value.unsqueeze(-1)
            if alpha > 0.0:  # at alpha = 0, p_S / M = p_S / p_T may overflow; its weight is 0
                ratio = masked((s.logp - m.logp).exp(), keep)  # p_S / M <= 1 / alpha
                factor = factor - alpha * (ratio - rowdot(s.p, ratio).unsqueeze(-1))
            add_scaled(grad, coef, s.p, factor, keep)
        return value


def _standardize(logits: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Row-standardised logits, and the centred logits and std they came from."""
    centred = logits - logits.mean(dim=-1, keepdim=True)
    std = centred.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return centred / (std + eps), centred, std


class LogitMSE(Divergence):
    """Mean over the vocabulary of (z_S - z_T)^2 on tempered logits, or on row-standardised ones (``zscore``).

    With ``zscore`` the temperature cancels (it is refused unless ``scale_t2`` gives it a role).
    Reads the logits themselves, not their softmax.
    """

    name = "logit_mse"
    summary = "mean over the vocabulary of squared logit differences"
    own_options = (ZSCORE,)
    eps: ClassVar[float] = 1e-6

    @classmethod
    def check(cls, opts, given, where):
        if opts["zscore"] and "temperature" in given and not opts["scale_t2"]:
            raise ValueError(f"{where}: temperature cancels in z-scored logits; drop it (or set scale_t2: true, "
                             "the only place it then acts)")

    def reads_raw_logits(self):
        return not self.opts["zscore"]  # z-scored logits do not see the per-row shift of log-probs

    def dense(self, rows, grad=None, coef=1.0):
        zscore, temperature, factor = self.opts["zscore"], self.temperature, self._scale()
        z_s, z_t = rows.raw(shift_invariant=zscore)
        if z_t is None:
            raise ValueError("logit_mse needs dense teacher logits")
        u_s, u_t = z_s / temperature, z_t / temperature
        if zscore:
            u_s, centred, std = _standardize(u_s, self.eps)
            u_t = _standardize(u_t, self.eps)[0]
        diff = u_s - u_t
        if grad is not None:
            g = diff * (2.0 / diff.shape[-1])  # d mean(diff^2) / d u_s
            if zscore:  # through (x - mean) / (std + eps)
                g = (g - g.mean(-1, keepdim=True)) / (std + self.eps) - centred * (g * centred).mean(
                    -1, keepdim=True) / (std * (std + self.eps) ** 2)
            grad.add_(g, alpha=coef * factor / temperature)
        return diff.pow(2).mean(dim=-1) * factor
