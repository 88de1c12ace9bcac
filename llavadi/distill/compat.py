"""Whether a teacher and a student can be compared by logit terms: one shared tokenizer."""

from __future__ import annotations

from typing import Any


def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise ValueError if the two tokenizers' vocabularies (token -> id) differ."""
    vocab_s, vocab_t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vocab_s == vocab_t:
        return
    only_s = sorted(set(vocab_s) - set(vocab_t))
    only_t = sorted(set(vocab_t) - set(vocab_s))
    moved = sorted(tok for tok in set(vocab_s) & set(vocab_t) if vocab_s[tok] != vocab_t[tok])
    details = []
    if only_s:
        details.append(f"{len(only_s)} token(s) only in the student's, e.g. {only_s[:5]}")
    if only_t:
        details.append(f"{len(only_t)} token(s) only in the teacher's, e.g. {only_t[:5]}")
    if moved:
        details.append(
            f"{len(moved)} token(s) with different ids, e.g. {[(t, vocab_s[t], vocab_t[t]) for t in moved[:5]]}"
        )
    raise ValueError(
        "logit distillation needs teacher and student to share one tokenizer; cross-tokenizer KD is not supported yet. "
        f"Vocabularies differ (student {len(vocab_s)}, teacher {len(vocab_t)} tokens): "
        + "; ".join(details)
        + ". Use the same tokenizer for both, or drop the logit terms (keep hidden/relation terms)."
    )
