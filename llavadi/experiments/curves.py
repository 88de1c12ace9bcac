"""Training curves of a study's cells, read from the TensorBoard event files the Trainer wrote.

Each stage of a run logs into `<run_dir>/<stage>/checkpoints/runs/<time_host>/events.out.tfevents.*`
(one folder per start: a resumed stage has several, and a later one's value for a step wins).
The curves are the total loss (`train/loss`) and every distillation term's share
(`train/loss/<term>`, e.g. `train/loss/ce`, `train/loss/forward_kl`).
"""

from __future__ import annotations

import glob
import math
import os

LOSS_TAG = "train/loss"


def read_scalars(folder: str) -> dict[str, list[tuple[int, float]]] | None:
    """Per tag, (step, value) sorted by step, over every event file under `folder`; None without tensorboard."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    files = sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True),
                   key=os.path.getmtime)
    merged: dict[str, dict[int, float]] = {}
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                merged.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def loss_curves(run_dir: str, stages: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]] | None:
    """Per stage (in order), per loss tag, the run's curve; None without tensorboard."""
    out = {}
    for stage in stages:
        scalars = read_scalars(os.path.join(run_dir, stage, "checkpoints", "runs"))
        if scalars is None:
            return None
        curves = {t: v for t, v in scalars.items() if t == LOSS_TAG or t.startswith(LOSS_TAG + "/")}
        if curves:
            out[stage] = curves
    return out


def plot_curves(cells: list[dict], path: str, title: str) -> str | None:
    """One panel per (stage, loss tag), one line per cell (colour = variant, style = seed); None if nothing to draw.

    `cells`: dicts with `variant`, `seed` and `curves` (as `loss_curves` returns).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    panels = list(dict.fromkeys((stage, tag) for c in cells for stage, tags in (c["curves"] or {}).items()
                                for tag in tags))
    if not panels:
        return None
    from llavadi.atomic import atomic_path

    variants = list(dict.fromkeys(c["variant"] for c in cells))
    seeds = sorted({c["seed"] for c in cells})
    colours = [f"C{i % 10}" for i in range(len(variants))]
    styles = ["-", "--", ":", "-."]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, (stage, tag) in zip(axes, panels):
        for c in cells:
            points = (c["curves"] or {}).get(stage, {}).get(tag)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], lw=1,
                        color=colours[variants.index(c["variant"])], ls=styles[seeds.index(c["seed"]) % len(styles)],
                        label=c["variant"] if c["seed"] == seeds[0] else None)
        ax.set_title(f"{stage}: {tag.removeprefix('train/')}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"{title}: training curves (line style = seed {', '.join(map(str, seeds))})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
