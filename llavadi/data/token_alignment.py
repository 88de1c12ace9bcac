"""Pair the answer tokens of two tokenizations of one conversation (teacher and student with different tokenizers).

Each model renders a sample with its own prompt template and tokenizer, so the prompts differ; the
answers (the assistant turns' text) are the same characters. Positions are paired through the bytes
of each answer:

1. ``token_byte_spans``: every token is matched to the bytes of the rendered text it stands for, read
   from the token's own string (``PieceReader``: byte-level BPE ``Ġ`` pieces, SentencePiece ``▁``
   pieces with ``<0xNN>`` byte fallback, WordPiece ``##`` continuations, added tokens by content).
   The tokens must reproduce the text exactly, in order: only whitespace that a pre-tokenizer
   dropped may lie between tokens, and a leading-space marker may stand for a space the text does
   not have (SentencePiece's dummy prefix). Anything else (an unknown token, a normaliser that
   changed characters, offsets that disagree) raises ``AlignmentError`` naming the sample, never a
   silent misalignment. Byte pieces of one multi-byte character get one byte each.
2. ``answer_tokens``: each assistant turn's text (stripped of surrounding whitespace, as written
   verbatim by the template) is located in the rendered text; the tokens overlapping it get their
   byte span within the answer, clipped to it (a leading space that belongs to the template is not
   part of the answer). Positions follow the encoded sample: image placeholders expanded, truncated.
3. ``align_answers``: per turn, both token lists are walked by their end bytes; a group closes where
   both sides end on the same byte, so every group covers the same bytes on both sides and a token
   of one side that spans several of the other's is merged with them. Groups after the last common
   boundary of a side cut by truncation are dropped (their text is not complete on both sides).
   End-of-turn tokens (``</s>``, ``<|im_end|>``) are not answer text and are not paired.

A group is (student first, student last, teacher first, teacher last) token positions: the tokens
of one side in a group are consecutive.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

from llavadi.data.encode import ConversationEncoder, Encoded, SampleError
from llavadi.data.templates import Turn

ASCII_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
GROUP_FIELDS = 4  # s_first, s_last, t_first, t_last
ALIGNMENT_KEY = "token_alignment"  # item and batch key of the paired positions


class AlignmentError(SampleError):
    """Two tokenizations of a sample that cannot be paired exactly; the message names the sample."""


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table: one printable character per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _gpt2_byte_decoder()


class PieceReader:
    """The bytes of text each token of one fast tokenizer stands for, read from its token strings."""

    def __init__(self, tokenizer) -> None:
        backend = tokenizer.backend_tokenizer
        self.tokenizer = tokenizer
        self.byte_level = "ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder)
        model = backend.model
        self.byte_fallback = bool(getattr(model, "byte_fallback", False))
        prefix = getattr(model, "continuing_subword_prefix", None)
        self.continuation = prefix if type(model).__name__ == "WordPiece" and prefix else None
        self.added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self.unk_id = tokenizer.unk_token_id
        self._cache: dict[int, bytes | None] = {}

    def piece(self, token_id: int) -> bytes | None:
        """The token's text as bytes (None: the token stands for no recoverable text, e.g. the unknown token)."""
        if token_id not in self._cache:
            self._cache[token_id] = self._read(token_id)
        return self._cache[token_id]

    def _read(self, token_id: int) -> bytes | None:
        if token_id == self.unk_id:
            return None
        text = self.added.get(token_id) or self.tokenizer.convert_ids_to_tokens(token_id)
        if text is None:
            return None
        match = _BYTE_PIECE.match(text) if self.byte_fallback else None
        if match:  # a byte-fallback piece (an ordinary or an added entry)
            return bytes([int(match.group(1), 16)])
        if token_id in self.added:
            return text.encode("utf-8")
        if self.byte_level:
            try:
                return bytes(_BYTE_DECODER[ch] for ch in text)
            except KeyError:
                return None
        if self.continuation and text.startswith(self.continuation) and len(text) > len(self.continuation):
            text = text[len(self.continuation):]
        return text.replace("▁", " ").encode("utf-8")


