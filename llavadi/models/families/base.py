"""What llavadi needs to know about one image-text-to-text model family, stated in one place.

A `Family` says, for the models of its `model_types`:
- prompts: the text one image becomes before expansion (`image_marker`), the image token the
  marker holds (`image_token_id`) and how many copies of it an image of a given size becomes
  (`tokens_per_image`); every copy is typed IMAGE, every other token by the template's segments;
- what the model reads besides token ids (`image_inputs` for one sample's images, `text_inputs`
  derived from the ids, e.g. M-RoPE's `mm_token_type_ids`);
- the vision features' per-image grid (`image_grids`), for visual-token alignment;
- which modules are the vision tower, the projector and the language model (`parts`), for
  freezing rules and LoRA;
- what a saved folder carries so transformers alone can use it (`saved_processor`).
Composition of a new model from a vision encoder and a language model is LLaVA's only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Parts:
    """The three modules a freezing rule names: vision tower, multimodal projector, language model (+ head)."""

    vision: nn.Module
    projector: nn.Module
    language: list[nn.Module]
    vision_layers: list[nn.Module]
    projector_params: tuple = ()  # parameters outside the projector module trained with it (LLaVA-NeXT's newline)


class Family(ABC):
    """Base class of a family adapter; subclasses set the class attributes and override what differs.

    Every adapter gives `image_inputs`, `blank_image_inputs`, `parts` and `saved_processor`
    (abstract: an adapter without one cannot be instantiated, and every adapter is instantiated
    when `llavadi.models.families` is imported), and a token count per image: a fixed one
    (`fixed_tokens_per_image`) or a rule per image size (`tokens_per_image`), checked when the
    class is defined.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.fixed_tokens_per_image is Family.fixed_tokens_per_image and cls.tokens_per_image is Family.tokens_per_image:
            raise TypeError(f"family adapter {cls.__name__} gives neither fixed_tokens_per_image nor tokens_per_image")

    name = "base"
    model_types: tuple[str, ...] = ()
    template_image_text = None  # what the family's chat template writes for an image (None: image_marker)
    image_marker = "<image>"  # the text one image becomes in a rendered prompt, before expansion
    default_template = "vicuna_v1"  # llavadi template used when a saved model records none
    pad_to_square = False  # LLaVA-1.5 pads images to a square; the newer families preprocess as they are
    multi_image = False  # whether one sample may hold several images
    image_parts = False  # chat templates render images from {"type": "image"} content parts
    spatial_grids = True  # image tokens lie on a (rows, cols) grid (visual alignment pools them spatially)

    def image_token_id(self, config) -> int:
        """The id of the token each image feature replaces."""
        return int(config.image_token_id)

    def fixed_tokens_per_image(self, config) -> int | None:
        """Image tokens per image when it does not depend on the image (None: it does)."""
        return None

    def tokens_per_image(self, config, image_processor, size: tuple[int, int], n_images: int = 1) -> int:
        """Image tokens of one image of `size` = (width, height) in a sample of `n_images` images."""
        fixed = self.fixed_tokens_per_image(config)
        if fixed is None:  # an adapter whose fixed count is conditional overrides this method
            raise ValueError(f"{self.name}: this model's image-token count depends on the image and the family "
                             "adapter gives no rule for it")
        return fixed

    def check_image_processor(self, image_processor) -> None:
        """Raise, naming the setting, if the image processor is set up in a way this adapter does not support."""
        return None  # a hook: nothing to refuse by default

    @abstractmethod
    def image_inputs(self, image_processor, images: list, pad_to_square: bool) -> dict[str, torch.Tensor]:
        """The model inputs of one sample's images (RGB PIL images, in prompt order)."""

    def text_inputs(self, input_ids: torch.Tensor, config) -> dict[str, torch.Tensor]:
        """Per-token inputs the model needs besides the ids, computed from the ids."""
        return {}

    def image_grids(self, config, inputs: dict) -> list[tuple[int, int]] | None:
        """(rows, columns) of each image's tokens in batch order; None: square grids of the fixed count."""
        return None

    @abstractmethod
    def blank_image_inputs(self, config, device, dtype) -> dict[str, torch.Tensor]:
        """The image inputs of one small blank image (runs the image path on a rank whose micro-batch has none)."""

    def image_feature_kwargs(self, config) -> dict:
        """Keyword arguments the base model's get_image_features takes besides the image inputs."""
        return {}

    @abstractmethod
    def parts(self, model: nn.Module) -> Parts:
        """The vision tower, projector and language model of a model of this family."""

    def used_vision_layers(self, config, n_layers: int) -> int:
        """How many vision encoder layers the model reads (the later ones get no gradient)."""
        return n_layers

    @abstractmethod
    def saved_processor(self, loaded):
        """The processor written with a saved model (has tokenizer, image_processor, save_pretrained)."""

    def load_image_processor(self, path: str, source: dict):
        """The image processor of a saved model directory or hub id."""
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path, **source)


class FolderProcessor:
    """What a saved model carries when its family's processor class cannot be built without torchvision: its
    tokenizer (with its chat template) and its image processor, written as transformers writes them."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @property
    def chat_template(self):
        """The tokenizer's chat template (what the saved folder renders prompts with)."""
        return self.tokenizer.chat_template

    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer and the image processor into `directory`."""
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
