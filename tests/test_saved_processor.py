"""What a saved model carries for plain transformers: a chat template that renders llavadi's prompt token for
token (both ways: llavadi's encoder and transformers' apply_chat_template), and an image processor whose own
call gives llavadi's training pixels (padding to a square included)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer
from PIL import Image

from llavadi.data.dataset import pixel_values_for
from llavadi.data.encode import IGNORE_INDEX
from llavadi.data.templates import LLAVA_SYSTEM, Turn
from llavadi.models.build import LoadedModel, llava_processor, load_llava_dir, save_model
from llavadi.models.chat_template import ChatTemplateError, llavadi_chat_template
from llavadi.models.tokenizer import build_tiny_tokenizer

# LLaVA-format conversations: image first / after the text, multi-turn, text-only
CONVERSATIONS = {
    "image_first": [("user", "<image>\nwhat color is the circle?"), ("assistant", "red")],
    "image_last": [("user", "how many are there?\n<image>"), ("assistant", "two")],
    "multi_turn": [("user", "<image>\nwhat color?"), ("assistant", "blue"), ("user", "and the shape?"),
                   ("assistant", "a square"), ("user", "where is it?"), ("assistant", "in the top left")],
    "text_only": [("user", "hello world"), ("assistant", "hello")],
}
SYSTEMS = {"default": None, "none": "", "custom": "Answer as 'a cat' would, \\ \"briefly\" — ok?"}


def _tokenizers():
    return {"adds_bos": make_word_tokenizer(), "no_bos": build_tiny_tokenizer()}


def _bundle(tok, template="vicuna_v1", system=None, image_size=32):
    meta = {"template": template, "system": system}
    return LoadedModel(make_tiny_llava(tok, image_size=image_size), tok, make_image_processor(image_size), meta)


def _structured(text: str):
    """transformers' content items for a LLaVA turn: an image item where `<image>` was, text items around it."""
    if "<image>" not in text:
        return text
    before, after = text.split("<image>")
    items = [{"type": "text", "text": before.rstrip("\n")}] if before.strip() else []
    items.append({"type": "image"})
    if after.strip():
        items.append({"type": "text", "text": after.lstrip("\n")})
    return items


def _messages(conversation, structured: bool):
    return [{"role": role, "content": _structured(text) if structured and role == "user" else text}
            for role, text in conversation]


def _turns(conversation):
    return [Turn(role, text) for role, text in conversation]


def _image(conversation):
    return Image.new("RGB", (48, 24), (200, 30, 30)) if "<image>" in conversation[0][1] else None


def _images(image) -> dict:
    """apply_chat_template's keyword for the conversation's image (a fresh dict: transformers pops from it)."""
    return {"processor_kwargs": {"images": [image]}} if image is not None else {}


@pytest.mark.parametrize("tok_name", ["adds_bos", "no_bos"])
@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_renders_the_encoders_token_ids(tok_name, system, name):
    tok = _tokenizers()[tok_name]
    bundle = _bundle(tok, system=SYSTEMS[system])
    processor, encoder = llava_processor(bundle), bundle.encoder()
    conversation, image = CONVERSATIONS[name], _image(CONVERSATIONS[name])
    n_images = int(image is not None)
    trained = encoder.encode(name, _turns(conversation), n_images)
    prompt = encoder.encode_prompt(_turns(conversation[:-1]), n_images)
    for structured in (False, True):
        messages = _messages(conversation, structured)
        full = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True, **_images(image))
        assert list(full["input_ids"][0]) == trained.input_ids
        # the {% generation %} spans are exactly the tokens llavadi trains on
        assert list(full["assistant_masks"][0]) == [int(label != IGNORE_INDEX) for label in trained.labels]
        asked = processor.apply_chat_template(messages[:-1], tokenize=True, return_dict=True,
                                              add_generation_prompt=True, **_images(image))
        assert list(asked["input_ids"][0]) == prompt.input_ids
    if image is None:  # the tokenizer's own apply_chat_template (no image expansion) gives the same ids
        assert tok.apply_chat_template(_messages(conversation, False), tokenize=True, return_dict=False,
                                       chat_template=processor.chat_template) == trained.input_ids
    # and the other way: the text transformers renders is the text llavadi's template writes
    text = "".join(s.text for s in encoder.template.segments(_turns(conversation), tok))
    rendered = processor.apply_chat_template(_messages(conversation, True))
    assert rendered.removeprefix(tok.bos_token if tok_name == "adds_bos" else "") == text


