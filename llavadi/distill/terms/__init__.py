"""Distillation terms, one class each, registered by their exact recipe name; a recipe entry checked against its class.

Adding a term: write one ``Term`` subclass (``llavadi.distill.terms.base``) decorated with
``@register`` in a module imported here, and its test.
"""

from __future__ import annotations

# registration, in the order of the paper's table of methods (logits, tokens, relations)
# isort: off
from llavadi.distill.terms import logit_terms  # noqa: F401
from llavadi.distill.terms import alignment_terms  # noqa: F401
from llavadi.distill.terms import relation_terms  # noqa: F401
from llavadi.distill.terms import cross_vocab_terms  # noqa: F401
# isort: on
from llavadi.config import TermSpec
from llavadi.distill.terms.base import TERMS, Term, TermContext, register, term_class

__all__ = ["TERMS", "Term", "TermContext", "TermSpec", "register", "term_class", "build_term", "check_term",
           "is_logit_term", "describe_terms", "cross_tokenizer_terms"]


def check_term(spec: TermSpec, where: str = "distill.terms") -> None:
    """Check a recipe entry against its term's class: its name, token group and options; ValueError naming `where`."""
    try:
        term_class(spec.name).resolve(spec.tokens, spec.options, "")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def is_logit_term(spec: TermSpec) -> bool:
    """Whether a recipe entry's term compares next-token distributions (reads the LM heads)."""
    return term_class(spec.name).is_logit_term


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
