"""`llavadi eval` and `llavadi regenerate`: killed runs resume from their journals to the same outputs;
bad images and repeated questions are found before any model loads; outputs get the normal file mode."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, write_images
from workspace import killed, truncate

import llavadi.eval.eval_command as eval_command
import llavadi.eval.generate as generate
import llavadi.teacher.regenerate as regenerate
from llavadi.atomic import default_file_mode
from llavadi.cli import main
from llavadi.eval.journal import AnswerJournal

ANSWERS = ["red", "green", "blue", "yellow", "two", "no"]


def _save(tok, model, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    make_image_processor(32).save_pretrained(folder)
    (folder / "llavadi.json").write_text(json.dumps({"template": "vicuna_v1", "system": "", "n_image_tokens": 4}))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("answers")
    tok = make_word_tokenizer()
    write_images(str(root / "imgs"), n=4)
    for name, seed in (("teacher", 0), ("student", 1)):
        model = make_tiny_llava(tok, seed=seed)
        with torch.no_grad():
            for p in model.parameters():  # large random weights: answers depend on prompt and image
                p.mul_(10.0)
        _save(tok, model, root / name)
    rows = [{"id": f"s{i}", **({"image": f"img{i % 4}.png"} if i % 3 else {}),
             "conversations": [{"from": "human", "value": ("<image>\n" if i % 3 else "") + "what color is it ?"},
                               {"from": "gpt", "value": ANSWERS[i % 6]},
                               {"from": "human", "value": "how many are there ?"},
                               {"from": "gpt", "value": "one"}]} for i in range(10)]
    (root / "data.json").write_text(json.dumps(rows))
    questions = [{"question_id": f"q{i}", "image": f"img{i % 4}.png", "text": "what color is the square ?",
                  "answer": ANSWERS[i % 4], "category": "color"} for i in range(10)]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


def _regenerate_args(env, out, *extra):
    return ["regenerate", "--teacher", str(env / "teacher"), "--data", str(env / "data.json"), "--images",
            str(env / "imgs"), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "4", "--no-progress",
            "--device", "cpu", *extra]


def _eval_args(env, out, *extra):
    return ["eval", "--model", str(env / "student"), "--teacher", str(env / "teacher"), "--benchmark", "synthetic",
            "--questions", str(env / "questions.jsonl"), "--images", str(env / "imgs"), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "4", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture()
def batches(monkeypatch):
    """Counts generation batches of this process."""
    real, calls = generate._generate_batch, []

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(generate, "_generate_batch", counting)
    return calls


def test_killed_regenerate_resumes_from_its_journal(env, tmp_path, batches, capsys):
    reference, out = tmp_path / "ref.json", tmp_path / "out.json"
    assert main(_regenerate_args(env, reference)) == 0
    total = len(batches)
    killed("generate", 7, *_regenerate_args(env, out))  # 5 first-turn batches, 1 second-turn batch done
    journal = out.parent / "out.json.journal.jsonl"
    assert not out.exists() and len(journal.read_text().splitlines()) == 1 + 10 + 2
    batches.clear()
    assert main(_regenerate_args(env, out)) == 0
    assert len(batches) == total - 6
    assert out.read_bytes() == reference.read_bytes()
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k not in ("seconds", "out", "report")}  # noqa: E731
    assert strip(tmp_path / "out.json.report.json") == strip(tmp_path / "ref.json.report.json")
    assert not journal.exists()
    for path in (out, tmp_path / "out.json.report.json"):
        assert stat.S_IMODE(path.stat().st_mode) == default_file_mode()


def test_killed_eval_resumes_from_its_journals(env, tmp_path, batches):
    reference, out = tmp_path / "ref", tmp_path / "out"
    assert main(_eval_args(env, reference)) == 0
    total = len(batches)
    killed("generate", 7, *_eval_args(env, out))  # student's 5 batches done, teacher's first one
    assert (out / "answers.journal.jsonl").exists() and not (out / "answers.jsonl").exists()
    batches.clear()
    assert main(_eval_args(env, out)) == 0
    assert len(batches) == total - 6
    for name in ("answers.jsonl", "teacher_answers.jsonl"):
        assert (out / name).read_text() == (reference / name).read_text()
    assert json.loads((out / "synthetic.json").read_text())["metrics"] == \
           json.loads((reference / "synthetic.json").read_text())["metrics"]
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "synthetic.json", "synthetic.md",
                                                       "teacher_answers.jsonl"]


def _broken_images(env, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in (env / "imgs").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    truncate(folder / "img2.png")
    return folder


def _refuse_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")
    monkeypatch.setattr(eval_command, "load_for_eval", refuse)
    monkeypatch.setattr(regenerate, "load_for_eval", refuse)


def test_eval_bad_image_stops_before_loading_or_is_skipped_and_listed(env, tmp_path, monkeypatch, capsys):
    images = _broken_images(env, tmp_path)
    args = _eval_args(env, tmp_path / "out")
    args[args.index("--images") + 1] = str(images)
    with monkeypatch.context() as m:
        _refuse_loading(m)
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 question(s) with an unusable image" in err and "question 'q2': unreadable image" in err
    assert "--on-error skip" in err
    assert main(args + ["--on-error", "skip"]) == 0
    result = json.loads((tmp_path / "out" / "synthetic.json").read_text())
    assert [s["question_id"] for s in result["skipped"]] == ["q2", "q6"]
    assert result["counts"]["missing"] == 2 and sorted(result["missing_ids"]) == ["q2", "q6"]
    answered = [json.loads(line)["question_id"] for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert answered == [f"q{i}" for i in range(10) if i not in (2, 6)]


def test_eval_repeated_question_is_an_error(env, tmp_path, monkeypatch, capsys):
    lines = (env / "questions.jsonl").read_text().splitlines()
    (tmp_path / "q.jsonl").write_text("\n".join(lines + [lines[3]]) + "\n")
    args = _eval_args(env, tmp_path / "out")
    args[args.index("--questions") + 1] = str(tmp_path / "q.jsonl")
    _refuse_loading(monkeypatch)
    assert main(args) == 2
    assert "question id 'q3' appears twice with the same prompt (entries 4 and 11)" in capsys.readouterr().err


def test_regenerate_bad_image_stops_before_loading_or_is_skipped_and_listed(env, tmp_path, monkeypatch, capsys):
    images = _broken_images(env, tmp_path)
    args = _regenerate_args(env, tmp_path / "out.json")
    args[args.index("--images") + 1] = str(images)
    with monkeypatch.context() as m:
        _refuse_loading(m)
        assert main(args) == 2
    assert "data.json[2] (sample 's2'): unreadable image" in capsys.readouterr().err
    assert main(args + ["--on-error", "skip"]) == 0
    report = json.loads((tmp_path / "out.json.report.json").read_text())
    assert [s["id"] for s in report["skipped"]] == ["s2"] and report["samples_out"] == 9


def test_journal_drops_a_torn_line_and_starts_afresh_for_other_settings(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = AnswerJournal(path, {"model": "a"}, log=lambda *_: None)
    assert journal.load() == {}
    journal.append([{"key": "0:q0", "ids": [1, 2]}, {"key": "1:q1", "ids": [3]}])
    journal.close()
    with open(path, "a") as f:
        f.write('{"key": "2:q2", "ids": [4')  # a kill in the middle of a line
    again = AnswerJournal(path, {"model": "a"}, log=lambda *_: None)
    assert again.load() == {"0:q0": {"key": "0:q0", "ids": [1, 2]}, "1:q1": {"key": "1:q1", "ids": [3]}}
    again.append([{"key": "2:q2", "ids": [5]}])
    again.close()
    assert json.loads(path.read_text().splitlines()[-1]) == {"key": "2:q2", "ids": [5]}
    notes = []
    other = AnswerJournal(path, {"model": "b"}, log=notes.append)
    assert other.load() == {} and "model differ" in notes[0]
    other.close()
    assert len(path.read_text().splitlines()) == 1
    os.unlink(path)
