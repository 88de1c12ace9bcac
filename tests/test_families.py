"""Model families beyond LLaVA-1.5 (tiny random models of seven families, no download). Per family: a same-family
pair of two widths distils with logit, hidden-state, visual-token and relation terms on images of different sizes
(so different image-token counts) and a two-image sample where the family allows it; the attention term equals a
computation from transformers' own maps; the saved student loads in plain transformers and answers as
`llavadi eval` does; the offline teacher cache serves the online teacher's signal; a killed run resumes to the
weights of an uninterrupted one; on-policy, regeneration and LoRA students work. Cross-family pairs:
tests/test_families_cross.py; DDP and DeepSpeed of a family: tests/test_scale_out.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import CrashAt, write_json
from family_models import (
    LLAVA_CHAT_TEMPLATE,
    anyres_image_processor,
    anyres_model,
    gemma_image_processor,
    gemma_model,
    gemma_tokenizer,
    idefics_image_processor,
    idefics_model,
    idefics_tokenizer,
    qwen_image_processor,
    qwen_model,
    qwen_tokenizer,
)
from PIL import Image
from safetensors.torch import load_file

from llavadi.data.collator import IMAGE_INPUT_KEYS, LlavaCollator
from llavadi.data.templates import Turn
from llavadi.distill.hidden import pool_image_grid
from llavadi.distill.selection import Predictions
from llavadi.distill.view import Needs
from llavadi.eval.benchmarks import get_benchmark
from llavadi.eval.eval_command import evaluate
from llavadi.eval.generate import eos_token_ids, from_benchmark_questions, generate_answer_ids, load_for_eval
from llavadi.models.build import LoadedModel, load_llava_dir, save_model
from llavadi.models.families import FAMILIES
from llavadi.recipe import recipe_from_dict
from llavadi.teacher.cache import CachedTeacher, open_cache, sample_images
from llavadi.teacher.cache_teacher import cache_teacher
from llavadi.train.runner import run_recipe
from llavadi.train.stage_inputs import build_dataset


def _anyres(model_type):
    return {"tokenizer": lambda: qwen_tokenizer("<image>", LLAVA_CHAT_TEMPLATE),
            "processor": lambda: anyres_image_processor(model_type),
            "model": lambda tok, hidden, seed: anyres_model(model_type, tok, hidden, seed),
            "projector": "multi_modal_projector.", "vision": "vision_tower.", "eos": "<|im_end|>"}


def _qwen(model_type):
    return {"tokenizer": qwen_tokenizer, "processor": qwen_image_processor,
            "model": lambda tok, hidden, seed: qwen_model(model_type, tok, hidden, seed),
            "projector": "visual.merger.", "vision": "visual.blocks.", "eos": "<|im_end|>"}


def _idefics(model_type):
    return {"tokenizer": idefics_tokenizer, "processor": lambda: idefics_image_processor(model_type),
            "model": lambda tok, hidden, seed: idefics_model(model_type, tok, hidden, seed),
            "projector": "connector.", "vision": "vision_model.", "eos": "<|im_end|>"}


GEMMA = {"tokenizer": gemma_tokenizer, "processor": gemma_image_processor,
         "model": lambda tok, hidden, seed: gemma_model(tok, hidden, seed),
         "projector": "multi_modal_projector.", "vision": "vision_tower.", "eos": "<end_of_turn>"}


SPECS = {"qwen2_vl": _qwen("qwen2_vl"), "qwen2_5_vl": _qwen("qwen2_5_vl"), "llava_next": _anyres("llava_next"),
         "llava_onevision": _anyres("llava_onevision"), "gemma3": GEMMA, "idefics3": _idefics("idefics3"),
         "smolvlm": _idefics("smolvlm")}
FAMILY_TYPES = tuple(SPECS)
# (name, size, colour): Qwen2-VL gives them 4, 8, 6 and 9 image tokens (8 px patches, 2x2 merge); the tiled
# families 1, 2 or 4 tiles of 28 px
IMAGES = (("red", (32, 32), (255, 0, 0)), ("green", (64, 32), (0, 255, 0)), ("blue", (32, 48), (0, 0, 255)),
          ("yellow", (48, 48), (255, 255, 0)))
TERMS = [{"name": "forward_kl"}, {"name": "hidden_mse", "weight": 0.5}, {"name": "visual_align", "weight": 0.5}]
# the 2-step run of every family: TERMS and the relation terms (attention maps need eager attention)
RELATION_TERMS = [{"name": "attention", "weight": 0.5}, {"name": "affinity", "weight": 0.5},
                  {"name": "visual_self_corr", "weight": 0.5}, {"name": "tvd", "weight": 0.5}]
MAX_NEW = 4
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module", params=FAMILY_TYPES)
def ws(request, tmp_path_factory):
    """A student (text width 32) and a teacher (width 64) of one family, images of four sizes, LLaVA-format data."""
    model_type = request.param
    spec = SPECS[model_type]
    root = tmp_path_factory.mktemp(model_type)
    tok, processor = spec["tokenizer"](), spec["processor"]()
    save_model(LoadedModel(spec["model"](tok, 32, 0), tok, processor, {}), str(root / "student0"))
    save_model(LoadedModel(spec["model"](tok, 64, 1), tok, processor, {}), str(root / "teacher0"))
    (root / "imgs").mkdir()
    for name, size, rgb in IMAGES:
        Image.new("RGB", size, rgb).save(root / "imgs" / f"{name}.png")
    data = [{"id": f"s{i}", "image": f"{IMAGES[i % 4][0]}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the square ?"},
                               {"from": "gpt", "value": f"the square is {IMAGES[i % 4][0]}"}]} for i in range(7)]
    if FAMILIES[model_type].multi_image:
        data.append({"id": "two", "image": ["red.png", "green.png"],
                     "conversations": [{"from": "human", "value": "<image>\n<image>\nhow many ?"},
                                       {"from": "gpt", "value": "two"}]})
    else:
        data.append(dict(data[0], id="s7"))
    write_json(root / "data.json", data)
    return {"root": root, "model_type": model_type, "spec": spec}


def _raw(ws, out, teacher=None, terms=TERMS, steps=2, **train_extra):
    root = ws["root"]
    train = {"learning_rate": 0.02, "max_steps": steps, "per_device_train_batch_size": 4, "optim": "sgd",
             "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1e9, "logging_steps": 1,
             "save_steps": 100, **train_extra}
    raw = {"student": {"path": str(root / "student0")}, "output_dir": str(out), "device": "cpu", "seed": 0,
           "data": {"image_folder": str(root / "imgs"), "template": "chat_template"},
           "stages": [{"name": "finetune", "data": {"path": str(root / "data.json")}, "train": train,
                       "distill": {"terms": terms}}]}
    if terms:
        raw["teacher"] = teacher or {"path": str(root / "teacher0")}
    return raw


def config_of(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _processor_type_ids(model_type, batch):
    """The per-token image flags the family's processor returns beside input_ids (1 at image tokens)."""
    flags = batch["token_types"] == 1
    if model_type.startswith("qwen"):
        return {"mm_token_type_ids": flags.int()}
    return {"token_type_ids": flags.long()} if model_type == "gemma3" else {}


