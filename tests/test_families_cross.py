"""A teacher and a student of different families and different tokenizers (tiny random models, no download):
a Qwen2-VL teacher with a SmolVLM student, a LLaVA-NeXT teacher with a Qwen2-VL student. Each model renders
the sample with its own chat template and image tokens; uld and gold compare the answer spans the two
tokenizations pair, hidden_mse their states, online, for 2 steps. Logit terms of one vocabulary are refused
by name."""

from __future__ import annotations

import json
import os

import pytest
from conftest import write_json
from family_models import (
    LLAVA_CHAT_TEMPLATE,
    anyres_image_processor,
    anyres_model,
    idefics_image_processor,
    idefics_model,
    idefics_tokenizer,
    qwen_image_processor,
    qwen_model,
    qwen_tokenizer,
)
from PIL import Image
from safetensors.torch import load_file

from llavadi.data.tokenizer_pair import DIFFERENT
from llavadi.models.build import LoadedModel, load_llava_dir, save_model
from llavadi.recipe import recipe_from_dict
from llavadi.train.runner import latest_checkpoint, run_recipe

IMAGES = (("red", (32, 32), (255, 0, 0)), ("green", (64, 32), (0, 255, 0)), ("blue", (32, 48), (0, 0, 255)),
          ("yellow", (48, 48), (255, 255, 0)))
# (teacher, student): model directories written by the fixture
PAIRS = [("qwen2_vl_64", "smolvlm_32"), ("llava_next_64", "qwen2_vl_32")]
QUIET = {"log": lambda *_: None}


