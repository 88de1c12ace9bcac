"""A student and a teacher with different tokenizers: which terms train (paired answer spans, image tokens), which
are refused by name before any model loads."""

from __future__ import annotations

import pytest
from conftest import make_image_processor, make_tiny_llava, write_images, write_json
from cross_tokenizers import byte_level_bpe, sentencepiece_bpe

from llavadi.config import recipe_from_dict
from llavadi.models.build import LoadedModel, load_llava_dir, save_model
from llavadi.train.runner import run_recipe

ANSWERS = ["a red circle", "There are 3 blue squares.", "yes", "the green one, on the left"]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    student_tok, teacher_tok = sentencepiece_bpe(), byte_level_bpe()
    save_model(LoadedModel(make_tiny_llava(student_tok), student_tok, make_image_processor(32), {}),
               str(root / "student"))
    save_model(LoadedModel(make_tiny_llava(teacher_tok, text_hidden=48, image_size=64, seed=1), teacher_tok,
                           make_image_processor(64), {}), str(root / "teacher"))
    write_images(root / "imgs", 4)
    data = [{"id": f"s{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat is there?"},
                               {"from": "gpt", "value": ANSWERS[i % 4]}]} for i in range(8)]
    write_json(root / "inst.json", data)
    return root


def _recipe(root, out, terms, template="vicuna_v1"):
    stage = {"name": "finetune", "data": {"path": str(root / "inst.json")},
             "train": {"learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                       "save_steps": 100},
             "distill": {"terms": terms}}
    return recipe_from_dict({"student": {"path": str(root / "student")}, "teacher": {"path": str(root / "teacher")},
                             "output_dir": str(out), "device": "cpu", "seed": 0,
                             "data": {"image_folder": str(root / "imgs"), "template": template, "system": ""},
                             "stages": [stage]})


def test_aligned_terms_train_across_tokenizers(pair_dir, tmp_path):
    """uld, gold and hidden_mse read paired answer spans, visual_align the image tokens (other counts: pooled)."""
    terms = [{"name": "uld"}, {"name": "gold", "options": {"top_k": 16}}, {"name": "hidden_mse"},
             {"name": "visual_align", "options": {"source": "projector"}},
             {"name": "affinity", "options": {"rows": "image", "cols": "image"}}]
    from llavadi.train.stage_inputs import build_dataset

    rec = _recipe(pair_dir, tmp_path / "run", terms)
    ds = build_dataset(rec.stages[0], load_llava_dir(str(pair_dir / "student")),
                       load_llava_dir(str(pair_dir / "teacher")))
    assert len(ds) == 8 and all(len(a) > 0 for a in ds.alignments)
    run_recipe(rec, log=lambda *_: None)
    logs = _logs(tmp_path / "run" / "finetune")
    assert len(logs) == 2
    for h in logs:
        assert all(h[f"loss/{name}"] > 0 for name in ("uld", "gold", "hidden_mse", "visual_align", "affinity"))
    assert (tmp_path / "run" / "final" / "config.json").exists()


def _logs(stage_dir):
    from test_train import _history

    return [h for h in _history(stage_dir) if "loss" in h]


@pytest.mark.parametrize("term,match", [
    ({"name": "forward_kl"}, "share one tokenizer"),
    ({"name": "affinity"}, "term 'affinity' compares a image x response matrix"),
    ({"name": "hidden_mse", "tokens": "instruction"}, "term 'hidden_mse' reads 'instruction' tokens"),
])
def test_terms_that_need_one_tokenizer_are_refused_up_front(pair_dir, tmp_path, term, match):
    from llavadi.train.preflight import PreflightError, preflight

    with pytest.raises(PreflightError, match=match):
        preflight(_recipe(pair_dir, tmp_path / "run", [term]), log=lambda *_: None, progress=False)
