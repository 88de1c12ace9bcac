"""uld, gold and hidden_mse across different tokenizers read from the offline teacher cache (`llavadi cache-teacher`):
the cache holds the teacher's rows of its own rendering and its tokenizer files; the student pairs its answer tokens
with the teacher's as with an online teacher."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from conftest import write_json
from cross_tokenizers import byte_level_bpe, write_pair
from safetensors.torch import load_file

from llavadi.cli import main
from llavadi.recipe import recipe_from_dict
from llavadi.teacher.cache import open_cache
from llavadi.teacher.cache_format import MANIFEST_FILE, CacheError
from llavadi.train.runner import run_recipe

TERMS = [{"name": "uld", "options": {"top_k": 0}}, {"name": "gold", "options": {"top_k": 16}},
         {"name": "hidden_mse"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A SentencePiece-BPE student, a byte-level-BPE teacher (another image size), 8 samples, and a recipe file."""
    root = tmp_path_factory.mktemp("cross_cache")
    data = write_pair(root)
    data[5] = {"id": "s5", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world 12"},
                                             {"from": "human", "value": "and?"}, {"from": "gpt", "value": "two dogs"}]}
    write_json(root / "inst.json", data)
    with open(root / "recipe.yaml", "w") as f:
        yaml.safe_dump(_raw(root, root / "unused"), f)
    return root


def _raw(root, out, cache=None, ce_weight=1.0):
    """One SGD step on the 8 samples (one batch): CE + uld + gold + hidden_mse, the teacher online or from `cache`."""
    train = {"learning_rate": 0.5, "max_steps": 1, "per_device_train_batch_size": 8, "lr_scheduler_type": "constant",
             "warmup_steps": 0, "max_grad_norm": 1e9, "logging_steps": 1, "save_steps": 100, "optim": "sgd"}
    return {"student": {"path": str(root / "student")},
            "teacher": {"cache": str(cache)} if cache else {"path": str(root / "teacher")},
            "output_dir": str(out), "device": "cpu", "seed": 0,
            "data": {"image_folder": str(root / "imgs"), "template": "vicuna_v1", "system": ""},
            "stages": [{"name": "finetune", "data": {"path": str(root / "inst.json")}, "train": train,
                        "distill": {"terms": TERMS, "ce_weight": ce_weight}}]}


@pytest.fixture(scope="module")
def full_cache(pair):
    """`llavadi cache-teacher` through the CLI: every teacher token kept (k = its LM-head rows), fp32, hidden states."""
    out = pair / "cache"
    rows = len(byte_level_bpe())
    assert main(["cache-teacher", str(pair / "recipe.yaml"), "--out", str(out), "--top-k", str(rows), "--hidden",
                 "--values", "fp32", "--batch-size", "3", "--no-progress"]) == 0
    return out


def _step(raw) -> tuple[dict, dict]:
    """(the student's weights after the step, the step's logged losses)."""
    run_recipe(recipe_from_dict(raw), log=lambda *_: None)
    out = raw["output_dir"]
    with open(os.path.join(out, "finetune", "checkpoints", "checkpoint-1", "trainer_state.json")) as f:
        logged = [h for h in json.load(f)["log_history"] if "loss/uld" in h]
    return load_file(os.path.join(out, "finetune", "model", "model.safetensors")), logged[0]


def test_uld_gold_and_hidden_mse_from_a_full_cache_give_the_online_step(pair, full_cache, tmp_path):
    manifest = json.loads((full_cache / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["hidden_width"] == 48
    assert (full_cache / "teacher" / "tokenizer.json").is_file()  # the teacher's files, no weights
    assert not list((full_cache / "teacher").glob("*.safetensors"))
    # no CE: the step is the distillation terms' gradients alone
    online, online_log = _step(_raw(pair, tmp_path / "online", ce_weight=0.0))
    cached, cached_log = _step(_raw(pair, tmp_path / "cached", cache=full_cache, ce_weight=0.0))
    initial = load_file(str(pair / "student" / "model.safetensors"))
    moved = max((online[k] - initial[k]).abs().max().item() for k in online)
    assert moved > 1e-3  # the terms moved the student
    for name in ("uld", "gold", "hidden_mse"):
        assert online_log[f"loss/{name}"] > 0
        assert cached_log[f"loss/{name}"] == pytest.approx(online_log[f"loss/{name}"], rel=1e-5, abs=1e-7)
    # measured: a move of 5.7e-2, the cached step 3.7e-9 from the online one
    assert max((online[k] - cached[k]).abs().max().item() for k in online) <= 1e-6


def test_a_small_top_k_cache_trains_and_the_check_passes(pair, tmp_path, capsys):
    out = tmp_path / "cache8"
    assert main(["cache-teacher", str(pair / "recipe.yaml"), "--out", str(out), "--top-k", "8", "--hidden",
                 "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 8 and stats["computed"] == 8
    raw = _raw(pair, tmp_path / "run", cache=out)
    recipe = tmp_path / "cached.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--check", "--quiet"]) == 0
    _, logged = _step(raw)
    assert all(torch.isfinite(torch.tensor(logged[f"loss/{n}"])) and logged[f"loss/{n}"] > 0
               for n in ("uld", "gold", "hidden_mse"))
    # a rerun keeps every entry (nothing changed)
    capsys.readouterr()
    assert main(["cache-teacher", str(pair / "recipe.yaml"), "--out", str(out), "--top-k", "8", "--hidden",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 0


def test_an_old_format_or_a_cache_without_the_teacher_files_is_refused_saying_how_to_rewrite(pair, full_cache,
                                                                                               tmp_path):
    old = tmp_path / "old"
    shutil.copytree(full_cache, old)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    (old / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(CacheError, match=r"format version 1, this llavadi reads 2 \(version 2 adds the teacher's "
                                         r"tokenizer(.|\n)*run the `llavadi cache-teacher` command that wrote it"):
        open_cache(str(old))
    bare = tmp_path / "bare"
    shutil.copytree(full_cache, bare)
    shutil.rmtree(bare / "teacher")
    with pytest.raises(ValueError, match=r"teacher cache .*bare: the teacher cache's teacher files .*rewrite the cache"):
        run_recipe(recipe_from_dict(_raw(pair, tmp_path / "run", cache=bare)), log=lambda *_: None)
