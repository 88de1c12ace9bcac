"""The fused chunked LM-head pass equals the plain autograd path in value and gradient, term by term."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llavadi.data.token_types import TokenType
from llavadi.distill.logit_pass import head_weights, logit_loss, rows_per_chunk
from llavadi.distill.objective import DistillObjective
from llavadi.distill.terms import TermSpec
from llavadi.distill.terms.logit_terms import LogitTerm
from llavadi.distill.view import ModelView

torch.set_num_threads(1)

B, T, H_S, H_T, V = 3, 11, 6, 10, 17
PAD, IMG, INS, RES = int(TokenType.PAD), int(TokenType.IMAGE), int(TokenType.INSTRUCTION), int(TokenType.RESPONSE)


class Cfg:
    def __init__(self, width):
        self.hidden_size = width


def _batch(seed=0):
    """Token types (instruction, image, instruction, response, padding) and labels on the response tokens."""
    g = torch.Generator().manual_seed(seed)
    types = torch.tensor([[INS, IMG, IMG, INS, INS, RES, RES, RES, RES, PAD, PAD],
                          [INS, INS, IMG, IMG, INS, RES, RES, RES, RES, RES, RES],
                          [INS, INS, INS, RES, RES, RES, PAD, PAD, PAD, PAD, PAD]])
    labels = torch.where(types == RES, torch.randint(0, V, (B, T), generator=g), torch.full((B, T), -100))
    return types, labels


def _views(bias=False, seed=0, dtype=torch.float32, head_grad=True):
    g = torch.Generator().manual_seed(seed)
    types, labels = _batch(seed)
    head_s, head_t = nn.Linear(H_S, V, bias=bias), nn.Linear(H_T, V, bias=bias)
    with torch.no_grad():  # logits of a few units, like a trained model's
        for head, width in ((head_s, H_S), (head_t, H_T)):
            head.weight.copy_(torch.randn(V, width, generator=g) * 1.5)
            if bias:
                head.bias.copy_(torch.randn(V, generator=g))
    head_s.to(dtype).requires_grad_(head_grad)
    head_t.to(dtype)
    hidden_s = torch.randn(B, T, H_S, generator=g).to(dtype).requires_grad_(True)
    hidden_t = torch.randn(B, T, H_T, generator=g).to(dtype)
    student = ModelView(token_types=types, last_hidden=hidden_s, lm_head=head_s, who="student")
    teacher = ModelView(token_types=types, last_hidden=hidden_t, lm_head=head_t, who="teacher")
    return student, teacher, labels


def _loss_and_grads(objective, student, teacher, labels):
    for p in (student.last_hidden, *student.lm_head.parameters()):
        p.grad = None
    loss, logged = objective(student, teacher, labels)
    loss.backward()
    params = {"hidden": student.last_hidden, **dict(student.lm_head.named_parameters())}
    return loss.detach(), logged, {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


def _compare(specs, chunk_sizes=(1, 4, 1000), ce_weight=1.0, teacher_signal="dense", views=None, rtol=1e-5, atol=1e-6):
    student, teacher, labels = views or _views()
    kwargs = dict(ce_weight=ce_weight, student_config=Cfg(H_S), teacher_config=Cfg(H_T), teacher_signal=teacher_signal)
    plain = DistillObjective(specs, fused=False, **kwargs)
    loss_p, logged_p, grads_p = _loss_and_grads(plain, student, teacher, labels)
    assert grads_p and all(g.abs().sum() > 0 for g in grads_p.values())
    for chunk_size in chunk_sizes:
        fused = DistillObjective(specs, chunk_size=chunk_size, **kwargs)
        loss_f, logged_f, grads_f = _loss_and_grads(fused, student, teacher, labels)
        torch.testing.assert_close(loss_f, loss_p, rtol=rtol, atol=atol)
        assert logged_f.keys() == logged_p.keys()
        for k in logged_p:
            torch.testing.assert_close(logged_f[k], logged_p[k], rtol=rtol, atol=atol, msg=f"{k}, chunk {chunk_size}")
        assert grads_f.keys() == grads_p.keys()
        for k in grads_p:
            torch.testing.assert_close(grads_f[k], grads_p[k], rtol=rtol, atol=atol, msg=f"{k}, chunk {chunk_size}")


DENSE_TERMS = [
    ("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
    ("tvd", {}), ("skew_forward_kl", {"alpha": 0.1}), ("skew_reverse_kl", {"alpha": 0.1}), ("logit_mse", {}),
    ("logit_mse", {"zscore": True}),
]


@pytest.mark.parametrize("temperature", [None, 2.0])
@pytest.mark.parametrize("name,opts", DENSE_TERMS)
def test_fused_equals_plain_for_every_dense_term(name, opts, temperature):
    opts = dict(opts)
    if temperature is not None:
        opts.update(temperature=temperature, scale_t2=True)
        if opts.get("zscore"):
            opts.pop("temperature")  # refused: it cancels in z-scored logits
    # the term reads a different group than CE: chunks hold rows of only one of them, of both, or of each alone
    _compare([TermSpec(name, weight=0.7, tokens="text", options=opts)])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [4, V])
@pytest.mark.parametrize("name,opts", [("forward_kl", {}), ("jsd", {"beta": 0.4}), ("jsd", {"beta": 1.0})])
@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
def test_fused_equals_plain_for_every_topk_term(name, opts, k, missing_mass, temperature):
    if name == "jsd" and opts["beta"] == 1.0 and missing_mass == "renormalize":
        pytest.skip("refused for a renormalised top-k teacher")
    student, teacher, labels = _views()
    with torch.no_grad():
        logp = F.log_softmax(teacher.lm_head(teacher.last_hidden), -1)
    top = logp.topk(k, dim=-1)
    sparse = ModelView(token_types=teacher.token_types, topk_ids=top.indices, topk_logprobs=top.values)
    spec = TermSpec(name, weight=0.5, options={**opts, "temperature": temperature, "missing_mass": missing_mass})
    _compare([spec], teacher_signal="topk", views=(student, sparse, labels))


def test_fused_equals_plain_with_every_term_at_once_bias_and_zero_weight():
    specs = [TermSpec(name, weight=0.3, tokens=tokens, options=opts) for (name, opts), tokens in
             zip(DENSE_TERMS, ["response", "text", "instruction", "all", "response"] * 2)]
    specs.append(TermSpec("forward_kl", weight=0.0, options={"temperature": 3.0}))  # logged, no gradient
    _compare(specs, views=_views(bias=True))


def test_fused_equals_plain_with_a_frozen_lm_head():
    student, teacher, labels = _views(head_grad=False)
    _compare([TermSpec("forward_kl")], views=(student, teacher, labels))
    loss, _ = DistillObjective([TermSpec("forward_kl")], teacher_config=Cfg(H_T))(student, teacher, labels)
    loss.backward()
    assert student.lm_head.weight.grad is None and student.last_hidden.grad.abs().sum() > 0


def test_values_without_autograd_equal_values_with_it():
    student, teacher, labels = _views()
    objective = DistillObjective([TermSpec("forward_kl"), TermSpec("tvd")], teacher_config=Cfg(H_T), chunk_size=4)
    loss, logged = objective(student, teacher, labels)
    with torch.no_grad():
        loss_ng, logged_ng = objective(student, teacher, labels)
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach())
    for k in logged:
        torch.testing.assert_close(logged_ng[k], logged[k])


def test_ce_and_forward_kl_match_a_reference_written_out():
    """The fused loss against CE + forward KL computed here from full logits, and its gradient by autograd."""
    student, teacher, labels = _views(bias=True)
    objective = DistillObjective([TermSpec("forward_kl", weight=0.5, options={"temperature": 1.5})],
                                 teacher_config=Cfg(H_T), chunk_size=3)
    loss, _, grads = _loss_and_grads(objective, student, teacher, labels)
    hidden = student.last_hidden.detach().clone().requires_grad_(True)
    logits_s = hidden @ student.lm_head.weight.T + student.lm_head.bias
    logits_t = teacher.last_hidden @ teacher.lm_head.weight.T + teacher.lm_head.bias
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    kl_rows = torch.zeros(B, T, dtype=torch.bool)
    kl_rows[:, :-1] = teacher.token_types[:, 1:] == RES
    ce = F.cross_entropy(logits_s.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    p_t = F.softmax(logits_t[kl_rows] / 1.5, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits_s[kl_rows] / 1.5, -1))).sum(-1).mean()
    want = ce + 0.5 * kl
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["hidden"], hidden.grad, rtol=1e-5, atol=1e-6)


def test_low_precision_model_gets_gradients_in_its_dtype_close_to_float32():
    specs = [TermSpec("forward_kl")]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        student, teacher, labels = _views(dtype=dtype)
        objective = DistillObjective(specs, teacher_config=Cfg(H_T), chunk_size=4)
        loss, _, grads = _loss_and_grads(objective, student, teacher, labels)
        assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads.values())
        results[dtype] = (loss, grads)
    loss32, grads32 = results[torch.float32]
    loss16, grads16 = results[torch.bfloat16]
    torch.testing.assert_close(loss16, loss32, rtol=0.05, atol=0.05)
    for k in grads32:  # bf16 weights and hidden states: a few percent
        assert (grads16[k].float() - grads32[k]).norm() < 0.05 * grads32[k].norm(), k


def test_a_term_without_closed_form_is_differentiated_by_autograd_in_the_fused_pass():
    class CubedGap(LogitTerm):
        """A user's logit term that only gives dense(): mean of (z_S - z_T)^3, not registered."""

        name = "cubed_gap_test"

        def dense(self, student_logits, teacher_logits):
            return (student_logits - teacher_logits).pow(3).mean(-1)

    student, teacher, labels = _views()
    objective = DistillObjective([TermSpec("forward_kl")], ce_weight=0.0, teacher_config=Cfg(H_T), chunk_size=4)
    template = objective.terms[0]
    custom = CubedGap(template.tokens, template.opts, 0.4, "cubed", template.ctx, set(), "")
    objective.terms = nn.ModuleList([custom])
    assert custom.reads_raw_logits()
    loss_f, _, grads_f = _loss_and_grads(objective, student, teacher, labels)
    objective.fused = False
    loss_p, _, grads_p = _loss_and_grads(objective, student, teacher, labels)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], rtol=1e-5, atol=1e-6)


