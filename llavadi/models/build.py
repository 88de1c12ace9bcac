"""Build teacher and student models of any registered family, freeze modules, save them.

A model spec (see `llavadi.config.ModelSpec`) is one of:
- `path`: a HF image-text-to-text checkpoint directory or hub id of a family llavadi knows
  (`llavadi.models.families`: LLaVA-1.5, Qwen2-VL, Qwen2.5-VL), e.g. a llava-hf model or a llavadi
  student, loaded with AutoModelForImageTextToText;
- `vision` + `llm`: a CLIP/SigLIP vision checkpoint and a causal-LM checkpoint composed with a new
  2-layer GELU MLP projector (LLaVA-1.5's), the image token added to the tokenizer;
- `preset`: a named tiny preset built from config (llavadi.models.presets), no download.
A local directory is never fetched from anywhere; a name of the form owner/name that is not a local
directory is a hub id, downloaded by the hub client (at `revision`; nothing when HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from llavadi.atomic import staged_folder
from llavadi.data.dataset import View
from llavadi.data.encode import ConversationEncoder
from llavadi.data.templates import IMAGE_PLACEHOLDER, get_template
from llavadi.models.dtypes import torch_dtype
from llavadi.models.families import Family, family_for_type, family_of
from llavadi.models.hub import hub_error, source_kwargs
from llavadi.models.image_tokens import n_image_tokens  # noqa: F401  (part of this module's API)
from llavadi.models.meta import TOKENIZER_CHAT_TEMPLATE, read_model_meta, write_model_meta


@dataclass
class LoadedModel:
    """A model with what is needed to feed it: tokenizer, image processor, and `meta`, the
    llavadi.json facts of how it is prompted (template, system prompt; see llavadi.models.meta).
    Its `family` (by the config's model_type) says how images enter its prompts and inputs."""

    model: LlavaForConditionalGeneration
    tokenizer: object
    image_processor: object
    meta: dict = field(default_factory=dict)
    source: str | None = None  # the directory or hub id it was loaded from (None: built in memory)

    @property
    def family(self) -> Family:
        """The model's family adapter (llavadi.models.families)."""
        return family_of(self.model.config, self.source or "model")

    @property
    def n_image_tokens(self) -> int | None:
        """Image placeholder tokens per image, as the model's vision config implies (None: depends on the image)."""
        return self.family.fixed_tokens_per_image(self.model.config)

    @property
    def template(self) -> str:
        """The conversation template the model was trained with (its family's default when not recorded)."""
        return self.meta.get("template") or self.family.default_template

    @property
    def system(self) -> str | None:
        """The system prompt it was trained with; None: the template's default."""
        return self.meta.get("system")

    @property
    def pad_to_square(self) -> bool:
        """Whether its images are padded to a square with their mean colour before preprocessing."""
        return bool(self.meta.get("pad_to_square", self.family.pad_to_square))

    def image_inputs(self, images: list) -> dict:
        """The model inputs of one sample's images (RGB PIL images), as its family preprocesses them."""
        return self.family.image_inputs(self.image_processor, images, self.pad_to_square)

    def batch_image_inputs(self, images_per_sample: list[list]) -> dict:
        """The image inputs of a batch: each sample's images preprocessed, combined as the collator combines them."""
        from llavadi.data.collator import IMAGE_INPUT_KEYS, combine_image_inputs

        per_sample = [self.image_inputs(images) for images in images_per_sample if images]
        return {k: combine_image_inputs([d[k] for d in per_sample], k) for k in IMAGE_INPUT_KEYS
                if per_sample and k in per_sample[0]}

    def encoder(self, template: str | None = None, system: str | None = None,
                max_length: int = 4096) -> ConversationEncoder:
        """The ConversationEncoder for this model's tokenizer and image-token count.

        With `template` (and `system`; None = the template's default) the prompts use those;
        with no template, the model's own (`self.template`, `self.system`).
        """
        if template is None:
            template, system = self.template, self.system
        family, config = self.family, self.model.config
        family.check_image_processor(self.image_processor)
        tmpl = get_template(template, system, eos=self.tokenizer.eos_token or "</s>", image_parts=family.image_parts)
        return ConversationEncoder(
            self.tokenizer, tmpl, family.image_token_id(config), self.n_image_tokens, max_length,
            image_marker=family.image_marker, multi_image=family.multi_image, family=family.name,
            template_image_text=family.template_image_text,
            tokens_per_image=lambda size, n: family.tokens_per_image(config, self.image_processor, size, n))


    def data_view(self, template: str | None = None, system: str | None = None, max_length: int = 4096,
                  prefix: str = "") -> View:
        """How this model sees a dataset's samples (llavadi.data.dataset.View): its encoder, its image inputs."""
        image_inputs = None if self.family.name == "llava" else self.image_inputs  # None: LLaVA-1.5's own path
        return View(self.encoder(template, system, max_length), self.image_processor, prefix=prefix,
                    pad_to_square=self.pad_to_square, image_inputs=image_inputs)


def _pretrained(cls, path: str, what: str, revision: str | None = None, **kwargs):
    """cls.from_pretrained from a local directory (never downloads) or a hub id (the hub client fetches it)."""
    source = source_kwargs(path, what, revision)
    try:
        return cls.from_pretrained(path, **source, **kwargs)
    except OSError as e:
        if source.get("local_files_only"):
            raise
        raise hub_error(path, what, e) from e


def vision_image_processor(vision_config, path: str):
    """The vision checkpoint's own image processor, else its kind's preprocessing (CLIP or SigLIP) at its image
    size; a tower of another kind without one is refused by name."""
    try:
        return _pretrained(AutoImageProcessor, path, "vision encoder path")
    except (OSError, ValueError):
        pass
    import importlib.util

    import transformers

    size, kind = vision_config.image_size, getattr(vision_config, "model_type", None)
    pil = "" if importlib.util.find_spec("torchvision") is not None else "Pil"  # without torchvision: the PIL class
    if kind in ("clip_vision_model", "clip"):  # resize the shortest edge, centre crop, CLIP's mean and std
        cls = getattr(transformers, f"CLIPImageProcessor{pil}")
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if kind in ("siglip_vision_model", "siglip"):  # resize to the square, no crop, mean and std 0.5
        return getattr(transformers, f"SiglipImageProcessor{pil}")(size={"height": size, "width": size})
    raise ValueError(f"{path}: no image processor (preprocessor_config.json) for a {kind!r} tower, whose "
                     "preprocessing llavadi does not know (CLIP's and SigLIP's it does): add the tower's "
                     "preprocessor_config.json")


def load_llava_dir(path: str | os.PathLike, dtype=None, revision: str | None = None, **model_kwargs) -> LoadedModel:
    """A saved model directory (HF files + llavadi.json) or hub id of a registered family, as a LoadedModel on the CPU.

    The directory must hold the model's config, its tokenizer and its image processor; a model_type
    llavadi has no family adapter for is refused naming the supported ones; a llavadi.json whose
    n_image_tokens disagrees with the vision tower is an error. `model_kwargs` go to from_pretrained
    (e.g. a quantization_config).
    """
    path = str(path)
    source_kwargs(path, "model path", revision)  # a missing path or a misplaced revision fails first
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; is this a saved model directory?")
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    config = _pretrained(AutoConfig, path, "model path", revision)
    family = family_for_type(getattr(config, "model_type", None), f"model path {path}")
    model_class = LlavaForConditionalGeneration if family.name == "llava" else AutoModelForImageTextToText
    model = _pretrained(model_class, path, "model path", revision, **model_kwargs)
    tokenizer = _pretrained(AutoTokenizer, path, "model path", revision)
    try:
        image_processor = family.load_image_processor(path, source_kwargs(path, "model path", revision))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: no image processor saved ({e})") from e
    meta = read_model_meta(path, model.config, revision)  # a hub id's from its snapshot
    if not getattr(tokenizer, "chat_template", None):  # older folders keep the template beside the processor only
        tokenizer.chat_template = processor_chat_template(path, revision)
    if TOKENIZER_CHAT_TEMPLATE in meta:
        # the saved files carry llavadi's rendering; the language model's own template stays what
        # `template: chat_template` means
        tokenizer.chat_template = meta[TOKENIZER_CHAT_TEMPLATE]
    return LoadedModel(model, tokenizer, image_processor, meta, source=path)


def processor_chat_template(path: str, revision: str | None = None) -> str | None:
    """The chat template a folder (or hub id) keeps for its processor: chat_template.jinja or chat_template.json."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        source = source_kwargs(path, "model path", revision)
        try:
            file = cached_file(path, name, _raise_exceptions_for_missing_entries=False, **source)
        except OSError:
            file = None
        if file:
            text = open(file, encoding="utf-8").read()
            return text if name.endswith(".jinja") else json.loads(text)["chat_template"]
    return None


def vision_model_class(path: str):
    """CLIPVisionModel or SiglipVisionModel, as the vision checkpoint's config.json says."""
    cfg = _pretrained(AutoConfig, path, "vision encoder path")
    kind = cfg.model_type
    if kind in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel as cls
    elif kind in ("siglip", "siglip_vision_model"):
        from transformers import SiglipVisionModel as cls
    else:
        raise ValueError(f"vision checkpoint {path}: model_type {kind!r} is not CLIP or SigLIP")
    return cls


def _load_vision(path: str, dtype):
    return _pretrained(vision_model_class(path), path, "vision encoder path",
                       **({} if dtype is None else {"dtype": dtype}))


def composed_tokenizer(llm_path: str):
    """The language model's tokenizer with LLaVA's image token (and a pad token) added."""
    tokenizer = _pretrained(AutoTokenizer, llm_path, "language model path")
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    if tokenizer.pad_token is None:
        # LLaVA pads with unk for Llama; any existing token works since padding is masked
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def composed_config(vision_config, text_config, tokenizer, vision_feature_layer: int = -2,
                    select_strategy: str = "default") -> LlavaConfig:
    """The LlavaConfig of a vision encoder + language model composition (LLaVA-1.5's GELU projector)."""
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=select_strategy,
        projector_hidden_act="gelu",
    )


