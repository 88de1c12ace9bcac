"""Every closed-form divergence, dense and top-k, through the fused LM-head pass, against autograd of a
plain float64 transcription written here (not the project's value code); and a negative control: a
closed form whose gradient is off by 1e-4 relative must fail the same comparison."""

import pytest
import torch
import torch.nn as nn

from llavadi.data.token_types import TokenType
from llavadi.distill.divergences import closed_form_divergences
from llavadi.distill.objective import DistillObjective
from llavadi.distill.terms import TermSpec

torch.set_num_threads(1)

B, T, H_S, H_T, V, WEIGHT = 2, 7, 5, 6, 11, 0.7
INS, RES = int(TokenType.INSTRUCTION), int(TokenType.RESPONSE)
RTOL, ATOL = 1e-8, 1e-11  # float64 closed forms agree with autograd to ~1e-13


class Cfg:
    def __init__(self, width):
        self.hidden_size = width


# ---------------------------------------------------------------- the plain transcription (float64, autograd)
def _kl(a, b):
    """KL(a || b) per row; 0 log 0 = 0."""
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    return torch.where(a > 0, a * (safe_a.log() - b.log()), torch.zeros_like(a)).sum(-1)


def _jsd(p, q, beta):
    if beta == 0.0:
        return _kl(q, p)
    if beta == 1.0:
        return _kl(p, q)
    m = beta * q + (1 - beta) * p
    return beta * _kl(q, m) + (1 - beta) * _kl(p, m)


def _on_distributions(name, p, q, o):
    """The divergence of student p from teacher q (rows of probabilities)."""
    if name == "forward_kl":
        return _kl(q, p)
    if name == "reverse_kl":
        return _kl(p, q)
    if name == "jsd":
        return _jsd(p, q, o.get("beta", 0.5))
    if name == "tvd":
        return 0.5 * (q - p).abs().sum(-1)
    if name == "skew_forward_kl":
        a = o.get("alpha", 0.1)
        return _kl(q, a * q + (1 - a) * p)
    if name == "skew_reverse_kl":
        a = o.get("alpha", 0.1)
        return _kl(p, a * p + (1 - a) * q)
    raise KeyError(name)


def _zscore(u):
    centred = u - u.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)  # eps 1e-6 is part of the definition


def _reference_dense(name, z_s, z_t, o):
    temperature = o.get("temperature", 1.0)
    if name == "logit_mse":
        u_s, u_t = z_s / temperature, z_t / temperature
        if o.get("zscore"):
            u_s, u_t = _zscore(u_s), _zscore(u_t)
        value = (u_s - u_t).pow(2).mean(-1)
    else:
        value = _on_distributions(name, torch.softmax(z_s / temperature, -1), torch.softmax(z_t / temperature, -1), o)
    return value * temperature**2 if o.get("scale_t2") else value


