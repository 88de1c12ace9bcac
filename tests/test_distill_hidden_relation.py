"""Token / visual alignment (hidden.py) and affinity / attention alignment (relation.py) vs plain references."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from llavadi.distill import hidden as H
from llavadi.distill import relation as R

torch.set_num_threads(1)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _cos_np(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_projector_kinds():
    mlp = H.build_projector("mlp", 8, 12)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].in_features, mlp[2].out_features) == (8, 12, 12, 12)
    assert H.build_projector("linear", 8, 12)(torch.zeros(3, 8)).shape == (3, 12)
    assert isinstance(H.build_projector("identity", 8, 8), nn.Identity)
    with pytest.raises(ValueError, match="equal widths"):
        H.build_projector("identity", 8, 12)
    with pytest.raises(ValueError, match="unknown projector"):
        H.build_projector("conv", 8, 12)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_token_alignment_matches_reference(loss):
    s, t = _rand(5, 4, seed=1), _rand(5, 6, seed=2)
    proj = nn.Linear(4, 6)
    got = H.token_alignment_loss(s, t, proj, loss)
    projected = (s @ proj.weight.T + proj.bias).detach().double().numpy()
    tn = t.double().numpy()
    for i in range(5):
        if loss == "mse":
            want = sum((projected[i, j] - tn[i, j]) ** 2 for j in range(6)) / 6
        else:
            want = 1 - _cos_np(projected[i], tn[i])
        assert got[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    s.requires_grad_(True)
    H.token_alignment_loss(s, t, proj, loss).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert proj.weight.grad.abs().sum() > 0


def test_pool_image_tokens_averages_grid_blocks():
    tokens = _rand(2, 16, 3, seed=3)  # 2 images, 4x4 grid, width 3
    pooled = H.pool_image_tokens(tokens, 4)  # to a 2x2 grid
    grid = tokens.reshape(2, 4, 4, 3)  # row-major patches
    for img in range(2):
        for r in range(2):
            for c in range(2):
                want = grid[img, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(4, 3).mean(0)
                torch.testing.assert_close(pooled[img, r * 2 + c], want)
    assert H.pool_image_tokens(tokens, 16) is tokens
    with pytest.raises(ValueError, match="not a square grid"):
        H.pool_image_tokens(_rand(1, 12, 3), 4)
    with pytest.raises(ValueError, match="not a square grid"):
        H.pool_image_tokens(tokens, 5)


def test_visual_alignment_with_unequal_counts_and_widths():
    student = _rand(3, 4, 5, seed=4).requires_grad_(True)  # 3 images, 2x2 grid, width 5
    teacher = _rand(3, 16, 7, seed=5)  # 4x4 grid, width 7
    proj = nn.Linear(5, 7)
    pooled_teacher = H.pool_image_tokens(teacher, 4)
    got = H.token_alignment_loss(student.reshape(12, 5), pooled_teacher.reshape(12, 7), proj, "mse")
    assert got.shape == (12,)
    tgrid = teacher.reshape(3, 4, 4, 7)
    k = 0
    for img in range(3):
        for r in range(2):
            for c in range(2):
                pooled = tgrid[img, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(4, 7).mean(0)
                mapped = proj(student[img, r * 2 + c])
                assert got[k].item() == pytest.approx(((mapped - pooled) ** 2).mean().item(), rel=1e-5)
                k += 1
    got.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_affinity_matches_loop_reference():
    s_rows, s_cols = _rand(3, 4, seed=6).requires_grad_(True), _rand(5, 4, seed=7)
    t_rows, t_cols = _rand(3, 9, seed=8), _rand(5, 9, seed=9)
    got = R.affinity_squared_errors(s_rows, s_cols, t_rows, t_cols)
    for i in range(3):
        for j in range(5):
            a_s = _cos_np(s_rows[i].detach().numpy(), s_cols[j].numpy())
            a_t = _cos_np(t_rows[i].numpy(), t_cols[j].numpy())
            assert got[i, j].item() == pytest.approx((a_s - a_t) ** 2, rel=1e-4, abs=1e-6)
    got.sum().backward()
    assert torch.isfinite(s_rows.grad).all() and s_rows.grad.abs().sum() > 0


def test_visual_self_correlation_matches_reference():
    s, t = _rand(4, 5, seed=10).requires_grad_(True), _rand(4, 8, seed=11)
    got = R.visual_self_correlation_loss(s, t)
    sn, tn = s.detach().numpy(), t.numpy()
    rs = np.array([[_cos_np(sn[i], sn[j]) for j in range(4)] for i in range(4)])
    rt = np.array([[_cos_np(tn[i], tn[j]) for j in range(4)] for i in range(4)])
    want = [1 - _cos_np(rs[i], rt[i]) for i in range(4)]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def _attention(heads, rows, cols, seed):
    return torch.softmax(_rand(heads, rows, cols, seed=seed), dim=-1)


def test_attention_mse_head_by_head_when_head_counts_match_and_averaged_otherwise():
    a_s, a_t = _attention(2, 3, 4, 12), _attention(2, 3, 4, 13)
    want = ((a_s - a_t) ** 2).mean(0)  # per head, then mean over heads
    torch.testing.assert_close(R.attention_loss(a_s, a_t, "mse"), want)
    a_t4 = _attention(4, 3, 4, 14)
    want = (a_s.mean(0) - a_t4.mean(0)) ** 2
    torch.testing.assert_close(R.attention_loss(a_s, a_t4, "mse"), want)


def test_attention_kl_renormalises_rows_over_chosen_columns():
    a_s = _attention(2, 3, 6, 15)[:, :, :4]  # a column subset: rows no longer sum to 1
    a_t = _attention(3, 3, 6, 16)[:, :, :4]
    got = R.attention_loss(a_s.requires_grad_(True), a_t, "kl")
    p_s = a_s.detach().mean(0).double().numpy()
    p_t = a_t.mean(0).double().numpy()
    want = []
    for i in range(3):
        ps, pt = p_s[i] / p_s[i].sum(), p_t[i] / p_t[i].sum()
        want.append(sum(pt[j] * math.log(pt[j] / ps[j]) for j in range(4)))
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(a_s.grad).all()
