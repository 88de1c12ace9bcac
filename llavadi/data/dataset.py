"""LLaVA-format datasets: validated up front, tokenized once, images loaded lazily.

Format: a JSON list or JSONL file of
`{"id", "image" (optional, relative to an image folder), "conversations": [{"from", "value"}]}`
with `<image>` in a human turn when the sample has an image. Every problem is reported with the
file, line (JSONL) and sample id; with `on_error="skip"` bad samples are left out and listed in
`dataset.skipped`, never dropped silently. Every image is decoded completely once when the
dataset is built (`llavadi.data.images.check_images`, cached), so a truncated file is found then,
not at the training step that reads it. An image that still fails when a batch loads it (changed
on disk since) raises naming the sample, or under `on_error="skip"` is replaced by the next
loadable sample and listed in the item's `replaced_samples`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from llavadi.data.encode import ConversationEncoder, SampleError
from llavadi.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, ImageVerdict, check_images, open_image
from llavadi.data.templates import IMAGE_PLACEHOLDER, Turn
from llavadi.data.token_alignment import ALIGNMENT_KEY

SHOWN_REASONS = 10  # skip reasons an error message lists
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Skipped:
    """A sample left out under on_error='skip', and why."""

    sample_id: str
    where: str
    reason: str


@dataclass
class Record:
    """A validated raw sample."""

    sample_id: str
    turns: list[Turn]
    image: str | None  # absolute path (the first image of a multi-image sample)
    where: str  # "file:line" for messages
    images: list[str] = field(default_factory=list)  # every image, in the order of the placeholders


@dataclass
class View:
    """How one model sees a sample: its encoder and image processor; keys get `prefix`.

    `image_inputs(images)`: the model inputs of one sample's images (a model family's); None: LLaVA-1.5's
    single padded image (`pixel_values_for`).
    """

    encoder: ConversationEncoder
    image_processor: object
    prefix: str = ""
    pad_to_square: bool = True
    image_inputs: Callable[[list], dict] | None = None


def read_json_records(path: str | os.PathLike) -> list[tuple[str, object]]:
    """Raw objects of a JSON list or JSONL file, each with a 'file:line' (or 'file[i]') tag."""
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise SampleError(f"{path}: cannot read data file ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SampleError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); "
                          "save the data file as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
        return [(f"{path}[{i}]", obj) for i, obj in enumerate(items)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from e
    return out


def parse_record(where: str, obj: object, image_folder: str | None,
                 image_problems: dict[str, str] | None = None, allow_empty_answers: bool = False) -> Record:
    """Validate one raw LLaVA sample; raise SampleError naming it.

    `image_problems` (absolute path -> reason, from `check_images`) says which images failed a full
    decode; without it only the image's header is read. An empty gpt turn is an error (it would
    train on the end-of-turn token alone) unless `allow_empty_answers` (input that is rewritten).
    """
    if not isinstance(obj, dict):
        raise SampleError(f"{where}: a sample must be a JSON object, got {type(obj).__name__}")
    sid = obj.get("id")
    if sid is None:
        raise SampleError(f"{where}: sample has no 'id'")
    sid = str(sid)
    name = f"{where} (sample {sid!r})"
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SampleError(f"{name}: 'conversations' must be a non-empty list")
    turns: list[Turn] = []
    for k, c in enumerate(convs):
        if not isinstance(c, dict) or "from" not in c or "value" not in c:
            raise SampleError(f"{name}: conversations[{k}] needs 'from' and 'value'")
        role = ROLES.get(c["from"])
        if role is None:
            raise SampleError(f"{name}: conversations[{k}] has unknown role {c['from']!r} (use human/gpt)")
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise SampleError(f"{name}: conversations[{k}] should be a {'human' if expected == 'user' else 'gpt'} turn")
        if not isinstance(c["value"], str):
            raise SampleError(f"{name}: conversations[{k}]['value'] must be a string")
        if role == "assistant" and not c["value"].strip() and not allow_empty_answers:
            raise SampleError(f"{name}: conversations[{k}] is an empty gpt turn (nothing to learn but the "
                              "end of the turn); fill it in or remove the sample")
        turns.append(Turn(role, c["value"]))
    if turns[-1].role != "assistant":
        raise SampleError(f"{name}: the conversation must end with a gpt turn")
    n_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if any(IMAGE_PLACEHOLDER in t.text for t in turns if t.role == "assistant"):
        raise SampleError(f"{name}: {IMAGE_PLACEHOLDER} may only appear in a human turn")
    image = obj.get("image")
    images = [image] if isinstance(image, str) else image
    if image is not None:
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise SampleError(f"{name}: 'image' must be a path or a non-empty list of paths")
        if n_placeholders != len(images):
            has = "an image" if len(images) == 1 else f"{len(images)} images"
            raise SampleError(f"{name}: has {has} but {n_placeholders} {IMAGE_PLACEHOLDER} placeholders "
                              f"(need {len(images)}, one per image)")
        images = [_checked_image(name, image_path(i, image_folder), image_problems) for i in images]
    elif n_placeholders:
        raise SampleError(f"{name}: has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but no 'image'")
    return Record(sid, turns, images[0] if images else None, where, images or [])


def _checked_image(name: str, image: str, image_problems: dict[str, str] | None) -> str:
    if not os.path.isfile(image):
        raise SampleError(f"{name}: image file not found: {image}")
    if image_problems is not None:
        if image in image_problems:
            raise SampleError(f"{name}: {image_problems[image]}")
    else:
        try:
            with Image.open(image) as im:  # reads the header only: cheap, catches non-images
                _ = im.size
        except Exception as e:  # PIL raises several types for unreadable files
            raise SampleError(f"{name}: unreadable image {image} ({e})") from e
    return image


def image_path(image: str, image_folder: str | None) -> str:
    """The absolute path of a sample's image (relative to the image folder)."""
    return os.path.abspath(os.path.join(image_folder or "", image))


