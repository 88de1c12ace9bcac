"""The on-disk format of an offline teacher cache, its crash-safe writing and its reading by sample id.

A cache directory holds:
- ``manifest.json``: what produced the cache (teacher fingerprint: config + weight hashes; tokenizer
  hash; template, system prompt, max_length; k; the stored dtypes; which positions were cached;
  the data file's hash) and whether the run completed;
- ``teacher/``: the teacher's description without weights (config.json, tokenizer, image processor,
  llavadi.json): a student of another tokenizer renders each sample the teacher's way from it, to
  pair its answer tokens with the cached rows (and a student whose tokenizer is the teacher's up to
  additions gets its id map from it);
- ``shards/*.safetensors``: rows of many samples, concatenated. ``topk_ids`` (M, k) in the
  narrowest integer type the vocabulary allows, ``topk_logprobs`` (M, k) fp16 (or fp32) log-probs
  at T=1 normalised over the full vocabulary, ``logit_runs`` (R, 2) int32 the sequence positions
  of those rows as (start, length) runs (an answer is one run); optionally ``hidden`` (M_h, H) fp16,
  the teacher's last hidden states of the tokens hidden-state terms read, and ``hidden_runs``;
- ``index.json``: ``{"shards": [file names], "samples": {sample id: {shard: its number in that
  list, rows: [offset, count], runs: [offset, count] (and hidden_rows, hidden_runs), digest: {ids,
  types, image}}}}``. The digest is a hash of what produced the entry: the sample's token ids, its
  token types and its image bytes; an entry is only used when they still match.

Writing is a transaction per shard: the shard is written under a temporary name, fsynced and
renamed; only then is a line naming its entries appended to the writing process's journal
(``journal-rank<r>.jsonl``, fsynced). A torn last journal line or a temporary shard from a killed
run is never read. At the end the journals are merged into ``index.json`` (temporary name, fsync,
rename) and removed. Entries are found by sample id, never by position in the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llavadi.atomic import TMP_SUFFIX, atomic_path, write_text_atomic
from llavadi.identity import file_sha256, json_digest

Tensor = torch.Tensor
FORMAT_VERSION = 2  # 2: the teacher's description (teacher/) is part of the cache
FORMAT_CHANGES = {1: "version 2 adds the teacher's tokenizer, config and image processor (teacher/), which a student "
                     "of another tokenizer reads"}
TEACHER_DIR = "teacher"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.json"
SHARD_DIR = "shards"
JOURNAL_PREFIX = "journal-rank"
VALUE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.uint8: "uint8", torch.uint16: "uint16", torch.int32: "int32", torch.float16: "fp16",
               torch.float32: "fp32"}
DIGEST_PARTS = {"ids": "its token ids differ (its text, the template, the tokenizer or max_length changed)",
                "types": "its token types differ (the template's turn structure changed)",
                "image": "its image bytes differ (the image file was replaced or edited)"}


class CacheError(ValueError):
    """A teacher cache that cannot be used as asked; the message names the directory and the sample."""


# ---------------------------------------------------------------- dtypes
def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer type holding token ids 0..vocab_size-1."""
    if vocab_size <= 1 << 8:
        return torch.uint8
    if vocab_size <= 1 << 16:
        return torch.uint16
    return torch.int32


