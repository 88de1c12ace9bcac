"""Tiny random models of the non-LLaVA families, built from their configs with a small word tokenizer and
the family's real image processor class (the PIL variant: no torchvision here). No download."""

from __future__ import annotations

import torch

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
WORDS = ("model system user assistant you are a helpful what color is the square ? red green blue yellow "
         "hello world how many one two three").split()

# Qwen2-VL's chat template, reduced to images and text (the real one also renders videos and tools)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nyou are a helpful assistant<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# LLaVA-OneVision's (Qwen2 ChatML) template with `<image>` for an image part, as llava-hf's checkpoints render it
LLAVA_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")


# the vision tower of every tiny family model but Qwen's and Gemma's: 28 px images, 7 px patches
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                   patch_size=7)


def tiny_text(tokenizer, hidden: int) -> dict:
    """The language model's config keys shared by the tiny family models: 2 layers, 4 heads (2 key/value)."""
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def qwen_tokenizer(image_token: str | None = None, template: str = QWEN_CHAT_TEMPLATE, extra: tuple = ()):
    """A word-level fast tokenizer with Qwen2's special tokens (and `image_token`, `extra`) and a ChatML chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = QWEN_SPECIALS + list(extra) + ([image_token] if image_token else [])
    vocab = {t: i for i, t in enumerate(["<unk>", *specials, *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    extra = {"extra_special_tokens": {"image_token": image_token}} if image_token else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token="<unk>", padding_side="right", **extra)
    hf.add_special_tokens({"additional_special_tokens": specials})
    hf.chat_template = template
    return hf


PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def anyres_image_processor(model_type: str):
    """LLaVA-NeXT's or LLaVA-OneVision's image processor (PIL): 28 px tiles, up to 2x2 tiles."""
    if model_type == "llava_next":
        from transformers import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                          image_grid_pinpoints=PINPOINTS)
    from transformers import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)


def anyres_model(model_type: str, tokenizer, hidden: int = 32, seed: int = 0):
    """A tiny random LLaVA-NeXT (CLIP + Llama) or LLaVA-OneVision (SigLIP + Qwen2, anyres_max_1) of text width `hidden`."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    vision = dict(TINY_VISION)
    text = tiny_text(tokenizer, hidden)
    image = tokenizer.convert_tokens_to_ids("<image>")
    if model_type == "llava_next":
        config = LlavaNextConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                                 image_token_id=image, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
        model = LlavaNextForConditionalGeneration(config)
    else:
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text),
                                      image_token_id=image, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1")
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def qwen_image_processor():
    """Qwen2-VL's image processor (PIL): 8 px patches, 2x2 merge, 256..4096 pixels, so a 32x32 image is 4 tokens."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                    max_pixels=64 * 64)


def qwen_model(model_type: str, tokenizer, hidden: int = 32, seed: int = 0):
    """A tiny random Qwen2-VL or Qwen2.5-VL of text width `hidden`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    half = hidden // 4 // 2  # rotary dimensions per head / 2: split over (time, height, width)
    text = dict(tiny_text(tokenizer, hidden), bos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [half // 4, half // 4, half - 2 * (half // 4)]})
    if model_type == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=hidden, intermediate_size=64, num_heads=4,
                      patch_size=8, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>"]
# Gemma 3's chat template, reduced to images and text
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_tokenizer():
    """A word-level fast tokenizer with Gemma 3's special tokens and a Gemma-style chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", *GEMMA_SPECIALS, *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>",
                                 unk_token="<unk>", padding_side="right",
                                 extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                                       "eoi_token": "<end_of_image>"})
    hf.add_special_tokens({"additional_special_tokens": GEMMA_SPECIALS})
    hf.chat_template = GEMMA_CHAT_TEMPLATE
    return hf


def gemma_image_processor():
    """Gemma 3's image processor (PIL) for 28 px images, no pan-and-scan."""
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, do_pan_and_scan=False)


def gemma_model(tokenizer, hidden: int = 32, seed: int = 0):
    """A tiny random Gemma 3 (SigLIP 28 px, 7 px patches pooled to 2x2 = 4 tokens per image) of text width `hidden`."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(seed)
    ids = tokenizer.convert_tokens_to_ids
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=28, patch_size=7)
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            sliding_window=16, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                          boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                          image_token_index=ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the projector's weight to zeros: every image would then be the same zero features
    # and the tiny model blind; a random weight makes its image path (and the visual terms) depend on the image
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.05)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


IDEFICS_SPECIALS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")


def idefics_tokenizer():
    """The ChatML word tokenizer with Idefics3's image tokens; its template writes `<image>` for an image."""
    return qwen_tokenizer("<image>", LLAVA_CHAT_TEMPLATE, IDEFICS_SPECIALS)


def idefics_image_processor(model_type: str):
    """Idefics3's or SmolVLM's image processor (PIL) for 28 px images, image splitting off."""
    from transformers import Idefics3ImageProcessorPil, SmolVLMImageProcessorPil

    cls = Idefics3ImageProcessorPil if model_type == "idefics3" else SmolVLMImageProcessorPil
    return cls(do_image_splitting=False, size={"longest_edge": 28}, max_image_size={"longest_edge": 28})


def idefics_model(model_type: str, tokenizer, hidden: int = 32, seed: int = 0):
    """A tiny random Idefics3 or SmolVLM (SigLIP 28 px, 7 px patches, pixel shuffle 2: 4 tokens per image)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = dict(TINY_VISION)
    text = tiny_text(tokenizer, hidden)
    config_cls, model_cls = ((Idefics3Config, Idefics3ForConditionalGeneration) if model_type == "idefics3"
                             else (SmolVLMConfig, SmolVLMForConditionalGeneration))
    config = config_cls(vision_config=vision, text_config=text, scale_factor=2,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