def test_chunk_rows_from_mib_and_lm_heads_that_are_not_linear_are_refused():
    assert rows_per_chunk(32000, None, 32.0) == 262  # 262 rows x 32000 x 4 bytes <= 32 MiB
    assert rows_per_chunk(32000, 100, 32.0) == 100
    assert rows_per_chunk(10**9, None, 1.0) == 1
    student, teacher, labels = _views()
    assert head_weights(student)[0] is student.lm_head.weight
    student.lm_head = nn.Sequential(student.lm_head)
    with pytest.raises(ValueError, match="student's LM head is a Sequential, not an nn.Linear"):
        logit_loss(student, teacher, labels, True, [], [1.0])
    with pytest.raises(ValueError, match="chunk_mib must be > 0"):
        DistillObjective([], chunk_mib=0)
    with pytest.raises(ValueError, match="vocabulary 17 != teacher vocabulary 5"):
        student, teacher, labels = _views()
        teacher.lm_head = nn.Linear(H_T, 5)
        DistillObjective([TermSpec("forward_kl")], teacher_config=Cfg(H_T))(student, teacher, labels)


def test_a_sharded_lm_head_is_refused_clearly():
    student, teacher, labels = _views()
    student.lm_head.weight = nn.Parameter(torch.empty(0))  # a ZeRO-3 partitioned parameter outside its module
    with pytest.raises(ValueError, match=r"LM head weight is sharded \(Parameter of shape \(0,\)\)"):
        logit_loss(student, teacher, labels, True, [], [1.0])


