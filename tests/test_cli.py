"""The `llavadi` command end to end: make-data, train, eval, score, report, demo (smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from llavadi.cli import main


def test_make_data_train_eval_score_report(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["make-data", "synthetic", "--out", str(data), "--n-instruct", "40"]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["n_instruct"] == 40

    # a student from a preset, trained two steps with cross-entropy only
    recipe = {"student": {"preset": "tiny-student"}, "output_dir": str(tmp_path / "run"), "device": "cpu",
              "data": {"image_folder": str(data / "images"), "system": "", "max_length": 128},
              "stages": [{"name": "finetune", "data": {"path": str(data / "instruct.json")},
                          "train": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "stages.finetune.train.max_steps=3", "--quiet"]) == 0
    final = tmp_path / "run" / "final"
    state = json.loads(next((tmp_path / "run" / "finetune" / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["global_step"] == 3  # the override took effect

    out = tmp_path / "eval"
    assert main(["eval", "--model", str(final), "--benchmark", "synthetic", "--questions", str(data / "eval_questions.jsonl"),
                 "--images", str(data / "images"), "--out", str(out), "--limit", "12", "--device", "cpu"]) == 0
    answers = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 12 and all("question_id" in a and "text" in a for a in answers)

    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"question_id": a["question_id"], "text": a["text"]}) + "\n" for a in answers))
    capsys.readouterr()
    assert main(["score", "--benchmark", "synthetic", "--predictions", str(preds),
                 "--annotations", str(data / "eval_questions.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert '"accuracy"' in printed
    metrics_files = list(out.glob("*.json"))
    assert metrics_files
    assert main(["report", *map(str, metrics_files), "--out", str(tmp_path / "table.md")]) == 0
    assert "accuracy" in (tmp_path / "table.md").read_text()


def test_train_reports_recipe_mistakes_without_a_traceback(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"student": {"preset": "tiny-student"},
                                                     "stages": [{"name": "ft", "data": {"path": "d.json"}, "lr": 1}]}))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "r.yaml" in err and "unknown key(s) ['lr']" in err and "Traceback" not in err


def test_bad_data_is_reported_with_file_and_sample(tmp_path, capsys):
    (tmp_path / "d.json").write_text(json.dumps([{"id": "a1", "image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]}]))
    recipe = {"student": {"preset": "tiny-student"}, "output_dir": str(tmp_path / "run"), "device": "cpu",
              "stages": [{"name": "ft", "data": {"path": "d.json", "image_folder": "imgs"}, "train": {"max_steps": 1}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "d.json[0] (sample 'a1'): image file not found" in err
    assert not (tmp_path / "run" / "final").exists()


def test_demo_smoke_runs_every_step(tmp_path):
    """The demo's whole pipeline in seconds (tiny data, 3 steps per stage) through the installed command, with the
    third student distilled from the teacher's offline top-k cache."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "llavadi.cli", "demo", "--out", str(tmp_path / "demo"), "--smoke",
                           "--teacher-cache"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the default regime: 5 % of the labels for both students, the teacher's answers to the rest for the distilled ones
    res = json.loads((tmp_path / "demo" / "results-f0.05-ta.json").read_text())
    kinds = ("teacher", "student_sft", "student_distilled", "student_distilled_cache")
    assert set(res["summary"]) >= set(kinds)
    for kind in kinds:
        assert 0.0 <= res["summary"][kind]["accuracy"]["mean"] <= 100.0
    for kind in kinds[1:]:
        assert "agreement" in res["summary"][kind] and res["summary"][kind]["seconds_per_step"]["mean"] > 0
    assert "| student_distilled |" in proc.stdout and "| student_distilled_cache |" in proc.stdout
    settings = res["summary"]["settings"]
    assert settings["student_data_fraction"] == 0.05 and settings["teacher_answers_unlabelled"]
    labelled = json.loads(open(settings["data"]["student_sft"]).read())
    with_answers = json.loads(open(settings["data"]["student_distilled"]).read())
    assert settings["data"]["student_distilled_cache"] == settings["data"]["student_distilled"]
    # (a 3-step teacher answers mostly nothing: those samples are left out, and counted)
    assert with_answers[:len(labelled)] == labelled and "samples left out for an empty answer" in proc.stdout
    assert "share of the SFT-to-teacher gap closed" in proc.stdout and res["summary"]["verdict"]["sft"]
    assert "of the teacher's accuracy at" in res["summary"]["cost"]["sentence"]
    for d in ("teacher/final", "student_sft-f0.05-s0/final", "student_distilled-f0.05-ta-s0/final",
              "student_distilled_cache-f0.05-ta-s0/final"):
        assert (tmp_path / "demo" / d / "model.safetensors").is_file()
    manifest = json.loads((tmp_path / "demo" / "cache" / "teacher-top64-f0.05-ta" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["topk"] == 64 and manifest["hidden_groups"] == ["response", "image"]
    recipe = yaml.safe_load((tmp_path / "demo" / "recipes" / "student_distilled_cache-f0.05-ta-s0.yaml").read_text())
    assert recipe["teacher"]["cache"] == str(tmp_path / "demo" / "cache" / "teacher-top64-f0.05-ta")


def test_demo_student_runs_use_the_student_recipe_and_preset_stages(tmp_path):
    from llavadi import demo
    from llavadi.models.presets import PRESETS
    from llavadi.recipe import recipe_from_dict

    written = yaml.safe_load(demo.STUDENT_RECIPE.read_text())
    (finetune,) = [s for s in written["stages"] if s["name"] == "finetune"]
    paths = {"captions": "caps.json", "image_dir": str(tmp_path / "images")}
    distilled = demo._student_run_recipe(str(tmp_path / "d"), str(tmp_path / "init"), paths, "inst.json", 2,
                                         str(tmp_path / "teacher"), smoke=False)
    sft = demo._student_run_recipe(str(tmp_path / "s"), str(tmp_path / "init"), paths, "inst.json", 2, None,
                                   smoke=False)
    for raw in (distilled, sft):
        recipe = recipe_from_dict(raw)  # a valid recipe
        assert [s.name for s in recipe.stages] == ["pretrain", "finetune"] and recipe.seed == 2
        pre, ft = raw["stages"]
        assert {k: v for k, v in pre.items() if k not in ("name", "data")} == \
            {k: v for k, v in PRESETS["tiny-student"].stages["pretrain"].items() if k != "data"}
        # the instruction-tuning stage is the recipe file's, only its data path and its steps replaced
        assert {k: v for k, v in ft.items() if k not in ("data", "distill", "train")} == \
            {k: v for k, v in finetune.items() if k not in ("data", "distill", "train")}
        assert ft["train"] == {**finetune["train"], "max_steps": demo.STUDENT_FINETUNE_STEPS}
        assert ft["data"]["path"] == "inst.json" and recipe.stages[1].data.image_folder == paths["image_dir"]
    assert distilled["stages"][1]["distill"] == finetune["distill"] and distilled["teacher"]["path"].endswith("teacher")
    cached = demo._student_run_recipe(str(tmp_path / "d"), str(tmp_path / "init"), paths, "inst.json", 2,
                                      str(tmp_path / "teacher"), smoke=False, teacher_cache=str(tmp_path / "cache"))
    assert recipe_from_dict(cached).teacher.cache == str(tmp_path / "cache")
    assert {k: v for k, v in cached.items() if k != "teacher"} == {k: v for k, v in distilled.items() if k != "teacher"}
    assert sft["stages"][1]["distill"]["terms"] == [] and "teacher" not in sft
    assert demo._student_run_recipe("d", "i", paths, "inst.json", 0, None, False, steps=7)["stages"][1]["train"][
        "max_steps"] == 7
    smoke = demo._student_run_recipe("d", "i", paths, "inst.json", 0, None, smoke=True)
    assert all(s["train"]["max_steps"] == 3 and s["train"]["logging_steps"] == 1 for s in smoke["stages"])
    with pytest.raises(KeyError, match="no 'finetune' stage"):
        PRESETS["tiny-student"].stage("finetune")  # the student's instruction tuning lives in the recipe file
