"""The `train` section takes transformers.TrainingArguments fields by their own names, checked before any model loads."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from transformers import TrainingArguments

from llavadi.config import ConfigError, recipe_to_dict
from llavadi.recipe import load_recipe, recipe_from_dict
from llavadi.train import runner
from llavadi.training_args import DEFAULTS, RENAMED, training_argument_kwargs


def _raw(train: dict, **kw) -> dict:
    raw = {"student": {"preset": "tiny-student"}, "output_dir": "out", "device": "cpu",
           "stages": [{"name": "finetune", "data": {"path": "d.json"}, "train": train}]}
    raw.update(kw)
    return raw


def test_fields_by_their_own_names_reach_training_arguments(tmp_path):
    train = {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 5, "lr_scheduler_type": "constant",
             "adam_beta2": 0.95, "optim": "sgd", "learning_rate": "1e-4", "logging_steps": 7,
             "dataloader_num_workers": 0, "report_to": "none", "torch_compile": False}
    recipe = recipe_from_dict(_raw(train))
    args = runner.training_arguments(recipe, recipe.stages[0], str(tmp_path / "ck"), "cpu")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.adam_beta2) == (3, 5, 0.95)
    assert args.lr_scheduler_type == "constant" and args.optim == "sgd" and args.report_to == []
    assert args.learning_rate == 1e-4  # YAML reads 1e-4 (no dot) as a string: converted for a float field
    assert args.logging_steps == 7
    # llavadi's defaults where the recipe is silent, and what llavadi always sets
    assert args.num_train_epochs == DEFAULTS["num_train_epochs"] and args.warmup_steps == DEFAULTS["warmup_steps"]
    assert args.remove_unused_columns is False and args.seed == recipe.seed and args.use_cpu is True
    assert args.output_dir == str(tmp_path / "ck")


def test_report_to_is_the_users_choice_with_a_default(tmp_path):
    default = recipe_from_dict(_raw({}))
    # the test extras install TensorBoard: it is the default logger then
    assert runner.training_arguments(default, default.stages[0], str(tmp_path), "cpu").report_to == ["tensorboard"]
    chosen = recipe_from_dict(_raw({"report_to": ["none"]}))
    assert runner.training_arguments(chosen, chosen.stages[0], str(tmp_path), "cpu").report_to == []


@pytest.mark.parametrize("train, message", [
    ({"per_device_train_batch_sise": 4}, r"train.per_device_train_batch_sise: not a transformers.TrainingArguments "
                                         r"field; did you mean `per_device_train_batch_size`\?"),
    ({"lerning_rate": 1e-3}, r"did you mean `learning_rate`\?"),
    ({"batch_size": 4}, r"train.batch_size: not a TrainingArguments field; write `per_device_train_batch_size`"),
    ({"grad_accum": 2}, r"write `gradient_accumulation_steps`"),
    ({"epochs": 2}, r"write `num_train_epochs`"),
    ({"scheduler": "cosine"}, r"write `lr_scheduler_type`"),
    ({"warmup_ratio": 0.1}, r"write `warmup_steps`"),
    ({"extra": {"optim": "sgd"}}, r"train.extra: write its keys directly in `train`"),
    ({"lr_scheduler_type": "cosin"}, r"train.lr_scheduler_type: 'cosin' is not a valid choice; did you mean 'cosine'\?"),
    ({"optim": "adamw_troch"}, r"train.optim: 'adamw_troch' is not a valid choice; did you mean"),
    ({"max_steps": 2.5}, r"train.max_steps: expected an integer, got 2.5"),
    ({"bf16": "yes"}, r"train.bf16: expected true or false, got 'yes'"),
    ({"learning_rate": "fast"}, r"train.learning_rate: expected a number, got 'fast'"),
    ({"output_dir": "x"}, r"train.output_dir: set by llavadi; .* set the recipe's `output_dir`"),
    ({"seed": 3}, r"train.seed: set by llavadi; set the recipe's top-level `seed`"),
    ({"remove_unused_columns": True}, r"set by llavadi"),
    ([1, 2], r"train: expected a mapping of TrainingArguments fields"),
])
def test_mistakes_name_the_key_and_the_fix(train, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(_raw(train))


def test_every_former_short_name_maps_to_a_real_field():
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(RENAMED.values()) <= fields and not set(RENAMED) & fields


def test_typo_fails_before_any_model_loads(tmp_path, monkeypatch):
    def no_loading(*_a, **_k):
        raise AssertionError("a model was loaded before the recipe was checked")

    monkeypatch.setattr(runner, "load_model", no_loading)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_raw({"per_device_train_batch_size": 2})))
    with pytest.raises(ConfigError, match="did you mean `per_device_train_batch_size`"):
        load_recipe(str(tmp_path / "r.yaml"), ["stages.finetune.train.per_device_train_batch_sise=4"])
    # a value TrainingArguments itself refuses (a combination no single check sees) also fails before loading
    recipe = recipe_from_dict(_raw({"save_strategy": "steps", "load_best_model_at_end": True,
                                    "eval_strategy": "no"}, output_dir=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match=r"stages\[0\] \(finetune\).train: transformers.TrainingArguments refuses"):
        runner.run_recipe(recipe, log=lambda *_: None)


def test_resolved_recipe_round_trips_in_recipe_keys(tmp_path):
    recipe = recipe_from_dict(_raw({"per_device_train_batch_size": 3, "adam_beta2": 0.9}))
    raw = recipe_to_dict(recipe)
    assert raw["stages"][0]["train"] == {**DEFAULTS, "per_device_train_batch_size": 3, "adam_beta2": 0.9,
                                         "max_nonfinite_skips": 0}  # llavadi's own key of the section
    assert recipe_to_dict(recipe_from_dict(raw)) == raw


def test_quiet_only_adds_disable_tqdm():
    loud = training_argument_kwargs({}, "o", 0, True)
    quiet = training_argument_kwargs({}, "o", 0, True, quiet=True)
    assert {k: v for k, v in quiet.items() if k != "disable_tqdm"} == {k: v for k, v in loud.items()
                                                                      if k != "disable_tqdm"}
    assert quiet["disable_tqdm"] is True and loud["disable_tqdm"] is False