def test_recipe_chunk_options_are_validated_and_reach_the_objective():
    from types import SimpleNamespace

    from llavadi.config import ConfigError, DistillConfig
    from llavadi.train.stage_inputs import build_objective

    with pytest.raises(ConfigError, match="distill.chunk_mib must be > 0"):
        DistillConfig(chunk_mib=0).validate("distill")
    stage = SimpleNamespace(distill=DistillConfig(chunk_mib=8.0))  # SFT: CE only, no teacher
    loaded = SimpleNamespace(tokenizer=None, model=SimpleNamespace(config=Cfg(H_S)))
    objective = build_objective(stage, loaded, None)
    assert (objective.chunk_size, objective.chunk_mib, objective.fused) == (None, 8.0, True)


def test_a_micro_batch_without_selected_positions_gives_zero_loss_and_zero_gradients():
    student, teacher, labels = _views()
    types = torch.where(student.token_types == RES, torch.full_like(student.token_types, INS), student.token_types)
    student.token_types = teacher.token_types = types  # no response token: nothing to predict
    objective = DistillObjective([TermSpec("forward_kl")], teacher_config=Cfg(H_T), chunk_size=4)
    loss, logged, grads = _loss_and_grads(objective, student, teacher, torch.full_like(labels, -100))
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in logged.values())
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
