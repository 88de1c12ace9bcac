"""`llavadi report STUDY_DIR... --out DIR`: one page over several studies (ablation grids) ranking what mattered.

A study folder is the `output_dir` of `llavadi ablate` (its `results.json` plus one folder per
run). The report recomputes every study's table from the per-run metrics, exactly as `ablate`
writes it (mean ± sample std over seeds, Δ to the baseline paired by seed with the paired
t-test's significance mark), and ranks every variant of every study by its Δ on the headline
metric. The cost of each answer (parameters, peak memory, generation latency and throughput) is
measured once per model architecture in one pass next to the teacher (`architecture_cost`),
not read from the cells' eval runs, whose timings differ with the load of the moment; with
`--export` the best student's GGUF variants are scored and timed in the same pass.
Writes `report.md`, `report.html` (the same content, the plots embedded), `report.json` and the
plots, each 960 px wide: `<study>_bars.png` (mean ± std per variant), `<study>_curves.png`
(training curves of every loss term, mean over seeds, from the TensorBoard events) and
`cost.png` (accuracy against cost).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from llavadi.atomic import write_text_atomic
from llavadi.experiments import ablate
from llavadi.experiments.architecture_cost import DEFAULT_REPEATS, CostPassError, run_cost_pass
from llavadi.experiments.cost_report import (
    architecture_cost_summary,
    architectures_from_eval_runs,
    architectures_from_pass,
    cost_table,
    plot_cost,
)
from llavadi.experiments.curves import loss_curves, plot_curves
from llavadi.experiments.page import to_html, to_markdown
from llavadi.experiments.stats import significance_mark

REPORT_MD, REPORT_HTML, REPORT_JSON, COST_PLOT = "report.md", "report.html", "report.json", "cost.png"


class ReportError(ValueError):
    """A study folder that cannot be reported; the message names it."""


@dataclass
class ReportOptions:
    """How the cost side is measured: rounds of the measuring pass (0: none) and GGUF variants to export."""

    cost_repeats: int = DEFAULT_REPEATS
    export_quants: list[str] | None = None
    log: Callable = field(default=lambda *a: print(*a, file=sys.stderr))


@dataclass
class Study:
    """A finished (or partly finished) ablation grid, its table recomputed from the per-run metrics."""

    folder: str
    name: str
    grid: dict
    runs: list[dict]
    summary: dict
    table: str
    results: dict = field(repr=False, default_factory=dict)

    @property
    def headline(self) -> str | None:
        """The first column of the table (the metric variants are ranked by)."""
        return self.summary["columns"][0] if self.summary["columns"] else None


def load_study(folder: str) -> Study:
    """A study folder's results, its summary and table recomputed from the runs' metrics."""
    path = os.path.join(folder, ablate.RESULTS_FILE)
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"{folder}: not a study folder (no {ablate.RESULTS_FILE}; run `llavadi ablate` first)") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(results, dict) or not {"grid", "runs", "summary"} <= set(results):
        raise ReportError(f"{path}: not written by `llavadi ablate` (needs grid, runs, summary)")
    grid, runs = results["grid"], results["runs"]
    summary = ablate.summarise(runs, grid["baseline"], results["summary"].get("columns"),
                               variant_order=list(grid["variants"]))
    name = os.path.splitext(os.path.basename(grid["path"]))[0]
    return Study(os.path.abspath(folder), name, grid, runs, summary, ablate.format_table(summary), results)


def ranking(studies: list[Study]) -> list[dict]:
    """Every non-baseline variant of every study, by its Δ on its study's headline metric (largest first)."""
    rows = []
    for study in studies:
        metric = study.headline
        for variant, entry in study.summary["variants"].items():
            stats = entry["metrics"].get(metric, {})
            if variant == study.summary["baseline"] or "delta" not in stats:
                continue
            agreement = entry["metrics"].get("agreement", {}).get("delta")
            rows.append({"study": study.name, "variant": variant, "metric": metric, "mean": stats["mean"],
                         "delta": stats["delta"], "agreement_delta": agreement})
    return sorted(rows, key=lambda r: -r["delta"]["mean"])


