"""Mistakes named before any model loads, all of them in one report; nothing silently ignored.

Each recipe mistake below used to pass `llavadi train --check` (or to be named only after an earlier
one was fixed, one per run); here `--check` exits non-zero naming every one, and no model is built.
"""

from __future__ import annotations

import pytest
import yaml

from llavadi.cli import main
from llavadi.config import ConfigError, recipe_from_dict


def _raw(**kw):
    raw = {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"},
           "data": {"image_folder": "imgs"},
           "stages": [{"name": "finetune", "data": {"path": "d.json"},
                       "distill": {"terms": [{"name": "forward_kl", "options": {"temperature": 2.0}}]}}]}
    raw.update(kw)
    return raw


def test_three_typos_in_one_recipe_are_all_named_at_once():
    raw = _raw()
    raw["student"]["vison"] = "x"                                          # a model key
    raw["stages"][0]["distill"]["terms"][0]["options"]["temprature"] = 1   # a term option
    raw["stages"][0]["train"] = {"learning_rat": 1e-4}                    # a train field
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    text = str(err.value)
    assert "3 problems" in text, text
    assert "student: unknown key(s) ['vison']" in text and "did you mean `vision`?" in text
    assert "stages[0].distill.terms[0]" in text and "temprature" in text
    assert "stages[0].train.learning_rat" in text and "learning_rate" in text


def test_typos_and_invalid_values_of_different_parts_are_all_named():
    raw = _raw(seed="zero")
    raw["stages"][0]["data"]["template"] = "llama9"
    raw["stages"][0]["distill"]["terms"].append({"name": "kl"})
    raw["stages"].append({"name": "second", "data": {"path": "e.json", "on_error": "ignore"}, "trainable": {"llm": "yes"}})
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    text = str(err.value)
    for expected in ("seed: expected an integer", "unknown template 'llama9'", "unknown distillation term 'kl'",
                     "stages[1].trainable.llm: expected true or false", "stages[1] (second).data.on_error"):
        assert expected in text, (expected, text)


def test_check_names_every_typo_and_exits_non_zero(tmp_path, capsys):
    raw = _raw()
    raw["student"]["vison"] = "x"
    raw["stages"][0]["distill"]["terms"][0]["options"]["temprature"] = 1
    raw["stages"][0]["train"] = {"learning_rat": 1e-4}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "vison" in err and "temprature" in err and "learning_rat" in err


def test_every_mistake_of_a_suite_file_is_named_at_once(tmp_path):
    from llavadi.eval.benchmarks import EvalDataError
    from llavadi.eval.suite import load_suite

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump([
        {"benchmark": "popee", "questions": "a.jsonl"},
        {"benchmark": "synthetic", "questions": "b.jsonl", "image": "imgs"},
        {"benchmark": "synthetic", "questions": "c.jsonl", "limit": "ten", "name": "c"},
    ]))
    with pytest.raises(EvalDataError) as err:
        load_suite(str(path))
    text = str(err.value)
    assert "3 problems" in text
    assert "[0]: unknown benchmark 'popee'" in text and "[1]: unknown key(s) ['image']" in text
    assert "[2].limit: expected int or NoneType, got 'ten'" in text


def test_every_entry_of_a_suite_with_missing_files_is_named_at_once(tmp_path):
    from llavadi.eval.benchmarks import EvalDataError
    from llavadi.eval.suite import check_inputs, load_suite

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump([{"benchmark": "synthetic", "questions": "a.jsonl"},
                                    {"benchmark": "synthetic", "questions": "b.jsonl", "name": "b"}]))
    with pytest.raises(EvalDataError) as err:
        check_inputs(load_suite(str(path)))
    text = str(err.value)
    assert "suite.yaml[0]: " in text and "a.jsonl" in text and "suite.yaml[1]: " in text and "b.jsonl" in text
