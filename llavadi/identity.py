"""What a file or a folder is, for fingerprints: a file's sha256, or each file's size and mtime.

Data files are small next to weights and are hashed; model folders (gigabytes of weights) and
images (hundreds of thousands of files) are identified by size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os


def json_digest(obj) -> str:
    """sha256 of an object's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_identity(folder: str | os.PathLike) -> dict[str, list[int]]:
    """Each visible file of a folder (not recursive) by [size, mtime_ns]."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not name.startswith("."):
            st = os.stat(path)
            out[name] = [st.st_size, st.st_mtime_ns]
    return out
