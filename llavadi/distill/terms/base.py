"""The base of every distillation term, and the registry of terms by their exact recipe name.

A term is one small ``nn.Module`` class that declares, in one place:
- ``name``: its recipe name (registered with ``@register``);
- ``options``: its options with types, defaults and ranges (``llavadi.distill.options.Option``),
  validated generically; cross-option rules in ``check``; rules that depend on the run (e.g. a
  top-k teacher) in ``check_setting``;
- ``default_tokens`` / ``allowed_tokens``: the token-type group it reads (``tokens`` in a recipe),
  or ``default_tokens = None`` when it takes rows/cols options instead;
- ``selection()``: which positions its sum runs over (its normaliser, ``llavadi.distill.selection``);
- ``student_needs()`` / ``teacher_needs()``: what it reads from each model's forward;
- ``forward(student, teacher)``: its SUM over the selection (the objective divides by the global count).

Logit terms (``LogitTerm``) instead give per-row divergences of LM-head logits; the objective runs
the LM heads once for all of them, in chunks, only at the positions they select.
Trainable parameters (alignment projectors) are submodules of the term, so they are part of the
trainable module that the Trainer (DDP, FSDP, DeepSpeed) manages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from llavadi.data.token_types import TYPE_GROUPS
from llavadi.distill.options import Option, validate_options
from llavadi.distill.selection import Selection
from llavadi.distill.view import ModelView, Needs

Tensor = torch.Tensor
TEACHER_SIGNALS = ("dense", "topk")

TERMS: dict[str, type[Term]] = {}


def register(cls: type[Term]) -> type[Term]:
    """Class decorator: register a term under its exact `name`."""
    if cls.name in TERMS:
        raise ValueError(f"distillation term {cls.name!r} is registered twice")
    TERMS[cls.name] = cls
    return cls


def term_class(name: str) -> type[Term]:
    """The term registered under exactly `name`."""
    if name not in TERMS:
        raise ValueError(f"unknown distillation term {name!r}; valid terms: {', '.join(TERMS)}")
    return TERMS[name]


def _term_where(where: str, name: str) -> str:
    return f"{where}: term {name!r}" if where else f"term {name!r}"


@dataclass(frozen=True)
class TermContext:
    """What a term may need to know about the run: widths, image tokens per image, teacher signal."""

    student_width: int | None = None
    teacher_width: int | None = None
    student_tokens_per_image: int | None = None
    teacher_tokens_per_image: int | None = None
    teacher_signal: str = "dense"  # "dense": a teacher model's logits; "topk": an offline top-k cache
    cross_tokenizer: bool = False  # teacher and student tokenize text differently (positions paired by alignment)
    matched_tokens: Any = None  # llavadi.distill.cross_vocab.MatchedTokens: ids with the same string on both sides
    chunk_size: int | None = None  # rows per LM-head chunk of a term's own pass (None: from chunk_mib)
    chunk_mib: float | None = None  # else as many rows as keep one model's fp32 chunk logits within this (None: default)


class Term(nn.Module):
    """A distillation term: declared options, token selection, needs, and its sum."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    default_tokens: ClassVar[str | None] = "response"
    allowed_tokens: ClassVar[tuple[str, ...] | None] = None  # None: every group
    is_logit_term: ClassVar[bool] = False

    @classmethod
    def resolve(cls, tokens: str | None, given: dict[str, Any], where: str) -> tuple[str | None, dict[str, Any]]:
        """(tokens, options with defaults) of a recipe entry, validated; ValueError naming `where`."""
        where = _term_where(where, cls.name)
        if cls.default_tokens is None:
            if tokens is not None:
                raise ValueError(f"{where} selects rows and columns: set options rows/cols instead of `tokens`")
        else:
            tokens = cls.default_tokens if tokens is None else tokens
            allowed = cls.allowed_tokens or tuple(sorted(TYPE_GROUPS))
            if tokens not in allowed:
                raise ValueError(f"{where}: tokens {tokens!r} is not accepted; choose one of {list(allowed)}")
        opts = validate_options(cls.options, given, where)
        cls.check(tokens, opts, set(given), where)
        return tokens, opts

    @classmethod
    def check(cls, tokens: str | None, opts: dict[str, Any], given: set[str], where: str) -> None:
        """Cross-option rules (override); `given` are the option names the recipe set."""

    @classmethod
    def across_tokenizers(cls, tokens: str | None, opts: dict[str, Any]) -> str | None:
        """None when the term works with teacher and student of different tokenizers; else why it does not."""
        return "pairs text positions one to one, which only a shared tokenization gives"

    @classmethod
    def pairs_answer_tokens(cls, tokens: str | None, opts: dict[str, Any]) -> bool:
        """Whether, across tokenizers, it reads the answer tokens paired by the data's token alignment."""
        return False

    def __init__(self, tokens: str | None, opts: dict[str, Any], weight: float, label: str,
                 ctx: TermContext, given: set[str], where: str) -> None:
        super().__init__()
        self.tokens = tokens
        self.opts = opts
        self.weight = float(weight)
        self.label = label
        self.ctx = ctx
        self.check_setting(ctx, given, _term_where(where, self.name))

    def check_setting(self, ctx: TermContext, given: set[str], where: str) -> None:
        """Rules that depend on the run, e.g. the teacher signal (override)."""

    def selection(self) -> Selection:
        """The positions (or entries) this term's sum runs over."""
        raise NotImplementedError

    def student_needs(self) -> Needs:
        """What this term reads from the student's forward."""
        return Needs()

    def teacher_needs(self) -> Needs:
        """What this term reads from the teacher's forward."""
        return Needs()

    def zero(self, student: ModelView) -> Tensor:
        """A zero that keeps the student and this term's projectors in the graph (nothing selected).

        Each projector (``self.projectors``, maps (N, student width) rows) runs on no rows instead of
        its weights being read: engines that shard parameters (DeepSpeed ZeRO-3, FSDP) gather a
        module's weights only around its own forward, and a weight read outside it is an empty shard.
        """
        if student.last_hidden is None:
            return torch.zeros(())
        zero = student.last_hidden.sum().float() * 0.0
        for projector in getattr(self, "projectors", ()):
            dtype = next((p.dtype for p in projector.parameters()), student.last_hidden.dtype)
            no_rows = student.last_hidden.new_zeros(0, student.last_hidden.shape[-1], dtype=dtype)
            zero = zero + projector(no_rows).float().sum()
        return zero

    def forward(self, student: ModelView, teacher: ModelView) -> Tensor:
        """The term's sum over its selection (unnormalised, float32)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.opts.items() if v is not None}
        return f"{self.label}: weight={self.weight}, tokens={self.tokens}, options={shown}"
