"""A stage is a transaction: its outputs are trusted only under a completion marker that matches.

Every stage has a fingerprint: the hash of its resolved recipe (the stage's data, trainable,
distill and train settings, the student and teacher specs, the seed; not output paths nor
logging/saving cadence), of its data (the data file's bytes; each image by path, size and
modification time, not its content) and of what it starts from (the student's files by size and
modification time for the first stage, the previous stage's fingerprint after that).

- `stage.json` records the fingerprint when a stage starts training: its checkpoints belong to it.
- `done.json` is written last, after the outputs (model/, distill_projectors.safetensors,
  data_report.json) were written into a staging folder and renamed into place; it lists every
  output file with its size.

A rerun finds a stage done only when `done.json` matches the fingerprint and the outputs are
intact; a stage whose recipe or data changed (finished or half-trained) is refused with what
changed and how to proceed (a new output folder, or `--force` to retrain it), never silently
reused or resumed with other settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

from llavadi.atomic import fsync_dir, remove_stale_temporaries, write_json_atomic
from llavadi.config import ConfigError, Recipe, StageConfig
from llavadi.identity import file_sha256, folder_identity, json_digest
from llavadi.teacher.cache_format import cache_identity

STAGE_RECORD = "stage.json"
DONE_MARKER = "done.json"
STAGING_DIR = ".publish-staging"
CHECKPOINTS_DIR = "checkpoints"
# settings that change when and how a stage reports or saves, not what it trains
OPERATIONAL_TRAIN_KEYS = ("logging_steps", "logging_strategy", "logging_first_step", "save_steps", "save_strategy",
                          "save_total_limit", "dataloader_num_workers", "report_to", "run_name", "disable_tqdm")
SHOWN_CHANGES = 6


class StageChangedError(ConfigError):
    """A rerun whose recipe or data differs from what an output folder's stages were trained with."""


