"""Validate a whole recipe before any model loads: every problem in one report, then stop.

Checked for every stage before the first model's weights are read (loading a 13B teacher takes
minutes; a mistake found after it, or after stage 1 has trained, costs a run):
- what the machine must provide (`llavadi.train.requirements`): flash-attn, bitsandbytes and CUDA when
  asked for, mixed precision the device runs, an engine that runs here (and the stage: no on_policy
  under ZeRO-3 or FSDP), DeepSpeed ops that can be built;
- the model folders: config.json, a weights file, tokenizer, image processor, llavadi.json, read
  from the files only (`llavadi.models.describe`);
- each stage's TrainingArguments, built once (field names and value types were checked when the
  recipe was read, `llavadi.training_args`): values and combinations TrainingArguments refuses;
- `vision_from_layer` and every term's layer indices against the model configs; the objective is
  built on the meta device in the models' context (widths, image-token counts), which also checks
  the tokenizers of logit terms (tokenizer files only);
- the data, exactly as training reads it: every sample parsed and tokenized, every image decoded
  completely (`llavadi.data.images`, verdicts cached by size and mtime, so reruns only stat).
  Under `on_error: raise` each bad sample is a problem; under `skip` it is counted and listed, and
  training leaves it out (the stage's data_report.json lists it).

The data identities found here feed the stages' fingerprints (`llavadi.train.stages`); the data of a
stage whose completion marker matches its fingerprint (a rerun of a finished stage) is not
tokenized again: it was checked when the stage ran and has not changed since.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from llavadi.atomic import write_json_atomic
from llavadi.config import ConfigError, Recipe, StageConfig
from llavadi.data.dataset import LlavaDataset, Skipped, read_json_records, record_image_paths
from llavadi.data.encode import SampleError
from llavadi.data.images import check_images
from llavadi.device import resolve_device
from llavadi.distill.compat import tokenizer_pair
from llavadi.distill.terms import is_logit_term
from llavadi.distill.view import normalise_index
from llavadi.models.describe import describe_model
from llavadi.teacher.cache import check_dataset, dataset_teacher, preflight_cache, uses_cache
from llavadi.teacher.cache_format import CacheError
from llavadi.train import stage_inputs
from llavadi.train.engines import process_arguments
from llavadi.train.requirements import environment_problems
from llavadi.train.stages import data_identity, stage_fingerprints, stage_status
from llavadi.training_args import TrainArgsError, check_training_arguments

SHOWN_SAMPLES = 10
REPORT_FILE = "preflight_report.json"


class PreflightError(ConfigError):
    """Problems found before training; the message lists them all."""


@dataclass
class StageCheck:
    """What validation found for one stage's data."""

    name: str
    data: str
    used: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    identity: dict = field(default_factory=dict)  # for the stage's fingerprint


def check_train_arguments(recipe: Recipe, stage: StageConfig, where: str) -> list[str]:
    """The stage's TrainingArguments built once: values and combinations TrainingArguments refuses.

    Field names and value types were checked when the recipe was read (llavadi.training_args).
    """
    use_cpu = resolve_device(recipe.device).type == "cpu"
    checkpoints = os.path.join(recipe.output_dir, stage.name, "checkpoints")
    try:
        check_training_arguments([(f"{where}.train", process_arguments(stage.train.args), checkpoints)], recipe.seed,
                                 use_cpu)
    except TrainArgsError as e:
        return [str(e)]
    return []


def _text_layers(config) -> int:
    return int(getattr(config, "text_config", config).num_hidden_layers)


