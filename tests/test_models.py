"""Model building, per-module freezing, and plain-transformers save/load."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_image_processor, make_tiny_llava

from llavadi.config import ModelSpec
from llavadi.models.build import LoadedModel, load_llava_dir, load_model, n_image_tokens, save_model, set_trainable


def _vm(tower):
    """The CLIP vision transformer inside a vision tower (transformers 5 has no wrapper)."""
    return getattr(tower, "vision_model", tower)


def _inputs(model, tok, n_img):
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = [tok.bos_token_id] + [image_id] * n_img + tok.convert_tokens_to_ids(["what", "color", "?"])
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def test_save_then_plain_transformers_load_gives_same_logits(word_tokenizer, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model = make_tiny_llava(word_tokenizer).eval()
    out_dir = save_model(LoadedModel(model, word_tokenizer, make_image_processor(32), {"template": "vicuna_v1"}),
                         str(tmp_path / "m"))
    assert os.path.isfile(os.path.join(out_dir, "model.safetensors"))
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in os.listdir(out_dir))
    loaded = LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
    inputs = _inputs(model, word_tokenizer, n_image_tokens(model.config))
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, loaded(**inputs).logits, atol=1e-6)
    processor = AutoProcessor.from_pretrained(out_dir)
    assert type(processor).__name__ == "LlavaProcessor"
    assert AutoTokenizer.from_pretrained(out_dir).convert_tokens_to_ids("<image>") == model.config.image_token_id
    # the processor expands <image> to exactly as many tokens as the model wants
    from PIL import Image

    enc = processor(images=Image.new("RGB", (32, 32)), text="USER: <image>\nwhat color? ASSISTANT:", return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == n_image_tokens(model.config)
    with torch.no_grad():
        gen = loaded.generate(**enc, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 3 or gen[0, -1] == word_tokenizer.eos_token_id


def test_save_is_atomic_and_replaces(word_tokenizer, tmp_path, monkeypatch):
    lm = LoadedModel(make_tiny_llava(word_tokenizer), word_tokenizer, make_image_processor(32), {})
    target = str(tmp_path / "m")
    save_model(lm, target)
    before = sorted(os.listdir(target))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(word_tokenizer), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(lm, target)
    # the earlier complete save is untouched and no temporary directory is left behind
    assert sorted(os.listdir(target)) == before
    assert [d for d in os.listdir(tmp_path) if d.startswith(".tmp")] == []


def test_compose_from_vision_and_llm_checkpoints(word_tokenizer, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    vis = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=16))
    vis.save_pretrained(tmp_path / "vision")
    make_image_processor(32).save_pretrained(tmp_path / "vision")
    # a tokenizer WITHOUT the image token: composing must add it
    from conftest import make_word_tokenizer

    base_tok = make_word_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(base_tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    llm.save_pretrained(tmp_path / "llm")
    base_tok.save_pretrained(tmp_path / "llm")
    loaded = load_model(ModelSpec(vision=str(tmp_path / "vision"), llm=str(tmp_path / "llm")))
    m = loaded.model
    assert torch.equal(_vm(m.model.vision_tower).embeddings.patch_embedding.weight,
                       _vm(vis).embeddings.patch_embedding.weight)
    assert torch.equal(m.model.language_model.layers[0].self_attn.q_proj.weight, llm.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(m.lm_head.weight[: len(base_tok)], llm.lm_head.weight[: len(base_tok)])
    assert m.config.image_token_id == loaded.tokenizer.convert_tokens_to_ids("<image>")
    assert loaded.n_image_tokens == 4
    # a projector is the 2-layer GELU MLP of LLaVA-1.5
    proj = m.model.multi_modal_projector
    assert proj.linear_1.in_features == 32 and proj.linear_2.out_features == 32


def test_saved_directory_loads_as_a_bundle_and_incomplete_ones_are_named(word_tokenizer, tmp_path):
    model = make_tiny_llava(word_tokenizer).eval()
    save_model(LoadedModel(model, word_tokenizer, make_image_processor(32), {"template": "plain"}), str(tmp_path / "m"),
               {"stage": "pretrain"})
    loaded = load_llava_dir(tmp_path / "m")
    # tokenizer_chat_template: the tokenizer had no chat template of its own (the saved one is llavadi's)
    assert loaded.meta == {"template": "plain", "stage": "pretrain", "n_image_tokens": 4,
                           "tokenizer_chat_template": None}
    assert loaded.tokenizer.chat_template is None
    assert loaded.template == "plain" and loaded.encoder().n_image_tokens == 4
    assert loaded.image_processor.crop_size == {"height": 32, "width": 32}
    with torch.no_grad():
        inputs = _inputs(model, word_tokenizer, 4)
        assert torch.equal(model(**inputs).logits, loaded.model(**inputs).logits)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_llava_dir(tmp_path / "empty")
    model.save_pretrained(tmp_path / "bare")
    word_tokenizer.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="bare: no image processor saved"):
        load_llava_dir(tmp_path / "bare")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub id"):
        load_model(ModelSpec(path=str(tmp_path / "no-such-model")))
    # a hub id is fetched by the hub client; offline (as every test runs) and not cached: a clear error
    with pytest.raises(FileNotFoundError, match="not a local directory, and loading it from the hub failed "
                                                r"\(HF_HUB_OFFLINE is set"):
        load_model(ModelSpec(path="llava-hf/llava-1.5-7b-hf"))
    with pytest.raises(ValueError, match="revision.*applies to hub ids only"):
        load_model(ModelSpec(path=str(tmp_path), revision="main"))


@pytest.mark.parametrize("rule, expect", [
    (dict(projector=True, llm=False), {"vision_tower": False, "projector": True, "llm": False}),
    (dict(projector=True, llm=True), {"vision_tower": False, "projector": True, "llm": True}),
    (dict(projector=False, llm=True, vision_from_layer=0), {"vision_tower": True, "projector": False, "llm": True}),
])
def test_set_trainable(word_tokenizer, rule, expect):
    model = make_tiny_llava(word_tokenizer, vision_layers=3)
    counts = set_trainable(model, **rule)
    for module, on in expect.items():
        assert (counts[module] > 0) == on
    layers = _vm(model.model.vision_tower).encoder.layers
    if rule.get("vision_from_layer") is not None:
        # feature layer -2 of 3 layers reads layer outputs 0..1; the last layer gets no gradient
        assert all(p.requires_grad for p in layers[1].parameters())
        assert not any(p.requires_grad for p in layers[2].parameters())
        assert not any(p.requires_grad for p in _vm(model.model.vision_tower).post_layernorm.parameters())


def test_set_trainable_from_layer_one(word_tokenizer):
    model = make_tiny_llava(word_tokenizer, vision_layers=4)
    set_trainable(model, projector=True, llm=False, vision_from_layer=1)
    layers = _vm(model.model.vision_tower).encoder.layers
    assert [any(p.requires_grad for p in l.parameters()) for l in layers] == [False, True, True, False]


def test_nothing_trainable_is_rejected(word_tokenizer):
    with pytest.raises(ValueError, match="no trainable parameter"):
        set_trainable(make_tiny_llava(word_tokenizer), projector=False, llm=False)
