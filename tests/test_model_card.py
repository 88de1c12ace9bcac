"""The model card in final/: HF layout (YAML metadata + markdown), recipe, data hashes, steps, last term values,
and the evaluation results `llavadi eval` adds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, write_images, write_json

from llavadi.eval.eval_command import evaluate
from llavadi.models.build import LoadedModel, save_model
from llavadi.models.model_card import CARD_FILE, read_card_metadata, record_eval_result
from llavadi.recipe import recipe_from_dict
from llavadi.train.runner import latest_checkpoint, run_recipe

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-stage run (caption stage, then distillation) of tiny models, and its eval question file."""
    root = tmp_path_factory.mktemp("card")
    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(root / "student0"))
    save_model(LoadedModel(make_tiny_llava(tok, text_hidden=64, seed=1), tok, make_image_processor(32), {}),
               str(root / "teacher0"))
    write_images(root / "imgs", 4)
    write_json(root / "caps.json", [{"id": f"c{i}", "image": f"img{i % 4}.png", "conversations": [
        {"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": f"a {COLOURS[i % 4]} square"}]}
        for i in range(8)])
    write_json(root / "inst.json", [{"id": f"s{i}", "image": f"img{i % 4}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": COLOURS[i % 4]}]}
        for i in range(12)])
    train = {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 100,
             "report_to": "none"}
    recipe = recipe_from_dict({
        "student": {"path": str(root / "student0")}, "teacher": {"path": str(root / "teacher0")},
        "output_dir": str(root / "run"), "device": "cpu", "seed": 0,
        "data": {"image_folder": str(root / "imgs"), "system": ""},
        "stages": [{"name": "pretrain", "data": {"path": str(root / "caps.json"), "template": "plain"},
                    "trainable": {"projector": True, "llm": False}, "train": {**train, "max_steps": 2}},
                   {"name": "finetune", "data": {"path": str(root / "inst.json")}, "train": {**train, "max_steps": 3},
                    "distill": {"terms": [{"name": "forward_kl", "weight": 0.7, "options": {"temperature": 2.0}},
                                          {"name": "hidden_mse", "weight": 0.5}]}}]})
    final = run_recipe(recipe, log=lambda *_: None)
    questions = root / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "image": f"img{i}.png", "text": "what color ?",
                                             "answer": COLOURS[i], "category": "color"}) + "\n" for i in range(4)))
    return {"root": root, "final": final, "questions": questions}


def _card(final) -> str:
    return (Path(final) / CARD_FILE).read_text(encoding="utf-8")


def test_card_states_models_recipe_data_and_results(run):
    root, text = run["root"], _card(run["final"])
    meta = read_card_metadata(str(root / "run" / "final" / CARD_FILE))
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert "llavadi" in meta["tags"] and meta["model-index"] == [{"name": "run", "results": []}]
    assert str(root / "teacher0") in text and str(root / "student0") in text
    assert "objective: cross-entropy × 1 + `forward_kl` × 0.7 (temperature=2.0) + `hidden_mse` × 0.5\n" in text
    assert "# run\n" in text and "template `vicuna_v1`, no system prompt" in text
    assert "trains: projector, vision tower frozen" in text  # the caption stage
    for name in ("caps.json", "inst.json"):
        data = (root / name).read_bytes()
        assert f"| `{name}` | {len(data)} | `{hashlib.sha256(data).hexdigest()}` |" in text
    # steps and the last logged value of every term, as the trainer logged them
    ckpt = latest_checkpoint(str(root / "run" / "finetune" / "checkpoints"))
    last = [h for h in json.load(open(f"{ckpt}/trainer_state.json"))["log_history"] if "loss" in h][-1]
    line = next(line for line in text.splitlines() if line.startswith("| finetune | 3 |"))
    row = [cell.strip() for cell in line.split("|")]
    for key in ("loss", "loss/ce", "loss/forward_kl", "loss/hidden_mse"):
        assert f"{last[key]:.4g}" in row, key
    assert "Not evaluated yet" in text and "apply_chat_template" in text


def _evaluate(run, out, **kw):
    return evaluate(run["final"], "synthetic", str(run["questions"]), str(run["root"] / "imgs"), str(out),
                    batch_size=4, max_new_tokens=3, device="cpu", progress=False, **kw)


def test_eval_adds_its_results_to_the_card_keyed_by_question_set(run, tmp_path):
    final = run["final"]
    digest = hashlib.sha256(run["questions"].read_bytes()).hexdigest()
    first = _evaluate(run, tmp_path / "e1")
    meta = read_card_metadata(f"{final}/{CARD_FILE}")
    (entry,) = meta["model-index"][0]["results"]
    assert entry["dataset"]["type"] == "synthetic"
    assert entry["dataset"]["args"] == {"questions": "q.jsonl", "count": 4, "sha256": digest}
    assert entry["metrics"] == [{"type": "accuracy", "name": "accuracy", "value": first["metrics"]["accuracy"]}]
    # the card says what was evaluated: the file, how many of its questions, its digest
    assert f"| synthetic | `q.jsonl`, 4 questions, sha256 `{digest[:12]}` | accuracy | {first['metrics']['accuracy']} |" \
        in _card(final)
    assert "Not evaluated yet" not in _card(final)
    # another question set of the same benchmark (its first 2 questions) is a result of its own: both kept
    before = _card(final)
    second = _evaluate(run, tmp_path / "e2", limit=2)
    results = read_card_metadata(f"{final}/{CARD_FILE}")["model-index"][0]["results"]
    assert [(r["dataset"]["args"]["count"], r["metrics"][0]["value"]) for r in results] == [
        (4, first["metrics"]["accuracy"]), (2, second["metrics"]["accuracy"])]
    assert "`q.jsonl`, 2 questions" in _card(final) and "`q.jsonl`, 4 questions" in _card(final)
    # the same set evaluated again replaces its own entry only; the rest of the card is kept
    _evaluate(run, tmp_path / "e3")
    results = read_card_metadata(f"{final}/{CARD_FILE}")["model-index"][0]["results"]
    assert sorted(r["dataset"]["args"]["count"] for r in results) == [2, 4]
    after = _card(final)
    assert before.split("## Evaluation")[0].split("---\n", 2)[2] == after.split("## Evaluation")[0].split("---\n", 2)[2]


def test_a_card_llavadi_did_not_write_is_left_alone(tmp_path):
    (tmp_path / CARD_FILE).write_text("---\nlicense: mit\n---\n# someone's model\n")
    assert record_eval_result(str(tmp_path), {"benchmark": "pope", "metrics": {"f1": 80.0}, "headline": ["f1"]}) is False
    assert (tmp_path / CARD_FILE).read_text() == "---\nlicense: mit\n---\n# someone's model\n"
    assert record_eval_result(str(tmp_path / "nothing"), {"benchmark": "pope", "metrics": {}}) is False
