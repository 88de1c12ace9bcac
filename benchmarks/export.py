"""The distilled student where it is meant to run: every variant side by side, the teacher in the same run.

Variants: the teacher (HF, fp32), the distilled student (HF, fp32), the student with PyTorch
weight-only int8 (torchao's Int8WeightOnlyConfig when importable, else llavadi's plain
per-channel int8, named in the table), and the student exported with `llavadi export --to gguf`
run by llama.cpp (llama-cpp-python): f16, q8_0, q4_0, q4_k_m. Each variant runs in its own
process, once with 1 thread and once with 2, and answers the demo's held-out questions one at a
time (batch 1, greedy, `--max-new-tokens`) through `llavadi.eval.generate` (the eval's own
prompts and generation loop; llama.cpp behind it for the GGUF files). Per variant:
- accuracy (the synthetic benchmark's scorer, as `llavadi eval`) and agreement with the teacher's
  answers (exact match after the simple normaliser), from the 1-thread run;
- file size: the HF folder's safetensors; the GGUF language model + the f16 mmproj; for the
  PyTorch int8 model, which has no file, the bytes its weights hold in memory (labelled);
- peak memory: the process's peak RSS (VmHWM) and its growth over the RSS after the imports
  (the interpreter, torch and llama.cpp libraries are loaded in every process alike);
- time to first token: median over the questions of answering with max_new_tokens=1;
- ms per answer and tokens/s (answer tokens, eos included, over wall time), at batch 1;
- CPU-seconds per answer (user + system of the process); this machine exposes no power counter
  (no /sys/class/powercap), so energy is not measured; where RAPL is readable, the energy per
  answer (package counter, the whole machine's) is added.

    python benchmarks/export.py --demo runs/demo [--out runs/export-bench] [--questions 600] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
RAPL = "/sys/class/powercap/intel-rapl:0/energy_uj"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _energy_uj() -> int | None:
    try:
        with open(RAPL) as f:
            return int(f.read())
    except OSError:
        return None


def _load(variant: str, spec: dict, threads: int):
    """The variant's bundle (and the int8 backend used, for the PyTorch int8 variant)."""
    from llavadi.eval.generate import load_for_eval

    if variant.startswith("gguf-"):
        os.environ["LLAVADI_THREADS"] = str(threads)
        return load_for_eval(os.path.join(spec["gguf"], f"model-{variant[5:]}.gguf")), None
    bundle = load_for_eval(spec["teacher" if variant == "teacher-fp32" else "student"], device="cpu", dtype="float32")
    if variant == "student-int8":
        from llavadi.export.torch_int8 import quantize_int8_weight_only

        return bundle, quantize_int8_weight_only(bundle.model)
    if variant == "student-fp32-cpp-order":  # the HF model reading image tokens as llama.cpp does
        from llavadi.export.gguf_runtime import read_tokens_as_llama_cpp

        read_tokens_as_llama_cpp(bundle.model.model.vision_tower)
    return bundle, None


def _file_bytes(variant: str, spec: dict, bundle) -> tuple[int, str]:
    if variant.startswith("gguf-"):
        return sum(os.path.getsize(p) for p in bundle.files), "model + mmproj GGUF"
    if variant == "student-int8":
        from llavadi.export.torch_int8 import weight_bytes

        return weight_bytes(bundle.model), "weights in memory (no file)"
    folder = spec["teacher" if variant == "teacher-fp32" else "student"]
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.safetensors"))), "safetensors"