def record_image_paths(records: list[tuple[str, object]], image_folder: str | None) -> list[str]:
    """The image paths raw samples name (malformed entries are left to `parse_record` to report)."""
    out = []
    for _, obj in records:
        image = obj.get("image") if isinstance(obj, dict) else None
        for one in [image] if isinstance(image, str) else image if isinstance(image, list) else []:
            if isinstance(one, str):
                out.append(image_path(one, image_folder))
    return out


def image_problems(verdicts: dict[str, ImageVerdict], max_pixels: int | None) -> dict[str, str]:
    """Path -> reason for every image that cannot be used."""
    out = {}
    for path, verdict in verdicts.items():
        problem = verdict.problem(max_pixels)
        if problem is not None:
            out[path] = problem
    return out


def square_fill(image_processor) -> tuple[int, int, int]:
    """The padding colour: the image processor's mean in 0-255 (LLaVA-1.5's, and LlavaImageProcessor's do_pad)."""
    mean = getattr(image_processor, "image_mean", None) or (0.0, 0.0, 0.0)
    mean = list(mean) * 3 if len(mean) == 1 else list(mean)
    return tuple(int(m * 255) for m in mean[:3])


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad an RGB image to a square with `fill`, centred (LLaVA-1.5's expand2square)."""
    if img.width == img.height:
        return img
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def load_image(path: str, sample_id: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An image file decoded completely, in RGB (padding to a square happens in `pixel_values_for`)."""
    try:
        return open_image(path, max_pixels)
    except ImageTooLarge as e:
        raise SampleError(f"sample {sample_id!r}: {path}: {e}") from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise SampleError(f"sample {sample_id!r}: unreadable image {path} ({type(e).__name__}: {e})") from e


def pixel_values_for(image_processor, img: Image.Image, pad_to_square: bool = True) -> torch.Tensor:
    """(3, H, W) pixels as llavadi trains and evaluates: padded to a square with the processor's mean
    colour (LLaVA-1.5), then the image processor. A saved llavadi model's processor does the same by itself."""
    if pad_to_square:
        img = expand_to_square(img, square_fill(image_processor))
    return image_processor(images=img, return_tensors="pt")["pixel_values"][0]


class LlavaDataset(torch.utils.data.Dataset):
    """Validated, pre-tokenized LLaVA samples for one or more model views (student, teacher)."""

    def __init__(self, path: str, image_folder: str | None, views: list[View], on_error: str = "raise",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, progress: bool = False, aligner=None):
        # aligner: pairs the answer tokens of views[0] and views[1] (llavadi.data.token_alignment.PairAligner)
        self.aligner = aligner
        self.alignments: list = []
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = str(path)
        self.views = views
        self.on_error = on_error
        self.max_pixels = max_pixels
        self.skipped: list[Skipped] = []
        self.n_truncated = 0
        self.records: list[Record] = []
        self.encoded: list[list] = []
        raw = read_json_records(path)
        # every image decoded once (cached by size and mtime), before anything is tokenized
        self.image_verdicts = check_images(record_image_paths(raw, image_folder), max_pixels, progress=progress,
                                           desc=f"checking the images of {os.path.basename(self.path)}")
        problems = image_problems(self.image_verdicts, max_pixels)
        seen: dict[str, str] = {}
        for where, obj in raw:
            try:
                rec = parse_record(where, obj, image_folder, problems)
                if rec.sample_id in seen:
                    raise SampleError(f"{where}: duplicate sample id {rec.sample_id!r} (first at {seen[rec.sample_id]})")
                sizes = [self._size(path) for path in rec.images]
                enc = [v.encoder.encode(rec.sample_id, rec.turns, len(rec.images), sizes) for v in views]
                alignment = None if aligner is None else aligner(rec.sample_id, rec.turns, enc[0], enc[1])
            except SampleError as e:
                msg = str(e)
                msg = msg if msg.startswith(self.path) else f"{where}: {msg}"
                if on_error == "raise":
                    raise SampleError(msg) from None
                sid = obj.get("id") if isinstance(obj, dict) else None
                self.skipped.append(Skipped(str(sid), where, msg))
                continue
            seen[rec.sample_id] = where
            self.n_truncated += int(any(e.truncated for e in enc))
            self.records.append(rec)
            self.encoded.append(enc)
            self.alignments.append(alignment)
        if not self.records:
            reasons = "".join(f"\n    {s.reason}" for s in self.skipped[:SHOWN_REASONS])
            more = f"\n    ... and {len(self.skipped) - SHOWN_REASONS} more" if len(self.skipped) > SHOWN_REASONS else ""
            raise SampleError(f"{self.path}: no usable sample ({len(self.skipped)} skipped):{reasons}{more}")

    def __len__(self):
        return len(self.records)

    def _size(self, path: str) -> tuple[int, int] | None:
        verdict = self.image_verdicts.get(path)
        return None if verdict is None or verdict.width is None else (verdict.width, verdict.height)

    def __getitem__(self, idx):
        try:
            return self._item(idx)
        except SampleError as e:
            if self.on_error == "raise":
                raise SampleError(f"{self.records[idx].where}: {e}") from None
            return self._replacement(idx, e)

    def _item(self, idx) -> dict:
        rec = self.records[idx]
        item = {"sample_id": rec.sample_id, "replaced_samples": []}
        if self.aligner is not None:
            item[ALIGNMENT_KEY] = self.alignments[idx]
        images = None
        for view, enc in zip(self.views, self.encoded[idx]):
            p = view.prefix
            item[p + "input_ids"] = enc.input_ids
            item[p + "token_types"] = enc.token_types
            item[p + "labels"] = enc.labels
            if rec.images:
                if images is None:
                    images = [load_image(path, rec.sample_id, self.max_pixels) for path in rec.images]
                    self._check_sizes(rec, images)
                if view.image_inputs is None:
                    item[p + "pixel_values"] = pixel_values_for(view.image_processor, images[0], view.pad_to_square)
                else:
                    item.update({p + k: v for k, v in view.image_inputs(images).items()})
        return item

    def _check_sizes(self, rec: Record, images: list) -> None:
        """The images' sizes are the ones their token counts were computed from (changed on disk: an error)."""
        for path, img in zip(rec.images, images):
            size = self._size(path)
            if size is not None and size != img.size:
                raise SampleError(f"sample {rec.sample_id!r}: {path} is {img.width}x{img.height} now, "
                                  f"{size[0]}x{size[1]} when the dataset was built; rebuild it")

    def _replacement(self, idx: int, error: SampleError) -> dict:
        """The next sample that loads, standing in for `idx` (on_error='skip'); the failures ride along."""
        failed = [Skipped(self.records[idx].sample_id, self.records[idx].where, str(error))]
        for k in range(1, len(self)):
            j = (idx + k) % len(self)
            try:
                item = self._item(j)
            except SampleError as e:
                failed.append(Skipped(self.records[j].sample_id, self.records[j].where, str(e)))
                continue
            item["replaced_samples"] = [vars(f) for f in failed]
            return item
        raise SampleError(f"{self.path}: no sample can be loaded any more ({len(failed)} failed, "
                          f"e.g. {failed[0].reason})")

    def report(self) -> str:
        """One-paragraph account of what was skipped or truncated."""
        lines = [f"{self.path}: {len(self.records)} samples used, {len(self.skipped)} skipped, {self.n_truncated} truncated"]
        for s in self.skipped[:20]:
            lines.append(f"  skipped {s.sample_id} ({s.reason})")
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)
