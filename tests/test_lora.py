"""LoRA students, one process: every distillation term trains the adapters, the stage's student is merged
into a plain HF LLaVA giving the PeftModel's logits, the adapter alone reloads offline, and resume
rebuilds the adapter. (Two processes: tests/test_scale_out.py.)"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import CrashAt, final_logits, probe_inputs
from safetensors.torch import load_file
from test_train import _finetune, _history, _recipe, workspace  # noqa: F401  (workspace: a fixture)

from llavadi.distill.terms import TERMS
from llavadi.train import trainer as trainer_module
from llavadi.train.runner import run_recipe

pytest.importorskip("peft", reason="LoRA students need peft: pip install 'llavadi[peft]'")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "save": "adapter"}


def _lora_recipe(root, out, stages):
    rec = _recipe(root, out, stages)
    from llavadi.config import LoraSpec

    rec.student.lora = LoraSpec(**LORA)
    return rec


@pytest.fixture()
def peft_logits_at_save(monkeypatch):
    """Logits of the trained (PeftModel) student on the probe inputs, taken when the stage saves it."""
    probe, taken = probe_inputs(), []
    original = trainer_module.DistillTrainer.gather_student_state

    def gather_student_state(self, *args, **kwargs):
        student = self.accelerator.unwrap_model(self.model).student
        student.eval()
        size = probe["image_size"]
        with torch.no_grad():
            taken.append(student(input_ids=torch.tensor(probe["input_ids"]),
                                 pixel_values=torch.zeros(1, 3, size, size)).logits)
        taken.append(type(student).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.DistillTrainer, "gather_student_state", gather_student_state)
    return probe, taken


def test_lora_student_with_every_term_merges_and_reloads(workspace, tmp_path, peft_logits_at_save):
    probe, taken = peft_logits_at_save
    pre = {"name": "pretrain", "data": {"path": str(workspace / "caps.json"), "template": "plain"},
           "trainable": {"projector": True, "llm": False},
           "train": {"learning_rate": 1e-2, "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 100}}
    terms = [{"name": name} for name in TERMS]  # every registered term, with its defaults
    fine = _finetune(workspace, steps=3, terms=terms, gradient_checkpointing=True)
    out = tmp_path / "run"
    run_recipe(_lora_recipe(workspace, out, [pre, fine]), log=lambda *_: None)

    # the projector-only stage trains no adapter; the finetune stage trains through one
    assert taken[1] != "PeftModel" and taken[3] == "PeftModel"
    logs = [h for h in _history(out / "finetune") if "loss" in h]
    assert all(torch.isfinite(torch.tensor(h[f"loss/{name}"])) for h in logs for name in TERMS)
    # final/ is a plain LLaVA (no adapter key) giving the PeftModel's logits
    final = load_file(out / "final" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in final)
    assert set(final) == set(load_file(workspace / "student0" / "model.safetensors"))
    assert (final_logits(out, probe) - taken[2]).abs().max().item() <= 1e-5
    # the merge changed the language model; the multimodal projector trained in full beside the adapters
    before = load_file(out / "pretrain" / "model" / "model.safetensors")
    changed = {k for k in final if not torch.equal(before[k], final[k])}
    assert any("language_model" in k and ".layers." in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)
    # checkpoints hold the adapter, not a whole model
    ckpt = out / "finetune" / "checkpoints" / "checkpoint-3"
    assert os.path.isfile(ckpt / "adapter_model.safetensors") and not os.path.exists(ckpt / "model.safetensors")


def test_saved_adapter_reloads_offline_on_the_stage_start(workspace, tmp_path, peft_logits_at_save):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    probe, taken = peft_logits_at_save
    out = tmp_path / "run"
    run_recipe(_lora_recipe(workspace, out, [_finetune(workspace, steps=2)]), log=lambda *_: None)
    adapter = out / "finetune" / "adapter"
    base_path = json.load(open(adapter / "adapter_config.json"))["base_model_name_or_path"]
    assert base_path == str(workspace / "student0")  # where the stage's student came from
    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_path), str(adapter)).eval()
    size = probe["image_size"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(probe["input_ids"]), pixel_values=torch.zeros(1, 3, size, size)).logits
    assert (logits - taken[0]).abs().max().item() <= 1e-5


def test_lora_resume_rebuilds_the_adapter(workspace, tmp_path):
    terms = [{"name": "forward_kl"}, {"name": "hidden_mse", "weight": 0.5}]
    stage = _finetune(workspace, steps=6, terms=terms, save_steps=2)
    straight = tmp_path / "straight"
    run_recipe(_lora_recipe(workspace, straight, [stage]), log=lambda *_: None)
    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_lora_recipe(workspace, crashed, [stage]), log=lambda *_: None, callbacks=[CrashAt(3)])
    run_recipe(_lora_recipe(workspace, crashed, [stage]), log=lambda *_: None)
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(crashed / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    sa = {h["step"]: h["loss"] for h in _history(straight / "finetune") if "loss" in h}
    sb = {h["step"]: h["loss"] for h in _history(crashed / "finetune") if "loss" in h}
    assert sb[3] == pytest.approx(sa[3], rel=1e-4) and sb[6] == pytest.approx(sa[6], rel=1e-4)


def test_merging_on_the_reloaded_base_equals_merging_the_state(workspace):
    """The QLoRA merge path (the adapter on the student re-read unquantized from its directory) gives the
    same plain model as the merge of the whole state; run here on an unquantized student."""
    from conftest import probe_inputs

    from llavadi.config import LoraSpec
    from llavadi.models.build import load_llava_dir, set_trainable
    from llavadi.models.lora import apply_lora, merged_llava, merged_on_base

    student = load_llava_dir(str(workspace / "student0"))
    set_trainable(student.model, projector=True, llm=True)
    peft_model = apply_lora(student.model, LoraSpec(**LORA), base_path=student.source)
    torch.manual_seed(0)
    with torch.no_grad():
        for _name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # as if trained: B != 0, the projector's copy moved
    state = peft_model.state_dict()
    probe, size = probe_inputs(), 32
    inputs = {"input_ids": torch.tensor(probe["input_ids"]), "pixel_values": torch.zeros(1, 3, size, size)}
    with torch.no_grad():
        a, b = merged_llava(peft_model, state)(**inputs).logits, merged_on_base(peft_model, state)(**inputs).logits
        c = peft_model.eval()(**inputs).logits
    assert (a - b).abs().max().item() <= 1e-5 and (a - c).abs().max().item() <= 1e-5
