"""State alignment terms: hidden states (token alignment) and image tokens (visual alignment).

- ``hidden_mse`` (LLaVADI's token alignment): the student's hidden states at the tokens of its
  group, mapped to the teacher's width by a trainable projector (default Linear-GELU-Linear),
  against the teacher's states of the corresponding tokens; MSE or cosine distance per token.
  With different tokenizers (answer spans paired by the data) it compares, per paired span, the
  states at the span's last token on each side: both models have then read the same text.
- ``visual_align``: the student's image tokens (LLM states or projector outputs) against the
  teacher's, whose grid per image is pooled to the student's; through a projector. A fixed-count
  family (LLaVA-1.5) has a square grid per image; a dynamic-resolution family (Qwen2-VL) gives
  each image's (rows, cols) grid (``ModelView.image_grids``): the k-th image of the teacher's
  batch is adaptive-average-pooled from its grid to the k-th student image's grid. Any-resolution
  families (LLaVA-NeXT, LLaVA-OneVision) lay an image out as a base tile, tiles and row newlines:
  their image tokens are compared one to one, and an image with different counts in the two
  models is refused (no spatial pooling rule holds for that layout).
- ``visual_self_corr`` (LLaVA-KD's RDist): per image, the self-similarity matrices of the image
  tokens of the two models, compared row by row (1 - cos).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llavadi.data.token_types import TokenType, type_mask
from llavadi.distill.hidden import (
    ALIGNMENT_LOSSES,
    PROJECTOR_KINDS,
    build_projector,
    pool_image_grid,
    pool_image_tokens,
    token_alignment_loss,
)
from llavadi.distill.options import LAYER_PAIRS, Option
from llavadi.distill.positions import teacher_rows
from llavadi.distill.relation import visual_self_correlation_loss
from llavadi.distill.selection import Selection, Tokens
from llavadi.distill.terms.base import Term, register
from llavadi.distill.view import ModelView, Needs

Tensor = torch.Tensor

PROJECTOR = Option("projector", str, "mlp", "map from the student's width to the teacher's: Linear-GELU-Linear, "
                   "Linear, or identity (equal widths)", choices=PROJECTOR_KINDS)
LOSS = Option("loss", str, "mse", "per-token distance: mean squared error or 1 - cosine", choices=ALIGNMENT_LOSSES)
LAYERS = Option("layers", LAYER_PAIRS, None, "[[student_layer, teacher_layer], ...] hidden-state indices "
                "(0 embeddings, -1 last); one projector per pair, loss averaged over pairs; default: the last")
SOURCE = Option("source", str, "hidden", "image tokens from the LLM's hidden states or from the multimodal "
                "projector's outputs", choices=("hidden", "projector"))
LAYER = Option("layer", int, None, "hidden-state index read when source is 'hidden' (default: the last)")


def _widths(term: Term) -> tuple[int, int]:
    if term.ctx.student_width is None or term.ctx.teacher_width is None:
        raise ValueError(f"term {term.name!r} builds a projector: the student's and teacher's hidden widths are needed")
    return term.ctx.student_width, term.ctx.teacher_width


@register
class HiddenMSE(Term):
    """Token alignment of hidden states through a trainable projector."""

    name = "hidden_mse"
    summary = "hidden states of the group's tokens, student projected to the teacher's width"
    options = (LAYERS, PROJECTOR, LOSS)

    @classmethod
    def across_tokenizers(cls, tokens, opts):
        if tokens in ("response", "image"):
            return None
        return (f"reads {tokens!r} tokens, whose prompts differ between the two tokenizations; across tokenizers "
                "it reads the paired answer spans (tokens: response) or the image tokens")

    @classmethod
    def pairs_answer_tokens(cls, tokens, opts):
        return tokens == "response"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pairs = self.opts["layers"] or ((None, None),)
        d_s, d_t = _widths(self)
        self.projectors = nn.ModuleList(build_projector(self.opts["projector"], d_s, d_t) for _ in self.pairs)

    def selection(self) -> Selection:
        return Tokens(self.tokens)

    def student_needs(self) -> Needs:
        return Needs(last_hidden=True, hidden_layers=frozenset(s for s, _ in self.pairs if s is not None))

    def teacher_needs(self) -> Needs:
        return Needs(last_hidden=True, hidden_layers=frozenset(t for _, t in self.pairs if t is not None))

    def forward(self, student: ModelView, teacher: ModelView) -> Tensor:
        types_s = student.token_types.cpu()  # row bookkeeping on the host: one copy of the type map, no further sync
        paired = getattr(teacher, "alignment", None)
        if paired is not None and self.tokens == "response":
            flat_rows, rows_t = paired.span_ends(types_s.shape[1], teacher.token_types.shape[1])
        else:
            flat_rows = type_mask(types_s, self.tokens).reshape(-1).nonzero().squeeze(1)
            rows_t = teacher_rows(types_s, teacher.token_types.cpu(), flat_rows, f"term {self.label!r}")
        total = self.zero(student)
        for projector, (layer_s, layer_t) in zip(self.projectors, self.pairs):
            s = student.hidden(layer_s, self.name)
            t = teacher.hidden(layer_t, self.name).detach()
            s_rows = s.reshape(-1, s.shape[-1])[flat_rows.to(s.device)]
            t_rows = t.reshape(-1, t.shape[-1])[rows_t.to(t.device)].to(s.device)
            total = total + token_alignment_loss(s_rows, t_rows, projector, self.opts["loss"]).sum()
        return total / len(self.pairs)  # averaged over pairs: the weight means the same for any number of layers


class _VisualTerm(Term):
    """Shared by the visual terms: image tokens of each model, per image."""

    default_tokens = "image"
    allowed_tokens = ("image",)

    @classmethod
    def across_tokenizers(cls, tokens, opts):
        return None  # image tokens do not depend on the tokenizer

    @classmethod
    def check(cls, tokens, opts, given, where):
        if opts["source"] == "projector" and "layer" in given:
            raise ValueError(f"{where}: `layer` applies to source 'hidden' only")

    def selection(self) -> Selection:
        return Tokens("image")

    def _needs(self) -> Needs:
        if self.opts["source"] == "projector":
            return Needs(image_features=True)
        return Needs.layer(self.opts["layer"])

    def student_needs(self) -> Needs:
        return self._needs()

    def teacher_needs(self) -> Needs:
        return self._needs()

    def image_tokens(self, view: ModelView, per_image: int | None) -> Tensor:
        """(n_images, n_tok, H) image tokens of one model."""
        if self.opts["source"] == "projector":
            if view.image_features is None:
                raise ValueError(f"term {self.name!r} with source 'projector' needs the {view.who}'s image features")
            return view.image_features
        states = view.hidden(self.opts["layer"], self.name)
        tokens = states[type_mask(view.token_types, "image").to(states.device)]
        if per_image is None:
            raise ValueError(f"term {self.name!r}: the {view.who}'s image tokens per image are unknown")
        if tokens.shape[0] % per_image:
            raise ValueError(f"the {view.who} has {tokens.shape[0]} image tokens, not a multiple of {per_image} per image")
        return tokens.reshape(tokens.shape[0] // per_image, per_image, tokens.shape[-1])

    def gridded_tokens(self, view: ModelView) -> tuple[list[Tensor], list[tuple[int, int]]]:
        """Each image's (rows * cols, H) tokens and its (rows, cols) grid, for a view that states its grids."""
        if self.opts["source"] == "projector":
            raise ValueError(f"term {self.name!r}: source 'projector' reads fixed-count image grids; the "
                             f"{view.who}'s images have per-image grids (use source 'hidden')")
        states = view.hidden(self.opts["layer"], self.name)
        tokens = states[type_mask(view.token_types, "image").to(states.device)]
        counts = [rows * cols for rows, cols in view.image_grids]
        if sum(counts) != tokens.shape[0]:
            raise ValueError(f"the {view.who} has {tokens.shape[0]} image tokens but its image grids "
                             f"{view.image_grids} hold {sum(counts)}")
        return list(tokens.split(counts)), list(view.image_grids)

    def paired_image_list(self, student: ModelView, teacher: ModelView) -> list[tuple[Tensor, Tensor]]:
        """Per image, the student's tokens and the teacher's pooled to the student's grid (n_s, H) each."""
        if student.image_grids is None and teacher.image_grids is None:
            return list(zip(*self.paired_images(student, teacher)))
        if student.image_grids is None or teacher.image_grids is None:
            raise ValueError(f"term {self.name!r}: one model states per-image grids and the other does not; "
                             "visual alignment needs both models' image grids")
        s_list, s_grids = self.gridded_tokens(student)
        t_list, t_grids = self.gridded_tokens(teacher)
        if len(s_list) != len(t_list):
            raise ValueError(f"term {self.name!r}: student has {len(s_list)} images, teacher {len(t_list)}")
        for k, (s_grid, t_grid) in enumerate(zip(s_grids, t_grids)):
            if s_grid != t_grid and not (student.spatial_grids and teacher.spatial_grids):
                raise ValueError(f"term {self.name!r}: image {k} of the batch has {s_grid[0] * s_grid[1]} student and "
                                 f"{t_grid[0] * t_grid[1]} teacher tokens laid out as any-resolution tiles, which "
                                 "are compared one to one; give both models the same vision tower input size and "
                                 "grid pinpoints")
        return [(s, pool_image_grid(t.detach().to(s.device), t_grid, s_grid))
                for s, t, s_grid, t_grid in zip(s_list, t_list, s_grids, t_grids)]

    def paired_images(self, student: ModelView, teacher: ModelView) -> tuple[Tensor, Tensor]:
        """Student image tokens and the teacher's pooled to the student's grid, (n_images, n_s, H) each."""
        s_tokens = self.image_tokens(student, self.ctx.student_tokens_per_image)
        t_tokens = self.image_tokens(teacher, self.ctx.teacher_tokens_per_image).detach().to(s_tokens.device)
        if s_tokens.shape[0] != t_tokens.shape[0]:
            raise ValueError(f"term {self.name!r}: student has {s_tokens.shape[0]} images, teacher {t_tokens.shape[0]}")
        return s_tokens, pool_image_tokens(t_tokens, s_tokens.shape[1])

    @staticmethod
    def has_images(student: ModelView) -> bool:
        """Whether the micro-batch has any image token (text-only batches have nothing to align)."""
        return bool((student.token_types == int(TokenType.IMAGE)).any())


