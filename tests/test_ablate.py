"""`llavadi ablate`: grid validation, the "what matters" table and its Δ column, caching, dry run."""

from __future__ import annotations

import argparse
import json
import os
import statistics

import pytest
import yaml
from conftest import make_image_processor, make_tiny_llava

from llavadi.experiments import ablate
from llavadi.experiments.ablate import GridError, load_grid, run_ablation

VARIANTS = {
    "sft": ["stages.finetune.distill.terms=[]"],
    "fkl": ["stages.finetune.distill.terms=[{name: forward_kl}]"],
    "rkl": ["stages.finetune.distill.terms=[{name: reverse_kl}]"],
}
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny synthetic data, a tiny student and teacher saved as model dirs, a base recipe and a grid."""
    from llavadi.data.synthetic import make_synthetic
    from llavadi.models.build import LoadedModel, save_model
    from llavadi.models.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("ablate")
    make_synthetic(root / "data", seed=0, n_caption=16, n_instruct=48, n_eval=12)
    tok = build_tiny_tokenizer()
    for name, hidden, seed in (("student0", 32, 0), ("teacher0", 64, 1)):
        model = make_tiny_llava(tok, text_hidden=hidden, image_size=48, patch_size=16, seed=seed)
        save_model(LoadedModel(model, tok, make_image_processor(48), {}), str(root / name))
    recipe = {"student": {"path": "student0"}, "teacher": {"path": "teacher0"}, "device": "cpu",
              "data": {"image_folder": "data/images", "system": "", "max_length": 128},
              "stages": [{"name": "finetune", "data": {"path": "data/instruct.json"},
                          "distill": {"terms": [{"name": "forward_kl"}]},
                          "train": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                                    "logging_steps": 1, "save_steps": 100, "warmup_steps": 0.0}}]}
    (root / "base.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _write_grid(root, name="grid.yaml", variants=None, output_dir=None, **extra):
    grid = {"recipe": "base.yaml", "output_dir": str(output_dir or root / "out"), "seeds": SEEDS, "baseline": "sft",
            "eval": {"benchmark": "synthetic", "questions": "data/eval_questions.jsonl", "images": "data/images",
                     "batch_size": 12, "max_new_tokens": 3, "teacher": True},
            "metrics": ["accuracy", "teacher_student_kl"], "variants": variants or VARIANTS, **extra}
    path = root / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


class Counter:
    """Counts calls of the runner's training and the evaluation entry points (and still runs them)."""

    def __init__(self, monkeypatch):
        import llavadi.eval.eval_command as eval_command
        import llavadi.train.runner as runner

        self.trained, self.evaluated = [], []
        real_train, real_eval = runner.run_recipe, eval_command.evaluate

        def train(recipe, *a, **kw):
            self.trained.append(recipe.output_dir)
            return real_train(recipe, *a, **kw)

        def evaluate(model_dir, *a, **kw):
            self.evaluated.append(model_dir)
            return real_eval(model_dir, *a, **kw)

        monkeypatch.setattr(runner, "run_recipe", train)
        monkeypatch.setattr(eval_command, "evaluate", evaluate)


@pytest.fixture(scope="module")
def ablation(workspace):
    """The grid run once (3 variants x 2 seeds, 4 steps each); later tests reuse its outputs."""
    grid = load_grid(_write_grid(workspace))
    summary = run_ablation(grid, log=lambda *_: None)
    results = json.loads((workspace / "out" / "results.json").read_text())
    return grid, summary, results


def _table_rows(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [l for l in markdown.splitlines() if l.startswith("| ")]
    cells = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines]
    return cells[0], cells[1:]


def _close(cell: str, *expected: float) -> bool:
    """A table cell "a ± b" shows `expected` to the decimals it prints."""
    parts = cell.split(" ± ")
    decimals = len(parts[0].split(".")[1])
    assert decimals >= 3
    return len(parts) == len(expected) and all(abs(float(p) - e) <= 0.51 * 10 ** -decimals
                                               for p, e in zip(parts, expected))


