"""CLI subcommands `score` (score an existing predictions file) and `report` (combine results)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llavadi.eval.benchmarks import BENCHMARKS, EvalDataError, get_benchmark
from llavadi.eval.report import combine, load_result, write_result


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `score` and `report` subcommands to the CLI's subparsers."""
    score = subparsers.add_parser(
        "score", help="score a predictions file (LLaVA answer JSONL) against a benchmark's annotations")
    score.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="benchmark whose rules score")
    score.add_argument("--predictions", required=True, help="answer JSONL: question_id, text per line")
    score.add_argument("--annotations", required=True, help="the benchmark's annotation file or folder")
    score.add_argument("--questions", help="question file defining the evaluation set (LLaVA form)")
    score.add_argument("--out", help="folder for <benchmark>.json and <benchmark>.md")
    score.add_argument("--name", help="run name in the result (default: the predictions file's name)")
    score.add_argument("--all-rounds", action="store_true",
                       help="mmbench: every option rotation was asked (LLaVA --all-rounds)")
    score.set_defaults(func=run_score)

    report = subparsers.add_parser("report", help="combine result JSON files into one markdown table")
    report.add_argument("results", nargs="+", help="result JSON files written by `score --out` or `eval`")
    report.add_argument("--out", help="markdown file to write (default: print)")
    report.add_argument("--all-metrics", action="store_true", help="every metric, not only headline ones")
    report.set_defaults(func=run_report)


def run_score(args: argparse.Namespace) -> int:
    """Score one predictions file; print the result JSON; write JSON + markdown with --out."""
    try:
        return _score(args)
    except EvalDataError as err:
        print(f"llavadi score: error: {err}", file=sys.stderr)
        return 2


def _score(args: argparse.Namespace) -> int:
    options = {"all_rounds": True} if args.all_rounds and args.benchmark == "mmbench" else {}
    benchmark = get_benchmark(args.benchmark, **options)
    result = benchmark.score_files(args.predictions, args.annotations, args.questions)
    result.run = args.name or Path(args.predictions).stem
    for note in result.notes:
        print(f"[{args.benchmark}] {note}", file=sys.stderr)
    if result.missing_ids:
        print(f"[{args.benchmark}] missing, e.g.: {', '.join(result.missing_ids[:5])}", file=sys.stderr)
    if result.unknown_ids:
        print(f"[{args.benchmark}] unknown ids, e.g.: {', '.join(result.unknown_ids[:5])}", file=sys.stderr)
    print(json.dumps(result.to_dict(), indent=2))
    if args.out:
        json_path, md_path = write_result(result, args.out)
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Combine result files into one markdown table (rows = runs, columns = metrics)."""
    try:
        table = combine([load_result(path) for path in args.results], all_metrics=args.all_metrics)
    except EvalDataError as err:
        print(f"llavadi report: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(table, end="")
    return 0
