"""Synthetic image-question task: coloured shapes on a grid, captions, LLaVA instructions, eval set.

Each image is a `grid` x `grid` board; every object sits in its own cell, so with a patch size
equal to the cell size each image token of a CLIP tower sees exactly one cell. Questions that
name a cell ("What color is the shape in the top left?") make colour, shape and size lookups;
"Where is the red circle?" needs the model to match a colour-shape pair across the image
tokens; "Is there a red shape?" / "Is there a circle?" and "How many shapes are there?" need
it to aggregate over them. Everything is drawn from seeded `random.Random` streams, so a seed
gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND = (30, 30, 30)
CATEGORIES: tuple[str, ...] = ("color", "shape", "size", "count", "position", "exists")
POSITION_NAMES_3x3 = (
    ("top left", "top middle", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in the picture?",
    "List the shapes in the image.",
)
# a few text-only turns: the data format allows samples without an image
TEXT_ONLY_QA = (
    ("What is the opposite of left?", "right"),
    ("What is the opposite of right?", "left"),
    ("What is the opposite of top?", "bottom"),
    ("What is the opposite of bottom?", "top"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("What is the opposite of small?", "large"),
    ("What is the opposite of large?", "small"),
)
IMAGE_DIR = "images"


def position_name(row: int, col: int, grid: int) -> str:
    """Words for a grid cell: named cells on a 3x3 grid, "row r column c" otherwise."""
    if grid == 3:
        return POSITION_NAMES_3x3[row][col]
    return f"row {row + 1} column {col + 1}"


def max_objects_for(grid: int) -> int:
    """Most objects in one image: up to 4, never more than the cells or colour-shape pairs."""
    return min(4, grid * grid, len(COLORS) * len(SHAPES))


def random_scene(rng: random.Random, grid: int) -> list[dict]:
    """A scene: 1..max objects in distinct cells with distinct colour-shape pairs, row-major."""
    n = rng.randint(1, max_objects_for(grid))
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], n)
    pairs = rng.sample([(col, sh) for col in COLORS for sh in SHAPES], n)
    objects = [
        {"row": r, "col": c, "color": col, "shape": sh, "size": rng.choice(SIZES)}
        for (r, c), (col, sh) in zip(cells, pairs)
    ]
    return sorted(objects, key=lambda o: (o["row"], o["col"]))


def render_scene(objects: list[dict], image_size: int, grid: int, rng: random.Random) -> Image.Image:
    """Draw the objects, each centred in its cell with a 1-pixel random jitter."""
    if image_size % grid:
        raise ValueError(f"image_size {image_size} must be a multiple of grid {grid}")
    cell = image_size // grid
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        side = round(cell * (0.8 if o["size"] == "large" else 0.45))
        cx = o["col"] * cell + cell / 2 + rng.randint(-1, 1)
        cy = o["row"] * cell + cell / 2 + rng.randint(-1, 1)
        x0, y0 = cx - side / 2, cy - side / 2
        x1, y1 = x0 + side - 1, y0 + side - 1
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}")
    return img


def caption_for(objects: list[dict], grid: int) -> str:
    """One sentence listing every object, row-major (a fixed order is learned much faster)."""
    parts = [f"a {o['size']} {o['color']} {o['shape']} in the {position_name(o['row'], o['col'], grid)}"
             for o in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def make_question(category: str, objects: list[dict], grid: int, rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair of the given category about the scene."""
    o = rng.choice(objects)
    where = position_name(o["row"], o["col"], grid)
    if category == "color":
        return f"What color is the shape in the {where}?", o["color"]
    if category == "shape":
        return f"What shape is in the {where}?", o["shape"]
    if category == "size":
        return f"Is the shape in the {where} small or large?", o["size"]
    if category == "count":
        return "How many shapes are there?", str(len(objects))
    if category == "position":
        return f"Where is the {o['color']} {o['shape']}?", where
    if category == "exists":
        # one attribute, balanced yes/no; colour-shape binding is what "position" questions test
        attr, values = ("color", list(COLORS)) if rng.random() < 0.5 else ("shape", list(SHAPES))
        present = {x[attr] for x in objects}
        absent = [v for v in values if v not in present]
        value = o[attr] if rng.random() < 0.5 or not absent else rng.choice(absent)
        question = f"Is there a {value} shape?" if attr == "color" else f"Is there a {value}?"
        return question, "yes" if value in present else "no"
    raise ValueError(f"unknown question category {category!r}; choose one of {CATEGORIES}")


def answer_set(grid: int = 3) -> dict[str, list[str]]:
    """Every possible answer per question category (for chance levels and the tokenizer)."""
    return {
        "color": list(COLORS),
        "shape": list(SHAPES),
        "size": list(SIZES),
        "count": [str(n) for n in range(1, max_objects_for(grid) + 1)],
        "position": [position_name(r, c, grid) for r in range(grid) for c in range(grid)],
        "exists": ["yes", "no"],
    }


