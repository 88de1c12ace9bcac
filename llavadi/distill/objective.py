"""The distillation objective: total = ce_weight * CE + sum_i weight_i * term_i, routed by token types.

Which positions a term reads (its "selection"):
- Logit terms (the divergences of logits.py) and CE use PREDICTION positions: position t is
  selected when the token t+1 is of the term's token-type group and t is not padding (the logit
  at t predicts token t+1). CE selects t when labels[t+1] != -100.
- Hidden and relation terms use the TOKEN positions themselves (t selected when token t is of
  the group).
Teacher and student may have different numbers of image tokens, so positions differ: the k-th
token of a type in a student sample corresponds to the k-th token of that type in the teacher
sample. Image tokens correspond only when the counts are equal; otherwise the visual terms pool
the teacher's square grid of each image to the student's.

Normalisation: every term is a SUM over its selected positions (or matrix entries) divided by the
GLOBAL count for its selection key. ``count_positions`` gives a micro-batch's counts; the trainer
sums them over the gradient-accumulation window (``sum_counts``), all-reduces them across
processes (``all_reduce_counts``) and passes the totals to ``forward``. Then gradient
accumulation 2x4 gives the same loss and gradients as one batch of 8. With DDP, which averages
gradients over processes, multiply the loss by the world size (or divide the passed totals by
it) to keep the same equality. Without normalisers, ``forward`` uses the micro-batch's own counts
(per-token mean).

Selection keys: "ce"; "pred:<group>" (logit terms); "tok:<group>" (hidden_mse, visual terms,
attention "kl": rows); "pairs:<rows>,<cols>" (affinity, attention "mse": entries per sample).

Memory: the logit terms and CE share one pass over the union of their selected positions, in
chunks of ``chunk_size`` positions; the LM heads run only on those rows, and each chunk is wrapped
in activation checkpointing so full (N, V) logits of both models never exist at once, in forward
or backward (logits are recomputed per chunk in backward). ``chunk_size=None`` is the plain path
(one chunk, no checkpointing): same functions, same values.

Models: run them so that they do not build full-vocabulary logits themselves: the base model
``model.model(...)`` wrapped by ``llava_view``, or the full model with ``logits_to_keep=1`` and
``last_hidden = hidden_states[-1]`` (the final norm's output, what lm_head reads).

Projectors (token / visual alignment) are trainable parameters of this module: put
``objective.parameters()`` in the optimizer and save them with ``save_objective`` next to (not
inside) the student checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llavadi.data.token_types import TYPE_GROUPS, TokenType, type_mask
from llavadi.distill.hidden import (
    ALIGNMENT_LOSSES,
    PROJECTOR_KINDS,
    build_projector,
    grid_side,
    pool_image_tokens,
    token_alignment_loss,
)
from llavadi.distill.logits import DIVERGENCE_OPTIONS, DIVERGENCES, MISSING_MASS_TREATMENTS, SPARSE_DIVERGENCES
from llavadi.distill.relation import (
    ATTENTION_LOSSES,
    affinity_squared_errors,
    attention_loss,
    visual_self_correlation_loss,
)

Tensor = torch.Tensor

PROJECTOR_FILE = "distill_projectors.safetensors"
IGNORE_INDEX = -100

LOGIT_TERMS = tuple(DIVERGENCES)
TERM_OPTIONS: dict[str, frozenset[str]] = {
    **{
        name: DIVERGENCE_OPTIONS[name] | ({"missing_mass"} if name in SPARSE_DIVERGENCES else set())
        for name in LOGIT_TERMS
    },
    # layers: list of [student_layer, teacher_layer] indices into output_hidden_states; default: last hidden
    "hidden_mse": frozenset({"projector", "loss", "layers"}),
    # source "hidden" (LLM states at image positions, `layer`, default last) or "projector" (image_features)
    "visual_align": frozenset({"projector", "loss", "source", "layer"}),
    "affinity": frozenset({"rows", "cols", "layer"}),
    "visual_self_corr": frozenset({"source", "layer"}),
    "attention": frozenset({"rows", "cols", "layer", "loss"}),
}
TERM_NAMES = tuple(TERM_OPTIONS)
VISUAL_TERMS = ("visual_align", "visual_self_corr")


@dataclass
class TermSpec:
    """One entry of a recipe's ``distill.terms`` list."""

    name: str
    weight: float = 1.0
    # token-type group the term reads; None = the term's default ("image" for visual terms, else "response").
    # affinity: the columns (rows from options["rows"], default "image"); attention: the rows (columns from
    # options["cols"], default "image").
    tokens: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in TERM_OPTIONS:
            raise ValueError(f"unknown distillation term {self.name!r}; valid terms: {', '.join(TERM_NAMES)}")
        if self.tokens is None:
            self.tokens = "image" if self.name in VISUAL_TERMS else "response"
        if self.tokens not in TYPE_GROUPS:
            raise ValueError(f"term {self.name!r}: unknown tokens {self.tokens!r}; choose one of {sorted(TYPE_GROUPS)}")
        if self.name in VISUAL_TERMS and self.tokens != "image":
            raise ValueError(f"term {self.name!r} reads image tokens only; drop `tokens` or set it to 'image'")
        unknown = set(self.options) - TERM_OPTIONS[self.name]
        if unknown:
            raise ValueError(
                f"term {self.name!r}: unknown option(s) {sorted(unknown)}; "
                f"valid options: {sorted(TERM_OPTIONS[self.name])}"
            )
        if not isinstance(self.weight, (int, float)):
            raise ValueError(f"term {self.name!r}: weight must be a number, got {self.weight!r}")
        self._validate_options()

    def _validate_options(self) -> None:
        o = self.options
        where = f"term {self.name!r}"
        if "temperature" in o and not (isinstance(o["temperature"], (int, float)) and o["temperature"] > 0):
            raise ValueError(f"{where}: temperature must be a number > 0, got {o['temperature']!r}")
        for key in ("beta", "alpha"):
            if key in o and not (isinstance(o[key], (int, float)) and 0 <= o[key] <= 1):
                raise ValueError(f"{where}: {key} must be a number in [0, 1], got {o[key]!r}")
        if "missing_mass" in o and o["missing_mass"] not in MISSING_MASS_TREATMENTS:
            raise ValueError(
                f"{where}: missing_mass must be one of {MISSING_MASS_TREATMENTS}, got {o['missing_mass']!r}"
            )
        if "projector" in o and o["projector"] not in PROJECTOR_KINDS:
            raise ValueError(f"{where}: projector must be one of {PROJECTOR_KINDS}, got {o['projector']!r}")
        if self.name == "attention":
            if o.get("loss", "mse") not in ATTENTION_LOSSES:
                raise ValueError(f"{where}: loss must be one of {ATTENTION_LOSSES}, got {o['loss']!r}")
        elif "loss" in o and o["loss"] not in ALIGNMENT_LOSSES:
            raise ValueError(f"{where}: loss must be one of {ALIGNMENT_LOSSES}, got {o['loss']!r}")
        if "source" in o and o["source"] not in ("hidden", "projector"):
            raise ValueError(f"{where}: source must be 'hidden' or 'projector', got {o['source']!r}")
        if o.get("source") == "projector" and "layer" in o:
            raise ValueError(f"{where}: `layer` applies to source 'hidden' only")
        for key in ("rows", "cols"):
            if key in o and o[key] not in TYPE_GROUPS:
                raise ValueError(f"{where}: {key} must be one of {sorted(TYPE_GROUPS)}, got {o[key]!r}")
        if "layer" in o and not isinstance(o["layer"], int):
            raise ValueError(f"{where}: layer must be an integer index into the hidden states / attentions")
        if "layers" in o:
            pairs = o["layers"]
            ok = (
                isinstance(pairs, (list, tuple))
                and len(pairs) > 0
                and all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p) for p in pairs
                )
            )
            if not ok:
                raise ValueError(
                    f"{where}: layers must be a non-empty list of [student_layer, teacher_layer] integer pairs, "
                    f"got {pairs!r}"
                )

    @classmethod
    def from_dict(cls, entry: dict[str, Any], where: str = "distill.terms") -> TermSpec:
        """A TermSpec from one recipe entry; errors name the entry (e.g. "distill.terms[2]")."""
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: each term is a mapping with name, weight, tokens, options; got {entry!r}")
        unknown = set(entry) - {"name", "weight", "tokens", "options"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; a term has name, weight, tokens, options")
        if "name" not in entry:
            raise ValueError(f"{where}: missing `name`; valid terms: {', '.join(TERM_NAMES)}")
        try:
            return cls(**entry)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @property
    def is_logit_term(self) -> bool:
        """Whether this term compares output distributions (reads the LM heads)."""
        return self.name in DIVERGENCES

    @property
    def rows(self) -> str:
        """Row group of a relation term."""
        if self.name == "affinity":
            return self.options.get("rows", "image")
        return self.tokens

    @property
    def cols(self) -> str:
        """Column group of a relation term."""
        if self.name == "affinity":
            return self.tokens
        return self.options.get("cols", "image")

    @property
    def selection_key(self) -> str:
        """Normaliser key: which count this term's sum is divided by."""
        if self.is_logit_term:
            return f"pred:{self.tokens}"
        if self.name == "affinity" or (self.name == "attention" and self.options.get("loss", "mse") == "mse"):
            return f"pairs:{self.rows},{self.cols}"
        return f"tok:{self.tokens}"


@dataclass
class ModelView:
    """What one model's forward gave, for the objective."""

    last_hidden: (
        Tensor | None
    )  # (B, T, H) final normed hidden state (what lm_head reads); None for a top-k-only teacher
    lm_head: nn.Module | None
    token_types: Tensor  # (B, T) this model's own token types
    hidden_states: tuple[Tensor, ...] | None = None  # output_hidden_states=True tuple
    attentions: tuple[Tensor, ...] | None = None  # output_attentions=True tuple, (B, heads, T, T) each
    image_features: Tensor | None = (
        None  # projector outputs (n_images, n_tok, H), flattened (n_images * n_tok, H) or a list per image
    )
    topk_ids: Tensor | None = None  # (B, T, k) sparse teacher: top-k token ids predicted at each position
    topk_logprobs: Tensor | None = None  # (B, T, k) their log-probs at T=1 (full-vocabulary normalised)


def llava_view(model: nn.Module, outputs: Any, token_types: Tensor) -> ModelView:
    """ModelView from a LlavaForConditionalGeneration and the output of its BASE model ``model.model(...)``.

    Call the base model (not ``model(...)``, which would build full (B, T, V) logits) with
    output_hidden_states / output_attentions as the objective's needs_* properties say.
    """
    image_outputs = getattr(outputs, "image_outputs", None)
    image_features = getattr(image_outputs, "pooler_output", None) if image_outputs is not None else None
    return ModelView(
        last_hidden=outputs.last_hidden_state,
        lm_head=model.lm_head,
        token_types=token_types,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        image_features=image_features,
    )


# ---------------------------------------------------------------- position helpers
def prediction_mask(token_types: Tensor, group: str) -> Tensor:
    """(B, T) positions whose next token is of the group and which are not padding."""
    next_in_group = torch.zeros_like(token_types, dtype=torch.bool)
    next_in_group[:, :-1] = type_mask(token_types[:, 1:], group)
    return next_in_group & (token_types != int(TokenType.PAD))


def shifted_labels(labels: Tensor) -> Tensor:
    """labels[t + 1] at position t (IGNORE_INDEX at the last position): the target of the logit at t."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def corresponding_positions(student_types: Tensor, teacher_types: Tensor) -> Tensor:
    """(B, T_s) teacher position of the token matching each student token (k-th of its type), -1 if none."""
    if student_types.shape[0] != teacher_types.shape[0]:
        raise ValueError(f"student batch has {student_types.shape[0]} samples, teacher batch {teacher_types.shape[0]}")
    mapping = torch.full_like(student_types, -1)
    for b in range(student_types.shape[0]):
        for token_type in (TokenType.IMAGE, TokenType.INSTRUCTION, TokenType.RESPONSE):
            s_pos = (student_types[b] == int(token_type)).nonzero().squeeze(1)
            t_pos = (teacher_types[b] == int(token_type)).nonzero().squeeze(1)
            if len(s_pos) == len(t_pos):
                mapping[b, s_pos] = t_pos
    return mapping


def _type_counts_message(student_types: Tensor, teacher_types: Tensor, b: int) -> str:
    parts = []
    for token_type in (TokenType.IMAGE, TokenType.INSTRUCTION, TokenType.RESPONSE):
        n_s = int((student_types[b] == int(token_type)).sum())
        n_t = int((teacher_types[b] == int(token_type)).sum())
        parts.append(f"{token_type.name.lower()} {n_s} vs {n_t}")
    return ", ".join(parts)


def _require_mapped(
    mapped: Tensor, rows_batch_index: Tensor, student_types: Tensor, teacher_types: Tensor, what: str
) -> None:
    bad = (mapped < 0).nonzero()
    if len(bad):
        b = int(rows_batch_index[bad[0, 0]])
        raise ValueError(
            f"{what}: sample {b} (index in batch) has no teacher counterpart for some selected positions; token counts "
            f"student vs teacher: {_type_counts_message(student_types, teacher_types, b)}. "
            "Text tokens must match one to "
            "one; image tokens of different counts are handled by visual_align / visual_self_corr / affinity only."
        )


def _text_width(config: Any) -> int:
    text = getattr(config, "text_config", None) or config
    width = getattr(text, "hidden_size", None)
    if width is None:
        raise ValueError(f"cannot read the hidden size from config {type(config).__name__}")
    return int(width)


def image_tokens_per_image(config: Any) -> int | None:
    """Image tokens one image expands to in a LLaVA config ((image_size/patch_size)^2, +1 for strategy 'full')."""
    vision = getattr(config, "vision_config", None)
    if vision is None or not hasattr(vision, "image_size") or not hasattr(vision, "patch_size"):
        return None
    n = (vision.image_size // vision.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n += 1
    return n


# ---------------------------------------------------------------- the objective
class DistillObjective(nn.Module):
    """CE plus weighted distillation terms routed to token types; owns the trainable projectors."""

    def __init__(
        self,
        terms: list[TermSpec],
        ce_weight: float = 1.0,
        student_config: Any = None,
        teacher_config: Any = None,
        chunk_size: int | None = 1024,
        student_tokens_per_image: int | None = None,
        teacher_tokens_per_image: int | None = None,
    ) -> None:
        super().__init__()
        self.terms = [
            t if isinstance(t, TermSpec) else TermSpec.from_dict(t, f"distill.terms[{i}]") for i, t in enumerate(terms)
        ]
        self.ce_weight = float(ce_weight)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(
                f"chunk_size must be a positive number of positions or None (plain path), got {chunk_size}"
            )
        self.chunk_size = chunk_size
        if self.terms and teacher_config is None:
            raise ValueError(
                f"distillation terms {[t.name for t in self.terms]} need a teacher_config (a teacher model)"
            )
        self.student_tokens_per_image = student_tokens_per_image or (
            image_tokens_per_image(student_config) if student_config is not None else None
        )
        self.teacher_tokens_per_image = teacher_tokens_per_image or (
            image_tokens_per_image(teacher_config) if teacher_config is not None else None
        )

        names = [t.name for t in self.terms]
        self.term_labels = [t.name if names.count(t.name) == 1 else f"{t.name}[{i}]" for i, t in enumerate(self.terms)]
        self.projectors = nn.ModuleDict()
        for i, term in enumerate(self.terms):
            if term.name in ("hidden_mse", "visual_align"):
                if student_config is None:
                    raise ValueError(f"term {term.name!r} builds a projector: pass student_config")
                kind = term.options.get("projector", "mlp")
                d_s, d_t = _text_width(student_config), _text_width(teacher_config)
                n_maps = len(term.options.get("layers", [None]))
                self.projectors[self._projector_key(i)] = nn.ModuleList(
                    build_projector(kind, d_s, d_t) for _ in range(n_maps)
                )

    @staticmethod
    def _projector_key(term_index: int) -> str:
        return f"term{term_index}"

    # ---- what the trainer must ask the models for
    @property
    def needs_teacher(self) -> bool:
        """Whether any term reads the teacher."""
        return bool(self.terms)

    @property
    def needs_hidden_states(self) -> bool:
        """Whether output_hidden_states=True is needed (a term reads a layer other than the last)."""
        for t in self.terms:
            if "layers" in t.options or ("layer" in t.options and t.name != "attention"):
                return True
        return False

    @property
    def needs_attentions(self) -> bool:
        """Whether output_attentions=True (eager attention) is needed."""
        return any(t.name == "attention" for t in self.terms)

    @property
    def needs_image_features(self) -> bool:
        """Whether the projector outputs (image_features) are read."""
        return any(t.options.get("source") == "projector" for t in self.terms)

    @property
    def has_logit_terms(self) -> bool:
        """Whether any term compares logits (then teacher and student must share a tokenizer)."""
        return any(t.is_logit_term for t in self.terms)

    @property
    def selection_keys(self) -> list[str]:
        """Normaliser keys ``forward`` needs."""
        keys = ["ce"] if self.ce_weight != 0 else []
        for t in self.terms:
            if t.selection_key not in keys:
                keys.append(t.selection_key)
        return keys

    def check_tokenizers(self, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        """Raise if logit terms are used with tokenizers of different vocabularies."""
        if self.has_logit_terms:
            check_same_tokenizer(student_tokenizer, teacher_tokenizer)

    # ---- normalisers
    def count_positions(self, token_types_student: Tensor, labels: Tensor) -> dict[str, float]:
        """Per selection key, the number of positions (or entries) this micro-batch contributes."""
        counts: dict[str, float] = {}
        for key in self.selection_keys:
            if key == "ce":
                counts[key] = float((shifted_labels(labels) != IGNORE_INDEX).sum())
            elif key.startswith("pred:"):
                counts[key] = float(prediction_mask(token_types_student, key[5:]).sum())
            elif key.startswith("tok:"):
                counts[key] = float(type_mask(token_types_student, key[4:]).sum())
            else:  # pairs:<rows>,<cols>
                rows, cols = key[6:].split(",")
                n_rows = type_mask(token_types_student, rows).sum(dim=1)
                n_cols = type_mask(token_types_student, cols).sum(dim=1)
                counts[key] = float((n_rows * n_cols).sum())
        return counts

    # ---- the loss
    def forward(
        self, student: ModelView, teacher: ModelView | None, labels: Tensor, normalizers: dict[str, float] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and each term's (unweighted, detached) value; sums divided by the global normalisers."""
        if self.terms and teacher is None:
            raise ValueError(f"terms {self.term_labels} need the teacher's outputs; got teacher=None")
        if normalizers is None:
            normalizers = self.count_positions(student.token_types, labels)
        missing = [k for k in self.selection_keys if k not in normalizers]
        if missing:
            raise ValueError(f"normalizers lack key(s) {missing}; pass the summed output of count_positions")

        device = student.token_types.device
        if teacher is not None and teacher.token_types.device != device:
            # the teacher may live on another device: bring its (small) type map here; its tensors move when read
            teacher = replace(teacher, token_types=teacher.token_types.to(device))
        sums = self._logit_sums(student, teacher, labels)
        for i, term in enumerate(self.terms):
            if not term.is_logit_term:
                sums[self.term_labels[i]] = self._term_sum(i, term, student, teacher)

        zero = student.last_hidden.sum() * 0.0  # keeps the graph connected when nothing is selected
        total = zero
        logged: dict[str, Tensor] = {}
        if self.ce_weight != 0:
            ce = sums["ce"] / max(float(normalizers["ce"]), 1.0)
            total = total + self.ce_weight * ce
            logged["ce"] = ce.detach()
        for term, label in zip(self.terms, self.term_labels):
            value = sums[label] / max(float(normalizers[term.selection_key]), 1.0)
            total = total + term.weight * value
            logged[label] = value.detach()
        return total, logged

    # ---- logit terms and CE: one shared chunked pass
    def _logit_sums(self, student: ModelView, teacher: ModelView | None, labels: Tensor) -> dict[str, Tensor]:
        logit_terms = [(label, t) for label, t in zip(self.term_labels, self.terms) if t.is_logit_term]
        slots: list[tuple[str, TermSpec | None]] = ([("ce", None)] if self.ce_weight != 0 else []) + logit_terms
        if not slots:
            return {}
        if student.last_hidden is None or student.lm_head is None:
            raise ValueError("CE and logit terms need the student's last_hidden and lm_head")
        types_s = student.token_types
        device = student.last_hidden.device
        batch, length, width = student.last_hidden.shape
        targets = shifted_labels(labels)
        masks = [
            targets != IGNORE_INDEX if term is None else prediction_mask(types_s, term.tokens) for _, term in slots
        ]
        member_full = torch.stack(masks, dim=-1).reshape(batch * length, len(slots))
        rows = member_full.any(dim=-1).nonzero().squeeze(1)
        member = member_full[rows]
        hidden_s = student.last_hidden.reshape(batch * length, width)[rows]
        row_targets = targets.reshape(-1)[rows]

        teacher_inputs: tuple[Tensor, ...] = ()
        sparse = False
        if logit_terms:
            sparse = teacher.last_hidden is None
            if sparse and (teacher.topk_ids is None or teacher.topk_logprobs is None):
                raise ValueError(
                    "logit terms need the teacher's last_hidden + lm_head, or its topk_ids + topk_logprobs"
                )
            if sparse:
                dense_only = [t.name for _, t in logit_terms if t.name not in SPARSE_DIVERGENCES]
                if dense_only:
                    raise ValueError(
                        f"terms {dense_only} need dense teacher logits; a top-k teacher supports only "
                        f"{sorted(SPARSE_DIVERGENCES)}"
                    )
            types_t = teacher.token_types
            t_len = types_t.shape[1]
            token_map = corresponding_positions(types_s, types_t)
            pred_map = torch.full_like(token_map, -1)  # prediction position t maps to (teacher position of t+1) - 1
            nxt = token_map[:, 1:]
            pred_map[:, :-1] = torch.where(nxt >= 0, nxt - 1, nxt)
            flat_t = (pred_map + torch.arange(batch, device=pred_map.device).unsqueeze(1) * t_len).where(
                pred_map >= 0, pred_map
            )
            rows_t = flat_t.reshape(-1)[rows]
            needs_teacher_row = member[:, (1 if self.ce_weight != 0 else 0) :].any(dim=-1)
            _require_mapped(
                rows_t[needs_teacher_row], (rows // length)[needs_teacher_row], types_s, types_t, "logit terms"
            )
            rows_t = rows_t.clamp_min(0)
            if sparse:
                k = teacher.topk_ids.shape[-1]
                where = teacher.topk_ids.device
                teacher_inputs = (
                    teacher.topk_ids.reshape(batch * t_len, k)[rows_t.to(where)].to(device),
                    teacher.topk_logprobs.reshape(batch * t_len, k)[rows_t.to(where)].detach().to(device),
                )
            else:  # rows stay on the teacher's device (its lm_head runs there)
                t_hidden = teacher.last_hidden.detach()
                teacher_inputs = (t_hidden.reshape(batch * t_len, -1)[rows_t.to(t_hidden.device)],)

        def chunk_sums(
            hidden_chunk: Tensor, target_chunk: Tensor, member_chunk: Tensor, *teacher_chunk: Tensor
        ) -> Tensor:
            logits_s = student.lm_head(hidden_chunk).float()
            if teacher_chunk and not sparse:
                with torch.no_grad():
                    logits_t = teacher.lm_head(teacher_chunk[0]).float().to(logits_s.device)
                if logits_t.shape[-1] != logits_s.shape[-1]:
                    raise ValueError(
                        f"student vocabulary {logits_s.shape[-1]} != teacher vocabulary {logits_t.shape[-1]}: "
                        "logit terms need a "
                        "shared tokenizer and LM head size"
                    )
            out = []
            for j, (_, term) in enumerate(slots):
                sel = member_chunk[:, j]
                if not bool(sel.any()):  # this chunk has no row of this slot
                    out.append(logits_s.sum() * 0.0)
                    continue
                if term is None:
                    out.append(F.cross_entropy(logits_s[sel], target_chunk[sel], reduction="sum"))
                    continue
                options = dict(term.options)
                if sparse:
                    out.append(
                        SPARSE_DIVERGENCES[term.name](
                            logits_s[sel], teacher_chunk[0][sel], teacher_chunk[1][sel], **options
                        ).sum()
                    )
                else:
                    options.pop("missing_mass", None)  # only meaningful for a top-k teacher
                    out.append(DIVERGENCES[term.name](logits_s[sel], logits_t[sel], **options).sum())
            return torch.stack(out)

        n_rows = rows.shape[0]
        totals = student.last_hidden.new_zeros(len(slots), dtype=torch.float32) + student.last_hidden.sum() * 0.0
        step = self.chunk_size or max(n_rows, 1)
        for start in range(0, n_rows, step):
            args = (hidden_s[start : start + step], row_targets[start : start + step], member[start : start + step])
            args += tuple(x[start : start + step] for x in teacher_inputs)
            if self.chunk_size is None:
                totals = totals + chunk_sums(*args)
            else:
                # recompute the chunk's logits in backward instead of storing them
                totals = totals + checkpoint(chunk_sums, *args, use_reentrant=False)
        return {label: totals[j] for j, (label, _) in enumerate(slots)}

    # ---- hidden and relation terms
    def _states(self, view: ModelView, layer: int | None, who: str, term: str) -> Tensor:
        if layer is None:
            if view.last_hidden is None:
                raise ValueError(f"term {term!r} needs the {who}'s last_hidden")
            return view.last_hidden
        if view.hidden_states is None:
            raise ValueError(f"term {term!r} reads layer {layer}: run the {who} with output_hidden_states=True")
        try:
            return view.hidden_states[layer]
        except IndexError:
            raise ValueError(
                f"term {term!r}: layer {layer} out of range for the {who}'s {len(view.hidden_states)} hidden states"
            ) from None

    def _image_tokens(self, view: ModelView, term: TermSpec, who: str, per_image: int | None) -> Tensor:
        """(n_images, n_tok, H) image tokens of one model for a visual term."""
        if term.options.get("source", "hidden") == "projector":
            feats = view.image_features
            if feats is None:
                raise ValueError(f"term {term.name!r} with source 'projector' needs the {who}'s image_features")
            if isinstance(feats, (list, tuple)):  # transformers' image_outputs.pooler_output: one (n_tok, H) per image
                feats = torch.stack(list(feats))
            if feats.dim() == 3:
                return feats
            tokens = feats
        else:
            states = self._states(view, term.options.get("layer"), who, term.name)
            tokens = states[type_mask(view.token_types, "image").to(states.device)]
        if per_image is None:
            raise ValueError(
                f"term {term.name!r}: unknown image tokens per image for the {who}; pass a LLaVA config or "
                f"{who}_tokens_per_image to DistillObjective"
            )
        if tokens.shape[0] % per_image:
            raise ValueError(
                f"the {who} has {tokens.shape[0]} image tokens, not a multiple of {per_image} tokens per image"
            )
        return tokens.reshape(tokens.shape[0] // per_image, per_image, tokens.shape[-1])

    def _term_sum(self, index: int, term: TermSpec, student: ModelView, teacher: ModelView) -> Tensor:
        o = term.options
        types_s, types_t = student.token_types, teacher.token_types
        if term.name == "hidden_mse":
            mask = type_mask(types_s, term.tokens)
            flat_rows = mask.reshape(-1).nonzero().squeeze(1)
            token_map = corresponding_positions(types_s, types_t)
            t_len = types_t.shape[1]
            batch_index = flat_rows // types_s.shape[1]
            mapped = token_map.reshape(-1)[flat_rows]
            _require_mapped(mapped, batch_index, types_s, types_t, f"term {term.name!r}")
            rows_t = batch_index * t_len + mapped
            pairs = o.get("layers", [[None, None]])
            total = student.last_hidden.new_zeros((), dtype=torch.float32)
            for projector, (layer_s, layer_t) in zip(self.projectors[self._projector_key(index)], pairs):
                s = self._states(student, layer_s, "student", term.name)
                t = self._states(teacher, layer_t, "teacher", term.name).detach().to(s.device)
                s_rows = s.reshape(-1, s.shape[-1])[flat_rows]
                t_rows = t.reshape(-1, t.shape[-1])[rows_t]
                total = total + token_alignment_loss(s_rows, t_rows, projector, o.get("loss", "mse")).sum()
            return total / len(pairs)  # averaged over layer pairs: the weight means the same for any number of layers

        if term.name in VISUAL_TERMS:
            if not bool((types_s == int(TokenType.IMAGE)).any()):  # text-only micro-batch: nothing to align
                return student.last_hidden.sum() * 0.0
            s_tokens = self._image_tokens(student, term, "student", self.student_tokens_per_image)
            t_tokens = (
                self._image_tokens(teacher, term, "teacher", self.teacher_tokens_per_image).detach().to(s_tokens.device)
            )
            if s_tokens.shape[0] != t_tokens.shape[0]:
                raise ValueError(
                    f"term {term.name!r}: student has {s_tokens.shape[0]} images, teacher {t_tokens.shape[0]}"
                )
            pooled = pool_image_tokens(t_tokens, s_tokens.shape[1])
            if term.name == "visual_align":
                projector = self.projectors[self._projector_key(index)][0]
                n_img, n_tok, _ = s_tokens.shape
                return token_alignment_loss(
                    s_tokens.reshape(n_img * n_tok, -1),
                    pooled.reshape(n_img * n_tok, -1),
                    projector,
                    o.get("loss", "mse"),
                ).sum()
            total = student.last_hidden.new_zeros((), dtype=torch.float32)
            for s_img, t_img in zip(s_tokens, pooled):
                total = total + visual_self_correlation_loss(s_img, t_img).sum()
            return total

        if term.name == "affinity":
            s_states = self._states(student, o.get("layer"), "student", term.name)
            t_states = self._states(teacher, o.get("layer"), "teacher", term.name).detach().to(s_states.device)
            total = student.last_hidden.new_zeros((), dtype=torch.float32)
            for b in range(types_s.shape[0]):
                parts = []
                for group in (term.rows, term.cols):
                    s_sel = s_states[b][type_mask(types_s[b], group)]
                    t_sel = t_states[b][type_mask(types_t[b], group)]
                    if s_sel.shape[0] != t_sel.shape[0]:
                        t_sel = self._pool_sample_images(t_sel, s_sel.shape[0], group, term.name, b)
                    parts.append((s_sel, t_sel))
                (s_rows, t_rows), (s_cols, t_cols) = parts
                total = total + affinity_squared_errors(s_rows, s_cols, t_rows, t_cols).sum()
            return total

        if term.name == "attention":
            layer = o.get("layer", -1)
            if student.attentions is None or teacher.attentions is None:
                raise ValueError(
                    "term 'attention' needs output_attentions=True (attn_implementation='eager') for both models"
                )
            a_s = student.attentions[layer]
            a_t = teacher.attentions[layer].detach().to(a_s.device)
            total = student.last_hidden.new_zeros((), dtype=torch.float32)
            for b in range(types_s.shape[0]):
                idx = {}
                for who, types in (("student", types_s), ("teacher", types_t)):
                    idx[who] = (
                        type_mask(types[b], term.rows).nonzero().squeeze(1),
                        type_mask(types[b], term.cols).nonzero().squeeze(1),
                    )
                if [len(i) for i in idx["student"]] != [len(i) for i in idx["teacher"]]:
                    raise ValueError(
                        f"term 'attention': sample {b} (index in batch) has different {term.rows} x {term.cols} "
                        f"counts in student and teacher ({_type_counts_message(types_s, types_t, b)}); "
                        "attention alignment needs equal counts"
                    )
                rs, cs = idx["student"]
                rt, ct = idx["teacher"]
                block_s = a_s[b][:, rs][:, :, cs]
                block_t = a_t[b][:, rt][:, :, ct]
                total = total + attention_loss(block_s, block_t, o.get("loss", "mse")).sum()
            return total
        raise AssertionError(f"unhandled term {term.name}")  # TermSpec validation makes this unreachable

    def _pool_sample_images(self, teacher_tokens: Tensor, n_student: int, group: str, term: str, b: int) -> Tensor:
        """Pool one sample's teacher image tokens to the student's count (group must be 'image')."""
        if group != "image" or self.teacher_tokens_per_image is None or self.student_tokens_per_image is None:
            raise ValueError(
                f"term {term!r}: sample {b} (index in batch) has {teacher_tokens.shape[0]} teacher vs "
                f"{n_student} student "
                f"tokens in group {group!r}; only the 'image' group can differ (pooled per image)"
            )
        n_images = teacher_tokens.shape[0] // self.teacher_tokens_per_image
        grid_side(self.teacher_tokens_per_image, "teacher")
        per_image = teacher_tokens.reshape(n_images, self.teacher_tokens_per_image, -1)
        return pool_image_tokens(per_image, self.student_tokens_per_image).reshape(n_student, -1)


# ---------------------------------------------------------------- normalisers across micro-batches and processes
def sum_counts(counts: list[dict[str, float]]) -> dict[str, float]:
    """Per-key sum of count_positions results (the micro-batches of one accumulation window)."""
    total: dict[str, float] = {}
    for c in counts:
        for key, value in c.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


def all_reduce_counts(counts: dict[str, float]) -> dict[str, float]:
    """Sum per-key counts over all processes of torch.distributed (unchanged when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(counts)
    keys = sorted(counts)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return {k: float(v) for k, v in zip(keys, values.tolist())}


# ---------------------------------------------------------------- tokenizer check and projector I/O
def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise ValueError if the two tokenizers' vocabularies (token -> id) differ."""
    vocab_s, vocab_t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vocab_s == vocab_t:
        return
    only_s = sorted(set(vocab_s) - set(vocab_t))
    only_t = sorted(set(vocab_t) - set(vocab_s))
    moved = sorted(tok for tok in set(vocab_s) & set(vocab_t) if vocab_s[tok] != vocab_t[tok])
    details = []
    if only_s:
        details.append(f"{len(only_s)} token(s) only in the student's, e.g. {only_s[:5]}")
    if only_t:
        details.append(f"{len(only_t)} token(s) only in the teacher's, e.g. {only_t[:5]}")
    if moved:
        details.append(
            f"{len(moved)} token(s) with different ids, e.g. {[(t, vocab_s[t], vocab_t[t]) for t in moved[:5]]}"
        )
    raise ValueError(
        "logit distillation needs teacher and student to share one tokenizer; cross-tokenizer KD is not supported yet. "
        f"Vocabularies differ (student {len(vocab_s)}, teacher {len(vocab_t)} tokens): "
        + "; ".join(details)
        + ". Use the same tokenizer for both, or drop the logit terms (keep hidden/relation terms)."
    )


def save_objective(objective: DistillObjective, directory: str | os.PathLike) -> str:
    """Write the objective's projector weights to <directory>/distill_projectors.safetensors; return the path."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PROJECTOR_FILE)
    state = {k: v.detach().contiguous().cpu() for k, v in objective.state_dict().items()}
    save_file(state, path, metadata={"terms": ",".join(objective.term_labels)})
    return path


def load_objective(objective: DistillObjective, directory: str | os.PathLike) -> DistillObjective:
    """Load projector weights saved by save_objective into an objective built from the same recipe."""
    from safetensors.torch import load_file

    path = os.path.join(directory, PROJECTOR_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: no distillation projectors were saved in {directory}")
    state = load_file(path)
    expected = set(objective.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"{path} does not match this recipe's projectors: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    device = next(objective.parameters()).device if any(True for _ in objective.parameters()) else "cpu"
    objective.load_state_dict({k: v.to(device) for k, v in state.items()})
    return objective
