"""The image processor saved with every llavadi model: training's preprocessing in transformers' own class.

llavadi pads every image to a square with the processor's mean colour, then resizes, crops and
normalises it (`llavadi.data.dataset.pixel_values_for`, LLaVA-1.5's preprocessing). transformers'
`LlavaImageProcessor` with `do_pad=True` does the same in its own call (the same fill, the same
centring), so a saved model given to plain transformers sees the pixels llavadi trained it on.
"""

from __future__ import annotations

import warnings

# the settings a CLIP / SigLIP / LLaVA image processor is made of, carried over as they are
_CARRIED = ("do_resize", "size", "resample", "default_to_square", "do_center_crop", "crop_size", "do_rescale",
            "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
_CONVERTIBLE = ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor")


def padding_image_processor(image_processor, pad_to_square: bool = True):
    """A `LlavaImageProcessor` (do_pad=`pad_to_square`) with `image_processor`'s settings.

    CLIP, SigLIP and LLaVA image processors are converted (the PIL backend stays the PIL backend);
    any other kind is returned unchanged, with a warning that transformers will not pad it.
    """
    name = type(image_processor).__name__
    if not name.startswith(_CONVERTIBLE):
        warnings.warn(f"{name} is saved as it is: plain transformers will not pad images to a square as llavadi "
                      "does, so non-square images are preprocessed differently outside llavadi", stacklevel=2)
        return image_processor
    if name.endswith("Pil"):
        from transformers import LlavaImageProcessorPil as cls
    else:
        from transformers import LlavaImageProcessor as cls
    settings = {k: getattr(image_processor, k) for k in _CARRIED if getattr(image_processor, k, None) is not None}
    for key in _CARRIED:  # an unset step is not done (SigLIP has no centre crop): say so, not LLaVA's default
        if key.startswith("do_") and key not in settings:
            settings[key] = False
    for key in ("size", "crop_size"):  # SizeDict -> plain dict with only the keys that are set
        if key in settings and not isinstance(settings[key], dict):
            settings[key] = {k: v for k, v in dict(settings[key]).items() if v is not None}
    return cls(do_pad=pad_to_square, **settings)