def _weights(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _history(stage_dir):
    from llavadi.train.runner import latest_checkpoint

    with open(os.path.join(latest_checkpoint(os.path.join(stage_dir, "checkpoints")), "trainer_state.json")) as f:
        return json.load(f)["log_history"]


@pytest.fixture(scope="module")
def trained(ws):
    """The pair distilled 2 steps with logit, hidden-state, visual-token and relation terms (a checkpoint at each
    step: the first is where the resumed run of the resume test starts, the last keeps the logs)."""
    out = ws["root"] / "run"
    final = run_recipe(recipe_from_dict(_raw(ws, out, terms=TERMS + RELATION_TERMS, save_steps=1)), **QUIET)
    return {"out": out, "final": final}


def reference_count(model_dir, model_type, image, n_images=1):
    """An image's token count as transformers computes it: Qwen2-VL's processor output grid / merge^2, LlavaNextProcessor's
    expansion, LLaVA-OneVision's processor's counting method (its class needs torchvision to be built)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoProcessor,
        AutoTokenizer,
        LlavaNextProcessor,
        LlavaOnevisionProcessor,
    )

    config, processor = AutoConfig.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    if model_type.startswith("qwen"):
        return int(processor(images=[image], return_tensors="pt")["image_grid_thw"].prod()) // 4
    if model_type == "smolvlm":  # SmolVLMProcessor needs torchvision; its image_seq_len formula
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2 // config.scale_factor ** 2
    if model_type in ("gemma3", "idefics3"):
        full = AutoProcessor.from_pretrained(model_dir)
        text = ("<start_of_image>" if model_type == "gemma3" else "<image>") * n_images
        ids = full(images=[image] * n_images, text=text, return_tensors="pt")["input_ids"]
        return int((ids == config.image_token_id).sum()) // n_images
    side = config.vision_config.image_size // config.vision_config.patch_size
    if model_type == "llava_next":
        full = LlavaNextProcessor(image_processor=processor, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                                  patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        return int((full(images=image, text="<image>", return_tensors="pt")["input_ids"] == config.image_token_id).sum())
    if n_images > 1:
        return side * side + 1  # LlavaOnevisionProcessor: multi-image samples are not tiled
    from types import SimpleNamespace

    this = SimpleNamespace(image_processor=processor, num_image_tokens=side * side,
                           vision_aspect_ratio=config.vision_aspect_ratio)
    this._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(this, *a)
    return LlavaOnevisionProcessor._get_number_of_features(this, image.height, image.width, 28, 28)


def test_the_data_path_gives_each_image_its_own_token_count(ws):
    student = load_llava_dir(str(ws["root"] / "student0"))
    stage = recipe_from_dict(_raw(ws, ws["root"] / "unused")).stages[0]
    ds = build_dataset(stage, student, None)
    counts = [sum(1 for t in e[0].token_types if t == 1) for e in ds.encoded]
    model_dir, model_type = str(ws["root"] / "student0"), ws["model_type"]
    images = [Image.open(p).convert("RGB") for p in (ds.records[i].images[0] for i in range(7))]
    expected = [reference_count(model_dir, model_type, img) for img in images]
    if model_type == "qwen2_vl":  # 32x32 -> 4, 64x32 -> 8, 32x48 -> 6, 48x48 -> 9 (8 px patches, 2x2 merge)
        assert expected[:4] == [4, 8, 6, 9]
    if FAMILIES[model_type].fixed_tokens_per_image(config_of(model_dir)) is None:
        assert len(set(expected)) > 1  # image-dependent counts
    if FAMILIES[model_type].multi_image:
        expected.append(sum(reference_count(model_dir, model_type, img, 2) for img in images[:2]))
    else:
        expected.append(expected[0])
    assert counts == expected
    batch = LlavaCollator(student.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    if model_type.startswith("qwen"):
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=1).sum())
    elif model_type == "gemma3":
        assert batch["pixel_values"].shape[0] == 9  # one row per image
    elif model_type in ("idefics3", "smolvlm"):  # a row of (up to two) images per sample
        assert batch["pixel_values"].shape[:2] == (8, 2) and batch["pixel_attention_mask"].shape[:2] == (8, 2)
    else:
        assert batch["image_sizes"].tolist()[:4] == [[s[1], s[0]] for _, s, _ in IMAGES]
    # labels: the answer and its end-of-turn token only
    tok = student.tokenizer
    answer = [tok.convert_ids_to_tokens(i) for i in batch["labels"][0].tolist() if i != -100]
    assert answer == ["the", "square", "is", "red", ws["spec"]["eos"]]


def test_the_tiny_models_image_features_depend_on_the_image(ws):
    """The fixture's models see their images: two images of one size give different projector features (a
    projector initialised to zeros, as transformers does Gemma 3's, would make every image the same)."""
    student = load_llava_dir(str(ws["root"] / "student0"))
    family, config = FAMILIES[ws["model_type"]], student.model.config
    features = []
    for name in ("red", "yellow"):  # both 32x32 / 48x48 squares: equal token counts in every family but the tiled
        image = Image.new("RGB", (32, 32), dict((n, rgb) for n, _, rgb in IMAGES)[name])
        inputs = family.image_inputs(student.image_processor, [image], False)
        if inputs.get("image_sizes") is not None and inputs["image_sizes"].dim() == 1:
            inputs["image_sizes"] = inputs["image_sizes"][None]
        with torch.no_grad():
            out = student.model.model.get_image_features(**inputs, **family.image_feature_kwargs(config))
        features.append(torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output]))
    assert features[0].shape == features[1].shape
    assert float((features[0] - features[1]).abs().max()) > 1e-3