def check_model_fit(stage: StageConfig, student, teacher, where: str, cache=None) -> list[str]:
    """Layer indices and term options against the model configs; tokenizers of logit terms.

    With a teacher `cache` (a CacheReader) the objective is the cache's (its teacher config, top-k)."""
    problems = []
    v = stage.trainable.vision_from_layer
    n_vision = int(student.model.config.vision_config.num_hidden_layers)
    if v is not None and not 0 <= v < n_vision:
        problems.append(f"{where}.trainable.vision_from_layer: {v} is out of range: the student's vision tower "
                        f"has {n_vision} layers (0..{n_vision - 1})")
    use_teacher = teacher if stage.distill.terms else None
    try:
        with torch.device("meta"):  # projectors sized from the configs, no memory
            objective = stage_inputs.build_objective(stage, student, use_teacher, cache)
    except ValueError as e:
        return problems + [f"{where}.distill: {e}"]
    for who, needs, model in (("student", objective.student_needs, student),
                              ("teacher", objective.teacher_needs, use_teacher)):
        if model is None:
            continue
        n = _text_layers(model.model.config)
        checks = [(i, n + 1, "hidden state") for i in sorted(needs.hidden_layers)]
        checks += [(i, n, "attention layer") for i in sorted(needs.attention_layers)]
        for index, count, what in checks:
            try:
                normalise_index(index, count, what, who)
            except ValueError as e:
                problems.append(f"{where}.distill.terms: {e}")
    return problems


def data_identities(recipe: Recipe, progress: bool) -> dict[str, dict | None]:
    """Each stage's data identity (file sha256; images by path, size, mtime); None if its file is unreadable."""
    out: dict[str, dict | None] = {}
    for stage in recipe.stages:
        try:
            records = read_json_records(stage.data.path)
        except SampleError:
            out[stage.name] = None  # the full check reports it
            continue
        verdicts = check_images(record_image_paths(records, stage.data.image_folder), stage.data.max_pixels,
                                progress=progress, desc=f"checking the images of {os.path.basename(stage.data.path)}")
        out[stage.name] = data_identity(stage.data.path, stage.data.image_folder, verdicts)
    return out


def finished_stages(recipe: Recipe, identities: dict[str, dict | None]) -> set[str]:
    """Stages whose completion marker matches their fingerprint now: their data was checked when they ran."""
    if any(i is None for i in identities.values()):
        return set()
    try:
        fingerprints = stage_fingerprints(recipe, identities)
    except OSError:  # a model folder is missing: reported by the model checks
        return set()
    return {s.name for s in recipe.stages
            if stage_status(os.path.join(recipe.output_dir, s.name), fingerprints[s.name], log=lambda *_: None)[0]
            == "done"}


def check_stage_data(stage: StageConfig, student, teacher, progress: bool,
                     cache=None) -> tuple[StageCheck, list[str]]:
    """Parse, tokenize and decode a stage's data as training will; bad samples are counted, not raised.

    With a teacher `cache`, every usable sample must be in it, unchanged since it was cached."""
    check = StageCheck(stage.name, stage.data.path)
    collect = dataclasses.replace(stage, data=dataclasses.replace(stage.data, on_error="skip"))
    try:
        if student is not None:
            data_teacher = teacher if cache is None else dataset_teacher(cache)  # as training builds it
            dataset = stage_inputs.build_dataset(collect, student, data_teacher if stage.distill.terms else None,
                                                 progress=progress)
        else:  # the student's files are unreadable (reported apart): check what needs no tokenizer
            dataset = LlavaDataset(stage.data.path, stage.data.image_folder, [], on_error="skip",
                                   max_pixels=stage.data.max_pixels, progress=progress)
    except SampleError as e:  # unreadable file, malformed JSON, or no usable sample at all
        return check, [str(e)]
    check.used, check.skipped = len(dataset), dataset.skipped
    if cache is not None:
        try:
            check_dataset(cache, dataset, "teacher cache")
        except CacheError as e:
            return check, [str(e)]
    if stage.data.on_error == "skip" or not dataset.skipped:
        return check, []
    shown = [f"    {s.reason}" for s in dataset.skipped[:SHOWN_SAMPLES]]
    more = len(dataset.skipped) - SHOWN_SAMPLES
    return check, [f"{stage.data.path}: {len(dataset.skipped)} bad sample(s) of {len(dataset) + len(dataset.skipped)}:\n"
                   + "\n".join(shown) + (f"\n    ... and {more} more" if more > 0 else "")]


