"""What each model architecture of a set of studies costs to run, measured once, in one pass.

Every cell's eval run measures its student and teacher (`llavadi.eval.cost`), but cells run at
different times under different load, so the same architecture reads 3.5 ms per answer in one
cell and 8 in another. Here the studies' distinct architectures (the teacher's, and the
students' grouped by their `config.json`) are each loaded once, from one representative model
folder, and measured `repeats` times in interleaved rounds (teacher, student, teacher, student,
...), so that load drifting during the pass touches every model alike. Each architecture's cost
is the median over the rounds, with the rounds' minimum and maximum as its spread; ratios
(student against teacher) are taken per round, then their median.

Optionally the best student is exported to llama.cpp's GGUF (`llavadi.export`), each variant
scored on the study's eval set and timed at batch 1 the same way, in the same pass.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import statistics
import time
from dataclasses import dataclass, field

from llavadi.experiments.ablate import RUN_RECORD

# config.json entries that name or date a saved model without changing what it computes
_NOT_ARCHITECTURE = ("_name_or_path", "transformers_version", "architectures", "_commit_hash")
DEFAULT_REPEATS = 5
EXPORT_QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")


class CostPassError(ValueError):
    """A model folder the cost pass cannot read; the message names it."""


@dataclass
class Architecture:
    """One model architecture of the studies: a representative model folder and every cell that uses it."""

    key: str
    role: str  # "teacher" or "student"
    model_dir: str
    parameters: int | None = None
    cells: list[tuple[str, str, int]] = field(default_factory=list)  # (study, variant, seed)

    @property
    def name(self) -> str:
        """`teacher`, or `student (N parameters)` once measured (`student <key>` before): short enough for a table cell."""
        if self.role == "teacher":
            return "teacher"
        return f"student ({self.parameters:,} parameters)" if self.parameters else f"student {self.key[:8]}"


def architecture_key(model_dir: str) -> str:
    """A digest of the model folder's config.json without its name and version fields: equal for equal architectures."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CostPassError(f"{path}: no such file (the cell's model folder was removed?)") from None
    except json.JSONDecodeError as e:
        raise CostPassError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    kept = {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _teacher_dir(run: dict) -> str | None:
    """The teacher a cell was evaluated against (its run record's eval settings)."""
    try:
        with open(os.path.join(run["run_dir"], RUN_RECORD)) as f:
            return json.load(f).get("eval", {}).get("teacher")
    except (OSError, json.JSONDecodeError):
        return None


def find_architectures(studies) -> list[Architecture]:
    """The distinct architectures of the studies' cells (teachers first), each with the cells using it."""
    found: dict[tuple[str, str], Architecture] = {}
    for study in studies:
        for run in study.runs:
            cell = (study.name, run["variant"], run["seed"])
            for role, folder in (("teacher", _teacher_dir(run)), ("student", run.get("model"))):
                if not folder:
                    continue
                key = architecture_key(folder)
                arch = found.setdefault((role, key), Architecture(key, role, folder))
                arch.cells.append(cell)
    return sorted(found.values(), key=lambda a: a.role != "teacher")


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise_costs(costs: list[dict]) -> dict:
    """Median, min and max over several cost measurements (`llavadi.eval.cost.measure_cost` dicts) of one model."""
    return {"parameters": costs[0]["parameters"]["total"],
            "peak_memory_mb": _spread([c["peak_memory_bytes"] / 2**20 for c in costs]),
            "ms_per_answer_batch_1": _spread([c["batch_1"]["ms_per_answer"] for c in costs]),
            "tokens_per_second_batch_1": _spread([c["batch_1"]["tokens_per_second"] for c in costs]),
            "tokens_per_second_eval_batch": _spread([c["batch_eval"]["tokens_per_second"] for c in costs]),
            "eval_batch_size": costs[0]["batch_eval"]["batch_size"], "measurements": len(costs)}


def load_architectures(archs: list[Architecture], device: str = "auto", dtype: str = "auto",
                       log=print) -> dict[str, object]:
    """Each architecture's representative model, loaded once for evaluation on `device` in `dtype`."""
    from llavadi.eval.generate import load_for_eval

    bundles = {}
    for arch in archs:
        log(f"cost pass: loading the {arch.role} architecture from {arch.model_dir}")
        bundles[arch.key] = load_for_eval(arch.model_dir, device=device, dtype=dtype)
    return bundles


def measure_architectures(archs: list[Architecture], bundles: dict[str, object], questions: list, batch_size: int,
                          max_new_tokens: int, repeats: int = DEFAULT_REPEATS,
                          exported: dict[str, object] | None = None, log=print) -> dict[str, dict]:
    """Per architecture key: its `repeats` cost measurements, interleaved round by round, and their summary.

    `bundles`: per architecture key, its loaded model (`load_architectures`). `exported`: name -> an
    exported model already loaded (`load_exported`), timed at batch 1 in the same rounds
    (`time_batch_1`; llama.cpp's memory is not torch's, so no peak memory for them).
    """
    from llavadi.eval.cost import DEFAULT_LATENCY_QUESTIONS, measure_cost

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    exported = exported or {}
    rounds: dict[str, list[dict]] = {**{a.key: [] for a in archs}, **{name: [] for name in exported}}
    t0 = time.perf_counter()
    for r in range(repeats):
        for arch in archs:
            rounds[arch.key].append(measure_cost(bundles[arch.key], questions, batch_size, max_new_tokens))
        for name, bundle in exported.items():
            rounds[name].append(time_batch_1(bundle, questions, max_new_tokens, DEFAULT_LATENCY_QUESTIONS))
        log(f"cost pass: round {r + 1} of {repeats} ({time.perf_counter() - t0:.0f}s)")
    out = {}
    for arch in archs:
        out[arch.key] = {"role": arch.role, "model_dir": arch.model_dir,
                         "rounds": rounds[arch.key], "summary": summarise_costs(rounds[arch.key])}
        arch.parameters = out[arch.key]["summary"]["parameters"]
    for name in exported:
        out[name] = {"role": "exported", "rounds": rounds[name], "summary": {
            "ms_per_answer_batch_1": _spread([c["ms_per_answer"] for c in rounds[name]]),
            "tokens_per_second_batch_1": _spread([c["tokens_per_second"] for c in rounds[name]]),
            "measurements": repeats}}
    return out


def round_ratios(student: dict, teacher: dict) -> dict:
    """Student against teacher, per round then the median: speed at batch 1 and at the eval batch, memory."""
    pairs = list(zip(student["rounds"], teacher["rounds"]))
    return {"speed_batch_1": _spread([s["batch_1"]["tokens_per_second"] / t["batch_1"]["tokens_per_second"]
                                      for s, t in pairs]),
            "throughput_eval_batch": _spread([s["batch_eval"]["tokens_per_second"]
                                              / t["batch_eval"]["tokens_per_second"] for s, t in pairs]),
            "memory": _spread([t["peak_memory_bytes"] / s["peak_memory_bytes"] for s, t in pairs])}


def time_batch_1(bundle, questions: list, max_new_tokens: int, n: int) -> dict:
    """ms per answer and generated tokens/s answering the first `n` questions one by one, after one warm-up answer."""
    from llavadi.eval.generate import generate_answer_ids

    generate_answer_ids(bundle, questions[:1], batch_size=1, max_new_tokens=max_new_tokens, progress=False)
    t0 = time.perf_counter()
    answers = generate_answer_ids(bundle, questions[:n], batch_size=1, max_new_tokens=max_new_tokens, progress=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(a) for a in answers)
    return {"ms_per_answer": 1000.0 * seconds / len(answers), "tokens_per_second": tokens / seconds}


def export_and_score(student_dir: str, folder: str, quants: list[str], eval_spec: dict, teacher, teacher_dir: str,
                     threads: int, log=print) -> dict[str, dict]:
    """Export `student_dir` to GGUF in `folder` (`llavadi.export`), score each variant on the eval set with the teacher.

    Returns per variant name (`gguf-<quant>`): the loaded model (`bundle`), its metrics, file bytes.
    """
    from llavadi.eval.eval_command import evaluate
    from llavadi.export.gguf_runtime import load_exported
    from llavadi.export.gguf_target import export_gguf, model_file

    t0 = time.perf_counter()
    manifest = export_gguf(student_dir, folder, quants, force=True)
    log(f"cost pass: exported {student_dir} to {folder} ({', '.join(manifest['variants'])}) "
        f"in {time.perf_counter() - t0:.0f}s")
    out = {}
    for quant in quants:
        path = os.path.join(folder, model_file(quant))
        bundle = load_exported(path, threads=threads)
        result = evaluate(path, eval_spec["benchmark"], eval_spec["questions"], eval_spec["images"],
                          os.path.join(folder, f"eval-{quant}"), teacher_dir=teacher_dir,
                          annotations=eval_spec.get("annotations"), batch_size=eval_spec["batch_size"],
                          max_new_tokens=eval_spec["max_new_tokens"], limit=eval_spec.get("limit"),
                          name=f"gguf-{quant}", progress=False, student=bundle, teacher=teacher,
                          update_card=False, cost=False)
        out[f"gguf-{quant}"] = {"bundle": bundle, "metrics": result["metrics"], "quant": quant,
                                "file_bytes": sum(os.path.getsize(p) for p in bundle.files)}
        log(f"cost pass: gguf-{quant} scored {result['metrics']}")
    return out


def _eval_questions(eval_spec: dict) -> list:
    from llavadi.eval.benchmarks import get_benchmark
    from llavadi.eval.eval_command import read_eval_questions

    bench = get_benchmark(eval_spec["benchmark"])
    return read_eval_questions(bench, eval_spec["questions"], eval_spec["images"], eval_spec.get("limit"))[1]


def _best_cell(studies, best: dict) -> dict | None:
    """The best variant's cell with the lowest seed: the student that is exported."""
    for study in studies:
        if study.name == best["study"]:
            cells = sorted((r for r in study.runs if r["variant"] == best["variant"]), key=lambda r: r["seed"])
            return {"study": study.name, **cells[0]} if cells else None
    return None


def run_cost_pass(studies, best: dict | None, out_dir: str, repeats: int = DEFAULT_REPEATS,
                  quants: list[str] | None = None, log=print) -> dict:
    """Measure every architecture of the studies once (in `repeats` rounds), and optionally the best student's GGUF variants.

    The question set, batch size, answer length, device and dtype are the first study's eval settings.
    """
    import torch

    archs = find_architectures(studies)
    if not archs:
        raise CostPassError("no cell has a model folder to measure")
    spec = studies[0].grid["eval"]
    questions = _eval_questions(spec)
    bundles = load_architectures(archs, spec.get("device") or "auto", spec.get("dtype") or "auto", log)
    notes, exported, best_cell = [], {}, None
    if quants:
        best_cell = _best_cell(studies, best) if best else None
        teacher = next((a for a in archs if a.role == "teacher"), None)
        if importlib.util.find_spec("llama_cpp") is None:
            notes.append("no exported variants: llama-cpp-python is not installed (pip install 'llavadi[export]')")
        elif best_cell is None or teacher is None:
            notes.append("no exported variants: no best cell with a teacher to compare with")
        else:
            exported = export_and_score(best_cell["model"], os.path.join(out_dir, "export-gguf"), list(quants),
                                        spec, bundles[teacher.key], teacher.model_dir, torch.get_num_threads(), log)
    measured = measure_architectures(archs, bundles, questions, spec["batch_size"], spec["max_new_tokens"], repeats,
                                     {name: e["bundle"] for name, e in exported.items()}, log)
    return {"repeats": repeats, "threads": torch.get_num_threads(), "questions": spec["questions"],
            "architectures": [{"name": a.name, "role": a.role, "key": a.key, "model_dir": a.model_dir,
                               "cells": [list(c) for c in a.cells], **measured[a.key]} for a in archs],
            "exported": {name: {k: v for k, v in e.items() if k != "bundle"} | measured[name]
                         for name, e in exported.items()},
            "exported_from": best_cell and {k: best_cell[k] for k in ("study", "variant", "seed", "model")},
            "notes": notes}
