"""Property: whatever samples and image files the data loader is fed, it gives a clear error naming the
data file, or leaves bad samples out and counts them; never another exception, never a silent loss."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from conftest import WORDS, make_image_processor, make_word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llavadi.data.collator import LlavaCollator
from llavadi.data.dataset import LlavaDataset, View
from llavadi.data.encode import ConversationEncoder, SampleError
from llavadi.data.templates import get_template

TOKENIZER = make_word_tokenizer()
ENCODER = ConversationEncoder(TOKENIZER, get_template("vicuna_v1", "", eos="</s>"),
                              TOKENIZER.convert_tokens_to_ids("<image>"), n_image_tokens=4, max_length=48)
VIEW = View(ENCODER, make_image_processor(32))
MAX_PIXELS = 2000  # a 64x64 image (4096 pixels) is over it
IMAGE_KINDS = ["valid"] * 5 + ["truncated", "garbage", "empty", "missing", "too_large", "jpeg_truncated"]

text = st.lists(st.sampled_from(WORDS + ["<image>", "\n", "?", "é"]), max_size=12).map(" ".join)
answer = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)


def _valid(question: str, reply: str, image: int | None) -> dict:
    obj = {"conversations": [{"from": "human", "value": ("<image>\n" if image is not None else "") + question},
                             {"from": "gpt", "value": reply}]}
    return obj if image is None else {**obj, "image": f"img{image}.png"}


valid = st.builds(_valid, answer, answer, st.one_of(st.none(), st.integers(0, 3)))
value = st.one_of(text, st.just(""), st.just("   "), text.map(lambda t: "<image>\n" + t), st.integers(), st.none())
turn = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "user", "assistant", "system", 3]),
                           "value": value}),
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"])}),
    st.integers(),
)
messy = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"conversations": st.one_of(st.lists(turn, max_size=5), st.just([]), st.text(max_size=5)),
                      "image": st.one_of(st.sampled_from([f"img{i}.png" for i in range(4)]), st.none(),
                                         st.integers(), st.just(["img0.png"]))}),
    st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
)
# each sample: mostly well formed (its image may still be bad), sometimes malformed; ids unique unless
# the id rule says otherwise (missing, or repeating the previous sample's)
sample = st.tuples(st.one_of(valid, valid, valid, valid, valid, messy),
                   st.sampled_from(["unique"] * 8 + ["missing", "repeat"]))


def _with_ids(drawn: list) -> list:
    out = []
    for i, (obj, rule) in enumerate(drawn):
        if isinstance(obj, dict) and rule != "missing":
            obj = {"id": f"x{i - 1 if rule == 'repeat' and i else i}", **obj}
        out.append(obj)
    return out


def _image_bytes(kind: str, seed: int) -> bytes | None:
    buf = io.BytesIO()
    size = 64 if kind == "too_large" else 32
    img = Image.frombytes("RGB", (size, size), bytes((seed * 7 + i) % 256 for i in range(size * size * 3)))
    img.save(buf, format="JPEG" if kind == "jpeg_truncated" else "PNG")
    data = buf.getvalue()
    return {"valid": data, "too_large": data, "truncated": data[: len(data) // 2],
            "jpeg_truncated": data[: len(data) * 2 // 3], "garbage": bytes(range(256)) * 3, "empty": b"",
            "missing": None}[kind]


def _write(folder: Path, samples: list, images: list[str], layout: str) -> Path:
    for i, kind in enumerate(images):
        data = _image_bytes(kind, i)
        if data is not None:
            (folder / f"img{i}.png").write_bytes(data)
    path = folder / "data.json"
    if layout == "jsonl":
        path = folder / "data.jsonl"
        raw = "".join(json.dumps(s) + "\n" for s in samples).encode()
    else:
        raw = json.dumps(samples).encode()
    if layout == "cut":
        raw = raw[: max(1, len(raw) * 2 // 3)]
    elif layout == "latin1":  # one byte that is not UTF-8, inside a string
        raw = raw.replace(b'"x0"', b'"x\xe9"', 1)
    path.write_bytes(raw)
    return path


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=st.lists(sample, min_size=2, max_size=12),
       images=st.lists(st.sampled_from(IMAGE_KINDS), min_size=4, max_size=4),
       layout=st.sampled_from(["json", "json", "json", "jsonl", "jsonl", "cut", "latin1"]),
       on_error=st.sampled_from(["raise", "skip"]))
def test_data_loader_gives_a_clear_error_or_a_counted_skip(samples, images, layout, on_error):
    samples = _with_ids(samples)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _write(folder, samples, images, layout)
        try:
            dataset = LlavaDataset(str(path), str(folder), [VIEW], on_error=on_error, max_pixels=MAX_PIXELS)
        except SampleError as e:  # the clear error: it names the data file
            assert str(path) in str(e)
            return
        n_read = len(samples) if layout in ("json", "jsonl") else None
        if n_read is not None:  # every sample is used or listed as skipped, none lost
            assert len(dataset) + len(dataset.skipped) == n_read
        assert on_error == "skip" or not dataset.skipped
        assert all(str(path) in s.where and s.reason for s in dataset.skipped)
        items = [dataset[i] for i in range(len(dataset))]  # every image was decoded up front: all load
        assert all(it["replaced_samples"] == [] for it in items)
        batch = LlavaCollator(TOKENIZER.pad_token_id)(items)
        assert batch["input_ids"].shape[0] == len(items) == len(dataset)