def feature_layer_problems(spec, described, who: str) -> list[str]:
    """`vision_feature_layer` is applied when composing vision + llm; a folder or preset reads its config's layer,
    so another value there would be silently ignored: refused by name."""
    if spec is None or described is None or spec.vision or spec.llm or spec.vision_feature_layer is None:
        return []
    reads = getattr(described.model.config, "vision_feature_layer", None)
    if spec.vision_feature_layer == reads:
        return []
    return [f"{who}.vision_feature_layer: {spec.vision_feature_layer}, but the model reads layer {reads} (its "
            "config's vision_feature_layer); the key applies when composing `vision` + `llm` only: remove it"]


def has_teacher_model(recipe: Recipe) -> bool:
    """Whether the recipe names a teacher model (path, preset or vision + llm), not only a cache."""
    t = recipe.teacher
    return t is not None and bool(t.path or t.preset or t.vision or t.llm)


def _describe(spec, what: str, problems: list[str]):
    try:
        return describe_model(spec)
    except (ValueError, OSError, KeyError) as e:  # ModelFilesError, FileNotFoundError, unknown preset
        problems.append(f"{what}: {e}")
        return None


def preflight(recipe: Recipe, log=print, progress: bool = True, report_dir: str | None = None,
              resume: bool = True) -> dict[str, StageCheck]:
    """Check everything a run needs before any weights load; raise PreflightError listing every problem.

    With `resume`, the data of stages already done (matching completion marker) is not tokenized again.
    """
    problems: list[str] = environment_problems(recipe)  # packages, device, precision, engines, DeepSpeed ops
    student = _describe(recipe.student, "student", problems)
    # a teacher given only as a cache has no model files (its config is in the cache's manifest)
    teacher = _describe(recipe.teacher, "teacher", problems) if has_teacher_model(recipe) else None
    problems += feature_layer_problems(recipe.student, student, "student")
    problems += feature_layer_problems(recipe.teacher, teacher, "teacher")
    if student is not None and teacher is not None and any(is_logit_term(t) for s in recipe.stages
                                                           for t in s.distill.terms):
        for line in tokenizer_pair(student, teacher).describe():  # the kind of the pair, and what differs
            log(line)
    identities = data_identities(recipe, progress)
    done = finished_stages(recipe, identities) if resume and not problems else set()
    checks: dict[str, StageCheck] = {}
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}] ({stage.name})"
        problems += check_train_arguments(recipe, stage, where)
        cache = None
        if student is not None and uses_cache(recipe, stage):
            cache, cache_problems = preflight_cache(recipe, stage, student, where)
            problems += cache_problems
        if student is not None and (teacher is not None or cache is not None or not stage.distill.terms):
            problems += check_model_fit(stage, student, teacher, where, cache)
        check, data_problems = (StageCheck(stage.name, stage.data.path), []) if stage.name in done else \
            check_stage_data(stage, student, teacher, progress, cache)
        check.identity = identities[stage.name] or {}
        problems += [f"{where}.data: {p}" for p in data_problems]
        checks[stage.name] = check
        if check.skipped and stage.data.on_error == "skip":
            log(f"[{stage.name}] {len(check.skipped)} bad sample(s) will be left out (on_error: skip); "
                f"{check.used} used; the list goes to {stage.name}/data_report.json")
    if report_dir is not None:
        _write_report(report_dir, problems, checks)
    if problems:
        raise PreflightError(
            f"{len(problems)} problem(s) found before loading any model:\n  - " + "\n  - ".join(problems)
            + "\nNothing was trained. Fix them"
            + (", or set data.on_error: skip to leave bad samples out (they are then counted and listed)"
               if any(".data:" in p for p in problems) else "")
            + (f". Full list: {os.path.join(report_dir, REPORT_FILE)}" if report_dir else ""))
    return checks


def _write_report(report_dir: str, problems: list[str], checks: dict[str, StageCheck]) -> None:
    os.makedirs(report_dir, exist_ok=True)
    write_json_atomic(os.path.join(report_dir, REPORT_FILE), {
        "problems": problems,
        "stages": {name: {"data": c.data, "used": c.used, "skipped": [vars(s) for s in c.skipped]}
                   for name, c in checks.items()},
    })
