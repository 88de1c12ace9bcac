"""Image checks: every image fully decoded once, in parallel, its verdict cached by (path, size, mtime).

Reading an image's header is not enough: a PNG or JPEG cut short opens fine and fails only when
its pixels are decoded, which at training time would stop a run at the same step on every
resume. `check_images` decodes each file completely (threads: Pillow's decoders release the GIL),
refuses images above a pixel limit before decoding them (the limit is read from the header), and
keeps the verdicts in a small JSON cache written atomically, so a rerun only stats the files.
A file is re-checked when its size or modification time changes (not its content: hashing
hundreds of thousands of images would cost more than decoding them).

The cache lives in `$LLAVADI_CACHE_DIR` (default `~/.cache/llavadi`), one file per image folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

from llavadi.atomic import write_json_atomic

DEFAULT_MAX_PIXELS = 50_000_000
CACHE_ENV = "LLAVADI_CACHE_DIR"
CACHE_VERSION = 1
# below this many unchecked images a progress bar is noise
PROGRESS_MIN_IMAGES = 200


class ImageTooLarge(ValueError):
    """An image over the pixel limit (decoding it could take gigabytes)."""


@dataclass(frozen=True)
class ImageVerdict:
    """What one full decode of an image file found: its identity (size, mtime), its pixels or an error."""

    size: int
    mtime_ns: int
    width: int | None = None
    height: int | None = None
    error: str | None = None
    decoded: bool = True  # False: judged too large from its header, pixels not decoded

    def problem(self, max_pixels: int | None) -> str | None:
        """Why the image cannot be used under `max_pixels` (None: usable)."""
        if self.error is not None:
            return self.error
        if max_pixels is not None and self.width * self.height > max_pixels:
            return too_large_message(self.width, self.height, max_pixels)
        return None


def too_large_message(width: int, height: int, max_pixels: int) -> str:
    """The pixel-limit error, saying how to raise the limit."""
    return (f"image of {width}x{height} = {width * height / 1e6:.1f} megapixels is over the limit of "
            f"{max_pixels / 1e6:g} megapixels (data.max_pixels; raise it if such images are intended)")


def open_image(path: str | os.PathLike | BinaryIO, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An image (a file path or an open binary file) decoded completely, in RGB.

    The pixel limit is checked from the header, before decoding.
    """
    with Image.open(path) as im:
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLarge(too_large_message(width, height, max_pixels))
        return im.convert("RGB")  # convert() decodes every pixel (load() is lazy for some formats)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def decode_verdict(path: str, max_pixels: int | None = None) -> ImageVerdict:
    """Decode one file completely and say what happened (never raises)."""
    try:
        size, mtime = _identity(path)
    except OSError as e:
        return ImageVerdict(-1, -1, error=f"image file not found or unreadable: {path} ({e.strerror or e})")
    try:
        with Image.open(path) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                return ImageVerdict(size, mtime, width, height, decoded=False)
            im.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return ImageVerdict(size, mtime, error=f"unreadable image {path} ({type(e).__name__}: {e})")
    return ImageVerdict(size, mtime, width, height)


def cache_dir() -> str:
    """Where image verdicts are cached: $LLAVADI_CACHE_DIR, else ~/.cache/llavadi."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llavadi")


def _cache_file(root: str) -> str:
    key = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), "image-verdicts", f"{key}.json")


def _common_root(paths: list[str]) -> str:
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    return os.path.commonpath(sorted(folders)) if folders else os.getcwd()


def _read_cache(file: str, root: str) -> dict[str, ImageVerdict]:
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("version") != CACHE_VERSION or raw.get("root") != root:
            return {}
        return {rel: ImageVerdict(*entry) for rel, entry in raw["verdicts"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # a missing or damaged cache costs one more decode pass, nothing else


def _write_cache(file: str, root: str, verdicts: dict[str, ImageVerdict]) -> None:
    merged = {**_read_cache(file, root), **verdicts}  # keep what a parallel run added meanwhile
    entries = {rel: [v.size, v.mtime_ns, v.width, v.height, v.error] for rel, v in sorted(merged.items())}
    try:
        write_json_atomic(file, {"version": CACHE_VERSION, "root": root, "verdicts": entries}, indent=None)
    except OSError:
        pass  # a read-only cache folder only costs speed


def check_images(paths: Iterable[str], max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int | None = None,
                 progress: bool = True, desc: str = "checking images") -> dict[str, ImageVerdict]:
    """The verdict of every image file (absolute path -> ImageVerdict), decoding only what the cache lacks."""
    unique = sorted({os.path.abspath(p) for p in paths})
    if not unique:
        return {}
    root = _common_root(unique)
    file = _cache_file(root)
    cached = _read_cache(file, root)
    out: dict[str, ImageVerdict] = {}
    todo: list[str] = []
    for path in unique:
        hit = cached.get(os.path.relpath(path, root))
        try:
            current = _identity(path)
        except OSError:
            current = None
        if hit is not None and current == (hit.size, hit.mtime_ns):
            out[path] = hit
        else:
            todo.append(path)  # new or changed: decode
    if todo:
        out.update(_decode_all(todo, max_pixels, workers, progress and len(todo) >= PROGRESS_MIN_IMAGES, desc))
        # only successes are cached: a failure is decoded again next time (it may have been fixed)
        _write_cache(file, root, {os.path.relpath(p, root): out[p] for p in todo
                                  if out[p].error is None and out[p].decoded})
    return out


def _decode_all(paths: list[str], max_pixels: int | None, workers: int | None, progress: bool,
                desc: str) -> dict[str, ImageVerdict]:
    workers = workers or min(8, os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc=desc, unit="img")
    out = {}
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for path, verdict in zip(paths, pool.map(lambda p: decode_verdict(p, max_pixels), paths, chunksize=16)):
                out[path] = verdict
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out
