"""Distillation terms, one class each, registered by their exact recipe name; and the recipe entry.

Adding a term: write one ``Term`` subclass (``llavadi.distill.terms.base``) decorated with
``@register`` in a module imported here, and its test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# registration, in the order of the paper's table of methods (logits, tokens, relations)
# isort: off
from llavadi.distill.terms import logit_terms  # noqa: F401
from llavadi.distill.terms import alignment_terms  # noqa: F401
from llavadi.distill.terms import relation_terms  # noqa: F401
from llavadi.distill.terms import cross_vocab_terms  # noqa: F401
# isort: on
from llavadi.distill.terms.base import TERMS, Term, TermContext, register, term_class

__all__ = ["TERMS", "Term", "TermContext", "TermSpec", "register", "term_class", "build_term", "describe_terms",
           "cross_tokenizer_terms"]

TERM_KEYS = ("name", "weight", "tokens", "options")


@dataclass
class TermSpec:
    """One entry of a recipe's ``distill.terms`` list, validated against its term class on creation."""

    name: str
    weight: float = 1.0
    tokens: str | None = None  # the token-type group it reads; None: the term's default
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cls = term_class(self.name)
        problems = []  # the weight's, then the tokens' and options': all named at once
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            problems.append(f"term {self.name!r}: weight must be a finite number, got {self.weight!r}")
        elif self.weight < 0:
            problems.append(f"term {self.name!r}: weight must be >= 0, got {self.weight!r}")
        else:
            self.weight = float(self.weight)
        self.options = dict(self.options or {})
        try:
            cls.resolve(self.tokens, self.options, "")
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, entry: Any, where: str = "distill.terms") -> TermSpec:
        """A TermSpec from one recipe entry; errors name the entry (e.g. "distill.terms[2]")."""
        if isinstance(entry, TermSpec):
            return entry
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: each term is a mapping with name, weight, tokens, options; got {entry!r}")
        unknown = sorted(set(entry) - set(TERM_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a term has name, weight, tokens, options")
        if "name" not in entry:
            raise ValueError(f"{where}: missing `name`; valid terms: {', '.join(TERMS)}")
        try:
            return cls(**entry)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @property
    def is_logit_term(self) -> bool:
        """Whether this term compares next-token distributions (reads the LM heads)."""
        return term_class(self.name).is_logit_term


def build_term(spec: TermSpec, label: str, ctx: TermContext, where: str) -> Term:
    """The term module of a recipe entry in a run's context."""
    cls = term_class(spec.name)
    tokens, opts = cls.resolve(spec.tokens, spec.options, where)
    if ctx.cross_tokenizer:
        reason = cls.across_tokenizers(tokens, opts)
        if reason is not None:
            raise ValueError(f"{where}: term {spec.name!r} {reason}; teacher and student have different tokenizers "
                             f"(terms that work across them with their defaults: {', '.join(cross_tokenizer_terms())})")
    return cls(tokens, opts, spec.weight, label, ctx, set(spec.options), where)


def cross_tokenizer_terms() -> list[str]:
    """The terms that accept different tokenizers with their default options."""
    return [name for name, cls in TERMS.items() if cls.across_tokenizers(*cls.resolve(None, {}, "")) is None]


def describe_terms(names: list[str] | None = None) -> str:
    """Plain-text reference of the registered terms (or of `names`): what each compares, tokens, options."""
    lines = []
    for name in names or list(TERMS):
        cls = term_class(name)
        kind = "logit term" if cls.is_logit_term else "state/relation term"
        if cls.default_tokens is None:
            tokens = "takes no `tokens` (options rows/cols)"
        else:
            allowed = ", ".join(cls.allowed_tokens) if cls.allowed_tokens else "any group"
            tokens = f"tokens: {cls.default_tokens} by default ({allowed})"
        lines.append(f"{name}: {cls.summary} [{kind}; {tokens}]")
        lines += [f"    {option.describe()}" for option in cls.options] or ["    (no options)"]
    return "\n".join(lines)
