"""`llavadi eval` on several benchmarks in one call, data-parallel under `torchrun` / `accelerate launch`.

A suite file (YAML) lists the benchmarks, paths relative to the file:

    - {benchmark: pope, questions: pope/llava_pope_test.jsonl, images: coco/val2014, annotations: pope/coco}
    - {benchmark: mmbench, questions: mmbench/mmbench_dev_20230712.tsv, all_rounds: true}
    - {benchmark: synthetic, questions: synth/eval_questions.jsonl, images: synth/images, limit: 200}

Every entry's files are checked before any model loads; the models load once; each benchmark
writes into `<out>/<benchmark>/` (`<out>/<name>/` with a `name`), and `<out>/results.md` and
`results.json` combine the headline metrics. One benchmark given by flags writes into `<out>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llavadi.eval.benchmarks import BENCHMARKS, EvalDataError, get_benchmark
from llavadi.eval.eval_command import evaluate, read_eval_questions, usable_questions
from llavadi.eval.parallel import Shard, start_data_parallel, stop_data_parallel

SUITE_RESULTS = "results"


@dataclass
class SuiteEntry:
    """One benchmark of a suite: its files and options."""

    benchmark: str
    questions: str
    images: str | None = None
    annotations: str | None = None
    limit: int | None = None
    all_rounds: bool = False
    name: str | None = None  # output folder (default: the benchmark's name)
    where: str = field(default="", compare=False)

    @property
    def folder(self) -> str:
        """The entry's output folder name."""
        return self.name or self.benchmark

    @property
    def options(self) -> dict:
        """Benchmark constructor options."""
        return {"all_rounds": True} if self.all_rounds else {}


_ENTRY_TYPES = {"benchmark": (str,), "questions": (str,), "images": (str, type(None)),
                "annotations": (str, type(None)), "limit": (int, type(None)), "all_rounds": (bool,),
                "name": (str, type(None))}