def test_a_single_image_family_refuses_two_images_by_name(tmp_path):
    from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer

    tok = make_word_tokenizer()
    llava = LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {})
    turns = [Turn("user", "<image>\n<image>\nwhat color"), Turn("assistant", "red")]
    with pytest.raises(ValueError, match=r"sample 'x': 2 images, but a llava model takes one image per sample"):
        llava.encoder().encode("x", turns, 2)


def test_teacher_grid_pools_to_the_student_grid_by_block_means():
    tokens = torch.arange(4 * 6 * 3, dtype=torch.float32).reshape(4 * 6, 3)
    pooled = pool_image_grid(tokens, (4, 6), (2, 3))
    grid = tokens.reshape(4, 6, 3)
    expected = torch.stack([grid[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, 3).mean(0)
                            for r in range(2) for c in range(3)])
    assert torch.allclose(pooled, expected)
    assert pool_image_grid(tokens, (4, 6), (4, 6)) is tokens


def test_same_family_pair_distils_with_logit_hidden_visual_and_relation_terms(ws, trained):
    logs = [h for h in _history(trained["out"] / "finetune") if "loss" in h]
    assert len(logs) == 2
    weighted = [t["name"] for t in TERMS[1:] + RELATION_TERMS]  # weight 0.5 each
    for h in logs:
        parts = {k: h[f"loss/{k}"] for k in ("ce", "forward_kl", *weighted)}
        # random tiny models attend almost uniformly: the attention term is ~1e-7, below the log's 6 decimals
        # (its value is checked against transformers' maps in the attention test)
        assert all(v > 0 and v == v for k, v in parts.items() if k != "attention"), parts
        assert parts["attention"] >= 0
        assert h["loss"] == pytest.approx(parts["ce"] + parts["forward_kl"] + 0.5 * sum(parts[k] for k in weighted),
                                          rel=1e-3)
    assert _max_diff(_weights(ws["root"] / "student0"), _weights(trained["final"])) > 1e-4
    assert os.path.isfile(trained["out"] / "finetune" / "distill_projectors.safetensors")


