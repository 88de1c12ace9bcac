"""A study end to end on the tiny presets: two cells in parallel, resume, the combined report, its HTML and PNGs."""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from html.parser import HTMLParser

import pytest
import yaml

from llavadi.cli import main
from llavadi.experiments import ablate, study_report


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A two-cell, one-seed study (CE vs CE + forward KL) of the tiny-student preset, run with --jobs 2."""
    from llavadi.data.synthetic import make_synthetic
    from llavadi.models.build import LoadedModel, save_model
    from llavadi.models.presets import build_preset

    root = tmp_path_factory.mktemp("study")
    make_synthetic(root / "data", seed=0, n_caption=8, n_instruct=40, n_eval=12)
    teacher, tok, processor = build_preset("tiny-teacher", seed=1)
    save_model(LoadedModel(teacher, tok, processor, {"template": "vicuna_v1", "system": ""}), str(root / "teacher"))
    recipe = {"student": {"preset": "tiny-student"}, "teacher": {"path": "teacher"}, "device": "cpu",
              "data": {"image_folder": "data/images", "system": "", "max_length": 128},
              "stages": [{"name": "finetune", "data": {"path": "data/instruct.json"},
                          "distill": {"terms": [{"name": "forward_kl"}]},
                          "train": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                                    "save_steps": 100, "warmup_steps": 0}}]}
    (root / "base.yaml").write_text(yaml.safe_dump(recipe))
    grid = {"recipe": "base.yaml", "output_dir": str(root / "out" / "tiny-study"), "seeds": [0], "baseline": "ce",
            "eval": {"benchmark": "synthetic", "questions": "data/eval_questions.jsonl", "images": "data/images",
                     "batch_size": 6, "max_new_tokens": 3, "teacher": True},
            "metrics": ["accuracy", "agreement"],
            "variants": {"ce": ["stages.finetune.distill.terms=[]"], "fkl": []}}
    grid_path = root / "tiny-study.yaml"
    grid_path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return root, str(grid_path), root / "out" / "tiny-study"


@pytest.fixture(scope="module")
def finished(study):
    root, grid_path, out = study
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as mp:
        mp.setattr("os.cpu_count", lambda: 2)  # two cells at once even on a one-core machine
        assert main(["ablate", grid_path, "--jobs", "2"]) == 0
    return printed.getvalue()


def test_a_two_cell_study_runs_end_to_end_in_parallel(study, finished):
    root, grid_path, out = study
    results = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"], r["trained"], r["evaluated"]) for r in results["runs"]] == [
        ("ce", 0, True, True), ("fkl", 0, True, True)]
    # progress: each of the 2 runs started and finished with k of N, elapsed and time left
    assert re.search(r"run [12] of 2, elapsed [\dms]+, time left unknown\] ce/seed0: started", finished)
    assert re.search(r"run [12] of 2, elapsed [\dms]+, ~[\dms]+ left\] \w+/seed0: done in \d+s", finished)
    for variant in ("ce", "fkl"):
        cell = out / variant / "seed0"
        assert (cell / "final" / "model.safetensors").is_file()
        assert "training" in (cell / "ablate_cell.log").read_text()  # the worker's own log
        result = json.loads((cell / "eval" / "synthetic.json").read_text())
        cost, teacher_cost = result["cost"], result["teacher_cost"]
        assert cost["parameters"]["total"] < teacher_cost["parameters"]["total"]  # measured side by side
        assert cost["peak_memory_bytes"] > cost["weight_bytes"] > 0
        assert cost["batch_1"]["batch_size"] == 1 and cost["batch_eval"]["batch_size"] == 6
        assert cost["batch_eval"]["answers"] == 12 and cost["batch_1"]["tokens"] >= cost["batch_1"]["answers"]
    # the CE cell trained without the teacher's term, the KD cell with it (read from the TensorBoard events)
    from llavadi.experiments.curves import loss_curves

    tags = {v: set(loss_curves(str(out / v / "seed0"), ["finetune"])["finetune"]) for v in ("ce", "fkl")}
    assert "train/loss/forward_kl" in tags["fkl"] and "train/loss/forward_kl" not in tags["ce"]


def test_a_finished_study_resumes_as_done(study, finished, monkeypatch, capsys):
    root, grid_path, out = study
    import llavadi.experiments.cells as cells

    def no_launch(*a, **kw):
        raise AssertionError("a finished study started a cell")

    monkeypatch.setattr(cells, "_launch", no_launch)
    before = (out / "fkl" / "seed0" / "final" / "model.safetensors").stat().st_mtime
    assert main(["ablate", grid_path, "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "0 run(s) to do, 2 cached" in printed
    assert (out / "fkl" / "seed0" / "final" / "model.safetensors").stat().st_mtime == before
    results = json.loads((out / "results.json").read_text())
    assert not any(r["trained"] or r["evaluated"] for r in results["runs"])


def test_report_rebuilds_identical_tables_from_the_results(study, finished, tmp_path):
    root, grid_path, out = study
    # --cost-repeats 0: no measuring pass, the cost side from the cells' eval runs (the page is then reproducible)
    assert main(["report", str(out), "--out", str(tmp_path / "report"), "--cost-repeats", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    written = (out / "what_matters.md").read_text()
    loaded = study_report.load_study(str(out))
    assert loaded.table in written  # the table `ablate` wrote, rebuilt from the per-run metrics
    assert ablate.format_table(results["summary"]) == loaded.table
    report_md = (tmp_path / "report" / "report.md").read_text()
    assert loaded.table.rstrip("\n") in report_md
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(r["study"], r["variant"]) for r in numbers["ranking"]] == [("tiny-study", "fkl")]
    # the cost line: accuracy kept and the speed / memory ratios of the same eval run
    cost = numbers["cost"]
    fkl = json.loads((out / "fkl" / "seed0" / "eval" / "synthetic.json").read_text())
    speed = fkl["cost"]["batch_1"]["tokens_per_second"] / fkl["teacher_cost"]["batch_1"]["tokens_per_second"]
    memory = fkl["teacher_cost"]["peak_memory_bytes"] / fkl["cost"]["peak_memory_bytes"]
    assert cost["source"] == "eval_runs" and cost["pass"] is None
    assert cost["ratios"]["speed_batch_1"]["median"] == pytest.approx(speed)
    assert cost["ratios"]["memory"]["median"] == pytest.approx(memory)
    assert f"{memory:.1f}x less memory" in cost["sentence"] and cost["sentence"] in report_md
    # both cells' students have 1 architecture: one cost, the median over the two eval runs
    ms = sorted(json.loads((out / v / "seed0" / "eval" / "synthetic.json").read_text())["cost"]["batch_1"]["ms_per_answer"]
                for v in ("ce", "fkl"))
    student_rows = [r for r in cost["rows"] if r["model"].startswith("student")]
    assert [r["ms_per_answer_batch_1"]["median"] for r in student_rows] == [pytest.approx(sum(ms) / 2)] * 2
    assert student_rows[0]["ms_per_answer_batch_1"]["min"] == ms[0]
    # a second report over the same results gives the same page
    assert main(["report", str(out), "--out", str(tmp_path / "again"), "--cost-repeats", "0"]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == report_md


def test_the_cost_pass_measures_each_architecture_once_in_interleaved_rounds(study, finished, tmp_path,
                                                                             monkeypatch):
    import statistics

    import llavadi.eval.cost as cost_module
    import llavadi.eval.generate as generate_module

    root, grid_path, out = study
    loads, measured = [], []
    real_load, real_measure = generate_module.load_for_eval, cost_module.measure_cost

    def counting_load(model_dir, *a, **kw):
        loads.append(str(model_dir))
        return real_load(model_dir, *a, **kw)

    def counting_measure(bundle, *a, **kw):
        measured.append(bundle.model.config.text_config.num_hidden_layers)
        return real_measure(bundle, *a, **kw)

    monkeypatch.setattr(generate_module, "load_for_eval", counting_load)
    monkeypatch.setattr(cost_module, "measure_cost", counting_measure)
    assert main(["report", str(out), "--out", str(tmp_path), "--cost-repeats", "3"]) == 0
    # two cells, one student architecture and the teacher: two loads, three rounds of two measurements
    assert len(loads) == 2 and str(root / "teacher") in loads
    teacher_layers = real_load(str(root / "teacher")).model.config.text_config.num_hidden_layers
    student_layers = next(n for n in measured if n != teacher_layers)
    assert measured == [teacher_layers, student_layers] * 3  # interleaved: teacher, student, teacher, ...
    cost = json.loads((tmp_path / "report.json").read_text())["cost"]
    assert cost["source"] == "pass" and cost["pass"]["repeats"] == 3
    archs = {a["role"]: a for a in cost["pass"]["architectures"]}
    assert sorted(map(tuple, archs["student"]["cells"])) == [("tiny-study", "ce", 0), ("tiny-study", "fkl", 0)]
    rounds = [r["batch_1"]["ms_per_answer"] for r in archs["student"]["rounds"]]
    student_rows = [r for r in cost["rows"] if r["model"].startswith("student")]
    assert all(r["ms_per_answer_batch_1"] == {"median": statistics.median(rounds), "min": min(rounds),
                                              "max": max(rounds), "n": 3} for r in student_rows)
    teacher_rounds = archs["teacher"]["rounds"]
    speed = statistics.median(s["batch_1"]["tokens_per_second"] / t["batch_1"]["tokens_per_second"]
                              for s, t in zip(archs["student"]["rounds"], teacher_rounds))
    assert cost["ratios"]["speed_batch_1"]["median"] == pytest.approx(speed)
    assert "median of 3 rounds of one measuring pass" in cost["sentence"]


def test_the_cost_pass_exports_the_best_student_and_measures_its_gguf_variants(study, finished, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    root, grid_path, out = study
    assert main(["report", str(out), "--out", str(tmp_path), "--cost-repeats", "2", "--export", "q8_0"]) == 0
    cost = json.loads((tmp_path / "report.json").read_text())["cost"]
    exported = cost["pass"]["exported"]["gguf-q8_0"]
    assert cost["pass"]["exported_from"]["variant"] == "fkl" and len(exported["rounds"]) == 2
    scored = json.loads((tmp_path / "export-gguf" / "eval-q8_0" / "synthetic.json").read_text())
    row = next(r for r in cost["rows"] if r["model"].endswith("GGUF q8_0"))
    assert row["accuracy"] == scored["metrics"]["accuracy"] and "agreement" in scored["metrics"]
    assert row["ms_per_answer_batch_1"]["n"] == 2 and row["peak_memory_mb"] is None
    assert "GGUF q8_0" in (tmp_path / "report.md").read_text()
    assert main(["report", str(out), "--out", str(tmp_path / "r"), "--cost-repeats", "0", "--export", "q8_0"]) == 2
    assert main(["report", str(out), "--out", str(tmp_path / "r"), "--export", "q9"]) == 2


def _check_png(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG whose every chunk's CRC is right and which ends with IEND."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    ihdr = data[16:24]
    return struct.unpack(">II", ihdr)


class _StrictHTML(HTMLParser):
    """Checks that every opened element is closed in order (void elements excepted); collects <img> sources."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_the_html_page_and_pngs_are_valid(study, finished, tmp_path):
    root, grid_path, out = study
    assert main(["report", str(out), "--out", str(tmp_path), "--cost-repeats", "1"]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["cost.png", "tiny-study_bars.png", "tiny-study_curves.png"]
    for name in pngs:
        width, height = _check_png((tmp_path / name).read_bytes())
        assert 100 < width <= 1000 and height > 100  # readable at a docs page's width
    text = (tmp_path / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    parser = _StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        _check_png(base64.b64decode(src.split(",", 1)[1]))
    # the markdown page points at the same PNG files
    md = (tmp_path / "report.md").read_text()
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == pngs


def test_report_errors_name_the_folder(tmp_path, capsys, study, finished):
    root, grid_path, out = study
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "empty: not a study folder" in capsys.readouterr().err
    assert main(["report", str(out)]) == 2
    assert "needs --out" in capsys.readouterr().err


STUDIES = __import__("pathlib").Path(__file__).resolve().parent.parent / "recipes" / "studies"


@pytest.mark.parametrize("path,n_variants,n_seeds", [
    ("strategy.yaml", 5, 3), ("algorithm.yaml", 11, 3), ("data.yaml", 5, 3),
    ("real/strategy.yaml", 4, 1), ("real/algorithm.yaml", 13, 1), ("real/data.yaml", 4, 1)])
def test_every_shipped_study_plans_valid_recipes(path, n_variants, n_seeds):
    grid = ablate.load_grid(str(STUDIES / path))
    runs = ablate.plan_runs(grid)  # every (variant, seed) recipe built and validated
    assert len(grid.variants) == n_variants and len(runs) == n_variants * n_seeds
    assert grid.baseline == next(iter(grid.variants))
    assert grid.eval.teacher is True  # agreement, KL and the teacher's cost next to every student's


def test_the_strategy_study_trains_the_demos_own_student_stages():
    from llavadi.demo import _named_stage, _student_recipe
    from llavadi.models.presets import PRESETS

    base = yaml.safe_load((STUDIES / "strategy_student.yaml").read_text())
    pretrain, finetune = base["stages"]
    assert pretrain["train"] == PRESETS["tiny-student"].stage("pretrain")["train"]
    assert pretrain["trainable"] == PRESETS["tiny-student"].stage("pretrain")["trainable"]
    demo_finetune = _named_stage(_student_recipe(), "finetune")
    assert finetune["train"] == demo_finetune["train"] and finetune["distill"] == demo_finetune["distill"]
    assert base["data"] == _student_recipe()["data"] | {"image_folder": base["data"]["image_folder"]}
    # LLaVA-KD's variant: its two instruction-tuning stages together take the same number of steps
    three = yaml.safe_load((STUDIES / "strategy_dpt_sft_dft.yaml").read_text())
    assert [s["name"] for s in three["stages"]] == ["pretrain", "sft", "dft"]
    assert sum(s["train"]["max_steps"] for s in three["stages"][1:]) == demo_finetune["train"]["max_steps"]
