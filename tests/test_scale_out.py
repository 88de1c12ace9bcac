"""Scale-out with 2 CPU processes, through `llavadi train`: DeepSpeed ZeRO-2 and ZeRO-3 (student and
projectors owned by the engine, teacher partitioned under ZeRO-3) give the step of one process with
the whole batch and a `final/` that plain `from_pretrained` loads; `accelerate launch --multi_gpu`
starts 2 processes; a LoRA student trains under DDP and is saved merged; under ZeRO-3 a LoRA run
resumed from a checkpoint, or republished from its last-step checkpoint, ends as the uninterrupted one;
on-policy samples train under ZeRO-2.

The reference is the one-process batch of 8 of tests/test_equivalence.py (plain SGD, so equal weights
after one step mean equal gradients).
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
from conftest import final_logits, probe_inputs, write_json
from safetensors.torch import load_file
from test_equivalence import (  # noqa: F401  (workspace and batch_of_8 are fixtures used here)
    TOLERANCE,
    _assert_same_step,
    _max_difference,
    _recipe_dict,
    _torchrun,
    _torchrun_unavailable,
    batch_of_8,
    workspace,
)

from llavadi.recipe import recipe_from_dict
from llavadi.train.runner import run_recipe

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")
# the first DeepSpeed run builds its CPU communication op (~40 s alone, longer on a busy machine)
DEEPSPEED_TIMEOUT = 420


def _deepspeed_unavailable() -> str | None:
    reason = _torchrun_unavailable()
    if reason is not None:
        return reason
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001  (an import of deepspeed can fail in many ways: say which)
        return f"deepspeed cannot be imported ({type(e).__name__}: {e}); pip install 'llavadi[deepspeed]'"
    return None


def _accelerate_unavailable() -> str | None:
    reason = _torchrun_unavailable()
    if reason is not None:
        return reason
    try:
        import accelerate.commands.launch  # noqa: F401
    except ImportError as e:
        return f"accelerate's launcher cannot be imported: {e}"
    return None


needs_deepspeed = pytest.mark.skipif(_deepspeed_unavailable() is not None, reason=str(_deepspeed_unavailable()))
needs_accelerate = pytest.mark.skipif(_accelerate_unavailable() is not None, reason=str(_accelerate_unavailable()))


def _final_weights_complete(out, reference_out) -> None:
    """final/ loads with plain from_pretrained, has no empty tensor, and equals the reference's final/."""
    from transformers import LlavaForConditionalGeneration

    final = os.path.join(out, "final")
    model = LlavaForConditionalGeneration.from_pretrained(final, local_files_only=True)
    saved = load_file(os.path.join(final, "model.safetensors"))
    assert saved and all(t.numel() > 0 for t in saved.values())
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in LlavaForConditionalGeneration.from_pretrained(os.path.join(reference_out, "final")).parameters())
    diff, where = _max_difference(load_file(os.path.join(reference_out, "final", "model.safetensors")), saved)
    assert diff <= TOLERANCE, f"final/ differs by {diff:.3g} at {where}"
    assert os.path.isfile(os.path.join(final, "llavadi.json")) and os.path.isfile(os.path.join(final, "tokenizer.json"))


@needs_deepspeed
def test_zero2_two_processes_equal_one_batch_of_8(workspace, batch_of_8, tmp_path):
    out = tmp_path / "zero2"
    ranks = _torchrun(tmp_path, _recipe_dict(workspace, out, batch_size=4, grad_accum=1,
                                             deepspeed=os.path.join(CONFIGS, "zero2.json")), timeout=DEEPSPEED_TIMEOUT)
    _assert_same_step(batch_of_8[:2], out)
    _final_weights_complete(out, workspace / "batch8")
    assert all(r["teacher_weights"]["local"] == r["teacher_weights"]["total"] for r in ranks)  # replicated


def _two_stages(recipe: dict) -> dict:
    """The recipe with a first stage identical to its stage: the second starts from what the first saved."""
    first = copy.deepcopy(recipe["stages"][0])
    first["name"] = "first"
    return {**recipe, "stages": [first, *recipe["stages"]]}


