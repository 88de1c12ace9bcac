"""LoRA (and 4-bit QLoRA) students: adapters on the language model's linear layers, through peft.

A stage that trains the language model of a student whose recipe has ``student.lora`` wraps the
student in a ``PeftModel``: LoRA adapters on the named linear layers of the language model only
(CLIP has ``q_proj``/``k_proj``/``v_proj`` too, left alone), and every other module the stage trains
(the multimodal projector, the tuned vision layers) kept fully trainable as peft
``modules_to_save``, so an adapter directory holds everything the stage changed.

Saving: checkpoints hold the adapter (resume rebuilds the same PeftModel on the stage's starting
student and loads it); the stage's model is the adapter merged into a plain HF LLaVA, built from a
(possibly gathered) state dict, so it works whether or not the live model is sharded.
"""

from __future__ import annotations

import copy
import os
import re

import torch
import torch.nn as nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("student.lora needs peft: pip install 'llavadi[peft]'") from e
    return peft


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft PeftModel."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def language_model_targets(names: list[str], language_model: str = "language_model") -> str:
    """A peft target regex: linear layers called `names` inside the decoder layers of the module `language_model`
    (its attribute name: `language_model`, or Idefics3's / SmolVLM's `text_model`)."""
    return (r".*" + re.escape(language_model) + r"\.layers\.\d+\..*\.(?:" + "|".join(re.escape(n) for n in names)
            + ")")


def language_model_name(model: nn.Module) -> str:
    """The attribute name of `model`'s language model (the first of its family's language parts)."""
    from llavadi.models.families import family_of

    language = family_of(model.config).parts(model).language[0]
    return next(name for name, m in model.named_modules() if m is language).rsplit(".", 1)[-1]


def fully_trained_modules(model: nn.Module) -> list[str]:
    """Names of the modules outside the language model that set_trainable left trainable (kept whole under LoRA)."""
    from llavadi.models.families import family_of

    parts = family_of(model.config).parts(model)
    names = {id(m): n for n, m in model.named_modules()}
    keep = [parts.projector] if any(p.requires_grad for p in parts.projector.parameters()) else []
    keep += [layer for layer in parts.vision_layers if any(p.requires_grad for p in layer.parameters())]
    return [names[id(m)] for m in keep]


def apply_lora(model: nn.Module, spec, base_path: str | None = None) -> nn.Module:
    """`model` (trainable flags already set by set_trainable) wrapped in a PeftModel as `spec` (LoraSpec) says.

    `base_path`: the directory the student was loaded from, recorded in the adapter's config so a
    saved adapter reloads on it offline.
    """
    peft = _peft()
    full = fully_trained_modules(model)
    lm = language_model_name(model)
    missing = [n for n in spec.target_modules if not any(name.endswith("." + n) and f".{lm}." in name
                                                         for name, _ in model.named_modules())]
    if missing:
        raise ValueError(f"student.lora.target_modules {missing}: no such layer in the language model")
    if spec.quantize:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                             target_modules=language_model_targets(spec.target_modules, lm),
                             modules_to_save=full or None, base_model_name_or_path=base_path)
    return peft.get_peft_model(model, config)


def quantization_config(spec, dtype: torch.dtype | None):
    """The 4-bit (NF4) BitsAndBytesConfig of a QLoRA student; None without `quantize`."""
    if not spec.quantize:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("student.lora.quantize: 4bit needs bitsandbytes: pip install 'llavadi[qlora]'") from e
    from transformers import BitsAndBytesConfig

    # the vision tower and projector stay unquantized: only the language model's linear layers are 4-bit
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype or torch.bfloat16,
                              # the vision towers and projectors of the families (llavadi.models.families):
                              # LLaVA / Gemma 3, Qwen2-VL (tower with its merger), Idefics3 / SmolVLM
                              llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "visual", "vision_model",
                                                     "connector", "lm_head"])


def adapter_state(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's part (LoRA weights and modules_to_save copies) of a PeftModel state dict."""
    return _peft().get_peft_model_state_dict(peft_model, state_dict=state)


def save_adapter(peft_model: nn.Module, state: dict[str, torch.Tensor], directory: str) -> None:
    """Write the adapter (weights + adapter_config.json) of a PeftModel state dict to `directory`."""
    peft_model.save_pretrained(directory, state_dict=state, save_embedding_layers=False)


def load_adapter(peft_model: nn.Module, directory: str) -> None:
    """Load an adapter saved by save_adapter into a PeftModel built with the same LoRA spec; every key must fit."""
    from safetensors.torch import load_file

    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the checkpoint holds no LoRA adapter (was it trained without "
                                "student.lora?)")
    result = _peft().set_peft_model_state_dict(peft_model, load_file(path))
    adapter_missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or adapter_missing:
        raise ValueError(f"{path} does not match this recipe's LoRA student: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {adapter_missing[:5]}")


def merged_llava(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain LLaVA with the adapter of a PeftModel state dict merged in (peft's merge), built on the meta device.

    The state's tensors are used in place; the base weights the merge changes are copied first, so
    a state dict that shares storage with a live model leaves it untouched.
    """
    peft = _peft()
    base = peft_model.get_base_model()
    if getattr(base, "is_quantized", False):  # QLoRA: 4-bit weights are not the student's: merge on the original
        return merged_on_base(peft_model, state)
    with torch.device("meta"):
        skeleton = type(base)(copy.deepcopy(base.config))
    skeleton = peft.get_peft_model(skeleton, copy.deepcopy(peft_model.peft_config[ADAPTER_NAME]))
    state = {k: v.clone() if ".base_layer." in k else v for k, v in state.items()}
    result = skeleton.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the LoRA student's state does not fit its architecture: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    merged = skeleton.merge_and_unload()
    # buffers outside the state dict (e.g. rotary frequencies) are the live model's (never partitioned)
    live = dict(base.named_buffers())
    for name, buffer in list(merged.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            merged.get_submodule(owner)._buffers[leaf] = live[name].detach().clone()
    return merged


def merged_on_base(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The adapter of a PeftModel state dict merged into the student it was trained on, read again from its
    directory (the adapter config's base path) unquantized, in the dtype of the model's unquantized weights."""
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    from llavadi.models.families import family_of

    peft = _peft()
    config = copy.deepcopy(peft_model.peft_config[ADAPTER_NAME])
    base_path = config.base_model_name_or_path
    if not base_path:
        raise ValueError("cannot merge the adapter: the student it was trained on was not loaded from a directory")
    live = peft_model.get_base_model()
    family = family_of(live.config)
    dtype = next(family.parts(live).projector.parameters()).dtype  # never quantized
    cls = LlavaForConditionalGeneration if family.name == "llava" else AutoModelForImageTextToText
    base = cls.from_pretrained(base_path, dtype=dtype, local_files_only=os.path.isdir(base_path))
    model = peft.get_peft_model(base, config)
    result = peft.set_peft_model_state_dict(model, adapter_state(peft_model, state))
    if result.unexpected_keys:
        raise ValueError(f"the adapter does not fit {base_path}: unexpected {result.unexpected_keys[:5]}")
    return model.merge_and_unload()
