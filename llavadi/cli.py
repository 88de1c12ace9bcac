"""The `llavadi` command: demo, make-data, train, cache-teacher, regenerate, eval, score, report, ablate."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_train(args) -> int:
    from llavadi.recipe import load_recipe
    from llavadi.train.runner import prepare_run, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    if args.check:  # validate and plan, train nothing, delete nothing
        plan, _ = prepare_run(recipe, resume=not args.no_resume, force=args.force, quiet=args.quiet, act=False)
        print("recipe OK; stages: " + ", ".join(f"{name} {status}" for name, status in plan.items()))
        return 0
    final = run_recipe(recipe, resume=not args.no_resume, quiet=args.quiet, force=args.force)
    print(final)
    return 0


def _cmd_make_data(args) -> int:
    from llavadi.data.synthetic import make_synthetic

    paths = make_synthetic(args.out, seed=args.seed, **({"n_instruct": args.n_instruct} if args.n_instruct else {}))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _cmd_demo(args) -> int:
    from llavadi.demo import run_cross_tokenizer_study, run_demo

    if args.cross_tokenizer:
        run_cross_tokenizer_study(args.out, seeds=args.seeds, smoke=args.smoke, student_steps=args.student_steps)
        return 0
    run_demo(args.out, seeds=args.seeds, fresh=args.fresh, distill=not args.no_distill, smoke=args.smoke,
             student_fraction=args.student_fraction, teacher_answers=not args.no_teacher_answers,
             teacher_cache=args.teacher_cache, student_steps=args.student_steps)
    return 0


def _cmd_terms(args) -> int:
    from llavadi.config import ConfigError
    from llavadi.distill.terms import describe_terms

    try:
        print(describe_terms(args.names))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help text followed by the option's default, unless it has none (None, a flag off) or says it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or "default" in text or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


def _add_demo_parser(sub) -> None:
    """The `demo` subcommand and its options."""
    d = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic task (CPU, minutes)")
    d.add_argument("--out", default="runs/demo", help="output directory")
    d.add_argument("--seeds", type=int, default=1, help="student seeds to run (mean and spread reported)")
    d.add_argument("--fresh", action="store_true", help="ignore cached data, vision tower and teacher")
    d.add_argument("--no-distill", action="store_true", help="skip the distilled student")
    d.add_argument("--student-fraction", type=float, default=None,
                   help="share of the instruction set whose answers the students get (default 0.05; 1: all)")
    d.add_argument("--student-steps", type=int, default=None,
                   help="the students' instruction-tuning steps (default 600, recipes/demo_student.yaml's)")
    d.add_argument("--no-teacher-answers", action="store_true",
                   help="the distilled student does not get the other questions answered by the teacher")
    d.add_argument("--teacher-cache", action="store_true",
                   help="also train each distilled student from the teacher's offline top-k cache (llavadi "
                        "cache-teacher), next to the one distilled from the online teacher")
    d.add_argument("--cross-tokenizer", action="store_true",
                   help="instead: a student with its own BPE tokenizer distilled from the demo's teacher with uld and "
                        "gold, against CE on the same data (docs/tokenizers-cross.md)")
    d.add_argument("--smoke", action="store_true", help="a seconds-long run of every step (tiny data, 3 steps)")
    d.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from llavadi import __version__

    p = argparse.ArgumentParser(prog="llavadi", description="Distil LLaVA-style multimodal LLMs.",
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--version", action="version", version=f"llavadi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    _add_demo_parser(sub)

    m = sub.add_parser("make-data", help="write a dataset")
    m.add_argument("kind", choices=["synthetic"], help="which dataset")
    m.add_argument("--out", required=True, help="output folder (images, caption/instruction/eval sets)")
    m.add_argument("--seed", type=int, default=0, help="random seed of the generated set")
    m.add_argument("--n-instruct", type=int, default=None, help="instruction samples (default: the demo's)")
    m.set_defaults(func=_cmd_make_data)

    t = sub.add_parser("train", help="run a recipe's stages")
    t.add_argument("recipe", help="YAML recipe")
    t.add_argument("overrides", nargs="*", help="key=value overrides, anywhere on the line, e.g. "
                                                "stages.finetune.train.learning_rate=1e-4")
    t.add_argument("--output-dir", default=None, help="overrides the recipe's output_dir")
    t.add_argument("--no-resume", action="store_true",
                   help="start every stage afresh: delete the output folder's stages, checkpoints included")
    t.add_argument("--force", action="store_true",
                   help="retrain stages whose recipe or data changed since the output folder was written "
                        "(their old outputs and checkpoints are deleted)")
    t.add_argument("--check", action="store_true",
                   help="validate the recipe, data, images and model files, say what would run; train nothing")
    t.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")
    t.set_defaults(func=_cmd_train, takes_overrides=True)

    k = sub.add_parser("terms", help="list the distillation terms, what they compare and their options")
    k.add_argument("names", nargs="*", help="terms to describe (default: all)")
    k.set_defaults(func=_cmd_terms)

    from llavadi.eval import commands as eval_commands
    from llavadi.eval import suite as eval_suite
    from llavadi.experiments import ablate, study_report
    from llavadi.export import command as export_command
    from llavadi.teacher import cache_teacher, regenerate

    for command_module in (cache_teacher, regenerate, eval_suite, eval_commands, ablate, export_command):
        command_module.register(sub)
    study_report.extend_report_command(sub)  # `report` also takes study folders
    for command in sub.choices.values():
        command.formatter_class = _HelpWithDefaults
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; a command's key=value overrides may come anywhere on the line (after options too)."""
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not getattr(args, "takes_overrides", False) or any(r.startswith("-") or "=" not in r for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides) + rest
    if getattr(args, "takes_overrides", False) and "=" in args.recipe and not os.path.exists(args.recipe):
        parser.error(f"{args.command}: the recipe file comes first, got {args.recipe!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llavadi` command."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("LLAVADI_THREADS"):  # set by the demo for its parallel one-thread runs
        import torch

        torch.set_num_threads(int(os.environ["LLAVADI_THREADS"]))
    parser = build_parser()
    args = parse_args(parser, argv)
    from llavadi.config import ConfigError
    from llavadi.data.encode import SampleError
    from llavadi.teacher.cache_format import CacheError
    from llavadi.train.guard import NonFiniteLossError

    try:
        code = int(args.func(args) or 0)
    except (ConfigError, SampleError, CacheError, FileNotFoundError) as e:
        print(f"llavadi {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:  # training stopped: the last checkpoint is kept, nothing published
        print(f"llavadi {args.command}: training stopped: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001  (anything else: one line here, the traceback in a file)
        log = write_traceback(args.command)
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"llavadi {args.command}: unexpected error: {type(e).__name__}: {first} "
              f"(full traceback in {log})", file=sys.stderr)
        return 1
    _teardown()  # not after an error: the other processes may never reach the barrier
    return code


def write_traceback(command: str) -> str:
    """Write the exception being handled, with its traceback, to a new log file; returns its path.

    The file goes to $LLAVADI_CACHE_DIR/errors (default ~/.cache/llavadi/errors), else the temporary folder."""
    import tempfile
    import time
    import traceback

    from llavadi.data.images import cache_dir

    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
    text = f"llavadi {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}"
    for folder in (os.path.join(cache_dir(), "errors"), tempfile.gettempdir()):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return "(no writable folder for the log)"


def _teardown() -> None:
    """End a multi-process run cleanly: barrier, then destroy the process group (nothing otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from llavadi.train.engines import teardown_process_group

        teardown_process_group()


if __name__ == "__main__":
    sys.exit(main())
