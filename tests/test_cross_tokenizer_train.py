"""A student and a teacher with different tokenizers: which terms train (paired answer spans, image tokens), which
are refused by name before any model loads."""

from __future__ import annotations

import pytest
from conftest import write_json
from cross_tokenizers import byte_level_bpe, sentencepiece_bpe, write_pair

from llavadi.models.build import load_llava_dir
from llavadi.recipe import recipe_from_dict
from llavadi.train.runner import run_recipe


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    data = write_pair(root)
    write_json(root / "inst.json", data)
    return root


def _recipe(root, out, terms, template="vicuna_v1", batch=4, **stage_extra):
    stage = {"name": "finetune", "data": {"path": str(root / "inst.json")}, **stage_extra,
             "train": {"learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": batch, "logging_steps": 1,
                       "save_steps": 100},
             "distill": {"terms": terms}}
    return recipe_from_dict({"student": {"path": str(root / "student")}, "teacher": {"path": str(root / "teacher")},
                             "output_dir": str(out), "device": "cpu", "seed": 0,
                             "data": {"image_folder": str(root / "imgs"), "template": template, "system": ""},
                             "stages": [stage]})


def test_aligned_terms_train_across_tokenizers(pair_dir, tmp_path):
    """uld, gold and hidden_mse read paired answer spans, visual_align the image tokens (other counts: pooled)."""
    terms = [{"name": "uld"}, {"name": "gold", "options": {"top_k": 16}}, {"name": "hidden_mse"},
             {"name": "visual_align", "options": {"source": "projector"}},
             {"name": "affinity", "options": {"rows": "image", "cols": "image"}}]
    from llavadi.train.stage_inputs import build_dataset

    rec = _recipe(pair_dir, tmp_path / "run", terms)
    ds = build_dataset(rec.stages[0], load_llava_dir(str(pair_dir / "student")),
                       load_llava_dir(str(pair_dir / "teacher")))
    assert len(ds) == 8 and all(len(a) > 0 for a in ds.alignments)
    run_recipe(rec, log=lambda *_: None)
    logs = _logs(tmp_path / "run" / "finetune")
    assert len(logs) == 2
    for h in logs:
        assert all(h[f"loss/{name}"] > 0 for name in ("uld", "gold", "hidden_mse", "visual_align", "affinity"))
    assert (tmp_path / "run" / "final" / "config.json").exists()


def _logs(stage_dir):
    from test_train import _history

    return [h for h in _history(stage_dir) if "loss" in h]


@pytest.mark.parametrize("term,match", [
    ({"name": "forward_kl"}, "different tokenizers(.|\n)*use uld or gold"),
    ({"name": "affinity"}, "term 'affinity' compares a image x response matrix"),
    ({"name": "hidden_mse", "tokens": "instruction"}, "term 'hidden_mse' reads 'instruction' tokens"),
])
def test_terms_that_need_one_tokenizer_are_refused_up_front(pair_dir, tmp_path, term, match):
    from llavadi.train.preflight import PreflightError, preflight

    with pytest.raises(PreflightError, match=match):
        preflight(_recipe(pair_dir, tmp_path / "run", [term]), log=lambda *_: None, progress=False)


def test_on_policy_answers_are_retokenized_for_the_teacher(pair_dir, tmp_path):
    """Every sample answered by the student (lambda 1): the teacher reads the same text in its own tokens.

    A random student's sampled tokens are often not valid text (its byte-fallback pieces split characters): short
    answers and 16 of them make at least one valid one all but certain whatever the random weights."""
    rec = _recipe(pair_dir, tmp_path / "run", [{"name": "uld", "options": {"top_k": 8}}, {"name": "hidden_mse"}],
                  batch=8, on_policy={"fraction": 1.0, "max_new_tokens": 2, "temperature": 1.0})
    run_recipe(rec, log=lambda *_: None)
    logs = _logs(tmp_path / "run" / "finetune")
    assert len(logs) == 2
    for h in logs:
        answered = h["on_policy/share"]
        assert answered + h["on_policy/not_text"] / 8 == 1.0  # 8 samples per step: each answered or kept
        assert answered == 0 or (h["loss/uld"] > 0 and h["loss/hidden_mse"] > 0)
    assert any(h["on_policy/share"] > 0 for h in logs), [h["on_policy/share"] for h in logs]


def test_retokenized_answer_pairs_the_same_text():
    from llavadi.data.encode import ConversationEncoder
    from llavadi.data.templates import VicunaV1
    from llavadi.data.token_alignment import PieceReader, retokenized_answer

    student_tok, teacher_tok = sentencepiece_bpe(), byte_level_bpe()
    teacher = ConversationEncoder(teacher_tok, VicunaV1(system="", eos="<|im_end|>"), 3, n_image_tokens=1)
    sampled = student_tok(" the reds €5", add_special_tokens=False)["input_ids"]
    sampled = sampled + [student_tok.eos_token_id, 7, 9]  # tokens after the end of the answer are not read
    ids, groups = retokenized_answer(PieceReader(student_tok), sampled, 10, teacher, PieceReader(teacher_tok), 20,
                                     {student_tok.eos_token_id}, "x")
    assert teacher_tok.decode(ids).strip() == "the reds €5<|im_end|>"
    assert groups[0, 0] >= 10 and groups[0, 2] >= 20 and len(groups) >= 3
    s_text = student_tok.decode(sampled[groups[0, 0] - 10: groups[-1, 1] - 10 + 1])
    t_text = teacher_tok.decode(ids[groups[0, 2] - 20: groups[-1, 3] - 20 + 1])
    assert s_text.strip() == t_text.strip() == "the reds €5"
    assert retokenized_answer(PieceReader(student_tok), [student_tok.convert_tokens_to_ids("<0xE2>")], 10, teacher,
                              PieceReader(teacher_tok), 20, set(), "x") is None  # half a character: not text


def test_a_sampled_answer_the_teacher_cannot_read_back_keeps_its_sample():
    """A teacher whose tokenizer maps a sampled word to <unk>: the sample stays as it was (counted), no crash."""
    from conftest import make_word_tokenizer

    from llavadi.data.encode import ConversationEncoder
    from llavadi.data.templates import VicunaV1
    from llavadi.data.token_alignment import AlignmentError, PieceReader, retokenized_answer
    from llavadi.data.token_types import TokenType
    from llavadi.teacher.on_policy import TeacherRetokenizer

    student_tok, teacher_tok = sentencepiece_bpe(), make_word_tokenizer()
    teacher = ConversationEncoder(teacher_tok, VicunaV1(system="", eos=teacher_tok.eos_token),
                                  teacher_tok.convert_tokens_to_ids("<image>"), n_image_tokens=1)
    stop = {student_tok.eos_token_id}
    unreadable = student_tok(" the reds €5", add_special_tokens=False)["input_ids"] + [student_tok.eos_token_id]
    with pytest.raises(AlignmentError, match="does not reproduce the text"):
        retokenized_answer(PieceReader(student_tok), unreadable, 3, teacher, PieceReader(teacher_tok), 3, stop, "s0")
    response = int(TokenType.RESPONSE)
    item = {"sample_id": "s0", "input_ids": [1, 2, 3, 4], "token_types": [0, 0, 0, response],
            "t_input_ids": [1, 2, 3, 4], "t_token_types": [0, 0, 0, response]}
    assert TeacherRetokenizer(student_tok, teacher, stop, "t_")(item, unreadable, 64) is None