def _reference_topk(name, z_s, ids, logprobs, o):
    """Teacher given by its top-k: renormalised (zero elsewhere), or its missing mass in a rest bucket."""
    temperature = o.get("temperature", 1.0)
    p = torch.softmax(z_s / temperature, -1)
    shape = torch.softmax(logprobs / temperature, -1)  # the teacher's tempered shape within its top-k
    k = ids.shape[-1]
    if o.get("missing_mass", "renormalize") == "renormalize" or k == V:
        q = torch.zeros_like(p).scatter(-1, ids, shape)
        value = _on_distributions(name, p, q, o)
    else:
        rest_t = (1 - logprobs.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
        q = torch.cat([(1 - rest_t) * shape, rest_t], -1)
        outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
        p_c = torch.cat([p.gather(-1, ids), (p * outside).sum(-1, keepdim=True)], -1)
        value = _on_distributions(name, p_c, q, o)
    return value * temperature**2 if o.get("scale_t2") else value


# ---------------------------------------------------------------- inputs and the two computations
def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    types = torch.full((B, T), RES)
    types[:, :2] = INS
    head_s, head_t = nn.Linear(H_S, V).double(), nn.Linear(H_T, V).double()
    with torch.no_grad():
        for head, width in ((head_s, H_S), (head_t, H_T)):
            head.weight.copy_(torch.randn(V, width, generator=g, dtype=torch.float64) * 1.3)
            head.bias.copy_(torch.randn(V, generator=g, dtype=torch.float64))
    hidden_s = torch.randn(B, T, H_S, generator=g, dtype=torch.float64)
    hidden_t = torch.randn(B, T, H_T, generator=g, dtype=torch.float64)
    rows = torch.zeros(B, T, dtype=torch.bool)
    rows[:, :-1] = types[:, 1:] == RES  # positions predicting a response token
    return types, head_s, head_t, hidden_s, hidden_t, rows


def _topk(head_t, hidden_t, k, seed):
    with torch.no_grad():
        logp = torch.log_softmax(head_t(hidden_t), -1)
    top = logp.topk(k, dim=-1).indices
    top = top[..., torch.randperm(k, generator=torch.Generator().manual_seed(seed))]  # any order
    return top, logp.gather(-1, top)


def _fused_grads(name, opts, inputs, topk=None, perturb=None):
    """Loss and the student's hidden / weight / bias gradients from the objective's fused pass (chunks of 3 rows)."""
    types, head_s, head_t, hidden_s, hidden_t, _ = inputs
    from llavadi.distill.view import ModelView

    signal = "dense" if topk is None else "topk"
    objective = DistillObjective([TermSpec(name, weight=WEIGHT, options=opts)], ce_weight=0.0,
                                 student_config=Cfg(H_S), teacher_config=Cfg(H_T), teacher_signal=signal, chunk_size=3)
    assert objective.fused
    if perturb is not None:
        term = objective.terms[0]
        term.__dict__["fn"] = perturb(type(term.fn)).from_validated(term.opts)
    head = nn.Linear(H_S, V).double()
    head.load_state_dict(head_s.state_dict())
    leaf = hidden_s.clone().requires_grad_(True)
    student = ModelView(token_types=types, last_hidden=leaf, lm_head=head, who="student")
    if topk is None:
        teacher = ModelView(token_types=types, last_hidden=hidden_t, lm_head=head_t, who="teacher")
    else:
        teacher = ModelView(token_types=types, topk_ids=topk[0], topk_logprobs=topk[1], who="teacher")
    loss, _ = objective(student, teacher, torch.full((B, T), -100))
    loss.backward()
    return loss.detach(), {"hidden": leaf.grad, "weight": head.weight.grad, "bias": head.bias.grad}


def _reference_grads(name, opts, inputs, topk=None):
    types, head_s, head_t, hidden_s, hidden_t, rows = inputs
    leaf = hidden_s.clone().requires_grad_(True)
    weight, bias = head_s.weight.detach().clone().requires_grad_(True), head_s.bias.detach().clone().requires_grad_(True)
    z_s = (leaf @ weight.T + bias)[rows]
    if topk is None:
        with torch.no_grad():
            z_t = (hidden_t @ head_t.weight.T + head_t.bias)[rows]
        values = _reference_dense(name, z_s, z_t, opts)
    else:
        values = _reference_topk(name, z_s, topk[0][rows], topk[1][rows], opts)
    loss = WEIGHT * values.mean()
    loss.backward()
    return loss.detach(), {"hidden": leaf.grad, "weight": weight.grad, "bias": bias.grad}


def _compare(name, opts, topk_k=None, perturb=None, seed=0):
    inputs = _inputs(seed)
    topk = None if topk_k is None else _topk(inputs[2], inputs[4], topk_k, seed)
    loss_f, grads_f = _fused_grads(name, opts, inputs, topk, perturb)
    loss_r, grads_r = _reference_grads(name, opts, inputs, topk)
    torch.testing.assert_close(loss_f, loss_r, rtol=RTOL, atol=ATOL)
    for key in ("hidden", "weight", "bias"):
        assert grads_r[key].abs().max() > 1e-4, key  # a gradient that really is there
        torch.testing.assert_close(grads_f[key], grads_r[key], rtol=RTOL, atol=ATOL, msg=f"{name} {opts}: {key}")


DENSE_CASES = [
    ("forward_kl", {}), ("forward_kl", {"temperature": 2.0, "scale_t2": True}),
    ("reverse_kl", {}), ("reverse_kl", {"temperature": 0.7}),
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.3, "temperature": 1.5}), ("jsd", {"beta": 0.5, "scale_t2": True}),
    ("jsd", {"beta": 1.0, "temperature": 2.0}),
    ("tvd", {}), ("tvd", {"temperature": 2.0, "scale_t2": True}),
    ("skew_forward_kl", {"alpha": 0.0}), ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.6, "temperature": 0.8}),
    ("skew_reverse_kl", {"alpha": 0.0}), ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.6, "temperature": 2.0, "scale_t2": True}),
    ("logit_mse", {}), ("logit_mse", {"temperature": 2.0}), ("logit_mse", {"zscore": True}),
    ("logit_mse", {"zscore": True, "temperature": 3.0, "scale_t2": True}),
]
TOPK_CASES = [
    (name, {**opts, "missing_mass": mm, **extra}, k)
    for name, opts in (("forward_kl", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.4}), ("jsd", {"beta": 1.0}))
    for mm in ("renormalize", "rest")
    for k in (4, V)
    for extra in ({}, {"temperature": 2.0, "scale_t2": True})
    if not (opts.get("beta") == 1.0 and mm == "renormalize")  # refused for a cache (infinite when k < V)
]


