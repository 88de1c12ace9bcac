"""Whether a teacher and a student can be compared by logit terms: their tokenizer pair, classified.

``identical``: one tokenizer, the logit terms compare the full distributions; ``additions`` (the
same tokenizer up to added tokens, special tokens at other ids and padded LM-head rows): they
compare the two distributions over the tokens both have, through a fixed id map
(``llavadi.distill.vocab.SharedVocab``); ``different``: refused for the logit terms of one
vocabulary, before any model loads (``uld`` and ``gold`` compare paired answer spans instead).
"""

from __future__ import annotations

from typing import Any

from llavadi.data.tokenizer_pair import ADDITIONS, IDENTICAL, TokenizerPair, classify_pair
from llavadi.distill.vocab import SharedVocab

CROSS_TOKENIZER_HINT = ("these logit terms compare distributions over one vocabulary; across different tokenizers "
                        "use uld or gold (they compare paired answer spans, docs/tokenizers-cross.md), or give both "
                        "models one tokenizer")


def _rows(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    return int(rows) if rows is not None else None


def tokenizer_pair(student: Any, teacher: Any) -> TokenizerPair:
    """The classified pair of two loaded (or described) models: their tokenizers and LM-head rows from the configs."""
    return classify_pair(teacher.tokenizer, student.tokenizer, _rows(teacher.model.config), _rows(student.model.config))


def logit_vocab(pair: TokenizerPair) -> SharedVocab | None:
    """The vocabulary map logit terms read: None for one tokenizer; ValueError for different tokenizers."""
    if pair.kind == IDENTICAL:
        return None
    if pair.kind == ADDITIONS:
        return SharedVocab.from_pair(pair)
    raise ValueError("teacher and student have different tokenizers:\n    " + "\n    ".join(pair.describe())
                     + f"\n  {CROSS_TOKENIZER_HINT}")
