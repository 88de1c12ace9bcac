"""A trained student is a drop-in HF LLaVA: transformers alone (AutoProcessor, LlavaForConditionalGeneration,
apply_chat_template) gives the same greedy answers as `llavadi eval`, on square and non-square images."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, write_json
from PIL import Image

from llavadi.eval.eval_command import evaluate
from llavadi.models.build import LoadedModel, save_model
from llavadi.recipe import recipe_from_dict
from llavadi.train.runner import run_recipe

MAX_NEW = 6
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SYSTEM = "hello world ."


def _write_images(folder):
    """Square training images, and non-square ones (wide and tall) only the evaluation sees."""
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(folder / f"{name}.png")
    for name, size in (("wide", (64, 24)), ("tall", (20, 56))):
        img = Image.new("RGB", size, COLOURS["blue"])
        img.paste(Image.new("RGB", (size[0] // 2, size[1]), COLOURS["yellow"]), (0, 0))
        img.save(folder / f"{name}.png")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A student trained 30 steps to name colours, and its `llavadi eval` answers (square, non-square, text-only)."""
    root = tmp_path_factory.mktemp("drop_in")
    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(root / "student0"))
    _write_images(root / "imgs")
    names = list(COLOURS)
    data = [{"id": f"s{i}", "image": f"{names[i % 4]}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the square ?"},
                               {"from": "gpt", "value": names[i % 4]}]} for i in range(24)]
    write_json(root / "data.json", data)
    recipe = recipe_from_dict({
        "student": {"path": str(root / "student0")}, "output_dir": str(root / "run"), "device": "cpu", "seed": 0,
        "data": {"image_folder": str(root / "imgs"), "template": "vicuna_v1", "system": SYSTEM},
        "stages": [{"name": "finetune", "data": {"path": str(root / "data.json")},
                    "train": {"learning_rate": 3e-3, "max_steps": 30, "per_device_train_batch_size": 4,
                              "lr_scheduler_type": "constant", "warmup_steps": 0, "save_steps": 100,
                              "report_to": "none"}}]})
    final = run_recipe(recipe, log=lambda *_: None)
    questions = [{"question_id": f"q-{image}", "image": f"{image}.png", "text": "what color is the square ?",
                  "answer": image, "category": "color"} for image in (*names, "wide", "tall")]
    questions.append({"question_id": "q-text", "text": "hello world", "answer": "hello", "category": "text"})
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    evaluate(final, "synthetic", str(root / "q.jsonl"), str(root / "imgs"), str(root / "eval"), batch_size=3,
             max_new_tokens=MAX_NEW, device="cpu", progress=False)
    answers = {a["question_id"]: a["text"] for a in map(json.loads, (root / "eval" / "answers.jsonl").open())}
    return {"final": final, "root": root, "questions": questions, "answers": answers}


def _messages(question, root):
    if "image" not in question:
        return [{"role": "user", "content": question["text"]}]
    image = Image.open(root / "imgs" / question["image"]).convert("RGB")
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question["text"]}]}]


def test_transformers_alone_answers_as_llavadi_eval(evaluated):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(evaluated["final"])
    model = LlavaForConditionalGeneration.from_pretrained(evaluated["final"]).eval()
    llavadi_says = evaluated["answers"]
    # the student learned the task: its answers depend on the image
    assert {llavadi_says[f"q-{c}"] for c in COLOURS} == set(COLOURS)
    for question in evaluated["questions"]:
        inputs = processor.apply_chat_template(_messages(question, evaluated["root"]), add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        said = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert said == llavadi_says[question["question_id"]], question["question_id"]


def test_non_square_images_reach_the_model_padded(evaluated):
    """What the saved processor gives for a non-square image is llavadi's padded pixels, not a centre crop."""
    from transformers import AutoProcessor

    from llavadi.data.dataset import pixel_values_for
    from llavadi.models.build import load_llava_dir

    processor = AutoProcessor.from_pretrained(evaluated["final"])
    bundle = load_llava_dir(evaluated["final"])
    for name in ("wide", "tall"):
        image = Image.open(evaluated["root"] / "imgs" / f"{name}.png").convert("RGB")
        theirs = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(theirs, pixel_values_for(bundle.image_processor, image), atol=1e-6)
        cropped = make_image_processor(32)(images=image, return_tensors="pt")["pixel_values"][0]
        assert (cropped - theirs).abs().max() > 0.5
