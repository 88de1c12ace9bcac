"""`llavadi eval`: answer a benchmark's questions with a saved model, score them, compare with a teacher.

Writes into --out: `answers.jsonl` (LLaVA's answer form: question_id, prompt, text, model_id),
`<benchmark>.json` + `<benchmark>.md` (metrics, via `llavadi.eval.report`) and, with --teacher,
`teacher_answers.jsonl`. The same run is available in-process as `evaluate(...)`; the
command line (flags, a suite of benchmarks, data-parallel processes) is llavadi.eval.suite's.

Before any model loads, the questions are checked: a question id listed twice with the same
prompt is an error (it would be counted twice), and every image is decoded completely (cached,
`llavadi.data.images`); a bad image stops the run, or with `--on-error skip` its question is
left out, listed under `skipped` in the result and scored as missing. Answers are appended to
`answers.journal.jsonl` (and `teacher_answers.journal.jsonl`) batch by batch, so a killed run
resumes where it stopped; the final files are written atomically, the result file last.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from llavadi.atomic import atomic_write
from llavadi.data.encode import SampleError
from llavadi.data.images import DEFAULT_MAX_PIXELS, check_images
from llavadi.eval.benchmarks import EvalDataError, get_benchmark, prediction_record, predictions_from_records
from llavadi.eval.generate import decode_answer, from_benchmark_questions, load_for_eval, question_image
from llavadi.eval.journal import AnswerJournal, journaled_answer_ids
from llavadi.eval.parallel import ONE_PROCESS, Shard
from llavadi.eval.report import write_result
from llavadi.identity import file_sha256, folder_identity
from llavadi.models.model_card import CARD_FILE, record_eval_result

ANSWERS_FILE = "answers.jsonl"
TEACHER_ANSWERS_FILE = "teacher_answers.jsonl"
JOURNAL_SUFFIX = ".journal.jsonl"
SHOWN_PROBLEMS = 10


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _score(benchmark, questions, records, annotations):
    if annotations is None:
        return None
    return benchmark.score(predictions_from_records(records), annotations, questions)


def read_eval_questions(bench, questions: str, images: str | None, limit: int | None):
    """The benchmark's questions (first `limit`) and their EvalQuestions; repeated questions raise."""
    bench_questions = bench.load_questions(questions)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        bench_questions = bench_questions[:limit]
    if not bench_questions:
        raise EvalDataError(f"{questions}: no questions")
    seen: dict[tuple, int] = {}
    for i, q in enumerate(bench_questions):
        # LLaVA's MME and TextVQA files give several questions one id (the prompt tells them apart);
        # the same id with the same prompt is one question listed twice, which would count twice
        key = (q.question_id, q.round_id, q.text)
        if key in seen:
            raise EvalDataError(f"{questions}: question id {q.question_id!r} appears twice with the same prompt "
                                f"(entries {seen[key] + 1} and {i + 1}); remove the repeat")
        seen[key] = i
    return bench_questions, from_benchmark_questions(bench_questions, images)


def _image_problems(eval_questions, images: str | None, progress: bool) -> dict[int, str]:
    """Index -> reason for each question whose image cannot be used (every image decoded once, cached)."""
    verdicts = check_images([q.image for q in eval_questions if q.image is not None], progress=progress,
                            desc="checking the images")
    problems = {}
    for i, q in enumerate(eval_questions):
        if q.image is not None:
            problem = verdicts[os.path.abspath(q.image)].problem(DEFAULT_MAX_PIXELS)
            if problem and not Path(q.image).is_file() and not images:
                problem += " (pass --images, the folder image paths are relative to)"
        elif q.image_base64 is not None:
            try:
                question_image(q)
                problem = None
            except SampleError as e:
                problem = str(e)
        else:
            problem = None
        if problem:
            problems[i] = f"question {q.question_id!r}: {problem}"
    return problems


