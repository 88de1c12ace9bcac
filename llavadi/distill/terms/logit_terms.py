"""Logit terms: a divergence between the student's and the teacher's next-token distributions.

Each reads the positions that PREDICT tokens of its group (``Predictions(tokens)``, response by
default). The objective applies both LM heads at those positions only, in chunks, and calls
``dense`` (teacher logits) or ``sparse`` (top-k teacher: ids and log-probs) on each chunk; one
definition of each divergence lives in ``llavadi.distill.logits``.
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
    """A divergence of next-token distributions; the objective feeds it LM-head logits chunk by chunk."""

    is_logit_term: ClassVar[bool] = True
    supports_sparse: ClassVar[bool] = False

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

    def dense(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Per-row divergence (N,) against dense teacher logits."""
        raise NotImplementedError

    def sparse(self, student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> Tensor:
        """Per-row divergence (N,) against a top-k teacher."""
        raise NotImplementedError(f"term {self.name!r} has no top-k form")


_LOGIT_TERMS: dict[str, type[LogitTerm]] = {}


def _logit(cls):
    _LOGIT_TERMS[cls.name] = cls
    return register(cls)


def _common(opts: dict[str, Any]) -> dict[str, Any]:
    return {"temperature": opts["temperature"], "scale_t2": opts["scale_t2"]}


@_logit
class ForwardKL(LogitTerm):
    """KL(p_T || p_S): mode covering; the LLaVADI paper's choice."""

    name = "forward_kl"
    summary = "KL(teacher || student) of next-token distributions"
    options = (TEMPERATURE, SCALE_T2, MISSING_MASS)
    supports_sparse = True

    def dense(self, student_logits, teacher_logits):
        return div.forward_kl(student_logits, teacher_logits, **_common(self.opts))

    def sparse(self, student_logits, topk_ids, topk_logprobs):
        return div.sparse_forward_kl(student_logits, topk_ids, topk_logprobs, **_common(self.opts),
                                     missing_mass=self.opts["missing_mass"])


@_logit
class ReverseKL(LogitTerm):
    """KL(p_S || p_T): mode seeking."""

    name = "reverse_kl"
    summary = "KL(student || teacher)"
    options = (TEMPERATURE, SCALE_T2)

    def dense(self, student_logits, teacher_logits):
        return div.reverse_kl(student_logits, teacher_logits, **_common(self.opts))


@_logit
class JSD(LogitTerm):
    """Generalised Jensen-Shannon divergence (TRL's convention: beta 0 = forward KL, 1 = reverse KL)."""

    name = "jsd"
    summary = "generalised JSD with mixture weight beta on the teacher"
    options = (TEMPERATURE, SCALE_T2, BETA, MISSING_MASS)
    supports_sparse = True

    def check_setting(self, ctx, given, where):
        super().check_setting(ctx, given, where)
        if ctx.teacher_signal == "topk" and self.opts["beta"] == 1.0 and self.opts["missing_mass"] == "renormalize":
            raise ValueError(f"{where}: beta 1 (reverse KL) against a renormalised top-k teacher is infinite wherever "
                             "the student has mass outside the top-k; set missing_mass: rest or beta < 1")

    def dense(self, student_logits, teacher_logits):
        return div.jsd(student_logits, teacher_logits, beta=self.opts["beta"], **_common(self.opts))

    def sparse(self, student_logits, topk_ids, topk_logprobs):
        return div.sparse_jsd(student_logits, topk_ids, topk_logprobs, beta=self.opts["beta"], **_common(self.opts),
                              missing_mass=self.opts["missing_mass"])


@_logit
class TVD(LogitTerm):
    """Total variation distance."""

    name = "tvd"
    summary = "total variation 1/2 sum |p_T - p_S|"
    options = (TEMPERATURE, SCALE_T2)

    def dense(self, student_logits, teacher_logits):
        return div.tvd(student_logits, teacher_logits, **_common(self.opts))


@_logit
class SkewForwardKL(LogitTerm):
    """DistiLLM's skew KL: KL(p_T || alpha p_T + (1-alpha) p_S)."""

    name = "skew_forward_kl"
    summary = "KL(teacher || alpha teacher + (1-alpha) student)"
    options = (TEMPERATURE, SCALE_T2, ALPHA)

    def dense(self, student_logits, teacher_logits):
        return div.skew_forward_kl(student_logits, teacher_logits, alpha=self.opts["alpha"], **_common(self.opts))


@_logit
class SkewReverseKL(LogitTerm):
    """DistiLLM's skew reverse KL: KL(p_S || alpha p_S + (1-alpha) p_T)."""

    name = "skew_reverse_kl"
    summary = "KL(student || alpha student + (1-alpha) teacher)"
    options = (TEMPERATURE, SCALE_T2, ALPHA)

    def dense(self, student_logits, teacher_logits):
        return div.skew_reverse_kl(student_logits, teacher_logits, alpha=self.opts["alpha"], **_common(self.opts))


@_logit
class LogitMSE(LogitTerm):
    """Mean squared difference of (tempered or standardised) logits over the vocabulary."""

    name = "logit_mse"
    summary = "mean over the vocabulary of squared logit differences"
    options = (TEMPERATURE, SCALE_T2, ZSCORE)

    @classmethod
    def check(cls, tokens, opts, given, where):
        if opts["zscore"] and "temperature" in given and not opts["scale_t2"]:
            raise ValueError(f"{where}: temperature cancels in z-scored logits; drop it (or set scale_t2: true, "
                             "the only place it then acts)")

    def dense(self, student_logits, teacher_logits):
        return div.logit_mse(student_logits, teacher_logits, zscore=self.opts["zscore"], **_common(self.opts))
