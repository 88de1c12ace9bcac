"""A training run SIGKILLed at any point resumes to the bit-identical result of an uninterrupted run.

Each kill is real (the process kills itself with SIGKILL at a named point, so no cleanup code
runs: see fault_driver.py); the rerun is the plain `llavadi train` command. The learning rate is
constant, so one step more or less than the recipe asks would change the weights.
"""

from __future__ import annotations

import json

import pytest
from workspace import FINETUNE_STEPS, assert_same_tensors, killed, leftovers, make_workspace, report, write_recipe

from llavadi.cli import main

# pretrain runs 3 forward passes; finetune's 5th step is pass 3 + 5 = 8, after checkpoint-3
KILLS = [
    ("forward", 8),            # mid-step, after a checkpoint: resumes from checkpoint-3
    ("inside_checkpoint", 6),  # checkpoint-6 half written: it is deleted, resume from checkpoint-3
    ("after_checkpoint", 6),   # checkpoint-6 complete: resume from it
    ("before_publish", 1),     # finetune's last checkpoint written, outputs not: publish, no 9th step
    ("publish_rename", 5),     # finetune's report and projectors renamed into place, model/ not (pretrain: 2)
    ("done_marker", 2),        # finetune's outputs in place, its completion marker not written
    ("final_save", 1),         # final/ written in a temporary folder, not renamed
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run (in this process, one thread like the subprocesses)."""
    root = make_workspace(tmp_path_factory.mktemp("kill"))
    recipe = write_recipe(root, root / "unused")
    out = root / "straight"
    assert main(["train", str(recipe), "--output-dir", str(out), "--quiet"]) == 0
    return root, recipe, out


@pytest.mark.parametrize("fault,at", KILLS, ids=[f"{f}-{a}" for f, a in KILLS])
def test_killed_run_resumes_to_the_uninterrupted_result(straight, tmp_path, fault, at, capsys):
    root, recipe, reference = straight
    out = tmp_path / "run"
    args = ["train", str(recipe), "--output-dir", str(out), "--quiet"]
    killed(fault, at, *args)
    assert not (out / "final").exists()
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert_same_tensors(reference / "final" / "model.safetensors", out / "final" / "model.safetensors")
    assert_same_tensors(reference / "finetune" / "distill_projectors.safetensors",
                        out / "finetune" / "distill_projectors.safetensors")
    got, want = report(out), report(reference)
    assert got["steps"] == want["steps"] == FINETUNE_STEPS
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12)
    assert leftovers(out) == []
    for stage in ("pretrain", "finetune"):
        done = json.loads((out / stage / "done.json").read_text())
        assert done["digest"] == json.loads((reference / stage / "done.json").read_text())["digest"]
    assert "[pretrain] already done" in said
    if fault in ("before_publish", "publish_rename", "done_marker"):
        assert "is the stage's last step: publishing it without training" in said