def _ranking_table(rows: list[dict]) -> str:
    lines = ["| rank | study | variant | metric | mean | Δ to the study's baseline | p | Δ agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        d, a = r["delta"], r["agreement_delta"]
        p = "–" if d.get("p") is None else f"{d['p']:.3f}"
        spread = f" ± {d['std']:.2f}" if d.get("n", 2) > 1 else ""  # one seed: no spread
        delta = f"{d['mean']:+.2f}{spread}{significance_mark(d.get('p'))}"
        agree = "–" if a is None else f"{a['mean']:+.2f}{significance_mark(a.get('p'))}"
        lines.append(f"| {i} | {r['study']} | {r['variant']} | {r['metric']} | {r['mean']:.2f} | {delta} | {p} | {agree} |")
    lines += ["", "Δ = variant − baseline of its study, paired by seed (± sample std of the differences); "
                  "p = two-sided paired t-test over seeds; * p < 0.05, ** p < 0.01."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- cost

def _eval_result(study: Study, run: dict) -> dict | None:
    path = os.path.join(run["run_dir"], "eval", f"{study.grid['eval']['benchmark']}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def cost_points(studies: list[Study]) -> list[dict]:
    """Per cell with a measured cost: study, variant, seed, accuracy, its cost and its teacher's (same eval run)."""
    points = []
    for study in studies:
        for run in study.runs:
            result = _eval_result(study, run)
            if not result or "cost" not in result:
                continue
            metric = study.headline
            points.append({"study": study.name, "variant": run["variant"], "seed": run["seed"],
                           "baseline": run["variant"] == study.summary["baseline"],
                           "accuracy": run["metrics"].get(metric), "metric": metric,
                           "teacher_accuracy": run["metrics"].get(f"teacher/{metric}"),
                           "cost": result["cost"], "teacher_cost": result.get("teacher_cost")})
    return points


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def cost_summary(points: list[dict], best: dict | None) -> dict | None:
    """Teacher, the studies' baselines and the best variant: mean cost and accuracy, and the ratios.

    Ratios are taken per eval run (student and teacher measured in the same run), then averaged:
    speed = student / teacher generated tokens per second at batch 1 (and at the eval batch size);
    memory = teacher peak / student peak.
    """
    paired = [p for p in points if p["teacher_cost"]]
    if not paired or best is None:
        return None
    chosen = [p for p in paired if p["study"] == best["study"] and p["variant"] == best["variant"]]
    sft = [p for p in paired if p["baseline"]]
    if not chosen:
        return None
    rows = {"teacher": _cost_row([p["teacher_cost"] for p in paired], [p["teacher_accuracy"] for p in paired])}
    if sft:  # a study's baseline is SFT only when it has no distillation term (the data study's has them)
        names = ", ".join(dict.fromkeys(f"{p['study']}/{p['variant']}" for p in sft))
        rows[f"student, baseline ({names})"] = _cost_row([p["cost"] for p in sft], [p["accuracy"] for p in sft])
    rows[f"student, {best['study']}/{best['variant']}"] = _cost_row([p["cost"] for p in chosen],
                                                                    [p["accuracy"] for p in chosen])
    teacher_accuracy = _mean(p["teacher_accuracy"] for p in chosen)
    kept = 100.0 * _mean(p["accuracy"] for p in chosen) / teacher_accuracy if teacher_accuracy else None
    # tokens/s rather than ms per answer: answers of different lengths do not skew the ratio
    speed = _mean(p["cost"]["batch_1"]["tokens_per_second"] / p["teacher_cost"]["batch_1"]["tokens_per_second"]
                  for p in chosen)
    memory = _mean(p["teacher_cost"]["peak_memory_bytes"] / p["cost"]["peak_memory_bytes"] for p in chosen)
    throughput = _mean(p["cost"]["batch_eval"]["tokens_per_second"] / p["teacher_cost"]["batch_eval"]["tokens_per_second"]
                       for p in chosen)
    kept_text = "(no share: the teacher scores 0)" if kept is None else f"{kept:.0f}%"
    sentence = (f"The student ({best['study']}/{best['variant']}) keeps {kept_text} of the teacher's "
                f"{best['metric']} at {speed:.1f}x its speed (tokens/s at batch 1; {throughput:.1f}x at the eval "
                f"batch size) and {memory:.1f}x less memory.")
    return {"rows": rows, "kept_percent": kept, "speedup_batch_1": speed, "throughput_ratio_eval_batch": throughput,
            "memory_ratio": memory, "sentence": sentence}


def _cost_row(costs: list[dict], accuracies: list) -> dict:
    return {"accuracy": _mean(accuracies), "parameters": _mean(c["parameters"]["total"] for c in costs),
            "peak_memory_mb": _mean(c["peak_memory_bytes"] / 2**20 for c in costs),
            "ms_per_answer_batch_1": _mean(c["batch_1"]["ms_per_answer"] for c in costs),
            "tokens_per_second_batch_1": _mean(c["batch_1"]["tokens_per_second"] for c in costs),
            "tokens_per_second_eval_batch": _mean(c["batch_eval"]["tokens_per_second"] for c in costs),
            "eval_batch_size": costs[0]["batch_eval"]["batch_size"], "cells": len(costs)}


# ----------------------------------------------------------------------------- the page

def _study_curves(study: Study) -> list[dict]:
    cells = []
    for run in study.runs:
        stages = _stage_names(run)
        curves = loss_curves(run["run_dir"], stages)
        if curves is None:  # no tensorboard: no curves for anyone
            return []
        cells.append({"variant": run["variant"], "seed": run["seed"], "curves": curves})
    return cells


def _stage_names(run: dict) -> list[str]:
    record = os.path.join(run["run_dir"], ablate.RUN_RECORD)
    try:
        with open(record) as f:
            return [s["name"] for s in json.load(f)["recipe"]["stages"]]
    except (OSError, KeyError, json.JSONDecodeError):
        return sorted(d for d in os.listdir(run["run_dir"]) if os.path.isdir(os.path.join(run["run_dir"], d, "checkpoints")))


def _study_blocks(study: Study, out_dir: str, notes: list[str]) -> list[tuple]:
    g = study.grid
    blocks = [("h", 2, f"{study.name}"),
              ("p", f"`{g['path']}`: base recipe `{g['recipe']}`, seeds {g['seeds']}, benchmark "
                    f"`{g['eval']['benchmark']}`; baseline **{g['baseline']}**."),
              ("table", study.table)]
    recipes = g.get("variant_recipes") or {}
    variants = [f"**{name}**: " + (f"recipe `{recipes[name]}` " if name in recipes else "")
                + (", ".join(f"`{o}`" for o in overrides) or ("" if name in recipes else "the base recipe"))
                for name, overrides in g["variants"].items()]
    blocks.append(("ul", variants))
    bars = f"{study.name}_bars.png"
    if ablate.plot(study.summary, os.path.join(out_dir, bars)):
        blocks.append(("img", bars, f"{study.name}: mean ± std per variant"))
    curves = f"{study.name}_curves.png"
    if plot_curves(_study_curves(study), os.path.join(out_dir, curves), study.name):
        blocks.append(("img", curves, f"{study.name}: training curves"))
    else:
        notes.append(f"{study.name}: no training curves (no TensorBoard events, or tensorboard/matplotlib missing)")
    for note in study.summary["notes"]:
        notes.append(f"{study.name}: {note}")
    return blocks


def _cost_blocks(studies: list[Study], best: dict | None, out_dir: str, options: ReportOptions,
                 notes: list[str]) -> tuple[list[tuple], dict | None]:
    """The cost section: one cost per architecture (a measuring pass, else the cells' eval runs), table and plot."""
    points = cost_points(studies)
    pass_result = None
    if options.cost_repeats > 0 and best is not None:
        try:
            pass_result = run_cost_pass(studies, best, out_dir, options.cost_repeats, options.export_quants,
                                        options.log)
            notes += pass_result["notes"]
        except CostPassError as err:
            notes.append(f"no measuring pass ({err}); the cost side comes from the cells' eval runs")
    elif options.export_quants:
        notes.append("no exported variants: they are measured in the cost pass, which --cost-repeats 0 turns off")
    archs = architectures_from_pass(pass_result) if pass_result else architectures_from_eval_runs(points)
    summary = architecture_cost_summary(points, best, archs, pass_result)
    if summary is None:
        notes.append("no cost: the eval results hold no teacher and student cost (re-evaluate with a teacher)")
        return [("p", "No cost measured in these results.")], None
    blocks = [("p", f"**{summary['sentence']}**"), ("table", cost_table(summary, pass_result))]
    if plot_cost(points, archs, summary, best, os.path.join(out_dir, COST_PLOT)):
        blocks.append(("img", COST_PLOT, "accuracy against cost"))
    return blocks, {**summary, "pass": pass_result}


def build_report(studies: list[Study], out_dir: str, options: ReportOptions | None = None) -> tuple[list[tuple], dict]:
    """The page's blocks (plots written into `out_dir`) and the numbers behind them."""
    options = options or ReportOptions()
    notes: list[str] = []
    rows = ranking(studies)
    best = next((r for r in rows), None)
    blocks: list[tuple] = [("h", 1, "What matters: " + ", ".join(s.name for s in studies)),
                           ("p", "Per study: mean ± sample std over seeds and the paired difference to the study's "
                                 "baseline; below, every variant ranked by that difference.")]
    blocks += [("h", 2, "Ranking"), ("table", _ranking_table(rows))]
    blocks.append(("h", 2, "Cost"))
    cost_blocks, cost = _cost_blocks(studies, best, out_dir, options, notes)
    blocks += cost_blocks
    for study in studies:
        blocks += _study_blocks(study, out_dir, notes)
    if notes:
        blocks += [("h", 2, "Notes"), ("ul", notes)]
    numbers = {"studies": {s.name: {"folder": s.folder, "summary": s.summary} for s in studies},
               "ranking": rows, "cost": cost, "notes": notes}
    return blocks, numbers


def write_report(study_folders: list[str], out_dir: str, options: ReportOptions | None = None) -> dict:
    """Load the studies and write report.md, report.html, report.json and the plots into `out_dir`; returns paths."""
    if not study_folders:
        raise ReportError("no study folder given")
    studies = [load_study(f) for f in study_folders]
    names = [s.name for s in studies]
    if len(set(names)) != len(names):
        raise ReportError(f"two studies share a name ({names}); their plots would overwrite each other")
    os.makedirs(out_dir, exist_ok=True)
    blocks, numbers = build_report(studies, out_dir, options)
    title = "What matters: " + ", ".join(names)
    files = {"markdown": os.path.join(out_dir, REPORT_MD), "html": os.path.join(out_dir, REPORT_HTML),
             "json": os.path.join(out_dir, REPORT_JSON)}
    write_text_atomic(files["markdown"], to_markdown(blocks))
    write_text_atomic(files["html"], to_html(blocks, title, out_dir))
    write_text_atomic(files["json"], json.dumps(numbers, indent=2, default=str))
    return files


def extend_report_command(subparsers) -> None:
    """Let `llavadi report` take study folders (outputs of `llavadi ablate`) besides result files."""
    parser = subparsers.choices["report"]
    plain = parser.get_default("func")
    parser.epilog = ("Given study folders (the output_dir of `llavadi ablate`) instead of result files, writes "
                     "one report over the studies into the --out folder: report.md, report.html (plots "
                     "embedded), report.json and the plots.")
    parser.add_argument("--cost-repeats", type=int, default=None, metavar="N",
                        help="study folders only: measure each model architecture once, in N interleaved rounds "
                             f"next to the teacher (default {DEFAULT_REPEATS}; 0: use the cells' eval-run costs)")
    parser.add_argument("--export", default=None, metavar="QUANTS",
                        help="study folders only: also export the best student to GGUF (e.g. f16,q8_0,q4_0,q4_k_m; "
                             "needs llama-cpp-python) and score and time each variant in the cost pass")

    def run(args) -> int:
        folders = [p for p in args.results if os.path.isdir(p)]
        if not folders:
            if args.cost_repeats is not None or args.export is not None:
                print("llavadi report: error: --cost-repeats and --export apply to study folders only",
                      file=sys.stderr)
                return 2
            return plain(args)
        try:
            files = write_report(folders, args.out, _options(args, folders))
        except ReportError as err:
            print(f"llavadi report: error: {err}", file=sys.stderr)
            return 2
        for kind, path in files.items():
            print(f"wrote {path} ({kind})", file=sys.stderr)
        return 0

    parser.set_defaults(func=run)


def _options(args, folders: list[str]) -> ReportOptions:
    """The report's options from the command line, refused by name when they cannot apply."""
    from llavadi.export.gguf_target import parse_quants

    if len(folders) != len(args.results):
        raise ReportError("give either study folders or result files, not both")
    if not args.out:
        raise ReportError("a report over studies needs --out FOLDER (it writes markdown, HTML and plots)")
    repeats = DEFAULT_REPEATS if args.cost_repeats is None else args.cost_repeats
    if repeats < 0:
        raise ReportError(f"--cost-repeats must be >= 0, got {repeats}")
    try:
        quants = None if args.export is None else parse_quants(args.export)
    except ValueError as err:
        raise ReportError(f"--export: {err}") from None
    if quants and repeats == 0:
        raise ReportError("--export measures the exported variants in the cost pass; it needs --cost-repeats >= 1")
    return ReportOptions(cost_repeats=repeats, export_quants=quants)
