"""The pieces of a study report: paired t-test, progress, TensorBoard curves, page rendering, cost meters."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from llavadi.experiments import page, stats
from llavadi.experiments.progress import Progress, format_duration

# ----------------------------------------------------------------------------- paired t-test

@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, 60.0])
def test_t_p_value_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    # df = 1 is the Cauchy law: P(|T| >= t) = 1 - (2/π)·atan(t); df = 2: P(|T| >= t) = 1 - t/√(2 + t²)
    assert stats.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)
    assert stats.t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)


def _p_by_integration(t: float, df: int, n: int = 200_000) -> float:
    """2·∫_{|t|}^{∞} of Student's density, by the midpoint rule after x = |t| + u/(1-u)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    total = 0.0
    for i in range(n):
        u = (i + 0.5) / n
        x = abs(t) + u / (1 - u)
        total += c * (1 + x * x / df) ** (-(df + 1) / 2) / (1 - u) ** 2
    return 2 * total / n


@pytest.mark.parametrize("t,df", [(2.776445, 4), (1.2, 5), (3.5, 9), (0.4, 30)])
def test_t_p_value_matches_numerical_integration_of_the_density(t, df):
    assert stats.t_two_sided_p(t, df) == pytest.approx(_p_by_integration(t, df), rel=1e-5)
    # the tabulated 97.5% quantile of t with 4 degrees of freedom is 2.776445
    if df == 4:
        assert stats.t_two_sided_p(t, df) == pytest.approx(0.05, abs=1e-6)


