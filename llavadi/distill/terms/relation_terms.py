"""Relation terms: affinity (cosine-similarity) matrices and attention maps, per sample.

Both compare a (rows x columns) matrix per sample, rows and columns being the tokens of two
token-type groups (options ``rows`` / ``cols``; these terms take no ``tokens``). Widths may
differ between the models. Image tokens of different counts are pooled for affinity; attention
needs equal counts.
"""

from __future__ import annotations

import torch

from llavadi.data.token_types import type_mask
from llavadi.distill.options import GROUP, Option
from llavadi.distill.positions import pool_sample_images, type_counts_message
from llavadi.distill.relation import ATTENTION_LOSSES, affinity_squared_errors, attention_loss
from llavadi.distill.selection import Pairs, Selection, Tokens
from llavadi.distill.terms.base import Term, register
from llavadi.distill.view import ModelView, Needs

Tensor = torch.Tensor


def _image_only(opts: dict) -> str | None:
    """None when a relation term's rows and columns are image tokens (the same under any tokenizer)."""
    if opts["rows"] == "image" and opts["cols"] == "image":
        return None
    return (f"compares a {opts['rows']} x {opts['cols']} matrix whose text tokens differ in number and position "
            "between two tokenizations; across tokenizers set rows and cols to image")


@register
class Affinity(Term):
    """LLaVADI's affinity alignment: cosine similarities between rows' and columns' hidden states."""

    name = "affinity"
    summary = "per sample, the rows x cols cosine-similarity matrix of hidden states (squared error per entry)"
    default_tokens = None
    options = (
        Option("rows", GROUP, "image", "token group of the matrix rows"),
        Option("cols", GROUP, "response", "token group of the matrix columns"),
        Option("layer", int, None, "hidden-state index (default: the last)"),
    )

    @classmethod
    def across_tokenizers(cls, tokens, opts):
        return _image_only(opts)

    def selection(self) -> Selection:
        return Pairs(self.opts["rows"], self.opts["cols"])

    def student_needs(self) -> Needs:
        return Needs.layer(self.opts["layer"])

    def teacher_needs(self) -> Needs:
        return Needs.layer(self.opts["layer"])

    def forward(self, student: ModelView, teacher: ModelView) -> Tensor:
        s_states = student.hidden(self.opts["layer"], self.name)
        t_states = teacher.hidden(self.opts["layer"], self.name).detach().to(s_states.device)
        types_s, types_t = student.token_types, teacher.token_types
        per_image = (self.ctx.student_tokens_per_image, self.ctx.teacher_tokens_per_image)
        total = self.zero(student)
        for b in range(types_s.shape[0]):
            parts = []
            for group in (self.opts["rows"], self.opts["cols"]):
                s_sel = s_states[b][type_mask(types_s[b], group)]
                t_sel = t_states[b][type_mask(types_t[b], group)]
                if s_sel.shape[0] != t_sel.shape[0]:
                    t_sel = pool_sample_images(t_sel, s_sel.shape[0], per_image, group, self.name, b)
                parts.append((s_sel, t_sel))
            (s_rows, t_rows), (s_cols, t_cols) = parts
            total = total + affinity_squared_errors(s_rows, s_cols, t_rows, t_cols).sum()
        return total


@register
class Attention(Term):
    """Attention-map alignment of one decoder layer, restricted to rows x cols token groups."""

    name = "attention"
    summary = "attention maps of one layer on rows x cols (squared error per entry, or KL per row)"
    default_tokens = None
    options = (
        Option("rows", GROUP, "response", "token group of the attending positions (rows)"),
        Option("cols", GROUP, "image", "token group of the attended positions (columns)"),
        Option("layer", int, -1, "decoder layer index (-1: the last)"),
        Option("loss", str, "mse", "squared error per entry, or KL(teacher row || student row) over the chosen "
               "columns (rows renormalised)", choices=ATTENTION_LOSSES),
    )

    @classmethod
    def across_tokenizers(cls, tokens, opts):
        return _image_only(opts)

    def selection(self) -> Selection:
        if self.opts["loss"] == "mse":
            return Pairs(self.opts["rows"], self.opts["cols"])
        return Tokens(self.opts["rows"])

    def student_needs(self) -> Needs:
        return Needs(attention_layers=frozenset({self.opts["layer"]}))

    def teacher_needs(self) -> Needs:
        return Needs(attention_layers=frozenset({self.opts["layer"]}))

    def _indices(self, types: Tensor, b: int) -> tuple[Tensor, Tensor]:
        rows = type_mask(types[b], self.opts["rows"]).nonzero().squeeze(1)
        cols = type_mask(types[b], self.opts["cols"]).nonzero().squeeze(1)
        return rows, cols

    def forward(self, student: ModelView, teacher: ModelView) -> Tensor:
        a_s = student.attention(self.opts["layer"], self.name)
        a_t = teacher.attention(self.opts["layer"], self.name).detach().to(a_s.device)
        types_s, types_t = student.token_types, teacher.token_types
        total = self.zero(student) + a_s.sum() * 0.0
        for b in range(types_s.shape[0]):
            rs, cs = self._indices(types_s, b)
            rt, ct = self._indices(types_t, b)
            if (len(rs), len(cs)) != (len(rt), len(ct)):
                raise ValueError(
                    f"term 'attention': sample {b} (index in batch) has different {self.opts['rows']} x "
                    f"{self.opts['cols']} counts in student and teacher "
                    f"({type_counts_message(types_s, types_t, b)}); attention alignment needs equal counts"
                )
            block_s = a_s[b][:, rs][:, :, cs]
            block_t = a_t[b][:, rt][:, :, ct]
            total = total + attention_loss(block_s, block_t, self.opts["loss"]).sum()
        return total
