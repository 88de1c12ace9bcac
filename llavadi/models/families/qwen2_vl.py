"""Qwen2-VL (`qwen2_vl`) and Qwen2.5-VL (`qwen2_5_vl`): dynamic resolution and M-RoPE.

An image is resized to a multiple of patch_size * merge_size within the image processor's pixel
bounds and cut into patches; the vision tower's merger joins merge_size x merge_size patches into
one token, so an image of grid (t, h, w) patches becomes t*h*w / merge_size^2 tokens laid out as
an (h / merge_size) x (w / merge_size) grid: the count depends on the image. In a prompt an image
is `<|vision_start|><|image_pad|><|vision_end|>`, the pad token repeated once per token. The
model reads `pixel_values` (all patches of the batch, one row each), `image_grid_thw` (one row per
image) and `mm_token_type_ids` (1 at image tokens), from which it computes the 3-D rotary positions.
Several images per sample are supported. The saved folder carries the tokenizer (with the chat
template) and the image processor; transformers' `Qwen2VLProcessor` additionally needs torchvision
for its video processor.
"""

from __future__ import annotations

import torch

from llavadi.models.families.base import Family, FolderProcessor, Parts


class Qwen2VLFamily(Family):
    """Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    image_marker = "<|vision_start|><|image_pad|><|vision_end|>"
    default_template = "chat_template"
    pad_to_square = False
    multi_image = True
    image_parts = True

    def tokens_per_image(self, config, image_processor, size, n_images: int = 1):
        width, height = size
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // (image_processor.merge_size ** 2)

    def image_inputs(self, image_processor, images, pad_to_square):
        if pad_to_square:
            raise ValueError(f"{self.name}: images are not padded to a square in this family (pad_to_square)")
        out = image_processor(images=list(images), return_tensors="pt")
        # pixel_values: (patches of every image, C * temporal * patch * patch); image_grid_thw: (n_images, 3)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def text_inputs(self, input_ids, config):
        return {"mm_token_type_ids": (input_ids == self.image_token_id(config)).to(torch.int32)}

    def image_grids(self, config, inputs):
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return []
        merge = config.vision_config.spatial_merge_size
        return [(int(t) * int(h) // merge, int(w) // merge) for t, h, w in grid.tolist()]

    def blank_image_inputs(self, config, device, dtype):
        v = config.vision_config
        m = v.spatial_merge_size
        dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        return {"pixel_values": torch.zeros(m * m, dim, dtype=dtype, device=device),
                "image_grid_thw": torch.tensor([[1, m, m]], device=device)}

    def parts(self, model) -> Parts:
        core = model.model
        visual = core.visual
        return Parts(visual, visual.merger, [core.language_model, model.lm_head], list(visual.blocks))

    def saved_processor(self, loaded):
        return FolderProcessor(loaded.tokenizer, loaded.image_processor)
