"""The cost side of a study report: accuracy against what each architecture costs, as a table and a plot.

The cost of an architecture comes from one measuring pass over the studies' distinct architectures
(`architecture_cost.run_cost_pass`: each measured in interleaved rounds, median and min–max), so
students of one architecture share one cost and the plot shows only real differences. Without
that pass (`--cost-repeats 0`, or model folders gone) the cells' own eval-run measurements stand
in, grouped by parameter count, and the spread shown is their spread across runs made under
different load: the table and the plot say which.
"""

from __future__ import annotations

import statistics

from llavadi.experiments.architecture_cost import round_ratios, summarise_costs

PLOT_WIDTH_INCHES, PLOT_DPI = 9.6, 100  # 960 px: a docs page's width


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def architectures_from_pass(pass_result: dict) -> list[dict]:
    """The pass's architectures: name, role, summary, its rounds and the (study, variant, seed) cells using it."""
    return [{"name": a["name"], "role": a["role"], "summary": a["summary"], "rounds": a["rounds"],
             "cells": {tuple(c) for c in a["cells"]}} for a in pass_result["architectures"]]


def architectures_from_eval_runs(points: list[dict]) -> list[dict]:
    """Stand-in without a pass: the teacher and the students grouped by parameter count, from the cells' eval runs."""
    paired = [p for p in points if p["teacher_cost"]]
    if not paired:
        return []
    out = [{"name": "teacher", "role": "teacher", "summary": summarise_costs([p["teacher_cost"] for p in paired]),
            "rounds": None, "cells": {(p["study"], p["variant"], p["seed"]) for p in paired}}]
    groups: dict[int, list[dict]] = {}
    for p in paired:
        groups.setdefault(p["cost"]["parameters"]["total"], []).append(p)
    for parameters, ps in sorted(groups.items()):
        out.append({"name": f"student ({parameters:,} parameters)", "role": "student",
                    "summary": summarise_costs([p["cost"] for p in ps]), "rounds": None,
                    "cells": {(p["study"], p["variant"], p["seed"]) for p in ps}})
    return out


def _cell(p: dict) -> tuple:
    return p["study"], p["variant"], p["seed"]


def _arch_of(archs: list[dict], role: str, cell: tuple) -> dict | None:
    return next((a for a in archs if a["role"] == role and cell in a["cells"]), None)


def _ratios(chosen: list[dict], student: dict, teacher: dict) -> dict:
    """Student against teacher: per round of the pass, else per eval run of the chosen cells; the median."""
    if student["rounds"] and teacher["rounds"]:
        return round_ratios({"rounds": student["rounds"]}, {"rounds": teacher["rounds"]})
    return {"speed_batch_1": _spread([p["cost"]["batch_1"]["tokens_per_second"]
                                      / p["teacher_cost"]["batch_1"]["tokens_per_second"] for p in chosen]),
            "throughput_eval_batch": _spread([p["cost"]["batch_eval"]["tokens_per_second"]
                                              / p["teacher_cost"]["batch_eval"]["tokens_per_second"] for p in chosen]),
            "memory": _spread([p["teacher_cost"]["peak_memory_bytes"] / p["cost"]["peak_memory_bytes"]
                               for p in chosen])}


def _row(model: str, arch: dict | None, cells: int, accuracy, summary: dict | None = None) -> dict:
    return {"model": model, "architecture": arch["name"] if arch else "–", "cells": cells, "accuracy": accuracy,
            **(summary if summary is not None else arch["summary"])}