def _plain_greedy(model_dir, model_type, image, question):
    """What transformers alone answers: LLaVA-NeXT through its saved AutoProcessor; the families whose processor
    needs torchvision through the saved chat template and image processor, the image token repeated as their
    processor repeats it."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    content = [{"type": "text", "text": question}] if image is None else [{"type": "image"},
                                                                           {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if model_type in ("llava_next", "gemma3", "idefics3"):
        processor = AutoProcessor.from_pretrained(model_dir)
        tok = processor.tokenizer
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = dict(processor(text=text, images=None if image is None else [image], return_tensors="pt"))
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = {}
        if image is not None:
            inputs = dict(AutoImageProcessor.from_pretrained(model_dir)(images=[image], return_tensors="pt"))
            marker = tok.convert_ids_to_tokens(model.config.image_token_id)
            expanded = marker * reference_count(model_dir, model_type, image)
            if model_type == "smolvlm":  # SmolVLMProcessor's text for an unsplit image
                expanded = f"<fake_token_around_image><global-img>{expanded}<fake_token_around_image>"
            text = text.replace(marker, expanded)
        inputs.update(tok(text, return_tensors="pt"))
        if image is not None and model_type.startswith("qwen"):  # as Qwen2VLProcessor returns it
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    answer = out[0, ids.shape[1]:]
    return tok.decode(answer, skip_special_tokens=True).strip(), answer.tolist()


def test_saved_student_answers_in_plain_transformers_as_llavadi_eval(ws, trained):
    root = ws["root"]
    questions = [{"question_id": f"q-{name}", "image": f"{name}.png", "text": "what color is the square ?",
                  "answer": name, "category": "color"} for name, _, _ in IMAGES]
    questions.append({"question_id": "q-text", "text": "hello world", "answer": "hello", "category": "text"})
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    evaluate(trained["final"], "synthetic", str(root / "q.jsonl"), str(root / "imgs"), str(root / "eval"),
             batch_size=3, max_new_tokens=MAX_NEW, device="cpu", progress=False)
    llavadi_says = {a["question_id"]: a["text"] for a in map(json.loads, (root / "eval" / "answers.jsonl").open())}
    assert set(llavadi_says) == {q["question_id"] for q in questions}
    # the ids `llavadi eval` decoded (its own generation function), special tokens included
    bundle = load_for_eval(trained["final"], device="cpu", dtype="float32")
    eval_questions = from_benchmark_questions(get_benchmark("synthetic").load_questions(root / "q.jsonl"), root / "imgs")
    llavadi_ids = dict(zip([q.question_id for q in eval_questions],
                           generate_answer_ids(bundle, eval_questions, batch_size=3, max_new_tokens=MAX_NEW,
                                               progress=False)))
    eos = set(eos_token_ids(bundle.model, bundle.tokenizer))
    # the comparison compares generated tokens, not answers that end at once
    assert sum(any(t not in eos for t in ids) for ids in llavadi_ids.values()) >= 3, llavadi_ids
    for q in questions:
        image = Image.open(root / "imgs" / q["image"]).convert("RGB") if "image" in q else None
        said, ids = _plain_greedy(trained["final"], ws["model_type"], image, q["text"])
        assert said == llavadi_says[q["question_id"]], q["question_id"]
        cut = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
        assert ids[:cut] == llavadi_ids[q["question_id"]], q["question_id"]


KL = [{"name": "forward_kl"}]


@pytest.fixture(scope="module")
def teacher_cache(ws):
    """The teacher's whole distribution (k = vocabulary, fp32) at the response predictions, cached offline."""
    out = ws["root"] / "cache"
    stats = cache_teacher(recipe_from_dict(_raw(ws, ws["root"] / "unused", terms=KL)), str(out),
                          top_k=len(ws["spec"]["tokenizer"]()), values="fp32", progress=False, batch_size=3)
    assert stats["entries"] == 8
    return out