def _short(value, width: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _diff(old, new, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in old or k not in new:
                out.append(f"{sub}: {_short(old.get(k, '<absent>'))} -> {_short(new.get(k, '<absent>'))}")
            else:
                _diff(old[k], new[k], sub, out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            _diff(a, b, f"{path}[{i}]", out)
    elif old != new:
        out.append(f"{path}: {_short(old)} -> {_short(new)}")


def changes(old, new, limit: int = SHOWN_CHANGES) -> list[str]:
    """`key: old -> new` for each difference, at the shallowest level that differs (the first `limit`)."""
    out: list[str] = []
    _diff(old, new, "", out)
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def model_identity(spec) -> dict:
    """What a model spec starts from: a preset's name, or its folders' files (a teacher cache: its files)."""
    if getattr(spec, "cache", None):  # a teacher cache: its manifest and index, by content
        return {"cache": cache_identity(spec.cache),
                **({"files": folder_identity(spec.path)} if spec.path else {})}
    if spec.preset:
        return {"preset": spec.preset}
    def files(p):  # a hub id is identified by its name and revision
        return folder_identity(p) if os.path.isdir(p) else {"hub": p, "revision": spec.revision}

    if spec.path:
        return {"files": files(spec.path)}
    return {"vision": files(spec.vision), "llm": files(spec.llm), "vision_feature_layer": spec.vision_feature_layer}


def data_identity(path: str, image_folder: str | None, image_verdicts: dict) -> dict:
    """The data file's sha256 and a digest of its images' (path, size, mtime)."""
    root = image_folder or os.path.dirname(os.path.abspath(path))
    images = sorted((os.path.relpath(p, root), v.size, v.mtime_ns) for p, v in image_verdicts.items())
    return {"sha256": file_sha256(path), "images": len(images), "images_digest": json_digest(images)}


def stage_recipe(recipe: Recipe, stage: StageConfig) -> dict:
    """The settings that decide a stage's result (paths are covered by the data and model identities)."""
    s = dataclasses.asdict(stage)
    s["data"] = {k: v for k, v in s["data"].items() if k not in ("path", "image_folder")}
    s["train"] = {k: v for k, v in stage.train.to_dict().items() if k not in OPERATIONAL_TRAIN_KEYS}

    def spec(m):  # what a model spec says besides its paths
        if m is None:
            return None
        # an unset vision_feature_layer is recorded as -2, the key's former default, so stages finished
        # before it became optional stay done (a folder or preset model reads its config's layer anyway)
        said = {**dataclasses.asdict(m), "vision_feature_layer": m.composed_feature_layer()}
        return {k: v for k, v in said.items() if k not in ("path", "vision", "llm", "cache") and v is not None}

    return {"stage": s, "student": spec(recipe.student), "seed": recipe.seed,
            "teacher": spec(recipe.teacher) if stage.distill.terms else None}


@dataclass
class StageFingerprint:
    """What a stage's result depends on, and its hash."""

    recipe: dict
    data: dict
    input: dict

    @property
    def digest(self) -> str:
        """sha256 over recipe, data and input."""
        return json_digest({"recipe": self.recipe, "data": self.data, "input": self.input})

    def record(self) -> dict:
        """The fingerprint as stored in stage.json / done.json."""
        return {"digest": self.digest, "recipe": self.recipe, "data": self.data, "input": self.input}


def stage_fingerprints(recipe: Recipe, data_ids: dict[str, dict]) -> dict[str, StageFingerprint]:
    """Each stage's fingerprint, chained: a stage starts from the previous stage's result."""
    teacher = model_identity(recipe.teacher) if recipe.teacher is not None else None
    start = {"student": model_identity(recipe.student)}
    out = {}
    for stage in recipe.stages:
        source = dict(start, teacher=teacher if stage.distill.terms else None)
        out[stage.name] = fp = StageFingerprint(stage_recipe(recipe, stage), data_ids[stage.name], source)
        start = {"previous_stage": stage.name, "digest": fp.digest}
    return out


def _read_json(path: str):
    """The JSON in `path`; None if absent; 'unreadable' if damaged."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else "unreadable"
    except (OSError, ValueError):
        return "unreadable"


def _outputs_problem(stage_dir: str, outputs: dict) -> str | None:
    for rel, size in outputs.items():
        path = os.path.join(stage_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def _changed(stage: str, stage_dir: str, record, fp: StageFingerprint, what: str) -> str:
    if record == "unreadable" or record is None:
        return f"stage {stage!r}: {stage_dir} holds {what} but its record is unreadable or missing"
    lines = []
    for part, label in (("recipe", "recipe"), ("data", "data"), ("input", "starting model")):
        if record.get(part) != getattr(fp, part):
            lines += [f"{label}: {c}" for c in changes(record.get(part) or {}, getattr(fp, part))]
    return f"stage {stage!r}: {stage_dir} holds {what} with another recipe or data:\n      " + "\n      ".join(lines)


def stage_status(stage_dir: str, fp: StageFingerprint, log=print) -> tuple[str, str | None]:
    """('done' | 'resume' | 'fresh' | 'changed', why) for a stage folder and the current fingerprint."""
    name = os.path.basename(stage_dir)
    done = _read_json(os.path.join(stage_dir, DONE_MARKER))
    if isinstance(done, dict) and done.get("digest") == fp.digest:
        problem = _outputs_problem(stage_dir, done.get("outputs", {}))
        if problem is None:
            return "done", None
        log(f"[{name}] its outputs are damaged ({problem}): publishing them again")
        return "resume", None
    if isinstance(done, dict):
        return "changed", _changed(name, stage_dir, done, fp, "a finished stage")
    started = _read_json(os.path.join(stage_dir, STAGE_RECORD))
    if isinstance(started, dict) and started.get("digest") == fp.digest:
        return "resume", None
    if started is not None:
        return "changed", _changed(name, stage_dir, started, fp, "a partly trained stage")
    leftovers = [n for n in ("model", CHECKPOINTS_DIR) if os.path.exists(os.path.join(stage_dir, n))]
    if leftovers:
        return "changed", _changed(name, stage_dir, None, fp, f"{' and '.join(leftovers)}")
    return "fresh", None


def plan_stages(recipe: Recipe, fps: dict[str, StageFingerprint], resume: bool = True, force: bool = False,
                log=print, act: bool = True) -> dict[str, str]:
    """Each stage's status ('done', 'resume', 'fresh'); stages that changed are refused unless `force`.

    With `force` a changed stage (and, by the fingerprint chain, every stage after it) is wiped
    and trained afresh; with `resume=False` every stage is. `act=False` plans without deleting.
    """
    statuses = {}
    for stage in recipe.stages:
        stage_dir = os.path.join(recipe.output_dir, stage.name)
        statuses[stage.name] = stage_status(stage_dir, fps[stage.name], log) if resume else ("wipe", None)
    refused = [why for status, why in statuses.values() if status == "changed"]
    if refused and not force:
        raise StageChangedError(
            "this output folder was trained with another recipe or data:\n  - " + "\n  - ".join(refused)
            + "\nTo keep those results, give this run another output folder (output_dir, or --output-dir); "
            "to retrain the changed stages (and the ones after them) with the new settings, rerun with --force.")
    plan = {}
    for name, (status, _) in statuses.items():
        stage_dir = os.path.join(recipe.output_dir, name)
        if status in ("changed", "wipe"):
            if act and os.path.isdir(stage_dir):
                log(f"[{name}] starting afresh: deleting {stage_dir}")
                shutil.rmtree(stage_dir)
            status = "fresh"
        plan[name] = status
    return plan


def begin_stage(stage_dir: str, fp: StageFingerprint) -> None:
    """Record the fingerprint a stage's checkpoints are trained under (before the first one)."""
    os.makedirs(stage_dir, exist_ok=True)
    write_json_atomic(os.path.join(stage_dir, STAGE_RECORD), fp.record())


def _files(root: str, name: str) -> dict[str, int]:
    path = os.path.join(root, name)
    if os.path.isfile(path):
        return {name: os.path.getsize(path)}
    out = {}
    for folder, _, files in os.walk(path):
        for f in files:
            full = os.path.join(folder, f)
            out[os.path.relpath(full, root)] = os.path.getsize(full)
    return out


def publish_stage(stage_dir: str, fp: StageFingerprint, write_outputs, summary: dict | None = None) -> dict:
    """Write a stage's outputs into a staging folder, rename them into place, then write done.json.

    `write_outputs(folder)` writes the outputs (model/, projectors, data_report.json) into `folder`.
    """
    staging = os.path.join(stage_dir, STAGING_DIR)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    write_outputs(staging)
    names = sorted(os.listdir(staging))
    outputs = {rel: size for n in names for rel, size in _files(staging, n).items()}
    done_path = os.path.join(stage_dir, DONE_MARKER)
    if os.path.exists(done_path):
        os.unlink(done_path)  # from here on the stage is not done until the new marker is written
    for n in names:
        target = os.path.join(stage_dir, n)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, n), target)
    fsync_dir(stage_dir)
    record = {**fp.record(), **(summary or {}), "outputs": outputs}
    write_json_atomic(done_path, record)
    shutil.rmtree(staging, ignore_errors=True)
    return record


def clean_interrupted_writes(output_dir: str, stage_names: list[str]) -> list[str]:
    """Delete what killed writes left behind (temporary files and folders, staging folders)."""
    removed = remove_stale_temporaries(output_dir) if os.path.isdir(output_dir) else []
    for name in stage_names:
        stage_dir = os.path.join(output_dir, name)
        if os.path.isdir(stage_dir):
            removed += remove_stale_temporaries(stage_dir)
            staging = os.path.join(stage_dir, STAGING_DIR)
            if os.path.isdir(staging):
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
    return removed
