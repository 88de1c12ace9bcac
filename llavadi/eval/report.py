"""Result files: metrics JSON + markdown for one result, and one table combining many."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llavadi.atomic import write_text_atomic
from llavadi.eval.benchmarks import EvalDataError, ScoreResult


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def result_markdown(result: dict) -> str:
    """A two-column markdown table (metric, value) for one result dict, headline metrics first."""
    metrics = result["metrics"]
    order = [m for m in result.get("headline", []) if m in metrics] + \
            [m for m in metrics if m not in result.get("headline", [])]
    title = f"{result['benchmark']}" + (f" — {result['run']}" if result.get("run") else "")
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_format(metrics[name])} |" for name in order]
    counts = result.get("counts", {})
    if counts:
        lines += ["", "counts: " + ", ".join(f"{k}={v}" for k, v in counts.items())]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write_result(result: ScoreResult | dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `<benchmark>.json` and `<benchmark>.md` into out_dir; return both paths."""
    data = result.to_dict() if isinstance(result, ScoreResult) else result
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{data['benchmark']}.json"
    md_path = out_dir / f"{data['benchmark']}.md"
    write_text_atomic(md_path, result_markdown(data))
    write_text_atomic(json_path, json.dumps(data, indent=2) + "\n")  # last: the result names a complete run
    return json_path, md_path


def load_result(path: str | os.PathLike) -> dict:
    """A result JSON written by `write_result`; a file of another shape raises naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    for key in ("benchmark", "metrics"):
        if not isinstance(data, dict) or key not in data:
            raise EvalDataError(f"{path}: not a result file (no {key!r}); write one with `llavadi score --out`")
    return data


def combine(results: list[dict], names: list[str] | None = None, all_metrics: bool = False) -> str:
    """One markdown table: rows = runs, columns = benchmark/metric (headline metrics unless all_metrics).

    `names` labels the rows (default: each result's run, else its position); results of one
    run on several benchmarks share a row.
    """
    rows: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for i, result in enumerate(results):
        run = (names[i] if names else None) or result.get("run") or f"run{i + 1}"
        chosen = list(result["metrics"]) if all_metrics else \
            [m for m in result.get("headline") or list(result["metrics"])[:1] if m in result["metrics"]]
        row = rows.setdefault(run, {})
        for metric in chosen:
            column = f"{result['benchmark']}/{metric}"
            if column in row:
                raise EvalDataError(f"two results give {column} for run {run!r}; give the runs distinct names")
            row[column] = result["metrics"][metric]
            if column not in columns:
                columns.append(column)
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for run, values in rows.items():
        lines.append(f"| {run} | " + " | ".join(_format(values[c]) if c in values else "–" for c in columns) + " |")
    return "\n".join(lines) + "\n"
