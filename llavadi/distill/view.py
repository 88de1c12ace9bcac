"""What one model's forward gives the objective (a ModelView), and running a LLaVA model for it.

``Needs`` says what the terms read from a model: the last hidden state, the hidden states of
given layers, the attention maps of given layers, the projector's image features. ``llava_view``
runs the base model of a ``LlavaForConditionalGeneration`` once (never the LM head: logits are
built later, only at the positions a term selects) and keeps only what ``Needs`` asks for: the
states of the requested layers are caught by hooks on the decoder layers, so a teacher does not
hold every layer's states (``output_hidden_states=True``) when a term reads one.

Layer indices follow ``output_hidden_states``: 0 is the embedding output (image features merged),
k the output of decoder layer k-1, L (or -1) the final normed state that the LM head reads;
negative indices count from the end. Attention layer indices are decoder layer indices.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from llavadi.data.collator import IMAGE_INPUT_KEYS
from llavadi.models.families import family_of

Tensor = torch.Tensor
MODEL_KEYS = ("input_ids", "attention_mask", *IMAGE_INPUT_KEYS)


@dataclass(frozen=True)
class Needs:
    """What the objective reads from one model's forward."""

    last_hidden: bool = False
    hidden_layers: frozenset[int] = frozenset()
    attention_layers: frozenset[int] = frozenset()
    image_features: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.last_hidden or other.last_hidden,
            self.hidden_layers | other.hidden_layers,
            self.attention_layers | other.attention_layers,
            self.image_features or other.image_features,
        )

    @classmethod
    def layer(cls, layer: int | None) -> Needs:
        """The hidden states of one layer (None: the final normed state)."""
        if layer is None:
            return cls(last_hidden=True)
        return cls(hidden_layers=frozenset({layer}))

    @property
    def anything(self) -> bool:
        """Whether anything at all is read."""
        return self.last_hidden or bool(self.hidden_layers or self.attention_layers) or self.image_features


def normalise_index(index: int, n: int, what: str, who: str) -> int:
    """`index` (negative counts from the end) as 0..n-1; out of range raises naming `what` and `who`."""
    if not -n <= index < n:
        raise ValueError(f"{what} {index} is out of range for the {who}'s {n} {what}s (valid: {-n}..{n - 1})")
    return index % n


@dataclass
class ModelView:
    """One model's forward, for the objective: states by layer, attention maps, image features, LM head.

    ``hidden_states`` and ``attentions`` map layer indices to tensors; a tuple (as transformers
    returns with ``output_hidden_states`` / ``output_attentions``) is accepted and indexed the same
    way. A top-k teacher (offline cache) has ``topk_ids`` and ``topk_logprobs`` instead of states.
    """

    token_types: Tensor  # (B, T) this model's own token types
    last_hidden: Tensor | None = None  # (B, T, H) final normed state: what lm_head reads
    lm_head: nn.Module | None = None
    hidden_states: dict[int, Tensor] | tuple[Tensor, ...] | None = None
    attentions: dict[int, Tensor] | tuple[Tensor, ...] | None = None  # (B, heads, T, T) each
    image_features: Tensor | None = None  # projector outputs (n_images, n_tok, H)
    image_grids: list[tuple[int, int]] | None = None  # (rows, cols) of each image's tokens; None: square, fixed count
    spatial_grids: bool = True  # False: an image's tokens are a sequence (any-resolution tiles), (1, count) each
    topk_ids: Tensor | None = None  # (B, T, k) sparse teacher: top-k token ids predicted at each position
    topk_logprobs: Tensor | None = None  # (B, T, k) their log-probs at T=1 (full-vocabulary normalised)
    n_hidden_states: int | None = None  # L + 1 for an L-layer LM (needed to resolve negative indices)
    n_layers: int | None = None
    who: str = field(default="model", compare=False)
    # a teacher's paired answer spans with a student of another tokenizer (llavadi.distill.cross_vocab.PairedGroups)
    alignment: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.hidden_states, (tuple, list)):
            self.n_hidden_states = self.n_hidden_states or len(self.hidden_states)
            self.hidden_states = dict(enumerate(self.hidden_states))
        if isinstance(self.attentions, (tuple, list)):
            self.n_layers = self.n_layers or len(self.attentions)
            self.attentions = dict(enumerate(self.attentions))

    @property
    def is_topk(self) -> bool:
        """Whether this is a sparse top-k teacher (no LM head; a cache may still hold its last hidden states)."""
        return self.topk_ids is not None

    def hidden(self, layer: int | None, term: str) -> Tensor:
        """The hidden states of `layer` (None or the last index: the final normed state)."""
        if layer is not None and self.n_hidden_states is not None:
            layer = normalise_index(layer, self.n_hidden_states, "hidden state", self.who)
            if layer == self.n_hidden_states - 1:
                layer = None
        if layer is None:
            if self.last_hidden is None:
                raise ValueError(f"term {term!r} reads the {self.who}'s last hidden state, which this view lacks")
            return self.last_hidden
        if not self.hidden_states or layer not in self.hidden_states:
            raise ValueError(f"term {term!r} reads hidden state {layer} of the {self.who}, which was not captured")
        return self.hidden_states[layer]

    def attention(self, layer: int, term: str) -> Tensor:
        """The attention maps (B, heads, T, T) of decoder layer `layer`."""
        if self.n_layers is not None:
            layer = normalise_index(layer, self.n_layers, "attention layer", self.who)
        if not self.attentions or layer not in self.attentions:
            raise ValueError(
                f"term {term!r} reads the {self.who}'s attention maps of layer {layer}, which were not captured "
                "(attention maps need attn_implementation='eager')"
            )
        return self.attentions[layer]

    def on(self, device: torch.device) -> ModelView:
        """The same view with its token types on `device` (its other tensors move when read)."""
        if self.token_types.device == device:
            return self
        return replace(self, token_types=self.token_types.to(device))


