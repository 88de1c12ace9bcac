"""The distillation objective: total = ce_weight * CE + sum_i weight_i * term_i / count(selection_i).

The objective composes term modules (``llavadi.distill.terms``) and only routes, normalises and
runs the shared chunked LM-head pass (``llavadi.distill.logit_pass``) for CE and the logit terms.
Each term's sum is divided by the GLOBAL count of its selection (``llavadi.distill.selection``):
``count_positions`` gives one micro-batch's counts; the trainer sums them over the accumulation
window and all processes and passes the totals to ``forward``, so accumulation 2x4 and 2
processes x 4 give the loss and gradients of one batch of 8 (with DDP, which averages gradients
over processes, the loss is multiplied by the world size). Without normalisers, ``forward`` uses
the micro-batch's own counts (per-token mean).

The objective never runs the models: it reads a ``ModelView`` of the student and one of the
teacher, wherever the teacher's signal came from (a model run online, or a top-k cache).
Trainable parameters (the terms' projectors) are submodules: the objective sits inside the
trainable module (``llavadi.distill.module.DistillationModule``) beside the student.

With a ``vocab`` (teacher and student tokenizers the same up to additions, ``llavadi.distill.vocab``)
the logit terms compare the two distributions over the shared tokens, and the objective also logs
``vocab/outside_mass_teacher`` and ``vocab/outside_mass_student``: each model's probability mass on
tokens the other lacks, averaged over the first logit term's positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from llavadi.distill.logit_pass import DEFAULT_CHUNK_MIB, logit_loss
from llavadi.distill.selection import Selection, Targets, count_selections, selection_name
from llavadi.distill.terms import TermContext, TermSpec, build_term, check_term
from llavadi.distill.terms.base import TEACHER_SIGNALS
from llavadi.distill.view import ModelView, Needs
from llavadi.distill.vocab import SharedVocab
from llavadi.models.image_tokens import n_image_tokens

Tensor = torch.Tensor
OUTSIDE_MASS_LABELS = ("vocab/outside_mass_teacher", "vocab/outside_mass_student")


def text_width(config: Any) -> int:
    """Hidden width of the language model of a LLaVA (or plain LM) config."""
    text = getattr(config, "text_config", None) or config
    width = getattr(text, "hidden_size", None)
    if width is None:
        raise ValueError(f"cannot read the hidden size from config {type(config).__name__}")
    return int(width)


def _tokens_per_image(config: Any) -> int | None:
    if config is None or getattr(config, "vision_config", None) is None:
        return None
    return n_image_tokens(config)


def term_labels(specs: list[TermSpec]) -> list[str]:
    """Log labels: the term's name, or name[i] when a name appears twice."""
    names = [s.name for s in specs]
    return [s.name if names.count(s.name) == 1 else f"{s.name}[{i}]" for i, s in enumerate(specs)]


