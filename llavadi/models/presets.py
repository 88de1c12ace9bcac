"""Tiny LLaVA presets for the synthetic demo, by exact name, with the training stages the demo gives them.

Teacher and student share one tiny CLIP vision tower (as real LLaVADI teacher and student share
a pretrained CLIP), pretrained once per patch (`llavadi.train.vision_pretrain`) and then frozen.
Image 48 px, patch 16 px: each of the 3x3 = 9 image tokens sees exactly one grid cell.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from llavadi.models.tokenizer import build_tiny_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    """Size of the tiny CLIP vision tower."""

    image_size: int = 48
    patch_size: int = 16
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    feature_layer: int = -1  # the last layer: every layer of the tiny tower is used


@dataclass(frozen=True)
class TextSpec:
    """Size of the tiny Llama language model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class Preset:
    """A named tiny model plus the recipe stages (by stage name) the demo trains it with.

    Each stage is a recipe stage without its name and data path, in recipe keys
    (`data.template`, `trainable`, `train`; see `llavadi.config.StageConfig`).
    """

    name: str
    text: TextSpec
    vision: VisionSpec = field(default_factory=VisionSpec)
    stages: dict = field(default_factory=dict)

    def stage(self, name: str) -> dict:
        """A fresh copy of one of the preset's recipe stages (callers may edit it)."""
        if name not in self.stages:
            raise KeyError(f"preset {self.name!r} has no {name!r} stage; it has {sorted(self.stages)}")
        return copy.deepcopy(self.stages[name])


SHARED_VISION = VisionSpec()
# the vision tower's own per-patch pretraining (llavadi.train.vision_pretrain): ~6 s on 1 thread
VISION_PRETRAIN = {"steps": 300, "lr": 3e-3, "batch_size": 64, "position_lr_scale": 10.0}

# Shared by both presets, measured to train these tiny models on the synthetic task (at these
# sizes whether a model leaves the answer prior is sensitive to the learning rate): AdamW with
# betas (0.9, 0.98), no weight decay, grad-norm clip 1.0, 3% warmup then cosine, batch 32,
# vision tower frozen; a checkpoint every 200 steps so an interrupted demo resumes. The caption stage
# ("pretrain", template "plain") trains projector AND language model: the tiny LLM has no
# language pretraining, so a projector-only stage 1 (as in LLaVA) does not help it.
_TRAIN = {"per_device_train_batch_size": 32, "warmup_steps": 0.03, "lr_scheduler_type": "cosine",
          "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 50, "save_steps": 200, "save_total_limit": 1,
          "adam_beta2": 0.98}


def _stage(template: str, learning_rate: float, max_steps: int) -> dict:
    return {"data": {"template": template}, "trainable": {"projector": True, "llm": True},
            "train": {**copy.deepcopy(_TRAIN), "learning_rate": learning_rate, "max_steps": max_steps}}


PRESETS: dict[str, Preset] = {
    "tiny-teacher": Preset(
        name="tiny-teacher",
        text=TextSpec(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=512),
        stages={"pretrain": _stage("plain", 1.5e-3, 300), "finetune": _stage("vicuna_v1", 1.5e-3, 600)},
    ),
    # one layer: the position-referenced questions need two attention hops (question words ->
    # answer position -> the matching image token), so depth is what separates the models;
    # a 2-layer 128-wide student matched the teacher at equal steps (.65-.68 vs .68)
    "tiny-student": Preset(
        name="tiny-student",
        text=TextSpec(hidden_size=128, num_layers=1, num_heads=4, intermediate_size=384),
        # its instruction-tuning stage is recipes/demo_student.yaml (lr 2e-3, 600 steps, these
        # shared settings). The demo gives its students 5% of the instruct labels by default
        # (`llavadi demo --student-fraction`); the distilled one also gets the teacher's answers to the rest
        stages={"pretrain": _stage("plain", 2e-3, 300)},
    ),
}


def get_preset(name: str) -> Preset:
    """The preset of that exact name."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def llava_config(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The LlavaConfig of a preset for this tokenizer."""
    v, t = preset.vision, preset.text
    vision_config = CLIPVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, projection_dim=v.hidden_size,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        vision_feature_layer=v.feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_image_processor(vision: VisionSpec = SHARED_VISION) -> CLIPImageProcessorPil:
    """CLIP-normalising image processor for the tower's image size (a no-op resize for its own images)."""
    side = vision.image_size
    # the PIL class directly: CLIPImageProcessor needs torchvision and would fall back with a warning
    return CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        do_resize=True, do_center_crop=True, do_convert_rgb=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )


def build_preset(name: str, tokenizer: PreTrainedTokenizerFast | None = None,
                 vision_tower_state: dict | None = None, seed: int | None = None):
    """(LlavaForConditionalGeneration, tokenizer, image_processor) of a named tiny preset."""
    import torch

    preset = get_preset(name)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    if seed is not None:
        torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(preset, tokenizer))
    if vision_tower_state is not None:
        missing, unexpected = model.model.vision_tower.load_state_dict(vision_tower_state, strict=False)
        # post_layernorm / head of the pooled output are not read by LLaVA and may be absent
        real_missing = [k for k in missing if "post_layernorm" not in k]
        if real_missing or unexpected:
            raise ValueError(f"vision tower state does not fit preset {name!r}: "
                             f"missing {real_missing}, unexpected {unexpected}")
    return model, tokenizer, build_image_processor(preset.vision)