def test_system_message_replaces_the_runs_system_prompt():
    tok = make_word_tokenizer()
    processor = llava_processor(_bundle(tok, system=None))
    conversation = [{"role": "user", "content": "hello"}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == \
        f"<s>{LLAVA_SYSTEM} USER: hello ASSISTANT:"
    with_system = [{"role": "system", "content": "be brief"}] + conversation
    assert processor.apply_chat_template(with_system, add_generation_prompt=True) == "<s>be brief USER: hello ASSISTANT:"
    # without a generation prompt the last user turn is not followed by the assistant's tag
    assert processor.apply_chat_template(conversation).endswith("USER: hello")
    with pytest.raises(Exception, match="roles must alternate"):
        processor.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(Exception, match="text and image content only"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_plain_template_renders_the_caption_form():
    tok = make_word_tokenizer()
    bundle = _bundle(tok, template="plain")
    processor, encoder = llava_processor(bundle), bundle.encoder()
    conversation = [("user", "<image>\ndescribe the image"), ("assistant", "a red circle")]
    trained = encoder.encode("c", _turns(conversation), 1)
    full = processor.apply_chat_template(_messages(conversation, True), tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True, **_images(_image(conversation)))
    assert list(full["input_ids"][0]) == trained.input_ids
    assert list(full["assistant_masks"][0]) == [int(label != IGNORE_INDEX) for label in trained.labels]


def test_a_tokenizers_own_chat_template_is_kept():
    tok = copy.deepcopy(make_word_tokenizer())
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    assert llavadi_chat_template("chat_template", None, tok) == tok.chat_template
    assert llava_processor(_bundle(tok, template="chat_template")).chat_template == tok.chat_template


def test_a_tokenizer_that_appends_tokens_is_refused():
    from tokenizers import processors

    tok = copy.deepcopy(make_word_tokenizer())
    vocab = tok.get_vocab()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    with pytest.raises(ChatTemplateError, match=r"adds \['<s>', '</s>'\] around every text"):
        llavadi_chat_template("vicuna_v1", "", tok)


def test_saved_directory_carries_the_template_for_processor_and_tokenizer(tmp_path):
    from transformers import AutoProcessor, AutoTokenizer

    tok = copy.deepcopy(make_word_tokenizer())
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.chat_template = own  # the language model's own template, as a composed model's LLM may have
    bundle = _bundle(tok, system="")
    save_model(bundle, str(tmp_path / "m"))
    expected = llava_processor(bundle).chat_template
    assert AutoProcessor.from_pretrained(tmp_path / "m").chat_template == expected
    assert AutoTokenizer.from_pretrained(tmp_path / "m").chat_template == expected
    # llavadi's loader gives the tokenizer back its own template: what `template: chat_template` means
    assert json.loads((tmp_path / "m" / "llavadi.json").read_text())["tokenizer_chat_template"] == own
    reloaded = load_llava_dir(tmp_path / "m")
    assert reloaded.tokenizer.chat_template == own
    save_model(reloaded, str(tmp_path / "again"))
    assert AutoTokenizer.from_pretrained(tmp_path / "again").chat_template == expected


# ----------------------------------------------------------------------------- pixels

def _random_image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


SIZES = [(32, 32), (48, 20), (17, 61), (300, 199)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_saved_image_processor_pads_as_training_does(kind, tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor, SiglipImageProcessorPil

    tok = make_word_tokenizer()
    source = make_image_processor(32) if kind == "clip" else SiglipImageProcessorPil(size={"height": 32, "width": 32})
    bundle = LoadedModel(make_tiny_llava(tok), tok, source, {})
    save_model(bundle, str(tmp_path / "m"))
    saved = AutoImageProcessor.from_pretrained(tmp_path / "m")
    assert type(saved).__name__.startswith("LlavaImageProcessor") and saved.do_pad
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    for seed, (w, h) in enumerate(SIZES):
        img = _random_image(w, h, seed)
        ours = pixel_values_for(source, img)  # llavadi's training / eval path
        theirs = processor(images=img, text="<image>", return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 32, 32)
        assert (ours - theirs).abs().max().item() <= 1e-6, (w, h)
        if w != h:  # without the padding the pixels differ: the check can fail
            unpadded = source(images=img, return_tensors="pt")["pixel_values"][0]
            assert (unpadded - theirs).abs().max().item() > 0.1


def test_no_padding_when_the_model_is_not_padded(tmp_path):
    tok = make_word_tokenizer()
    bundle = LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {"pad_to_square": False})
    assert llava_processor(bundle).image_processor.do_pad is False
    img = _random_image(48, 20, 0)
    assert torch.equal(pixel_values_for(bundle.image_processor, img, pad_to_square=False),
                       llava_processor(bundle).image_processor(images=img, return_tensors="pt")["pixel_values"][0])
