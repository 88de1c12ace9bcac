"""Recipes: typed, validated configuration read from YAML with command-line overrides.

A recipe names a student (and optionally a teacher) and a list of stages run in order; each
stage has its own data, trainable modules, distillation terms and hyper-parameters. Every
mistake is reported before any model loads, with the key's path and what to write instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from llavadi.data.images import DEFAULT_MAX_PIXELS
from llavadi.models.hub import is_hub_id
from llavadi.training_args import TrainArgsError, train_section, training_argument_default


class ConfigError(ValueError):
    """A recipe mistake; the message names the key path."""


# LoRA on the linear layers of LLaMA-family decoder layers (attention and MLP)
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_DTYPES = ("bf16", "fp16", "fp32")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
LORA_SAVES = ("merged", "adapter")


@dataclass
class LoraSpec:
    """A LoRA (or 4-bit QLoRA) student: adapters on the language model's linear layers."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LORA_TARGETS))  # in the language model
    save: str = "merged"  # the stage's model: merged into a plain HF LLaVA, or "adapter" beside it as well
    quantize: str | None = None  # "4bit": QLoRA (bitsandbytes, CUDA)

    def validate(self, where: str):
        """Refuse out-of-range options, naming the key (`where` is the spec's path, e.g. student.lora)."""
        if self.r < 1:
            raise ConfigError(f"{where}.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, list) or not self.target_modules or \
                not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"{where}.target_modules: give a list of layer names, e.g. {list(LLAMA_LORA_TARGETS)}")
        if "lm_head" in self.target_modules:
            raise ConfigError(f"{where}.target_modules: the LM head cannot carry an adapter (the distillation "
                              "losses read its weight directly); remove 'lm_head'")
        if self.save not in LORA_SAVES:
            raise ConfigError(f"{where}.save must be one of {list(LORA_SAVES)}, got {self.save!r}")
        if self.quantize not in (None, "4bit"):
            raise ConfigError(f"{where}.quantize must be null or '4bit', got {self.quantize!r}")


@dataclass
class ModelSpec:
    """Where a model comes from (a LLaVA dir or hub id, a vision+LLM composition, a tiny preset) and how it runs."""

    path: str | None = None
    vision: str | None = None
    llm: str | None = None
    preset: str | None = None
    vision_feature_layer: int | None = None  # composing vision + llm only (None there: -2, LLaVA-1.5's)
    cache: str | None = None  # teacher only: an offline top-k cache written by `llavadi cache-teacher`
    revision: str | None = None  # a hub revision (branch, tag or commit) of a hub id in `path`
    dtype: str | None = None  # bf16 | fp16 | fp32; None: the checkpoint's own
    attn_implementation: str | None = None  # sdpa | flash_attention_2 | eager; None: transformers' default
    lora: LoraSpec | None = None  # student only: train the language model through LoRA adapters

    def validate(self, where: str):
        self._validate_knobs(where)
        kinds = [k for k, v in (("path", self.path), ("vision+llm", self.vision or self.llm), ("preset", self.preset)) if v]
        if self.cache and not kinds:  # a cached teacher needs no model (given, its fingerprint is checked)
            return
        if len(kinds) != 1:
            raise ConfigError(f"{where}: give exactly one of `path`, `vision` + `llm`, or `preset` (got {kinds or 'none'})")
        if (self.vision or self.llm) and not (self.vision and self.llm):
            raise ConfigError(f"{where}: a composed model needs both `vision` and `llm` paths")
        if (self.vision or self.llm) and self.vision_feature_layer is None:
            self.vision_feature_layer = self.composed_feature_layer()
        if self.preset:
            from llavadi.models.presets import PRESETS

            if self.preset not in PRESETS:
                raise ConfigError(f"{where}.preset: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")

    def _validate_knobs(self, where: str):
        if self.revision is not None and not self.path:
            raise ConfigError(f"{where}.revision applies to a hub id given in `path` only")
        if self.dtype is not None and self.dtype not in MODEL_DTYPES:
            raise ConfigError(f"{where}.dtype must be one of {list(MODEL_DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"{where}.attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)}, "
                              f"got {self.attn_implementation!r}")
        if self.lora is not None:
            self.lora.validate(f"{where}.lora")

    def composed_feature_layer(self) -> int:
        """The vision layer a composed model reads: the spec's, else -2 (LLaVA-1.5's)."""
        return -2 if self.vision_feature_layer is None else self.vision_feature_layer

    def describe(self) -> str:
        """Short human-readable source of the model."""
        return self.path or self.preset or f"{self.vision} + {self.llm}"


