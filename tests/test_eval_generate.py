"""Batched greedy generation, teacher-student agreement and the `llavadi eval` command (tiny random models)."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, plain_greedy_ids, write_images

from llavadi.data.dataset import pixel_values_for
from llavadi.eval import generate as generate_module
from llavadi.eval.agreement import agreement_rate, measure_agreement, teacher_forced_kl
from llavadi.eval.generate import EvalQuestion, encode_question, generate_answer_ids, generate_answers, question_image
from llavadi.models.build import LoadedModel, save_model

MAX_NEW = 8


def _sharpen(model, scale=10.0):
    """Random weights large enough that greedy answers depend on the prompt and image."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def _bundle(model, tok, image_size):
    return LoadedModel(model, tok, make_image_processor(image_size), {"template": "vicuna_v1", "system": ""})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = make_word_tokenizer()
    folder = tmp_path_factory.mktemp("images")
    write_images(str(folder), n=4, size=32)
    # teacher: 32 px / 16 px patches = 4 image tokens
    teacher = _sharpen(make_tiny_llava(tok, seed=0))
    # make eos the greedy choice wherever token "cat" would have been: some answers stop early
    with torch.no_grad():
        w = teacher.lm_head.weight
        w[tok.eos_token_id] = w[tok.convert_tokens_to_ids("cat")] * 1.001
    questions = [
        EvalQuestion("q0", "what color is the circle ?", str(folder / "img0.png")),
        EvalQuestion("q1", "hello world"),  # text-only, in the same batch as image questions
        EvalQuestion("q2", "how many ?", str(folder / "img1.png")),
        EvalQuestion("q3", "how many shape are there in the top left of the picture ?", str(folder / "img2.png")),
        EvalQuestion("q4", "describe the image", str(folder / "img3.png")),
        EvalQuestion("q5", "what is the opposite of left ?"),
        EvalQuestion("q6", "is there a red square ?", str(folder / "img1.png")),
    ]
    return {"tok": tok, "folder": folder, "teacher": _bundle(teacher, tok, 32), "questions": questions}


def reference_greedy(bundle, question, max_new=MAX_NEW):
    """Plain greedy decoding of one question: full forward each step, no cache, no padding."""
    pixels = pixel_values_for(bundle.image_processor, question_image(question))[None] if question.has_image else None
    return plain_greedy_ids(bundle.model, bundle.tokenizer.eos_token_id, encode_question(bundle.encoder(), question),
                            pixels, max_new)


def test_batched_generation_equals_one_at_a_time(setup):
    bundle, questions = setup["teacher"], setup["questions"]
    expected_ids = [reference_greedy(bundle, q) for q in questions]
    got_ids = generate_answer_ids(bundle, questions, batch_size=4, max_new_tokens=MAX_NEW, progress=False)
    assert got_ids == expected_ids
    eos = setup["tok"].eos_token_id
    assert any(a[-1] == eos and len(a) < MAX_NEW for a in expected_ids)  # some stopped at eos
    assert any(eos not in a for a in expected_ids)  # some ran to max_new_tokens
    texts = generate_answers(bundle, questions, batch_size=3, max_new_tokens=MAX_NEW, progress=False)
    tok = setup["tok"]
    assert texts == [tok.decode(a, skip_special_tokens=True).strip() for a in expected_ids]
    assert "</s>" not in " ".join(texts)
    assert len(set(texts)) >= 4  # answers depend on the question: the comparison can fail


