"""Hidden-state (token) alignment and visual-token alignment between student and teacher.

Token alignment (LLaVADI): the student's hidden states are mapped to the teacher's width by a
trainable projector (default Linear(d_s, d_t) - GELU - Linear(d_t, d_t), as the paper) and
compared with the teacher's states per position, by MSE (mean over the teacher width) or by
cosine distance (1 - cos). All functions return per-position losses in float32; the objective
sums them over the selected positions and divides by the global number of positions.

Visual-token alignment: image-token states (or projector outputs) of the two models may differ in
number of tokens per image and in width. The teacher's tokens of each image form a square grid
that is pooled to the student's square grid with adaptive average pooling; then the student's
tokens are projected to the teacher's width and compared per student token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

PROJECTOR_KINDS = ("mlp", "linear", "identity")
ALIGNMENT_LOSSES = ("mse", "cosine")


def build_projector(kind: str, student_width: int, teacher_width: int) -> nn.Module:
    """Trainable map from the student's hidden width to the teacher's: "mlp", "linear" or "identity"."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(student_width, teacher_width), nn.GELU(), nn.Linear(teacher_width, teacher_width)
        )
    if kind == "linear":
        return nn.Linear(student_width, teacher_width)
    if kind == "identity":
        if student_width != teacher_width:
            raise ValueError(
                f"projector 'identity' needs equal widths, got student {student_width} and teacher {teacher_width}; "
                "use projector 'mlp' or 'linear'"
            )
        return nn.Identity()
    raise ValueError(f"unknown projector {kind!r}; choose one of {PROJECTOR_KINDS}")


def alignment_distance(projected_student: Tensor, teacher: Tensor, loss: str = "mse") -> Tensor:
    """Per-row distance between (N, H) tensors: mean squared error over H, or 1 - cosine."""
    if projected_student.shape != teacher.shape:
        raise ValueError(
            f"aligned states must have the same shape, got {tuple(projected_student.shape)} and {tuple(teacher.shape)}"
        )
    s = projected_student.float()
    t = teacher.detach().float()
    if loss == "mse":
        return (s - t).pow(2).mean(dim=-1)
    if loss == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise ValueError(f"unknown alignment loss {loss!r}; choose one of {ALIGNMENT_LOSSES}")


def token_alignment_loss(
    student_states: Tensor, teacher_states: Tensor, projector: nn.Module, loss: str = "mse"
) -> Tensor:
    """Per-position loss (N,) between projector(student (N, d_s)) and teacher (N, d_t)."""
    if student_states.dim() != 2 or teacher_states.dim() != 2 or student_states.shape[0] != teacher_states.shape[0]:
        raise ValueError(
            "token alignment takes student (N, d_s) and teacher (N, d_t) states at corresponding positions; got "
            f"{tuple(student_states.shape)} and {tuple(teacher_states.shape)}"
        )
    projected = projector(student_states.to(_param_dtype(projector, student_states)))
    return alignment_distance(projected, teacher_states, loss)


def _param_dtype(module: nn.Module, fallback: Tensor) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return fallback.dtype


def grid_side(n_tokens: int, who: str) -> int:
    """Side of the square grid of n_tokens image tokens; error if not a perfect square."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(
            f"{who} has {n_tokens} image tokens per image, not a square grid; visual alignment pools square grids "
            "(use vision_feature_select_strategy='default', which drops the CLS token)"
        )
    return side


def pool_image_tokens(tokens: Tensor, target_tokens: int) -> Tensor:
    """Pool (n_images, n_tok, H) square-grid tokens to (n_images, target_tokens, H) by adaptive average pooling."""
    n_images, n_tok, width = tokens.shape
    if n_tok == target_tokens:
        return tokens
    side = grid_side(n_tok, "teacher")
    target_side = grid_side(target_tokens, "student")
    grid = tokens.float().transpose(1, 2).reshape(n_images, width, side, side)
    pooled = F.adaptive_avg_pool2d(grid, target_side)
    return pooled.reshape(n_images, width, target_side * target_side).transpose(1, 2)


def pool_image_grid(tokens: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """One image's (rows * cols, H) tokens laid out on `grid` = (rows, cols), adaptive-average-pooled to
    `target` = (rows', cols'): (rows' * cols', H). Equal grids are returned as they are."""
    rows, cols = grid
    if tokens.shape[0] != rows * cols:
        raise ValueError(f"an image grid of {rows}x{cols} holds {rows * cols} tokens, got {tokens.shape[0]}")
    if tuple(grid) == tuple(target):
        return tokens
    width = tokens.shape[-1]
    image = tokens.float().transpose(0, 1).reshape(1, width, rows, cols)
    pooled = F.adaptive_avg_pool2d(image, tuple(target))
    return pooled.reshape(width, target[0] * target[1]).transpose(0, 1)