def run_worker(variant: str, spec: dict, threads: int) -> dict:
    """One variant at one thread count: load, warm up, time first tokens and whole answers."""
    import torch

    from llavadi.eval.benchmarks import get_benchmark
    from llavadi.eval.generate import decode_answer, from_benchmark_questions, generate_answer_ids

    torch.set_num_threads(threads)
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp  # noqa: F401  (every process loads the same libraries before the baseline RSS)

    rss_base = _status_kib("VmRSS")
    bundle, backend = _load(variant, spec, threads)
    bench_questions = get_benchmark("synthetic").load_questions(spec["questions"])[:spec["n_questions"]]
    questions = from_benchmark_questions(bench_questions, spec["images"])
    max_new = spec["max_new_tokens"]
    generate_answer_ids(bundle, questions[:1], batch_size=1, max_new_tokens=max_new, progress=False)  # warm-up
    first = []
    for q in questions[:spec["n_ttft"]]:
        t0 = time.perf_counter()
        generate_answer_ids(bundle, [q], batch_size=1, max_new_tokens=1, progress=False)
        first.append(time.perf_counter() - t0)
    usage0, energy0, t0 = resource.getrusage(resource.RUSAGE_SELF), _energy_uj(), time.perf_counter()
    ids = generate_answer_ids(bundle, questions, batch_size=1, max_new_tokens=max_new, progress=False)
    seconds = time.perf_counter() - t0
    usage1, energy1 = resource.getrusage(resource.RUSAGE_SELF), _energy_uj()
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    tokens = sum(len(a) for a in ids)
    size, size_kind = _file_bytes(variant, spec, bundle)
    n = len(questions)
    return {"variant": variant, "threads": threads, "int8_backend": backend, "answers": [
                decode_answer(bundle.tokenizer, a) for a in ids],
            "question_ids": [q.question_id for q in bench_questions], "file_bytes": size, "file_kind": size_kind,
            "peak_rss_mib": _status_kib("VmHWM") / 1024, "rss_growth_mib": (_status_kib("VmHWM") - rss_base) / 1024,
            "ttft_ms": 1000 * statistics.median(first), "ms_per_answer": 1000 * seconds / n,
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu, "cpu_s_per_answer": cpu / n,
            "energy_j_per_answer": None if energy0 is None or energy1 is None else (energy1 - energy0) / 1e6 / n,
            "tokens": tokens, "seconds": seconds}


def _spawn(variant: str, spec_path: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": REPO + os.pathsep +
           os.environ.get("PYTHONPATH", ""), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--worker", variant, "--spec", spec_path, "--threads",
                          str(threads)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} ({threads} threads) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _demo_models(demo: str) -> tuple[str, str, str]:
    """(teacher folder, first distilled student's folder, results file) of a finished `llavadi demo` run."""
    files = sorted(glob.glob(os.path.join(demo, "results*.json")), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"{demo}: no results*.json; run `llavadi demo --out {demo}` first, or pass --teacher/--student")
    with open(files[-1]) as f:
        runs = json.load(f)["runs"]
    return runs["teacher"]["generation"]["model"], runs["student_distilled-s0"]["generation"]["model"], files[-1]


def _random_models(out: str) -> tuple[str, str]:
    """The demo's teacher and student presets with random weights (seed 0): costs and fidelity, no accuracy."""
    from llavadi.models.build import LoadedModel, save_model
    from llavadi.models.presets import build_preset

    folders = []
    for preset in ("tiny-teacher", "tiny-student"):
        folder = os.path.join(out, f"random-{preset}")
        if not os.path.isdir(folder):
            model, tok, processor = build_preset(preset, seed=0)
            save_model(LoadedModel(model, tok, processor, {}), folder)
        folders.append(folder)
    return folders[0], folders[1]


def _export(student: str, out: str) -> str:
    """The student's GGUF export (made once; reused when its manifest names the same student files)."""
    from llavadi.export.gguf_target import export_gguf
    from llavadi.identity import folder_identity

    folder = os.path.join(out, "gguf")
    manifest_path = os.path.join(folder, "export.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if (manifest.get("source_identity") == json.loads(json.dumps(folder_identity(student)))
                and set(manifest["variants"]) == set(GGUF_QUANTS)):
            return folder
    export_gguf(student, folder, GGUF_QUANTS, force=True)
    return folder


def _score(spec: dict, row: dict, teacher_answers: list[str] | None, student_answers: list[str]) -> dict:
    """Accuracy by the synthetic benchmark's scorer; agreement with the teacher's and the fp32 student's answers."""
    from llavadi.eval.agreement import agreement_rate
    from llavadi.eval.benchmarks import get_benchmark, prediction_record, predictions_from_records

    bench = get_benchmark("synthetic")
    questions = bench.load_questions(spec["questions"])[:spec["n_questions"]]
    records = [prediction_record(q, text) for q, text in zip(questions, row["answers"])]
    scored = bench.score(predictions_from_records(records), bench.load_annotations(spec["questions"]), questions)
    out = {"accuracy": scored.metrics["accuracy"], "same_as_student": 100.0 * agreement_rate(student_answers,
                                                                                             row["answers"])}
    if teacher_answers is not None:
        out["agreement"] = 100.0 * agreement_rate(teacher_answers, row["answers"])
    return out


VARIANTS = (["teacher-fp32", "student-fp32", "student-fp32-cpp-order", "student-int8"]
            + [f"gguf-{q}" for q in GGUF_QUANTS])