def vocabulary_text(grid: int = 3) -> str:
    """A text holding every word the task's prompts, questions, captions and answers use."""
    rng = random.Random("vocabulary")
    objects = [{"row": 0, "col": 0, "color": c, "shape": s, "size": z}
               for c in COLORS for s in SHAPES for z in SIZES]
    lines = [f"{p}" for p in CAPTION_PROMPTS] + [f"{q} {a}" for q, a in TEXT_ONLY_QA]
    lines.append(caption_for(objects[:3], grid))
    for cat in CATEGORIES:
        for o in objects:
            lines.append(" ".join(make_question(cat, [o], grid, rng)))
    lines += [" ".join(v) for v in answer_set(grid).values()]
    lines += [" ".join(answer_set(3)["position"]), "A USER: ASSISTANT: row column"]
    return "\n".join(lines)


def _instruct_sample(idx: int, image: str, objects: list[dict], grid: int, rng: random.Random) -> dict:
    n_turns = rng.choices((1, 2, 3), weights=(0.6, 0.25, 0.15))[0]
    conversations = []
    for t in range(n_turns):
        q, a = make_question(rng.choice(CATEGORIES), objects, grid, rng)
        conversations.append({"from": "human", "value": ("<image>\n" + q) if t == 0 else q})
        conversations.append({"from": "gpt", "value": a})
    return {"id": f"instruct-{idx:06d}", "image": image, "conversations": conversations}


class _ImageWriter:
    """Renders random scenes into one folder and remembers each image's objects."""

    def __init__(self, folder: Path, image_size: int, grid: int):
        self.folder, self.image_size, self.grid = folder, image_size, grid
        self.scenes: dict[str, list[dict]] = {}

    def new_image(self, prefix: str, i: int, rng: random.Random) -> tuple[str, list[dict]]:
        objects = random_scene(rng, self.grid)
        name = f"{prefix}_{i:06d}.png"
        render_scene(objects, self.image_size, self.grid, rng).save(self.folder / name)
        self.scenes[name] = objects
        return name, objects


def _caption_set(images: _ImageWriter, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}-caption")
    captions = []
    for i in range(n):
        name, objects = images.new_image("cap", i, rng)
        captions.append({"id": f"caption-{i:06d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
            {"from": "gpt", "value": caption_for(objects, images.grid)}]})
    return captions


def _instruct_set(images: _ImageWriter, n: int, seed: int, text_only_fraction: float) -> list[dict]:
    rng = random.Random(f"{seed}-instruct")
    instruct = []
    for i in range(n):
        if rng.random() < text_only_fraction:
            q, a = rng.choice(TEXT_ONLY_QA)
            instruct.append({"id": f"instruct-{i:06d}", "conversations": [
                {"from": "human", "value": q}, {"from": "gpt", "value": a}]})
            continue
        name, objects = images.new_image("inst", i, rng)
        instruct.append(_instruct_sample(i, name, objects, images.grid, rng))
    return instruct


def _eval_set(images: _ImageWriter, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}-eval")
    eval_lines = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]  # balanced categories
        name, objects = images.new_image("eval", i, rng)
        q, a = make_question(category, objects, images.grid, rng)
        eval_lines.append({"question_id": f"eval-{i:06d}", "image": name, "text": q,
                           "answer": a, "category": category})
    return eval_lines


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` to `out_dir`; an existing `out_dir` is swapped out, then deleted."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "set")
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)


def make_synthetic(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_caption: int = 5000,
    n_instruct: int = 10000,
    n_eval: int = 600,
    image_size: int = 48,
    grid: int = 3,
    text_only_fraction: float = 0.02,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the synthetic task to `out_dir` (atomically) and return the paths of its parts."""
    out_dir = Path(out_dir)
    if image_size % grid:
        raise ValueError(f"image_size {image_size} must be a multiple of grid {grid}")
    if min(n_caption, n_instruct, n_eval) < 0:
        raise ValueError("n_caption, n_instruct and n_eval must be >= 0")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / IMAGE_DIR).mkdir()
        images = _ImageWriter(tmp / IMAGE_DIR, image_size, grid)
        captions = _caption_set(images, n_caption, seed)
        instruct = _instruct_set(images, n_instruct, seed, text_only_fraction)
        eval_lines = _eval_set(images, n_eval, seed)
        (tmp / "captions.json").write_text(json.dumps(captions, indent=1))
        (tmp / "instruct.json").write_text(json.dumps(instruct, indent=1))
        (tmp / "eval_questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in eval_lines))
        (tmp / "scenes.json").write_text(json.dumps(images.scenes))
        meta = {"seed": seed, "image_size": image_size, "grid": grid, "n_caption": n_caption,
                "n_instruct": n_instruct, "n_eval": n_eval, "colors": list(COLORS),
                "shapes": list(SHAPES), "sizes": list(SIZES), "categories": list(CATEGORIES),
                "answers": answer_set(grid)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, out_dir)  # only an empty out_dir or overwrite=True reach here
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return synthetic_paths(out_dir)


def synthetic_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """The paths of a written synthetic set's parts."""
    out_dir = Path(out_dir)
    return {"root": out_dir, "image_dir": out_dir / IMAGE_DIR, "captions": out_dir / "captions.json",
            "instruct": out_dir / "instruct.json", "eval": out_dir / "eval_questions.jsonl",
            "scenes": out_dir / "scenes.json", "meta": out_dir / "meta.json"}


def patch_labels(objects: list[dict], grid: int) -> list[dict | None]:
    """Row-major per-cell content: the object in each cell, or None when it is empty."""
    cells: list[dict | None] = [None] * (grid * grid)
    for o in objects:
        cells[o["row"] * grid + o["col"]] = o
    return cells
