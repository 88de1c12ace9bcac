"""Synthetic task, tiny tokenizer, tiny presets and the vision-tower pretraining."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llavadi.data.synthetic as syn
from llavadi.data.synthetic import BACKGROUND, CATEGORIES, COLORS, answer_set, make_synthetic, synthetic_paths
from llavadi.models.build import LoadedModel, llava_processor
from llavadi.models.presets import build_preset, get_preset
from llavadi.models.tokenizer import build_tiny_tokenizer

SMALL = dict(n_caption=12, n_instruct=60, n_eval=24, text_only_fraction=0.1)


def answer_for(question: str, objects: list[dict], grid: int) -> str:
    """The reference answer of a generated question, recomputed from the scene by parsing the question."""
    names = {syn.position_name(r, c, grid): (r, c) for r in range(grid) for c in range(grid)}
    at = {(o["row"], o["col"]): o for o in objects}
    q = question.rstrip("?")
    for prefix, key in (("What color is the shape in the ", "color"), ("What shape is in the ", "shape")):
        if q.startswith(prefix):
            return at[names[q[len(prefix):]]][key]
    if q.startswith("Is the shape in the ") and q.endswith(" small or large"):
        return at[names[q[len("Is the shape in the "):-len(" small or large")]]]["size"]
    if q == "How many shapes are there":
        return str(len(objects))
    if q.startswith("Where is the "):
        col, sh = q[len("Where is the "):].split(" ")
        (o,) = [o for o in objects if o["color"] == col and o["shape"] == sh]
        return syn.position_name(o["row"], o["col"], grid)
    if q.startswith("Is there a "):
        words = q[len("Is there a "):].split(" ")
        if len(words) == 2 and words[1] == "shape":
            return "yes" if any(o["color"] == words[0] for o in objects) else "no"
        if len(words) == 1:
            return "yes" if any(o["shape"] == words[0] for o in objects) else "no"
    raise ValueError(f"not a synthetic-task question: {question!r}")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "set", seed=3, **SMALL)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _scene_from_pixels(path: Path, grid: int = 3) -> dict[tuple[int, int], str]:
    """Read each cell's colour name back from the pixel at its centre (independent of the generator)."""
    img = np.asarray(Image.open(path).convert("RGB"))
    cell = img.shape[0] // grid
    by_rgb = {rgb: name for name, rgb in COLORS.items()}
    found = {}
    for r in range(grid):
        for c in range(grid):
            rgb = tuple(int(x) for x in img[r * cell + cell // 2, c * cell + cell // 2])
            if rgb != BACKGROUND:
                found[(r, c)] = by_rgb[rgb]
    return found


def _turns(sample):
    conv = sample["conversations"]
    return [(conv[i]["value"].replace("<image>\n", ""), conv[i + 1]["value"]) for i in range(0, len(conv), 2)]


def test_deterministic_for_a_seed(tmp_path):
    a = make_synthetic(tmp_path / "a", seed=5, **SMALL)
    b = make_synthetic(tmp_path / "b", seed=5, **SMALL)
    c = make_synthetic(tmp_path / "c", seed=6, **SMALL)
    assert _digest(a["root"]) == _digest(b["root"])
    assert _digest(a["root"]) != _digest(c["root"])


def test_formats_and_counts(small_set):
    caps = json.loads(small_set["captions"].read_text())
    inst = json.loads(small_set["instruct"].read_text())
    evals = [json.loads(line) for line in small_set["eval"].read_text().splitlines()]
    assert len(caps) == SMALL["n_caption"] and len(inst) == SMALL["n_instruct"]
    assert len(evals) == SMALL["n_eval"]
    ids = [s["id"] for s in caps + inst] + [e["question_id"] for e in evals]
    assert len(ids) == len(set(ids))
    for s in caps + inst:
        conv = s["conversations"]
        assert len(conv) % 2 == 0 and [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        # <image> only at the start of the first human turn, and only when the sample has an image
        assert conv[0]["value"].startswith("<image>\n") == ("image" in s)
        assert sum(t["value"].count("<image>") for t in conv) == ("image" in s)
        if "image" in s:
            assert (small_set["image_dir"] / s["image"]).is_file()
    assert any(len(s["conversations"]) > 2 for s in inst), "no multi-turn sample"
    assert any("image" not in s for s in inst), "no text-only sample"
    for e in evals:
        assert set(e) == {"question_id", "image", "text", "answer", "category"}
        assert "<image>" not in e["text"] and (small_set["image_dir"] / e["image"]).is_file()
    n_images = len(list(small_set["image_dir"].iterdir()))
    assert n_images == len(caps) + sum("image" in s for s in inst) + len(evals)


def test_every_question_type_and_answers_match_scene_and_pixels(small_set):
    scenes = json.loads(small_set["scenes"].read_text())
    inst = json.loads(small_set["instruct"].read_text())
    evals = [json.loads(line) for line in small_set["eval"].read_text().splitlines()]
    assert {e["category"] for e in evals} == set(CATEGORIES)
    answers = answer_set(3)
    for e in evals:
        assert e["answer"] in answers[e["category"]]
        assert answer_for(e["text"], scenes[e["image"]], 3) == e["answer"]
        cells = _scene_from_pixels(small_set["image_dir"] / e["image"])
        if e["category"] == "count":
            assert e["answer"] == str(len(cells))
        if e["category"] == "exists" and e["text"].endswith(" shape?"):
            colour = e["text"][len("Is there a "):-len(" shape?")]
            assert e["answer"] == ("yes" if colour in cells.values() else "no")
        if e["category"] == "color":
            where = e["text"][len("What color is the shape in the "):-1]
            rc = next((r, c) for r in range(3) for c in range(3) if syn.position_name(r, c, 3) == where)
            assert cells[rc] == e["answer"]
    for s in inst:
        if "image" in s:
            for q, a in _turns(s):
                assert answer_for(q, scenes[s["image"]], 3) == a, s["id"]
    for name, objects in scenes.items():  # the scene record is what was drawn
        drawn = _scene_from_pixels(small_set["image_dir"] / name)
        assert drawn == {(o["row"], o["col"]): o["color"] for o in objects}, name


def test_exists_answers_are_balanced(tmp_path):
    paths = make_synthetic(tmp_path / "s", seed=0, n_caption=0, n_instruct=0, n_eval=600)
    ex = [json.loads(line)["answer"] for line in paths["eval"].read_text().splitlines()
          if json.loads(line)["category"] == "exists"]
    assert 0.35 < ex.count("yes") / len(ex) < 0.65


def test_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "set"
    calls = {"n": 0}
    real_render = syn.render_scene

    def failing_render(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real_render(*a, **k)

    monkeypatch.setattr(syn, "render_scene", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        make_synthetic(out, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the set nor a temp dir is left behind
    monkeypatch.setattr(syn, "render_scene", real_render)
    make_synthetic(out, **SMALL)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic(out, **SMALL)
    before = _digest(out)
    make_synthetic(out, seed=1, overwrite=True, **SMALL)
    assert _digest(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_tokenizer_special_tokens_and_no_unknowns(small_set, tokenizer):
    for tok in ("<s>", "</s>", "<pad>", "<unk>", "<image>"):
        ids = tokenizer(tok, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] == tokenizer.convert_tokens_to_ids(tok)
    assert tokenizer.image_token == "<image>"
    assert tokenizer.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    assert len(tokenizer) < 400
    texts = []
    for part in ("captions", "instruct"):
        for s in json.loads(small_set[part].read_text()):
            texts += [t["value"] for t in s["conversations"]]
    texts += [json.loads(line)["text"] for line in small_set["eval"].read_text().splitlines()]
    texts += ["Zebra crossing, 42% — naïve café 你好 \t tabs", "~`{}|\\^"]
    unk = tokenizer.unk_token_id
    for t in texts:
        assert unk not in tokenizer(t, add_special_tokens=False).input_ids, t
    # task words are single tokens, the same with or without a leading space or after "ASSISTANT:"
    for answers in answer_set(3).values():
        for a in answers:
            alone = tokenizer(a, add_special_tokens=False).input_ids
            assert tokenizer(" " + a, add_special_tokens=False).input_ids == alone
            after = tokenizer("ASSISTANT: " + a, add_special_tokens=False).input_ids
            assert after[-len(alone):] == alone and len(alone) == len(a.split())
            assert tokenizer.decode(alone) == a
    assert tokenizer.decode(tokenizer("Zebra-crossing 42", add_special_tokens=False).input_ids) == \
        "Zebra - crossing 42"


def test_presets_teacher_several_times_student(tokenizer):
    teacher, _, _ = build_preset("tiny-teacher", tokenizer)
    student, _, _ = build_preset("tiny-student", tokenizer)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_t >= 3 * n_s
    for m in (teacher, student):
        assert m.config.image_token_id == tokenizer.image_token_id
        assert m.config.text_config.vocab_size == len(tokenizer)
    with pytest.raises(KeyError, match="tiny-teacher"):
        get_preset("tiny")


def test_processor_round_trip_and_image_tokens(tmp_path, small_set, tokenizer):
    model, _, image_processor = build_preset("tiny-student", tokenizer, seed=0)
    processor = llava_processor(LoadedModel(model, tokenizer, image_processor))
    processor.save_pretrained(tmp_path)
    from transformers import AutoProcessor
    loaded = AutoProcessor.from_pretrained(tmp_path)
    img = Image.open(next(small_set["image_dir"].iterdir())).convert("RGB")
    out = loaded(images=img, text="USER: <image>\nHow many shapes are there? ASSISTANT:", return_tensors="pt")
    n_tokens = (image_processor.crop_size["height"] // 16) ** 2
    assert (out["input_ids"] == tokenizer.image_token_id).sum().item() == n_tokens == 9
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    reference = (torch.tensor(np.asarray(img)).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(out["pixel_values"][0], reference, atol=1e-5)  # no resize/crop surprise
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape == (1, out["input_ids"].shape[1], len(tokenizer))


def test_vision_pretraining_learns_patch_contents(tmp_path, tokenizer):
    from llavadi.train.vision_pretrain import load_patch_dataset, pretrain_vision_tower
    paths = make_synthetic(tmp_path / "v", seed=0, n_caption=300, n_instruct=0, n_eval=0)
    model, _, image_processor = build_preset("tiny-student", tokenizer, seed=0)
    _, labels = load_patch_dataset(paths["root"], image_processor)
    scenes = json.loads(synthetic_paths(paths["root"])["scenes"].read_text())
    first = sorted(scenes)[0]
    drawn = _scene_from_pixels(paths["image_dir"] / first)
    colours = list(COLORS)
    for cell in range(9):  # label 0 = empty, else colour index + 1, as read from the pixels
        rc = divmod(cell, 3)
        assert labels[0, cell, 0].item() == (colours.index(drawn[rc]) + 1 if rc in drawn else 0)
    before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    state, acc = pretrain_vision_tower(model.model.vision_tower, paths["root"], image_processor,
                                       steps=120, lr=3e-3, seed=0, holdout_fraction=0.2)
    # chance of getting colour, shape, size and cell of a patch all right is far below 0.1
    assert acc > 0.6, acc
    assert any(not torch.equal(before[k], state[k]) for k in state)


def test_preset_stages_are_recipe_stages():
    from llavadi.models.presets import PRESETS
    from llavadi.recipe import recipe_from_dict

    for preset in PRESETS.values():
        stages = []
        for name in preset.stages:
            stage = {"name": name, **preset.stage(name)}
            stage["data"] = {**stage["data"], "path": "data.json"}
            stages.append(stage)
        recipe = recipe_from_dict({"student": {"preset": preset.name}, "stages": stages})
        for stage in recipe.stages:
            assert stage.train.args["max_steps"] > 0 and stage.train.args["adam_beta2"] == 0.98
            assert stage.trainable.projector and stage.trainable.llm
        assert recipe.stages[0].name == "pretrain" and recipe.stages[0].data.template == "plain"
    edited = PRESETS["tiny-teacher"].stage("finetune")
    edited["train"]["adam_beta2"] = 0.5  # a copy: the preset itself is unchanged
    assert PRESETS["tiny-teacher"].stage("finetune")["train"]["adam_beta2"] == 0.98