def compose_llava(vision_path: str, llm_path: str, vision_feature_layer: int = -2,
                  select_strategy: str = "default", dtype=None, seed: int = 0) -> LoadedModel:
    """A new LLaVA from a vision encoder + a causal LM (local dirs or hub ids) + a fresh 2-layer GELU projector."""
    vision = _load_vision(vision_path, dtype)
    llm = _pretrained(AutoModelForCausalLM, llm_path, "language model path",
                      **({} if dtype is None else {"dtype": dtype}))
    tokenizer = composed_tokenizer(llm_path)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tokenizer))
    config = composed_config(vision.config, llm.config, tokenizer, vision_feature_layer, select_strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    if dtype is not None:
        model.to(dtype)
    image_processor = vision_image_processor(vision.config, vision_path)
    return LoadedModel(model, tokenizer, image_processor, {})


def load_model(spec, dtype=None, **model_kwargs) -> LoadedModel:
    """Build the model a `ModelSpec` describes, in its dtype (`dtype` overrides) and attention implementation."""
    dtype = dtype if dtype is not None else torch_dtype(getattr(spec, "dtype", None))
    if spec.path:
        loaded = load_llava_dir(spec.path, dtype=dtype, revision=getattr(spec, "revision", None), **model_kwargs)
    elif model_kwargs:
        raise ValueError(f"{sorted(model_kwargs)} apply to a model loaded from `path` only")
    elif spec.vision or spec.llm:
        loaded = compose_llava(spec.vision, spec.llm, spec.composed_feature_layer(), dtype=dtype)
    else:
        from llavadi.models.presets import build_preset

        model, tokenizer, image_processor = build_preset(spec.preset)
        if dtype is not None:
            model.to(dtype)
        loaded = LoadedModel(model, tokenizer, image_processor, {})
    attn = getattr(spec, "attn_implementation", None)
    if attn is not None:
        loaded.model.set_attn_implementation(attn)
    return loaded


# ----------------------------------------------------------------------------- freezing

def set_trainable(model: LlavaForConditionalGeneration, projector: bool = True, llm: bool = True,
                  vision_from_layer: int | None = None) -> dict[str, int]:
    """Per-module training rule; returns trainable parameter counts per module.

    The modules are the family's (llavadi.models.families: vision tower, projector, language model).
    `vision_from_layer=None` freezes the vision tower; N tunes its encoder layers N.. (and the
    layers after); layers the model never reads (past LLaVA's vision_feature_layer) stay frozen, so
    DDP sees no unused trainable parameter.
    """
    family = family_of(model.config)
    parts = family.parts(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*parts.projector.parameters(), *parts.projector_params]:
        p.requires_grad_(projector)
    language = [p for m in parts.language for p in m.parameters()]
    for p in language:
        p.requires_grad_(llm)
    if vision_from_layer is not None:
        layers = parts.vision_layers
        used = family.used_vision_layers(model.config, len(layers))
        if not 0 <= vision_from_layer < len(layers):
            raise ValueError(f"vision_from_layer={vision_from_layer}: the vision tower has {len(layers)} layers")
        for i in range(vision_from_layer, used):
            for p in layers[i].parameters():
                p.requires_grad_(True)
    projector_ids = {id(p) for p in parts.projector.parameters()}
    counts = {
        # the projector may sit inside the vision module (Qwen2-VL's merger): counted once, as the projector
        "vision_tower": sum(p.numel() for p in parts.vision.parameters() if p.requires_grad and id(p) not in projector_ids),
        "projector": sum(p.numel() for p in [*parts.projector.parameters(), *parts.projector_params] if p.requires_grad),
        "llm": sum(p.numel() for p in language if p.requires_grad),
    }
    if not any(counts.values()):
        raise ValueError("the training rule leaves no trainable parameter; enable projector, llm or vision_from_layer")
    return counts


# ----------------------------------------------------------------------------- saving

def llava_processor(loaded: LoadedModel):
    """The processor saved with a model, as its family says (LLaVA-1.5: a LlavaProcessor whose image processor
    pads as llavadi does and whose chat template renders the model's prompt; llavadi.models.families)."""
    return loaded.family.saved_processor(loaded)


def save_model(loaded: LoadedModel, out_dir: str, meta: dict | None = None, state_dict: dict | None = None,
               weights: bool = True) -> str:
    """Save model, tokenizer, processor and llavadi.json as a plain HF directory, atomically.

    `state_dict`: the weights to write instead of the model's own (e.g. gathered from a sharded engine);
    `weights` False: everything but the weights (config.json in their place: the model's description).
    """
    with staged_folder(out_dir) as tmp:
        if weights:
            loaded.model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        else:
            loaded.model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        processor = llava_processor(loaded)
        processor.save_pretrained(tmp)  # its chat template is written for the tokenizer too
        meta = {**loaded.meta, **(meta or {})}
        if getattr(processor, "chat_template", None) != loaded.tokenizer.chat_template:  # what template: chat_template reads
            meta[TOKENIZER_CHAT_TEMPLATE] = loaded.tokenizer.chat_template
        write_model_meta(tmp, meta, loaded.model.config)
    return out_dir


def publish_copy(src_dir: str, out_dir: str) -> str:
    """Copy a saved model directory to `out_dir` atomically (a temporary copy, fsynced, then renamed)."""
    with staged_folder(out_dir) as tmp:
        shutil.copytree(src_dir, tmp, dirs_exist_ok=True)
    return out_dir