def _row_line(row: dict, base: dict, scores: dict) -> str:
    name = row["variant"] + (f" ({row['int8_backend']})" if row["int8_backend"] else "")
    acc = scores["accuracy"]
    acc_ratio = f"{acc / base['accuracy']:.2f}x" if base["accuracy"] else "n/a"
    return (f"| {name} | {row['threads']} | {acc:.1f} | {scores.get('agreement', float('nan')):.1f} | "
            f"{scores['same_as_student']:.1f} | {acc_ratio} | {row['file_bytes'] / 1024:.0f} ({row['file_kind']}) | "
            f"{row['file_bytes'] / base['file_bytes']:.2f}x | {row['peak_rss_mib']:.0f} / {row['rss_growth_mib']:.1f} | "
            f"{row['ttft_ms']:.1f} | {row['ms_per_answer']:.1f} | {row['tokens_per_s']:.0f} | "
            f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x | {row['tokens_per_cpu_s']:.0f} | "
            f"{row['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x | {1000 * row['cpu_s_per_answer']:.1f} |")


HEADER = ("| variant | threads | accuracy | agreement with teacher | same answer as student fp32 | "
          "accuracy / student fp32 | size KiB | "
          "size / student fp32 | peak RSS / growth (MiB) | TTFT ms | ms per answer | tokens/s | tokens/s / student "
          "fp32 | tokens per CPU-s | per CPU-s / student fp32 | CPU-ms per answer |\n" + "|---" * 16 + "|")


def main() -> None:
    """Export the demo's distilled student, run every variant at each thread count, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="runs/demo", help="a finished `llavadi demo` output folder")
    p.add_argument("--random", action="store_true",
                   help="the demo's presets with random weights instead of a demo run: costs and fidelity only")
    p.add_argument("--teacher", help="teacher folder (default: the demo's)")
    p.add_argument("--student", help="distilled student folder (default: the demo's first seed)")
    p.add_argument("--out", default="runs/export-bench", help="where the export and the results go")
    p.add_argument("--questions", type=int, default=600, help="held-out questions answered (the demo's: 600)")
    p.add_argument("--ttft-questions", type=int, default=50, help="questions timed for the first token")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length cap (the demo's eval: 8)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        with open(args.spec) as f:
            print(json.dumps(run_worker(args.worker, json.load(f), args.threads[0])))
        return
    teacher, student, results_file = (args.teacher, args.student, None)
    os.makedirs(args.out, exist_ok=True)
    if args.random:
        teacher, student = _random_models(args.out)
        results_file = "none: random weights (accuracy is not meaningful)"
    elif not (teacher and student):
        teacher, student, results_file = _demo_models(args.demo)
    paths = {"questions": os.path.join(args.demo, "data-v1", "eval_questions.jsonl"),
             "images": os.path.join(args.demo, "data-v1", "images")}
    os.makedirs(args.out, exist_ok=True)
    spec = {"teacher": teacher, "student": student, "gguf": _export(student, args.out), **paths,
            "n_questions": args.questions, "n_ttft": args.ttft_questions, "max_new_tokens": args.max_new_tokens}
    spec_path = os.path.join(args.out, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=2)
    rows = []
    for threads in args.threads:
        for variant in VARIANTS:
            rows.append(_spawn(variant, spec_path, threads))
            print(f"{variant} x{threads}: {rows[-1]['ms_per_answer']:.1f} ms/answer", file=sys.stderr, flush=True)
    _report(rows, spec, args, results_file)


def _report(rows: list[dict], spec: dict, args, results_file: str | None) -> None:
    teacher_answers = {r["threads"]: r["answers"] for r in rows if r["variant"] == "teacher-fp32"}
    student_answers = {r["threads"]: r["answers"] for r in rows if r["variant"] == "student-fp32"}
    scores = [_score(spec, r, teacher_answers[r["threads"]] if r["variant"] != "teacher-fp32" else None,
                     student_answers[r["threads"]]) for r in rows]
    print(f"teacher {spec['teacher']}\nstudent {spec['student']}\nresults file {results_file}\n"
          f"{spec['n_questions']} questions, batch 1, max_new_tokens {spec['max_new_tokens']}; "
          f"energy: {'RAPL' if os.path.exists(RAPL) else 'no power counter here: CPU-seconds per answer instead'}\n")
    print(HEADER)
    for threads in args.threads:
        base_i = next(i for i, r in enumerate(rows) if r["variant"] == "student-fp32" and r["threads"] == threads)
        base = {**rows[base_i], **scores[base_i]}
        for row, score in zip(rows, scores):
            if row["threads"] == threads:
                print(_row_line(row, base, score))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"spec": spec, "rows": [{k: v for k, v in r.items() if k != "answers"} | s
                                          for r, s in zip(rows, scores)]}, f, indent=2)


if __name__ == "__main__":
    main()
