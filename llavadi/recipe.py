"""Reading a recipe: the schema's checks (``llavadi.config``) and every term's own, in one report.

``llavadi.config`` is the recipe's schema and knows no distillation method; the meaning of a
term's name, token group and options belongs to the term's class (``llavadi.distill.terms``).
This module joins the two, so a recipe's mistakes are all named at once, before any model loads.
"""

from __future__ import annotations

import os

from llavadi.config import ConfigError, Recipe, TermSpec, parse_recipe, raise_problems, read_recipe_file
from llavadi.distill.terms import check_term


def term_problems(raw: dict) -> list[str]:
    """Each stage term's mistakes against its class (unknown name, token group, options), by key path.

    Read from the raw entries, so a term whose weight the schema refuses still has its name, tokens
    and options checked; entries of the wrong shape are the schema's to name."""
    problems = []
    stages = raw.get("stages") if isinstance(raw, dict) else None
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        distill = stage.get("distill") if isinstance(stage, dict) else None
        terms = distill.get("terms") if isinstance(distill, dict) else None
        for j, entry in enumerate(terms if isinstance(terms, list) else []):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("tokens"), (str, type(None)))
                    and isinstance(entry.get("options"), (dict, type(None)))):
                continue
            try:  # the weight is the schema's to check
                check_term(TermSpec(entry["name"], tokens=entry.get("tokens"), options=entry.get("options")),
                           f"stages[{i}].distill.terms[{j}]")
            except ValueError as e:
                problems.append(str(e))
    return problems


def recipe_from_dict(raw: dict, base_dir: str | None = None) -> Recipe:
    """A validated Recipe from a raw dict; relative data/model paths resolve against base_dir.

    Every mistake is named in one ConfigError: the schema's (unknown keys, wrong value types, train
    fields, the checks of what was read) and each term's against its class."""
    recipe, problems = parse_recipe(raw, base_dir)
    raise_problems(problems + term_problems(raw))
    return recipe


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, validate. Paths are relative to the file."""
    raw = read_recipe_file(path, overrides)
    try:
        return recipe_from_dict(raw, base_dir=os.path.dirname(os.path.abspath(path)))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
