"""Logit terms across vocabularies: ``uld`` and ``gold`` (definitions and gradients in ``llavadi.distill.cross_vocab``).

They compare the two models' next-token distributions on paired answer spans, each over its own
vocabulary, so teacher and student may have different tokenizers. The pairs come with the batch
(``token_alignment``, made by the dataset from both tokenizations); with one shared tokenization
each answer token pairs with itself. Each term runs its own chunked pass over the paired rows (the
LM heads at those rows only, closed-form gradients) and returns its sum over the groups; the
objective divides it by the number of the student's answer-predicting positions, as for the other
logit terms. End-of-turn tokens are not answer text: they are not compared (CE still trains them).
Chunks: the stage's ``chunk_size`` rows, or as many as keep one model's fp32 chunk logits within
``chunk_mib`` (as the fused pass).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from llavadi.distill.cross_vocab import (
    MERGES,
    AlignedPass,
    MatchedTokens,
    PairedGroups,
    TeacherSignal,
    aligned_sum,
    gold_divergence,
    identity_groups,
    sorted_l1,
)
from llavadi.distill.divergences import TEMPERATURE
from llavadi.distill.logit_pass import DEFAULT_CHUNK_MIB, head_weights, rows_per_chunk
from llavadi.distill.options import Option
from llavadi.distill.selection import Predictions, Selection, prediction_mask
from llavadi.distill.terms.base import Term, register
from llavadi.distill.view import ModelView, Needs

Tensor = torch.Tensor

TOP_K = Option("top_k", int, 256, "compare the top_k largest probabilities of each side (0: the whole vocabulary, "
               "the exact sorted distance)", low=0)
MERGE = Option("merge", str, "first", "a span's distribution: the full one at its first token (both models see the "
               "same text there) or at its last, times the other tokens' probabilities", choices=MERGES)
BETA = Option("beta", float, 0.5, "gold: JSD mixture weight of matched tokens (0 forward KL, 1 reverse KL)",
              low=0.0, high=1.0)
MATCHED_WEIGHT = Option("matched_weight", float, None, "gold: weight of the matched-token part (default with "
                        "unmatched_weight unset: the matched share of the teacher's vocabulary)", low=0.0)
UNMATCHED_WEIGHT = Option("unmatched_weight", float, None, "gold: weight of the sorted part over the other tokens "
                          "(default: 1 - the matched share)", low=0.0)


class AlignedLogitTerm(Term):
    """A divergence of merged next-token distributions on paired answer spans, vocabularies may differ.

    A named subclass gives ``divergence(teacher_size)``: a function (log_s, log_t, grad_log) ->
    per-group values that adds d value / d log_s into grad_log; checked when the class is defined.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") and not callable(getattr(cls, "divergence", None)):
            raise TypeError(f"aligned logit term {cls.name!r} gives no divergence(teacher_size)")

    default_tokens: ClassVar[str] = "response"
    allowed_tokens: ClassVar[tuple[str, ...]] = ("response",)
    reads_teacher_logits: ClassVar[bool] = True  # a top-k cache serves it at the answer-predicting rows

    @classmethod
    def across_tokenizers(cls, tokens, opts):
        return None

    @classmethod
    def pairs_answer_tokens(cls, tokens, opts):
        return True

    def selection(self) -> Selection:
        return Predictions(self.tokens)

    def student_needs(self) -> Needs:
        return Needs(last_hidden=True)

    def teacher_needs(self) -> Needs:
        return Needs(last_hidden=self.ctx.teacher_signal == "dense")

    def groups(self, student: ModelView, teacher: ModelView) -> PairedGroups:
        """The paired spans of the micro-batch (its own answer tokens when both share one tokenization)."""
        paired = getattr(teacher, "alignment", None)
        if paired is not None:
            return paired
        types_s = student.token_types.cpu()
        next_is_answer = torch.zeros_like(types_s, dtype=torch.bool)
        next_is_answer[:, 1:] = prediction_mask(types_s, self.tokens)[:, :-1]  # the tokens the rows predict
        return identity_groups(types_s, teacher.token_types.cpu(), next_is_answer)

    def forward(self, student: ModelView, teacher: ModelView) -> Tensor:
        paired = self.groups(student, teacher)
        if len(paired) == 0:
            return self.zero(student)
        rows_s, rows_t = paired.rows(self.opts["merge"])
        weight, bias = head_weights(student)
        if teacher.is_topk:
            k = teacher.topk_ids.shape[-1]
            size = int(teacher.topk_ids.max()) + 1
            signal = TeacherSignal(topk_ids=teacher.topk_ids.reshape(-1, k), size=max(size, self.teacher_size(size)),
                                   topk_logprobs=teacher.topk_logprobs.detach().reshape(-1, k))
        else:
            head = head_weights(teacher)
            signal = TeacherSignal(hidden=teacher.last_hidden.detach().reshape(-1, teacher.last_hidden.shape[-1]),
                                   head=head, size=head[0].shape[0])
        step = rows_per_chunk(max(weight.shape[0], signal.size), self.ctx.chunk_size,
                              self.ctx.chunk_mib or DEFAULT_CHUNK_MIB)
        work = AlignedPass(self.divergence(signal.size), self.opts["temperature"], rows_s, rows_t, signal, step)
        hidden = student.last_hidden.reshape(-1, student.last_hidden.shape[-1])
        return aligned_sum(work, hidden, weight, bias).float()

    def teacher_size(self, seen: int) -> int:
        """The teacher's vocabulary size when known (a top-k teacher shows only the ids it holds)."""
        return seen


