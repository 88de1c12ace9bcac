"""Cost of checking every image up front: header only vs a full decode, serial vs parallel, cached.

Writes N photo-sized JPEGs (640x480, COCO's typical size) into a temporary folder and times, side
by side in one run:
  header only     `Image.open(p).size` per file, serially: what validation did before (a file cut
                  short passes it and fails at training time)
  full, serial    every file decoded completely, one after another (the plain way)
  full, parallel  `llavadi.data.images.check_images` with an empty cache: complete decodes in a
                  thread pool (Pillow releases the GIL while decoding)
  cached rerun    `check_images` again: the verdicts are read from its cache, files only stat'ed
Prints seconds, images/second and the ratios.

    python benchmarks/image_check.py [--images 300] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image


def write_images(folder: str, n: int) -> list[str]:
    """n 640x480 JPEGs of smooth gradients plus noise (quality 90)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        base = np.stack([(x + 3 * i) % 256, (y + 5 * i) % 256, (x + y + 7 * i) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"img{i:05d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def header_only(paths: list[str]) -> None:
    """The header check: opens each file, reads its size, decodes nothing."""
    for p in paths:
        with Image.open(p) as im:
            _ = im.size


def full_serial(paths: list[str]) -> None:
    """Every file decoded completely, one after another."""
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB")


def timed(fn, *args) -> float:
    """Seconds of one call."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLAVADI_CACHE_DIR"] = os.path.join(tmp, "cache")
        from llavadi.data.images import check_images

        os.makedirs(os.path.join(tmp, "imgs"))
        paths = write_images(os.path.join(tmp, "imgs"), args.images)
        size_mb = sum(os.path.getsize(p) for p in paths) / 2**20
        header_only(paths)  # warm the page cache so every variant reads from memory
        rows = [("header only (the old check)", timed(header_only, paths)),
                ("full decode, serial", timed(full_serial, paths)),
                (f"full decode, check_images ({args.workers} threads, empty cache)",
                 timed(lambda: check_images(paths, workers=args.workers, progress=False))),
                ("check_images rerun (cached verdicts)",
                 timed(lambda: check_images(paths, workers=args.workers, progress=False)))]
    print(f"{args.images} JPEGs 640x480 ({size_mb:.0f} MiB), {os.cpu_count()} CPUs\n")
    print("| check | seconds | images/s |\n|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} | {args.images / sec:,.0f} |")
    serial, parallel, cached = rows[1][1], rows[2][1], rows[3][1]
    print(f"\nparallel / serial full decode: {parallel / serial:.2f}x the time")
    print(f"cached rerun / first check:    {cached / parallel:.3f}x the time")
    print(f"full decode / header only:     {serial / rows[0][1]:.1f}x the time")


if __name__ == "__main__":
    main()
