"""The distilled student where it is meant to run: every variant side by side, the teacher in the same run.

Variants: the teacher (HF, fp32), the distilled student (HF, fp32), the student with PyTorch
weight-only int8 (torchao's Int8WeightOnlyConfig when importable, else llavadi's plain
per-channel int8, named in the table), and the student exported with `llavadi export --to gguf`
run by llama.cpp (llama-cpp-python): f16, q8_0, q4_0, q4_k_m; and, to separate the runtime's
token order from conversion and quantization, the HF student reading its image tokens as
llama.cpp's LLaVA graph does with CLIP's position table (student-fp32-cpp-order) and with the
rotated one the export writes (student-fp32-cpp-rotated), and llama.cpp's features each in its
own image-token slot (student-fp32-cpp-aligned, an analysis). Each variant runs in its own
process, once with 1 thread and once with 2, and answers the demo's held-out questions one at a
time (batch 1, greedy, `--max-new-tokens`) through `llavadi.eval.generate` (the eval's own
prompts and generation loop; llama.cpp behind it for the GGUF files). Per variant:
- accuracy (the synthetic benchmark's scorer, as `llavadi eval`) and agreement with the teacher's
  answers (exact match after the simple normaliser), per run;
- file size: the HF folder's safetensors; the GGUF language model + the f16 mmproj; for the
  PyTorch int8 model, which has no file, the bytes its weights hold in memory (labelled);
- peak memory: the process's peak RSS (VmHWM) and its growth over the RSS before the model
  loaded (the interpreter, torch and llama.cpp libraries are loaded in every process alike);
- time to first token: median over the questions of answering with max_new_tokens=1;
- ms per answer and tokens/s (answer tokens, eos included, over wall time), at batch 1;
- CPU-seconds per answer (user + system of the process); this machine exposes no power counter
  (no /sys/class/powercap), so energy is not measured; where RAPL is readable, the energy per
  answer (package counter, the whole machine's) is added.

The rows, their ratios to the fp32 student and the goal's check go to `--out`/results.json
(schema `llavadi-export-bench/1`, described in docs/export.md).

    python benchmarks/export.py --demo runs/demo [--out runs/export-bench] [--questions 600] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GGUF_QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
# HF variants that read the image tokens as llama.cpp's LLaVA graph does, with each position table
CPP_ORDER = {"student-fp32-cpp-order": "hf", "student-fp32-cpp-rotated": "rotated"}
# an analysis, not a runtime: llama.cpp's features with the rotated table, each in its own image-token slot
# (the class token in the first patch's, whose output llama.cpp drops): what the one-slot shift costs
ALIGNED = "student-fp32-cpp-aligned"
RESULTS_SCHEMA = "llavadi-export-bench/1"


def _load(variant: str, spec: dict):
    """The HF variant's bundle (and the int8 backend used, for the PyTorch int8 variant)."""
    from llavadi.eval.generate import load_for_eval

    bundle = load_for_eval(spec["teacher" if variant == "teacher-fp32" else "student"], device="cpu", dtype="float32")
    if variant == "student-int8":
        from llavadi.export.torch_int8 import quantize_int8_weight_only

        return bundle, quantize_int8_weight_only(bundle.model)
    if variant in CPP_ORDER:  # the HF model reading image tokens as llama.cpp does, with that position table
        from llavadi.export.gguf_runtime import read_tokens_as_llama_cpp

        read_tokens_as_llama_cpp(bundle.model.model.vision_tower, CPP_ORDER[variant])
    if variant == ALIGNED:
        _read_tokens_aligned(bundle.model.model.vision_tower)
    return bundle, None


def _read_tokens_aligned(vision_tower) -> None:
    """The HF tower fed [patch 1, CLS, patch 2..n] with their own positions: after it drops row 0 (patch 1),
    it gives [CLS, patch 2..n], the outputs llama.cpp computes with the rotated table (attention does not
    depend on the tokens' order), with each patch in its own image-token slot."""
    import torch

    tower = getattr(vision_tower, "vision_model", vision_tower)
    emb = tower.embeddings
    order = [1, 0, *range(2, emb.position_embedding.weight.shape[0])]

    def forward(pixel_values, interpolate_pos_encoding=False):
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        tokens = torch.cat([patches[:, :1], cls, patches[:, 1:]], 1)
        return tokens + emb.position_embedding.weight[order][None]

    emb.forward = forward