@needs_deepspeed
def test_zero3_partitioned_two_processes_two_stages_equal_one_batch_of_8(workspace, tmp_path):
    """Every weight partitioned (student, projectors, teacher); two distillation stages, so the second stage
    starts from the student the first gathered and saved, with the teacher partitioned once."""
    reference = tmp_path / "batch8"
    run_recipe(recipe_from_dict(_two_stages(_recipe_dict(workspace, reference, batch_size=8, grad_accum=1))),
               log=lambda *_: None)
    with open(os.path.join(CONFIGS, "zero3.json")) as f:
        config = json.load(f)
    # tiny models fit under the default persistence threshold: 0 partitions every weight
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    out = tmp_path / "zero3"
    recipe = _two_stages(_recipe_dict(workspace, out, batch_size=4, grad_accum=1, deepspeed=config))
    ranks = _torchrun(tmp_path, recipe, timeout=DEEPSPEED_TIMEOUT, steps=2)
    for stage in ("first", "finetune"):
        for name in ("model/model.safetensors", "distill_projectors.safetensors"):
            diff, where = _max_difference(load_file(reference / stage / name), load_file(out / stage / name))
            assert diff <= TOLERANCE, f"{stage}/{name} differs by {diff:.3g} at {where}"
    _final_weights_complete(out, reference)
    # the teacher is partitioned for inference too: each rank owns about half of its weights
    assert all(0 < r["teacher_weights"]["local"] < 0.6 * r["teacher_weights"]["total"] for r in ranks), ranks


@needs_accelerate
def test_accelerate_launch_multi_gpu_starts_two_processes_on_cpu(workspace, batch_of_8, tmp_path):
    # no ddp_backend: accelerate chooses gloo on the CPU; --cpu would start ONE process
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = tmp_path / "accelerate"
    _torchrun(tmp_path, _recipe_dict(workspace, out, batch_size=4, grad_accum=1), launcher=launcher)
    _assert_same_step(batch_of_8[:2], out)


LORA = {"r": 4, "alpha": 8, "dropout": 0.0}  # no dropout: both runs draw no random numbers


@pytest.mark.skipif(_torchrun_unavailable() is not None, reason=str(_torchrun_unavailable()))
def test_lora_ddp_two_processes_merge_reload_and_equal_one_batch_of_8(workspace, tmp_path):
    reference = tmp_path / "lora8"
    recipe8 = _recipe_dict(workspace, reference, batch_size=8, grad_accum=1)
    recipe8["student"]["lora"] = LORA
    student8, proj8, _ = _train_recipe(recipe8)

    out = tmp_path / "lora_ddp"
    recipe = _recipe_dict(workspace, out, batch_size=4, grad_accum=1, ddp_backend="gloo")
    recipe["student"]["lora"] = LORA
    probe = probe_inputs()
    _torchrun(tmp_path, recipe, probe=probe)
    # the merged, reloaded student gives the trained PeftModel's logits
    peft_logits = load_file(tmp_path / "reports" / "rank0_logits.safetensors")["logits"]
    assert (final_logits(out, probe) - peft_logits).abs().max().item() <= TOLERANCE
    # and the two processes took the step of one process with the whole batch
    _assert_same_step((student8, proj8), out)
    initial = load_file(os.path.join(workspace, "student0", "model.safetensors"))
    assert _max_difference(initial, student8)[0] > 1e-3  # the LoRA step did change the merged weights


def _train_recipe(raw: dict):
    run_recipe(recipe_from_dict(raw), log=lambda *_: None)
    out = raw["output_dir"]
    return (load_file(os.path.join(out, "finetune", "model", "model.safetensors")),
            load_file(os.path.join(out, "finetune", "distill_projectors.safetensors")), None)


def _uninterrupted_zero3_lora_run(workspace, tmp_path, steps):
    """A ZeRO-3 run of a LoRA student, `steps` steps with a checkpoint at each, in tmp_path/straight; its recipe."""
    with open(os.path.join(CONFIGS, "zero3.json")) as f:
        config = json.load(f)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    straight = tmp_path / "straight"
    recipe = _recipe_dict(workspace, straight, batch_size=4, grad_accum=1, deepspeed=config)
    recipe["student"]["lora"] = LORA
    recipe["stages"][0]["train"].update(max_steps=steps, save_steps=1)
    (tmp_path / "a").mkdir()
    _torchrun(tmp_path / "a", recipe, timeout=DEEPSPEED_TIMEOUT, steps=steps)
    return straight, recipe