def _char_to_byte(text: str) -> list[int]:
    table = [0]
    for ch in text:
        table.append(table[-1] + len(ch.encode("utf-8")))
    return table


def _match(data: bytes, piece: bytes, cursor: int) -> tuple[int, int] | None:
    """Where `piece` reproduces `data` from `cursor` on: skipping only whitespace, dropping only a leading space."""
    pos = cursor
    while True:
        if data.startswith(piece, pos):
            return pos, pos + len(piece)
        if piece[:1] == b" " and data.startswith(piece[1:], pos):  # a space marker the text does not have
            return pos, pos + len(piece) - 1
        if pos < len(data) and data[pos] in ASCII_WHITESPACE:  # whitespace a pre-tokenizer dropped
            pos += 1
            continue
        return None


def _only_whitespace(data: bytes, start: int, end: int, checked: list[tuple[int, int]]) -> bool:
    """Whether the bytes start..end that lie in a checked range are all whitespace (dropped by a pre-tokenizer)."""
    return all(byte in ASCII_WHITESPACE for c0, c1 in checked for byte in data[max(start, c0):min(end, c1)])


def token_byte_spans(reader: PieceReader, text: str, ids: list[int], offsets: list[tuple[int, int]],
                     sample_id: str, checked: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Each token's (start, end) bytes of `text`, anchored at its offsets and read from its string.

    A token overlapping a `checked` byte range (default: the whole text) that does not reproduce the
    text exactly raises AlignmentError; elsewhere (a prompt no one pairs) its offsets stand.
    """
    data = text.encode("utf-8")
    c2b = _char_to_byte(text)
    checked = [(0, len(data))] if checked is None else checked
    cursor = 0
    spans = []
    for k, (token_id, (a, b)) in enumerate(zip(ids, offsets)):
        if a == b:  # added by the post-processor (BOS): no text
            spans.append((cursor, cursor))
            continue
        lo, hi = c2b[a], c2b[b]
        piece = reader.piece(token_id)
        found = None if piece is None else _match(data, piece, max(cursor, lo))
        if found is None or found[1] > hi or not _only_whitespace(data, cursor, found[0], checked):
            if any(min(lo, cursor) < c1 and hi > c0 for c0, c1 in checked):
                shown = reader.tokenizer.convert_ids_to_tokens(token_id)
                raise AlignmentError(
                    f"sample {sample_id!r}: token {k} ({shown!r}) does not reproduce the text at byte {max(cursor, lo)} "
                    f"({data[max(cursor, lo):hi + 8]!r}); its tokenizer changes or drops characters (a normaliser, an "
                    "unknown token), so its positions cannot be paired with another tokenizer's exactly")
            found = (max(cursor, lo), max(cursor, hi))
        spans.append(found)
        cursor = found[1]
    return spans


@dataclass
class AnswerTokens:
    """One view's answer tokens: per assistant turn, (position, start byte, end byte) within the answer."""

    turns: list[list[tuple[int, int, int]]]
    lengths: list[int]  # each answer's length in bytes


def _answer_ranges(encoder: ConversationEncoder, turns: list[Turn], sample_id: str) -> tuple[str, list]:
    """The rendered text and, per assistant turn, the byte range of its (stripped) answer in it."""
    segments = encoder.segments(turns)
    text = "".join(s.text for s in segments)
    c2b = _char_to_byte(text)
    answers = [t.text.strip() for t in turns if t.role == "assistant"]
    trained = []
    pos = 0
    for s in segments:
        if s.trained:
            trained.append((pos, s.text))
        pos += len(s.text)
    if len(trained) != len(answers):
        raise AlignmentError(f"sample {sample_id!r}: template {encoder.template.name!r} writes {len(trained)} trained "
                             f"segments for {len(answers)} answers; answers cannot be located")
    ranges = []
    for k, ((start, seg), answer) in enumerate(zip(trained, answers)):
        at = seg.find(answer)
        if at < 0:
            raise AlignmentError(f"sample {sample_id!r}: template {encoder.template.name!r} does not write answer {k} "
                                 "verbatim; pairing tokens across tokenizers needs the answer's own text")
        ranges.append((c2b[start + at], c2b[start + at + len(answer)]))
    return text, ranges


def answer_tokens(encoder: ConversationEncoder, reader: PieceReader, sample_id: str, turns: list[Turn],
                  encoded: Encoded) -> AnswerTokens:
    """The answer tokens of one encoded sample, at the positions of `encoded` (images expanded, truncated)."""
    text, ranges = _answer_ranges(encoder, turns, sample_id)
    enc = encoder.tokenizer(text, add_special_tokens=encoder.add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = token_byte_spans(reader, text, ids, offsets, sample_id, checked=ranges)
    positions, pos = [], 0
    n = len(encoded.input_ids)
    for token_id in ids:  # each image token of the text became a run of image tokens (its count may depend on the image)
        positions.append(pos)
        if token_id != encoder.image_token_id:
            pos += 1
        while token_id == encoder.image_token_id and pos < n and encoded.input_ids[pos] == token_id:
            pos += 1  # two adjacent images make one run: the first skips it whole, the second nothing
    out: list[list[tuple[int, int, int]]] = [[] for _ in ranges]
    for k, (a0, a1) in enumerate(ranges):
        for token_id, p, (s, e) in zip(ids, positions, spans):
            lo, hi = max(s, a0), min(e, a1)
            if hi > lo and p < n:
                if encoded.input_ids[p] != token_id:
                    raise AlignmentError(f"sample {sample_id!r}: re-tokenizing the text does not give the encoded ids")
                out[k].append((p, lo - a0, hi - a0))
    return AnswerTokens(out, [a1 - a0 for a0, a1 in ranges])


def _walk(s_tokens: list[tuple[int, int, int]], t_tokens: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Groups of consecutive tokens that end on the same byte on both sides (what is left after the last is dropped)."""
    groups = []
    i = j = i0 = j0 = 0
    while i < len(s_tokens) and j < len(t_tokens):
        s_end, t_end = s_tokens[i][2], t_tokens[j][2]
        if s_end < t_end:
            i += 1
        elif t_end < s_end:
            j += 1
        else:
            groups.append((s_tokens[i0][0], s_tokens[i][0], t_tokens[j0][0], t_tokens[j][0]))
            i += 1
            j += 1
            i0, j0 = i, j
    return groups


def align_answers(student: AnswerTokens, teacher: AnswerTokens, sample_id: str) -> list[tuple[int, int, int, int]]:
    """(s_first, s_last, t_first, t_last) token positions of every group covering the same answer bytes on both sides."""
    if student.lengths != teacher.lengths:
        raise AlignmentError(f"sample {sample_id!r}: the two views' answers differ in length "
                             f"({student.lengths} vs {teacher.lengths} bytes)")
    groups = []
    for s_tokens, t_tokens in zip(student.turns, teacher.turns):
        for side, tokens in (("student", s_tokens), ("teacher", t_tokens)):
            for (p0, _, e0), (p1, s1, _) in itertools.pairwise(tokens):
                if p1 != p0 + 1 or s1 < e0:
                    raise AlignmentError(f"sample {sample_id!r}: the {side}'s answer tokens at positions {p0}, {p1} "
                                         "are not consecutive and in order")
        groups += _walk(s_tokens, t_tokens)
    return groups


class PairAligner:
    """Aligns the answers of a student view and a teacher view of each sample (readers built once)."""

    def __init__(self, student: ConversationEncoder, teacher: ConversationEncoder) -> None:
        self.encoders = (student, teacher)
        self.readers = (PieceReader(student.tokenizer), PieceReader(teacher.tokenizer))

    def __call__(self, sample_id: str, turns: list[Turn], student: Encoded, teacher: Encoded) -> torch.Tensor:
        """(n_groups, 4) long tensor of the sample's groups; AlignmentError naming the sample."""
        sides = [answer_tokens(enc, reader, sample_id, turns, encoded)
                 for enc, reader, encoded in zip(self.encoders, self.readers, (student, teacher))]
        groups = align_answers(*sides, sample_id)
        return torch.tensor(groups, dtype=torch.long).reshape(-1, GROUP_FIELDS)


def collate_alignments(alignments: list[torch.Tensor], shifts: tuple[list[int], list[int]] | None = None) -> torch.Tensor:
    """(n_groups, 5) rows (sample in batch, s_first, s_last, t_first, t_last); `shifts` add left-padding per sample."""
    rows = []
    for b, groups in enumerate(alignments):
        groups = groups.clone()
        if shifts is not None:
            groups[:, :2] += shifts[0][b]
            groups[:, 2:] += shifts[1][b]
        rows.append(torch.cat([torch.full((groups.shape[0], 1), b, dtype=torch.long), groups], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, GROUP_FIELDS + 1, dtype=torch.long)


# ---------------------------------------------------------------- an answer sampled by the student, for the teacher
def sampled_text(reader: PieceReader, ids: list[int], stop_ids: set[int]) -> tuple[str, int] | None:
    """(text, number of tokens spelling it) of sampled ids up to the first stop id; None if not valid UTF-8 text."""
    pieces = []
    for token_id in ids:
        if token_id in stop_ids:
            break
        piece = reader.piece(token_id)
        if piece is None:
            return None
        pieces.append(piece)
    try:
        return b"".join(pieces).decode("utf-8"), len(pieces)
    except UnicodeDecodeError:  # the student stopped inside a character
        return None


def _pieces_answer(reader: PieceReader, ids: list[int], start: int, text: str) -> AnswerTokens:
    """The sampled tokens (from position `start`) with their bytes within the stripped answer."""
    data = text.encode("utf-8")
    lead = len(data) - len(data.lstrip())
    length = len(text.strip().encode("utf-8"))
    tokens, cursor = [], 0
    for k, token_id in enumerate(ids):
        size = len(reader.piece(token_id))
        lo, hi = max(cursor, lead), min(cursor + size, lead + length)
        if hi > lo:
            tokens.append((start + k, lo - lead, hi - lead))
        cursor += size
    return AnswerTokens([tokens], [length])


def retokenized_answer(student_reader: PieceReader, answer_ids: list[int], student_start: int,
                       teacher: ConversationEncoder, teacher_reader: PieceReader, teacher_start: int,
                       stop_ids: set[int], sample_id: str) -> tuple[list[int], torch.Tensor] | None:
    """The teacher's tokens of a sampled answer (its template's answer segment) and the paired groups.

    None when the sampled ids do not spell valid text (the sample then stays as it was)."""
    spelled = sampled_text(student_reader, answer_ids, stop_ids)
    if spelled is None or not spelled[0].strip():
        return None
    text, n = spelled
    answer = text.strip()
    segments = teacher.template.segments([Turn("user", "?"), Turn("assistant", answer)], teacher.tokenizer)
    segment = [s for s in segments if s.trained][-1].text
    enc = teacher.tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)
    at = len(segment[:segment.find(answer)].encode("utf-8"))
    checked = [(at, at + len(answer.encode("utf-8")))]
    spans = token_byte_spans(teacher_reader, segment, enc["input_ids"], enc["offset_mapping"], sample_id, checked)
    t_tokens = [(teacher_start + k, max(s, at) - at, min(e, checked[0][1]) - at)
                for k, (s, e) in enumerate(spans) if min(e, checked[0][1]) > max(s, at)]
    groups = align_answers(_pieces_answer(student_reader, answer_ids[:n], student_start, text),
                           AnswerTokens([t_tokens], [checked[0][1] - at]), sample_id)
    return list(enc["input_ids"]), torch.tensor(groups, dtype=torch.long).reshape(-1, GROUP_FIELDS)