def _hf_bytes(variant: str, spec: dict, bundle) -> tuple[int, str]:
    if variant == "student-int8":
        from llavadi.export.torch_int8 import weight_bytes

        return weight_bytes(bundle.model), "weights in memory (no file)"
    folder = spec["teacher" if variant == "teacher-fp32" else "student"]
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.safetensors"))), "safetensors"


def run_worker(variant: str, spec: dict, threads: int) -> dict:
    """One variant at one thread count, in this process: load, warm up, time first tokens and whole answers."""
    import torch

    from llavadi.eval.benchmarks import get_benchmark
    from llavadi.eval.decode import eos_token_ids
    from llavadi.eval.generate import (
        decode_answer,
        encode_question,
        from_benchmark_questions,
        generate_answer_ids,
        question_image,
    )
    from llavadi.export.gguf_runtime import load_export_prompter
    from llavadi.export.measure import measure_answers, measure_exported
    from llavadi.process_memory import status_kib

    torch.set_num_threads(threads)
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp  # noqa: F401  (every process loads the same libraries before the baseline RSS)
    bench_questions = get_benchmark("synthetic").load_questions(spec["questions"])[:spec["n_questions"]]
    questions = from_benchmark_questions(bench_questions, spec["images"])
    if variant.startswith("gguf-"):
        folder = spec["gguf"]
        prompter = load_export_prompter(folder)  # the export's tokenizer, template and config; no weights
        tokenizer = prompter.tokenizer
        eos = eos_token_ids(prompter.model, tokenizer)
        prompts = [encode_question(prompter.encoder(), q) for q in questions]
        images = [question_image(q) if q.has_image else None for q in questions]
        row = measure_exported(os.path.join(folder, f"model-{variant[5:]}.gguf"), prompts, images,
                               spec["max_new_tokens"], eos, spec["n_ttft"], threads)
        row.update(int8_backend=None, file_kind="model + mmproj GGUF")
    else:
        baseline = status_kib("VmRSS")
        bundle, backend = _load(variant, spec)

        def answer(indices, new_tokens):
            return generate_answer_ids(bundle, [questions[i] for i in indices], batch_size=1,
                                       max_new_tokens=new_tokens, progress=False)

        row = measure_answers(answer, len(questions), spec["max_new_tokens"], spec["n_ttft"], baseline)
        size, kind = _hf_bytes(variant, spec, bundle)
        row.update(int8_backend=backend, file_bytes=size, file_kind=kind, threads=threads)
        tokenizer = bundle.tokenizer
    row["answers"] = [decode_answer(tokenizer, a) for a in row["answers"]]
    return {"variant": variant, **row, "question_ids": [q.question_id for q in bench_questions]}


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


def _export(student: str, out: str, position_table: str) -> str:
    """The student's GGUF export (made once; reused when its manifest names the same student files)."""
    from llavadi.export.gguf_target import export_gguf, resolve_position_order
    from llavadi.identity import folder_identity

    folder = os.path.join(out, "gguf")
    manifest_path = os.path.join(folder, "export.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if (manifest.get("source_identity") == json.loads(json.dumps(folder_identity(student)))
                and set(manifest["variants"]) == set(GGUF_QUANTS)
                and (manifest.get("position_table") or {}).get("order") == resolve_position_order(position_table)["order"]):
            return folder
    export_gguf(student, folder, GGUF_QUANTS, force=True, position_table=position_table)
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


VARIANTS = (["teacher-fp32", "student-fp32", *CPP_ORDER, ALIGNED, "student-int8"]
            + [f"gguf-{q}" for q in GGUF_QUANTS])
GOAL = {"variant": "gguf-q4_0", "accuracy_vs_student": 0.95, "size_vs_student": 0.3, "tokens_per_s_vs_student": 2.0}


def _ratios(row: dict, base: dict) -> dict:
    """The row's accuracy, size, tokens/s and tokens per CPU-second over the fp32 student's at its thread count."""
    def ratio(key):
        return row[key] / base[key] if row.get(key) is not None and base.get(key) else None

    return {"accuracy_vs_student": ratio("accuracy"), "size_vs_student": ratio("file_bytes"),
            "tokens_per_s_vs_student": ratio("tokens_per_s"), "tokens_per_cpu_s_vs_student": ratio("tokens_per_cpu_s")}


