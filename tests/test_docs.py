"""The docs stay true: links and images resolve, shown commands parse, named and shown recipes pass their checks.

Reads README.md, benchmarks/README.md and every page under docs/. No model is loaded: a recipe is
checked as `llavadi train --check` checks it before any model loads (its schema, terms and
options), an ablation grid as `llavadi ablate --dry-run` plans it (every variant's recipe).
The guide stays navigable: every page is in the index docs/README.md and opens with a title and a
paragraph saying what it is for, every command has its section in docs/cli.md, and README.md stays
a front page.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from llavadi.cli import build_parser, parse_args
from llavadi.experiments.ablate import load_grid, plan_runs
from llavadi.recipe import load_recipe

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


INLINE = re.compile(r"`(?:python3? -m )?llavadi ([^`]+)`")


def _inline_problems(page: Path) -> list[str]:
    """`llavadi <command> --flag ...` spans in prose: the command exists and has every --flag shown."""
    commands = build_parser()._subparsers._group_actions[0].choices
    problems = []
    for m in INLINE.finditer(page.read_text(encoding="utf-8")):
        words = " ".join(m.group(1).split()).replace("[", " ").replace("]", " ").split()
        if words[0].startswith(("<", "-", ".")) or words[0].endswith(":"):  # a placeholder, a global flag, an error line
            continue
        where = f"{_rel(page)}: `llavadi {m.group(1)}`"
        if words[0] not in commands:
            problems.append(f"{where}: no command {words[0]!r}")
            continue
        known = {s for action in commands[words[0]]._actions for s in action.option_strings}
        problems += [f"{where}: {w} is not an option of {words[0]}"
                     for w in (w.split("=")[0] for w in words[1:]) if w.startswith("--") and w not in known]
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_commands_named_in_prose_exist(page):
    assert _inline_problems(page) == []


def test_a_wrong_command_in_prose_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `llavadi demo --seeds 3`, then `llavadi trian x.yaml` and `llavadi eval --modle m`;\n"
                    "`llavadi <command> --help` and `llavadi train: error: ...` are not commands.\n")
    problems = _inline_problems(page)
    assert len(problems) == 2 and "'trian'" in problems[0] and "--modle" in problems[1]


def _unindexed(docs: Path) -> list[str]:
    """Guide pages (docs/*.md) the index docs/README.md does not link to."""
    index = docs / "README.md"
    linked = {(index.parent / target.partition("#")[0]).resolve() for _, target in _links(index)}
    return sorted(p.name for p in docs.glob("*.md") if p != index and p.resolve() not in linked)


def test_every_guide_page_is_in_the_index():
    assert _unindexed(ROOT / "docs") == []


def test_an_unindexed_page_is_found(tmp_path):
    (tmp_path / "README.md").write_text("# Guide\n- [a](a.md)\n- [b](b.md#part)\n")
    for name in ("a.md", "b.md", "c.md"):
        (tmp_path / name).write_text(f"# {name}\n")
    assert _unindexed(tmp_path) == ["c.md"]


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=_rel)
def test_a_guide_page_opens_with_a_title_and_what_it_is_for(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and not lines[1].strip(), f"{_rel(page)}: the first line is the page's title"
    assert lines[2].strip() and not lines[2].startswith(("#", "```", "|", "-", "!")), \
        f"{_rel(page)}: the title is followed by a paragraph saying what the page is for"


def test_the_front_page_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail into a docs/ page and link it"


def test_every_command_has_its_section_in_the_cli_page():
    commands = build_parser()._subparsers._group_actions[0].choices
    headings = {h.lstrip("#").strip() for h in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8").splitlines()
                if h.startswith("## ")}
    assert sorted(f"llavadi {c}" for c in commands if f"llavadi {c}" not in headings) == []


def _shown_recipes(page: Path) -> list[tuple[int, str]]:
    """```yaml blocks that are whole recipes (top-level `stages:` and `student:` or `teacher:`)."""
    blocks = re.finditer(r"^```ya?ml\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    text = page.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in blocks
            if re.search(r"^stages:", m.group(1), re.M) and re.search(r"^(student|teacher):", m.group(1), re.M)]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_shown_recipes_pass_their_checks(page, tmp_path):
    for number, text in _shown_recipes(page):
        path = tmp_path / f"line{number}.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_recipe(str(path), [])
        except Exception as e:  # noqa: BLE001  (the message names the page and line)
            pytest.fail(f"{_rel(page)}:{number}: the recipe shown does not load: {e}")


def test_the_docs_show_recipes_and_a_wrong_one_fails(tmp_path):
    assert _shown_recipes(ROOT / "README.md") and _shown_recipes(ROOT / "docs" / "recipes.md")
    page = tmp_path / "page.md"
    page.write_text("```yaml\nstudent: {preset: tiny-student}\nstages:\n  - name: s\n    distill: {terms: [{name: forward_kll}]}\n```\n")
    (number, text), = _shown_recipes(page)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(Exception, match="forward_kll"):
        load_recipe(str(path), [])