@dataclass
class DataConfig:
    """A training set in LLaVA format and how to render it."""

    path: str | None = None
    image_folder: str | None = None
    template: str = "vicuna_v1"
    system: str | None = None  # None: the template's default (LLaVA's system prompt)
    max_length: int = 2048
    on_error: str = "raise"  # or "skip": bad samples are left out and reported
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are refused (null: no limit)

    def validate(self, where: str):
        from llavadi.data.templates import TEMPLATES

        if self.template not in TEMPLATES:
            raise ConfigError(f"{where}.template: unknown template {self.template!r}; choose one of {sorted(TEMPLATES)}")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"{where}.on_error: must be 'raise' or 'skip', got {self.on_error!r}")
        if self.max_length < 8:
            raise ConfigError(f"{where}.max_length: {self.max_length} is too small")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"{where}.max_pixels must be >= 1 (or null for no limit), got {self.max_pixels}")


@dataclass
class TrainableConfig:
    """Which modules a stage trains."""

    projector: bool = True
    llm: bool = True
    vision_from_layer: int | None = None  # None: vision tower frozen


TERM_KEYS = ("name", "weight", "tokens", "options")
DEFAULT_CHUNK_MIB = 32.0  # fp32 logits of one model per LM-head chunk; chosen by benchmarks/kd_loss.py --sweep