class DistillObjective(nn.Module):
    """CE plus weighted distillation terms routed to token types; its terms own their projectors."""

    def __init__(self, terms: list, ce_weight: float = 1.0, student_config: Any = None, teacher_config: Any = None,
                 chunk_size: int | None = None, student_tokens_per_image: int | None = None,
                 teacher_tokens_per_image: int | None = None, teacher_signal: str = "dense",
                 chunk_mib: float = DEFAULT_CHUNK_MIB, fused: bool = True, vocab: SharedVocab | None = None,
                 cross_tokenizer: bool = False, matched_tokens: Any = None) -> None:
        super().__init__()
        specs = [TermSpec.from_dict(t, f"distill.terms[{i}]") for i, t in enumerate(terms)]
        for i, spec in enumerate(specs):
            check_term(spec, f"distill.terms[{i}]")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of positions or None (from chunk_mib), "
                             f"got {chunk_size}")
        if not chunk_mib > 0:
            raise ValueError(f"chunk_mib must be > 0, got {chunk_mib}")
        if teacher_signal not in TEACHER_SIGNALS:
            raise ValueError(f"teacher_signal must be one of {TEACHER_SIGNALS}, got {teacher_signal!r}")
        if specs and teacher_config is None and teacher_signal == "dense":
            raise ValueError(f"distillation terms {[s.name for s in specs]} need a teacher_config (a teacher model)")
        self.ce_weight = float(ce_weight)
        self.chunk_size = chunk_size  # positions per LM-head chunk; None: as many as fit chunk_mib
        self.chunk_mib = chunk_mib
        self.fused = fused  # False: the plain autograd path (the reference)
        self.teacher_signal = teacher_signal
        self.vocab = vocab  # None: one tokenizer (same ids, same LM-head rows)
        ctx = TermContext(
            student_width=text_width(student_config) if student_config is not None else None,
            teacher_width=text_width(teacher_config) if teacher_config is not None else None,
            student_tokens_per_image=student_tokens_per_image or _tokens_per_image(student_config),
            teacher_tokens_per_image=teacher_tokens_per_image or _tokens_per_image(teacher_config),
            teacher_signal=teacher_signal,
            cross_tokenizer=cross_tokenizer,  # different tokenizers: terms read paired answer spans or refuse
            matched_tokens=matched_tokens,
            chunk_size=chunk_size, chunk_mib=chunk_mib,  # terms with their own chunked pass (uld, gold)
        )
        self.ctx = ctx
        self.terms = nn.ModuleList(
            build_term(spec, label, ctx, f"distill.terms[{i}]")
            for i, (spec, label) in enumerate(zip(specs, term_labels(specs)))
        )
        self.specs = specs

    # ---- what the models must give
    @property
    def term_labels(self) -> list[str]:
        """The log label of each term, in recipe order."""
        return [t.label for t in self.terms]

    @property
    def needs_teacher(self) -> bool:
        """Whether any term reads the teacher."""
        return len(self.terms) > 0

    @property
    def student_needs(self) -> Needs:
        """What the student's forward must give (CE always reads the last hidden state)."""
        needs = Needs(last_hidden=True)
        for t in self.terms:
            needs = needs | t.student_needs()
        return needs

    @property
    def teacher_needs(self) -> Needs:
        """What the teacher's forward must give."""
        needs = Needs()
        for t in self.terms:
            needs = needs | t.teacher_needs()
        return needs

    @property
    def needs_attentions(self) -> bool:
        """Whether attention maps are read (the models then need attn_implementation='eager')."""
        return bool(self.student_needs.attention_layers or self.teacher_needs.attention_layers)

    @property
    def selections(self) -> list[Selection]:
        """The normaliser keys ``forward`` needs, CE's first."""
        keys: list[Selection] = [Targets()] if self.ce_weight != 0 else []
        for t in self.terms:
            if t.selection() not in keys:
                keys.append(t.selection())
        return keys

    def count_positions(self, token_types: Tensor, labels: Tensor) -> dict[Selection, float]:
        """Per selection, the number of positions (or entries) this micro-batch contributes."""
        return count_selections(self.selections, token_types, labels)

    # ---- the loss
    def forward(self, student: ModelView, teacher: ModelView | None, labels: Tensor,
                normalizers: dict[Selection, float] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and each term's (unweighted, detached) value; sums divided by the global normalisers."""
        if normalizers is None:
            normalizers = self.count_positions(student.token_types, labels)
        missing = [selection_name(k) for k in self.selections if k not in normalizers]
        if missing:
            raise ValueError(f"normalizers lack {missing}; pass the summed output of count_positions")
        teacher = self._check_teacher(teacher, student.token_types.device)
        ce = self.ce_weight != 0
        logit_terms = [t for t in self.terms if t.is_logit_term]
        counts = {t.label: max(float(normalizers[t.selection()]), 1.0) for t in self.terms}
        counts["ce"] = max(float(normalizers[Targets()]), 1.0) if ce else 1.0
        # the LM-head pass takes each slot's share of the loss (weight / global count) and returns sum_j share_j * sum_j
        slot_labels = ["ce"] * ce + [t.label for t in logit_terms]
        weights = [self.ce_weight] * ce + [t.weight for t in logit_terms]
        total, slot_sums = logit_loss(student, teacher, labels, ce, logit_terms,
                                      [w / counts[label] for w, label in zip(weights, slot_labels)],
                                      self.chunk_size, self.chunk_mib, self.fused, self.vocab)
        sums = slot_sums.unbind(0)
        logged = {label: value / counts[label] for label, value in zip(slot_labels, sums)}
        if len(sums) > len(slot_labels):  # the masses outside the shared tokens, over the first logit term's rows
            logged.update({label: value / counts[logit_terms[0].label]
                           for label, value in zip(OUTSIDE_MASS_LABELS, sums[len(slot_labels):])})
        for term in self.terms:
            if not term.is_logit_term:
                value = term(student, teacher) / counts[term.label]
                total = total + term.weight * value
                logged[term.label] = value.detach()
        order = ["ce"] * ce + self.term_labels + [k for k in OUTSIDE_MASS_LABELS if k in logged]
        return total, {label: logged[label] for label in order}  # recipe order, then the vocabulary's

    def _check_teacher(self, teacher: ModelView | None, device: torch.device) -> ModelView | None:
        if not self.terms:
            return None
        if teacher is None:
            raise ValueError(f"terms {self.term_labels} need the teacher's outputs; got teacher=None")
        if teacher.is_topk != (self.teacher_signal == "topk"):
            got = "a top-k teacher" if teacher.is_topk else "a dense teacher"
            raise ValueError(f"this objective was built for teacher_signal={self.teacher_signal!r} but got {got}")
        teacher.who = "teacher"
        return teacher.on(device)  # the teacher may live on another device: bring its (small) type map here
