"""How many tokens one image becomes in a LLaVA-1.5 model: the one formula."""

from __future__ import annotations


def n_image_tokens(config) -> int | None:
    """Image tokens per image of a LlavaConfig: (image_size / patch_size)^2, +1 (CLS) under strategy 'full'.

    None for a config of another family (llavadi.models.families says how many tokens its images become).
    """
    if getattr(config, "model_type", "llava") != "llava":
        return None
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        n += 1
    return n