def model_inputs(batch: dict, prefix: str = "") -> dict:
    """The tensors a model's forward takes, from a collated batch (keys with `prefix`)."""
    return {k: batch[prefix + k] for k in MODEL_KEYS if prefix + k in batch}


def family_inputs(model: nn.Module, inputs: dict) -> dict:
    """`inputs` plus what the model's family derives from the ids (e.g. Qwen2-VL's mm_token_type_ids)."""
    config = base_llava(model).config
    return {**inputs, **family_of(config).text_inputs(inputs["input_ids"], config)}


def base_llava(model: nn.Module) -> nn.Module:
    """The LlavaForConditionalGeneration inside `model`: itself, or the model a PEFT wrapper adapts.

    A PeftModel's own attributes do not lead there (its ``.model`` is the adapted LLaVA, not the
    LLaVA's base model); the adapted model's layers carry the adapters, so running it trains them.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers of a LLaVA model's language model (None if they cannot be found)."""
    model = base_llava(model)
    lm = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(lm, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


@contextmanager
def _capture(layers: nn.ModuleList, hidden: set[int], attention: set[int], out: dict):
    """Hooks that store the input states of `hidden` layers and the attention weights of `attention` layers."""

    def keep_input(index):
        def hook(module, args, kwargs):
            out.setdefault("hidden", {})[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def keep_weights(index):
        def hook(module, args, output):
            out.setdefault("attn", {})[index] = output[1]

        return hook

    handles = [layers[i].register_forward_pre_hook(keep_input(i), with_kwargs=True) for i in sorted(hidden)]
    handles += [layers[i].self_attn.register_forward_hook(keep_weights(i)) for i in sorted(attention)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def llava_view(model: nn.Module, inputs: dict, token_types: Tensor, needs: Needs, who: str = "model") -> ModelView:
    """Run a LlavaForConditionalGeneration's base model (a PeftModel's adapted one) and package what `needs` asks for."""
    model = base_llava(model)
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of the {who}'s language model ({type(model).__name__})")
    n_layers = len(layers)
    hidden = {normalise_index(i, n_layers + 1, "hidden state", who) for i in needs.hidden_layers} - {n_layers}
    attention = {normalise_index(i, n_layers, "attention layer", who) for i in needs.attention_layers}
    captured: dict[str, Any] = {}
    inputs = family_inputs(model, inputs)
    with _capture(layers, hidden, attention, captured):
        out = model.model(**inputs, use_cache=False, return_dict=True)
    image_features = None
    image_outputs = getattr(out, "image_outputs", None)
    if needs.image_features and image_outputs is not None and image_outputs.pooler_output is not None:
        image_features = torch.stack(list(image_outputs.pooler_output))
    return ModelView(
        token_types=token_types,
        last_hidden=out.last_hidden_state,
        lm_head=model.get_output_embeddings(),
        hidden_states=captured.get("hidden", {}),
        attentions=captured.get("attn", {}),
        image_features=image_features,
        image_grids=family_of(model.config).image_grids(model.config, inputs),
        spatial_grids=family_of(model.config).spatial_grids,
        n_hidden_states=n_layers + 1,
        n_layers=n_layers,
        who=who,
    )
