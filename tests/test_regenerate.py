"""Teacher-regenerated instruction data (`llavadi regenerate`) on a tiny random teacher saved to disk."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, plain_greedy_ids, write_images

import llavadi.eval.generate as generate_module
import llavadi.teacher.regenerate as regen_module
from llavadi.data.dataset import LlavaDataset, View, pixel_values_for, read_json_records
from llavadi.data.encode import SampleError
from llavadi.eval.generate import EvalQuestion, generate_answer_ids, load_for_eval, question_image

MAX_NEW = 6
N_IMAGE_TOKENS = 4  # 32 px images, 16 px patches

SAMPLES = [
    {"id": "s0", "image": "img0.png", "source": "kept-as-is",
     "conversations": [{"from": "human", "value": "<image>\nwhat color is the circle ?"},
                       {"from": "gpt", "value": "red"}]},
    {"id": "s1", "conversations": [{"from": "human", "value": "hello world"}, {"from": "gpt", "value": "hello"}]},
    {"id": "s2", "image": "img1.png",
     "conversations": [{"from": "human", "value": "<image>\nhow many ?"}, {"from": "gpt", "value": "two"},
                       {"from": "human", "value": "what color is the square ?"}, {"from": "gpt", "value": "blue"},
                       {"from": "human", "value": "is there a cat ?"}, {"from": "gpt", "value": "no"}]},
    {"id": "s3", "image": "img2.png",
     "conversations": [{"from": "human", "value": "<image>\ndescribe the image"},
                       {"from": "gpt", "value": "a red square"}]},
    {"id": "s4", "conversations": [{"from": "human", "value": "what is the top ?"}, {"from": "gpt", "value": "one"},
                                   {"from": "human", "value": "and the bottom ?"}, {"from": "gpt", "value": "two"}]},
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("regen")
    tok = make_word_tokenizer()
    images = root / "images"
    write_images(str(images), n=3, size=32)
    teacher = make_tiny_llava(tok, seed=0)
    with torch.no_grad():
        for p in teacher.parameters():  # large random weights: greedy answers depend on prompt and image
            p.mul_(10.0)
        w = teacher.lm_head.weight  # eos wins where "cat" would: some answers stop before max_new_tokens
        w[tok.eos_token_id] = w[tok.convert_tokens_to_ids("cat")] * 1.001
    teacher_dir = root / "teacher"
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    make_image_processor(32).save_pretrained(teacher_dir)
    (teacher_dir / "llavadi.json").write_text(json.dumps({"template": "vicuna_v1", "system": "",
                                                          "n_image_tokens": N_IMAGE_TOKENS}))
    data = root / "instruct.json"
    data.write_text(json.dumps(SAMPLES))
    out = root / "out" / "regen.json"
    stats = regen_module.regenerate(str(teacher_dir), str(data), str(images), str(out), batch_size=2,
                                    max_new_tokens=MAX_NEW, device="cpu", progress=False)
    bundle = load_for_eval(teacher_dir, device="cpu")
    return {"root": root, "tok": tok, "images": images, "teacher_dir": teacher_dir, "data": data, "out": out,
            "stats": stats, "bundle": bundle, "result": json.loads(out.read_text())}


def plain_greedy(bundle, ids, image_path, max_new=MAX_NEW):
    """Greedy decoding from explicit prompt ids: full forward each step, no cache, no padding."""
    pixels = None
    if image_path is not None:
        pixels = pixel_values_for(bundle.image_processor, question_image(EvalQuestion("ref", "", image_path)))[None]
    return plain_greedy_ids(bundle.model, bundle.tokenizer.eos_token_id, ids, pixels, max_new)


def explicit_prompt_ids(tok, turns_text: str) -> list[int]:
    """Vicuna-v1 prompt (empty system) tokenized directly, the image token expanded to N_IMAGE_TOKENS copies."""
    image_id = tok.convert_tokens_to_ids("<image>")
    out = []
    for i in tok(turns_text)["input_ids"]:
        out.extend([i] * N_IMAGE_TOKENS if i == image_id else [i])
    return out


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True).strip()


def test_ids_images_and_human_turns_unchanged(env):
    result = env["result"]
    assert [r["id"] for r in result] == [s["id"] for s in SAMPLES]
    for got, src in zip(result, SAMPLES):
        assert got.get("image") == src.get("image")
        assert [c["from"] for c in got["conversations"]] == [c["from"] for c in src["conversations"]]
        assert got["conversations"][0::2] == src["conversations"][0::2]
        assert got["original_conversations"] == src["conversations"]
        assert {k: v for k, v in got.items() if k not in ("conversations", "original_conversations")} == \
               {k: v for k, v in src.items() if k != "conversations"}
    stats = env["stats"]
    assert stats["samples_in"] == stats["samples_out"] == len(SAMPLES) and stats["skipped"] == []
    assert stats["answers_regenerated"] == sum(len(s["conversations"]) // 2 for s in SAMPLES)
    assert json.loads((env["out"].parent / "regen.json.report.json").read_text()) == stats
    # the output is ordinary training data; a sample with an empty regenerated answer (listed in the
    # stats) is refused by training, or left out and listed under on_error="skip"
    bundle = env["bundle"]
    ds = LlavaDataset(str(env["out"]), str(env["images"]), [View(bundle.encoder(), bundle.image_processor)],
                      on_error="skip")
    empty_ids = {e["id"] for e in stats["empty_answers"]}
    assert [s.sample_id for s in ds.skipped] == [s["id"] for s in SAMPLES if s["id"] in empty_ids]
    assert all("empty gpt turn" in s.reason for s in ds.skipped)
    assert len(ds) == len(SAMPLES) - len(empty_ids)


def test_first_turns_equal_eval_generation_one_at_a_time(env):
    bundle, result, tok = env["bundle"], env["result"], env["tok"]
    firsts = []
    for src, got in zip(SAMPLES, result):
        human = src["conversations"][0]["value"]
        image = str(env["images"] / src["image"]) if "image" in src else None
        question = EvalQuestion(src["id"], human.removeprefix("<image>\n"), image)
        ids = generate_answer_ids(bundle, [question], batch_size=1, max_new_tokens=MAX_NEW, progress=False)[0]
        assert got["conversations"][1]["value"] == _decode(tok, ids), src["id"]
        firsts.append(ids)
    assert len({tuple(a) for a in firsts}) >= 3  # answers depend on the prompt: the comparison can fail


def test_later_turns_are_conditioned_on_the_teachers_own_answers(env):
    bundle, result, tok = env["bundle"], env["result"], env["tok"]
    s2 = result[2]["conversations"]
    a0, a1 = s2[1]["value"], s2[3]["value"]
    image = str(env["images"] / "img1.png")
    second = f"USER: <image>\nhow many ? ASSISTANT: {a0}</s>USER: what color is the square ? ASSISTANT:"
    assert a1 == _decode(tok, plain_greedy(bundle, explicit_prompt_ids(tok, second), image))
    third = second + f" {a1}</s>USER: is there a cat ? ASSISTANT:"
    assert s2[5]["value"] == _decode(tok, plain_greedy(bundle, explicit_prompt_ids(tok, third), image))
    # conditioned on the original answer instead, the second turn would differ: the history matters
    with_original = "USER: <image>\nhow many ? ASSISTANT: two</s>USER: what color is the square ? ASSISTANT:"
    assert a0 != "two"
    assert _decode(tok, plain_greedy(bundle, explicit_prompt_ids(tok, with_original), image)) != a1
    # a text-only multi-turn sample
    s4 = result[4]["conversations"]
    text_second = f"USER: what is the top ? ASSISTANT: {s4[1]['value']}</s>USER: and the bottom ? ASSISTANT:"
    assert s4[3]["value"] == _decode(tok, plain_greedy(bundle, explicit_prompt_ids(tok, text_second), None))


def test_cut_and_empty_answers_are_counted(env, monkeypatch, tmp_path):
    stats, result, tok, bundle = env["stats"], env["result"], env["tok"], env["bundle"]
    # answers that ran to max_new_tokens without eos, recomputed with the plain reference (first turns)
    expected_cut = set()
    for src in SAMPLES:
        image = str(env["images"] / src["image"]) if "image" in src else None
        prompt = f"USER: {src['conversations'][0]['value']} ASSISTANT:"
        ids = plain_greedy(bundle, explicit_prompt_ids(tok, prompt), image)
        if len(ids) == MAX_NEW and ids[-1] != tok.eos_token_id:
            expected_cut.add((src["id"], 1))
    got_cut = {(c["id"], c["conversations_index"]) for c in stats["cut_at_max_new_tokens"]}
    assert {c for c in got_cut if c[1] == 1} == expected_cut
    assert 0 < len(expected_cut) < len(SAMPLES)  # both kinds present: the check can fail
    assert stats["n_empty_answers"] == sum(c["value"] == "" for r in result for c in r["conversations"][1::2])

    # a teacher that answers s1 with eos only: kept with an empty answer, counted and listed
    real = generate_module._generate_batch

    def eos_for_s1(bundle, prompts, questions, *args, **kwargs):
        answers = real(bundle, prompts, questions, *args, **kwargs)
        return [[tok.eos_token_id] if q.question_id == "s1" else a for q, a in zip(questions, answers)]

    monkeypatch.setattr(generate_module, "_generate_batch", eos_for_s1)
    out = tmp_path / "empty.jsonl"
    stats2 = regen_module.regenerate(str(env["teacher_dir"]), str(env["data"]), str(env["images"]), str(out),
                                     batch_size=4, max_new_tokens=MAX_NEW, device="cpu", progress=False)
    rows = [obj for _, obj in read_json_records(out)]
    assert [r["id"] for r in rows] == [s["id"] for s in SAMPLES]
    assert rows[1]["conversations"][1]["value"] == ""
    assert {"id": "s1", "conversations_index": 1} in stats2["empty_answers"]
    assert stats2["n_empty_answers"] == len(stats2["empty_answers"]) >= 1
    assert [r["conversations"] for r in rows if r["id"] != "s1"] == \
           [r["conversations"] for r in result if r["id"] != "s1"]  # batch size 4 vs 2: same answers


def test_failure_midway_leaves_no_output(env, monkeypatch, tmp_path):
    out = tmp_path / "regen.json"
    out.write_text("previous")
    real = generate_module.generate_answer_ids
    calls = []

    def fail_on_second_turn(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    args = (str(env["teacher_dir"]), str(env["data"]), str(env["images"]), str(out))
    monkeypatch.setattr(generate_module, "generate_answer_ids", fail_on_second_turn)
    with pytest.raises(RuntimeError, match="out of memory"):
        regen_module.regenerate(*args, max_new_tokens=MAX_NEW, device="cpu", progress=False)
    # the output is untouched; the first turn's answers wait in the journal for a rerun
    assert sorted(os.listdir(tmp_path)) == ["regen.json", "regen.json.journal.jsonl"]
    assert out.read_text() == "previous"
    journal = [json.loads(line) for line in (tmp_path / "regen.json.journal.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in journal[1:]) == sorted(f"{s['id']}#0" for s in SAMPLES)

    # a failure while writing (third record) leaves the old file and no temp file either
    monkeypatch.setattr(generate_module, "generate_answer_ids", real)
    real_line = regen_module._record_line
    written = []

    def fail_on_third_record(record):
        written.append(record)
        if len(written) == 3:
            raise OSError("disk full")
        return real_line(record)

    monkeypatch.setattr(regen_module, "_record_line", fail_on_third_record)
    with pytest.raises(OSError, match="disk full"):
        regen_module.regenerate(*args, max_new_tokens=MAX_NEW, device="cpu", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["regen.json", "regen.json.journal.jsonl"]
    assert out.read_text() == "previous"


def _with_bad_samples(env, tmp_path):
    bad_missing = {"id": "bad7", "image": "nope.png",
                   "conversations": [{"from": "human", "value": "<image>\nhow many ?"}, {"from": "gpt", "value": "1"}]}
    bad_order = {"id": "bad8", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "?"}]}
    rows = SAMPLES[:2] + [bad_missing] + SAMPLES[2:] + [bad_order]
    path = tmp_path / "with_bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_sample_raises_naming_file_and_id(env, tmp_path):
    data = _with_bad_samples(env, tmp_path)
    out = tmp_path / "out.json"
    with pytest.raises(SampleError, match=r"with_bad\.jsonl:3.*bad7.*nope\.png"):
        regen_module.regenerate(str(env["teacher_dir"]), str(data), str(env["images"]), str(out),
                                max_new_tokens=MAX_NEW, device="cpu", progress=False)
    assert not out.exists()


def test_skip_mode_lists_bad_samples(env, tmp_path):
    data = _with_bad_samples(env, tmp_path)
    out = tmp_path / "out.json"
    stats = regen_module.regenerate(str(env["teacher_dir"]), str(data), str(env["images"]), str(out),
                                    batch_size=3, max_new_tokens=MAX_NEW, device="cpu", on_error="skip",
                                    keep_original=False, progress=False)
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == [s["id"] for s in SAMPLES]
    assert [r["conversations"] for r in rows] == [r["conversations"] for r in env["result"]]
    assert all("original_conversations" not in r for r in rows)
    assert stats["samples_in"] == len(SAMPLES) + 2 and stats["n_skipped"] == 2
    skipped = {s["id"]: s for s in stats["skipped"]}
    assert set(skipped) == {"bad7", "bad8"}
    assert "image file not found" in skipped["bad7"]["reason"] and skipped["bad7"]["where"].endswith(":3")
    assert "should be a human turn" in skipped["bad8"]["reason"]
    report = json.loads((tmp_path / "out.json.report.json").read_text())
    assert report["skipped"] == stats["skipped"]


def test_cli_subcommand(env, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    regen_module.register(parser.add_subparsers())
    out = tmp_path / "cli.jsonl"
    args = parser.parse_args(["regenerate", "--teacher", str(env["teacher_dir"]), "--data", str(env["data"]),
                              "--images", str(env["images"]), "--out", str(out), "--batch-size", "5",
                              "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--no-keep-original",
                              "--no-progress"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples_out"] == len(SAMPLES) and printed["out"] == str(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # .jsonl out: one record per line
    assert [r["conversations"] for r in rows] == [r["conversations"] for r in env["result"]]
    assert all("original_conversations" not in r for r in rows)
    bad = parser.parse_args(["regenerate", "--teacher", str(env["teacher_dir"]), "--data",
                             str(_with_bad_samples(env, tmp_path)), "--images", str(env["images"]), "--out",
                             str(tmp_path / "x.json"), "--device", "cpu", "--no-progress"])
    assert bad.func(bad) == 2
    assert "bad7" in capsys.readouterr().err