def test_left_padding_and_pixel_values_per_batch(setup, monkeypatch):
    bundle, questions = setup["teacher"], setup["questions"]
    calls = []
    original = generate_module.decode

    def spy(model, input_ids, attention_mask, *args, **kwargs):
        calls.append({"input_ids": input_ids, "attention_mask": attention_mask,
                      "pixel_values": kwargs.get("pixel_values")})
        return original(model, input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(generate_module, "decode", spy)
    generate_answer_ids(bundle, questions, batch_size=4, max_new_tokens=2, progress=False)
    lengths = [len(encode_question(bundle.encoder(), q)) for q in questions]
    assert [c["input_ids"].shape[0] for c in calls] == [4, 3]
    assert [c["input_ids"].shape[1] for c in calls] == [max(lengths), sorted(lengths)[-5]]
    n_pixels = 0
    for c in calls:
        mask = c["attention_mask"]
        # left padding: each row's ones are a suffix, the pad token fills the rest
        for row_ids, row_mask in zip(c["input_ids"], mask):
            n = int(row_mask.sum())
            assert row_mask[-n:].all() and not row_mask[:-n].any()
            assert (row_ids[:-n] == setup["tok"].pad_token_id).all()
        n_img_rows = int((c["input_ids"] == bundle.model.config.image_token_id).any(dim=1).sum())
        pix = c["pixel_values"]
        assert (0 if pix is None else pix.shape[0]) == n_img_rows
        n_pixels += n_img_rows
    assert n_pixels == sum(q.has_image for q in questions)


def test_agreement_rate_known_values():
    teacher = ["Red.", "two", "a circle", "yes"]
    student = ["red", "2", "circle", "no"]
    # simple normaliser: case, punctuation and articles go; number words stay words
    assert agreement_rate(teacher, student) == pytest.approx(2 / 4)
    with pytest.raises(ValueError):
        agreement_rate(["a"], [])


def test_model_against_itself_agrees_fully_with_zero_kl(setup):
    bundle, questions = setup["teacher"], setup["questions"]
    result = measure_agreement(bundle, bundle, questions, batch_size=4, max_new_tokens=MAX_NEW, progress=False)
    assert result.agreement == 1.0
    assert abs(result.mean_kl) < 1e-6
    assert result.n_answer_tokens == sum(len(reference_greedy(bundle, q)) for q in questions)


@torch.no_grad()
def _answer_logits(bundle, question, answer):
    """Full-sequence logits of prompt + answer, rows predicting each answer token (plain reference)."""
    ids = encode_question(bundle.encoder(), question)
    kwargs = {}
    if question.has_image:
        kwargs["pixel_values"] = pixel_values_for(bundle.image_processor, question_image(question))[None]
    logits = bundle.model(input_ids=torch.tensor([ids + answer]), **kwargs).logits[0]
    return logits[len(ids) - 1: len(ids) - 1 + len(answer)].double()


def test_kl_matches_plain_reference_with_different_image_token_counts(setup):
    teacher, questions, tok = setup["teacher"], setup["questions"], setup["tok"]
    # student: 64 px / 16 px patches = 16 image tokens, another seed and size
    student = _bundle(_sharpen(make_tiny_llava(tok, text_hidden=48, image_size=64, seed=3), scale=3.0), tok, 64)
    answers = [reference_greedy(teacher, q) for q in questions]
    kls = []
    for q, a in zip(questions, answers):
        log_t = torch.log_softmax(_answer_logits(teacher, q, a), -1)
        log_s = torch.log_softmax(_answer_logits(student, q, a), -1)
        kls.append((log_t.exp() * (log_t - log_s)).sum(-1))
    expected = torch.cat(kls).mean().item()
    mean_kl, n, per_question = teacher_forced_kl(student, teacher, questions, answers, batch_size=3)
    assert n == sum(len(a) for a in answers)
    assert expected > 0.05
    assert mean_kl == pytest.approx(expected, rel=1e-4)
    assert per_question == pytest.approx([k.mean().item() for k in kls], rel=1e-4)

    # a student whose logits are all zero is uniform: KL(p_T || U) = log V - H(p_T)
    uniform = make_tiny_llava(tok, image_size=64, seed=4).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    uniform = _bundle(uniform, tok, 64)
    log_t = torch.cat([torch.log_softmax(_answer_logits(teacher, q, a), -1) for q, a in zip(questions, answers)])
    entropy = -(log_t.exp() * log_t).sum(-1)
    closed_form = (math.log(len(tok)) - entropy).mean().item()
    got, _, _ = teacher_forced_kl(uniform, teacher, questions, answers, batch_size=4)
    assert got == pytest.approx(closed_form, rel=1e-4)

    result = measure_agreement(student, teacher, questions, batch_size=4, max_new_tokens=MAX_NEW, progress=False)
    student_texts = [tok.decode(reference_greedy(student, q), skip_special_tokens=True).strip()
                     for q in questions]
    teacher_texts = [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
    assert result.student_answers == student_texts and result.teacher_answers == teacher_texts
    assert result.agreement == sum(s == t for s, t in zip(student_texts, teacher_texts)) / len(questions)
    assert result.mean_kl == pytest.approx(expected, rel=1e-4)


def _memorise(tok, folder, json_path, qa, seed, steps=60):
    """A tiny model trained (same prompts as eval) until its greedy answers are `qa`'s answers."""
    from llavadi.data.collator import LlavaCollator
    from llavadi.data.dataset import LlavaDataset, View

    json_path.write_text(json.dumps([
        {"id": f"m{i}", "image": image, "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                           {"from": "gpt", "value": a}]}
        for i, (image, q, a) in enumerate(qa)]))
    bundle = _bundle(make_tiny_llava(tok, seed=seed), tok, 32)
    data = LlavaDataset(str(json_path), str(folder), [View(bundle.encoder(max_length=256), bundle.image_processor)])
    batch = LlavaCollator(tok.pad_token_id)([data[i] for i in range(len(data))])
    model = bundle.model.train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    return bundle.model.eval()


def test_eval_command_end_to_end(setup, tmp_path):
    from llavadi.eval import suite

    tok, folder = setup["tok"], setup["folder"]
    rows = [
        {"question_id": "s0", "image": "img0.png", "text": "what color is the circle ?", "answer": "red", "category": "color"},
        {"question_id": "s1", "image": "img1.png", "text": "how many ?", "answer": "2", "category": "count"},
        {"question_id": "s2", "image": "img2.png", "text": "is there a red square ?", "answer": "no", "category": "exists"},
        {"question_id": "s3", "image": "img3.png", "text": "describe the image", "answer": "x", "category": "color"},
    ]
    # student right on s0 and s2; teacher right on s0 and s1; they agree on s0 only
    student_says, teacher_says = ["red", "3", "no"], ["red", "2", "yes"]
    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    for says, seed, path in ((student_says, 5, student_dir), (teacher_says, 6, teacher_dir)):
        qa = [(r["image"], r["text"], a) for r, a in zip(rows, says)]
        model = _memorise(tok, folder, tmp_path / f"{path.name}.json", qa, seed)
        save_model(_bundle(model, tok, 32), str(path))
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"

    parser = argparse.ArgumentParser()
    suite.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", str(student_dir), "--benchmark", "synthetic", "--questions",
                              str(qfile), "--images", str(folder), "--out", str(out), "--teacher", str(teacher_dir),
                              "--batch-size", "2", "--max-new-tokens", "4", "--limit", "3", "--no-progress",
                              "--device", "cpu"])
    assert args.func(args) == 0

    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["s0", "s1", "s2"]  # --limit 3, original order
    assert all(set(a) == {"question_id", "prompt", "text", "model_id"} and a["model_id"] == "student" for a in answers)
    assert answers[0]["prompt"] == rows[0]["text"]
    assert [a["text"] for a in answers] == student_says
    teacher_answers = [json.loads(line) for line in (out / "teacher_answers.jsonl").read_text().splitlines()]
    assert [a["text"] for a in teacher_answers] == teacher_says

    metrics = json.loads((out / "synthetic.json").read_text())
    m = metrics["metrics"]
    assert {"accuracy", "agreement", "teacher_student_kl", "teacher/accuracy"} <= set(m)
    assert metrics["counts"]["questions"] == 3
    assert m["accuracy"] == pytest.approx(200 / 3, abs=1e-3)
    assert m["teacher/accuracy"] == pytest.approx(200 / 3, abs=1e-3)
    assert m["category/color"] == pytest.approx(100.0) and m["category/count"] == pytest.approx(0.0)
    assert m["agreement"] == pytest.approx(100 / 3, abs=1e-3)
    assert m["teacher_student_kl"] > 0
    assert "agreement" in (out / "synthetic.md").read_text()

    # the in-process API gives the same answers
    from llavadi.eval.eval_command import evaluate

    result = evaluate(str(student_dir), "synthetic", str(qfile), str(folder), str(tmp_path / "out2"),
                      batch_size=3, max_new_tokens=4, limit=3, progress=False, device="cpu")
    assert result["metrics"]["accuracy"] == pytest.approx(200 / 3, abs=1e-3)
    again = [json.loads(line)["text"] for line in (tmp_path / "out2" / "answers.jsonl").read_text().splitlines()]
    assert again == student_says


def test_eval_command_reports_missing_image(setup, tmp_path):
    from llavadi.eval.benchmarks import EvalDataError
    from llavadi.eval.eval_command import evaluate

    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": "x7", "image": "nope.png", "text": "how many ?", "answer": "1",
                                 "category": "count"}) + "\n")
    with pytest.raises(EvalDataError, match="x7.*nope.png"):
        evaluate(str(tmp_path / "no-model"), "synthetic", str(qfile), str(setup["folder"]), str(tmp_path / "o"))


