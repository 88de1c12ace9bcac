"""LLaVA-1.5 (`llava`): CLIP/SigLIP tower, MLP projector, a fixed square grid of image tokens per image.

Images are padded to a square with the image processor's mean colour (LLaVA-1.5's expand2square),
one image per sample (the architecture was trained on single images), `<image>` expanded to
(image_size / patch_size)^2 tokens (+1 under the 'full' strategy). The saved folder carries a
`LlavaProcessor` whose image processor pads as llavadi does and whose chat template renders
llavadi's prompt. A LLaVA model can also be composed from a vision encoder and a language model
(`llavadi.models.build.compose_llava`).
"""

from __future__ import annotations

import torch

from llavadi.models.families.base import Family, Parts
from llavadi.models.image_tokens import n_image_tokens


class LlavaFamily(Family):
    """LlavaForConditionalGeneration."""

    name = "llava"
    model_types = ("llava",)
    image_marker = "<image>"
    default_template = "vicuna_v1"
    pad_to_square = True
    multi_image = False

    def fixed_tokens_per_image(self, config) -> int:
        return n_image_tokens(config)

    def image_inputs(self, image_processor, images, pad_to_square):
        from llavadi.data.dataset import pixel_values_for

        if len(images) != 1:
            raise ValueError(f"a LLaVA-1.5 sample holds one image, got {len(images)}")
        # one (3, H, W) image per sample: the collator stacks them to (B, 3, H, W)
        return {"pixel_values": pixel_values_for(image_processor, images[0], pad_to_square)}

    def parts(self, model) -> Parts:
        core = model.model
        vision = core.vision_tower
        vm = getattr(vision, "vision_model", vision)
        return Parts(vision, core.multi_modal_projector, [core.language_model, model.lm_head], list(vm.encoder.layers))

    def used_vision_layers(self, config, n_layers: int) -> int:
        layer = config.vision_feature_layer
        layers = [layer] if isinstance(layer, int) else list(layer)
        # hidden_states[k] is the output of layer k-1 (index 0 = embeddings)
        return max((l if l >= 0 else n_layers + 1 + l) for l in layers)

    def saved_processor(self, loaded):
        """A LlavaProcessor: `<image>` expanded to the model's count, images padded as llavadi pads them
        (llavadi.models.image_processor), a chat template rendering the model's prompt
        (llavadi.models.chat_template)."""
        from transformers import LlavaProcessor

        from llavadi.models.chat_template import llavadi_chat_template
        from llavadi.models.image_processor import padding_image_processor

        cfg = loaded.model.config
        return LlavaProcessor(
            image_processor=padding_image_processor(loaded.image_processor, loaded.pad_to_square),
            tokenizer=loaded.tokenizer,
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1 if cfg.vision_config.model_type.startswith("clip") else 0,
            image_token=self.image_marker,
            chat_template=llavadi_chat_template(loaded.template, loaded.system, loaded.tokenizer),
        )

    def image_feature_kwargs(self, config):
        return {"vision_feature_layer": config.vision_feature_layer,
                "vision_feature_select_strategy": config.vision_feature_select_strategy}

    def blank_image_inputs(self, config, device, dtype):
        v = config.vision_config
        return {"pixel_values": torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=dtype, device=device)}
