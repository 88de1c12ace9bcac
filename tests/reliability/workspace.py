"""A tiny two-stage distillation run on disk for the fault suite, and its comparisons.

Student and teacher are tiny random LLaVAs saved as folders; the recipe trains the projector on
captions (3 steps), then distils on instructions (8 steps, checkpoints every 3 steps and at the
end) with a constant learning rate, so one step more or less changes the weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, write_images, write_json
from safetensors.torch import load_file

from llavadi.models.build import LoadedModel, save_model

HERE = Path(__file__).parent
DRIVER = HERE / "fault_driver.py"
COLOURS = ["red", "green", "blue", "yellow"]
PRETRAIN_STEPS, FINETUNE_STEPS, SAVE_STEPS = 3, 8, 3


def make_workspace(root: Path) -> Path:
    """Student, teacher, images, caption and instruction data under `root`."""
    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(root / "student0"))
    save_model(LoadedModel(make_tiny_llava(tok, text_hidden=64, seed=1), tok, make_image_processor(32), {}),
               str(root / "teacher0"))
    write_images(str(root / "imgs"), 4)
    write_json(root / "inst.json", [
        {"id": f"s{i}", "image": f"img{i % 4}.png",
         "conversations": [{"from": "human", "value": "<image>\nwhat color is the square?"},
                           {"from": "gpt", "value": COLOURS[i % 4]}]} for i in range(16)])
    write_json(root / "caps.json", [
        {"id": f"c{i}", "image": f"img{i % 4}.png",
         "conversations": [{"from": "human", "value": "<image>\ndescribe the image"},
                           {"from": "gpt", "value": f"a {COLOURS[i % 4]} square"}]} for i in range(8)])
    return root


def recipe_dict(root: Path, out: Path, finetune_train: dict | None = None, terms: list | None = None) -> dict:
    """The two-stage recipe (pretrain, finetune with forward KL + hidden MSE) writing into `out`."""
    train = {"learning_rate": 3e-3, "per_device_train_batch_size": 4, "logging_steps": 1,
             "lr_scheduler_type": "constant", "warmup_steps": 0.0, "save_steps": SAVE_STEPS}
    return {
        "student": {"path": str(root / "student0")}, "teacher": {"path": str(root / "teacher0")},
        "output_dir": str(out), "device": "cpu", "seed": 0,
        "data": {"image_folder": str(root / "imgs"), "template": "vicuna_v1", "system": ""},
        "stages": [
            {"name": "pretrain", "data": {"path": str(root / "caps.json"), "template": "plain"},
             "trainable": {"projector": True, "llm": False}, "train": {**train, "max_steps": PRETRAIN_STEPS}},
            {"name": "finetune", "data": {"path": str(root / "inst.json")},
             "distill": {"terms": terms if terms is not None else [{"name": "forward_kl"}, {"name": "hidden_mse"}]},
             "train": {**train, "max_steps": FINETUNE_STEPS, **(finetune_train or {})}},
        ],
    }


def one_stage(root: Path, out: Path, train: dict | None = None, data: dict | None = None,
              terms: list | None = None) -> dict:
    """A one-stage recipe (the finetune stage alone, checkpoints every 3 steps), as a dict."""
    raw = recipe_dict(root, out, finetune_train=train, terms=terms)
    raw["stages"] = raw["stages"][1:]
    raw["stages"][0]["data"].update(data or {})
    return raw


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes (its header stays readable)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_recipe(root: Path, out: Path, name: str = "recipe.yaml", **kw) -> Path:
    """The recipe as a YAML file in `root`."""
    path = root / name
    path.write_text(yaml.safe_dump(recipe_dict(root, out, **kw)))
    return path


def subprocess_env() -> dict:
    """One thread, as the test process: runs in both give bit-identical floats."""
    return dict(os.environ, OMP_NUM_THREADS="1", LLAVADI_THREADS="1", PYTHONPATH=f"{HERE.parents[1]}:{HERE.parent}:{HERE}")


def killed(fault: str, at: int, *llavadi_args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `llavadi <args>` in a subprocess that SIGKILLs itself at `fault` (see fault_driver.py)."""
    proc = subprocess.run([sys.executable, str(DRIVER), fault, str(at), *llavadi_args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {fault}:{at} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def tensors(path: Path) -> dict:
    """The tensors of a safetensors file."""
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    """Bit-identical tensors (same names, torch.equal)."""
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"


def report(out: Path, stage: str = "finetune") -> dict:
    """A stage's data_report.json."""
    return json.loads((out / stage / "data_report.json").read_text())


def leftovers(out: Path) -> list[str]:
    """Temporary files or folders anywhere under `out` (what interrupted writes leave)."""
    found = []
    for folder, dirs, files in os.walk(out):
        for name in dirs + files:
            if name.startswith((".tmp-save-", ".publish-staging")) or (name.startswith(".") and name.endswith(".tmp")):
                found.append(os.path.join(folder, name))
    return found
