"""Normalisation is per token over the global batch: accumulation 2x4, one batch of 8, and 2 processes x 4
give the same step (student AND distillation-projector weights), through the real runner and DistillTrainer.

The optimiser is plain SGD: after one step, weight - initial = -lr * grad, so equal weights mean equal
gradients. (AdamW's first step is ~ -lr * sign(grad), blind to how the loss is scaled.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, write_images, write_json
from safetensors.torch import load_file

from llavadi.models.build import LoadedModel, save_model
from llavadi.recipe import recipe_from_dict
from llavadi.train import runner
from llavadi.train import trainer as trainer_module
from llavadi.train.runner import run_recipe

TOLERANCE = 1e-5
LEARNING_RATE = 0.5
# answers of 1..7 and 9 words: with </s> the 8 samples train 45 response tokens. An odd total
# cannot split into two micro-batches of equal counts, so a per-micro-batch mean always differs.
ANSWERS = [
    "red",
    "a circle",
    "a red circle",
    "one blue square there",
    "a green triangle in middle",
    "a red circle and a square",
    "a blue square in the top left",
    "there is a yellow triangle in the bottom right",
]
SAMPLE_IDS = [f"s{i}" for i in range(len(ANSWERS))]
TERMS = [{"name": "forward_kl", "weight": 1.0}, {"name": "hidden_mse", "weight": 0.5}]
WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(root / "student0"))
    save_model(LoadedModel(make_tiny_llava(tok, text_hidden=64, seed=1), tok, make_image_processor(32), {}),
               str(root / "teacher0"))
    write_images(root / "imgs", 4)
    data = [{"id": sid, "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\ndescribe the image"},
                               {"from": "gpt", "value": answer}]}
            for i, (sid, answer) in enumerate(zip(SAMPLE_IDS, ANSWERS))]
    write_json(root / "data.json", data)
    # the same answers, the last four without an image (text-only samples are allowed)
    for sample in data[4:]:
        del sample["image"]
        sample["conversations"][0]["value"] = "describe the image"
    write_json(root / "data_text_only_half.json", data)
    return root


def _recipe_dict(root, out, batch_size, grad_accum, data="data.json", **extra_train_args):
    train = {"learning_rate": LEARNING_RATE, "max_steps": 1, "per_device_train_batch_size": batch_size,
             "gradient_accumulation_steps": grad_accum, "lr_scheduler_type": "constant", "warmup_steps": 0.0,
             "weight_decay": 0.0,
             "max_grad_norm": 1e9,  # no clipping: compare raw gradients
             "logging_steps": 1, "save_steps": 100, "optim": "sgd", **extra_train_args}
    return {"student": {"path": str(root / "student0")}, "teacher": {"path": str(root / "teacher0")},
            "output_dir": str(out), "device": "cpu", "seed": 0,
            "data": {"image_folder": str(root / "imgs"), "template": "vicuna_v1", "system": ""},
            "stages": [{"name": "finetune", "data": {"path": str(root / data)}, "train": train,
                        "distill": {"terms": TERMS}}]}


def _result(out):
    """(student weights, projector weights) a run saved."""
    return (load_file(os.path.join(out, "finetune", "model", "model.safetensors")),
            load_file(os.path.join(out, "finetune", "distill_projectors.safetensors")))


def _train(root, out, batch_size, grad_accum, trainer_class=None, data="data.json", **extra_train_args):
    """One SGD step in this process; returns (student, projectors, sample ids of each micro-batch)."""
    seen = []
    original = trainer_module.DistillTrainer.compute_loss

    def recording_compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.append(list(inputs["sample_ids"]))
        return original(self, model, inputs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module.DistillTrainer, "compute_loss", recording_compute_loss)
        if trainer_class is not None:
            mp.setattr(runner, "DistillTrainer", trainer_class)
        run_recipe(recipe_from_dict(_recipe_dict(root, out, batch_size, grad_accum, data, **extra_train_args)),
                   log=lambda *_: None)
    return (*_result(out), seen)


def _max_difference(a: dict, b: dict) -> tuple[float, str]:
    assert set(a) == set(b)
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)


class PerMicroBatchMean(trainer_module.DistillTrainer):
    """The classic accumulation bug, as a control: each micro-batch's loss is its own per-token mean,
    divided by the number of micro-batches (mean of means instead of the global mean)."""

    loss_is_scaled_for_ga = False  # the Trainer then divides each micro-batch loss by grad_accum

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._normalizers = None  # compute_loss falls back to the micro-batch's own counts
        return batches, num_items


@pytest.fixture(scope="module")
def batch_of_8(workspace):
    """The reference: one process, one batch of 8, one step."""
    return _train(workspace, workspace / "batch8", batch_size=8, grad_accum=1)


def test_accumulation_2x4_equals_one_batch_of_8(workspace, batch_of_8):
    student8, proj8, seen8 = batch_of_8
    student_ga, proj_ga, seen_ga = _train(workspace, workspace / "accum2x4", batch_size=4, grad_accum=2)
    # both runs trained on all 8 samples in their single step; the accumulation run in two halves
    assert [sorted(b) for b in seen8] == [SAMPLE_IDS]
    assert len(seen_ga) == 2 and all(len(b) == 4 for b in seen_ga)
    assert sorted(seen_ga[0] + seen_ga[1]) == SAMPLE_IDS

    initial = load_file(os.path.join(workspace, "student0", "model.safetensors"))
    moved, _ = _max_difference(initial, student8)
    assert moved > 1e-2  # the step did change the student

    diff_student, where_student = _max_difference(student8, student_ga)
    diff_proj, where_proj = _max_difference(proj8, proj_ga)
    assert diff_student <= TOLERANCE, f"student differs by {diff_student:.3g} at {where_student}"
    assert diff_proj <= TOLERANCE, f"projector differs by {diff_proj:.3g} at {where_proj}"

    # control: a per-micro-batch mean, on the same micro-batches, is caught by this tolerance
    student_bad, proj_bad, seen_bad = _train(workspace, workspace / "wrong2x4", batch_size=4, grad_accum=2,
                                             trainer_class=PerMicroBatchMean)
    assert seen_bad == seen_ga
    # measured: 3.4e-3 (student) and 2.2e-4 (projector), against 3e-8 for the global normalisation
    assert _max_difference(student8, student_bad)[0] > 10 * TOLERANCE
    assert _max_difference(proj8, proj_bad)[0] > 10 * TOLERANCE


def _torchrun_unavailable() -> str | None:
    """Why a 2-process gloo run cannot start here, or None."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    try:
        import torch.distributed.run  # noqa: F401  (what torchrun executes)
    except ImportError as e:
        return f"torch.distributed.run cannot be imported: {e}"
    return None


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(tmp_path, recipe: dict, launcher: list[str] = TORCHRUN, timeout: float = 180,
              probe: dict | None = None, steps: int = 1) -> list[dict]:
    """Train `recipe` with 2 gloo processes (one thread each) started by `launcher`; returns each rank's report.

    `probe`: inputs on which each rank records the trained student's logits (see dist_worker.py).
    `steps`: optimisation steps the ranks are expected to train, one micro-batch of 4 each per step.
    """
    reports = tmp_path / "reports"
    reports.mkdir()
    if probe is not None:
        write_json(reports / "probe.json", probe)
    recipe_path = tmp_path / "recipe.json"
    write_json(recipe_path, recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    cmd = [*launcher, WORKER, str(recipe_path), str(reports)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers share the new session
        log, _ = proc.communicate()
        pytest.fail(f"{cmd[2]} did not finish in {timeout:.0f} s; output tail:\n{log[-3000:]}")
    from conftest import only_teardown_abort

    written = [reports / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 or only_teardown_abort(proc.returncode, log, *written), \
        f"{cmd[2]} exited {proc.returncode} after {time.monotonic() - start:.0f} s:\n{log[-3000:]}"
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]  # two real processes, not one silently
    # one micro-batch of 4 per rank and step; together the same 8 samples as the single-process batch
    assert all(len(r["micro_batches"]) == steps and all(len(b) == 4 for b in r["micro_batches"]) for r in ranks)
    for step in range(steps):
        assert sorted(ranks[0]["micro_batches"][step] + ranks[1]["micro_batches"][step]) == SAMPLE_IDS
    return ranks


def _assert_same_step(reference, out):
    student_ref, proj_ref = reference
    student, proj = _result(out)
    diff_student, where_student = _max_difference(student_ref, student)
    diff_proj, where_proj = _max_difference(proj_ref, proj)
    assert diff_student <= TOLERANCE, f"student differs by {diff_student:.3g} at {where_student}"
    assert diff_proj <= TOLERANCE, f"projector differs by {diff_proj:.3g} at {where_proj}"


needs_torchrun = pytest.mark.skipif(_torchrun_unavailable() is not None, reason=str(_torchrun_unavailable()))


def _logged(out) -> dict:
    """The step-1 log line of a run (loss and each term)."""
    with open(os.path.join(out, "finetune", "checkpoints", "checkpoint-1", "trainer_state.json")) as f:
        (line,) = [h for h in json.load(f)["log_history"] if "loss" in h]
    return line


@needs_torchrun
def test_two_processes_x4_equal_one_batch_of_8(workspace, batch_of_8, tmp_path):
    out = tmp_path / "ddp"
    _torchrun(tmp_path, _recipe_dict(workspace, out, batch_size=4, grad_accum=1, ddp_backend="gloo"))
    _assert_same_step(batch_of_8[:2], out)
    # the logged terms are reduced over both processes: they add up to the loss and equal one process's
    two, one = _logged(out), _logged(workspace / "batch8")
    weights = {"loss/ce": 1.0, **{f"loss/{t['name']}": t["weight"] for t in TERMS}}
    assert two["loss"] == pytest.approx(sum(w * two[k] for k, w in weights.items()), rel=1e-4)
    for key in ("loss", *weights):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


@needs_torchrun
def test_two_processes_when_one_rank_has_no_image(workspace, tmp_path):
    # sequential sampling: rank 0 trains s0-s3 (images), rank 1 s4-s7 (text only), so rank 1 never
    # runs the vision tower / projector; its DDP gradient buckets must still match rank 0's
    data, order = "data_text_only_half.json", {"train_sampling_strategy": "sequential"}
    reference = _train(workspace, tmp_path / "batch8", batch_size=8, grad_accum=1, data=data, **order)
    out = tmp_path / "ddp"
    ranks = _torchrun(tmp_path, _recipe_dict(workspace, out, batch_size=4, grad_accum=1, data=data,
                                             ddp_backend="gloo", **order))
    assert sorted(ranks[1]["micro_batches"][0]) == SAMPLE_IDS[4:]  # the text-only half
    _assert_same_step(reference[:2], out)


def test_one_gradient_clip_over_student_and_projectors(workspace, batch_of_8, tmp_path):
    """Student and projectors are one module: max_grad_norm bounds their joint gradient norm.

    With SGD, (initial - final) / lr is the (clipped) gradient. Both parts' unclipped gradients exceed
    the bound, so clipping them separately (two groups) would give a joint norm of sqrt(2) x max_grad_norm.
    """
    clip = 1e-3
    recipe = _recipe_dict(workspace, tmp_path / "clipped", batch_size=8, grad_accum=1)
    recipe["stages"][0]["train"]["max_grad_norm"] = clip
    run_recipe(recipe_from_dict(recipe), log=lambda *_: None)
    student, projectors = _result(tmp_path / "clipped")
    initial = load_file(os.path.join(workspace, "student0", "model.safetensors"))
    initial_projectors = _initial_projectors(workspace, tmp_path)

    def grad_norm(before, after):
        return sum(((before[k].float() - after[k].float()) / LEARNING_RATE).pow(2).sum() for k in after).sqrt().item()

    full_student, full_projectors = batch_of_8[0], batch_of_8[1]  # the same step without clipping
    assert grad_norm(initial, full_student) > 10 * clip and grad_norm(initial_projectors, full_projectors) > 10 * clip
    joint = (grad_norm(initial, student) ** 2 + grad_norm(initial_projectors, projectors) ** 2) ** 0.5
    assert joint == pytest.approx(clip, rel=1e-3)


def _initial_projectors(workspace, tmp_path):
    """The projector weights every run starts from (same seed): a run with a negligible learning rate saves them."""
    recipe = _recipe_dict(workspace, tmp_path / "lr0", batch_size=8, grad_accum=1)
    recipe["stages"][0]["train"]["learning_rate"] = 1e-30
    run_recipe(recipe_from_dict(recipe), log=lambda *_: None)
    return _result(tmp_path / "lr0")[1]
