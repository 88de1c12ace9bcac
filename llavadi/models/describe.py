"""A model as its files describe it (config.json, tokenizer, image processor, llavadi.json), no weights.

Up-front validation needs a model's layer counts, image-token count, tokenizer and image
processor before any weights load (loading a 13B checkpoint takes minutes). `describe_model`
gives a `LoadedModel` whose `model` is a `ConfigOnlyModel`: everything a `LoadedModel` derives
from `model.config` (its encoder, its image-token count) is the real model's, read from files.
Folders that cannot give a model raise `ModelFilesError` naming the folder and what is missing.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

from llavadi.models.hub import is_hub_id, source_kwargs

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


class ModelFilesError(ValueError):
    """A model folder that cannot be used; the message names the folder and what is wrong."""


@dataclass
class ConfigOnlyModel:
    """Stands in for a model where only its `config` is read (no weights are loaded)."""

    config: Any


def _folder(path: str | None, what: str, weights: bool = True) -> str:
    if path and not os.path.isdir(path) and is_hub_id(path):
        return path  # a hub id: the hub client reads its files (and says what is missing)
    if not path or not os.path.isdir(path):
        raise ModelFilesError(f"{what} {path!r} is neither a local directory nor a hub id (owner/name): "
                              "give the path of a checkpoint on disk")
    if not os.path.isfile(os.path.join(path, "config.json")):
        found = sorted(os.listdir(path))[:8]
        raise ModelFilesError(f"{what} {path}: no config.json (the folder holds {found or 'nothing'}); "
                              "is this a saved model directory?")
    if weights and not any(glob.glob(os.path.join(path, p)) for p in WEIGHT_PATTERNS):
        raise ModelFilesError(f"{what} {path}: no weights file (*.safetensors); the save may be incomplete")
    return path


def _read(what: str, path: str, load):
    """Run `load()`; any failure becomes a ModelFilesError naming the folder and the part."""
    try:
        return load()
    except ModelFilesError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, JSONDecodeError...
        raise ModelFilesError(f"{path}: cannot read its {what} ({type(e).__name__}: {e})") from None


def describe_llava_dir(path: str, what: str = "model path", revision: str | None = None, weights: bool = True):
    """A saved model directory's (or hub id's), of a registered family, config, tokenizer, image processor and llavadi.json (no weights).

    `weights` False: a folder saved without weights (``save_model(..., weights=False)``) is accepted."""
    from transformers import AutoConfig, AutoTokenizer

    from llavadi.models.build import LoadedModel
    from llavadi.models.families import FAMILIES
    from llavadi.models.meta import read_model_meta

    _folder(path, what, weights)
    source = _read("location", path, lambda: source_kwargs(path, what, revision))
    config = _read("config.json", path, lambda: AutoConfig.from_pretrained(path, **source))
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelFilesError(f"{what} {path}: config.json has model_type {model_type!r}, not a family llavadi "
                              f"supports ({', '.join(sorted(FAMILIES))}); for a vision encoder + language model use "
                              "`vision:` and `llm:`")
    tokenizer = _read("tokenizer", path, lambda: AutoTokenizer.from_pretrained(path, **source))
    processor = _read("image processor", path, lambda: FAMILIES[model_type].load_image_processor(path, source))
    meta = _read("llavadi.json", path, lambda: read_model_meta(path, config, revision))
    return LoadedModel(ConfigOnlyModel(config), tokenizer, processor, meta)


def _describe_composed(spec):
    from transformers import AutoConfig

    from llavadi.models.build import (
        LoadedModel,
        composed_config,
        composed_tokenizer,
        vision_image_processor,
        vision_model_class,
    )

    vision_path = _folder(spec.vision, "vision encoder path")
    llm_path = _folder(spec.llm, "language model path")
    cls = _read("config.json", vision_path, lambda: vision_model_class(vision_path))
    vision_config = _read("config.json", vision_path, lambda: cls.config_class.from_pretrained(
        vision_path, **source_kwargs(vision_path, "vision encoder path")))
    text_config = _read("config.json", llm_path, lambda: AutoConfig.from_pretrained(
        llm_path, **source_kwargs(llm_path, "language model path")))
    tokenizer = _read("tokenizer", llm_path, lambda: composed_tokenizer(llm_path))
    config = composed_config(vision_config, text_config, tokenizer, spec.composed_feature_layer())
    processor = _read("image processor", vision_path, lambda: vision_image_processor(vision_config, vision_path))
    return LoadedModel(ConfigOnlyModel(config), tokenizer, processor, {})


def describe_model(spec):
    """The `LoadedModel` a `ModelSpec` names, read from files only (its `model` is a ConfigOnlyModel)."""
    from llavadi.models.build import LoadedModel

    if spec.path:
        return describe_llava_dir(spec.path, revision=getattr(spec, "revision", None))
    if spec.vision or spec.llm:
        return _describe_composed(spec)
    from llavadi.models.presets import build_image_processor, get_preset, llava_config
    from llavadi.models.tokenizer import build_tiny_tokenizer

    preset = get_preset(spec.preset)
    tokenizer = build_tiny_tokenizer()
    return LoadedModel(ConfigOnlyModel(llava_config(preset, tokenizer)), tokenizer,
                       build_image_processor(preset.vision), {})
