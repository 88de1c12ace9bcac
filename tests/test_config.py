"""Recipe parsing, validation messages and command-line overrides."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from llavadi.config import ConfigError, apply_override
from llavadi.recipe import load_recipe, recipe_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw(**kw):
    raw = {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"},
           "data": {"image_folder": "imgs"},
           "stages": [{"name": "finetune", "data": {"path": "d.json"},
                       "distill": {"terms": [{"name": "forward_kl", "options": {"temperature": 2.0}}]}}]}
    raw.update(kw)
    return raw


def test_valid_recipe_merges_stage_data_defaults():
    r = recipe_from_dict(_raw())
    s = r.stages[0]
    assert s.data.path == "d.json" and s.data.image_folder == "imgs" and s.data.template == "vicuna_v1"
    assert s.distill.terms[0].options == {"temperature": 2.0}
    assert s.train.args["learning_rate"] == 2e-5


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["stages"][0].update(lr=1), r"stages\[0\]: unknown key\(s\) \['lr'\]; valid keys are"),
    (lambda r: r["stages"][0]["distill"]["terms"][0].update(name="kl"), r"unknown distillation term 'kl'; valid terms: forward_kl"),
    (lambda r: r["stages"][0]["distill"]["terms"][0]["options"].update(temprature=1), r"unknown option\(s\) \['temprature'\]"),
    (lambda r: r["stages"][0]["distill"]["terms"][0]["options"].update(temperature=-1), r"stages\[0\].distill.terms\[0\]: term 'forward_kl': option 'temperature' must be > 0.0, got -1"),
    (lambda r: r.pop("teacher"), r"distillation terms need a `teacher`"),
    (lambda r: r["student"].update(path="x"), r"student: give exactly one of"),
    (lambda r: r.update(student={"preset": "huge"}), r"student.preset: unknown preset 'huge'"),
    (lambda r: r["stages"][0].update(train={"per_device_train_batch_size": "eight"}),
     r"stages\[0\].train.per_device_train_batch_size: expected an integer"),
    (lambda r: r["stages"][0]["data"].update(template="llama9"), r"unknown template 'llama9'"),
    (lambda r: r.update(stages=[]), r"at least one stage"),
    (lambda r: r["stages"].append(dict(r["stages"][0])), r"stage names must be unique"),
    (lambda r: r["stages"][0]["data"].pop("path"), r"no training data"),
])
def test_mistakes_are_named(mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(raw)


def test_overrides_by_stage_name_and_index():
    raw = _raw()
    apply_override(raw, "stages.finetune.train.learning_rate=1e-4")
    apply_override(raw, "stages.0.distill.terms.0.weight=0.5")
    apply_override(raw, "seed=3")
    r = recipe_from_dict(raw)
    assert r.stages[0].train.args["learning_rate"] == 1e-4
    assert r.stages[0].distill.terms[0].weight == 0.5
    assert r.seed == 3
    with pytest.raises(ConfigError, match="no item named 'pretrain'"):
        apply_override(_raw(), "stages.pretrain.train.learning_rate=1")
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(_raw(), "seed")


def test_load_recipe_resolves_paths_against_the_file(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_raw()))
    r = load_recipe(str(tmp_path / "r.yaml"), ["stages.finetune.train.max_steps=5"])
    assert r.stages[0].data.path == str(tmp_path / "d.json")
    assert r.stages[0].data.image_folder == str(tmp_path / "imgs")
    assert r.stages[0].train.args["max_steps"] == 5


def test_bad_yaml_names_the_file(tmp_path):
    (tmp_path / "r.yaml").write_text("stages: [\n")
    with pytest.raises(ConfigError, match=r"r.yaml: invalid YAML"):
        load_recipe(str(tmp_path / "r.yaml"))


def test_paper_recipe_is_valid():
    r = load_recipe(os.path.join(ROOT, "recipes", "llavadi.yaml"))
    ft = r.stages[1]
    assert [t.name for t in ft.distill.terms] == ["forward_kl", "hidden_mse"]
    train = ft.train.args
    assert train["learning_rate"] == 2e-5 and train["lr_scheduler_type"] == "cosine" and train["warmup_steps"] == 0.03
    assert ft.trainable.vision_from_layer == 6 and ft.data.max_length == 2048
    assert r.stages[0].trainable.llm is False and r.stages[0].data.template == "plain"


def test_the_schema_sits_below_the_method():
    """Importing the recipe schema loads no distillation code; reading a recipe checks terms by their class."""
    code = ("import sys, llavadi.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['llavadi', 'distill'], ['llavadi', 'train'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    from llavadi.config import parse_recipe

    raw = _raw()
    raw["stages"][0]["distill"]["terms"][0]["options"] = {"temprature": 2}
    _, schema_problems = parse_recipe(raw)
    assert schema_problems == []  # the schema does not know the term's options
    with pytest.raises(ConfigError, match=r"stages\[0\]\.distill\.terms\[0\]: term 'forward_kl': unknown option"):
        recipe_from_dict(raw)
