"""Engine requests and model knobs: FSDP where it cannot run is an error, DeepSpeed configs are checked,
FSDP wraps the real layer classes, `ddp_backend` is ignored in one process, FSDP2 (by hand, 2 CPU
processes) gives the unsharded gradients and saves a plain student, and model specs take dtype,
attention implementation, revision and LoRA options."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llava, make_word_tokenizer, write_json
from safetensors.torch import load_file
from test_equivalence import (  # noqa: F401  (workspace and batch_of_8 are fixtures used here)
    REPO_ROOT,
    TOLERANCE,
    _max_difference,
    _recipe_dict,
    _torchrun_unavailable,
    _train,
    batch_of_8,
    workspace,
)

from llavadi.config import ConfigError
from llavadi.recipe import recipe_from_dict
from llavadi.train.engines import (
    check_engine_request,
    deepspeed_config,
    engine_arguments,
    layer_classes_to_wrap,
    require_engine,
)
from llavadi.train.runner import run_recipe


def test_fsdp_on_the_cpu_is_an_error_before_any_model_loads(workspace, tmp_path, capsys):
    raw = _recipe_dict(workspace, tmp_path / "run", batch_size=8, grad_accum=1, fsdp="full_shard")
    raw["student"]["path"] = str(tmp_path / "not-loaded-yet")  # loading it would fail with another error
    with pytest.raises(ConfigError, match=r"stages\.finetune\.train\.fsdp: FSDP runs only on accelerator"):
        run_recipe(recipe_from_dict(raw), log=lambda *_: None)
    from llavadi.cli import main

    write_json(tmp_path / "recipe.json", raw)
    assert main(["train", str(tmp_path / "recipe.json")]) == 2
    assert "FSDP runs only on accelerator devices" in capsys.readouterr().err


def test_a_requested_engine_that_does_not_run_is_an_error():
    trainer = SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=False)
    with pytest.raises(ConfigError, match="deepspeed was given but the Trainer did not enable DeepSpeed"):
        require_engine(trainer, {"deepspeed": "ds.json"}, "stages.x.train")
    with pytest.raises(ConfigError, match="fsdp was given but the Trainer did not enable FSDP"):
        require_engine(trainer, {"fsdp": "full_shard"}, "stages.x.train")
    require_engine(trainer, {"ddp_backend": "gloo"}, "stages.x.train")  # nothing asked, nothing to check
    with pytest.raises(ConfigError, match="not both"):
        check_engine_request({"deepspeed": "a.json", "fsdp": "full_shard"}, "cuda", "stages.x.train")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_on_policy_under_zero3_is_an_error_before_any_model_loads(workspace, tmp_path):
    """The student generates during an on_policy stage; under ZeRO-3 every forward gathers its weights
    collectively, so ranks generating answers of different lengths would hang: refused, ZeRO-2 accepted."""
    raw = _recipe_dict(workspace, tmp_path / "run", batch_size=8, grad_accum=1,
                       deepspeed=os.path.join(REPO_ROOT, "configs", "zero3.json"))
    raw["stages"][0]["on_policy"] = {"fraction": 0.5}
    raw["student"]["path"] = str(tmp_path / "not-loaded-yet")  # loading it would fail with another error
    with pytest.raises(ConfigError, match=r"stages\.finetune\.train\.deepspeed: on_policy generates with"):
        run_recipe(recipe_from_dict(raw), log=lambda *_: None)
    check_engine_request({"deepspeed": os.path.join(REPO_ROOT, "configs", "zero2.json")}, "cpu", "w", on_policy=True)


def test_deepspeed_configs_are_checked_for_saving(tmp_path):
    with open(os.path.join(REPO_ROOT, "configs", "zero3.json")) as f:
        zero3 = json.load(f)
    del zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert deepspeed_config(zero3, "w")["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with pytest.raises(ConfigError, match="w.deepspeed: stage3_gather_16bit_weights_on_model_save is false"):
        deepspeed_config(zero3, "w")
    zero2 = deepspeed_config(os.path.join(REPO_ROOT, "configs", "zero2.json"), "w")
    assert zero2["zero_optimization"]["stage"] == 2 and "stage3_gather_16bit_weights_on_model_save" not in \
        zero2["zero_optimization"]
    with pytest.raises(ConfigError, match="cannot read .*missing.json"):
        deepspeed_config(str(tmp_path / "missing.json"), "w")


def test_ddp_backend_is_ignored_in_one_process(workspace, batch_of_8, tmp_path, monkeypatch):
    student = make_tiny_llava(make_word_tokenizer())
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert engine_arguments({"ddp_backend": "gloo", "optim": "sgd"}, student, "w") == {"optim": "sgd"}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert engine_arguments({"ddp_backend": "gloo"}, student, "w") == {"ddp_backend": "gloo"}
    monkeypatch.delenv("WORLD_SIZE")
    # a recipe written for torchrun (ddp_backend: gloo) trains in one process: the same step as without it
    student8, proj8, _ = _train(workspace, tmp_path / "gloo", batch_size=8, grad_accum=1, ddp_backend="gloo")
    assert _max_difference(batch_of_8[0], student8)[0] == 0.0 and _max_difference(batch_of_8[1], proj8)[0] == 0.0


def test_gradient_checkpointing_gives_the_same_step(workspace, batch_of_8, tmp_path):
    student, projectors, _ = _train(workspace, tmp_path / "ckpt", batch_size=8, grad_accum=1,
                                    gradient_checkpointing=True)
    assert _max_difference(batch_of_8[0], student)[0] <= TOLERANCE
    assert _max_difference(batch_of_8[1], projectors)[0] <= TOLERANCE


def test_fsdp_wraps_the_models_real_layer_classes(workspace):
    """accelerate's own FSDP2 wrap policy, given the classes llavadi resolves, picks exactly the transformer blocks;
    LLaVA's `_no_split_modules` names a class the model does not have."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from llavadi.distill.module import DistillationModule
    from llavadi.distill.objective import DistillObjective

    model = make_tiny_llava(make_word_tokenizer())
    names = layer_classes_to_wrap(model)
    assert names == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    module = DistillationModule(model, DistillObjective([]))
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=names)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, module)
    wrapped = [m for m in module.modules() if policy(m)]
    blocks = list(model.model.language_model.layers) + list(model.model.vision_tower.encoder.layers)
    assert len(wrapped) == len(blocks) and all(any(m is b for b in blocks) for m in wrapped)
    plugin.transformer_cls_names_to_wrap = sorted(model._no_split_modules)
    with pytest.raises(ValueError, match="Could not find the transformer layer class CLIPTextEmbeddings"):
        fsdp2_prepare_auto_wrap_policy(plugin, module)
    # engine_arguments fills them in (FSDP2 by default) and refuses a class the student lacks
    config = engine_arguments({"fsdp": "full_shard"}, model, "w")["fsdp_config"]
    assert config == {"version": 2, "transformer_layer_cls_to_wrap": names}
    with pytest.raises(ConfigError, match=r"\['GPT2Block'\] are not classes of the student"):
        engine_arguments({"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": ["GPT2Block"]}}, model, "w")


