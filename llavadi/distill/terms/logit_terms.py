"""Logit terms: a divergence between the student's and the teacher's next-token distributions.

Each reads the positions that PREDICT tokens of its group (``Predictions(tokens)``, response by
default). The objective applies both LM heads at those positions only, in chunks (``logit_pass.py``),
and asks each term for its per-row values and their gradient with respect to the student's logits
(``dense_value_grad`` / ``sparse_value_grad``); the plain reference path differentiates ``dense`` /
``sparse`` with autograd instead.

Every closed-form divergence (``llavadi.distill.divergences``, one class each) is the logit term
of its name, built here by ``divergence_term``: its options, checks, value and gradient are the
divergence class's. A logit term without a closed form subclasses ``LogitTerm`` and gives
``dense`` (and ``sparse``); the fused pass then differentiates it per chunk with autograd.
"""

from __future__ import annotations

from functools import cached_property
from typing import ClassVar

import torch

from llavadi.distill.divergences import Divergence, closed_form_divergences
from llavadi.distill.logits import LogitRows
from llavadi.distill.selection import Predictions, Selection
from llavadi.distill.terms.base import TERMS, Term, TermContext, register
from llavadi.distill.view import Needs

Tensor = torch.Tensor


class LogitTerm(Term):
    """A divergence of next-token distributions; the objective feeds it LM-head logits chunk by chunk.

    A named subclass gives ``dense(student_logits, teacher_logits)`` (and ``sparse(student_logits,
    topk_ids, topk_logprobs)`` with ``supports_sparse``): per-row values (N,), which the fused pass
    differentiates by autograd; checked when the class is defined. ``DivergenceTerm`` gives the
    closed form instead.
    """

    is_logit_term: ClassVar[bool] = True
    supports_sparse: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        """A named logit term must say how it compares logits: refused when the class is defined, not at a step."""
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name") or issubclass(cls, DivergenceTerm):
            return
        if not callable(getattr(cls, "dense", None)):
            raise TypeError(f"logit term {cls.name!r} gives no dense() (or subclass DivergenceTerm with a Divergence)")
        if cls.supports_sparse and not callable(getattr(cls, "sparse", None)):
            raise TypeError(f"logit term {cls.name!r} sets supports_sparse but gives no sparse()")

    def check_setting(self, ctx: TermContext, given: set[str], where: str) -> None:
        if ctx.teacher_signal == "topk" and not self.supports_sparse:
            sparse = sorted(n for n, c in TERMS.items() if c.is_logit_term and c.supports_sparse)
            raise ValueError(f"{where} needs dense teacher logits; a top-k teacher supports only {sparse}")
        if ctx.teacher_signal == "dense" and "missing_mass" in given:
            raise ValueError(f"{where}: missing_mass applies to a top-k (cached) teacher only; this teacher is dense")

    def selection(self) -> Selection:
        return Predictions(self.tokens)

    def student_needs(self) -> Needs:
        return Needs(last_hidden=True)

    def teacher_needs(self) -> Needs:
        return Needs(last_hidden=self.ctx.teacher_signal == "dense")

    def reads_raw_logits(self) -> bool:
        """Whether the term reads logits themselves, not only their softmax (then the fused pass keeps them)."""
        return True

    def dense_value_grad(self, rows: LogitRows, grad: Tensor | None, coef: float) -> Tensor:
        """Per-row values (N,); adds coef * their gradient w.r.t. the student logits into `grad` (if given)."""
        student_logits, teacher_logits = rows.raw()
        return _autograd_value_grad(lambda x: self.dense(x, teacher_logits), student_logits, grad, coef)

    def sparse_value_grad(self, rows: LogitRows, topk_ids: Tensor, topk_logprobs: Tensor,
                          grad: Tensor | None, coef: float) -> Tensor:
        """Per-row values (N,) against a top-k teacher; adds coef * their gradient into `grad` (if given)."""
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


class DivergenceTerm(LogitTerm):
    """The logit term of a closed-form ``Divergence``: its options, checks, value and gradient are the class's."""

    divergence: ClassVar[type[Divergence]]

    @classmethod
    def check(cls, tokens, opts, given, where):
        cls.divergence.check(opts, given, where)

    def check_setting(self, ctx, given, where):
        super().check_setting(ctx, given, where)
        if ctx.teacher_signal == "topk":
            self.fn.check_topk(where)  # a cache's k is below V

    @cached_property
    def fn(self) -> Divergence:
        """The divergence with this term's options."""
        return self.divergence.from_validated(self.opts)

    def reads_raw_logits(self) -> bool:
        return self.fn.reads_raw_logits()

    def dense(self, student_logits, teacher_logits):
        return self.fn(student_logits, teacher_logits)

    def sparse(self, student_logits, topk_ids, topk_logprobs):
        return self.fn.of_topk(student_logits, topk_ids, topk_logprobs)

    def dense_value_grad(self, rows, grad, coef):
        return self.fn.dense(rows, grad, coef)

    def sparse_value_grad(self, rows, topk_ids, topk_logprobs, grad, coef):
        return self.fn.topk(rows, topk_ids, topk_logprobs, grad, coef)


def divergence_term(divergence: type[Divergence]) -> type[DivergenceTerm]:
    """The logit term class of a named divergence: its name, summary and options (register it with `register`)."""
    if not divergence.__dict__.get("name"):
        raise TypeError(f"{divergence.__name__} has no name of its own: a term needs one")
    return type(f"{divergence.__name__}Term", (DivergenceTerm,), {
        "__doc__": divergence.__doc__, "__module__": __name__, "name": divergence.name,
        "summary": divergence.summary, "options": divergence.options, "divergence": divergence,
        "supports_sparse": divergence.has_topk})


for _divergence in closed_form_divergences():
    register(divergence_term(_divergence))
