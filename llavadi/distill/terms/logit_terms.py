"""Logit terms: a divergence between the student's and the teacher's next-token distributions.

Each reads the positions that PREDICT tokens of its group (``Predictions(tokens)``, response by
default). The objective applies both LM heads at those positions only, in chunks (``logit_pass.py``), and
asks each term for its per-row values and their gradient with respect to the student's logits
(``dense_value_grad`` / ``sparse_value_grad``); the plain reference path differentiates ``dense``
/ ``sparse`` with autograd instead. One definition of each divergence, value and gradient, lives
in ``llavadi.distill.logits``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from llavadi.distill import logits as div
from llavadi.distill.options import Option
from llavadi.distill.selection import Predictions, Selection
from llavadi.distill.terms.base import Term, TermContext, register
from llavadi.distill.view import Needs

Tensor = torch.Tensor

TEMPERATURE = Option("temperature", float, 1.0, "both sides' logits are divided by it before the softmax",
                     low=0.0, low_open=True)
SCALE_T2 = Option("scale_t2", bool, False, "multiply by temperature^2 (Hinton), keeping gradient scale across T")
MISSING_MASS = Option("missing_mass", str, "renormalize",
                      "top-k teacher only: renormalise its top-k, or keep its missing mass in a rest bucket",
                      choices=div.MISSING_MASS_TREATMENTS)
BETA = Option("beta", float, 0.5, "mixture weight on the teacher: 0 is forward KL, 1 reverse KL", low=0.0, high=1.0)
ALPHA = Option("alpha", float, 0.1, "skew: weight of the first distribution in the mixture", low=0.0, high=1.0)
ZSCORE = Option("zscore", bool, False, "compare row-standardised logits (temperature then cancels)")


class LogitTerm(Term):
    """A divergence of next-token distributions; the objective feeds it LM-head logits chunk by chunk.

    A built-in term names its ``divergence`` in ``llavadi.distill.logits``: its value (``dense``,
    ``sparse``: per row, differentiated by autograd on the plain path) and its closed-form gradient
    (``dense_value_grad``, ``sparse_value_grad``: the fused path) come from the same definition. A
    term without one gives ``dense`` (and ``sparse``); the fused path then differentiates it per
    chunk with autograd.
    """

    is_logit_term: ClassVar[bool] = True
    supports_sparse: ClassVar[bool] = False
    divergence: ClassVar[str | None] = None  # name in llavadi.distill.logits.DIVERGENCES

    def __init_subclass__(cls, **kwargs):
        """A named logit term must say how it compares logits: refused when the class is defined, not at a step."""
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            return
        if cls.divergence is not None and cls.divergence not in div.DIVERGENCES:
            raise TypeError(f"logit term {cls.name!r}: divergence {cls.divergence!r} is not one of "
                            f"{', '.join(div.DIVERGENCES)}")
        if cls.divergence is None and cls.dense is LogitTerm.dense:
            raise TypeError(f"logit term {cls.name!r} gives neither a divergence name nor dense()")
        if cls.supports_sparse and cls.divergence not in div.SPARSE_DIVERGENCES and cls.sparse is LogitTerm.sparse:
            raise TypeError(f"logit term {cls.name!r} sets supports_sparse but its divergence has no top-k form "
                            "and it gives no sparse()")

    def check_setting(self, ctx: TermContext, given: set[str], where: str) -> None:
        if ctx.teacher_signal == "topk" and not self.supports_sparse:
            sparse = sorted(n for n, c in _LOGIT_TERMS.items() if c.supports_sparse)
            raise ValueError(f"{where} needs dense teacher logits; a top-k teacher supports only {sparse}")
        if ctx.teacher_signal == "dense" and "missing_mass" in given:
            raise ValueError(f"{where}: missing_mass applies to a top-k (cached) teacher only; this teacher is dense")

    def selection(self) -> Selection:
        return Predictions(self.tokens)

    def student_needs(self) -> Needs:
        return Needs(last_hidden=True)

    def teacher_needs(self) -> Needs:
        return Needs(last_hidden=self.ctx.teacher_signal == "dense")

    @property
    def temperature(self) -> float:
        """The divergence's temperature."""
        return self.opts["temperature"]

    def divergence_options(self) -> dict[str, Any]:
        """The options passed to the divergence (temperature, scale_t2, and the term's own)."""
        return {"temperature": self.opts["temperature"], "scale_t2": self.opts["scale_t2"]}

    def reads_raw_logits(self) -> bool:
        """Whether the term reads logits themselves, not only their softmax (then the fused pass keeps them)."""
        return self.divergence is None

    def dense(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Per-row divergence (N,) against dense teacher logits (a term without a divergence name overrides it)."""
        return div.DIVERGENCES[self.divergence](student_logits, teacher_logits, **self.divergence_options())

    def sparse(self, student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> Tensor:
        """Per-row divergence (N,) against a top-k teacher (read only when `supports_sparse`; checked at definition)."""
        return div.SPARSE_DIVERGENCES[self.divergence](student_logits, topk_ids, topk_logprobs,
                                                       missing_mass=self.opts["missing_mass"],
                                                       **self.divergence_options())

    def dense_value_grad(self, rows: div.LogitRows, grad: Tensor | None, coef: float) -> Tensor:
        """Per-row values (N,); adds coef * their gradient w.r.t. the student logits into `grad` (if given)."""
        if self.divergence is not None:
            return div.dense_value_grad(self.divergence, rows, grad, coef, **self.divergence_options())
        student_logits, teacher_logits = rows.raw()
        return _autograd_value_grad(lambda x: self.dense(x, teacher_logits), student_logits, grad, coef)

    def sparse_value_grad(self, rows: div.LogitRows, topk_ids: Tensor, topk_logprobs: Tensor,
                          grad: Tensor | None, coef: float) -> Tensor:
        """Per-row values (N,) against a top-k teacher; adds coef * their gradient into `grad` (if given)."""
        if self.divergence in div.SPARSE_DIVERGENCES:
            return div.sparse_value_grad(self.divergence, rows, topk_ids, topk_logprobs, grad, coef,
                                         missing_mass=self.opts["missing_mass"], **self.divergence_options())
        student_logits, _ = rows.raw()
        return _autograd_value_grad(lambda x: self.sparse(x, topk_ids, topk_logprobs), student_logits, grad, coef)


def _autograd_value_grad(per_row, logits: Tensor, grad: Tensor | None, coef: float) -> Tensor:
    """per_row(logits) (N,), and coef * its gradient added into `grad`, by autograd (terms without a closed form)."""
    if grad is None:
        with torch.no_grad():
            return per_row(logits)
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(True)
        value = per_row(leaf)
        (leaf_grad,) = torch.autograd.grad(value.sum(), leaf)
    grad.add_(leaf_grad, alpha=coef)
    return value.detach()


_LOGIT_TERMS: dict[str, type[LogitTerm]] = {}


def _logit(cls):
    _LOGIT_TERMS[cls.name] = cls
    return register(cls)


@_logit
class ForwardKL(LogitTerm):
    """KL(p_T || p_S): mode covering; the LLaVADI paper's choice."""

    name = "forward_kl"
    summary = "KL(teacher || student) of next-token distributions"
    options = (TEMPERATURE, SCALE_T2, MISSING_MASS)
    supports_sparse = True
    divergence = "forward_kl"


@_logit
class ReverseKL(LogitTerm):
    """KL(p_S || p_T): mode seeking."""

    name = "reverse_kl"
    summary = "KL(student || teacher)"
    options = (TEMPERATURE, SCALE_T2)
    divergence = "reverse_kl"


@_logit
class JSD(LogitTerm):
    """Generalised Jensen-Shannon divergence (TRL's convention: beta 0 = forward KL, 1 = reverse KL)."""

    name = "jsd"
    summary = "generalised JSD with mixture weight beta on the teacher"
    options = (TEMPERATURE, SCALE_T2, BETA, MISSING_MASS)
    supports_sparse = True
    divergence = "jsd"

    def check_setting(self, ctx, given, where):
        super().check_setting(ctx, given, where)
        if ctx.teacher_signal == "topk" and self.opts["beta"] == 1.0 and self.opts["missing_mass"] == "renormalize":
            raise ValueError(f"{where}: beta 1 (reverse KL) against a renormalised top-k teacher is infinite wherever "
                             "the student has mass outside the top-k; set missing_mass: rest or beta < 1")

    def divergence_options(self):
        return {**super().divergence_options(), "beta": self.opts["beta"]}


@_logit
class TVD(LogitTerm):
    """Total variation distance."""

    name = "tvd"
    summary = "total variation 1/2 sum |p_T - p_S|"
    options = (TEMPERATURE, SCALE_T2)
    divergence = "tvd"


@_logit
class SkewForwardKL(LogitTerm):
    """DistiLLM's skew KL: KL(p_T || alpha p_T + (1-alpha) p_S)."""

    name = "skew_forward_kl"
    summary = "KL(teacher || alpha teacher + (1-alpha) student)"
    options = (TEMPERATURE, SCALE_T2, ALPHA)
    divergence = "skew_forward_kl"

    def divergence_options(self):
        return {**super().divergence_options(), "alpha": self.opts["alpha"]}


@_logit
class SkewReverseKL(LogitTerm):
    """DistiLLM's skew reverse KL: KL(p_S || alpha p_S + (1-alpha) p_T)."""

    name = "skew_reverse_kl"
    summary = "KL(student || alpha student + (1-alpha) teacher)"
    options = (TEMPERATURE, SCALE_T2, ALPHA)
    divergence = "skew_reverse_kl"

    def divergence_options(self):
        return {**super().divergence_options(), "alpha": self.opts["alpha"]}


@_logit
class LogitMSE(LogitTerm):
    """Mean squared difference of (tempered or standardised) logits over the vocabulary."""

    name = "logit_mse"
    summary = "mean over the vocabulary of squared logit differences"
    options = (TEMPERATURE, SCALE_T2, ZSCORE)
    divergence = "logit_mse"

    @classmethod
    def check(cls, tokens, opts, given, where):
        if opts["zscore"] and "temperature" in given and not opts["scale_t2"]:
            raise ValueError(f"{where}: temperature cancels in z-scored logits; drop it (or set scale_t2: true, "
                             "the only place it then acts)")

    def divergence_options(self):
        return {**super().divergence_options(), "zscore": self.opts["zscore"]}

    def reads_raw_logits(self):
        return not self.opts["zscore"]  # z-scored logits do not see the per-row shift of log-probs
