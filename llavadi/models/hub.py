"""Where a checkpoint comes from: a local directory, or a Hugging Face hub id downloaded by the hub client."""

from __future__ import annotations

import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub repository id (owner/name)."""
    return bool(HUB_ID.fullmatch(name))


def source_kwargs(path: str | None, what: str, revision: str | None = None) -> dict:
    """from_pretrained keyword arguments for `path`: a local directory (never downloads) or a hub id.

    A hub id is fetched by the hub client (its cache; nothing when HF_HUB_OFFLINE=1), at `revision`.
    """
    if path and os.path.isdir(path):
        if revision is not None:
            raise ValueError(f"{what} {path!r} is a local directory: `revision` ({revision!r}) applies to hub ids only")
        return {"local_files_only": True}
    if path and is_hub_id(path) and not path.startswith("."):
        return {"revision": revision} if revision else {}
    raise FileNotFoundError(f"{what} {path!r} is neither a local directory nor a hub id (owner/name): "
                            "give the path of a checkpoint on disk")


def hub_error(path: str, what: str, error: Exception) -> FileNotFoundError:
    """The error to raise when a hub id could not be loaded (not found, no network, offline mode)."""
    offline = " (HF_HUB_OFFLINE is set: only models already in the hub cache load)" if os.environ.get(
        "HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
    return FileNotFoundError(f"{what} {path!r}: not a local directory, and loading it from the hub failed{offline}: "
                             f"{error}")


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """The local path of one file of a hub model (fetched by the hub client, or read from its cache when offline);
    None when the repository has no such file (or, offline, when the cache records that it has none).

    Offline, a file the cache knows nothing about cannot be told apart from a missing one: a FileNotFoundError
    says so (run once online, so the hub client records the file or its absence)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except LocalEntryNotFoundError as e:  # offline, or the hub cannot be reached (a subclass: caught first)
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):
            return cached
        if cached is not None:  # the cache records that the repository has no such file
            return None
        raise hub_error(repo_id, f"{filename} of", e) from None
    except EntryNotFoundError:  # the repository has no such file
        return None