def test_every_closed_form_divergence_is_covered_dense_and_topk():
    names = {cls.name for cls in closed_form_divergences()}
    assert {name for name, _ in DENSE_CASES} == names
    assert {name for name, _, _ in TOPK_CASES} == {cls.name for cls in closed_form_divergences() if cls.has_topk}


@pytest.mark.parametrize("name,opts", DENSE_CASES)
def test_dense_gradients_through_the_fused_pass_equal_the_plain_transcription(name, opts):
    _compare(name, opts)


@pytest.mark.parametrize("name,opts,k", TOPK_CASES)
def test_topk_gradients_through_the_fused_pass_equal_the_plain_transcription(name, opts, k):
    _compare(name, opts, topk_k=k)


def _off_by(factor):
    """A perturbed closed form: the same values, its gradient scaled by `factor`."""
    def perturb(cls):
        class Perturbed(cls):
            def dense(self, rows, grad=None, coef=1.0):
                return super().dense(rows, grad, coef * factor)

            def topk(self, rows, topk_ids, topk_logprobs, grad=None, coef=1.0):
                return super().topk(rows, topk_ids, topk_logprobs, grad, coef * factor)
        return Perturbed
    return perturb


@pytest.mark.parametrize("name,opts", [c for c in DENSE_CASES if c[1] == {} or c[0] == "jsd"][:8])
def test_a_perturbed_dense_closed_form_fails_the_comparison(name, opts):
    with pytest.raises(AssertionError, match="hidden|weight|bias"):
        _compare(name, opts, perturb=_off_by(1 + 1e-4))
    _compare(name, opts, perturb=_off_by(1.0))  # the same wrapping without the perturbation passes


@pytest.mark.parametrize("name,opts,k", [("forward_kl", {"missing_mass": "rest"}, 4), ("jsd", {"beta": 0.4}, 4)])
def test_a_perturbed_topk_closed_form_fails_the_comparison(name, opts, k):
    with pytest.raises(AssertionError, match="hidden|weight|bias"):
        _compare(name, opts, topk_k=k, perturb=_off_by(1 + 1e-4))
