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


PLOT_WIDTH_INCHES, PLOT_DPI = 9.6, 100  # 960 px wide: readable at a docs page's width


def seed_band(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Every step any series logged, and at each the mean, min and max over the series that logged it."""
    by_step = [dict(points) for points in series]
    steps = sorted(set().union(*by_step))
    values = [[b[s] for b in by_step if s in b] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _curve_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(fig, panels, spare, variants: list[str]) -> None:
    """One legend entry per variant (grid order): in the `spare` empty panel if any, else below the panels."""
    handles, labels = [], []
    for ax in panels:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = sorted(range(len(labels)), key=lambda k: variants.index(labels[k]))
    handles, labels = [handles[k] for k in order], [labels[k] for k in order]
    if spare is not None:
        spare.set_visible(True)
        spare.axis("off")
        spare.legend(handles, labels, loc="center", ncol=2 if len(labels) > 8 else 1, fontsize=8,
                     title="variant", title_fontsize=8)
    else:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)


def plot_curves(cells: list[dict], path: str, title: str) -> str | None:
    """One panel per (stage, loss tag), two panels a row; per variant the mean over its seeds, min–max shaded.

    `cells`: dicts with `variant`, `seed` and `curves` (as `loss_curves` returns). None if nothing to draw.
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
    colours = _curve_colours(len(variants))
    seeds = sorted({c["seed"] for c in cells})
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    spare = nrows * ncols > len(panels)  # the legend goes into the empty last panel, else below the panels
    legend_rows = 0 if spare else math.ceil(len(variants) / 4)
    fig = Figure(figsize=(PLOT_WIDTH_INCHES, 2.7 * nrows + 0.3 * legend_rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, (stage, tag) in zip(axes, panels):
        for i, variant in enumerate(variants):
            series = [c["curves"][stage][tag] for c in cells if c["variant"] == variant
                      and (c["curves"] or {}).get(stage, {}).get(tag)]
            if not series:
                continue
            steps, mean, low, high = seed_band(series)
            ax.plot(steps, mean, lw=1.2, color=colours[i], label=variant)
            if len(series) > 1:
                ax.fill_between(steps, low, high, color=colours[i], alpha=0.15, lw=0)
        ax.set_title(f"{stage}: {tag.removeprefix('train/')}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    _legend(fig, axes[:len(panels)], axes[-1] if spare else None, variants)
    fig.suptitle(f"{title}: training curves, mean over seeds {', '.join(map(str, seeds))} (shaded: min–max)",
                 fontsize=10)
    bottom = (0.3 * legend_rows + 0.3 * (not spare)) / (2.7 * nrows + 0.3 * legend_rows + 0.6)
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    return path