def usable_questions(eval_questions, images: str | None, on_error: str, progress: bool) -> tuple[list[int], list[dict]]:
    """Indices of the questions to answer, and the skipped ones with reasons (on_error='skip')."""
    problems = _image_problems(eval_questions, images, progress)
    if problems and on_error == "raise":
        shown = "\n  ".join(list(problems.values())[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise EvalDataError(f"{len(problems)} question(s) with an unusable image:\n  {shown}{more}\n"
                            "Fix them, or pass --on-error skip to leave them out (scored as missing)")
    skipped = [{"question_id": eval_questions[i].question_id, "reason": r} for i, r in sorted(problems.items())]
    return [i for i in range(len(eval_questions)) if i not in problems], skipped


def _journal(out: Path, name: str, model_dir: str | None, bundle, settings: dict) -> AnswerJournal:
    """The answer journal of one model in `out`, under what its answers depend on."""
    model = folder_identity(model_dir) if model_dir and os.path.isdir(model_dir) else str(model_dir)
    # an exported model (llavadi.export) names its quantization; a torch model its parameters' dtype
    dtype = getattr(bundle, "quant", None) or str(next(bundle.model.parameters()).dtype)
    header = {**settings, "model": model, "template": bundle.template, "system": bundle.system, "dtype": dtype}
    return AnswerJournal(out / (name + JOURNAL_SUFFIX), header, log=lambda m: print(m, file=sys.stderr))


def _annotations(bench, annotations: str | None, questions: str, notes: list[str]):
    """The ground truth to score against, or None (with a note) when there is none."""
    if annotations is not None:
        return bench.load_annotations(annotations)
    if bench.questions_are_annotations:
        return bench.load_annotations(questions)  # e.g. the synthetic question file carries the answers
    notes.append(f"no --annotations for {bench.name}: answers written, not scored")
    return None


def _add_teacher_comparison(result: dict, bench, bench_questions, questions, keys, keep, student, teacher,
                            teacher_id: str, student_ids, ann, journal: AnswerJournal, batch_size: int,
                            max_new_tokens: int, progress: bool, shard: Shard) -> list[dict]:
    """Agreement and teacher-forced KL into `result`; returns the teacher's answer records (scored too)."""
    from llavadi.eval.agreement import measure_agreement

    teacher_ids = journaled_answer_ids(teacher, questions, journal, keys, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, progress=progress, desc="teacher answers",
                                       shard=shard)
    if hasattr(student, "answer_prompts"):  # an exported student: answers compared, no logits to compare
        return _add_answer_agreement(result, bench, bench_questions, keep, student, teacher, teacher_id, student_ids,
                                     teacher_ids, ann)
    agreement = measure_agreement(student, teacher, questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  progress=progress, student_answer_ids=student_ids, teacher_answer_ids=teacher_ids,
                                  shard=shard)
    teacher_records = [{**prediction_record(bench_questions[i], t), "model_id": teacher_id}
                       for i, t in zip(keep, agreement.teacher_answers)]
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
    return teacher_records


def _add_answer_agreement(result: dict, bench, bench_questions, keep, student, teacher, teacher_id: str,
                          student_ids, teacher_ids, ann) -> list[dict]:
    """Agreement of an exported student with the teacher (its runtime gives answers, not teacher-forced logits)."""
    from llavadi.eval.agreement import agreement_rate

    teacher_answers = [decode_answer(teacher.tokenizer, a) for a in teacher_ids]
    student_answers = [decode_answer(student.tokenizer, a) for a in student_ids]
    teacher_records = [{**prediction_record(bench_questions[i], t), "model_id": teacher_id}
                       for i, t in zip(keep, teacher_answers)]
    result["metrics"]["agreement"] = round(100.0 * agreement_rate(teacher_answers, student_answers), 4)
    teacher_scored = _score(bench, bench_questions, teacher_records, ann)
    if teacher_scored is not None:
        for key, value in teacher_scored.metrics.items():
            result["metrics"][f"teacher/{key}"] = value
    result["headline"] = list(result.get("headline", [])) + ["agreement"]
    result["notes"].append("agreement: % of questions where student and teacher greedy answers match after the "
                           "simple normaliser; no teacher_student_kl: the exported student's runtime is not "
                           "teacher-forced")
    return teacher_records


def _result(bench, bench_questions, records, ann, notes: list[str], model_id: str, skipped: list[dict]) -> dict:
    """The scored result (or an unscored one without ground truth), naming the run and what was skipped."""
    scored = _score(bench, bench_questions, records, ann)
    if scored is not None:
        result = scored.to_dict()
    else:
        result = {"benchmark": bench.name, "unit": "percent", "headline": [], "metrics": {},
                  "counts": {"questions": len(bench_questions), "predictions": len(records)},
                  "missing_ids": [], "unknown_ids": [], "notes": []}
    result["run"] = model_id
    result["notes"] = list(result.get("notes", [])) + notes
    if skipped:
        result["counts"]["skipped"] = len(skipped)
        result["skipped"] = skipped
        result["notes"].append(f"{len(skipped)} question(s) skipped for an unusable image (--on-error skip); "
                               "scored as missing")
    return result


def _identity(path: str | None):
    if path is None:
        return None
    if os.path.isfile(path):
        return file_sha256(path)
    return folder_identity(path) if os.path.isdir(path) else str(path)


def _write_outputs(out: Path, records: list[dict], teacher_records: list[dict] | None, result: dict,
                   journals: list[AnswerJournal]) -> None:
    """Answers, teacher answers, then the result (last: a result file names a complete set of answers)."""
    _write_jsonl(out / ANSWERS_FILE, records)
    if teacher_records is not None:
        _write_jsonl(out / TEACHER_ANSWERS_FILE, teacher_records)
    write_result(result, out)
    for journal in journals:
        journal.discard()


def evaluate(model_dir: str, benchmark: str, questions: str, images: str | None, out_dir: str,
             teacher_dir: str | None = None, annotations: str | None = None, batch_size: int = 16,
             max_new_tokens: int = 16, device: str = "auto", dtype: str = "auto", limit: int | None = None,
             template: str | None = None, system: str | None = None, teacher_template: str | None = None,
             teacher_system: str | None = None, name: str | None = None,
             benchmark_options: dict | None = None, progress: bool = True, student=None, teacher=None,
             on_error: str = "raise", update_card: bool = True, shard: Shard | None = None,
             cost: bool = True) -> dict:
    """Answer, score (and compare with a teacher); write answers + metrics files; return the result dict.

    `student` / `teacher` may be already loaded `LoadedModel`s (e.g. models just trained);
    then `model_dir` / `teacher_dir` only name them in the answer files. With `update_card`, the
    headline metrics go into the model folder's llavadi model card (README.md), if it has one.
    `shard`: under data parallelism (llavadi.eval.parallel) every process answers its share and
    gets the same result back; the main process alone writes files. `cost`: the main process also
    measures what each model costs to run (`llavadi.eval.cost`; `cost`, and `teacher_cost` beside it).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    shard = shard or ONE_PROCESS
    bench = get_benchmark(benchmark, **(benchmark_options or {}))
    bench_questions, eval_questions = read_eval_questions(bench, questions, images, limit)
    keep, skipped = usable_questions(eval_questions, images, on_error, progress and shard.is_main)
    notes: list[str] = []
    ann = _annotations(bench, annotations, questions, notes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"benchmark": bench.name, "options": benchmark_options or {}, "questions": _identity(questions),
                "limit": limit, "images": _identity(images), "max_new_tokens": max_new_tokens}
    asked = [eval_questions[i] for i in keep]
    keys = [f"{i}:{eval_questions[i].question_id}" for i in keep]
    if student is None:
        student = load_for_eval(model_dir, device=device, dtype=dtype, template=template, system=system)
    model_id = name or Path(model_dir).name
    journals = [_journal(out, "answers", model_dir, student, settings)]
    t0 = time.perf_counter()
    student_ids = journaled_answer_ids(student, asked, journals[0], keys, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, progress=progress, desc="answers", shard=shard)
    seconds = max(time.perf_counter() - t0, 1e-9)
    records = [{**prediction_record(bench_questions[i], decode_answer(student.tokenizer, a)), "model_id": model_id}
               for i, a in zip(keep, student_ids)]
    result = _result(bench, bench_questions, records, ann, notes, model_id, skipped)
    result["generation"] = _generation_info(model_dir, student, batch_size, max_new_tokens, seconds, len(records),
                                            shard.world)
    teacher_records = None
    if teacher_dir is not None or teacher is not None:
        if teacher is None:
            teacher = load_for_eval(teacher_dir, device=device, dtype=dtype, template=teacher_template,
                                    system=teacher_system)
        teacher_id = Path(teacher_dir).name if teacher_dir else "teacher"
        journals.append(_journal(out, "teacher_answers", teacher_dir, teacher, settings))
        teacher_records = _add_teacher_comparison(result, bench, bench_questions, asked, keys, keep, student, teacher,
                                                  teacher_id, student_ids, ann, journals[1], batch_size,
                                                  max_new_tokens, progress, shard)
    if shard.is_main:  # the main process alone measures cost and writes files
        if cost and asked and not hasattr(student, "answer_prompts"):
            _add_costs(result, student, teacher, asked, batch_size, max_new_tokens)
        elif cost and asked:
            result["notes"].append("no cost measured for an exported model here: benchmarks/export.py measures "
                                   "every variant side by side")
        result["question_set"] = {"questions": os.path.basename(str(questions)),
                                  "count": result["counts"]["questions"], "sha256": settings["questions"]}
        _write_outputs(out, records, teacher_records, result, journals)
        _update_card(result, model_dir, update_card)
    return result


def _generation_info(model_dir, student, batch_size: int, max_new_tokens: int, seconds: float, answered: int,
                     processes: int) -> dict:
    """How the answers were generated, and how fast."""
    return {"model": str(model_dir), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "seconds": round(seconds, 3), "questions_per_second": round(answered / seconds, 3),
            "template": student.template, "n_image_tokens": student.n_image_tokens, "processes": processes}


def _add_costs(result: dict, student, teacher, asked, batch_size: int, max_new_tokens: int) -> None:
    """Measure what each model costs to run (parameters, memory, latency) into the result."""
    from llavadi.eval.cost import measure_costs

    result.update(measure_costs(student, teacher, asked, batch_size, max_new_tokens))


def _update_card(result: dict, model_dir: str, enabled: bool) -> None:
    """Add the headline metrics to the model folder's llavadi model card, if it has one."""
    if enabled and os.path.isdir(model_dir) and record_eval_result(model_dir, result):
        result["notes"].append(f"results added to the model card {os.path.join(model_dir, CARD_FILE)}")