@dataclass
class TermSpec:
    """One entry of a recipe's ``distill.terms`` list: a term's name, weight, token group and options.

    The schema checks the entry's shape; what the name, tokens and options mean is checked against
    the term's class by ``llavadi.distill.terms.check_term`` (``llavadi.recipe`` reads a recipe so)."""

    name: str
    weight: float = 1.0
    tokens: str | None = None  # the token-type group it reads; None: the term's default
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.name, str) or not self.name:
            problems.append(f"term name must be a non-empty string, got {self.name!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            problems.append(f"term {self.name!r}: weight must be a finite number, got {self.weight!r}")
        elif self.weight < 0:
            problems.append(f"term {self.name!r}: weight must be >= 0, got {self.weight!r}")
        else:
            self.weight = float(self.weight)
        if self.tokens is not None and not isinstance(self.tokens, str):
            problems.append(f"term {self.name!r}: tokens must be a token-group name, got {self.tokens!r}")
        if self.options is not None and not isinstance(self.options, dict):
            problems.append(f"term {self.name!r}: options must be a mapping, got {self.options!r}")
        self.options = dict(self.options or {})
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, entry: Any, where: str = "distill.terms") -> TermSpec:
        """A TermSpec from one recipe entry; errors name the entry (e.g. "distill.terms[2]")."""
        if isinstance(entry, TermSpec):
            return entry
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: each term is a mapping with name, weight, tokens, options; got {entry!r}")
        unknown = sorted(set(entry) - set(TERM_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a term has name, weight, tokens, options")
        if "name" not in entry:
            raise ValueError(f"{where}: missing `name` (`llavadi terms` lists the distillation terms)")
        try:
            return cls(**entry)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass
class DistillConfig:
    """The stage's objective: ce_weight * CE + sum of weighted terms."""

    ce_weight: float = 1.0
    terms: list[TermSpec] = field(default_factory=list)  # each checked against its term's class when a recipe is read
    chunk_size: int | None = None  # positions per LM-head chunk of CE and logit terms (null: from chunk_mib)
    chunk_mib: float = DEFAULT_CHUNK_MIB  # else as many positions as keep one model's fp32 chunk logits within this many MiB

    def validate(self, where: str):
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"{where}.chunk_size must be >= 1")
        if not self.chunk_mib > 0:
            raise ConfigError(f"{where}.chunk_mib must be > 0")
        if self.ce_weight == 0 and not self.terms:
            raise ConfigError(f"{where}: ce_weight is 0 and no term is given: nothing to train on")


@dataclass
class TrainConfig:
    """A stage's `transformers.TrainingArguments` fields by their own names (llavadi.training_args).

    `args` holds the effective TrainingArguments values: llavadi's defaults overlaid with the
    recipe's `train` keys. `max_nonfinite_skips` is llavadi's own key of the section.
    """

    args: dict = field(default_factory=lambda: train_section({}, "train"))
    max_nonfinite_skips: int = 0  # optimisation steps with a NaN/inf loss or gradient skipped before stopping

    @classmethod
    def from_dict(cls, raw, where: str) -> "TrainConfig":
        """Check every key against TrainingArguments' fields (closest name on a typo)."""
        skips = 0
        if isinstance(raw, dict) and "max_nonfinite_skips" in raw:
            raw = dict(raw)
            skips = raw.pop("max_nonfinite_skips")
            if not isinstance(skips, int) or isinstance(skips, bool):
                raise ConfigError(f"{where}.max_nonfinite_skips: expected an integer, got {skips!r}")
        try:
            return cls(train_section(raw, where), skips)
        except TrainArgsError as e:
            error = ConfigError(str(e))
            error.problems = getattr(e, "problems", None)
            raise error from None

    def value(self, name: str):
        """A TrainingArguments field's effective value: the section's, else TrainingArguments' default."""
        return self.args[name] if name in self.args else training_argument_default(name)

    def to_dict(self) -> dict:
        """The section in recipe keys."""
        return {**self.args, "max_nonfinite_skips": self.max_nonfinite_skips}

    def validate(self, where: str):
        """Refuse a stage that would train nothing, and a negative skip budget."""
        a = self.args
        if a.get("max_steps", -1) <= 0 and a.get("num_train_epochs", 0) <= 0:
            raise ConfigError(f"{where}: set num_train_epochs > 0 or max_steps > 0")
        if self.max_nonfinite_skips < 0:
            raise ConfigError(f"{where}.max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD's lambda): the student answers a fraction of the samples itself."""

    fraction: float = 0.5  # probability that a sample of a batch is replaced by the student's own answer
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0

    def validate(self, where: str):
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"{where}.fraction must be in (0, 1], got {self.fraction}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0.0:
            raise ConfigError(f"{where}.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class StageConfig:
    """One training stage (e.g. pretrain, finetune)."""

    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    on_policy: OnPolicyConfig | None = None  # None: the data's own answers only

    def validate(self, where: str, has_teacher: bool):
        """Refuse a stage's mistakes: every one found, in one ConfigError."""
        problems = _Problems()
        if not self.name:
            problems.append(f"{where}: every stage needs a `name`")
        if not self.data.path:
            problems.append(f"{where}.data.path: no training data given")
        problems.check(self.data.validate, f"{where}.data")
        problems.check(self.distill.validate, f"{where}.distill")
        problems.check(self.train.validate, f"{where}.train")
        if self.distill.terms and not has_teacher:
            problems.append(f"{where}.distill.terms: distillation terms need a `teacher` in the recipe")
        if self.on_policy is not None:
            problems.check(self.on_policy.validate, f"{where}.on_policy")
            if not self.distill.terms:
                problems.append(f"{where}.on_policy: on-policy samples carry no labels (CE is off on them): "
                                "the stage needs distillation terms for the teacher to score them")
        problems.raise_all()


@dataclass
class Recipe:
    """A whole run: models and stages."""

    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: ModelSpec | None = None
    stages: list[StageConfig] = field(default_factory=list)
    output_dir: str = "runs/llavadi"
    seed: int = 0
    device: str = "auto"
    teacher_device: str | None = None  # None: the student's device
    data: dict = field(default_factory=dict)  # defaults merged into every stage's data
    meta: dict = field(default_factory=dict)  # free-form notes copied into outputs

    def validate(self):
        """Refuse the recipe's mistakes: every one found, in one ConfigError."""
        problems = _Problems()
        problems.check(self.student.validate, "student")
        if self.student.cache:
            problems.append("student.cache: only the teacher can be a cache")
        if self.teacher is not None:
            problems.check(self.teacher.validate, "teacher")
            on_policy = [s.name for s in self.stages if s.on_policy is not None]
            if self.teacher.cache and on_policy:
                problems.append(f"teacher.cache: stages {on_policy} use on_policy, whose samples the teacher must "
                                "score online; drop `cache` (keep teacher.path) or on_policy")
            if self.teacher.lora is not None:
                problems.append("teacher.lora: LoRA applies to the student; the teacher is frozen")
        if not self.stages:
            problems.append("stages: a recipe needs at least one stage (e.g. finetune)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            problems.append(f"stages: stage names must be unique, got {names}")
        for i, s in enumerate(self.stages):
            problems.check(s.validate, f"stages[{i}] ({s.name})", self.teacher is not None)
        problems.raise_all()
        return self


# ----------------------------------------------------------------------------- parsing

class _Problems(list):
    """Every recipe mistake found while reading it (each a message naming its key path)."""

    def check(self, fn, *args) -> None:
        """Run one validation; a mistake it raises is recorded, not raised."""
        try:
            fn(*args)
        except ConfigError as e:
            self.extend(getattr(e, "problems", None) or [str(e)])

    def raise_all(self) -> None:
        """Raise one ConfigError listing every mistake (none: nothing)."""
        if len(self) == 1:
            raise ConfigError(self[0])
        if self:
            error = ConfigError(f"{len(self)} problems in the recipe:\n  - " + "\n  - ".join(self))
            error.problems = list(self)
            raise error


def _unknown_keys_message(where: str, unknown: list[str], names: set[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
        if close:
            hints.append(f"`{key}`: did you mean `{close[0]}`?")
    return (f"{where}: unknown key(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
            + f"; valid keys are {sorted(names)}")


def _build(cls, raw: Any, where: str, problems: _Problems):
    """Construct dataclass `cls` from a dict; unknown keys and bad values are recorded in `problems` and left out."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        problems.append(_unknown_keys_message(where or "recipe", unknown, names))
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            continue
        try:
            kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key, problems)
        except ConfigError as e:
            problems.extend(getattr(e, "problems", None) or [str(e)])
    return cls(**kwargs)


def _convert(tp, value, where, problems: _Problems):
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        items = []
        for i, v in enumerate(value):
            try:
                if hasattr(args[0], "from_dict"):  # validates itself (distillation terms), errors naming the entry
                    items.append(args[0].from_dict(v, f"{where}[{i}]"))
                else:
                    items.append(_build(args[0], v, f"{where}[{i}]", problems))
            except ValueError as e:
                problems.append(str(e))
        return items
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
    if dataclasses.is_dataclass(tp):
        if hasattr(tp, "from_dict"):  # validates itself (the train section), errors naming the key
            return tp.from_dict(value, where)
        return _build(tp, value, where, problems)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override to a raw recipe dict (value parsed as YAML).

    Stages are addressed by name or index: `stages.finetune.train.learning_rate=1e-4`.
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value")
    key, _, text = assignment.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {assignment!r}: the value {text!r} is not valid YAML ({problem}); "
                          "quote it") from None
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def _index(node: list, part: str, where: str) -> int:
    if part.isdigit():
        i = int(part)
        if i >= len(node):
            raise ConfigError(f"override {where}: index {i} out of range ({len(node)} items)")
        return i
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise ConfigError(f"override {where}: no item named {part!r}")


def _child(node, part, where, create):
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {where}: cannot descend into a {type(node).__name__}")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"override {where}: no such key")
        node[part] = {}
    return node[part]


def parse_recipe(raw: dict, base_dir: str | None = None) -> tuple[Recipe, list[str]]:
    """A Recipe read from a raw dict by the schema, and every mistake found (none raised).

    Relative data/model paths resolve against base_dir. The mistakes are unknown keys, wrong value
    types, malformed term entries and train fields while reading, then the checks of what was read;
    ``llavadi.recipe.recipe_from_dict`` adds each term's own checks and raises them all at once."""
    raw = dict(raw)
    problems = _Problems()
    defaults = raw.get("data") or {}
    if not isinstance(defaults, dict):
        problems.append(f"data: expected a mapping, got {type(defaults).__name__}")
        defaults = {}
    unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(DataConfig)})
    if unknown:
        problems.append(_unknown_keys_message("data", unknown, {f.name for f in dataclasses.fields(DataConfig)}))
        defaults = {k: v for k, v in defaults.items() if k not in unknown}
    stages = []
    for i, s in enumerate(raw.get("stages") or []):
        if not isinstance(s, dict):
            problems.append(f"stages[{i}]: expected a mapping")
            continue
        s = dict(s)
        s["data"] = {**defaults, **(s.get("data") or {})}
        stages.append(s)
    raw["stages"] = stages
    raw.pop("data", None)
    recipe = _build(Recipe, raw, "", problems)
    recipe.data = dict(defaults)
    if base_dir:
        _resolve_paths(recipe, base_dir)
    problems.check(recipe.validate)
    return recipe, list(problems)


def raise_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing every recipe mistake (none: nothing)."""
    _Problems(problems).raise_all()


def _resolve_paths(recipe: Recipe, base_dir: str) -> None:
    def fix(p):
        return p if (p is None or os.path.isabs(p)) else os.path.normpath(os.path.join(base_dir, p))

    def fix_model(p):
        # a hub id (owner/name) stays one unless a folder of that name sits beside the recipe
        local = fix(p)
        return p if p is not None and is_hub_id(p) and not os.path.exists(local) else local

    for spec in (recipe.student, recipe.teacher):
        if spec is not None:
            spec.path, spec.vision, spec.llm = fix_model(spec.path), fix_model(spec.vision), fix_model(spec.llm)
            spec.cache = fix(spec.cache)
    for s in recipe.stages:
        s.data.path, s.data.image_folder = fix(s.data.path), fix(s.data.image_folder)


def read_recipe_file(path: str, overrides: list[str] | None = None) -> dict:
    """A YAML recipe's raw dict with `key=value` overrides applied; a ConfigError naming the file if unreadable."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe ({e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    for o in overrides or []:
        apply_override(raw, o)
    return raw


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain dict of a recipe in recipe keys (for writing next to outputs; `llavadi.recipe.load_recipe` reads it back)."""
    raw = dataclasses.asdict(recipe)
    for stage, config in zip(raw["stages"], recipe.stages):
        stage["train"] = config.train.to_dict()
    return raw
