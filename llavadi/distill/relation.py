"""Relation alignment: affinity (cosine-similarity) matrices and attention maps, per sample.

Affinity (LLaVADI): for one sample, the cosine similarities between the last hidden states of
the tokens of one type group (rows, paper: image tokens) and another (columns, paper: response
tokens) form an (R, C) matrix for each model; the loss is the squared difference of the two
matrices, entry by entry. Widths may differ (cosine similarities are width-free).

Visual self-correlation (LLaVA-KD's RDist): the (n, n) cosine self-similarity matrix of one
image's tokens for each model; the loss per row i is 1 - cos(R_S[i], R_T[i]).

Attention: the attention maps of one layer restricted to rows x columns of chosen token types;
averaged over heads when the head counts differ (else compared head by head and averaged);
loss "mse" (squared error per entry) or "kl" (each row renormalised over the chosen columns,
KL(teacher row || student row)). Attention maps need ``attn_implementation="eager"`` in the
models that produce them.

All functions return unreduced float32 losses; the objective sums them and divides by the
global count of entries (MSE) or rows (RDist, attention KL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ATTENTION_LOSSES = ("mse", "kl")


def cosine_affinity(row_states: Tensor, col_states: Tensor) -> Tensor:
    """(R, C) cosine similarities between row states (R, H) and column states (C, H), float32."""
    rows = F.normalize(row_states.float(), dim=-1, eps=1e-8)
    cols = F.normalize(col_states.float(), dim=-1, eps=1e-8)
    return rows @ cols.transpose(0, 1)


def affinity_squared_errors(
    student_rows: Tensor, student_cols: Tensor, teacher_rows: Tensor, teacher_cols: Tensor
) -> Tensor:
    """Entry-wise squared difference (R, C) of the student's and teacher's cosine-affinity matrices."""
    if student_rows.shape[0] != teacher_rows.shape[0] or student_cols.shape[0] != teacher_cols.shape[0]:
        raise ValueError(
            f"affinity needs the same rows and columns in both models; got student {student_rows.shape[0]}x"
            f"{student_cols.shape[0]} and teacher {teacher_rows.shape[0]}x{teacher_cols.shape[0]}"
        )
    student = cosine_affinity(student_rows, student_cols)
    with torch.no_grad():
        teacher = cosine_affinity(teacher_rows, teacher_cols)
    return (student - teacher).pow(2)


def visual_self_correlation_loss(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """Per-row 1 - cos between the (n, n) self-similarity matrices of one image's tokens, (n,)."""
    if student_tokens.shape[0] != teacher_tokens.shape[0]:
        raise ValueError(
            f"self-correlation needs the same number of image tokens (pool the teacher first); got "
            f"{student_tokens.shape[0]} and {teacher_tokens.shape[0]}"
        )
    student = cosine_affinity(student_tokens, student_tokens)
    with torch.no_grad():
        teacher = cosine_affinity(teacher_tokens, teacher_tokens)
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


def attention_loss(student_attention: Tensor, teacher_attention: Tensor, loss: str = "mse") -> Tensor:
    """Loss between (heads, R, C) attention blocks: (R, C) squared errors ("mse") or (R,) KL ("kl"), mean over heads."""
    if (
        student_attention.dim() != 3
        or teacher_attention.dim() != 3
        or student_attention.shape[1:] != teacher_attention.shape[1:]
    ):
        raise ValueError(
            "attention alignment takes (heads, R, C) blocks with the same R, C; got "
            f"{tuple(student_attention.shape)} and {tuple(teacher_attention.shape)}"
        )
    student = student_attention.float()
    teacher = teacher_attention.detach().float()
    if student.shape[0] != teacher.shape[0]:  # different head counts: compare head-averaged maps
        student = student.mean(dim=0, keepdim=True)
        teacher = teacher.mean(dim=0, keepdim=True)
    if loss == "mse":
        return (student - teacher).pow(2).mean(dim=0)
    if loss == "kl":
        # rows restricted to chosen columns are not distributions: renormalise them (tiny floor for all-zero rows)
        floor = 1e-12
        log_s = torch.log(student.clamp_min(floor) / student.clamp_min(floor).sum(dim=-1, keepdim=True))
        log_t = torch.log(teacher.clamp_min(floor) / teacher.clamp_min(floor).sum(dim=-1, keepdim=True))
        return (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean(dim=0)
    raise ValueError(f"unknown attention loss {loss!r}; choose one of {ATTENTION_LOSSES}")
