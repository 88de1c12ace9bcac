"""Divergence classes (llavadi.distill.divergences) against plain float64 numpy references; shared rows."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llavadi.distill import divergences as D
from llavadi.distill import logits as L
from llavadi.distill.options import validate_options

torch.set_num_threads(1)

N, V = 6, 13
BY_NAME = {cls.name: cls for cls in D.closed_form_divergences()}


def _div(name, **opt):
    """The divergence with these options (validated, cross-option rules skipped: z-scoring with a temperature)."""
    cls = BY_NAME[name]
    return cls.from_validated(validate_options(cls.options, opt, name))


def _pair(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g) * scale, torch.randn(N, V, generator=g) * scale


def _softmax_np(x, temperature):
    z = x.astype(np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _kl_np(p, q):
    """KL(p||q) per row, written as a plain loop."""
    out = np.zeros(p.shape[0])
    for i in range(p.shape[0]):
        for v in range(p.shape[1]):
            if p[i, v] > 0:
                out[i] += p[i, v] * np.log(p[i, v] / q[i, v])
    return out


def _reference(name, s, t, temperature, **opt):
    ps, pt = _softmax_np(s.numpy(), temperature), _softmax_np(t.numpy(), temperature)
    if name == "forward_kl":
        return _kl_np(pt, ps)
    if name == "reverse_kl":
        return _kl_np(ps, pt)
    if name == "jsd":
        b = opt["beta"]
        if b == 0:
            return _kl_np(pt, ps)
        if b == 1:
            return _kl_np(ps, pt)
        m = (1 - b) * ps + b * pt
        return b * _kl_np(pt, m) + (1 - b) * _kl_np(ps, m)
    if name == "tvd":
        return 0.5 * np.abs(pt - ps).sum(-1)
    if name == "skew_forward_kl":
        a = opt["alpha"]
        return _kl_np(pt, a * pt + (1 - a) * ps)
    if name == "skew_reverse_kl":
        a = opt["alpha"]
        return _kl_np(ps, a * ps + (1 - a) * pt)
    if name == "logit_mse":
        zs, zt = s.numpy().astype(np.float64) / temperature, t.numpy().astype(np.float64) / temperature
        if opt.get("zscore"):
            zs = (zs - zs.mean(-1, keepdims=True)) / zs.std(-1, keepdims=True)
            zt = (zt - zt.mean(-1, keepdims=True)) / zt.std(-1, keepdims=True)
        return ((zs - zt) ** 2).mean(-1)
    raise KeyError(name)


CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.6}),
    ("skew_reverse_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.6}),
    ("logit_mse", {}),
    ("logit_mse", {"zscore": True}),
]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("name,opt", CASES)
def test_divergence_matches_reference(name, opt, temperature):
    s, t = _pair(seed=3)
    got = _div(name, temperature=temperature, **opt)(s, t)
    assert got.shape == (N,) and got.dtype == torch.float32
    want = _reference(name, s, t, temperature, **opt)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    scaled = _div(name, temperature=temperature, scale_t2=True, **opt)(s, t)
    np.testing.assert_allclose(scaled.numpy(), want * temperature**2, rtol=1e-5, atol=1e-6)


def test_forward_kl_matches_torch_kl_div():
    s, t = _pair(seed=5)
    want = F.kl_div(F.log_softmax(s / 1.5, -1), F.log_softmax(t / 1.5, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(D.ForwardKL(temperature=1.5)(s, t), want, rtol=1e-5, atol=1e-6)


def test_jsd_endpoints_are_the_kls_exactly_and_interior_vanishes_towards_them():
    s, t = _pair(seed=7)
    assert torch.equal(D.JSD(beta=0.0, temperature=2.0)(s, t), D.ForwardKL(temperature=2.0)(s, t))
    assert torch.equal(D.JSD(beta=1.0, temperature=2.0)(s, t), D.ReverseKL(temperature=2.0)(s, t))
    # the generalised formula itself tends to beta * KL(p_T||p_S): documented jump at the endpoints
    # (in float64: dividing a float32 value by 1e-4 would amplify its rounding to the size of the O(beta) gap)
    near = D.JSD(beta=1e-4)(s.double(), t.double()) / 1e-4
    torch.testing.assert_close(near, D.ForwardKL()(s.double(), t.double()), rtol=2e-3, atol=1e-4)


def test_bfloat16_inputs_are_computed_in_float32():
    s, t = _pair(seed=9)
    s16, t16 = s.bfloat16(), t.bfloat16()
    for name, opt in CASES:
        got = _div(name, **opt)(s16, t16)
        assert got.dtype == torch.float32
        # float64 reference on the bf16 values themselves (exact in float64): a computation in
        # bf16 would be off by ~1e-2 relative, float32 agrees to ~1e-6
        want = _reference(name, s16.double(), t16.double(), 1.0, **opt)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"{name} {opt}")


def test_extreme_logits_stay_finite():
    s = torch.tensor([[1000.0, -1000.0, 0.0], [-80.0, 80.0, 0.0]])
    t = torch.tensor([[-1000.0, 1000.0, 0.0], [80.0, -80.0, 0.0]])
    for name, opt in CASES:
        assert torch.isfinite(_div(name, **opt)(s, t)).all(), name


@pytest.mark.parametrize("name,opt", CASES)
def test_gradients_flow_to_student(name, opt):
    s, t = _pair(seed=11)
    s.requires_grad_(True)
    _div(name, temperature=1.3, **opt)(s, t).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_every_closed_form_divergence_is_a_class_with_its_options_once():
    assert [cls.name for cls in D.closed_form_divergences()] == [
        "forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "logit_mse"]
    assert {cls.name for cls in D.closed_form_divergences() if cls.has_topk} == {"forward_kl", "jsd"}
    assert [o.name for o in D.JSD.options] == ["temperature", "scale_t2", "beta", "missing_mass"]
    assert [o.name for o in D.TVD.options] == ["temperature", "scale_t2"]
    assert D.JSD().opts == {"temperature": 1.0, "scale_t2": False, "beta": 0.5, "missing_mass": "renormalize"}
    with pytest.raises(ValueError, match="has no top-k form"):
        D.TVD().of_topk(*_pair()[:1], torch.zeros(N, 2, dtype=torch.long), torch.zeros(N, 2))
    with pytest.raises(TypeError, match="'forward_kl' is defined twice"):
        type("AgainKL", (D.ForwardKL,), {"name": "forward_kl"})


def test_bad_arguments_raise():
    s, t = _pair()
    with pytest.raises(ValueError, match="divergence 'jsd': option 'beta' must be <= 1.0"):
        D.JSD(beta=1.5)
    with pytest.raises(ValueError, match="unknown option"):
        D.TVD(beta=0.5)
    with pytest.raises(ValueError, match="temperature"):
        D.ForwardKL(temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        D.ForwardKL()(s, t[:, :5])


# ---------------------------------------------------------------- sparse teacher
def _topk(t, k, seed=0):
    """Teacher top-k ids (in a shuffled order) and their full-vocabulary log-probs at T=1."""
    logp = F.log_softmax(t, -1)
    ids = logp.topk(k, dim=-1).indices
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    ids = ids[:, perm]
    return ids, logp.gather(-1, ids)


@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(
    "name,opt", [("forward_kl", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.4}), ("jsd", {"beta": 1.0})]
)
def test_sparse_equals_dense_when_k_is_vocab(name, opt, temperature, missing_mass):
    s, t = _pair(seed=13)
    ids, lp = _topk(t, V, seed=1)
    got = _div(name, temperature=temperature, missing_mass=missing_mass, **opt).of_topk(s, ids, lp)
    want = _div(name, temperature=temperature, **opt)(s, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [None, 0.3])
def test_sparse_renormalize_is_dense_against_truncated_teacher(beta):
    s, t = _pair(seed=17)
    k = 4
    ids, lp = _topk(t, k)
    truncated = torch.full_like(t, float("-inf")).scatter(-1, ids, t.gather(-1, ids))
    ps = _softmax_np(s.numpy() / 1.0, 2.0)
    pt = np.exp(np.nan_to_num(F.log_softmax(truncated / 2.0, -1).double().numpy(), neginf=-np.inf))
    if beta is None:
        got = D.ForwardKL(temperature=2.0).of_topk(s, ids, lp)
        want = _kl_np(pt, ps)
    else:
        got = D.JSD(beta=beta, temperature=2.0).of_topk(s, ids, lp)
        m = (1 - beta) * ps + beta * pt
        want = beta * _kl_np(pt, m) + (1 - beta) * _kl_np(ps, m)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_sparse_rest_bucket_matches_collapsed_reference():
    s, t = _pair(seed=19)
    k, temperature, beta = 5, 1.5, 0.5
    ids, lp = _topk(t, k)
    ps = _softmax_np(s.numpy(), temperature)
    pt_full = _softmax_np(t.numpy(), 1.0)
    want_fkl, want_jsd = np.zeros(N), np.zeros(N)
    for i in range(N):
        top = ids[i].numpy()
        rest_t = 1.0 - pt_full[i, top].sum()
        shape = np.exp(lp[i].double().numpy() / temperature)
        shape /= shape.sum()
        q = np.append((1 - rest_t) * shape, rest_t)  # teacher: tempered shape within top-k, mass r kept in the bucket
        p = np.append(ps[i, top], 1.0 - ps[i, top].sum())  # student: its own mass outside the top-k
        want_fkl[i] = _kl_np(q[None], p[None])[0]
        m = (1 - beta) * p + beta * q
        want_jsd[i] = beta * _kl_np(q[None], m[None])[0] + (1 - beta) * _kl_np(p[None], m[None])[0]
    got_fkl = D.ForwardKL(temperature=temperature, missing_mass="rest").of_topk(s, ids, lp)
    got_jsd = D.JSD(beta=beta, temperature=temperature, missing_mass="rest").of_topk(s, ids, lp)
    np.testing.assert_allclose(got_fkl.numpy(), want_fkl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_jsd.numpy(), want_jsd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
def test_sparse_gradients_finite_and_nonzero(missing_mass):
    s, t = _pair(seed=23)
    for k in (3, V):
        ids, lp = _topk(t, k)
        for fn in (D.ForwardKL(missing_mass=missing_mass), D.JSD(beta=0.5, missing_mass=missing_mass)):
            x = s.clone().requires_grad_(True)
            fn.of_topk(x, ids, lp).sum().backward()
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sparse_reverse_direction_against_renormalised_teacher_is_refused():
    s, t = _pair()
    ids, lp = _topk(t, 3)
    with pytest.raises(ValueError, match="set missing_mass: rest or beta < 1"):
        D.JSD(beta=1.0).of_topk(s, ids, lp)
    assert torch.isfinite(D.JSD(beta=1.0, missing_mass="rest").of_topk(s, ids, lp)).all()


# ---------------------------------------------------------------- gradients (closed forms: tests/test_divergence_grads.py)
def _autograd_grad(fn, s):
    x = s.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


def test_target_nll_value_and_gradient_equal_cross_entropy():
    s, _ = (x.double() for x in _pair(seed=37))
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    want = _autograd_grad(lambda x: F.cross_entropy(x, targets, reduction="none"), s)
    grad = torch.zeros_like(s)
    value = L.target_nll(L.LogitRows(s), targets, grad, 0.5)
    torch.testing.assert_close(value, F.cross_entropy(s, targets, reduction="none"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, 0.5 * want, rtol=1e-9, atol=1e-12)


def test_closed_form_gradients_stay_finite_on_extreme_logits():
    s = torch.tensor([[1000.0, -1000.0, 0.0], [-80.0, 80.0, 0.0]])
    t = torch.tensor([[-1000.0, 1000.0, 0.0], [80.0, -80.0, 0.0]])
    for name, opt in CASES:
        grad = torch.zeros_like(s)
        _div(name, **opt).dense(L.LogitRows(s, t), grad, 1.0)
        assert torch.isfinite(grad).all(), name


def test_shared_rows_in_place_and_subsets_equal_fresh_computation():
    """One LogitRows per chunk: in-place T=1 log-softmax, other temperatures and row subsets give the same values."""
    s, t = _pair(seed=41)
    shared = L.LogitRows(s.clone(), t.clone(), owned=True, keep_raw=False)
    torch.testing.assert_close(shared.student(1.0).logp, F.log_softmax(s, -1))  # in place
    with pytest.raises(ValueError, match="raw logits were not kept"):
        shared.raw()
    index = torch.tensor([4, 0, 2])
    for temperature in (1.0, 2.0):
        for rows, (s_ref, t_ref) in ((shared, (s, t)), (shared.subset(index), (s[index], t[index]))):
            for name, opt in CASES:
                if name == "logit_mse" and not opt.get("zscore"):
                    continue  # reads raw logits, which this LogitRows gave up
                got = _div(name, temperature=temperature, **opt).dense(rows)
                want = _div(name, temperature=temperature, **opt)(s_ref, t_ref)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {opt} T={temperature}")
