"""LLaVA-NeXT (`llava_next`) and LLaVA-OneVision (`llava_onevision`): any-resolution tiling.

An image is resized to the best of the config's `image_grid_pinpoints` and cut into tiles of the
vision tower's input size, plus one base tile of the whole image. Its tokens are the base tile's
grid (side x side, side = image_size / patch_size), then the tiles' features laid out as one
(rows x cols) map with the padding of the best resolution removed (OneVision: shrunk when it holds
more than `anyres_max_N` tiles' worth), and one newline token after each row. So the count depends
on the image's size: `anyres_tokens` computes it from the config, as the model packs the features.
OneVision samples may hold several images; an image of a multi-image sample is its base tile only
(side x side + one newline), as the model reads it (`batch_num_images`).
The saved folder carries the family's processor (LlavaNextProcessor; LLaVA-OneVision's own
processor needs torchvision for its video processor, so its folder carries tokenizer + image
processor) and the chat template the model was trained with.
"""

from __future__ import annotations

import math

import torch
from transformers.image_processing_utils import select_best_resolution

from llavadi.models.families.base import Parts
from llavadi.models.families.llava import LlavaFamily


def anyres_tokens(config, width: int, height: int, max_tiles: int | None = None) -> tuple[int, int, int]:
    """(base tokens, rows, cols) of one tiled image of `width` x `height`: rows * cols tile features (plus a
    newline per row) follow the base tile's tokens."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    rows, cols = side * (best_h // tile), side * (best_w // tile)
    # the rows or columns that only pad the image to the best resolution are dropped
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * cols / width, 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * rows / height, 7))) // 2)
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * side ** 2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    # strategy 'full' keeps CLIP's CLS token (SigLIP has none)
    has_cls = config.vision_config.model_type.startswith("clip")
    base = side * side + (1 if has_cls and config.vision_feature_select_strategy == "full" else 0)
    return base, rows, cols


class LlavaNextFamily(LlavaFamily):
    """LlavaNextForConditionalGeneration: one image per sample, tiled."""

    name = "llava_next"
    model_types = ("llava_next",)
    image_marker = "<image>"
    default_template = "chat_template"
    pad_to_square = False
    multi_image = False
    image_parts = True
    spatial_grids = False  # base tile + tiles + row newlines: a sequence, not one grid

    def fixed_tokens_per_image(self, config):
        return None

    def _max_tiles(self, config) -> int | None:
        return None

    def tokens_per_image(self, config, image_processor, size, n_images: int = 1):
        base, rows, cols = anyres_tokens(config, *size, self._max_tiles(config))
        return base + rows * cols + rows

    def image_inputs(self, image_processor, images, pad_to_square):
        if pad_to_square:
            raise ValueError(f"{self.name}: images are tiled at their own aspect ratio, not padded to a square")
        out = image_processor(images=list(images), return_tensors="pt")
        # pixel_values: (n_images, tiles, C, H, W), padded to the most tiles; image_sizes: (n_images, 2) = (h, w)
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def image_grids(self, config, inputs):
        sizes = inputs.get("image_sizes")
        if sizes is None:
            return []
        return [(1, self.tokens_per_image(config, None, (int(w), int(h)))) for h, w in sizes.tolist()]

    def parts(self, model) -> Parts:
        parts = super().parts(model)
        # the row-end embedding is learnt with the projector
        return Parts(parts.vision, parts.projector, parts.language, parts.vision_layers, [model.model.image_newline])

    def blank_image_inputs(self, config, device, dtype):
        v = config.vision_config
        return {"pixel_values": torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=dtype, device=device),
                "image_sizes": torch.tensor([[v.image_size, v.image_size]], device=device)}

    def saved_processor(self, loaded):
        from transformers import LlavaNextProcessor

        from llavadi.models.chat_template import llavadi_chat_template

        cfg = loaded.model.config
        return LlavaNextProcessor(
            image_processor=loaded.image_processor, tokenizer=loaded.tokenizer,
            patch_size=cfg.vision_config.patch_size, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1 if cfg.vision_config.model_type.startswith("clip") else 0,
            image_token=self.image_marker,
            chat_template=llavadi_chat_template(loaded.template, loaded.system, loaded.tokenizer))


class LlavaOnevisionFamily(LlavaNextFamily):
    """LlavaOnevisionForConditionalGeneration: tiled single images, base-tile images in multi-image samples."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    multi_image = True

    def _max_tiles(self, config):
        return int(config.vision_aspect_ratio.removeprefix("anyres_max_"))

    def tokens_per_image(self, config, image_processor, size, n_images: int = 1):
        if n_images > 1:  # an image among several is its base tile only, plus one newline
            side = config.vision_config.image_size // config.vision_config.patch_size
            return side * side + 1
        return super().tokens_per_image(config, image_processor, size)

    def image_inputs(self, image_processor, images, pad_to_square):
        out = super().image_inputs(image_processor, images, pad_to_square)
        return {**out, "batch_num_images": torch.tensor([len(images)])}

    def image_grids(self, config, inputs):
        sizes, counts = inputs.get("image_sizes"), inputs.get("batch_num_images")
        if sizes is None:
            return []
        per_image = [int(n) for n in counts.tolist() for _ in range(int(n))] if counts is not None else [1] * len(sizes)
        return [(1, self.tokens_per_image(config, None, (int(w), int(h)), n))
                for (h, w), n in zip(sizes.tolist(), per_image)]

    def image_feature_kwargs(self, config):
        return {**super().image_feature_kwargs(config), "vision_aspect_ratio": config.vision_aspect_ratio}

    def saved_processor(self, loaded):
        from llavadi.models.families.base import FolderProcessor

        return FolderProcessor(loaded.tokenizer, loaded.image_processor)