def test_table_has_one_row_per_variant_and_the_right_columns(ablation, workspace):
    grid, summary, results = ablation
    assert len(results["runs"]) == len(VARIANTS) * len(SEEDS)
    assert all(r["trained"] and r["evaluated"] for r in results["runs"])
    header, rows = _table_rows(ablate.format_table(summary))
    assert header == ["variant", "seeds", "accuracy", "Δ accuracy", "teacher_student_kl", "Δ teacher_student_kl"]
    assert [r[0] for r in rows] == ["**sft** (baseline)", "fkl", "rkl"]
    assert all(r[1] == "2" for r in rows)
    page = (workspace / "out" / "what_matters.md").read_text()
    assert ablate.format_table(summary) in page and "reverse_kl" in page  # the variants' overrides are listed
    assert (workspace / "out" / "what_matters.png").read_bytes()[:4] == b"\x89PNG"
    for seed in SEEDS:
        assert (workspace / "out" / "fkl" / f"seed{seed}" / "final" / "model.safetensors").is_file()


def test_mean_std_and_baseline_difference_match_the_per_run_metrics(ablation, workspace):
    grid, summary, results = ablation
    metric = "teacher_student_kl"
    per_run = {(r["variant"], r["seed"]): r["metrics"][metric] for r in results["runs"]}
    # the per-run metrics are the eval harness's own result files
    on_disk = json.loads((workspace / "out" / "rkl" / "seed1" / "eval" / "synthetic.json").read_text())
    assert per_run[("rkl", 1)] == on_disk["metrics"][metric]
    assert len(set(per_run.values())) > 1  # the runs really differ: the comparisons below are not 0 - 0

    base_mean = sum(per_run[("sft", s)] for s in SEEDS) / len(SEEDS)
    _, rows = _table_rows(ablate.format_table(summary))
    for row, variant in zip(rows, VARIANTS):
        values = [per_run[(variant, s)] for s in SEEDS]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        stats = summary["variants"][variant]["metrics"][metric]
        assert stats["mean"] == pytest.approx(mean) and stats["std"] == pytest.approx(std)
        assert _close(row[4], mean, std)
        if variant == "sft":
            assert row[5] == "—" and "delta" not in stats
            continue
        delta = mean - base_mean
        diffs = [per_run[(variant, s)] - per_run[("sft", s)] for s in SEEDS]
        assert stats["delta"]["mean"] == pytest.approx(delta)
        assert stats["delta"]["std"] == pytest.approx(statistics.stdev(diffs))
        assert row[5].startswith(("+", "-")) and _close(row[5], delta, statistics.stdev(diffs))
    assert results["summary"]["variants"]["fkl"]["metrics"][metric]["delta"]["mean"] == pytest.approx(
        summary["variants"]["fkl"]["metrics"][metric]["delta"]["mean"])


def test_second_call_reruns_nothing_and_a_lost_eval_is_redone_alone(ablation, workspace, monkeypatch):
    grid, _, _ = ablation
    model_file = workspace / "out" / "sft" / "seed0" / "final" / "model.safetensors"
    result_file = workspace / "out" / "sft" / "seed0" / "eval" / "synthetic.json"
    stamps = (os.path.getmtime(model_file), os.path.getmtime(result_file))
    calls = Counter(monkeypatch)
    summary = run_ablation(load_grid(grid.path), log=lambda *_: None)
    assert calls.trained == [] and calls.evaluated == []
    assert (os.path.getmtime(model_file), os.path.getmtime(result_file)) == stamps
    assert not any(r["trained"] or r["evaluated"] for r in summary["runs"])

    # an ablation interrupted between training and evaluation: only the evaluation is redone
    os.remove(workspace / "out" / "rkl" / "seed0" / "eval" / "synthetic.json")
    summary = run_ablation(load_grid(grid.path), log=lambda *_: None)
    assert calls.trained == []
    assert calls.evaluated == [str(workspace / "out" / "rkl" / "seed0" / "final")]
    assert len(summary["runs"]) == len(VARIANTS) * len(SEEDS)