def test_offline_cache_round_trip_equals_the_teachers_forward(ws, teacher_cache):
    root = ws["root"]
    stage = recipe_from_dict(_raw(ws, root / "unused", terms=KL)).stages[0]
    student = load_llava_dir(str(root / "student0"))
    ds = build_dataset(stage, student, None)
    batch = LlavaCollator(student.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    teacher = load_llava_dir(str(root / "teacher0")).model.eval()
    images = {k: batch[k] for k in IMAGE_INPUT_KEYS if k in batch}
    images.update(_processor_type_ids(ws["model_type"], batch))
    with torch.no_grad():  # the reference: a plain transformers forward of the teacher
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **images).logits
    reference = F.log_softmax(logits.float(), dim=-1)
    view = CachedTeacher(open_cache(str(teacher_cache)), sample_images(ds), [Predictions("response")]).view(
        batch, Needs())
    rows = Predictions("response").mask(batch["token_types"])
    order = view.topk_ids[rows].argsort(dim=-1)  # k = V: every token, compared in id order
    assert torch.allclose(view.topk_logprobs[rows].gather(-1, order), reference[rows], atol=1e-5)


def test_training_from_the_cache_gives_the_online_weights(ws, teacher_cache, tmp_path):
    root = ws["root"]
    online = run_recipe(recipe_from_dict(_raw(ws, tmp_path / "online", terms=KL, steps=1)), **QUIET)
    cached = run_recipe(recipe_from_dict(_raw(ws, tmp_path / "cached", terms=KL, steps=1,
                                              teacher={"cache": str(teacher_cache)})), **QUIET)
    assert _max_diff(_weights(root / "student0"), _weights(online)) > 1e-4
    assert _max_diff(_weights(online), _weights(cached)) <= 1e-5