def _goal(rows: list[dict]) -> list[dict]:
    """Per thread count: whether the 4-bit GGUF keeps the accuracy, size and speed the goal asks."""
    out = []
    for row in rows:
        if row["variant"] == GOAL["variant"]:
            checks = {"accuracy": (row["accuracy_vs_student"] or 0) >= GOAL["accuracy_vs_student"],
                      "size": (row["size_vs_student"] or 1e9) <= GOAL["size_vs_student"],
                      "tokens_per_s": (row["tokens_per_s_vs_student"] or 0) >= GOAL["tokens_per_s_vs_student"]}
            out.append({"threads": row["threads"], **checks, "met": all(checks.values())})
    return out


def _x(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _row_line(row: dict) -> str:
    name = row["variant"] + (f" ({row['int8_backend']})" if row["int8_backend"] else "")
    agreement = "–" if row.get("agreement") is None else f"{row['agreement']:.1f}"
    return (f"| {name} | {row['threads']} | {row['accuracy']:.1f} | {agreement} | "
            f"{row['same_as_student']:.1f} | {_x(row['accuracy_vs_student'])} | "
            f"{row['file_bytes'] / 1024:.0f} ({row['file_kind']}) | {_x(row['size_vs_student'])} | "
            f"{row['peak_rss_mib']:.0f} / {row['rss_growth_mib']:.1f} | {row['ttft_ms']:.1f} | "
            f"{row['ms_per_answer']:.1f} | {row['tokens_per_s']:.0f} | {_x(row['tokens_per_s_vs_student'])} | "
            f"{row['tokens_per_cpu_s']:.0f} | {_x(row['tokens_per_cpu_s_vs_student'])} | "
            f"{1000 * row['cpu_s_per_answer']:.1f} |")


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
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                   help="variants to run (teacher-fp32 and student-fp32 are always run: the ratios' bases)")
    p.add_argument("--position-table", default="auto", choices=("auto", "rotated", "hf"),
                   help="the export's mmproj position table (`llavadi export --position-table`)")
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
    spec = {"teacher": teacher, "student": student, "gguf": _export(student, args.out, args.position_table), **paths,
            "n_questions": args.questions, "n_ttft": args.ttft_questions, "max_new_tokens": args.max_new_tokens}
    from llavadi.atomic import write_json_atomic

    spec_path = write_json_atomic(os.path.join(args.out, "spec.json"), spec)
    variants = [v for v in VARIANTS if v in {"teacher-fp32", "student-fp32", *args.variants}]
    rows = []
    for threads in args.threads:
        for variant in variants:
            rows.append(_spawn(variant, spec_path, threads))
            print(f"{variant} x{threads}: {rows[-1]['ms_per_answer']:.1f} ms/answer", file=sys.stderr, flush=True)
    _report(rows, spec, args, results_file)


def _report(rows: list[dict], spec: dict, args, results_file: str | None) -> None:
    """Score every row, print the table, write `--out`/results.json (schema in docs/export.md)."""
    from llavadi.atomic import write_json_atomic
    from llavadi.export.measure import RAPL

    teacher_answers = {r["threads"]: r["answers"] for r in rows if r["variant"] == "teacher-fp32"}
    student_answers = {r["threads"]: r["answers"] for r in rows if r["variant"] == "student-fp32"}
    scored = [{k: v for k, v in r.items() if k != "answers"} | _score(
        spec, r, teacher_answers[r["threads"]] if r["variant"] != "teacher-fp32" else None,
        student_answers[r["threads"]]) for r in rows]
    for row in scored:
        row.update(_ratios(row, next(b for b in scored if b["variant"] == "student-fp32"
                                     and b["threads"] == row["threads"])))
    with open(os.path.join(spec["gguf"], "export.json")) as f:
        positions = json.load(f).get("position_table")
    energy = "RAPL" if os.path.exists(RAPL) else "no power counter here: CPU-seconds per answer instead"
    print(f"teacher {spec['teacher']}\nstudent {spec['student']}\nresults file {results_file}\n"
          f"{spec['n_questions']} questions, batch 1, max_new_tokens {spec['max_new_tokens']}; energy: {energy}\n"
          f"GGUF position table: {json.dumps(positions)}\n")
    print(HEADER)
    for threads in args.threads:
        for row in scored:
            if row["threads"] == threads:
                print(_row_line(row))
    goal = _goal(scored)
    print(f"\ngoal ({json.dumps(GOAL)}): {json.dumps(goal)}")
    write_json_atomic(os.path.join(args.out, "results.json"), {
        "schema": RESULTS_SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]), "spec": spec,
        "position_table": positions, "energy": energy, "goal": {"target": GOAL, "per_threads": goal},
        "rows": scored})


if __name__ == "__main__":
    main()
