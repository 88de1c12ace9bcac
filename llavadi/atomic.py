"""Atomic file writes: a temporary file in the same folder, fsync, rename over the target.

A reader (or a rerun after a kill) sees the old file or the new one, never a half-written one.
Files get the user's normal mode (0666 minus the umask), not the 0600 of `tempfile.mkstemp`.
Temporary files are named `.<name>.<random>.tmp`; `remove_stale_temporaries` clears the ones a
killed process left behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache

TMP_SUFFIX = ".tmp"
# folders `staged_folder` writes before renaming them into place
TMP_DIR_PREFIX = ".tmp-save-"


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0666 minus the process umask: the mode `open(path, "w")` would give a new file."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """0777 minus the process umask: the mode `os.makedirs` would give a new folder."""
    return 0o777 & ~_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` for a writer that takes a file name; renamed over `path` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside `path`; on a clean exit it is flushed, fsynced and renamed over `path`."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write `text` to `path` atomically; returns the path."""
    with atomic_write(path) as handle:
        handle.write(text)
    return os.fspath(path)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> str:
    """Write `obj` as JSON to `path` atomically (NaN refused: it is not JSON); returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike) -> Iterator[str]:
    """A temporary folder beside `out_dir` that replaces it, complete and fsynced, when the block ends without error.

    The folder gets the user's normal mode; on an error (or a kill) `out_dir` is untouched and the
    temporary folder is removed (or, after a kill, left for `remove_stale_temporaries`).
    """
    out_dir = os.fspath(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TMP_DIR_PREFIX, dir=parent)
    try:
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes it 0700
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(root)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete what interrupted atomic writes left in `folder` (not recursive); returns what was removed."""
    removed = []
    for path in glob.glob(os.path.join(os.fspath(folder), f".*{TMP_SUFFIX}")):
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    for path in glob.glob(os.path.join(os.fspath(folder), f"{TMP_DIR_PREFIX}*")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