def test_killed_run_resumes_to_the_uninterrupted_weights(ws, trained, tmp_path):
    """Killed after step 1's checkpoint (no stage model written), rerun: it resumes at step 2 and ends with the
    student and projectors of the uninterrupted 2-step run (`trained`)."""
    crashed = tmp_path / "crashed"
    raw = _raw(ws, crashed, terms=TERMS + RELATION_TERMS, save_steps=1)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe_from_dict(raw), callbacks=[CrashAt(1)], **QUIET)
    assert not os.path.exists(crashed / "finetune" / "model")
    assert [d for d in os.listdir(crashed / "finetune" / "checkpoints") if d.startswith("checkpoint-")] == ["checkpoint-1"]
    resumed = run_recipe(recipe_from_dict(raw), **QUIET)
    assert _max_diff(_weights(trained["final"]), _weights(resumed)) <= 1e-5
    projectors = "finetune/distill_projectors.safetensors"
    assert _max_diff(load_file(trained["out"] / projectors), load_file(crashed / projectors)) <= 1e-5
    steps = [h["step"] for h in _history(crashed / "finetune") if "loss" in h]
    assert steps == [1, 2]  # step 1 logged before the kill, step 2 after the resume


def test_lora_student_trains_and_saves_a_plain_model_of_its_family(ws, tmp_path):
    pytest.importorskip("peft", reason="LoRA students need peft: pip install 'llavadi[peft]'")
    from transformers import AutoModelForImageTextToText

    raw = _raw(ws, tmp_path / "lora")
    raw["student"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    final = run_recipe(recipe_from_dict(raw), **QUIET)
    weights = _weights(final)
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in weights)
    changed = {k for k, v in _weights(ws["root"] / "student0").items() if not torch.equal(v, weights[k])}
    spec = ws["spec"]
    # Qwen2-VL saves under the checkpoint's key names (model.layers..., visual...)
    assert any("layers." in k and "q_proj" in k and "vision" not in k and "visual" not in k for k in changed)
    assert any(spec["projector"] in k for k in changed)  # the projector, trained whole
    assert not any(spec["vision"] in k for k in changed)  # the vision tower, frozen
    assert AutoModelForImageTextToText.from_pretrained(final).config.model_type == ws["model_type"]


def test_on_policy_stage_samples_answers_with_the_images(ws, tmp_path):
    raw = _raw(ws, tmp_path / "on_policy", steps=1, save_steps=1)
    raw["stages"][0]["on_policy"] = {"fraction": 1.0, "max_new_tokens": 3}
    final = run_recipe(recipe_from_dict(raw), **QUIET)
    (h,) = [h for h in _history(tmp_path / "on_policy" / "finetune") if "loss" in h]
    assert h["on_policy/share"] == 1.0  # every sample of the step answered by the student
    # the sampled answers carry no labels: the teacher's terms are the loss
    assert 1 <= h["on_policy/tokens_per_answer"] <= 3 and h["loss/ce"] == 0.0
    assert h["loss/forward_kl"] > 0 and h["loss/visual_align"] > 0
    assert _max_diff(_weights(ws["root"] / "student0"), _weights(final)) > 1e-4


def test_a_folder_with_the_processor_chat_template_only_is_prompted_with_it(ws, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(ws["root"] / "student0", folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    write_json(folder / "chat_template.json", {"chat_template": template})  # how older hub folders keep it
    assert load_llava_dir(str(folder)).tokenizer.chat_template == template


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "llava_next", "llava_onevision", "gemma3", "smolvlm"])
def test_shipped_family_recipes_are_valid(name):
    from llavadi.recipe import load_recipe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = load_recipe(os.path.join(root, "recipes", "families", f"{name}.yaml"))
    assert recipe.stages[0].data.template == "chat_template"
    assert [t.name for t in recipe.stages[0].distill.terms] == ["forward_kl", "hidden_mse", "visual_align"]