@needs_deepspeed
def test_zero3_lora_resume_from_a_checkpoint_continues_the_same_run(workspace, tmp_path):
    """ZeRO-3 with a LoRA student: resumed from DeepSpeed's checkpoint, the run ends where the uninterrupted
    one does, and the merged student is written from the gathered state (rank 0 alone builds it)."""
    import shutil

    straight, recipe = _uninterrupted_zero3_lora_run(workspace, tmp_path, steps=2)
    # a run killed after its first checkpoint: no step-2 checkpoint, no stage model, no final/
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for gone in ("finetune/model", "finetune/checkpoints/checkpoint-2", "final"):
        shutil.rmtree(resumed / gone)
    recipe["output_dir"] = str(resumed)
    (tmp_path / "b").mkdir()
    ranks = _torchrun(tmp_path / "b", recipe, timeout=DEEPSPEED_TIMEOUT, steps=1)
    assert all(len(r["micro_batches"]) == 1 for r in ranks)  # only step 2 was trained again
    diff, where = _max_difference(load_file(straight / "final" / "model.safetensors"),
                                  load_file(resumed / "final" / "model.safetensors"))
    assert diff <= TOLERANCE, f"resumed final/ differs by {diff:.3g} at {where}"
    diff, where = _max_difference(load_file(straight / "finetune" / "distill_projectors.safetensors"),
                                  load_file(resumed / "finetune" / "distill_projectors.safetensors"))
    assert diff <= TOLERANCE, f"resumed projectors differ by {diff:.3g} at {where}"


@needs_deepspeed
def test_zero3_lora_last_step_checkpoint_is_published_without_training(workspace, tmp_path):
    """A ZeRO-3 run killed after its last checkpoint but before publishing: the rerun trains nothing, loads the
    checkpoint into the whole (not yet partitioned) LoRA student, and publishes the uninterrupted run's student."""
    import shutil

    straight, recipe = _uninterrupted_zero3_lora_run(workspace, tmp_path, steps=1)
    again = tmp_path / "again"
    shutil.copytree(straight, again)
    for gone in ("finetune/model", "final"):  # checkpoint-1 (the last step) is kept
        shutil.rmtree(again / gone)
    recipe["output_dir"] = str(again)
    (tmp_path / "b").mkdir()
    ranks = _torchrun(tmp_path / "b", recipe, timeout=DEEPSPEED_TIMEOUT, steps=0)
    assert all(r["micro_batches"] == [] for r in ranks)  # nothing trained again
    _final_weights_complete(again, straight)
    diff, where = _max_difference(load_file(straight / "finetune" / "distill_projectors.safetensors"),
                                  load_file(again / "finetune" / "distill_projectors.safetensors"))
    assert diff <= TOLERANCE, f"republished projectors differ by {diff:.3g} at {where}"


