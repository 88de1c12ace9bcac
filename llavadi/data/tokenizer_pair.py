"""How a teacher's and a student's tokenizers relate, from tokenizer files only (before any model loads).

``classify_pair(teacher_tokenizer, student_tokenizer, teacher_rows, student_rows)`` gives a
``TokenizerPair`` of one of three kinds:
- ``identical``: the same tokens at the same ids and LM heads of the same number of rows;
- ``additions``: the same tokenizer up to added tokens (e.g. LLaVA's ``<image>``, a ``<pad>``),
  special tokens at other ids and padded LM-head rows: the tokenizer model (its type, base
  vocabulary and merges), normalizer and pre-tokenizer are equal, so a text splits into the same
  tokens on both sides (llava-hf's LLaVA-1.5 and a student composed from a LLaMA-tokenizer LLM);
- ``different``: anything else (another vocabulary, other merges, another normalizer...).

For every kind the pair holds the fixed id map over the tokens both have, matched by exact token
string (``teacher_ids[i]`` <-> ``student_ids[i]``, ordered by student id), and what differs:
tokens only one side has, shared tokens at other ids, and LM-head rows without a token (padding:
a config's ``vocab_size`` above the tokenizer's size). For ``additions`` the logit terms compare
the two distributions over the shared tokens; for ``different`` the exact-string matches are what
cross-tokenizer terms can compare exactly.

Tokenizers are ``transformers`` tokenizers as loaded from a folder (``AutoTokenizer``): the fast
ones' ``backend_tokenizer`` JSON gives the model, normalizer and pre-tokenizer. A tokenizer without
a fast backend is compared by its vocabulary only (``identical`` or ``different``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

IDENTICAL, ADDITIONS, DIFFERENT = "identical", "additions", "different"
KINDS = (IDENTICAL, ADDITIONS, DIFFERENT)
SHOWN = 5  # tokens listed per difference in descriptions
BASE_PARTS = ("model", "normalizer", "pre_tokenizer")  # what must be equal for `additions`


@dataclass(frozen=True)
class TokenizerPair:
    """The kind of a teacher-student tokenizer pair, the id map over the tokens both have, and what differs."""

    kind: str
    teacher_ids: tuple[int, ...]  # shared tokens (same string on both sides), ordered by student id
    student_ids: tuple[int, ...]
    only_teacher: tuple[tuple[str, int], ...]  # (token, id) by id
    only_student: tuple[tuple[str, int], ...]
    moved: tuple[tuple[str, int, int], ...]  # shared tokens at other ids: (token, teacher id, student id)
    teacher_size: int  # ids the tokenizer can produce (max id + 1)
    student_size: int
    teacher_rows: int  # LM-head rows (a config's vocab_size; at least the tokenizer's size)
    student_rows: int
    differences: tuple[str, ...] = ()  # why the base tokenizers differ (kind `different`)

    @property
    def n_shared(self) -> int:
        """Number of tokens both tokenizers have (matched by string)."""
        return len(self.student_ids)

    @property
    def padded_teacher_rows(self) -> int:
        """Teacher LM-head rows that no token maps to (embedding padding)."""
        return self.teacher_rows - self.teacher_size

    @property
    def padded_student_rows(self) -> int:
        """Student LM-head rows that no token maps to."""
        return self.student_rows - self.student_size

    def teacher_to_student(self) -> torch.Tensor:
        """A (teacher_rows,) long tensor: the student id of each teacher id, -1 where the student has no such token.

        Built once per pair and shared (read it, do not modify it): the teacher cache maps every
        sample's ids through it at each batch."""
        return self._id_map("_teacher_to_student", self.teacher_rows, self.teacher_ids, self.student_ids)

    def student_to_teacher(self) -> torch.Tensor:
        """A (student_rows,) long tensor: the teacher id of each student id, -1 where the teacher has no such token.

        Built once per pair and shared (read it, do not modify it)."""
        return self._id_map("_student_to_teacher", self.student_rows, self.student_ids, self.teacher_ids)

    def _id_map(self, key: str, rows: int, source: tuple[int, ...], target: tuple[int, ...]) -> torch.Tensor:
        if key not in self.__dict__:  # a frozen dataclass: the built map is stored beside the fields
            object.__setattr__(self, key, _id_map(rows, source, target))
        return self.__dict__[key]

    def describe(self) -> list[str]:
        """Lines for `llavadi train --check`: the kind and everything that differs."""
        head = {IDENTICAL: "identical", ADDITIONS: "the same tokenizer up to additions",
                DIFFERENT: "different tokenizers"}[self.kind]
        lines = [f"tokenizers: {head} (teacher {self.teacher_size} ids, {self.teacher_rows} LM-head rows; "
                 f"student {self.student_size} ids, {self.student_rows} LM-head rows); "
                 f"{self.n_shared} tokens in both, matched by string"]
        lines += [f"  base tokenizers differ: {d}" for d in self.differences]
        for who, tokens in (("teacher", self.only_teacher), ("student", self.only_student)):
            if tokens:
                shown = ", ".join(f"{t!r} ({i})" for t, i in tokens[:SHOWN]) + (" ..." if len(tokens) > SHOWN else "")
                lines.append(f"  only the {who}'s: {len(tokens)} token(s): {shown}")
        if self.moved:
            shown = ", ".join(f"{t!r} (teacher {a}, student {b})" for t, a, b in self.moved[:SHOWN])
            lines.append(f"  at other ids: {len(self.moved)} token(s): {shown}{' ...' if len(self.moved) > SHOWN else ''}")
        for who, rows, size in (("teacher", self.padded_teacher_rows, self.teacher_size),
                                ("student", self.padded_student_rows, self.student_size)):
            if rows:
                lines.append(f"  padded {who} LM-head rows without a token: {rows} ({size}..{size + rows - 1})")
        return lines