def _entry_problems(raw, where: str) -> list[str]:
    """Every mistake of one suite entry (empty: usable)."""
    keys = set(_ENTRY_TYPES)
    if not isinstance(raw, dict):
        return [f"{where}: expected a mapping with {sorted(keys)}"]
    problems = []
    unknown = sorted(set(raw) - keys)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(keys)}")
    for key in ("benchmark", "questions"):
        if not isinstance(raw.get(key), str):
            problems.append(f"{where}: `{key}` is required (a string)")
    for key, types in _ENTRY_TYPES.items():
        value = raw.get(key)
        if key in raw and key not in ("benchmark", "questions") and (
                not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            problems.append(f"{where}.{key}: expected {' or '.join(t.__name__ for t in types)}, got {value!r}")
    if isinstance(raw.get("benchmark"), str) and raw["benchmark"] not in BENCHMARKS:
        problems.append(f"{where}: unknown benchmark {raw['benchmark']!r}; choose one of {sorted(BENCHMARKS)}")
    return problems


def _entry(raw: dict, where: str, base: str) -> SuiteEntry:
    entry = SuiteEntry(**raw, where=where)
    for key in ("questions", "images", "annotations"):
        value = getattr(entry, key)
        if value is not None and not os.path.isabs(value):
            setattr(entry, key, os.path.normpath(os.path.join(base, value)))
    return entry


def _raise_all(problems: list[str], what: str) -> None:
    if len(problems) == 1:
        raise EvalDataError(problems[0])
    if problems:
        raise EvalDataError(f"{len(problems)} problems in {what}:\n  - " + "\n  - ".join(problems))


def load_suite(path: str) -> list[SuiteEntry]:
    """The entries of a suite file; every mistake is named at once, each with the file and the entry."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read suite file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise EvalDataError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, list) or not raw:
        raise EvalDataError(f"{path}: a suite is a non-empty list of benchmarks ({{benchmark, questions, ...}})")
    base = os.path.dirname(os.path.abspath(path))
    problems = [p for i, item in enumerate(raw) for p in _entry_problems(item, f"{path}[{i}]")]
    _raise_all(problems, path)
    entries = [_entry(item, f"{path}[{i}]", base) for i, item in enumerate(raw)]
    folders = [e.folder for e in entries]
    twice = sorted({f for f in folders if folders.count(f) > 1})
    if twice:
        raise EvalDataError(f"{path}: {twice} appear twice; give the entries distinct `name`s (output folders)")
    return entries


def check_inputs(entries: list[SuiteEntry], on_error: str = "raise") -> None:
    """Read every entry's questions, check its images and that its annotations exist, before any model loads;
    every entry's problem is named at once."""
    problems = []
    for entry in entries:
        try:
            bench = get_benchmark(entry.benchmark, **entry.options)
            _, eval_questions = read_eval_questions(bench, entry.questions, entry.images, entry.limit)
            usable_questions(eval_questions, entry.images, on_error, progress=False)
            if entry.annotations is not None and not os.path.exists(entry.annotations):
                raise EvalDataError(f"annotations {entry.annotations} not found")
        except ValueError as e:
            problems.append(f"{entry.where}: {e}" if entry.where else str(e))
    _raise_all(problems, "the benchmarks' inputs")


def run_suite(entries: list[SuiteEntry], args: argparse.Namespace, shard: Shard, device: str,
              separate_folders: bool) -> list[dict]:
    """Load the models once, evaluate every entry; returns each entry's result."""
    from llavadi.eval.generate import load_for_eval

    student = load_for_eval(args.model, device=device, dtype=args.dtype, template=args.template, system=args.system)
    teacher = None
    if args.teacher:
        teacher = load_for_eval(args.teacher, device=device, dtype=args.dtype, template=args.teacher_template,
                                system=args.teacher_system)
    results = []
    for entry in entries:
        out = os.path.join(args.out, entry.folder) if separate_folders else args.out
        results.append(evaluate(args.model, entry.benchmark, entry.questions, entry.images, out,
                                teacher_dir=args.teacher, annotations=entry.annotations, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, limit=entry.limit, name=args.name,
                                benchmark_options=entry.options, progress=not args.no_progress, student=student,
                                teacher=teacher, on_error=args.on_error, update_card=not args.no_model_card,
                                shard=shard, cost=not getattr(args, "no_cost", False)))
    return results


def _entries_from_args(args: argparse.Namespace) -> tuple[list[SuiteEntry], bool]:
    """(entries, whether each gets its own folder): the suite file's, or the one benchmark of the flags."""
    single = ("benchmark", "questions", "images", "annotations", "limit", "all_rounds")
    if args.suite:
        given = [f"--{k.replace('_', '-')}" for k in single if getattr(args, k) not in (None, False)]
        if given:
            raise EvalDataError(f"{', '.join(given)}: with --suite, give these per benchmark in the suite file")
        return load_suite(args.suite), True
    if not args.benchmark or not args.questions:
        raise EvalDataError("give --benchmark and --questions (one benchmark), or --suite FILE (several)")
    return [SuiteEntry(args.benchmark, args.questions, args.images, args.annotations, args.limit,
                       args.all_rounds)], False


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("eval", help="generate answers to benchmarks with a saved model and score them "
                                           "(data-parallel under torchrun / accelerate launch)")
    p.add_argument("--model", required=True, help="saved model directory (HF files + llavadi.json)")
    p.add_argument("--suite", default=None, help="YAML list of benchmarks ({benchmark, questions, images, "
                                                  "annotations, limit, all_rounds, name}): several in one call")
    p.add_argument("--benchmark", default=None, choices=sorted(BENCHMARKS), help="one benchmark to answer and score")
    p.add_argument("--questions", default=None, help="the benchmark's question file (LLaVA form)")
    p.add_argument("--images", default=None, help="folder the question file's image paths are relative to")
    p.add_argument("--annotations", default=None,
                   help="ground truth file/folder (not needed for 'synthetic'; without it, answers are not scored)")
    p.add_argument("--out", required=True, help="output folder (a suite: one subfolder per benchmark)")
    p.add_argument("--teacher", default=None, help="teacher model directory: adds agreement and teacher-forced KL")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer, in tokens")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (data-parallel: each process "
                                                     "takes cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, else fp32), fp32, fp16, bf16")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--template", default=None, help="override the model's conversation template (llavadi.json)")
    p.add_argument("--system", default=None, help="override the model's system prompt (llavadi.json; '' for none)")
    p.add_argument("--teacher-template", default=None, help="override the teacher's conversation template")
    p.add_argument("--teacher-system", default=None, help="override the teacher's system prompt ('' for none)")
    p.add_argument("--name", default=None, help="run name in the results (default: the model folder's name)")
    p.add_argument("--all-rounds", action="store_true", help="mmbench: ask every rotation of the options")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="questions with a bad image: stop before any model loads (default), or leave them out "
                        "(listed in the result, scored as missing)")
    p.add_argument("--no-model-card", action="store_true",
                   help="leave the model's card (README.md) as it is; by default the results are added to it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-cost", action="store_true",
                   help="do not measure parameters, peak memory, latency and throughput")
    p.set_defaults(func=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    """The `eval` subcommand: check every input, evaluate (data-parallel when launched so), print the metrics."""
    shard = None
    try:
        entries, separate = _entries_from_args(args)
        check_inputs(entries, args.on_error)
        shard, device = start_data_parallel(args.device)
        results = run_suite(entries, args, shard, device, separate)
    except (ValueError, FileNotFoundError) as err:  # EvalDataError, SampleError, bad options: a message
        print(f"llavadi eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        if shard is not None:
            stop_data_parallel(shard)
    if not shard.is_main:
        return 0
    for entry, result in zip(entries, results):
        for note in result.get("notes", []):
            print(f"[{entry.folder}] {note}", file=sys.stderr)
    if not separate:
        print(json.dumps(results[0]["metrics"], indent=2))
        return 0
    _write_suite_results(args.out, entries, results)
    print(json.dumps({e.folder: r["metrics"] for e, r in zip(entries, results)}, indent=2))
    return 0


def _write_suite_results(out: str, entries: list[SuiteEntry], results: list[dict]) -> None:
    from llavadi.eval.report import combine

    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"{SUITE_RESULTS}.json").write_text(
        json.dumps({e.folder: r for e, r in zip(entries, results)}, indent=2) + "\n", encoding="utf-8")
    # one row (the model), a column per entry's headline metric
    Path(out, f"{SUITE_RESULTS}.md").write_text(combine([{**r, "benchmark": e.folder} for e, r in zip(entries, results)]),
                                               encoding="utf-8")