def architecture_cost_summary(points: list[dict], best: dict | None, archs: list[dict],
                              pass_result: dict | None) -> dict | None:
    """Rows of the cost table (teacher, the baselines, the best variant, its exported variants) and the headline."""
    paired = [p for p in points if p["teacher_cost"] and p["accuracy"] is not None]
    chosen = [p for p in paired if best and (p["study"], p["variant"]) == (best["study"], best["variant"])]
    if not chosen or not archs:
        return None
    teacher, student = _arch_of(archs, "teacher", _cell(chosen[0])), _arch_of(archs, "student", _cell(chosen[0]))
    if teacher is None or student is None:
        return None
    rows = [_row("teacher", teacher, len(paired), _mean(p["teacher_accuracy"] for p in paired))]
    sft = [p for p in paired if p["baseline"]]
    if sft:
        names = ", ".join(dict.fromkeys(f"{p['study']}/{p['variant']}" for p in sft))
        rows.append(_row(f"student, baseline ({names})", _arch_of(archs, "student", _cell(sft[0])), len(sft),
                         _mean(p["accuracy"] for p in sft)))
    rows.append(_row(f"student, {best['study']}/{best['variant']}", student, len(chosen),
                     _mean(p["accuracy"] for p in chosen)))
    rows += _exported_rows(pass_result, paired, student)
    ratios = _ratios(chosen, student, teacher)
    accuracy, teacher_accuracy = _mean(p["accuracy"] for p in chosen), _mean(p["teacher_accuracy"] for p in chosen)
    kept = 100.0 * accuracy / teacher_accuracy if teacher_accuracy else None
    source = (f"median of {pass_result['repeats']} rounds of one measuring pass" if student["rounds"]
              else "median over the cells' eval runs, measured under varying load")
    kept_text = "(no share: the teacher scores 0)" if kept is None else f"{kept:.0f}%"
    sentence = (f"The student ({best['study']}/{best['variant']}) keeps {kept_text} of the teacher's {best['metric']} "
                f"at {ratios['speed_batch_1']['median']:.1f}x its speed (generated tokens/s at batch 1, {source}; "
                f"{ratios['throughput_eval_batch']['median']:.1f}x at the eval batch size) and "
                f"{ratios['memory']['median']:.1f}x less memory.")
    return {"rows": rows, "kept_percent": kept, "ratios": ratios, "sentence": sentence,
            "source": "pass" if student["rounds"] else "eval_runs", "metric": best["metric"]}


def _exported_rows(pass_result: dict | None, paired: list[dict], student: dict) -> list[dict]:
    """The exported cell in PyTorch and each of its GGUF variants (time at batch 1 only)."""
    if not pass_result or not pass_result.get("exported"):
        return []
    src = pass_result["exported_from"]
    cell = next((p for p in paired if (p["study"], p["variant"], p["seed"]) == (src["study"], src["variant"],
                                                                                 src["seed"])), None)
    label = f"{src['study']}/{src['variant']} seed {src['seed']}"
    rows = [_row(f"student, {label}, PyTorch fp32", student, 1, cell and cell["accuracy"])]
    for e in pass_result["exported"].values():
        summary = {"parameters": student["summary"]["parameters"], "peak_memory_mb": None,
                   "tokens_per_second_eval_batch": None, "file_mb": e["file_bytes"] / 2**20, **e["summary"]}
        row = _row(f"student, {label}, GGUF {e['quant']}", student, 1, e["metrics"].get("accuracy"), summary)
        rows.append(row | {"architecture": f"{student['name']} in llama.cpp"})
    return rows


def _range(s: dict | None, digits: int) -> str:
    if s is None:
        return "–"
    if s["n"] == 1 or f"{s['min']:.{digits}f}" == f"{s['max']:.{digits}f}":
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def cost_table(summary: dict, pass_result: dict | None) -> str:
    """The cost table in markdown, with a note saying where the costs come from."""
    batch = summary["rows"][0]["eval_batch_size"]
    lines = ["| model | architecture | cells | accuracy | parameters | peak memory (MiB) | ms / answer (batch 1) "
             f"| tokens/s (batch 1) | tokens/s (batch {batch}) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        accuracy = "–" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        lines.append(f"| {r['model']} | {r['architecture']} | {r['cells']} | {accuracy} | {r['parameters']:,.0f} | "
                     f"{_range(r['peak_memory_mb'], 1)} | {_range(r['ms_per_answer_batch_1'], 2)} | "
                     f"{_range(r['tokens_per_second_batch_1'], 0)} | {_range(r['tokens_per_second_eval_batch'], 0)} |")
    lines.append("")
    if summary["source"] == "pass":
        lines.append(f"Cost: one architecture at a time, each loaded once and measured in {pass_result['repeats']} "
                     f"interleaved rounds of one pass ({pass_result['threads']} torch thread(s)); median (min–max "
                     "over the rounds). Accuracy: mean over the cells' eval runs; cells: how many it averages.")
    else:
        lines.append("Cost: the cells' own eval-run measurements (no measuring pass), median (min–max over the runs); "
                     "the runs were made at different times under different load, so the spread is mostly timing "
                     "noise. Accuracy: mean over the cells' eval runs.")
    gguf = [r for r in summary["rows"] if r.get("file_mb") is not None]
    if gguf:
        lines.append("GGUF rows: llama.cpp through llama-cpp-python, timed at batch 1 in the same rounds; accuracy "
                     "from their own evaluation; no peak memory (llama.cpp's allocations are not torch's): files "
                     + ", ".join(f"{r['model'].rsplit(' ', 1)[-1]} {r['file_mb']:.2f} MiB" for r in gguf)
                     + " (language model + mmproj).")
    return "\n".join(lines) + "\n"