def test_a_cached_run_trained_with_another_recipe_is_an_error(ablation, workspace, monkeypatch):
    calls = Counter(monkeypatch)
    changed = dict(VARIANTS, fkl=VARIANTS["fkl"] + ["stages.finetune.train.learning_rate=1e-4"])
    grid = load_grid(_write_grid(workspace, "changed.yaml", variants=changed))
    with pytest.raises(GridError, match=r"variant 'fkl' \(seed 0\).*learning_rate"):
        run_ablation(grid, log=lambda *_: None)
    assert calls.trained == [] and calls.evaluated == []


def test_grid_errors_name_the_variant_and_nothing_trains(workspace, monkeypatch):
    calls = Counter(monkeypatch)
    out = workspace / "bad-out"
    bad = dict(VARIANTS, broken=["stages.finetune.distill.terms=[{name: forward_kld}]"])
    grid = load_grid(_write_grid(workspace, "bad.yaml", variants=bad, output_dir=out))
    with pytest.raises(GridError, match=r"bad\.yaml: variant 'broken' \(seed 0\).*forward_kld"):
        run_ablation(grid, log=lambda *_: None)
    assert calls.trained == [] and not out.exists()  # the last variant was validated before the first trained

    typo = dict(VARIANTS, lr=["stages.finetune.train.lerning_rate=1e-3"])
    with pytest.raises(GridError, match=r"variant 'lr'.*lerning_rate"):
        run_ablation(load_grid(_write_grid(workspace, "typo.yaml", variants=typo, output_dir=out)))
    with pytest.raises(GridError, match=r"variant 'seeded'.*set by the grid"):
        load_grid(_write_grid(workspace, "seed.yaml", variants=dict(VARIANTS, seeded=["seed=3"])))
    with pytest.raises(GridError, match=r"baseline: 'ce' is not a variant"):
        load_grid(_write_grid(workspace, "base.yaml.grid", baseline="ce"))
    with pytest.raises(GridError, match=r"--only \['nope'\]"):
        run_ablation(load_grid(_write_grid(workspace, "only.yaml", output_dir=out)), only=["nope"])
    missing = dict(VARIANTS, far=["teacher.path=/nowhere/teacher"])
    with pytest.raises(GridError, match=r"teacher.path /nowhere/teacher does not exist \(needed by far/seed0"):
        run_ablation(load_grid(_write_grid(workspace, "missing.yaml", variants=missing, output_dir=out)))
    assert calls.trained == [] and not out.exists()


