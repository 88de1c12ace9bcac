"""Gemma 3 (`gemma3`): SigLIP tower, patch features average-pooled to a fixed square of tokens per image.

Its chat template writes `<start_of_image>` for an image; the processor turns that into
`\\n\\n<start_of_image>` + `<image_soft_token>` x mm_tokens_per_image + `<end_of_image>\\n\\n`,
and so does llavadi (the soft token is the image token, typed `image`). The model reads
`token_type_ids` (1 at image tokens) for the bidirectional attention among an image's tokens.
Several images per sample are supported. Pan-and-scan crops (a variable number of crops per
image) are refused by name. The saved folder carries a `Gemma3Processor` and the chat template.
"""

from __future__ import annotations

import math

import torch

from llavadi.models.families.base import Family, Parts


class Gemma3Family(Family):
    """Gemma3ForConditionalGeneration."""

    name = "gemma3"
    model_types = ("gemma3",)
    template_image_text = "<start_of_image>"
    image_marker = "\n\n<start_of_image><image_soft_token><end_of_image>\n\n"
    default_template = "chat_template"
    pad_to_square = False
    multi_image = True
    image_parts = True

    def fixed_tokens_per_image(self, config):
        return int(config.mm_tokens_per_image)

    def image_inputs(self, image_processor, images, pad_to_square):
        if pad_to_square:
            raise ValueError(f"{self.name}: images are resized as they are, not padded to a square")
        if getattr(image_processor, "do_pan_and_scan", False):
            raise ValueError(f"{self.name}: pan-and-scan crops are not supported (do_pan_and_scan); turn it off in "
                             "the image processor")
        out = image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}  # (n_images, C, H, W)

    def text_inputs(self, input_ids, config):
        return {"token_type_ids": (input_ids == self.image_token_id(config)).long()}

    def image_grids(self, config, inputs):
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return []
        side = math.isqrt(int(config.mm_tokens_per_image))
        return [(side, side)] * int(pixels.shape[0])

    def blank_image_inputs(self, config, device, dtype):
        v = config.vision_config
        return {"pixel_values": torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=dtype, device=device)}

    def parts(self, model) -> Parts:
        core = model.model
        vision = core.vision_tower
        vm = getattr(vision, "vision_model", vision)
        return Parts(vision, core.multi_modal_projector, [core.language_model, model.lm_head], list(vm.encoder.layers))

    def saved_processor(self, loaded):
        from transformers import Gemma3Processor

        from llavadi.models.chat_template import llavadi_chat_template

        return Gemma3Processor(image_processor=loaded.image_processor, tokenizer=loaded.tokenizer,
                               image_seq_length=int(loaded.model.config.mm_tokens_per_image),
                               chat_template=llavadi_chat_template(loaded.template, loaded.system, loaded.tokenizer))
