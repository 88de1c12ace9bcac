"""Pairing answer tokens of two different tokenizers (llavadi.data.token_alignment)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from cross_tokenizers import byte_level_bpe, sentencepiece_bpe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llavadi.data.collator import LlavaCollator
from llavadi.data.dataset import LlavaDataset, View
from llavadi.data.encode import ConversationEncoder, SampleError
from llavadi.data.templates import ChatTemplate, Turn, VicunaV1
from llavadi.data.token_alignment import (
    ALIGNMENT_KEY,
    AlignmentError,
    PairAligner,
    PieceReader,
    answer_tokens,
    token_byte_spans,
)

# letters, digits, punctuation, multi-byte characters of 2, 3 and 4 bytes, spaces and newlines
ALPHABET = "abcdefghiklmnorstuwyRTHS0123456789 .,?!:-'éüñ€日本語🙂🐱\n"


def _encoders(max_length: int = 512):
    student = ConversationEncoder(sentencepiece_bpe(), VicunaV1(system=""), sentencepiece_bpe().convert_tokens_to_ids(
        "<image>"), n_image_tokens=4, max_length=max_length)
    teacher_tok = byte_level_bpe()
    teacher = ConversationEncoder(teacher_tok, ChatTemplate(), teacher_tok.convert_tokens_to_ids("<image>"),
                                  n_image_tokens=9, max_length=max_length)
    return student, teacher


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _check_groups(turns, student_enc, teacher_enc, s, t, groups, complete=True):
    """Every group covers the same answer bytes on both sides; groups tile each answer in order."""
    sides = []
    for enc, encoded in ((student_enc, s), (teacher_enc, t)):
        tokens = answer_tokens(enc, PieceReader(enc.tokenizer), "x", turns, encoded)
        sides.append({p: (turn, a, b) for turn, toks in enumerate(tokens.turns) for p, a, b in toks})
    answers = [x.text.strip() for x in turns if x.role == "assistant"]
    ends = {k: 0 for k in range(len(answers))}
    for s0, s1, t0, t1 in groups.tolist():
        turn_s, start_s, _ = sides[0][s0]
        turn_t, start_t, _ = sides[1][t0]
        assert (turn_s, start_s) == (turn_t, start_t) == (turn_s, ends[turn_s])  # starts where the last ended
        end_s, end_t = sides[0][s1][2], sides[1][t1][2]
        assert end_s == end_t and sides[0][s1][0] == sides[1][t1][0] == turn_s
        ends[turn_s] = end_s
        answer = answers[turn_s].encode()
        piece = answer[start_s:end_s]
        try:
            text = piece.decode()
        except UnicodeDecodeError:  # a group may end inside a character both sides split there
            continue
        # each tokenizer's own decoder gives back the group's text (decoders differ in spaces only)
        assert _squeeze(student_enc.tokenizer.decode(s.input_ids[s0:s1 + 1])) == _squeeze(text)
        assert _squeeze(teacher_enc.tokenizer.decode(t.input_ids[t0:t1 + 1])) == _squeeze(text)
    if complete:
        assert [ends[k] for k in range(len(answers))] == [len(a.encode()) for a in answers]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=st.lists(st.text(ALPHABET, min_size=1, max_size=40).filter(lambda x: x.strip()), min_size=1,
                        max_size=3))
def test_groups_cover_the_same_bytes(answers):
    student_enc, teacher_enc = _encoders()
    turns = []
    for k, answer in enumerate(answers):
        turns += [Turn("user", ("<image>\n" if k == 0 else "") + f"question {k}?"), Turn("assistant", answer)]
    s = student_enc.encode("x", turns, 1)
    t = teacher_enc.encode("x", turns, 1)
    groups = PairAligner(student_enc, teacher_enc)("x", turns, s, t)
    assert groups.shape[1] == 4 and len(groups) >= len(answers)
    _check_groups(turns, student_enc, teacher_enc, s, t, groups)


def test_merged_spans_and_multibyte_characters():
    """A token of one side spanning several of the other's is one group; byte pieces of a character pair up."""
    student_enc, teacher_enc = _encoders()
    turns = [Turn("user", "<image>\nwhat?"), Turn("assistant", "the reds cost €5 日本")]
    s, t = student_enc.encode("x", turns, 1), teacher_enc.encode("x", turns, 1)
    groups = PairAligner(student_enc, teacher_enc)("x", turns, s, t)
    _check_groups(turns, student_enc, teacher_enc, s, t, groups)
    sizes = [(s1 - s0 + 1, t1 - t0 + 1) for s0, s1, t0, t1 in groups.tolist()]
    assert any(a > 1 for a, _ in sizes) and any(b > 1 for _, b in sizes)  # merges in both directions
    # both sides spell "€" as byte tokens here: they pair byte by byte, groups end inside the character
    euro = [g for g in groups.tolist() if "<0xE2>" in sentencepiece_bpe().convert_ids_to_tokens(s.input_ids[g[0]:g[1] + 1])]
    assert len(euro) == 1 and byte_level_bpe().convert_ids_to_tokens(t.input_ids[euro[0][2]]) == "â"


