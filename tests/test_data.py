"""Label masks, token types, image-token expansion, truncation and bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_image_processor, write_images, write_json

from llavadi.data.collator import LlavaCollator, pad_sequences
from llavadi.data.dataset import LlavaDataset, View
from llavadi.data.encode import IGNORE_INDEX, ConversationEncoder, SampleError
from llavadi.data.templates import Turn, get_template
from llavadi.data.token_types import TokenType, type_mask

I, INS, R, P = int(TokenType.IMAGE), int(TokenType.INSTRUCTION), int(TokenType.RESPONSE), int(TokenType.PAD)


def encoder(tok, n_image_tokens=4, max_length=256, template="vicuna_v1", system=""):
    return ConversationEncoder(tok, get_template(template, system), tok.convert_tokens_to_ids("<image>"),
                               n_image_tokens, max_length)


def toks(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_multi_turn_labels_and_types_exact(word_tokenizer):
    tok = word_tokenizer
    enc = encoder(tok).encode("s1", [Turn("user", "<image>\nwhat color is the circle?"), Turn("assistant", "red"),
                                     Turn("user", "how many?"), Turn("assistant", "two")], 1)
    expected = [
        ("<s>", INS), ("USER", INS), (":", INS), ("<image>", I), ("<image>", I), ("<image>", I), ("<image>", I),
        ("what", INS), ("color", INS), ("is", INS), ("the", INS), ("circle", INS), ("?", INS), ("ASSISTANT", INS),
        (":", INS), ("red", R), ("</s>", R), ("USER", INS), (":", INS), ("how", INS), ("many", INS), ("?", INS),
        ("ASSISTANT", INS), (":", INS), ("two", R), ("</s>", R),
    ]
    assert list(zip(toks(tok, enc.input_ids), enc.token_types)) == expected
    # labels are exactly the response tokens, everything else ignored
    trained = [t for t, l in zip(toks(tok, enc.input_ids), enc.labels) if l != IGNORE_INDEX]
    assert trained == ["red", "</s>", "two", "</s>"]
    assert all((l == i) for i, l, t in zip(enc.input_ids, enc.labels, enc.token_types) if t == R)


def test_text_only_sample_has_no_image_tokens(word_tokenizer):
    enc = encoder(word_tokenizer).encode("t", [Turn("user", "hello"), Turn("assistant", "world")], 0)
    assert I not in enc.token_types
    assert toks(word_tokenizer, [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]) == ["world", "</s>"]


@pytest.mark.parametrize("n", [1, 9, 576])
def test_exact_image_token_count(word_tokenizer, n):
    enc = encoder(word_tokenizer, n_image_tokens=n, max_length=4096).encode(
        "s", [Turn("user", "<image>\nwhat?"), Turn("assistant", "red")], 1)
    image_id = word_tokenizer.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == n
    assert enc.token_types.count(I) == n
    # contiguous block
    first = enc.input_ids.index(image_id)
    assert enc.input_ids[first:first + n] == [image_id] * n


def test_vicuna_system_prompt_is_instruction(word_tokenizer):
    enc = encoder(word_tokenizer, system="hello world").encode("s", [Turn("user", "what?"), Turn("assistant", "red")], 0)
    assert toks(word_tokenizer, enc.input_ids)[:3] == ["<s>", "hello", "world"]
    assert enc.token_types[:3] == [INS, INS, INS]


def test_plain_template_trains_caption_only(word_tokenizer):
    e = encoder(word_tokenizer, template="plain").encode(
        "c", [Turn("user", "<image>\ndescribe the image"), Turn("assistant", "a red circle")], 1)
    words = toks(word_tokenizer, e.input_ids)
    assert "describe" not in words  # LLaVA's pretraining drops the human words
    assert [w for w, l in zip(words, e.labels) if l != IGNORE_INDEX] == ["a", "red", "circle", "</s>"]


def test_truncation_keeps_image_and_cuts_tail(word_tokenizer):
    turns = [Turn("user", "<image>\nwhat color?"), Turn("assistant", "red"),
             Turn("user", "how many are there?"), Turn("assistant", "one two three four")]
    full = encoder(word_tokenizer).encode("s", turns, 1)
    cut = encoder(word_tokenizer, max_length=len(full.input_ids) - 3).encode("s", turns, 1)
    assert cut.truncated and len(cut.input_ids) == len(full.input_ids) - 3
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert cut.token_types.count(I) == 4


def test_image_that_cannot_fit_is_an_error_naming_the_sample(word_tokenizer):
    with pytest.raises(SampleError, match="'big'.*image tokens"):
        encoder(word_tokenizer, n_image_tokens=50, max_length=20).encode(
            "big", [Turn("user", "<image>\nwhat?"), Turn("assistant", "red")], 1)


def test_truncation_leaving_no_answer_is_an_error(word_tokenizer):
    with pytest.raises(SampleError, match="'s'.*no answer token"):
        encoder(word_tokenizer, n_image_tokens=4, max_length=10).encode(
            "s", [Turn("user", "<image>\nwhat color is the circle?"), Turn("assistant", "red")], 1)


def test_token_straddling_answer_boundary_is_reported(word_tokenizer):
    # a template whose answer starts in the middle of a word: the tokenizer cannot honour the mask
    from llavadi.data.templates import Segment, Template

    class Broken(Template):
        name = "broken"

        def segments(self, turns, tokenizer=None):
            return [Segment("USER: what? ASSISTANT: re", False), Segment("d</s>", True)]

        def prompt(self, turns, tokenizer=None):
            return "USER: what? ASSISTANT:"

    bad = ConversationEncoder(word_tokenizer, Broken(), word_tokenizer.convert_tokens_to_ids("<image>"), 4)
    with pytest.raises(SampleError, match="'x'.*disagree"):
        bad.encode("x", [Turn("user", "what?"), Turn("assistant", "red")], 0)


# ----------------------------------------------------------------------------- dataset files

def _sample(i, image=True, answer="red"):
    s = {"id": f"s{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + "what color?"},
                                          {"from": "gpt", "value": answer}]}
    if image:
        s["image"] = f"img{i % 3}.png"
    return s


def _dataset(tok, path, folder, on_error="raise"):
    view = View(encoder(tok), make_image_processor(32))
    return LlavaDataset(path, folder, [view], on_error=on_error)


def test_pad_sequences_left_and_right():
    seqs = [[1, 2, 3], [4], []]
    assert pad_sequences(seqs, 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad_sequences(seqs, 9, side="left").tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert pad_sequences(seqs, 0, length=5).shape == (3, 5)
    assert pad_sequences(seqs, 0).dtype == torch.long
    with pytest.raises(ValueError, match="length 2"):
        pad_sequences(seqs, 0, length=2)
    with pytest.raises(ValueError, match="padding side"):
        pad_sequences(seqs, 0, side="middle")


def test_dataset_and_collator_batch(word_tokenizer, tmp_path):
    write_images(tmp_path / "imgs", 3)
    write_json(tmp_path / "d.json", [_sample(0), _sample(1, image=False), _sample(2, answer="two blue")])
    ds = _dataset(word_tokenizer, tmp_path / "d.json", tmp_path / "imgs")
    batch = LlavaCollator(word_tokenizer.pad_token_id)([ds[i] for i in range(3)])
    assert batch["sample_ids"] == ["s0", "s1", "s2"]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # the text-only sample brings no image
    T = batch["input_ids"].shape[1]
    assert batch["token_types"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    # padding is typed PAD, unattended and unlabelled
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (batch["token_types"][pad] == P).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
    # labels are set exactly where tokens are RESPONSE
    assert torch.equal(batch["labels"] != IGNORE_INDEX, type_mask(batch["token_types"], "response"))
    assert int(type_mask(batch["token_types"], "image").sum()) == 8


def test_jsonl_and_multiturn_load(word_tokenizer, tmp_path):
    write_images(tmp_path, 3)
    s = _sample(0)
    s["conversations"] += [{"from": "human", "value": "how many?"}, {"from": "gpt", "value": "one"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(s) + "\n\n" + json.dumps(_sample(1)) + "\n")
    ds = _dataset(word_tokenizer, tmp_path / "d.jsonl", tmp_path)
    assert len(ds) == 2 and ds[0]["labels"].count(word_tokenizer.eos_token_id) == 2


@pytest.mark.parametrize("mutate, pattern", [
    (lambda s: s.update(image="missing.png"), r"s1'\): image file not found: .*missing.png"),
    (lambda s: s["conversations"][0].update(value="what color?"), r"s1'\): has an image but 0 <image>"),
    (lambda s: (s.pop("image"), None), r"s1'\): has 1 <image> placeholder\(s\) but no 'image'"),
    (lambda s: s["conversations"].pop(), r"s1'\): the conversation must end with a gpt turn"),
    (lambda s: s["conversations"][1].update({"from": "robot"}), r"s1'\): conversations\[1\] has unknown role"),
    (lambda s: s.pop("id"), r"d.json\[1\]: sample has no 'id'"),
])
def test_bad_samples_name_file_and_id(word_tokenizer, tmp_path, mutate, pattern):
    write_images(tmp_path, 3)
    bad = _sample(1)
    mutate(bad)
    write_json(tmp_path / "d.json", [_sample(0), bad, _sample(2)])
    with pytest.raises(SampleError, match=pattern):
        _dataset(word_tokenizer, tmp_path / "d.json", tmp_path)


def test_unreadable_image_is_an_error(word_tokenizer, tmp_path):
    write_images(tmp_path, 3)
    (tmp_path / "img1.png").write_bytes(b"not a png at all")
    write_json(tmp_path / "d.json", [_sample(0), _sample(1)])
    with pytest.raises(SampleError, match=r"d.json\[1\] \(sample 's1'\): unreadable image .*img1.png"):
        _dataset(word_tokenizer, tmp_path / "d.json", tmp_path)


def test_malformed_jsonl_line_named(word_tokenizer, tmp_path):
    write_images(tmp_path, 3)
    (tmp_path / "d.jsonl").write_text(json.dumps(_sample(0)) + "\n{\"id\": \"oops\",\n")
    with pytest.raises(SampleError, match=r"d.jsonl:2: malformed JSON line"):
        _dataset(word_tokenizer, tmp_path / "d.jsonl", tmp_path)


def test_duplicate_ids_rejected(word_tokenizer, tmp_path):
    write_images(tmp_path, 3)
    write_json(tmp_path / "d.json", [_sample(0), _sample(0)])
    with pytest.raises(SampleError, match="duplicate sample id 's0'"):
        _dataset(word_tokenizer, tmp_path / "d.json", tmp_path)


def test_skip_mode_reports_every_skipped_sample(word_tokenizer, tmp_path):
    write_images(tmp_path, 3)
    bad1 = _sample(1)
    bad1["image"] = "nope.png"
    bad2 = _sample(2)
    bad2["conversations"][0]["value"] = "what color?"
    write_json(tmp_path / "d.json", [_sample(0), bad1, bad2, _sample(3)])
    ds = _dataset(word_tokenizer, tmp_path / "d.json", tmp_path, on_error="skip")
    assert [r.sample_id for r in ds.records] == ["s0", "s3"]
    assert [s.sample_id for s in ds.skipped] == ["s1", "s2"]
    assert "not found" in ds.skipped[0].reason and "0 <image>" in ds.skipped[1].reason
    assert "2 samples used, 2 skipped" in ds.report()


def test_non_square_image_is_padded_to_square(word_tokenizer, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 32), (200, 10, 10)).save(tmp_path / "img0.png")
    write_json(tmp_path / "d.json", [_sample(0)])
    item = _dataset(word_tokenizer, tmp_path / "d.json", tmp_path)[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    # LLaVA-1.5's expand2square: centred on a square of the processor's mean colour (0-255), then the processor
    processor = make_image_processor(32)
    canvas = Image.new("RGB", (64, 64), tuple(int(m * 255) for m in processor.image_mean))
    canvas.paste(Image.new("RGB", (64, 32), (200, 10, 10)), (0, 16))
    assert torch.equal(item["pixel_values"], processor(images=canvas, return_tensors="pt")["pixel_values"][0])
    # the padded bands normalise to ~0 (the mean), the image band to the red
    red = [(c / 255 - m) / sd for c, m, sd in zip((200, 10, 10), processor.image_mean, processor.image_std)]
    assert item["pixel_values"][:, :6].abs().max() < 0.05  # int() of the mean: within 1/255 of it
    assert item["pixel_values"][:, 10:22].mean(dim=(1, 2)).tolist() == pytest.approx(red, abs=1e-3)


CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}")


def test_tokenizer_chat_template_masks(word_tokenizer):
    import copy

    tok = copy.deepcopy(word_tokenizer)
    tok.chat_template = CHAT
    enc = encoder(tok, template="chat_template")
    e = enc.encode("c", [Turn("user", "<image>\nwhat color?"), Turn("assistant", "red"),
                         Turn("user", "how many?"), Turn("assistant", "two")], 1)
    words = toks(tok, e.input_ids)
    trained = [w for w, l in zip(words, e.labels) if l != IGNORE_INDEX]
    # the answer and the template's end-of-turn marker are trained; role tags and questions are not
    assert trained == ["red", "</s>", "two", "</s>"]
    assert e.token_types.count(I) == 4
    prompt = enc.encode_prompt([Turn("user", "<image>\nwhat color?")], 1)
    assert toks(tok, prompt.input_ids)[-2:] == ["<unk>", ":"]  # ends with the generation prompt "assistant :"


def test_chat_template_that_is_not_prefix_stable_is_rejected(word_tokenizer):
    import copy

    tok = copy.deepcopy(word_tokenizer)
    # renders the number of messages first: a prefix renders differently from the whole
    tok.chat_template = "{{ messages|length }} " + CHAT
    with pytest.raises(ValueError, match="does not render conversation prefixes"):
        encoder(tok, template="chat_template").encode("c", [Turn("user", "what?"), Turn("assistant", "red")], 0)
