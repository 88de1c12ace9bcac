"""`llavadi eval`: answer a benchmark's questions with a saved model, score them, compare with a teacher.

Writes into --out: `answers.jsonl` (LLaVA's answer form: question_id, prompt, text, model_id),
`<benchmark>.json` + `<benchmark>.md` (metrics, via `llavadi.eval.report`) and, with --teacher,
`teacher_answers.jsonl`. The same run is available in-process as `evaluate(...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llavadi.eval.benchmarks import EvalDataError, get_benchmark, prediction_record, predictions_from_records
from llavadi.eval.generate import decode_answer, from_benchmark_questions, generate_answer_ids, load_for_eval
from llavadi.eval.report import write_result

ANSWERS_FILE = "answers.jsonl"
TEACHER_ANSWERS_FILE = "teacher_answers.jsonl"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to the CLI's subparsers."""
    from llavadi.eval.benchmarks import BENCHMARKS

    p = subparsers.add_parser("eval", help="generate answers to a benchmark with a saved model and score them")
    p.add_argument("--model", required=True, help="saved model directory (HF files + llavadi.json)")
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    p.add_argument("--questions", required=True, help="the benchmark's question file (LLaVA form)")
    p.add_argument("--images", default=None, help="folder the question file's image paths are relative to")
    p.add_argument("--annotations", default=None,
                   help="ground truth file/folder (not needed for 'synthetic'; without it, answers are not scored)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--teacher", default=None, help="teacher model directory: adds agreement and teacher-forced KL")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, else fp32), fp32, fp16, bf16")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--template", default=None, help="override the model's conversation template (llavadi.json)")
    p.add_argument("--system", default=None, help="override the model's system prompt (llavadi.json; '' for none)")
    p.add_argument("--teacher-template", default=None, help="override the teacher's conversation template")
    p.add_argument("--teacher-system", default=None, help="override the teacher's system prompt ('' for none)")
    p.add_argument("--name", default=None, help="run name in the results (default: the model folder's name)")
    p.add_argument("--all-rounds", action="store_true", help="mmbench: ask every rotation of the options")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """The `eval` subcommand: evaluate, print the metrics JSON."""
    try:
        result = evaluate(args.model, args.benchmark, args.questions, args.images, args.out,
                          teacher_dir=args.teacher, annotations=args.annotations, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
                          limit=args.limit, template=args.template, system=args.system,
                          teacher_template=args.teacher_template, teacher_system=args.teacher_system, name=args.name,
                          benchmark_options={"all_rounds": True} if args.all_rounds else None,
                          progress=not args.no_progress)
    except ValueError as err:  # EvalDataError, SampleError and bad options: a message, not a traceback
        print(f"llavadi eval: error: {err}", file=sys.stderr)
        return 2
    for note in result.get("notes", []):
        print(f"[{args.benchmark}] {note}", file=sys.stderr)
    print(json.dumps(result["metrics"], indent=2))
    return 0


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _score(benchmark, questions, records, annotations):
    if annotations is None:
        return None
    return benchmark.score(predictions_from_records(records), annotations, questions)


def _questions(bench, questions: str, images: str | None, limit: int | None):
    """The benchmark's questions (first `limit`) and their EvalQuestions; missing image files raise here."""
    bench_questions = bench.load_questions(questions)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        bench_questions = bench_questions[:limit]
    if not bench_questions:
        raise EvalDataError(f"{questions}: no questions")
    eval_questions = from_benchmark_questions(bench_questions, images)
    for q in eval_questions:  # fail before any model loads, naming the question
        if q.image is not None and not Path(q.image).is_file():
            raise EvalDataError(f"question {q.question_id!r}: image file {q.image} not found"
                                + ("" if images else " (pass --images, the folder image paths are relative to)"))
    return bench_questions, eval_questions


def _annotations(bench, annotations: str | None, questions: str, notes: list[str]):
    """The ground truth to score against, or None (with a note) when there is none."""
    if annotations is not None:
        return bench.load_annotations(annotations)
    if bench.questions_are_annotations:
        return bench.load_annotations(questions)  # e.g. the synthetic question file carries the answers
    notes.append(f"no --annotations for {bench.name}: answers written, not scored")
    return None


