"""A stage's `train` section: `transformers.TrainingArguments` fields under their own names.

Every key of `train` is a TrainingArguments field (`per_device_train_batch_size`,
`gradient_accumulation_steps`, `lr_scheduler_type`, `deepspeed`, `adam_beta2`, ...). Names and
value types are checked when the recipe is read, before any model loads; a typo is reported with
the closest field. llavadi's defaults (`DEFAULTS`) replace TrainingArguments' where LLaVA's
recipes differ; a few fields are set by llavadi itself (`OWNED`) and refused here, as are the Hub
upload fields (`REFUSED`: the Trainer would upload a stage's checkpoints folder, not the student).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import types
import typing
from functools import lru_cache
from typing import Any

# where llavadi's defaults differ from TrainingArguments' (LLaVA-1.5's fine-tuning settings);
# `warmup_steps` below 1 is a ratio of the total steps
DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-5,
    "num_train_epochs": 1.0,
    "warmup_steps": 0.03,
    "lr_scheduler_type": "cosine",
    "logging_steps": 10,
    "save_total_limit": 2,
}

# set by llavadi for every stage; the reason says where to set them instead
OWNED: dict[str, str] = {
    "output_dir": "a stage's checkpoints go to <output_dir>/<stage>/checkpoints: set the recipe's `output_dir`",
    "seed": "set the recipe's top-level `seed`",
    "use_cpu": "set the recipe's top-level `device`",
    "remove_unused_columns": "llavadi's collator reads every column; it is always false",
    "resume_from_checkpoint": "rerunning the same command resumes from the latest complete checkpoint "
                              "(`--no-resume` to start afresh)",
    "logging_nan_inf_filter": "a NaN loss is always logged as NaN (train.max_nonfinite_skips decides what happens)",
}
# the Trainer would push a stage's checkpoints folder, not the published student: refused, with what to do
_NO_PUSH = ("llavadi does not upload during training (the Trainer would push <stage>/checkpoints, not the "
            "student); upload the finished student with its model card: `hf upload REPO_ID <output_dir>/final`")
REFUSED: dict[str, str] = {name: _NO_PUSH for name in ("push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
                                             "hub_private_repo", "hub_always_push", "hub_revision")}

# llavadi's former short names: one way to say each thing, TrainingArguments'
RENAMED: dict[str, str] = {
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "epochs": "num_train_epochs",
    "scheduler": "lr_scheduler_type",
    "dataloader_workers": "dataloader_num_workers",
    "warmup_ratio": "warmup_steps",
}


class TrainArgsError(ValueError):
    """A `train` section mistake; the message names the key."""


@lru_cache(maxsize=1)
def training_argument_fields() -> dict[str, dataclasses.Field]:
    """TrainingArguments' init fields by name."""
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def training_argument_default(name: str) -> Any:
    """TrainingArguments' own default of the field `name`."""
    f = training_argument_fields()[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _unknown_key_message(key: str, where: str) -> str:
    if key in RENAMED:
        return (f"{where}.{key}: not a TrainingArguments field; write `{RENAMED[key]}` "
                f"(the train section takes TrainingArguments' own names)")
    if key == "extra":
        return f"{where}.extra: write its keys directly in `train` (every TrainingArguments field is accepted there)"
    close = difflib.get_close_matches(key, list(training_argument_fields()), n=1, cutoff=0.6)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return f"{where}.{key}: not a transformers.TrainingArguments field{hint}"


def _allowed_types(tp) -> set:
    """The plain types (and enum classes) a field annotation admits."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return set().union(*(_allowed_types(a) for a in typing.get_args(tp)))
    if origin is not None:
        return {origin}
    return {tp}


def _choice_message(where: str, value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; choose one of {choices}"
    return f"{where}: {value!r} is not a valid choice{hint}"


def _convert(value: Any, tp, where: str) -> Any:
    """`value` checked against the field annotation `tp`; a numeric string becomes a float for float fields.

    Booleans and numbers are checked strictly, and strings against an enum's choices (with the
    closest one); anything else (strings, lists, mappings) passes to TrainingArguments, which the
    runner builds once before any model loads.
    """
    allowed = _allowed_types(tp)
    enums = [t for t in allowed if isinstance(t, type) and issubclass(t, enum.Enum)]
    if isinstance(value, str) and enums:
        choices = [e.value for t in enums for e in t]
        if value not in choices:
            raise TrainArgsError(_choice_message(where, value, choices))
        return value
    if not allowed <= {bool, int, float, type(None)}:
        return value
    if value is None:
        if type(None) in allowed:
            return None
        raise TrainArgsError(f"{where}: must not be null")
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and (int in allowed or float in allowed):
        return value
    elif isinstance(value, float) and float in allowed:
        return value
    elif isinstance(value, str) and float in allowed:  # YAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise TrainArgsError(f"{where}: expected {_describe(allowed)}, got {value!r}")


def _describe(allowed: set) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping", list: "a list", type(None): "null"}
    return " or ".join(sorted(names.get(t, getattr(t, "__name__", str(t))) for t in allowed))


def train_section(raw: Any, where: str) -> dict:
    """The effective TrainingArguments fields of a stage: DEFAULTS overlaid with `raw`, each checked.

    Every problem of the section is reported at once, one per line.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainArgsError(f"{where}: expected a mapping of TrainingArguments fields, got {type(raw).__name__}")
    fields = training_argument_fields()
    hints = _field_hints()
    args, problems = dict(DEFAULTS), []
    for key, value in raw.items():
        try:
            if key in OWNED:
                raise TrainArgsError(f"{where}.{key}: set by llavadi; {OWNED[key]}")
            if key in REFUSED:
                raise TrainArgsError(f"{where}.{key}: not supported; {REFUSED[key]}")
            if key not in fields:
                raise TrainArgsError(_unknown_key_message(key, where))
            args[key] = _convert(value, hints.get(key, fields[key].type), f"{where}.{key}")
        except TrainArgsError as e:
            problems.append(str(e))
    if problems:
        error = TrainArgsError("\n  - ".join(problems) if len(problems) == 1 else
                               f"{len(problems)} problems in {where}:\n  - " + "\n  - ".join(problems))
        error.problems = problems  # for a report of the whole recipe
        raise error
    return args