@needs_deepspeed
def test_zero2_on_policy_two_processes_generate_train_and_save(workspace, tmp_path):
    """On-policy samples (λ = 1) under ZeRO-2 with 2 processes: each rank's student answers its own samples
    (ZeRO-2 keeps the whole weights on every rank, so generation needs no gathering), the teacher scores
    them, and the run saves a final/ that plain from_pretrained loads."""
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "zero2_on_policy"
    recipe = _recipe_dict(workspace, out, batch_size=4, grad_accum=1, max_steps=2,
                          deepspeed=os.path.join(CONFIGS, "zero2.json"))
    recipe["stages"][0]["on_policy"] = {"fraction": 1.0, "max_new_tokens": 4}
    _torchrun(tmp_path, recipe, timeout=DEEPSPEED_TIMEOUT, steps=2)
    states = sorted((out / "finetune" / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    history = [h for h in json.loads(states[-1].read_text())["log_history"] if "loss" in h]
    assert len(history) == 2
    # every sample is the student's own answer: CE is off there (it has no label), the teacher's terms carry the loss
    assert all(h["loss/ce"] == 0.0 and h["loss/forward_kl"] > 0 for h in history), history
    # the log counts the samples of both processes: all 8 answered by the student, at most 4 new tokens each
    assert all(h["on_policy/share"] == 1.0 and 0 < h["on_policy/tokens_per_answer"] <= 4 for h in history), history
    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(out, "final"), local_files_only=True)
    assert all(p.isfinite().all() for p in model.parameters())
    start = load_file(os.path.join(workspace, "student0", "model.safetensors"))
    trained = load_file(os.path.join(out, "final", "model.safetensors"))
    assert set(trained) == set(start) and any(not start[k].equal(trained[k]) for k in start)  # it trained


# ---------------------------------------------------------------- a dynamic-resolution family (Qwen2-VL, M-RoPE)
@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    """A tiny Qwen2-VL pair (text 32 and 64), images of four sizes (4, 8, 6 and 9 image tokens) in 5 of the 8
    samples, 3 text-only samples (a rank whose micro-batch has no image runs the image path on a blank one), and
    the student after one SGD step of one process on the batch of 8."""
    from family_models import qwen_image_processor, qwen_model, qwen_tokenizer
    from PIL import Image
    from test_equivalence import SAMPLE_IDS
    from test_families import IMAGES

    from llavadi.models.build import LoadedModel, save_model

    root = tmp_path_factory.mktemp("qwen2_vl_pair")
    tok, processor = qwen_tokenizer(), qwen_image_processor()
    save_model(LoadedModel(qwen_model("qwen2_vl", tok, 32, 0), tok, processor, {}), str(root / "student0"))
    save_model(LoadedModel(qwen_model("qwen2_vl", tok, 64, 1), tok, processor, {}), str(root / "teacher0"))
    (root / "imgs").mkdir()
    for name, size, rgb in IMAGES:
        Image.new("RGB", size, rgb).save(root / "imgs" / f"{name}.png")
    data = [{"id": sid, "conversations": [{"from": "human", "value": "what color is the square ?"},
                                          {"from": "gpt", "value": f"the square is {IMAGES[i % 4][0]}"}]}
            for i, sid in enumerate(SAMPLE_IDS)]
    for i, sample in enumerate(data[:5]):
        sample["image"] = f"{IMAGES[i % 4][0]}.png"
        sample["conversations"][0]["value"] = "<image>\nwhat color is the square ?"
    write_json(root / "data.json", data)
    single = root / "one"
    run_recipe(recipe_from_dict(_family_recipe(root, single, batch_size=8)), log=lambda *_: None)
    start, trained = (load_file(d / "model.safetensors") for d in (root / "student0", single / "final"))
    assert _max_difference(start, trained)[0] > 1e-4  # the reference step did change the student
    return root


def _family_recipe(root, out, batch_size, **train_extra) -> dict:
    """One SGD step of the Qwen2-VL pair with forward KL + hidden MSE + visual alignment, the model's chat template."""
    from test_families import TERMS

    train = {"learning_rate": 0.02, "max_steps": 1, "per_device_train_batch_size": batch_size, "optim": "sgd",
             "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1e9, "logging_steps": 1,
             "save_steps": 100, **train_extra}
    return {"student": {"path": str(root / "student0")}, "teacher": {"path": str(root / "teacher0")},
            "output_dir": str(out), "device": "cpu", "seed": 0,
            "data": {"image_folder": str(root / "imgs"), "template": "chat_template"},
            "stages": [{"name": "finetune", "data": {"path": str(root / "data.json")}, "train": train,
                        "distill": {"terms": TERMS}}]}


def _same_qwen_step(root, out) -> None:
    """The 2-process run's student and projectors equal the one-process step's; final/ loads in plain transformers."""
    from transformers import AutoModelForImageTextToText

    for name in ("final/model.safetensors", "finetune/distill_projectors.safetensors"):
        diff, where = _max_difference(load_file(root / "one" / name), load_file(os.path.join(out, name)))
        assert diff <= TOLERANCE, f"{name} differs by {diff:.3g} at {where}"
    model = AutoModelForImageTextToText.from_pretrained(os.path.join(out, "final"), local_files_only=True)
    assert model.config.model_type == "qwen2_vl"


@pytest.mark.skipif(_torchrun_unavailable() is not None, reason=str(_torchrun_unavailable()))
def test_qwen2_vl_ddp_two_processes_equal_one_batch_of_8(qwen_pair, tmp_path):
    out = tmp_path / "ddp"
    _torchrun(tmp_path, _family_recipe(qwen_pair, out, batch_size=4, ddp_backend="gloo"))
    _same_qwen_step(qwen_pair, out)


@needs_deepspeed
def test_qwen2_vl_zero2_two_processes_equal_one_batch_of_8(qwen_pair, tmp_path):
    out = tmp_path / "zero2"
    _torchrun(tmp_path, _family_recipe(qwen_pair, out, batch_size=4, deepspeed=os.path.join(CONFIGS, "zero2.json")),
              timeout=DEEPSPEED_TIMEOUT)
    _same_qwen_step(qwen_pair, out)


@needs_deepspeed
def test_qwen2_vl_zero3_partitioned_two_processes_equal_one_batch_of_8(qwen_pair, tmp_path):
    """Every weight partitioned (student with its vision tower, projectors, teacher), the teacher for inference."""
    with open(os.path.join(CONFIGS, "zero3.json")) as f:
        config = json.load(f)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    out = tmp_path / "zero3"
    ranks = _torchrun(tmp_path, _family_recipe(qwen_pair, out, batch_size=4, deepspeed=config),
                      timeout=DEEPSPEED_TIMEOUT)
    _same_qwen_step(qwen_pair, out)
    assert all(0 < r["teacher_weights"]["local"] < 0.6 * r["teacher_weights"]["total"] for r in ranks), ranks
