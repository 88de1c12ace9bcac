"""Stages as transactions: changed recipes are refused, damaged outputs and checkpoints are not trusted,
a diverging run stops before its NaNs reach a checkpoint (or skips such steps when allowed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CrashAt
from transformers import TrainerCallback
from workspace import FINETUNE_STEPS, assert_same_tensors, leftovers, make_workspace, one_stage, report, tensors

import llavadi.train.runner as runner
import llavadi.train.stage_inputs as stage_inputs
from llavadi.cli import main
from llavadi.distill.module import DistillationModule
from llavadi.recipe import recipe_from_dict
from llavadi.train.guard import NonFiniteLossError
from llavadi.train.stages import StageChangedError


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("stages"))


@pytest.fixture(scope="module")
def straight(ws):
    """The one-stage run, uninterrupted."""
    out = ws / "straight"
    runner.run_recipe(recipe_from_dict(one_stage(ws, out)), log=lambda *_: None)
    return out


def _run(ws, out, log=None, callbacks=None, force=False, **kw):
    msgs = []
    runner.run_recipe(recipe_from_dict(one_stage(ws, out, **kw)), log=log or msgs.append, callbacks=callbacks,
                      force=force)
    return msgs


def _crashed_at(ws, out, at=7, **kw):
    with pytest.raises(KeyboardInterrupt):
        _run(ws, out, callbacks=[CrashAt(at)], **kw)


def test_zero_byte_report_is_published_again_without_training(ws, straight, tmp_path):
    out = tmp_path / "run"
    _run(ws, out)
    (out / "finetune" / "data_report.json").write_bytes(b"")
    msgs = _run(ws, out)
    assert any("outputs are damaged (data_report.json has 0 bytes" in m for m in msgs)
    assert any("is the stage's last step: publishing it without training" in m for m in msgs)
    assert report(out)["steps"] == FINETUNE_STEPS
    assert_same_tensors(straight / "final" / "model.safetensors", out / "final" / "model.safetensors")


@pytest.mark.parametrize("override,expected", [
    ({"train": {"learning_rate": 1e-3}}, "recipe: stage.train.learning_rate: 0.003 -> 0.001"),
    ({"terms": [{"name": "reverse_kl"}]}, "recipe: stage.distill.terms: [{'name': 'forward_kl'"),
])
def test_finished_folder_with_another_recipe_is_refused(ws, tmp_path, override, expected):
    out = tmp_path / "run"
    _run(ws, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "recipe.yaml", out / "final" / "model.safetensors")}
    with pytest.raises(StageChangedError) as err:
        _run(ws, out, **override)
    assert expected in str(err.value) and "--force" in str(err.value) and "another output folder" in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten, nothing claimed
    msgs = _run(ws, out, force=True, **override)
    assert any("starting afresh" in m for m in msgs)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["distill"]["terms"][0]["name"] == \
           (override.get("terms") or [{"name": "forward_kl"}])[0]["name"]


def test_changed_data_or_images_are_refused(ws, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "inst.json"
    data.write_text((ws / "inst.json").read_text())
    _run(ws, out, data={"path": str(data)})
    data.write_text(data.read_text().replace("what color", "what colour", 1))
    with pytest.raises(StageChangedError, match=r"data: sha256: '[0-9a-f]+' -> '[0-9a-f]+'"):
        _run(ws, out, data={"path": str(data)})
    data.write_text((ws / "inst.json").read_text())
    image = ws / "imgs" / "img0.png"
    stat = image.stat()
    try:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, another mtime
        with pytest.raises(StageChangedError, match="data: images_digest"):
            _run(ws, out, data={"path": str(data)})
    finally:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _run(ws, out, data={"path": str(data)})  # back as it was: found done


def test_mid_stage_resume_with_another_learning_rate_is_refused(ws, tmp_path):
    out = tmp_path / "run"
    _crashed_at(ws, out)
    with pytest.raises(StageChangedError, match="partly trained stage.*\n.*learning_rate: 0.003 -> 0.001"):
        _run(ws, out, train={"learning_rate": 1e-3})


@pytest.mark.parametrize("damage", ["trainer_state.json", "model.safetensors", "optimizer.pt"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(ws, straight, tmp_path, damage):
    out = tmp_path / "run"
    _crashed_at(ws, out)  # checkpoints 3 and 6
    path = out / "finetune" / "checkpoints" / "checkpoint-6" / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (out / ".tmp-save-x").mkdir()  # what a killed save_model leaves
    msgs = _run(ws, out)
    warning = next(m for m in msgs if "checkpoint-6 cannot be resumed from" in m)
    assert f"damaged file {damage}" in warning
    assert any("resuming from" in m and m.endswith("checkpoint-3") for m in msgs)
    assert (out / "finetune" / "checkpoints" / "damaged-checkpoint-6").is_dir()
    assert_same_tensors(straight / "final" / "model.safetensors", out / "final" / "model.safetensors")
    assert report(out)["train_loss"] == pytest.approx(report(straight)["train_loss"], rel=1e-12)
    assert leftovers(out) == []


def test_diverging_run_stops_naming_step_terms_and_samples(ws, tmp_path, capsys):
    out = tmp_path / "run"
    raw = one_stage(ws, out, train={"learning_rate": 1e10, "save_steps": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "r.yaml"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "training stopped: step 2: non-finite ce=nan" in err and "forward_kl=nan" in err
    assert "(samples: s" in err and "max_nonfinite_skips" in err
    ckpts = sorted(p.name for p in (out / "finetune" / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in tensors(out / "finetune" / "checkpoints" / "checkpoint-1" /
                                                        "model.safetensors").values())
    assert not (out / "finetune" / "model").exists() and not (out / "final").exists()
    assert not (out / "finetune" / "done.json").exists()


class _Weights(TrainerCallback):
    """The student's weights after every optimisation step."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step] = {k: v.detach().clone() for k, v in model.student.state_dict().items()}


