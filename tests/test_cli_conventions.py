"""CLI conventions: overrides anywhere on the line, clear errors for malformed values, --version,
`python -m llavadi`, help text with defaults on every option."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import yaml

from llavadi import __version__, cli
from llavadi.cli import build_parser, main, parse_args

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(tmp_path) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"student": {"preset": "tiny-student"},
                                    "stages": [{"name": "ft", "data": {"path": "d.json"}}]}))
    return str(path)


def test_overrides_may_follow_options(tmp_path):
    recipe = _recipe(tmp_path)
    args = parse_args(build_parser(), ["train", recipe, "a.b=1", "--output-dir", "x", "c=2", "--quiet", "d=[1, 2]"])
    assert args.overrides == ["a.b=1", "c=2", "d=[1, 2]"] and args.output_dir == "x" and args.quiet
    args = parse_args(build_parser(), ["train", "--quiet", recipe, "seed=3"])
    assert args.overrides == ["seed=3"] and args.recipe == recipe
    args = parse_args(build_parser(), ["cache-teacher", recipe, "--out", "c", "seed=3", "--top-k", "8", "e=1"])
    assert args.overrides == ["seed=3", "e=1"] and args.out == "c" and args.top_k == 8


@pytest.mark.parametrize("argv, message", [
    (["train", "RECIPE", "--output-dir", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "RECIPE", "--output-dir", "x", "stray"], "unrecognized arguments: stray"),
    (["train", "seed=1", "RECIPE"], "the recipe file comes first"),
    (["score", "--benchmark", "pope", "--predictions", "p", "--annotations", "a", "k=v"],
     "unrecognized arguments: k=v"),  # only the commands reading a recipe take overrides
])
def test_what_is_not_an_override_is_refused(tmp_path, capsys, argv, message):
    argv = [_recipe(tmp_path) if a == "RECIPE" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(build_parser(), argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_malformed_override_value_names_the_override(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["train", recipe, "--output-dir", str(tmp_path / "o"), "stages.ft.train.learning_rate=[1e-4"]) == 2
    err = capsys.readouterr().err
    assert "override 'stages.ft.train.learning_rate=[1e-4': the value '[1e-4' is not valid YAML" in err
    assert "Traceback" not in err


def test_override_typo_in_train_names_the_closest_field(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["train", recipe, "--quiet", "stages.ft.train.gradient_accumulation_step=2"]) == 2
    assert "did you mean `gradient_accumulation_steps`?" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"llavadi {__version__}"


def test_python_dash_m_llavadi():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "llavadi", "--version"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"llavadi {__version__}", proc.stderr


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        yield action


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) >= {"demo", "make-data", "train", "terms", "eval", "score", "report",
                                       "regenerate", "ablate"}
    for name, command in subparsers.choices.items():
        text = " ".join(command.format_help().split())
        for action in _options(command):
            label = f"{name} {action.option_strings or action.dest}"
            assert action.help and action.help.strip(), f"{label} has no help text"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text or "default" in action.help, \
                    f"{label}: its default {action.default!r} is not shown"
    # the formatter adds the default once, and not for flags
    demo = " ".join(subparsers.choices["demo"].format_help().split())
    assert demo.count("(default: runs/demo)") == 1 and "(default: False)" not in demo


def test_each_subcommand_help_runs(capsys):
    for name in ("demo", "make-data", "train", "terms", "eval", "score", "report", "regenerate", "ablate"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: llavadi {name}" in capsys.readouterr().out