# ---------------------------------------------------------------- files
def read_json(path: str, what: str) -> Any:
    """A JSON file's content; a malformed file is an error naming it and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}:{e.lineno}: malformed {what} ({e.msg})") from e


# ---------------------------------------------------------------- hashes
def _short(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class ImageDigests:
    """Hashes of image files' bytes, remembered per (path, size, mtime) so an unchanged file is read once."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int, str]] = {}

    def __call__(self, path: str | list[str] | tuple[str, ...] | None) -> str:
        """The short hash of the file's bytes ('' for no image; the hashes joined by '+' for several images)."""
        if path is None:
            return ""
        if isinstance(path, (list, tuple)):
            return "+".join(self(p) for p in path)
        st = os.stat(path)
        known = self._seen.get(path)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        digest = _short(open(path, "rb").read())
        self._seen[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest


def sample_digest(input_ids, token_types, image_digest: str) -> dict[str, str]:
    """Short hashes of one unpadded sample's token ids, token types and image bytes."""
    ids = np.asarray(input_ids, dtype="<i4").tobytes()
    types = np.asarray(token_types, dtype="<u1").tobytes()
    return {"ids": _short(ids), "types": _short(types), "image": image_digest}


def digest_difference(cached: dict[str, str], current: dict[str, str]) -> list[str]:
    """What differs between a cached entry's digest and the sample's current one (empty: nothing)."""
    return [DIGEST_PARTS[k] for k in DIGEST_PARTS if cached.get(k) != current.get(k)]


def tokenizer_digest(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted(getattr(tokenizer, "all_special_tokens", []))
    return hashlib.sha256(json.dumps([vocab, specials], ensure_ascii=False).encode("utf-8")).hexdigest()


_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


def directory_fingerprint(model_dir: str) -> dict:
    """A saved model's identity, read from its files without loading it: config.json and weight file hashes."""
    config = read_json(os.path.join(model_dir, "config.json"), "model config")
    for key in _VOLATILE_CONFIG_KEYS:  # where it was loaded from and by which version: not what it computes
        config.pop(key, None)
    weights = {name: file_sha256(os.path.join(model_dir, name)) for name in sorted(os.listdir(model_dir))
               if name.endswith((".safetensors", ".bin")) and name != "distill_projectors.safetensors"}
    if not weights:
        raise CacheError(f"{model_dir}: no weight files (*.safetensors, *.bin) to fingerprint")
    return {"config": json_digest(config), "weights": weights}


def memory_fingerprint(model) -> dict:
    """An in-memory model's identity (a preset, a composed model): its config and its tensors' bytes."""
    config = model.config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"config": json_digest(config), "weights": {"state_dict": h.hexdigest()}}


# ---------------------------------------------------------------- writing shards
SHARD_TENSORS = ("logit_runs", "topk_ids", "topk_logprobs", "hidden_runs", "hidden")


def position_runs(positions: Tensor) -> Tensor:
    """(R, 2) int32 (start, length) runs of consecutive positions (an answer is one run: a few bytes a sample)."""
    if positions.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.int32)
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    ends = torch.cat([breaks, torch.tensor([positions.numel()])])
    return torch.stack([positions[starts], ends - starts], dim=1).to(torch.int32)


def run_positions(runs: Tensor) -> Tensor:
    """The (n,) long positions of (R, 2) runs."""
    if runs.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(int(s), int(s) + int(n)) for s, n in runs.tolist()])


class ShardWriter:
    """Rows of several samples gathered in memory, written as one shard transaction."""

    def __init__(self, topk: int, ids_dtype: torch.dtype, values_dtype: torch.dtype,
                 hidden_dtype: torch.dtype = torch.float16) -> None:
        self.topk, self.ids_dtype, self.values_dtype, self.hidden_dtype = topk, ids_dtype, values_dtype, hidden_dtype
        self._parts: dict[str, list[Tensor]] = {k: [] for k in SHARD_TENSORS}
        self._samples: list[tuple[str, dict, dict[str, int]]] = []  # id, digest, row and run counts

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample_id: str, digest: dict, positions: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
            hidden_positions: Tensor | None = None, hidden: Tensor | None = None) -> None:
        """One sample's rows (CPU tensors): prediction positions with their top-k, and optional hidden states."""
        runs = position_runs(positions)
        self._parts["logit_runs"].append(runs)
        self._parts["topk_ids"].append(topk_ids.to(self.ids_dtype))
        self._parts["topk_logprobs"].append(topk_logprobs.to(self.values_dtype))
        counts = {"rows": positions.shape[0], "runs": runs.shape[0]}
        if hidden is not None:
            hidden_runs = position_runs(hidden_positions)
            self._parts["hidden_runs"].append(hidden_runs)
            self._parts["hidden"].append(hidden.to(self.hidden_dtype))
            counts.update(hidden_rows=hidden.shape[0], hidden_runs=hidden_runs.shape[0])
        self._samples.append((sample_id, digest, counts))

    def _tensors(self) -> dict[str, Tensor]:
        tensors = {k: torch.cat(v).contiguous() for k, v in self._parts.items() if v}
        if "topk_ids" not in tensors:  # no sample at all
            tensors["topk_ids"] = torch.zeros(0, self.topk, dtype=self.ids_dtype)
            tensors["topk_logprobs"] = torch.zeros(0, self.topk, dtype=self.values_dtype)
            tensors["logit_runs"] = torch.zeros(0, 2, dtype=torch.int32)
        return tensors

    def commit(self, directory: str, name: str) -> dict[str, dict]:
        """Write the shard (temporary name, fsync, rename); returns the index entries of its samples."""
        from safetensors.torch import save_file

        with atomic_path(os.path.join(directory, SHARD_DIR, name)) as tmp:  # temporary name, fsync, rename
            save_file(self._tensors(), tmp, metadata={"format_version": str(FORMAT_VERSION)})
        entries, offsets = {}, {}
        for sample_id, digest, counts in self._samples:
            entry = {"shard": name}
            for key, n in counts.items():  # [offset, count] of the sample's rows / runs in the shard's tensors
                entry[key] = [offsets.get(key, 0), n]
                offsets[key] = offsets.get(key, 0) + n
            entries[sample_id] = {**entry, "digest": digest}
        return entries


