"""Stage runner and DistillTrainer: training works, freezing holds, resume restores weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import CrashAt, make_image_processor, make_tiny_llava, make_word_tokenizer, write_images, write_json
from safetensors.torch import load_file

from llavadi.models.build import LoadedModel, save_model
from llavadi.recipe import recipe_from_dict
from llavadi.train.runner import run_recipe

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(root / "student0"))
    save_model(LoadedModel(make_tiny_llava(tok, text_hidden=64, seed=1), tok, make_image_processor(32), {}),
               str(root / "teacher0"))
    write_images(root / "imgs", 4)
    inst = [{"id": f"s{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the square?"},
                               {"from": "gpt", "value": COLOURS[i % 4]}]} for i in range(24)]
    inst.append({"id": "t0", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}]})
    write_json(root / "inst.json", inst)
    caps = [{"id": f"c{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\ndescribe the image"},
                               {"from": "gpt", "value": f"a {COLOURS[i % 4]} square"}]} for i in range(8)]
    write_json(root / "caps.json", caps)
    return root


def _recipe(root, out, stages, teacher=True, **extra):
    raw = {"student": {"path": str(root / "student0")}, "output_dir": str(out), "device": "cpu", "seed": 0,
           "data": {"image_folder": str(root / "imgs"), "template": "vicuna_v1", "system": ""}, "stages": stages}
    if teacher:
        raw["teacher"] = {"path": str(root / "teacher0")}
    raw.update(extra)
    return recipe_from_dict(raw)


def _finetune(root, steps=8, terms=None, **train):
    t = {"learning_rate": 3e-3, "max_steps": steps, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 100,
         "lr_scheduler_type": "constant", "warmup_steps": 0.0}
    t.update(train)
    return {"name": "finetune", "data": {"path": str(root / "inst.json")}, "train": t,
            "distill": {"terms": terms or []}}


def _weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


def _history(stage_dir):
    from llavadi.train.runner import latest_checkpoint

    with open(os.path.join(latest_checkpoint(os.path.join(stage_dir, "checkpoints")), "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def test_sft_stage_learns_and_saves_plain_hf(workspace, tmp_path):
    out = tmp_path / "run"
    final = run_recipe(_recipe(workspace, out, [_finetune(workspace, steps=30, save_steps=30)], teacher=False),
                       log=lambda *_: None)
    losses = [h["loss"] for h in _history(out / "finetune") if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    from transformers import LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(final)
    assert m.config.text_config.hidden_size == 32
    meta = json.load(open(os.path.join(final, "llavadi.json")))
    assert meta["template"] == "vicuna_v1" and meta["system"] == "" and meta["n_image_tokens"] == 4
    report = json.load(open(out / "finetune" / "data_report.json"))
    # TensorBoard logging when it is installed (it is, with the test extras)
    assert list((out / "finetune" / "checkpoints").rglob("events.out.tfevents*"))
    assert report["used"] == 25 and report["skipped"] == [] and report["steps"] == 30


def test_pretrain_stage_trains_projector_only(workspace, tmp_path):
    out = tmp_path / "run"
    pre = {"name": "pretrain", "data": {"path": str(workspace / "caps.json"), "template": "plain"},
           "trainable": {"projector": True, "llm": False},
           "train": {"learning_rate": 1e-2, "max_steps": 3, "per_device_train_batch_size": 4, "save_steps": 100}}
    run_recipe(_recipe(workspace, out, [pre], teacher=False), log=lambda *_: None)
    before, after = _weights(workspace / "student0"), _weights(out / "pretrain" / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    # a pretrain stage does not decide how the model is prompted
    assert "template" not in json.load(open(out / "pretrain" / "model" / "llavadi.json"))


def test_distill_stage_logs_each_term_and_saves_projectors_beside(workspace, tmp_path):
    out = tmp_path / "run"
    terms = [{"name": "forward_kl", "weight": 1.0}, {"name": "hidden_mse", "weight": 0.5}]
    run_recipe(_recipe(workspace, out, [_finetune(workspace, steps=4, terms=terms)]), log=lambda *_: None)
    logs = [h for h in _history(out / "finetune") if "loss" in h]
    assert all({"loss/ce", "loss/forward_kl", "loss/hidden_mse"} <= set(h) for h in logs)
    first = logs[0]
    assert first["loss"] == pytest.approx(first["loss/ce"] + first["loss/forward_kl"] + 0.5 * first["loss/hidden_mse"],
                                          rel=1e-3)
    assert os.path.isfile(out / "finetune" / "distill_projectors.safetensors")
    assert not any("projector" in k and "multi_modal" not in k for k in _weights(out / "finetune" / "model"))


def test_resume_restores_weights_and_continues(workspace, tmp_path):
    terms = [{"name": "forward_kl", "weight": 1.0}, {"name": "hidden_mse", "weight": 0.5}]
    stage = _finetune(workspace, steps=8, terms=terms, save_steps=4)
    straight = tmp_path / "straight"
    run_recipe(_recipe(workspace, straight, [stage]), log=lambda *_: None)

    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(workspace, crashed, [stage]), log=lambda *_: None, callbacks=[CrashAt(6)])
    assert os.path.isdir(crashed / "finetune" / "checkpoints" / "checkpoint-4")
    assert not os.path.exists(crashed / "finetune" / "model")
    run_recipe(_recipe(workspace, crashed, [stage]), log=lambda *_: None)

    a, b = _weights(straight / "final"), _weights(crashed / "final")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    pa = load_file(straight / "finetune" / "distill_projectors.safetensors")
    pb = load_file(crashed / "finetune" / "distill_projectors.safetensors")
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-5), k
    # the resumed run's loss continues where it was: its step-5 loss equals the straight run's
    sa = {h["step"]: h["loss"] for h in _history(straight / "finetune") if "loss" in h}
    sb = {h["step"]: h["loss"] for h in _history(crashed / "finetune") if "loss" in h}
    assert sb[5] == pytest.approx(sa[5], rel=1e-4) and sb[8] == pytest.approx(sa[8], rel=1e-4)


def test_finished_stage_is_not_rerun(workspace, tmp_path):
    out = tmp_path / "run"
    rec = _recipe(workspace, out, [_finetune(workspace, steps=2)], teacher=False)
    run_recipe(rec, log=lambda *_: None)
    stamp = os.path.getmtime(out / "finetune" / "model" / "model.safetensors")
    msgs = []
    run_recipe(rec, log=msgs.append)
    assert os.path.getmtime(out / "finetune" / "model" / "model.safetensors") == stamp
    assert any("already done" in m for m in msgs)


def test_teacher_with_other_image_layout_gets_its_own_inputs(workspace, tmp_path):
    """A teacher with 16 image tokens (64 px) teaches a 4-token (32 px) student: own pixels, own ids."""
    tok = make_word_tokenizer()
    big = make_tiny_llava(tok, text_hidden=64, image_size=64, seed=2)
    save_model(LoadedModel(big, tok, make_image_processor(64), {}), str(tmp_path / "teacher64"))
    terms = [{"name": "forward_kl"}, {"name": "visual_align", "options": {"source": "projector"}},
             {"name": "hidden_mse"}]
    rec = _recipe(workspace, tmp_path / "run", [_finetune(workspace, steps=2, terms=terms)])
    rec.teacher.path = str(tmp_path / "teacher64")

    from llavadi.models.build import load_llava_dir
    from llavadi.train.stage_inputs import build_dataset

    ds = build_dataset(rec.stages[0], load_llava_dir(str(workspace / "student0")), load_llava_dir(str(tmp_path / "teacher64")))
    item = ds[0]
    assert item["pixel_values"].shape[-1] == 32 and item["teacher_pixel_values"].shape[-1] == 64
    image_id = tok.convert_tokens_to_ids("<image>")
    assert item["input_ids"].count(image_id) == 4 and item["teacher_input_ids"].count(image_id) == 16
    run_recipe(rec, log=lambda *_: None)
    logs = [h for h in _history(tmp_path / "run" / "finetune") if "loss" in h]
    assert logs and all(h["loss/visual_align"] > 0 and h["loss/forward_kl"] >= 0 for h in logs)


def test_skipped_samples_are_reported_at_the_end(workspace, tmp_path):
    data = json.load(open(workspace / "inst.json"))
    data[3] = dict(data[3], image="missing.png")
    data[5] = dict(data[5], id="bad5", conversations=data[5]["conversations"][:1])
    write_json(tmp_path / "inst.json", data)
    stage = _finetune(workspace, steps=1)
    stage["data"] = {"path": str(tmp_path / "inst.json"), "on_error": "skip"}
    msgs = []
    run_recipe(_recipe(workspace, tmp_path / "run", [stage], teacher=False), log=msgs.append)
    report = json.load(open(tmp_path / "run" / "finetune" / "data_report.json"))
    assert report["used"] == len(data) - 2
    assert [s["sample_id"] for s in report["skipped"]] == ["s3", "bad5"]
    assert any("2 sample(s) skipped (s3, bad5)" in m for m in msgs[-3:])