@pytest.mark.skipif(_torchrun_unavailable() is not None, reason=str(_torchrun_unavailable()))
def test_fsdp2_sharded_module_gives_the_unsharded_gradients_and_saves_a_plain_student(workspace, tmp_path):
    """FSDP2 cannot run through the stock Trainer on the CPU: shard by hand as accelerate would (2 gloo processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO_ROOT, "tests", "fsdp2_worker.py"), str(workspace), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240)
    from conftest import only_teardown_abort

    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 or only_teardown_abort(proc.returncode, log, tmp_path / "rank1.json"), log[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["sharded"] == "DTensor" for r in ranks)  # the LM head really was sharded outside the forward
    # the two halves' global-normalised losses add up to the whole batch's loss
    whole = json.loads((tmp_path / "unsharded.json").read_text())["loss"]
    assert sum(r["loss"] for r in ranks) == pytest.approx(whole, abs=1e-5)
    grads = load_file(tmp_path / "grads.safetensors")
    sharded = {k[len("sharded/"):]: v for k, v in grads.items() if k.startswith("sharded/")}
    unsharded = {k[len("unsharded/"):]: v for k, v in grads.items() if k.startswith("unsharded/")}
    assert sharded and set(sharded) == set(unsharded)
    assert any(k.startswith("objective.") for k in sharded)  # projectors are sharded with the student
    assert _max_difference(sharded, unsharded)[0] <= TOLERANCE
    # the stage save path gathers a full student (no step was taken: the initial weights) and the projectors
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert all(t.numel() > 0 for t in saved.values())
    assert _max_difference(load_file(workspace / "student0" / "model.safetensors"), saved)[0] == 0.0
    assert _max_difference(load_file(tmp_path / "unsharded_projectors.safetensors"),
                           load_file(tmp_path / "distill_projectors.safetensors"))[0] == 0.0
    assert json.loads((tmp_path / "model" / "llavadi.json").read_text())["stage"] == "finetune"


@pytest.mark.parametrize("student, message", [
    ({"preset": "tiny-student", "dtype": "fp8"}, r"student.dtype must be one of \['bf16', 'fp16', 'fp32'\]"),
    ({"preset": "tiny-student", "attn_implementation": "flash"}, "student.attn_implementation must be one of"),
    ({"preset": "tiny-student", "revision": "main"}, "student.revision applies to a hub id given in `path` only"),
    ({"preset": "tiny-student", "lora": {"target_modules": ["q_proj", "lm_head"]}}, "LM head cannot carry an adapter"),
    ({"preset": "tiny-student", "lora": {"target_modules": "q_proj"}}, "target_modules: give a list"),
    ({"preset": "tiny-student", "lora": {"save": "both"}}, r"lora.save must be one of \['merged', 'adapter'\]"),
    ({"preset": "tiny-student", "lora": {"rank": 8}}, r"student.lora: unknown key\(s\) \['rank'\]"),
])
def test_model_spec_knobs_are_validated(student, message, tmp_path):
    raw = {"student": student, "output_dir": str(tmp_path), "stages": [{"name": "s", "data": {"path": "x.json"}}]}
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(raw)


def test_teacher_cannot_have_lora(tmp_path):
    raw = {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher", "lora": {}},
           "output_dir": str(tmp_path), "stages": [{"name": "s", "data": {"path": "x.json"}}]}
    with pytest.raises(ConfigError, match="teacher.lora: LoRA applies to the student"):
        recipe_from_dict(raw)


def test_dtype_and_attention_implementation_reach_the_model(workspace):
    from llavadi.config import ModelSpec
    from llavadi.models.build import load_model

    loaded = load_model(ModelSpec(path=str(workspace / "student0"), dtype="bf16", attn_implementation="eager"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.model.config.text_config._attn_implementation == "eager"
    preset = load_model(ModelSpec(preset="tiny-student", dtype="fp16"))
    assert {p.dtype for p in preset.model.parameters()} == {torch.float16}


def test_a_hub_id_in_a_recipe_stays_a_hub_id(tmp_path):
    from llavadi.recipe import load_recipe

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "clip").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student: {vision: local/clip, llm: mtgv/MobileLLaMA-2.7B-Chat}\n"
                      "teacher: {path: llava-hf/llava-1.5-13b-hf, revision: main}\n"
                      "stages: [{name: s, data: {path: d.json}}]\n")
    r = load_recipe(str(recipe))
    assert r.student.vision == str(tmp_path / "local" / "clip")  # a folder beside the recipe
    assert r.student.llm == "mtgv/MobileLLaMA-2.7B-Chat" and r.teacher.path == "llava-hf/llava-1.5-13b-hf"
    assert r.stages[0].data.path == str(tmp_path / "d.json")  # data paths are always paths