@register
class ULD(AlignedLogitTerm):
    """Universal Logit Distillation: L1 distance of the sorted probability vectors (Boizard et al. 2024)."""

    name = "uld"
    summary = "sorted-probability (Wasserstein-1) distance of paired spans' distributions; vocabularies may differ"
    options = (TEMPERATURE, TOP_K, MERGE)

    def divergence(self, teacher_size: int):
        top_k = self.opts["top_k"]
        return lambda log_s, log_t, grad_log: sorted_l1(log_s, log_t, top_k, grad_log)


@register
class GOLD(AlignedLogitTerm):
    """TRL's GOLD hybrid: matched token strings by JSD, the other tokens by the sorted distance."""

    name = "gold"
    summary = "tokens with the same string compared by JSD, the rest by ULD, on paired spans; vocabularies may differ"
    options = (TEMPERATURE, TOP_K, MERGE, BETA, MATCHED_WEIGHT, UNMATCHED_WEIGHT)

    @classmethod
    def check(cls, tokens, opts, given, where):
        if (opts["matched_weight"] is None) != (opts["unmatched_weight"] is None):
            raise ValueError(f"{where}: set both matched_weight and unmatched_weight, or neither (then the matched "
                             "share of the teacher's vocabulary weighs the matched part)")

    def check_setting(self, ctx, given, where):
        if ctx.matched_tokens is None and ctx.cross_tokenizer:
            raise ValueError(f"{where} needs the map of token strings shared by the two tokenizers")
        if ctx.teacher_signal == "topk" and self.opts["beta"] == 1.0:
            raise ValueError(f"{where}: beta 1 (reverse KL) against a top-k teacher is infinite wherever the student "
                             "has mass outside the teacher's top-k; set beta < 1")

    def teacher_size(self, seen: int) -> int:
        return seen if self.ctx.matched_tokens is None else self.ctx.matched_tokens.teacher_size

    def divergence(self, teacher_size: int):
        opts, matched = self.opts, self.ctx.matched_tokens
        if matched is None:  # one tokenizer (e.g. a teacher cache of the student's tokenization): every id matches
            ids = torch.arange(teacher_size)
            matched = MatchedTokens(ids, ids, teacher_size)
        weights = None if opts["matched_weight"] is None else (opts["matched_weight"], opts["unmatched_weight"])
        if weights is None:  # the share of the teacher's whole vocabulary (a top-k row shows only part of it)
            share = len(matched.teacher_ids) / max(1, matched.teacher_size)
            weights = (share, 1.0 - share)
        return lambda log_s, log_t, grad_log: gold_divergence(log_s, log_t, matched, opts["top_k"], opts["beta"],
                                                              weights, grad_log)