def _variant_points(points: list[dict], archs: list[dict]) -> list[dict]:
    """Per (study, variant): its mean accuracy and its student architecture."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        if p["accuracy"] is not None:
            groups.setdefault((p["study"], p["variant"]), []).append(p)
    out = []
    for (study, variant), ps in groups.items():
        arch = _arch_of(archs, "student", (study, variant, ps[0]["seed"]))
        if arch is not None:
            out.append({"study": study, "variant": variant, "baseline": ps[0]["baseline"], "arch": arch,
                        "accuracy": _mean(p["accuracy"] for p in ps)})
    return out


_PANELS = (("ms per answer at batch 1 (log scale)", "ms_per_answer_batch_1"),
           ("peak memory while answering one eval batch, MiB (log scale)", "peak_memory_mb"))


def _draw_cost_panel(ax, label: str, key: str, summary: dict, variants: list[dict], studies: list[str],
                     best: dict) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def x_of(s):
        spread = s.get(key)
        return None if spread is None else (spread["median"], spread["median"] - spread["min"],
                                            spread["max"] - spread["median"])

    teacher = summary["rows"][0]
    tx = x_of(teacher)
    ax.errorbar([tx[0]], [teacher["accuracy"]], xerr=[[tx[1]], [tx[2]]], fmt="*", ms=14, color="black",
                capsize=3, zorder=4, label="teacher")
    for arch in {id(v["arch"]): v["arch"] for v in variants}.values():
        ax_ = x_of(arch["summary"])
        ys = [v["accuracy"] for v in variants if v["arch"] is arch]
        ax.errorbar([ax_[0]], [statistics.median(ys)], xerr=[[ax_[1]], [ax_[2]]], fmt="none", ecolor="grey",
                    capsize=3, zorder=1)
        ax.vlines(ax_[0], min(ys), max(ys), color="lightgrey", lw=6, zorder=0)
    for v in variants:
        x = x_of(v["arch"]["summary"])[0]
        ax.scatter([x], [v["accuracy"]], marker="s" if v["baseline"] else "o", s=36 if v["baseline"] else 24,
                   color=f"C{studies.index(v['study']) % 10}", alpha=0.85, zorder=3,
                   edgecolors="black" if v["baseline"] else "none")
        if (v["study"], v["variant"]) == (best["study"], best["variant"]):
            ax.annotate(f"best: {v['study']}/{v['variant']}", (x, v["accuracy"]), xytext=(8, 0),
                        textcoords="offset points", fontsize=8, va="center")
    gguf = [row for row in summary["rows"] if row.get("file_mb") is not None]
    if gguf and key == "peak_memory_mb":
        label += "; GGUF variants: not measured"
    for i, r in enumerate(row for row in gguf if x_of(row)):
        rx = x_of(r)
        ax.errorbar([rx[0]], [r["accuracy"]], xerr=[[rx[1]], [rx[2]]], fmt="D", ms=6, capsize=3,
                    color=f"C{(len(studies) + i) % 10}", zorder=3, label=r["model"].removeprefix("student, "))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.08, y=0.1)
    ax.set_xlabel(label, fontsize=9)
    ax.set_ylabel(summary["metric"], fontsize=9)
    ax.tick_params(labelsize=8)
    ax.annotate("teacher", (tx[0], teacher["accuracy"]), xytext=(0, 9), textcoords="offset points", fontsize=8,
                ha="center", va="bottom")


def plot_cost(points: list[dict], archs: list[dict], summary: dict, best: dict, path: str) -> str | None:
    """Accuracy against ms per answer and against peak memory, stacked: each architecture at its one measured cost.

    Error bars: min–max of the cost over the pass's rounds (or the eval runs); a grey band: the
    accuracies of the variants sharing an architecture (colour = study, square = its baseline).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        return None
    variants = _variant_points(points, archs)
    if not variants:
        return None
    from llavadi.atomic import atomic_path

    studies = list(dict.fromkeys(v["study"] for v in variants))
    fig = Figure(figsize=(PLOT_WIDTH_INCHES, 8.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1)
    for ax, (label, key) in zip(axes, _PANELS):
        _draw_cost_panel(ax, label, key, summary, variants, studies, best)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", ls="", color=f"C{i % 10}", label=s) for i, s in enumerate(studies)]
    handles.append(Line2D([], [], marker="s", ls="", color="white", markeredgecolor="black", label="a study's baseline"))
    axes[0].legend(handles=handles, fontsize=8, loc="best", ncol=2)
    where = ("one measuring pass, min–max over its rounds" if summary["source"] == "pass"
             else "the cells' eval runs under varying load, min–max over them")
    fig.suptitle(f"{summary['metric']} against cost; one cost per architecture ({where})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    return path
