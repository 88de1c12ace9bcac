"""A stage's result does not depend on what ran before it in the same process.

A run that trains every stage in one process and a run that finds its first stage done (a rerun
after an interruption between stages) must give the same final student and projectors: the
projectors' initialisation is seeded by the recipe, not left to whatever the random state was.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from test_train import _finetune, _recipe, workspace  # noqa: F401  (the module's fixture)

from llavadi.train.runner import run_recipe


def _pretrain(root):
    return {"name": "pretrain", "data": {"path": str(root / "caps.json"), "template": "plain"},
            "train": {"learning_rate": 3e-3, "max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 100,
                      "lr_scheduler_type": "constant", "warmup_steps": 0.0}}


def test_second_stage_is_the_same_after_a_rerun_between_stages(workspace, tmp_path):  # noqa: F811
    terms = [{"name": "forward_kl"}, {"name": "hidden_mse"}]
    stages = [_pretrain(workspace), _finetune(workspace, steps=3, terms=terms)]
    straight = tmp_path / "straight"
    run_recipe(_recipe(workspace, straight, stages), log=lambda *_: None)
    rerun = tmp_path / "rerun"
    run_recipe(_recipe(workspace, rerun, stages[:1]), log=lambda *_: None)  # stops after the first stage
    run_recipe(_recipe(workspace, rerun, stages), log=lambda *_: None)  # finds it done, trains the second
    for name in ("model/model.safetensors", "distill_projectors.safetensors"):
        a = load_file(os.path.join(straight, "finetune", name))
        b = load_file(os.path.join(rerun, "finetune", name))
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"
