"""The docs stay true: links and images resolve, shown commands parse, named recipes pass their checks.

Reads README.md, benchmarks/README.md and every page under docs/. No model is loaded: a recipe is
checked as `llavadi train --check` checks it before any model loads (its schema, terms and
options), an ablation grid as `llavadi ablate --dry-run` plans it (every variant's recipe).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from llavadi.cli import build_parser, parse_args
from llavadi.config import load_recipe
from llavadi.experiments.ablate import load_grid, plan_runs

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
# a recipe or grid file named in prose or code: recipes/....yaml
RECIPE = re.compile(r"(?<![\w/.-])(recipes/[\w./-]+\.ya?ml)")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[tuple[int, str]]:
    out = []
    in_code = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            out += [(number, m.group(1)) for m in LINK.finditer(line)]
    return out


def _broken_links(page: Path) -> list[str]:
    problems = []
    for number, target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = page if not path else (page.parent / path).resolve()
        where = f"{_rel(page)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_and_images_resolve(page):
    assert _broken_links(page) == []


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\nsee [a](missing.md), [b](#title), [c](#nowhere) and ![p](pic.png)\n")
    problems = _broken_links(page)
    assert len(problems) == 3 and "missing.md" in problems[0] and "#nowhere" in problems[1] and "pic.png" in problems[2]


def _command_lines(page: Path) -> list[tuple[int, str]]:
    """`llavadi ...` command lines inside code blocks (continuations joined, comments dropped)."""
    out, in_code, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        if pending:
            line, pending = pending + " " + line.strip(), ""
        else:
            start = number
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
            continue
        command = _llavadi_part(line)
        if command is not None:
            out.append((start, command))
    return out


def _llavadi_part(line: str) -> str | None:
    """The `llavadi ...` part of a shell line (after a prompt, env settings, torchrun/python -m), or None."""
    text = re.sub(r"\s+#.*$", "", line.strip())
    m = re.search(r"(?:^|[\s;&|(])(?:\S*/)?(?:llavadi|python3? -m llavadi|-m llavadi)\s+(.*)$", text)
    if not m or text.startswith("#") or "pip install" in text:
        return None
    return m.group(1)


def _argv(command: str) -> list[str]:
    """Shell words of a shown command: optional parts in [brackets] taken as given, `a|b` as its first choice."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    return [w.split("|")[0] for w in words if w not in ("...", "|", ">")]


def _parse_problems(page: Path) -> list[str]:
    parser = build_parser()
    problems = []
    for number, command in _command_lines(page):
        try:
            parse_args(parser, _argv(command))
        except SystemExit:
            problems.append(f"{_rel(page)}:{number}: llavadi {command}")
        except ValueError as e:  # shlex: unbalanced quotes
            problems.append(f"{_rel(page)}:{number}: {e}: llavadi {command}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_shown_commands_parse(page, capsys):
    assert _parse_problems(page) == []


def test_shown_commands_are_found_and_a_wrong_one_fails(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("```bash\nllavadi train recipes/llavadi.yaml --check   # ok\n"
                    "torchrun --nproc_per_node 2 -m llavadi eval --model m --benchmark pope \\\n  --questions q --out o\n"
                    "llavadi train recipes/llavadi.yaml --no-such-flag\n```\n")
    assert [n for n, _ in _command_lines(page)] == [2, 3, 5]
    problems = _parse_problems(page)
    assert len(problems) == 1 and "--no-such-flag" in problems[0]


def _named_recipes() -> dict[str, list[str]]:
    named: dict[str, list[str]] = {}
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for m in RECIPE.finditer(line):
                named.setdefault(m.group(1), []).append(f"{_rel(page)}:{number}")
    return named


NAMED = _named_recipes()


def test_the_docs_name_recipes():
    assert "recipes/llavadi.yaml" in NAMED


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_recipe_exists_and_passes_its_checks(name):
    path = ROOT / name
    assert path.is_file(), f"{name} (named at {', '.join(NAMED[name])}) does not exist"
    text = path.read_text(encoding="utf-8")
    if re.search(r"^variants:", text, re.M):  # an ablation grid: every variant's recipe is built and checked
        assert plan_runs(load_grid(str(path)))
    else:
        load_recipe(str(path), [])