def _add_teacher_comparison(result: dict, bench, bench_questions, eval_questions, student, teacher, teacher_id: str,
                            student_ids, ann, out: Path, batch_size: int, max_new_tokens: int, progress: bool) -> None:
    """Agreement and teacher-forced KL into `result`; the teacher's answers (and their scores) written beside."""
    from llavadi.eval.agreement import measure_agreement

    agreement = measure_agreement(student, teacher, eval_questions, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, progress=progress, student_answer_ids=student_ids)
    teacher_records = [{**prediction_record(q, t), "model_id": teacher_id}
                       for q, t in zip(bench_questions, agreement.teacher_answers)]
    _write_jsonl(out / TEACHER_ANSWERS_FILE, teacher_records)
    result["metrics"]["agreement"] = round(100.0 * agreement.agreement, 4)
    result["metrics"]["teacher_student_kl"] = round(agreement.mean_kl, 6)
    result["counts"]["kl_answer_tokens"] = agreement.n_answer_tokens
    teacher_scored = _score(bench, bench_questions, teacher_records, ann)
    if teacher_scored is not None:
        for key, value in teacher_scored.metrics.items():
            result["metrics"][f"teacher/{key}"] = value
    result["headline"] = list(result.get("headline", [])) + ["agreement", "teacher_student_kl"]
    result["notes"].append("agreement: % of questions where student and teacher greedy answers match after "
                           "the simple normaliser; teacher_student_kl: mean KL(p_T||p_S) in nats per "
                           "teacher answer token, both models teacher-forced on the teacher's answers")


def evaluate(model_dir: str, benchmark: str, questions: str, images: str | None, out_dir: str,
             teacher_dir: str | None = None, annotations: str | None = None, batch_size: int = 16,
             max_new_tokens: int = 16, device: str = "auto", dtype: str = "auto", limit: int | None = None,
             template: str | None = None, system: str | None = None, teacher_template: str | None = None,
             teacher_system: str | None = None, name: str | None = None,
             benchmark_options: dict | None = None, progress: bool = True, student=None, teacher=None) -> dict:
    """Answer, score (and compare with a teacher); write answers + metrics files; return the result dict.

    `student` / `teacher` may be already loaded `LoadedModel`s (e.g. models just trained);
    then `model_dir` / `teacher_dir` only name them in the answer files.
    """
    bench = get_benchmark(benchmark, **(benchmark_options or {}))
    bench_questions, eval_questions = _questions(bench, questions, images, limit)
    notes: list[str] = []
    ann = _annotations(bench, annotations, questions, notes)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if student is None:
        student = load_for_eval(model_dir, device=device, dtype=dtype, template=template, system=system)
    model_id = name or Path(model_dir).name
    t0 = time.perf_counter()
    student_ids = generate_answer_ids(student, eval_questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                      progress=progress, desc="answers")
    seconds = time.perf_counter() - t0
    texts = [decode_answer(student.tokenizer, a) for a in student_ids]
    records = [{**prediction_record(q, t), "model_id": model_id} for q, t in zip(bench_questions, texts)]
    _write_jsonl(out / ANSWERS_FILE, records)

    scored = _score(bench, bench_questions, records, ann)
    if scored is not None:
        result = scored.to_dict()
    else:
        result = {"benchmark": bench.name, "unit": "percent", "headline": [], "metrics": {},
                  "counts": {"questions": len(bench_questions), "predictions": len(records)},
                  "missing_ids": [], "unknown_ids": [], "notes": []}
    result["run"] = model_id
    result["notes"] = list(result.get("notes", [])) + notes
    result["generation"] = {"model": str(model_dir), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                            "seconds": round(seconds, 3), "questions_per_second": round(len(records) / seconds, 3),
                            "template": student.template, "n_image_tokens": student.n_image_tokens}

    if teacher_dir is not None or teacher is not None:
        if teacher is None:
            teacher = load_for_eval(teacher_dir, device=device, dtype=dtype, template=teacher_template,
                                    system=teacher_system)
        teacher_id = Path(teacher_dir).name if teacher_dir else "teacher"
        _add_teacher_comparison(result, bench, bench_questions, eval_questions, student, teacher, teacher_id,
                                student_ids, ann, out, batch_size, max_new_tokens, progress)
    write_result(result, out)
    return result
