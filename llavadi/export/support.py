"""What an export target can take, checked from a model folder's files before any weights load.

llama.cpp runs LLaVA-1.5 models as two files: the language model (architecture `llama`) and an
`mmproj` file holding the CLIP vision tower and the 2-layer GELU projector (projector type `mlp`).
A model outside that shape is refused here, by name, before any conversion work: another
family (Qwen2-VL, Idefics3, ...), another vision tower (SigLIP, ...), another language model
(Mistral, Qwen2, ...), or a setting the llama.cpp graph does not reproduce.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


class ExportRefused(ValueError):
    """The model cannot be exported to this target; the message names what is not supported."""


# tokenizer.json model types llavadi carries into a GGUF vocabulary, and the llama.cpp vocabulary type
# each becomes: WordPiece -> WPM ("bert"); LLaMA's byte-fallback BPE (a converted SentencePiece) -> SPM ("llama")
GGUF_VOCABULARIES = {"WordPiece": "bert", "BPE+byte_fallback": "llama"}


@dataclass(frozen=True)
class GgufPlan:
    """What the GGUF export of one model folder will write (read from its files; no weights loaded)."""

    vocabulary: str  # the llama.cpp tokenizer model: "bert" or "llama"
    feature_layer: int  # CLIP blocks run (the index of the hidden state LLaVA reads)


def _tokenizer_kind(model_dir: str) -> str:
    """'WordPiece', 'BPE+byte_fallback', or what else tokenizer.json holds (refused by the caller)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ExportRefused(f"{model_dir}: no tokenizer.json; the GGUF export reads the vocabulary from it")
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    kind = str(model.get("type"))
    if kind == "BPE" and model.get("byte_fallback"):
        return "BPE+byte_fallback"
    return kind


def _check_family(config, where: str) -> None:
    if config.model_type != "llava":
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise ExportRefused(f"{where}: model type {config.model_type!r} ({archs}) is not supported by the GGUF export; "
                            "it takes LLaVA-1.5 models (model_type 'llava': CLIP + 2-layer GELU projector + LLaMA)")
    vision, text = config.vision_config, config.text_config
    if vision.model_type != "clip_vision_model":
        raise ExportRefused(f"{where}: vision tower {vision.model_type!r} is not supported by the GGUF export; "
                            "it takes a CLIP vision tower (clip_vision_model)")
    if text.model_type != "llama":
        raise ExportRefused(f"{where}: language model {text.model_type!r} is not supported by the GGUF export; "
                            "it takes a LLaMA language model (llama)")


def _check_vision(config, where: str) -> int:
    """The CLIP blocks to run; refuses the settings llama.cpp's LLaVA graph does not reproduce."""
    vision = config.vision_config
    if config.vision_feature_select_strategy != "default":
        raise ExportRefused(f"{where}: vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                            "supported by the GGUF export (llama.cpp drops the CLS token: 'default')")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ExportRefused(f"{where}: vision_feature_layer {layer!r} (several layers) is not supported by the GGUF "
                            "export; it takes one layer")
    n_layers = vision.num_hidden_layers
    blocks = layer if layer >= 0 else n_layers + layer + 1
    if not 1 <= blocks <= n_layers:
        raise ExportRefused(f"{where}: vision_feature_layer {layer} is outside the tower's {n_layers} layers")
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise ExportRefused(f"{where}: projector activation {config.projector_hidden_act!r} (bias "
                            f"{getattr(config, 'multimodal_projector_bias', True)}) is not supported by the GGUF export; "
                            "llama.cpp's LLaVA projector is Linear-GELU-Linear with biases")
    if vision.hidden_act not in ("quick_gelu", "gelu"):
        raise ExportRefused(f"{where}: vision activation {vision.hidden_act!r} is not supported by the GGUF export "
                            "(quick_gelu or gelu)")
    if vision.intermediate_size == vision.hidden_size:
        # llama.cpp's loader swaps a LLaVA tower's MLP weights whose shapes look like old files' (up = down)
        raise ExportRefused(f"{where}: a CLIP MLP as wide as the tower ({vision.hidden_size}) is read with fc1 and "
                            "fc2 swapped by llama.cpp's loader; the GGUF export does not take it")
    if vision.image_size % vision.patch_size:
        raise ExportRefused(f"{where}: image size {vision.image_size} is not a multiple of patch size "
                            f"{vision.patch_size}")
    return blocks


def vision_blocks(config, where: str) -> int:
    """The CLIP blocks llama.cpp runs for a LLaVA config; ExportRefused naming a setting it cannot reproduce."""
    return _check_vision(config, where)


def _check_text(config, where: str) -> None:
    text = config.text_config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise ExportRefused(f"{where}: RoPE scaling {rope_type!r} is not supported by the GGUF export")
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        raise ExportRefused(f"{where}: a LLaMA with attention or MLP biases is not supported by the GGUF export")
    if text.hidden_act != "silu":
        raise ExportRefused(f"{where}: language-model activation {text.hidden_act!r} is not supported by the GGUF "
                            "export (silu)")


def check_gguf_support(model_dir: str | os.PathLike) -> GgufPlan:
    """The GGUF plan of a saved model folder, or ExportRefused naming what llama.cpp cannot take."""
    from transformers import AutoConfig

    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir}: no config.json; pass a saved model folder")
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != "llava":  # refused from the file alone: AutoConfig may not even know the type
        raise ExportRefused(f"{model_dir}: model type {model_type!r} is not supported by the GGUF export; it takes "
                            "LLaVA-1.5 models (model_type 'llava': CLIP + 2-layer GELU projector + LLaMA)")
    config = AutoConfig.from_pretrained(model_dir)
    _check_family(config, model_dir)
    blocks = _check_vision(config, model_dir)
    _check_text(config, model_dir)
    kind = _tokenizer_kind(model_dir)
    if kind not in GGUF_VOCABULARIES:
        raise ExportRefused(f"{model_dir}: tokenizer model {kind!r} is not supported by the GGUF export; it writes "
                            f"{' and '.join(GGUF_VOCABULARIES)} vocabularies")
    return GgufPlan(vocabulary=GGUF_VOCABULARIES[kind], feature_layer=blocks)