@lru_cache(maxsize=1)
def _field_hints() -> dict:
    from transformers import TrainingArguments

    try:
        return typing.get_type_hints(TrainingArguments)
    except Exception:  # an annotation that cannot be resolved here: fall back to the raw ones
        return {}


def default_report_to() -> str:
    """TensorBoard when it is installed, else no logger (a recipe's `report_to` overrides)."""
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


def training_argument_kwargs(args: dict, output_dir: str, seed: int, use_cpu: bool,
                             quiet: bool = False) -> dict:
    """TrainingArguments keyword arguments of a stage: its fields plus the ones llavadi sets."""
    kwargs = {
        "save_strategy": "steps",
        "disable_tqdm": False,
        "ddp_find_unused_parameters": False,
        "report_to": default_report_to(),
        **args,
        "output_dir": output_dir,
        "seed": seed,
        "use_cpu": use_cpu,
        "remove_unused_columns": False,
    }
    if quiet:  # log lines instead of a progress bar (parallel runs, CI logs)
        kwargs["disable_tqdm"] = True
    return kwargs


def check_training_arguments(stages: list[tuple[str, dict, str]], seed: int, use_cpu: bool) -> None:
    """Build each stage's TrainingArguments once, so a bad value or combination fails before any model loads.

    `stages`: (where, args, output_dir) per stage. `deepspeed` is left out of this check: building its
    config registers a global ZeRO-3 setting that model loading would then obey.
    """
    from transformers import TrainingArguments

    for where, args, output_dir in stages:
        kwargs = training_argument_kwargs({k: v for k, v in args.items() if k != "deepspeed"}, output_dir, seed,
                                          use_cpu)
        try:
            TrainingArguments(**kwargs)
        except (ValueError, TypeError, ImportError) as e:
            raise TrainArgsError(f"{where}: transformers.TrainingArguments refuses these values: {e}") from None