def _cli(argv):
    parser = argparse.ArgumentParser(prog="llavadi")
    ablate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_dry_run_lists_runs_without_training(ablation, workspace, monkeypatch, capsys):
    calls = Counter(monkeypatch)
    fresh = workspace / "fresh-out"
    assert _cli(["ablate", _write_grid(workspace, "fresh.yaml", output_dir=fresh), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    listed = [l.split()[:2] for l in printed.splitlines() if l.startswith("  ")]
    assert listed == [["todo", f"{v}/seed{s}"] for v in VARIANTS for s in SEEDS]
    assert "all recipes valid" in printed
    assert calls.trained == [] and not fresh.exists()

    # on the finished grid every run is cached; --only narrows the listing
    assert _cli(["ablate", ablation[0].path, "--dry-run", "--only", "rkl"]) == 0
    listed = [l.split()[:2] for l in capsys.readouterr().out.splitlines() if l.startswith("  ")]
    assert listed == [["done", "rkl/seed0"], ["done", "rkl/seed1"]]

    bad = _write_grid(workspace, "bad-cli.yaml", variants={"sft": ["stages.nope.train.max_steps=1"]})
    assert _cli(["ablate", bad, "--dry-run"]) == 2
    assert "variant 'sft'" in capsys.readouterr().err


def test_summarise_by_hand():
    runs = [{"variant": "a", "seed": 0, "metrics": {"acc": 50.0, "kl": 0.5}},
            {"variant": "a", "seed": 1, "metrics": {"acc": 60.0, "kl": 0.3}},
            {"variant": "b", "seed": 0, "metrics": {"acc": 55.0, "kl": 0.1}},
            {"variant": "b", "seed": 1, "metrics": {"acc": 75.0, "kl": 0.2}},
            {"variant": "c", "seed": 1, "metrics": {"acc": 40.0}}]
    s = ablate.summarise(runs, baseline="a")
    assert s["columns"] == ["acc", "kl"]
    b = s["variants"]["b"]["metrics"]
    assert b["acc"]["mean"] == 65.0 and b["acc"]["std"] == pytest.approx(200 ** 0.5)
    assert b["acc"]["delta"]["mean"] == 10.0 and b["acc"]["delta"]["std"] == pytest.approx(50 ** 0.5)  # +5, +15
    assert b["kl"]["delta"]["mean"] == pytest.approx(-0.25)
    c = s["variants"]["c"]["metrics"]
    assert c["acc"]["n"] == 1 and c["acc"]["std"] == 0.0 and c["acc"]["delta"] == {"mean": -20.0, "std": 0.0, "n": 1, "t": None, "df": 0, "p": None}
    assert "kl" not in c and any("'c': 1 of 2 seeds" in n for n in s["notes"])
    header, rows = _table_rows(ablate.format_table(s))
    assert header == ["variant", "seeds", "acc", "Δ acc", "kl", "Δ kl"]
    assert rows[1] == ["b", "2", "65.00 ± 14.14", "+10.00 ± 7.07", "0.150 ± 0.071", "-0.250 ± 0.212"]  # kl diffs -0.4, -0.1
    assert rows[2] == ["c", "1", "40.00", "-20.00", "–", "–"]


def test_plot_is_optional(tmp_path, monkeypatch):
    runs = [{"variant": v, "seed": s, "metrics": {"acc": 10.0 * i + s}} for i, v in enumerate("ab") for s in (0, 1)]
    summary = ablate.summarise(runs, baseline="a")
    assert ablate.plot(summary, str(tmp_path / "p.png")) == str(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # as if matplotlib were absent
    assert ablate.plot(summary, str(tmp_path / "q.png")) is None and not (tmp_path / "q.png").exists()


def test_demo_and_ablate_report_the_sample_std():
    from llavadi import demo
    from llavadi.experiments.stats import mean_std

    assert mean_std([1.0, 2.0, 6.0]) == {"mean": 3.0, "std": pytest.approx(7 ** 0.5), "n": 3}  # squares 14 / (3 - 1)
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError):
        mean_std([])
    results = {"teacher": {"metrics": {"accuracy": 70.0}}}
    results.update({f"student_sft-s{s}": {"metrics": {"accuracy": a, "category/count": 100.0}}
                    for s, a in enumerate((1.0, 2.0, 6.0))})
    summary = demo.summarise(results, {"student_sft": ["a", "b", "c"], "student_distilled": []})
    assert summary["student_sft"]["accuracy"] == {"mean": 3.0, "std": pytest.approx(7 ** 0.5), "n": 3}
    assert summary["student_sft"]["category/count"]["std"] == 0.0
    assert summary["teacher"]["accuracy"] == {"mean": 70.0, "std": 0.0, "n": 1}
    assert "student_distilled" not in summary
    assert "3.0 ± 2.6" in demo.format_table(summary)


def test_a_variant_may_train_another_base_recipe(workspace):
    other = yaml.safe_load((workspace / "base.yaml").read_text())
    other["stages"].append({**other["stages"][0], "name": "second", "distill": {"terms": []}})
    (workspace / "two_stages.yaml").write_text(yaml.safe_dump(other))
    variants = dict(VARIANTS, two={"recipe": "two_stages.yaml", "overrides": ["stages.second.train.max_steps=2"]})
    grid = load_grid(_write_grid(workspace, "variant_recipe.yaml", variants=variants))
    runs = {(r.variant, r.seed): r for r in ablate.plan_runs(grid)}
    assert [s.name for s in runs[("two", 1)].recipe.stages] == ["finetune", "second"]
    assert runs[("two", 1)].recipe.stages[1].train.value("max_steps") == 2 and runs[("two", 1)].seed == 1
    assert [s.name for s in runs[("fkl", 0)].recipe.stages] == ["finetune"]
    bad = dict(VARIANTS, two={"recipes": "two_stages.yaml"})
    with pytest.raises(GridError, match=r"variant 'two'.*mapping \{recipe: FILE"):
        load_grid(_write_grid(workspace, "variant_recipe_bad.yaml", variants=bad))
