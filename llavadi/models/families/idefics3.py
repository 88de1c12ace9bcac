"""Idefics3 (`idefics3`) and SmolVLM (`smolvlm`): SigLIP tower, pixel shuffle, a fixed count per image.

The connector's pixel shuffle folds scale_factor x scale_factor patches into one token, so an image
is (image_size / patch_size / scale_factor)^2 tokens. Their chat templates write `<image>`; the
processor turns it into `<fake_token_around_image><global-img>` + `<image>` x count +
`<fake_token_around_image>`, and so does llavadi. Several images per sample are supported
(`pixel_values` of shape (samples, images, C, H, W) with a `pixel_attention_mask`; all-zero padding
images are dropped by the model). Image splitting (a variable number of tiles per image,
`do_image_splitting`) is refused by name: turn it off in the image processor. The saved folder
carries an `Idefics3Processor` (Idefics3) or the tokenizer + image processor (SmolVLM, whose
processor class needs torchvision for its video processor).
"""

from __future__ import annotations

import math

import torch

from llavadi.models.families.base import Family, Parts


class Idefics3Family(Family):
    """Idefics3ForConditionalGeneration and SmolVLMForConditionalGeneration."""

    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    template_image_text = "<image>"
    image_marker = "<fake_token_around_image><global-img><image><fake_token_around_image>"
    default_template = "chat_template"
    pad_to_square = False
    multi_image = True
    image_parts = True

    def fixed_tokens_per_image(self, config):
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2 // config.scale_factor ** 2

    def check_image_processor(self, image_processor) -> None:
        if getattr(image_processor, "do_image_splitting", False):
            raise ValueError(f"{self.name}: image splitting (do_image_splitting) gives a variable number of tiles per "
                             "image, which llavadi does not support yet; turn it off in the image processor")

    def image_inputs(self, image_processor, images, pad_to_square):
        self.check_image_processor(image_processor)
        if pad_to_square:
            raise ValueError(f"{self.name}: images are resized as they are, not padded to a square")
        out = image_processor(images=[list(images)], return_tensors="pt")
        # one sample: pixel_values (1, n_images, C, H, W), pixel_attention_mask (1, n_images, H, W)
        return {"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]}

    def image_grids(self, config, inputs):
        per_image = self.fixed_tokens_per_image(config)
        side = math.isqrt(per_image)
        n_images = int((inputs["input_ids"] == self.image_token_id(config)).sum()) // per_image
        return [(side, side)] * n_images

    def blank_image_inputs(self, config, device, dtype):
        v = config.vision_config
        pixels = torch.full((1, 1, v.num_channels, v.image_size, v.image_size), 0.5, dtype=dtype, device=device)
        mask = torch.ones(1, 1, v.image_size, v.image_size, dtype=torch.bool, device=device)
        return {"pixel_values": pixels, "pixel_attention_mask": mask}

    def parts(self, model) -> Parts:
        core = model.model
        return Parts(core.vision_model, core.connector, [core.text_model, model.lm_head],
                     list(core.vision_model.encoder.layers))

    def saved_processor(self, loaded):
        from llavadi.models.chat_template import llavadi_chat_template

        if loaded.model.config.model_type == "smolvlm":
            from llavadi.models.families.base import FolderProcessor

            return FolderProcessor(loaded.tokenizer, loaded.image_processor)
        from transformers import Idefics3Processor

        return Idefics3Processor(image_processor=loaded.image_processor, tokenizer=loaded.tokenizer,
                                 image_seq_len=self.fixed_tokens_per_image(loaded.model.config),
                                 chat_template=llavadi_chat_template(loaded.template, loaded.system, loaded.tokenizer))