# ---------------------------------------------------------------- journals and the index
def journal_path(directory: str, rank: int) -> str:
    """The journal of one writing process."""
    return os.path.join(directory, f"{JOURNAL_PREFIX}{rank:05d}.jsonl")


def _on_disk(entries: dict[str, dict]) -> tuple[list[str], dict[str, dict]]:
    """(shard names, entries naming their shard by its number in that list): each name is written once."""
    names = sorted({e["shard"] for e in entries.values()})
    number = {n: i for i, n in enumerate(names)}
    return names, {sid: {**e, "shard": number[e["shard"]]} for sid, e in entries.items()}


def _in_memory(obj: dict, where: str) -> dict[str, dict]:
    """Entries with their shard's name, from an index (or journal line) as written by _on_disk."""
    try:
        names = obj["shards"]
        return {sid: {**e, "shard": names[e["shard"]]} for sid, e in obj["samples"].items()}
    except (KeyError, IndexError, TypeError) as e:
        raise CacheError(f"{where}: not a cache index ({type(e).__name__}: {e})") from None


def append_journal(directory: str, rank: int, entries: dict[str, dict]) -> None:
    """Append one committed shard's entries to the rank's journal as one fsynced line."""
    names, samples = _on_disk(entries)
    with open(journal_path(directory, rank), "a", encoding="utf-8") as f:
        f.write(json.dumps({"shards": names, "samples": samples}, ensure_ascii=False, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_journal(path: str) -> dict[str, dict]:
    """Entries of a journal; a torn last line (a run killed while appending) is ignored."""
    entries: dict[str, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    # every committed line ends with a newline: the text after the last one is a torn append, never used
    for i, line in enumerate(lines[:-1]):
        try:
            entries.update(_in_memory(json.loads(line), f"{path}:{i + 1}"))
        except json.JSONDecodeError:
            raise CacheError(f"{path}:{i + 1}: malformed journal line (a complete line: the file is damaged)") from None
    return entries


def read_index(path: str) -> dict[str, dict]:
    """The entries of an index.json, each naming its shard file."""
    return _in_memory(read_json(path, "cache index"), path)


def write_index(directory: str, entries: dict[str, dict]) -> None:
    """index.json: {"shards": [file names], "samples": {id: {shard: number, rows, runs, digest}}}, atomically."""
    names, samples = _on_disk(entries)
    text = json.dumps({"shards": names, "samples": samples}, ensure_ascii=False, separators=(",", ":"))
    write_text_atomic(os.path.join(directory, INDEX_FILE), text + "\n")


def journals(directory: str) -> list[str]:
    """The journal files present."""
    return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                  if n.startswith(JOURNAL_PREFIX) and n.endswith(".jsonl"))


def read_entries(directory: str) -> dict[str, dict]:
    """Every committed entry: index.json, then the journals (newer) over it."""
    entries: dict[str, dict] = {}
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        entries.update(read_index(index))
    for path in journals(directory):
        entries.update(_read_journal(path))
    return entries


def consolidate(directory: str) -> dict[str, dict]:
    """Merge the journals into index.json (atomically), remove them, temporary and unreferenced shards."""
    entries = read_entries(directory)
    write_index(directory, entries)
    for path in journals(directory):
        os.unlink(path)
    referenced = {e["shard"] for e in entries.values()}
    folder = os.path.join(directory, SHARD_DIR)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            # temporary shards of killed runs, and shards whose entries were all replaced
            if name.endswith(TMP_SUFFIX) or (name.endswith(".safetensors") and name not in referenced):
                os.unlink(os.path.join(folder, name))
    return entries


def next_shard_number(directory: str) -> int:
    """1 + the highest shard number present (shards are named shard-<number>-rank<r>.safetensors)."""
    folder = os.path.join(directory, SHARD_DIR)
    numbers = [int(n.split("-")[1]) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
               if n.startswith("shard-") and n.endswith(".safetensors")]
    return max(numbers, default=-1) + 1


def shard_name(number: int, rank: int) -> str:
    """The file name of a shard."""
    return f"shard-{number:06d}-rank{rank:05d}.safetensors"


def cache_identity(directory: str) -> dict:
    """What a cache holds, by content (a rerun that changes nothing keeps it): manifest and index sha256."""
    return {name: file_sha256(os.path.join(directory, name)) if os.path.isfile(os.path.join(directory, name))
            else None for name in (MANIFEST_FILE, INDEX_FILE)}


# ---------------------------------------------------------------- reading
@dataclass
class CachedRows:
    """One sample's cached rows."""

    positions: Tensor  # (n,) long: prediction positions
    topk_ids: Tensor  # (n, k) long
    topk_logprobs: Tensor  # (n, k) float32
    hidden_positions: Tensor | None = None  # (n_h,) long
    hidden: Tensor | None = None  # (n_h, H) stored dtype


class CacheReader:
    """A completed cache directory: its manifest, its index, and each sample's rows by id."""

    def __init__(self, directory: str) -> None:
        self.directory = str(directory)
        manifest = os.path.join(self.directory, MANIFEST_FILE)
        if not os.path.isfile(manifest):
            raise CacheError(f"{self.directory}: not a teacher cache (no {MANIFEST_FILE}); write one with "
                             "`llavadi cache-teacher RECIPE --out DIR`")
        self.manifest = read_json(manifest, "cache manifest")
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            change = f" ({FORMAT_CHANGES[version]})" if version in FORMAT_CHANGES else ""
            raise CacheError(f"{manifest}: teacher cache format version {version!r}, this llavadi reads "
                             f"{FORMAT_VERSION}{change}; rewrite it: run the `llavadi cache-teacher` command that wrote "
                             f"it with another --out (or after deleting {self.directory})")
        index = os.path.join(self.directory, INDEX_FILE)
        if not self.manifest.get("complete") or not os.path.isfile(index):
            raise CacheError(f"{self.directory}: the cache-teacher run that writes it did not finish; run the same "
                             "`llavadi cache-teacher` command again to complete it")
        self.index: dict[str, dict] = read_index(index)
        self._shards: dict[str, Any] = {}

    def entry(self, sample_id: str) -> dict:
        """The index entry of a sample; an error naming it when it is not cached."""
        entry = self.index.get(sample_id)
        if entry is None:
            raise CacheError(f"teacher cache {self.directory}: sample {sample_id!r} is not in the cache (added to the "
                             "data since caching?); run `llavadi cache-teacher` again, it adds only what is missing")
        return entry

    def _shard(self, name: str):
        from safetensors import safe_open

        handle = self._shards.get(name)
        if handle is None:
            path = os.path.join(self.directory, SHARD_DIR, name)
            if not os.path.isfile(path):
                raise CacheError(f"teacher cache {self.directory}: shard {name} named by the index is missing")
            handle = self._shards[name] = safe_open(path, framework="pt")
        return handle

    def rows(self, sample_id: str) -> CachedRows:
        """The cached rows of one sample (ids as long, log-probs as float32)."""
        entry = self.entry(sample_id)
        shard = self._shard(entry["shard"])

        def part(name: str, key: str) -> Tensor:
            start, n = entry[key]
            return shard.get_slice(name)[start:start + n]

        out = CachedRows(run_positions(part("logit_runs", "runs")), part("topk_ids", "rows").long(),
                         part("topk_logprobs", "rows").float())
        if "hidden_rows" in entry:
            out.hidden_positions = run_positions(part("hidden_runs", "hidden_runs"))
            out.hidden = part("hidden", "hidden_rows")
        return out
