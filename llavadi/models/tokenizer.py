"""A tiny deterministic word-level tokenizer for the synthetic task (no download).

Words are split on whitespace and punctuation, so " red" and "red" give the same id wherever
they appear (prompts and answers are tokenized separately and concatenated). Every word of the
task vocabulary is one token; any other ASCII text falls back to characters (WordPiece "##"
continuations), and non-ASCII characters are first reduced to ASCII (accents stripped, anything
else mapped to "?"), so no text ever yields `<unk>`.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llavadi.data.synthetic import vocabulary_text

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])


def build_tiny_tokenizer(extra_text: str = "") -> PreTrainedTokenizerFast:
    """The tiny tokenizer: task words as single tokens, ASCII character fallback, LLaVA specials."""
    pre = _pre_tokenizer()
    words: list[str] = []
    seen: set[str] = set()
    for line in (vocabulary_text() + "\n" + extra_text).splitlines():
        for word, _ in pre.pre_tokenize_str(line):
            if word not in seen:
                seen.add(word)
                words.append(word)
    alphabet = [c for c in string.printable if not c.isspace()]
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *alphabet, *("##" + c for c in alphabet), *words]:
        vocab.setdefault(tok, len(vocab))

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=10_000))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKD(), normalizers.StripAccents(),
        normalizers.Replace(Regex(r"[^\x20-\x7E\s]"), "?"),  # keeps every char in the alphabet
    ])
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, padding_side="right",
        model_max_length=512,
    )


def build_tiny_bpe_tokenizer(merges: int = 64) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (GPT-2 style: ``Ġ`` spaces, any text encodes) trained on the task's words.

    Another vocabulary and other merges than ``build_tiny_tokenizer``'s word-level one: with few
    merges most task words are several tokens, so a student with it and the demo's teacher split
    every answer differently (cross-tokenizer distillation: ``uld``, ``gold``). The same specials.
    """
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + merges,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False)
    lines = vocabulary_text().splitlines()
    tok.train_from_iterator(lines + [line for line in lines if len(line.split()) <= 2] * 4, trainer)  # answers weigh more
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, padding_side="right", model_max_length=512,
    )