def test_paired_t_by_hand():
    # differences 6.7, -1.5, 2.5: mean 2.5667, sample std 4.1004, t = mean / (std / √3) = 1.0842, df 2
    a, b = [57.2, 52.0, 54.7], [50.5, 53.5, 52.2]
    out = stats.paired_t(a, b)
    d = [x - y for x, y in zip(a, b)]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    assert out["mean"] == pytest.approx(2.566667, abs=1e-6) and out["std"] == pytest.approx(statistics.stdev(d))
    assert out["t"] == pytest.approx(t) and out["df"] == 2
    assert out["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # df = 2 closed form
    assert stats.significance_mark(out["p"]) == ""
    assert stats.paired_t([1.0, 2.0], [1.0, 2.0]) | {} == {"mean": 0.0, "std": 0.0, "n": 2, "t": 0.0, "df": 1, "p": 1.0}
    same_gain = stats.paired_t([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert same_gain["t"] == math.inf and same_gain["p"] == 0.0 and stats.significance_mark(0.0) == "**"
    assert stats.paired_t([1.0], [0.0])["p"] is None
    assert stats.significance_mark(0.03) == "*" and stats.significance_mark(None) == ""
    with pytest.raises(ValueError, match="pairs"):
        stats.paired_t([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- progress

def test_progress_counts_runs_and_estimates_the_time_left():
    now = [100.0]
    p = Progress(total=4, jobs=2, clock=lambda: now[0])
    k = p.start()
    assert k == 1 and p.line(k) == "run 1 of 4, elapsed 0s, time left unknown"
    p.start()
    now[0] += 60
    p.finish(60.0)
    p.finish(40.0)
    # 2 runs left at a mean of 50 s, 2 at once: 50 s
    assert p.eta_seconds() == pytest.approx(50.0)
    assert p.line(3) == "run 3 of 4, elapsed 1m00s, ~50s left"
    p.finish(50.0)
    assert p.eta_seconds() == pytest.approx(50.0)  # one left, alone: its mean duration
    assert format_duration(3725) == "1h02m" and format_duration(59.4) == "59s"
    with pytest.raises(ValueError):
        Progress(total=3, jobs=0)


# ----------------------------------------------------------------------------- TensorBoard curves

def test_curves_are_read_from_event_files_and_a_resumed_run_overrides_its_steps(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from llavadi.experiments.curves import loss_curves

    logs = tmp_path / "run" / "finetune" / "checkpoints" / "runs"
    first = SummaryWriter(str(logs / "first"))
    for step, value in ((1, 3.0), (2, 2.0), (3, 9.0)):
        first.add_scalar("train/loss", value, step)
        first.add_scalar("train/loss/forward_kl", value / 2, step)
        first.add_scalar("train/learning_rate", 0.1, step)
    first.close()
    resumed = SummaryWriter(str(logs / "second"))  # a resume from step 2 logs step 3 again
    resumed.add_scalar("train/loss", 1.5, 3)
    resumed.add_scalar("train/loss", 1.0, 4)
    resumed.close()
    curves = loss_curves(str(tmp_path / "run"), ["finetune", "absent-stage"])
    assert list(curves) == ["finetune"]
    assert curves["finetune"]["train/loss"] == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]
    assert curves["finetune"]["train/loss/forward_kl"] == [(1, 1.5), (2, 1.0), (3, 4.5)]
    assert "train/learning_rate" not in curves["finetune"]


# ----------------------------------------------------------------------------- page

def test_page_renders_the_same_blocks_as_markdown_and_html(tmp_path):
    from llavadi.experiments.ablate import format_table, summarise

    runs = [{"variant": v, "seed": s, "metrics": {"acc": 10.0 * i + s}} for i, v in enumerate("ab") for s in (0, 1)]
    table = format_table(summarise(runs, baseline="a"))
    blocks = [("h", 1, "Title <&>"), ("p", "a **bold** and `code` <tag>"), ("table", table), ("ul", ["x", "y"])]
    md = page.to_markdown(blocks)
    assert md.startswith("# Title <&>\n\n") and table.rstrip("\n") in md and "- x\n- y" in md
    html = page.to_html(blocks, "t", str(tmp_path))
    assert "<h1>Title &lt;&amp;&gt;</h1>" in html
    assert "<p>a <b>bold</b> and <code>code</code> &lt;tag&gt;</p>" in html
    rows, notes = page.table_cells(table)
    assert rows[0] == ["variant", "seeds", "acc", "Δ acc"] and rows[1][0] == "**a** (baseline)"
    assert html.count("<tr>") == len(rows) == 3 and notes and notes[0].startswith("mean ± sample std")
    with pytest.raises(ValueError, match="unknown block"):
        page.to_markdown([("video", "x")])


# ----------------------------------------------------------------------------- cost meters

def test_live_tensor_bytes_counts_allocations_until_they_are_freed():
    from llavadi.eval.cost import LiveTensorBytes

    with LiveTensorBytes(base=1000) as meter:
        a = torch.zeros(256)  # 1024 bytes
        b = torch.ones(512)  # 2048
        view = a[10:20]  # no new storage
        a.add_(1)  # in place: no new storage
        del b
        c = torch.zeros(128)  # 512, after b was freed
        del a  # the view keeps a's storage alive
    assert meter.peak == 1000 + 1024 + 2048
    assert meter.current == 1000 + 1024 + 512
    del view, c  # a's storage goes with its last view
    assert meter.current == 1000


def test_parameter_counts_and_weight_bytes(word_tokenizer):
    from conftest import make_tiny_llava

    from llavadi.eval.cost import parameter_counts, weight_bytes

    model = make_tiny_llava(word_tokenizer)
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision_tower"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts["projector"] == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert counts["total"] == counts["vision_tower"] + counts["projector"] + counts["language_model"]
    expected = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert weight_bytes(model) == expected


# ----------------------------------------------------------------------------- cost per architecture

def _model_folder(path, hidden: int, name: str):
    import json

    path.mkdir(parents=True)
    config = {"model_type": "llava", "_name_or_path": name, "transformers_version": "5.0.0",
              "text_config": {"hidden_size": hidden, "num_hidden_layers": 1}}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_each_architecture_is_measured_once_however_many_cells_use_it(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import llavadi.eval.cost as cost_module
    from llavadi.experiments import architecture_cost

    teacher = _model_folder(tmp_path / "teacher", 192, "t")
    runs = []
    for i, (variant, hidden) in enumerate([("a", 128), ("b", 128), ("c", 128), ("wide", 256)]):
        run_dir = tmp_path / "cells" / variant
        model = _model_folder(run_dir / "final", hidden, f"cell-{i}")  # names differ, architectures need not
        (run_dir / "ablate_run.json").write_text(json.dumps({"eval": {"teacher": teacher}}))
        runs.append({"variant": variant, "seed": 0, "run_dir": str(run_dir), "model": model})
    study = SimpleNamespace(name="s", runs=runs)
    archs = architecture_cost.find_architectures([study])
    assert [(a.role, len(a.cells)) for a in archs] == [("teacher", 4), ("student", 3), ("student", 1)]
    assert archs[1].cells == [("s", "a", 0), ("s", "b", 0), ("s", "c", 0)] and archs[2].cells == [("s", "wide", 0)]

    calls = []

    def fake_measure(bundle, questions, batch_size, max_new_tokens):
        calls.append(bundle)
        ms = 10.0 * len(calls)
        return {"parameters": {"total": bundle}, "peak_memory_bytes": 2**20 * bundle,
                "batch_1": {"ms_per_answer": ms, "tokens_per_second": 1000.0 / ms},
                "batch_eval": {"ms_per_answer": ms / 4, "tokens_per_second": 4000.0 / ms, "batch_size": 8}}

    monkeypatch.setattr(cost_module, "measure_cost", fake_measure)
    bundles = {a.key: size for a, size in zip(archs, (300, 100, 200))}  # stand-ins for loaded models
    out = architecture_cost.measure_architectures(archs, bundles, ["q"], 8, 4, repeats=3, log=lambda *a: None)
    assert calls == [300, 100, 200] * 3  # 3 architectures, not 4 cells; round by round
    student = out[archs[1].key]
    assert student["summary"]["ms_per_answer_batch_1"] == {"median": 50.0, "min": 20.0, "max": 80.0, "n": 3}
    assert student["summary"]["parameters"] == 100 and archs[1].name == "student (100 parameters)"
    ratios = architecture_cost.round_ratios(student, out[archs[0].key])
    # per round: teacher at 10, 40, 70 ms and student at 20, 50, 80 ms: speed ratios 1/2, 4/5, 7/8
    assert ratios["speed_batch_1"]["median"] == pytest.approx(0.8) and ratios["memory"]["median"] == 3.0
    with pytest.raises(ValueError, match="repeats"):
        architecture_cost.measure_architectures(archs, bundles, ["q"], 8, 4, repeats=0)
    (tmp_path / "teacher" / "config.json").unlink()
    with pytest.raises(architecture_cost.CostPassError, match="teacher/config.json"):
        architecture_cost.find_architectures([study])


# ----------------------------------------------------------------------------- figure sizes

MAX_WIDTH_PX = 1000  # a docs page shows ~800-1000 px


def _png_size(path) -> tuple[int, int]:
    import struct

    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _variant_names(n: int) -> list[str]:
    return [f"token_logits_visual_{i}" for i in range(n)]


def test_bars_stay_page_wide_with_many_variants_and_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    from llavadi.experiments.ablate import plot, summarise

    names = _variant_names(11)
    runs = [{"variant": v, "seed": s, "metrics": {"accuracy": 50.0 + i + s, "agreement": 70.0 - i + s,
                                                  "teacher_student_kl": 0.1 + 0.01 * (i + s)}}
            for i, v in enumerate(names) for s in range(3)]
    path = plot(summarise(runs, baseline=names[0]), str(tmp_path / "bars.png"))
    width, height = _png_size(path)
    assert width <= MAX_WIDTH_PX and height < width


def test_curves_and_cost_plots_stay_page_wide(tmp_path):
    pytest.importorskip("matplotlib")
    from llavadi.experiments.cost_report import architecture_cost_summary, architectures_from_eval_runs, plot_cost
    from llavadi.experiments.curves import plot_curves

    names = _variant_names(11)
    tags = ["train/loss"] + [f"train/loss/term{k}" for k in range(6)]
    cells = [{"variant": v, "seed": s, "curves": {"finetune": {t: [(k, 1.0 / (k + i + s + 1)) for k in range(1, 30)]
                                                             for t in tags}}}
             for i, v in enumerate(names) for s in range(3)]
    width, _ = _png_size(plot_curves(cells, str(tmp_path / "curves.png"), "study"))
    assert width <= MAX_WIDTH_PX

    def cost(ms, params):
        return {"parameters": {"total": params}, "peak_memory_bytes": params * 40,
                "batch_1": {"ms_per_answer": ms, "tokens_per_second": 2000 / ms},
                "batch_eval": {"ms_per_answer": ms / 8, "tokens_per_second": 16000 / ms, "batch_size": 64}}

    points = [{"study": f"study{i % 3}", "variant": v, "seed": s, "baseline": i < 3, "metric": "accuracy",
               "accuracy": 55.0 + i + s, "teacher_accuracy": 69.5, "cost": cost(3.5 + i % 5, 416_448),
               "teacher_cost": cost(8.0, 2_029_568)} for i, v in enumerate(names) for s in range(3)]
    archs = architectures_from_eval_runs(points)
    best = {"study": "study1", "variant": names[10], "metric": "accuracy"}
    summary = architecture_cost_summary(points, best, archs, None)
    assert [a["name"] for a in archs] == ["teacher", "student (416,448 parameters)"]
    assert summary["rows"][-1]["ms_per_answer_batch_1"] == {"median": 5.5, "min": 3.5, "max": 7.5, "n": 33}
    width, _ = _png_size(plot_cost(points, archs, summary, best, str(tmp_path / "cost.png")))
    assert width <= MAX_WIDTH_PX