def _models():
    """Model directory name -> (model, tokenizer, image processor) builder."""
    qwen, llava = qwen_tokenizer, lambda: qwen_tokenizer("<image>", LLAVA_CHAT_TEMPLATE)
    return {
        "qwen2_vl_64": (lambda t: qwen_model("qwen2_vl", t, 64, 1), qwen, qwen_image_processor),
        "qwen2_vl_32": (lambda t: qwen_model("qwen2_vl", t, 32, 0), qwen, qwen_image_processor),
        "smolvlm_32": (lambda t: idefics_model("smolvlm", t, 32, 0), idefics_tokenizer,
                       lambda: idefics_image_processor("smolvlm")),
        "llava_next_64": (lambda t: anyres_model("llava_next", t, 64, 1), llava,
                          lambda: anyres_image_processor("llava_next")),
        "llava_onevision_32": (lambda t: anyres_model("llava_onevision", t, 32, 0), llava,
                               lambda: anyres_image_processor("llava_onevision")),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The five models, images of four sizes, and LLaVA-format data (one image per sample)."""
    root = tmp_path_factory.mktemp("cross_family")
    for name, (model, tokenizer, processor) in _models().items():
        tok = tokenizer()
        save_model(LoadedModel(model(tok), tok, processor(), {}), str(root / name))
    (root / "imgs").mkdir()
    for name, size, rgb in IMAGES:
        Image.new("RGB", size, rgb).save(root / "imgs" / f"{name}.png")
    data = [{"id": f"s{i}", "image": f"{IMAGES[i % 4][0]}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the square ?"},
                               {"from": "gpt", "value": f"the square is {IMAGES[i % 4][0]}"}]} for i in range(8)]
    write_json(root / "data.json", data)
    return root


def _recipe(root, out, teacher, student, terms, **stage_extra):
    train = {"learning_rate": 0.02, "max_steps": 2, "per_device_train_batch_size": 4, "optim": "sgd",
             "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1, "save_steps": 2}
    return recipe_from_dict({
        "student": {"path": str(root / student)}, "teacher": {"path": str(root / teacher)},
        "output_dir": str(out), "device": "cpu", "seed": 0,
        "data": {"image_folder": str(root / "imgs"), "template": "chat_template"},
        "stages": [{"name": "finetune", "data": {"path": str(root / "data.json")}, "train": train,
                    "distill": {"terms": terms}, **stage_extra}]})


TERMS = [{"name": "uld"}, {"name": "gold", "options": {"top_k": 8}}, {"name": "hidden_mse", "weight": 0.5}]


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_cross_family_pair_trains_with_uld_gold_and_hidden_terms(root, tmp_path, teacher, student):
    from transformers import AutoModelForImageTextToText

    from llavadi.distill.compat import tokenizer_pair
    from llavadi.train.stage_inputs import build_dataset

    s, t = load_llava_dir(str(root / student)), load_llava_dir(str(root / teacher))
    assert tokenizer_pair(s, t).kind == DIFFERENT
    recipe = _recipe(root, tmp_path / "run", teacher, student, TERMS)
    ds = build_dataset(recipe.stages[0], s, t)
    # every sample's answer "the square is <colour>" pairs word by word (4 groups, end-of-turn tokens not paired)
    assert [len(a) for a in ds.alignments] == [4] * 8
    final = run_recipe(recipe, **QUIET)
    with open(os.path.join(latest_checkpoint(str(tmp_path / "run" / "finetune" / "checkpoints")),
                           "trainer_state.json")) as f:
        logs = [h for h in json.load(f)["log_history"] if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        parts = {k: h[f"loss/{k}"] for k in ("ce", "uld", "gold", "hidden_mse")}
        assert all(v > 0 for v in parts.values()), parts
        assert h["loss"] == pytest.approx(parts["ce"] + parts["uld"] + parts["gold"] + 0.5 * parts["hidden_mse"],
                                          rel=1e-3)
    before, after = load_file(root / student / "model.safetensors"), load_file(os.path.join(final, "model.safetensors"))
    assert max(float((before[k] - after[k]).abs().max()) for k in before) > 1e-4
    assert AutoModelForImageTextToText.from_pretrained(final).config.model_type == student.rsplit("_", 1)[0]


@pytest.mark.parametrize("teacher,student", PAIRS)
@pytest.mark.parametrize("term", ["forward_kl", "tvd"])
def test_logit_terms_of_one_vocabulary_are_refused_by_name_before_any_model_loads(root, tmp_path, teacher, student,
                                                                                   term):
    from llavadi.train.preflight import PreflightError, preflight

    recipe = _recipe(root, tmp_path / "run", teacher, student, [{"name": term}, {"name": "hidden_mse"}])
    t_family, s_family = (name.rsplit("_", 1)[0].replace("smolvlm", "idefics3") for name in (teacher, student))
    with pytest.raises(PreflightError, match=rf"before loading any model(.|\n)*logit terms \['{term}'\].*the teacher is a "
                                             rf"{t_family} model and the student a {s_family} model; cross-family "
                                             "pairs take uld or gold"):
        preflight(recipe, log=lambda *_: None, progress=False)


def test_the_family_check_lets_uld_gold_and_state_terms_through():
    """The family check names only the logit terms that compare the two models position by position."""
    from llavadi.distill.terms import TermSpec
    from llavadi.train.stage_inputs import one_vocabulary_logit_terms

    specs = [TermSpec.from_dict(t, "t") for t in [{"name": "forward_kl"}, *TERMS, {"name": "tvd"},
                                                  {"name": "visual_align"}]]
    assert one_vocabulary_logit_terms(specs) == ["forward_kl", "tvd"]


def test_answers_pair_after_images_of_different_token_counts_and_two_adjacent_images(root, tmp_path):
    """The answer tokens are found past each image's run of image tokens whatever its count, also where a
    template writes two images next to each other (LLaVA-OneVision's `<image>` parts, here without a separator):
    the paired student and teacher positions hold the answer's words."""
    from llavadi.train.stage_inputs import build_dataset

    data = [{"id": "two", "image": ["green.png", "yellow.png"],
             "conversations": [{"from": "human", "value": "<image>\n<image>\nhow many ?"},
                               {"from": "gpt", "value": "one two three"}]},
            {"id": "one", "image": "blue.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the square ?"},
                               {"from": "gpt", "value": "the square is blue"}]}]
    write_json(tmp_path / "data.json", data)
    student, teacher = load_llava_dir(str(root / "llava_onevision_32")), load_llava_dir(str(root / "qwen2_vl_64"))
    stage = _recipe(root, tmp_path / "run", "qwen2_vl_64", "llava_onevision_32", TERMS).stages[0]
    stage.data.path = str(tmp_path / "data.json")
    ds = build_dataset(stage, student, teacher)
    image_id = student.model.config.image_token_id
    two = ds.encoded[0][0].input_ids
    start = two.index(image_id)
    assert two[start + 1] == image_id  # the two images' runs are adjacent
    words = []
    for k, (encoded, groups) in enumerate(zip(ds.encoded, ds.alignments)):
        s_ids, t_ids = encoded[0].input_ids, encoded[1].input_ids
        s_words = [student.tokenizer.convert_ids_to_tokens(s_ids[g[0]]) for g in groups.tolist()]
        t_words = [teacher.tokenizer.convert_ids_to_tokens(t_ids[g[2]]) for g in groups.tolist()]
        assert s_words == t_words, k
        words.append(s_words)
    assert words == [["one", "two", "three"], ["the", "square", "is", "blue"]]