def test_base64_image_is_padded_to_square_and_bad_data_is_named():
    import base64
    import io

    from PIL import Image

    from llavadi.data.encode import SampleError

    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(buf, format="PNG")
    q = EvalQuestion("mmb-3", "which ?", image_base64=base64.b64encode(buf.getvalue()).decode())
    img = question_image(q)  # decoded as is; padding to a square happens with the processor (pixel_values_for)
    assert img.size == (20, 10) and img.getpixel((10, 5)) == (200, 10, 10)
    with pytest.raises(SampleError, match="mmb-3"):
        question_image(EvalQuestion("mmb-3", "which ?", image_base64="bm90IGFuIGltYWdl"))


def test_model_meta_defaults_overrides_and_mismatch(tmp_path, setup):
    import copy

    from llavadi.data.templates import LLAVA_SYSTEM
    from llavadi.eval.generate import load_for_eval
    from llavadi.models.meta import read_model_meta, write_model_meta

    teacher = setup["teacher"]
    config = teacher.model.config  # 32 px / 16 px, "default" strategy: 4 tokens
    assert read_model_meta(tmp_path, config) == {}
    # no llavadi.json: a plain HF LLaVA, prompted with LLaVA-1.5's template and system prompt
    plain = LoadedModel(teacher.model, teacher.tokenizer, teacher.image_processor, {})
    assert plain.template == "vicuna_v1" and plain.encoder().template.system == LLAVA_SYSTEM
    full = copy.deepcopy(config)
    full.vision_feature_select_strategy = "full"  # the CLS token is kept: one more token
    write_model_meta(tmp_path, {"template": "plain"}, full)
    assert read_model_meta(tmp_path, full) == {"template": "plain", "n_image_tokens": 5}
    with pytest.raises(ValueError, match="n_image_tokens 5"):
        read_model_meta(tmp_path, config)
    (tmp_path / "llavadi.json").write_text('{"template": "plain",\n "system": }')
    with pytest.raises(ValueError, match=r"llavadi.json:2: malformed JSON"):
        read_model_meta(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["llavadi.json"]  # the atomic write left no temp file

    # eval-time overrides of a saved model's prompting; system "" means none
    save_model(LoadedModel(teacher.model, teacher.tokenizer, teacher.image_processor, {"template": "vicuna_v1",
                                                                                       "system": "be brief"}),
               str(tmp_path / "saved"))
    loaded = load_for_eval(tmp_path / "saved", device="cpu")
    assert loaded.encoder().template.system == "be brief" and loaded.meta["n_image_tokens"] == 4
    assert load_for_eval(tmp_path / "saved", device="cpu", system="").encoder().template.system == ""
    assert load_for_eval(tmp_path / "saved", device="cpu", template="plain").template == "plain"