def test_attention_term_equals_a_plain_computation_from_transformers_maps(ws):
    """The attention term on the maps llavadi captures (hooks on the decoder's attention modules, eager) equals a
    computation from the family's own `output_attentions` maps."""
    from llavadi.distill.terms import TermContext, TermSpec, build_term
    from llavadi.distill.view import llava_view, model_inputs

    student = load_llava_dir(str(ws["root"] / "student0"))
    teacher = load_llava_dir(str(ws["root"] / "teacher0"))
    stage = recipe_from_dict(_raw(ws, ws["root"] / "unused")).stages[0]
    ds = build_dataset(stage, student, None)
    batch = LlavaCollator(student.tokenizer.pad_token_id)([ds[i] for i in (0, 1, 2, len(ds) - 1)])
    views, maps = [], []
    for loaded in (student, teacher):
        loaded.model.set_attn_implementation("eager")
        inputs = model_inputs(batch)
        with torch.no_grad():
            views.append(llava_view(loaded.model, inputs, batch["token_types"],
                                    Needs(attention_layers=frozenset({-1}))))
            extra = _processor_type_ids(ws["model_type"], batch)
            maps.append(loaded.model(**inputs, **extra, output_attentions=True).attentions[-1])
    term = build_term(TermSpec.from_dict({"name": "attention"}, "t"), "attention", TermContext(), "t")
    expected = 0.0
    for b in range(4):
        rows = (batch["token_types"][b] == 3).nonzero().squeeze(1)
        cols = (batch["token_types"][b] == 1).nonzero().squeeze(1)
        block = [m[b][:, rows][:, :, cols].float() for m in maps]
        expected += float((block[0] - block[1]).pow(2).mean(0).sum())
    assert float(term(*views)) == pytest.approx(expected, rel=1e-4)
    assert expected > 0


def test_teacher_regenerates_the_answers(ws, tmp_path):
    from llavadi.eval.generate import EvalQuestion, decode_answer
    from llavadi.teacher.regenerate import regenerate

    root = ws["root"]
    out = tmp_path / "regenerated.json"
    stats = regenerate(str(root / "teacher0"), str(root / "data.json"), str(root / "imgs"), str(out), batch_size=3,
                       max_new_tokens=MAX_NEW, on_error="skip", progress=False)
    records = {r["id"]: r for r in json.loads(out.read_text())}
    if FAMILIES[ws["model_type"]].multi_image:  # regeneration takes one image per sample: the two-image one is refused
        assert "two" not in records and [s["id"] for s in stats["skipped"]] == ["two"]
        assert "has 2 images" in stats["skipped"][0]["reason"]
    else:
        assert stats["skipped"] == []
    assert len(records) == 7 + (not FAMILIES[ws["model_type"]].multi_image)
    teacher = load_for_eval(str(root / "teacher0"), device="cpu", dtype="float32")
    questions = [EvalQuestion(f"s{i}", "what color is the square ?", str(root / "imgs" / f"{IMAGES[i][0]}.png"))
                 for i in (1, 2)]
    expected = [decode_answer(teacher.tokenizer, ids) for ids in
                generate_answer_ids(teacher, questions, progress=False, max_new_tokens=MAX_NEW)]
    assert [records[q.question_id]["conversations"][1]["value"] for q in questions] == expected
    assert records["s1"]["image"] == "green.png"  # the sample's image and question are kept


def test_cost_report_and_fsdp_wrapping_read_the_family_parts(ws):
    from llavadi.eval.cost import parameter_counts
    from llavadi.train.engines import layer_classes_to_wrap

    model = load_llava_dir(str(ws["root"] / "student0")).model
    counts = parameter_counts(model)
    # LLaVA-NeXT / OneVision: the row-end embedding is trained, and counted, with the projector
    projector = sum(p.numel() for n, p in model.named_parameters() if ws["spec"]["projector"] in n or "image_newline" in n)
    assert counts["projector"] == projector > 0
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision_tower"] + counts["projector"] + counts["language_model"] + counts.get("other", 0) == counts["total"]
    assert len(layer_classes_to_wrap(model)) == 2


def test_registry_is_by_exact_model_type_and_names_the_supported_ones():
    from llavadi.models.families import family_for_type

    assert family_for_type("qwen2_5_vl") is family_for_type("qwen2_vl")  # one adapter, two model types
    for unknown in ("internvl", "qwen2", "llava_next_video", "Qwen2_VL"):  # no substring or case matching
        with pytest.raises(ValueError, match=rf"teacher path x: model_type '{unknown}' is not a family llavadi "
                                             r"supports; supported: gemma3, idefics3, llava, llava_next"):
            family_for_type(unknown, "teacher path x")
