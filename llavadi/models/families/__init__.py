"""Model families by exact `model_type`: one adapter module per family (llavadi.models.families.base).

Registered: LLaVA-1.5 (`llava`), LLaVA-NeXT (`llava_next`), LLaVA-OneVision (`llava_onevision`),
Qwen2-VL (`qwen2_vl`), Qwen2.5-VL (`qwen2_5_vl`), Gemma 3 (`gemma3`), Idefics3 (`idefics3`) and SmolVLM
(`smolvlm`).
"""

from __future__ import annotations

from llavadi.models.families.base import Family, Parts
from llavadi.models.families.gemma3 import Gemma3Family
from llavadi.models.families.idefics3 import Idefics3Family
from llavadi.models.families.llava import LlavaFamily
from llavadi.models.families.llava_next import LlavaNextFamily, LlavaOnevisionFamily
from llavadi.models.families.qwen2_vl import Qwen2VLFamily

FAMILIES: dict[str, Family] = {}
_ADAPTERS = (LlavaFamily(), LlavaNextFamily(), LlavaOnevisionFamily(), Qwen2VLFamily(), Gemma3Family(), Idefics3Family())
for _family in _ADAPTERS:
    for _model_type in _family.model_types:
        FAMILIES[_model_type] = _family


def family_for_type(model_type: str | None, where: str = "model") -> Family:
    """The adapter of `model_type` (exact match); an unknown type raises listing the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not a family llavadi supports; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def family_of(config, where: str = "model") -> Family:
    """The adapter of a model config (its `model_type`)."""
    return family_for_type(getattr(config, "model_type", None), where)


__all__ = ["FAMILIES", "Family", "Parts", "family_for_type", "family_of"]