@pytest.fixture()
def poisoned(monkeypatch):
    """Every micro-batch holding sample s5 gets a NaN loss."""
    real = DistillationModule.forward

    def forward(self, batch, *a, **k):
        loss, terms = real(self, batch, *a, **k)
        if "s5" in batch["sample_ids"]:
            loss, terms = loss * float("nan"), {**terms, "forward_kl": terms["forward_kl"] * float("nan")}
        return loss, terms
    monkeypatch.setattr(DistillationModule, "forward", forward)


def test_nonfinite_steps_are_skipped_up_to_the_limit(ws, tmp_path, poisoned):
    out = tmp_path / "run"
    weights = _Weights()
    _run(ws, out, callbacks=[weights], train={"max_nonfinite_skips": 2})  # 8 steps = 2 epochs: s5 twice
    rep = report(out)
    skipped = [s["step"] for s in rep["nonfinite_steps_skipped"]]
    assert rep["steps"] == FINETUNE_STEPS and len(skipped) == 2
    assert all("forward_kl=nan" in s["what"] and "s5" in s["what"] for s in rep["nonfinite_steps_skipped"])
    for step in skipped:  # a skipped step leaves every weight as it was
        assert all(torch.equal(weights.after[step][k], weights.after[step - 1][k]) for k in weights.after[step])
    kept = [s for s in range(2, FINETUNE_STEPS + 1) if s not in skipped]
    assert all(any(not torch.equal(weights.after[s][k], weights.after[s - 1][k]) for k in weights.after[s]) for s in kept)
    state = json.loads((out / "finetune" / "checkpoints" / f"checkpoint-{FINETUNE_STEPS}" / "trainer_state.json").read_text())
    logged = {h["step"]: h for h in state["log_history"] if "loss" in h}
    for step in skipped:  # logged as what it was, never as 0 or an earlier mean
        assert math.isnan(logged[step]["loss"]) and logged[step]["nonfinite_steps_skipped"] == 1
    counted = [s for s in range(1, FINETUNE_STEPS + 1) if s not in skipped]
    assert all(math.isfinite(logged[s]["loss"]) and logged[s]["loss"] > 0 for s in counted)
    assert rep["train_loss"] == pytest.approx(sum(logged[s]["loss"] for s in counted) / len(counted), rel=1e-6)


def test_one_nonfinite_step_too_many_stops(ws, tmp_path, poisoned):
    with pytest.raises(NonFiniteLossError, match=r"step \d+: non-finite .*forward_kl=nan.*s5.*1 were allowed"):
        _run(ws, tmp_path / "run", train={"max_nonfinite_skips": 1})
    assert not (Path(tmp_path / "run" / "finetune" / "done.json")).exists()


def test_rerun_of_a_finished_stage_does_not_tokenize_its_data_again(ws, straight, monkeypatch):
    calls = []
    real = stage_inputs.build_dataset
    monkeypatch.setattr(stage_inputs, "build_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    msgs = _run(ws, straight)
    assert calls == [] and any("already done" in m for m in msgs)