def test_truncated_answer_pairs_only_complete_groups():
    student_enc, teacher_enc = _encoders()
    turns = [Turn("user", "<image>\nwhat?"), Turn("assistant", "there are three green triangles and 12 blue squares")]
    full_s = student_enc.encode("x", turns, 1)
    cut = ConversationEncoder(student_enc.tokenizer, student_enc.template, student_enc.image_token_id, 4,
                              max_length=len(full_s.input_ids) - 8)
    s, t = cut.encode("x", turns, 1), teacher_enc.encode("x", turns, 1)
    assert s.truncated
    groups = PairAligner(cut, teacher_enc)("x", turns, s, t)
    assert 0 < len(groups) and groups[:, 1].max() < len(s.input_ids)
    _check_groups(turns, cut, teacher_enc, s, t, groups, complete=False)


def test_tokens_that_change_the_text_are_refused_by_sample():
    """A normaliser (lowercasing) or an unknown token means the text cannot be reproduced: an error naming the sample."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<image>", "the", "red", "circle", ":", "USER",
                                         "ASSISTANT", "?", "what"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    lower = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                    extra_special_tokens={"image_token": "<image>"})
    student = ConversationEncoder(lower, VicunaV1(system=""), 3, n_image_tokens=1)
    _, teacher = _encoders()
    aligner = PairAligner(student, teacher)
    ok = [Turn("user", "<image>\nwhat?"), Turn("assistant", "the red circle")]
    assert len(aligner("ok", ok, student.encode("ok", ok, 1), teacher.encode("ok", ok, 1))) == 3
    for answer in ("The red circle", "the blue circle"):  # lowercased; unknown word
        turns = [Turn("user", "<image>\nwhat?"), Turn("assistant", answer)]
        with pytest.raises(AlignmentError, match="sample 'bad-1'"):
            aligner("bad-1", turns, student.encode("bad-1", turns, 1), teacher.encode("bad-1", turns, 1))


def test_piece_reader_reproduces_each_tokenizer_kind():
    text = "Say: héllo €5 日本 the reds 🙂\n  two  spaces"
    for tokenizer in (byte_level_bpe(), sentencepiece_bpe()):
        enc = tokenizer(text, return_offsets_mapping=True)
        spans = token_byte_spans(PieceReader(tokenizer), text, enc["input_ids"], enc["offset_mapping"], "x")
        data = text.encode()
        covered = b"".join(data[a:b] for a, b in spans)
        assert _squeeze(covered.decode()) == _squeeze(text)
        assert all(b0 <= a1 for (_, b0), (a1, _) in itertools.pairwise(spans))


def test_dataset_and_collator_carry_alignments(tmp_path):
    student_enc, teacher_enc = _encoders()
    data = [{"id": "a", "conversations": [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "the red one"}]},
            {"id": "b", "conversations": [{"from": "human", "value": "how many?"}, {"from": "gpt", "value": "Three ▁x"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "and?"}, {"from": "gpt", "value": "12 blue €"}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    views = [View(student_enc, None), View(teacher_enc, None, prefix="teacher_")]
    aligner = PairAligner(student_enc, teacher_enc)
    with pytest.raises(SampleError, match="sample 'b'.*does not reproduce"):  # "▁" in the text: a space marker
        LlavaDataset(str(path), None, views, aligner=aligner)
    ds = LlavaDataset(str(path), None, views, on_error="skip", aligner=aligner)
    assert [s.sample_id for s in ds.skipped] == ["b"] and len(ds) == 2
    items = [ds[0], ds[1]]
    for side in ("right", "left"):
        batch = LlavaCollator(0, prefixes=("", "teacher_"), padding_side=side)(items)
        rows = batch[ALIGNMENT_KEY]
        assert rows.shape[1] == 5 and rows[:, 0].tolist() == sorted(rows[:, 0].tolist())
        for b, s0, s1, t0, t1 in rows.tolist():
            item = items[b]
            shift_s = batch["input_ids"].shape[1] - len(item["input_ids"]) if side == "left" else 0
            shift_t = batch["teacher_input_ids"].shape[1] - len(item["teacher_input_ids"]) if side == "left" else 0
            ref = item[ALIGNMENT_KEY]
            assert [s0 - shift_s, s1 - shift_s, t0 - shift_t, t1 - shift_t] in ref.tolist()
            assert batch["token_types"][b, s0:s1 + 1].eq(3).all() and batch["teacher_token_types"][b, t0:t1 + 1].eq(3).all()
    assert torch.equal(ds[0][ALIGNMENT_KEY], ds.alignments[0])
