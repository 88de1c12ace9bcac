"""Batch samples: padding, labels, token types, image inputs (pixel values and a family's extras), sample ids."""

from __future__ import annotations

import torch

from llavadi.data.encode import IGNORE_INDEX
from llavadi.data.token_alignment import ALIGNMENT_KEY, collate_alignments
from llavadi.data.token_types import TokenType

PADDING_SIDES = ("right", "left")
# what a model reads about a sample's images (llavadi.models.families says which ones a family gives)
IMAGE_INPUT_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask", "batch_num_images")


def combine_image_inputs(tensors: list[torch.Tensor], key: str) -> torch.Tensor:
    """One batch tensor of the samples' `key` inputs: one (C, H, W) image per sample is stacked to (B, C, H, W);
    anything else has a row per image (or patch, or sample) and is concatenated along its first dimension,
    after zero-padding every other dimension to the batch's largest (e.g. LLaVA-NeXT's tiles per image)."""
    if key == "pixel_values" and all(t.dim() == 3 for t in tensors):
        return torch.stack(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            grown = t.new_zeros((t.shape[0], *shape))
            grown[tuple(slice(0, n) for n in t.shape)] = t
            t = grown
        padded.append(t)
    return torch.cat(padded)


def pad_sequences(seqs: list[list[int]], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """A (len(seqs), length) long tensor of the sequences padded with `value` on `side`.

    `length` defaults to the longest sequence. Right padding keeps every row's positions as
    unpadded; left padding ends every row at the last column, where a decoder continues.
    """
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be one of {PADDING_SIDES}, got {side!r}")
    longest = max((len(s) for s in seqs), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"cannot pad a sequence of {longest} tokens to length {length}")
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = torch.as_tensor(s, dtype=torch.long)
        if side == "right":
            out[i, : len(s)] = row
        else:
            out[i, length - len(s):] = row
    return out


class LlavaCollator:
    """Pads each view's sequences (keys with the view's prefix) to the batch's longest one."""

    def __init__(self, pad_token_id: int, prefixes: tuple[str, ...] = ("",), pad_to_multiple_of: int | None = None,
                 padding_side: str = "right", pad_token_ids: dict[str, int] | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_token_ids = dict(pad_token_ids or {})  # per prefix, when a view has its own tokenizer
        self.prefixes = prefixes
        self.pad_to_multiple_of = pad_to_multiple_of
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.padding_side = padding_side

    def _pad(self, seqs: list[list[int]], value: int, length: int) -> torch.Tensor:
        return pad_sequences(seqs, value, self.padding_side, length)

    def __call__(self, items: list[dict]) -> dict:
        batch: dict = {"sample_ids": [it["sample_id"] for it in items],
                       # samples that failed to load and were replaced (on_error='skip'): counted by the trainer
                       "replaced_samples": [r for it in items for r in it.get("replaced_samples", ())]}
        shifts: list[list[int]] = []
        for p in self.prefixes:
            ids = [it[p + "input_ids"] for it in items]
            length = max(len(s) for s in ids)
            if self.pad_to_multiple_of:
                m = self.pad_to_multiple_of
                length = (length + m - 1) // m * m
            batch[p + "input_ids"] = self._pad(ids, self.pad_token_ids.get(p, self.pad_token_id), length)
            batch[p + "attention_mask"] = self._pad([[1] * len(s) for s in ids], 0, length)
            batch[p + "token_types"] = self._pad([it[p + "token_types"] for it in items], int(TokenType.PAD), length)
            if p + "labels" in items[0]:
                batch[p + "labels"] = self._pad([it[p + "labels"] for it in items], IGNORE_INDEX, length)
            for key in IMAGE_INPUT_KEYS:
                found = [it[p + key] for it in items if p + key in it]
                if found:
                    batch[p + key] = combine_image_inputs(found, key)
            shifts.append([length - len(s) if self.padding_side == "left" else 0 for s in ids])
        if ALIGNMENT_KEY in items[0]:  # positions of the first two views, shifted by their left padding
            batch[ALIGNMENT_KEY] = collate_alignments([it[ALIGNMENT_KEY] for it in items], (shifts[0], shifts[1]))
        return batch
