"""Trainer checkpoints a resume can trust: a completion marker written last, cheap integrity checks.

The Trainer writes `checkpoint-N/` in place, file by file; a kill during the save leaves a folder
that looks like a checkpoint. DistillTrainer writes `llavadi_checkpoint.json` into the folder
after everything else (with the stage's totals: loss sum, skipped steps, replaced samples), so a
folder without it is an interrupted save. Files can also be damaged after the fact (a full disk,
a copy cut short): `checkpoint_problem` parses the JSON files, checks each safetensors header
against the file's length, and opens each torch file's zip directory (stored at its end, so a
truncated file fails), without reading the tensors.

`latest_complete_checkpoint` returns the newest checkpoint without a problem; newer ones are set
aside with a warning: an interrupted save is deleted (it holds nothing usable), a damaged
complete one is renamed `damaged-checkpoint-N` (kept for inspection, out of the Trainer's sight).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import zipfile

from llavadi.atomic import write_json_atomic

CHECKPOINT_MARKER = "llavadi_checkpoint.json"
DAMAGED_PREFIX = "damaged-"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: str) -> int | None:
    """N of a `checkpoint-N` folder (None for other names)."""
    m = _CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def write_checkpoint_marker(folder: str, ledger: dict) -> str:
    """Mark a checkpoint folder complete; `ledger` holds the stage's totals at that step."""
    return write_json_atomic(os.path.join(folder, CHECKPOINT_MARKER), ledger)


def remove_checkpoint_marker(folder: str) -> None:
    """Unmark a folder about to be (re)written."""
    try:
        os.unlink(os.path.join(folder, CHECKPOINT_MARKER))
    except FileNotFoundError:
        pass


def read_checkpoint_marker(folder: str) -> dict | None:
    """The marker's ledger, or None when absent or unreadable."""
    try:
        with open(os.path.join(folder, CHECKPOINT_MARKER), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return "header longer than the file (truncated)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) != size:
        return f"{size} bytes but the header describes {8 + n + max(ends, default=0)} (truncated or padded)"
    return None


def _file_problem(path: str) -> str | None:
    name = os.path.basename(path)
    try:
        if name.endswith(".safetensors"):
            return _safetensors_problem(path)
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
        elif name.endswith((".pt", ".pth", ".bin")):
            with zipfile.ZipFile(path) as z:  # torch.save's format; the directory is at the end
                z.infolist()
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def checkpoint_problem(folder: str) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None: it looks complete and intact)."""
    if not os.path.isfile(os.path.join(folder, CHECKPOINT_MARKER)):
        return "incomplete: its save was interrupted (no completion marker)"
    if not os.path.isfile(os.path.join(folder, "trainer_state.json")):
        return "no trainer_state.json"
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        if os.path.isfile(path):
            problem = _file_problem(path)
            if problem:
                return f"damaged file {os.path.basename(path)} ({problem})"
    return None


def latest_complete_checkpoint(ckpt_dir: str, log=print, set_aside: bool = True) -> str | None:
    """The newest usable checkpoint-N in `ckpt_dir`; newer unusable ones are reported (and set aside)."""
    found = sorted(((checkpoint_step(d), d) for d in glob.glob(os.path.join(ckpt_dir, "checkpoint-*"))
                    if os.path.isdir(d) and checkpoint_step(d) is not None), reverse=True)
    for _step, folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"WARNING: {folder} cannot be resumed from: {problem}; falling back to the previous checkpoint")
        if set_aside:
            _set_aside(folder, damaged=not problem.startswith("incomplete"), log=log)
    return None


def _set_aside(folder: str, damaged: bool, log) -> None:
    if not damaged:
        shutil.rmtree(folder, ignore_errors=True)
        return
    target = os.path.join(os.path.dirname(folder), DAMAGED_PREFIX + os.path.basename(folder))
    if os.path.exists(target):
        shutil.rmtree(target, ignore_errors=True)
    os.replace(folder, target)
    log(f"  kept as {target} for inspection (delete it to free the space)")


def checkpoint_finished(folder: str) -> bool:
    """Whether the checkpoint is the stage's last step (its trainer state reached max_steps)."""
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]