@register
class VisualAlign(_VisualTerm):
    """Visual-token alignment across different image-token counts, through a trainable projector."""

    name = "visual_align"
    summary = "image tokens, teacher grid pooled to the student's, student projected"
    options = (SOURCE, LAYER, PROJECTOR, LOSS)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        d_s, d_t = _widths(self)  # projector outputs and LLM states have the same (LLM) width
        self.projectors = nn.ModuleList([build_projector(self.opts["projector"], d_s, d_t)])

    def forward(self, student: ModelView, teacher: ModelView) -> Tensor:
        if not self.has_images(student):
            return self.zero(student)
        pairs = self.paired_image_list(student, teacher)
        s_rows = torch.cat([s for s, _ in pairs])
        t_rows = torch.cat([t for _, t in pairs])
        return token_alignment_loss(s_rows, t_rows, self.projectors[0], self.opts["loss"]).sum()


@register
class VisualSelfCorr(_VisualTerm):
    """LLaVA-KD's relation distillation: self-similarity of each image's tokens."""

    name = "visual_self_corr"
    summary = "per image, rows of the image tokens' self-similarity matrix (1 - cos)"
    options = (SOURCE, LAYER)

    def forward(self, student: ModelView, teacher: ModelView) -> Tensor:
        if not self.has_images(student):
            return self.zero(student)
        total = self.zero(student)
        for s_img, t_img in self.paired_image_list(student, teacher):
            total = total + visual_self_correlation_loss(s_img, t_img).sum()
        return total