def _id_map(rows: int, source: tuple[int, ...], target: tuple[int, ...]) -> torch.Tensor:
    """A (rows,) long tensor on the host: target[i] at source[i], -1 elsewhere."""
    out = torch.full((rows,), -1, dtype=torch.long, device="cpu")
    out[torch.tensor(source, dtype=torch.long, device="cpu")] = torch.tensor(target, dtype=torch.long, device="cpu")
    return out


def _backend(tokenizer: Any) -> dict | None:
    """The fast tokenizer's JSON (model, normalizer, pre-tokenizer, added tokens), or None for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _base_differences(teacher: dict | None, student: dict | None, same_vocab: bool) -> list[str]:
    """What differs between the two tokenizers' models, normalizers and pre-tokenizers (added tokens aside)."""
    if teacher is None or student is None:
        return [] if same_vocab else ["a slow tokenizer (no tokenizer.json) is compared by its vocabulary only, "
                                      "and the vocabularies differ"]
    out = []
    model_t, model_s = teacher.get("model") or {}, student.get("model") or {}
    if model_t.get("type") != model_s.get("type"):
        out.append(f"model type {model_t.get('type')} vs {model_s.get('type')}")
    else:
        vocab_t, vocab_s = model_t.get("vocab"), model_s.get("vocab")
        if vocab_t != vocab_s:
            size = (lambda v: len(v) if v is not None else 0)
            out.append(f"base vocabulary ({size(vocab_t)} vs {size(vocab_s)} entries)")
        if model_t.get("merges") != model_s.get("merges"):
            out.append(f"merges ({len(model_t.get('merges') or [])} vs {len(model_s.get('merges') or [])})")
        rest = sorted(k for k in set(model_t) | set(model_s) if k not in ("vocab", "merges", "type")
                      and model_t.get(k) != model_s.get(k))
        if rest:
            out.append(f"model settings {rest}")
    for part in BASE_PARTS[1:]:
        if teacher.get(part) != student.get(part):
            out.append(part.replace("_", "-"))
    return out


def classify_pair(teacher_tokenizer: Any, student_tokenizer: Any, teacher_rows: int | None = None,
                  student_rows: int | None = None) -> TokenizerPair:
    """The kind of the pair, its id map over the tokens both have and what differs; `*_rows`: LM-head rows."""
    vocab_t, vocab_s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    size_t, size_s = max(vocab_t.values()) + 1, max(vocab_s.values()) + 1
    rows_t, rows_s = max(teacher_rows or 0, size_t), max(student_rows or 0, size_s)
    shared = sorted((i_s, vocab_t[tok], tok) for tok, i_s in vocab_s.items() if tok in vocab_t)
    moved = tuple((tok, i_t, i_s) for i_s, i_t, tok in shared if i_t != i_s)
    only_t = tuple(sorted(((tok, i) for tok, i in vocab_t.items() if tok not in vocab_s), key=lambda x: x[1]))
    only_s = tuple(sorted(((tok, i) for tok, i in vocab_s.items() if tok not in vocab_t), key=lambda x: x[1]))
    differences = _base_differences(_backend(teacher_tokenizer), _backend(student_tokenizer), vocab_t == vocab_s)
    if differences:
        kind = DIFFERENT
    elif vocab_t == vocab_s and rows_t == rows_s:
        kind = IDENTICAL
    else:
        kind = ADDITIONS
    return TokenizerPair(kind, tuple(i_t for _, i_t, _ in shared), tuple(i_s for i_s, _, _ in shared), only_t,
                         only_s, moved, size_t, size_s, rows_t, rows_s, tuple(differences))
