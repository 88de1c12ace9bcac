"""Student <-> teacher position correspondence within a batch, and pooling of image-token grids.

Teacher and student may expand an image to different numbers of tokens, so the same sample has
different lengths in the two models. The k-th token of a type (image, instruction, response) in a
student sample corresponds to the k-th token of that type in the teacher sample when both have
the same number of tokens of that type; text tokens always do (shared tokenizer and template).
Image tokens of different counts are compared only after pooling the teacher's square grid of
each image to the student's (adaptive average pooling).
"""

from __future__ import annotations

import torch

from llavadi.data.token_types import TokenType
from llavadi.distill.hidden import grid_side, pool_image_tokens

Tensor = torch.Tensor
_MATCHED_TYPES = (TokenType.IMAGE, TokenType.INSTRUCTION, TokenType.RESPONSE)


def corresponding_positions(student_types: Tensor, teacher_types: Tensor) -> Tensor:
    """(B, T_s) teacher position of the token matching each student token (k-th of its type), -1 if none."""
    if student_types.shape[0] != teacher_types.shape[0]:
        raise ValueError(f"student batch has {student_types.shape[0]} samples, teacher batch {teacher_types.shape[0]}")
    batch, t_len = teacher_types.shape
    mapping = torch.full_like(student_types, -1)
    positions = torch.arange(t_len, device=teacher_types.device).expand(batch, t_len)
    for token_type in _MATCHED_TYPES:  # a fixed number of whole-batch operations, no per-sample loop, no sync
        in_s, in_t = student_types == int(token_type), teacher_types == int(token_type)
        rank_s, rank_t = in_s.cumsum(dim=1) - 1, in_t.cumsum(dim=1) - 1  # k: the token is the k-th of its type
        # by_rank[b, k] = teacher position of the k-th token of the type; column t_len collects the other tokens
        by_rank = torch.full((batch, t_len + 1), -1, dtype=mapping.dtype, device=teacher_types.device)
        by_rank.scatter_(1, torch.where(in_t, rank_t, t_len), positions.to(mapping.dtype))
        matched = in_s & (in_s.sum(dim=1) == in_t.sum(dim=1)).unsqueeze(1)  # only equal counts correspond
        found = by_rank.gather(1, torch.where(matched, rank_s, t_len).clamp_max(t_len))
        mapping = torch.where(matched, found, mapping)
    return mapping


def type_counts_message(student_types: Tensor, teacher_types: Tensor, b: int) -> str:
    """'image 4 vs 16, instruction ..., response ...' for sample b of the batch."""
    parts = []
    for token_type in _MATCHED_TYPES:
        n_s = int((student_types[b] == int(token_type)).sum())
        n_t = int((teacher_types[b] == int(token_type)).sum())
        parts.append(f"{token_type.name.lower()} {n_s} vs {n_t}")
    return ", ".join(parts)


def require_mapped(mapped: Tensor, batch_index: Tensor, student_types: Tensor, teacher_types: Tensor, what: str) -> None:
    """Raise, naming the sample, if a selected student position has no teacher counterpart (-1)."""
    bad = (mapped < 0).nonzero()
    if len(bad):
        b = int(batch_index[bad[0, 0]])
        raise ValueError(
            f"{what}: sample {b} (index in batch) has no teacher counterpart for some selected positions; token counts "
            f"student vs teacher: {type_counts_message(student_types, teacher_types, b)}. Text tokens must match one "
            "to one; image tokens of different counts are handled by visual_align / visual_self_corr / affinity only."
        )


def teacher_rows(student_types: Tensor, teacher_types: Tensor, flat_rows: Tensor, what: str) -> Tensor:
    """Flat (b * T_t + t) teacher rows of the student's flat (b * T_s + s) token rows; error if unmatched."""
    t_len, s_len = teacher_types.shape[1], student_types.shape[1]
    mapped = corresponding_positions(student_types, teacher_types).reshape(-1)[flat_rows]
    batch_index = flat_rows // s_len
    require_mapped(mapped, batch_index, student_types, teacher_types, what)
    return batch_index * t_len + mapped


def prediction_rows(student_types: Tensor, teacher_types: Tensor) -> Tensor:
    """(B * T_s,) flat teacher row predicting the same next token as each student row (-1 where none).

    Prediction position t maps to (teacher position of token t+1) - 1.
    """
    batch, s_len = student_types.shape
    t_len = teacher_types.shape[1]
    token_map = corresponding_positions(student_types, teacher_types)
    pred_map = torch.full_like(token_map, -1)
    nxt = token_map[:, 1:]
    pred_map[:, :-1] = torch.where(nxt >= 0, nxt - 1, nxt)
    offsets = torch.arange(batch, device=pred_map.device).unsqueeze(1) * t_len
    return (pred_map + offsets).where(pred_map >= 0, pred_map).reshape(-1)


def pool_sample_images(teacher_tokens: Tensor, n_student: int, per_image: tuple[int | None, int | None],
                       group: str, term: str, b: int) -> Tensor:
    """One sample's teacher tokens of `group` pooled to the student's count (only the image group can differ)."""
    student_per_image, teacher_per_image = per_image
    if group != "image" or teacher_per_image is None or student_per_image is None:
        raise ValueError(
            f"term {term!r}: sample {b} (index in batch) has {teacher_tokens.shape[0]} teacher vs {n_student} student "
            f"tokens in group {group!r}; only the 'image' group can differ (pooled per image)"
        )
    n_images = teacher_tokens.shape[0] // teacher_per_image
    grid_side(teacher_per_image, "teacher")
    per_img = teacher_tokens.reshape(n_images, teacher_per_image, -1)
    return pool_image_tokens(per_img, student_per_image).reshape(n_student, -1)
