"""ULD and GOLD on paired spans across vocabularies: values and gradients against plain reference computations
written here (a per-group Python loop and autograd, float64), and against TRL's GOLD loss on the same inputs."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from llavadi.data.token_alignment import AnswerTokens, align_answers
from llavadi.distill.cross_vocab import MatchedTokens, PairedGroups
from llavadi.distill.terms import TermContext, TermSpec, build_term, check_term
from llavadi.distill.view import ModelView

V_S, V_T, H_S, H_T = 23, 31, 8, 12


def _segment(length: int, gen: torch.Generator, max_piece: int = 4) -> list[tuple[int, int]]:
    """A random split of `length` bytes into consecutive pieces."""
    cuts, pos = [], 0
    while pos < length:
        pos = min(length, pos + int(torch.randint(1, max_piece + 1, (1,), generator=gen)))
        cuts.append(pos)
    return [(a, b) for a, b in zip([0] + cuts[:-1], cuts)]


def _setup(seed=0, batch=2, answer_bytes=(17, 11)):
    """Two samples, each answer split differently by the two sides; models' last states, heads and paired groups."""
    gen = torch.Generator().manual_seed(seed)
    tokens = {"s": [], "t": []}
    layouts = []
    for b in range(batch):
        sides = {}
        for side, prompt in (("s", 3 + b), ("t", 5)):
            pieces = _segment(answer_bytes[b], gen)
            sides[side] = [(prompt + i, a, e) for i, (a, e) in enumerate(pieces)]
        layouts.append(sides)
    t_s = max(s["s"][-1][0] for s in layouts) + 2
    t_t = max(s["t"][-1][0] for s in layouts) + 2
    rows = []
    for b, sides in enumerate(layouts):
        groups = align_answers(AnswerTokens([sides["s"]], [answer_bytes[b]]),
                               AnswerTokens([sides["t"]], [answer_bytes[b]]), "x")
        rows += [[b, *g] for g in groups]
        tokens["s"].append(sides["s"])
        tokens["t"].append(sides["t"])
    ids_s = torch.randint(0, V_S, (batch, t_s), generator=gen)
    ids_t = torch.randint(0, V_T, (batch, t_t), generator=gen)
    paired = PairedGroups(torch.tensor(rows), ids_s, ids_t)
    dt = torch.float64
    h_s = (torch.randn(batch, t_s, H_S, generator=gen, dtype=dt) * 1.5).requires_grad_(True)
    h_t = torch.randn(batch, t_t, H_T, generator=gen, dtype=dt) * 1.5
    head_s, head_t = nn.Linear(H_S, V_S).double(), nn.Linear(H_T, V_T).double()
    torch.manual_seed(seed)
    for head in (head_s, head_t):
        nn.init.normal_(head.weight, std=0.8)
        nn.init.normal_(head.bias, std=0.5)
    return paired, tokens, h_s, h_t, head_s, head_t


def _matched() -> MatchedTokens:
    student = torch.tensor([0, 2, 3, 5, 7, 11, 13, 17])
    teacher = torch.tensor([1, 4, 6, 3, 9, 30, 12, 20])
    return MatchedTokens(student, teacher, V_T)


def _merged(logp, ids, b, first, last, merge):
    """A span's merged log-row, written plainly: base row + the other tokens' log-probs."""
    rows = list(range(first - 1, last))
    base = rows[0] if merge == "first" else rows[-1]
    out = logp[b, base].clone()
    for r in rows:
        if r != base:
            out = out + logp[b, r, ids[b, r + 1]]
    return out


def _sorted_l1(p, q, top_k):
    ps, qs = torch.sort(p, descending=True).values, torch.sort(q, descending=True).values
    if top_k:
        ps, qs = ps[:top_k], qs[:top_k]
    n = max(len(ps), len(qs)) if not top_k else top_k
    ps = torch.cat([ps, ps.new_zeros(n - len(ps))])
    qs = torch.cat([qs, qs.new_zeros(n - len(qs))])
    return (ps - qs).abs().sum()


def _jsd(a, b, beta):
    if beta == 0:
        return (b * (b.log() - a.log())).sum()
    if beta == 1:
        return (a * (a.log() - b.log())).sum()
    m = beta * b + (1 - beta) * a
    return beta * (b * (b / m).log()).sum() + (1 - beta) * (a * (a / m).log()).sum()


def _reference(name, opts, paired, h_s, h_t, head_s, head_t, matched):
    """The term's sum over groups, by a loop over groups and plain tensor code (autograd gives its gradient)."""
    temp = opts.get("temperature", 1.0)
    merge, top_k = opts.get("merge", "first"), opts.get("top_k", 256)
    lp_s = torch.log_softmax(head_s(h_s) / temp, -1)
    with torch.no_grad():
        lp_t = torch.log_softmax(head_t(h_t) / temp, -1)
    total = 0.0
    for b, s0, s1, t0, t1 in paired.groups.tolist():
        p = _merged(lp_s, paired.student_ids, b, s0, s1, merge).exp()
        q = _merged(lp_t, paired.teacher_ids, b, t0, t1, merge).exp()
        if name == "uld":
            total = total + _sorted_l1(p, q, top_k)
            continue
        share = len(matched.teacher_ids) / V_T
        w_m, w_u = opts.get("matched_weight", share), opts.get("unmatched_weight", 1 - share)
        keep_s = torch.ones(V_S, dtype=torch.bool)
        keep_s[matched.student_ids] = False
        keep_t = torch.ones(V_T, dtype=torch.bool)
        keep_t[matched.teacher_ids] = False
        total = total + w_m * _jsd(p[matched.student_ids], q[matched.teacher_ids], opts.get("beta", 0.5))
        total = total + w_u * _sorted_l1(p[keep_s], q[keep_t], top_k)
    return total


def _ours(name, opts, paired, h_s, h_t, head_s, head_t, matched, **chunks):
    ctx = TermContext(student_width=H_S, teacher_width=H_T, cross_tokenizer=True, matched_tokens=matched, **chunks)
    term = build_term(TermSpec(name, options=opts), name, ctx, "distill.terms[0]")
    types_s = torch.full(h_s.shape[:2], 3)
    student = ModelView(token_types=types_s, last_hidden=h_s, lm_head=head_s, who="student")
    teacher = ModelView(token_types=torch.full(h_t.shape[:2], 3), last_hidden=h_t, lm_head=head_t, who="teacher",
                        alignment=paired)
    return term(student, teacher)


CASES = [
    ("uld", {}),
    ("uld", {"top_k": 0, "merge": "last"}),
    ("uld", {"top_k": 5, "temperature": 2.0}),
    ("gold", {}),
    ("gold", {"top_k": 0, "beta": 0.0, "merge": "last"}),
    ("gold", {"top_k": 4, "beta": 1.0, "temperature": 0.7}),
    ("gold", {"beta": 0.3, "matched_weight": 2.0, "unmatched_weight": 0.5}),
]


@pytest.mark.parametrize("name,opts", CASES)
def test_value_and_gradients_match_the_plain_reference(name, opts):
    paired, _, h_s, h_t, head_s, head_t = _setup()
    assert (paired.groups[:, 2] > paired.groups[:, 1]).any() and (paired.groups[:, 4] > paired.groups[:, 3]).any()
    ref = _reference(name, opts, paired, h_s, h_t, head_s, head_t, _matched())
    grads_ref = torch.autograd.grad(ref, [h_s, head_s.weight, head_s.bias])
    ours = _ours(name, opts, paired, h_s, h_t, head_s, head_t, _matched())
    grads = torch.autograd.grad(ours * 3.0, [h_s, head_s.weight, head_s.bias])  # backward scales by the upstream 3
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-7), (float(ours), float(ref))
    for g, r in zip(grads, grads_ref):
        assert torch.allclose(g.double(), 3.0 * r, rtol=1e-5, atol=1e-8), (g - 3 * r).abs().max()


def test_a_perturbed_gradient_fails_the_comparison():
    """Negative control: the comparison above detects a wrong closed form (the base-row normalisation dropped)."""
    import llavadi.distill.cross_vocab as cv

    paired, _, h_s, h_t, head_s, head_t = _setup(seed=3)
    ref = _reference("uld", {}, paired, h_s, h_t, head_s, head_t, None)
    (g_ref,) = torch.autograd.grad(ref, [h_s])
    original = cv.AlignedPass._logit_grad

    def wrong(self, logp, grad_log, part, first):
        grad = original(self, logp, grad_log, part, first)
        return grad.add_(logp.exp() * 0.01)

    cv.AlignedPass._logit_grad = wrong
    try:
        (g,) = torch.autograd.grad(_ours("uld", {}, paired, h_s, h_t, head_s, head_t, None), [h_s])
    finally:
        cv.AlignedPass._logit_grad = original
    assert not torch.allclose(g.double(), g_ref, rtol=1e-5, atol=1e-8)


def test_chunking_does_not_change_the_result(monkeypatch):
    import llavadi.distill.terms.cross_vocab_terms as terms

    paired, _, h_s, h_t, head_s, head_t = _setup(seed=1)
    whole = _ours("gold", {}, paired, h_s, h_t, head_s, head_t, _matched())
    (g_whole,) = torch.autograd.grad(whole, [h_s])
    monkeypatch.setattr(terms, "rows_per_chunk", lambda vocab, size, mib: 3)  # a few groups per chunk
    chunked = _ours("gold", {}, paired, h_s, h_t, head_s, head_t, _matched())
    (g_chunked,) = torch.autograd.grad(chunked, [h_s])
    assert torch.allclose(whole, chunked, rtol=1e-6) and torch.allclose(g_whole, g_chunked, rtol=1e-6, atol=1e-10)


def test_the_stage_chunk_size_and_chunk_mib_set_the_passes_chunks(monkeypatch):
    import llavadi.distill.cross_vocab as cv
    import llavadi.distill.terms.cross_vocab_terms as terms

    steps = []

    class Recorded(cv.AlignedPass):
        def __init__(self, *args):
            steps.append(args[-1])
            super().__init__(*args)

    monkeypatch.setattr(terms, "AlignedPass", Recorded)
    paired, _, h_s, h_t, head_s, head_t = _setup(seed=1)
    values = [_ours("gold", {}, paired, h_s, h_t, head_s, head_t, _matched(), **chunks)
              for chunks in ({}, {"chunk_size": 3}, {"chunk_mib": 1e-6})]
    vocab = max(head_s.weight.shape[0], head_t.weight.shape[0])
    assert steps == [max(1, int(32 * 2**20) // (4 * vocab)), 3, 1]
    assert steps[0] > len(paired) > 3 > steps[2]  # one chunk, a few, one group per chunk: the same value
    assert torch.allclose(values[0], values[1], rtol=1e-6) and torch.allclose(values[0], values[2], rtol=1e-6)


def test_same_tokenization_pairs_each_answer_token_with_itself():
    """Without an alignment (one tokenizer), ULD over the whole vocabulary is the per-position sorted distance."""
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(1, 6, H_S, generator=gen, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(1, 6, H_T, generator=gen, dtype=torch.float64)
    head_s, head_t = nn.Linear(H_S, V_S).double(), nn.Linear(H_T, V_S).double()
    types = torch.tensor([[2, 2, 3, 3, 3, 0]])
    ctx = TermContext(student_width=H_S, teacher_width=H_T)
    term = build_term(TermSpec("uld", options={"top_k": 0}), "uld", ctx, "t")
    value = term(ModelView(types, h_s, head_s), ModelView(types, h_t, head_t))
    p = torch.softmax(head_s(h_s), -1)[0, 1:4]
    q = torch.softmax(head_t(h_t), -1)[0, 1:4]
    ref = sum(_sorted_l1(p[i], q[i], 0) for i in range(3))
    assert torch.allclose(value.double(), ref, rtol=1e-6)


def test_topk_teacher_matches_its_dense_truncation():
    """A top-k teacher equals a dense teacher whose rows are zero outside their top-k (mass kept, T = 1)."""
    paired, _, h_s, h_t, head_s, head_t = _setup(seed=2)
    k = 6
    with torch.no_grad():
        lp = torch.log_softmax(head_t(h_t), -1)
    top = lp.topk(k, dim=-1)
    ctx = TermContext(student_width=H_S, teacher_signal="topk", matched_tokens=_matched())
    student = ModelView(torch.full(h_s.shape[:2], 3), h_s, head_s)
    teacher = ModelView(torch.full(h_t.shape[:2], 3), topk_ids=top.indices, topk_logprobs=top.values,
                        alignment=paired)
    for name, opts in (("uld", {"top_k": 0}), ("gold", {"top_k": 0, "beta": 0.5})):
        value = build_term(TermSpec(name, options=opts), name, ctx, "t")(student, teacher)
        # reference: the dense teacher with -inf outside each row's top-k; a merge's other tokens read their
        # log-prob in the top-k, or the row's smallest cached one
        truncated = torch.full_like(lp, float("-inf")).scatter(-1, top.indices, top.values)
        ref = 0.0
        lp_s = torch.log_softmax(head_s(h_s), -1)
        for b, s0, s1, t0, t1 in paired.groups.tolist():
            p = _merged(lp_s, paired.student_ids, b, s0, s1, "first").exp()
            q = truncated[b, t0 - 1].clone()
            for r in range(t0, t1):
                tok = paired.teacher_ids[b, r + 1]
                q = q + (lp[b, r, tok] if tok in top.indices[b, r] else top.values[b, r].min())
            q = q.exp()
            if name == "uld":
                ref = ref + _sorted_l1(p, q, 0)
            else:
                m = _matched()
                share = len(m.teacher_ids) / V_T
                keep_s = torch.ones(V_S, dtype=torch.bool)
                keep_s[m.student_ids] = False
                keep_t = torch.ones(V_T, dtype=torch.bool)
                keep_t[m.teacher_ids] = False
                a, bq = p[m.student_ids], q[m.teacher_ids]
                mix = 0.5 * a + 0.5 * bq
                jsd = 0.5 * torch.where(bq > 0, bq * (bq / mix).log(), 0).sum() + 0.5 * (a * (a / mix).log()).sum()
                ref = ref + share * jsd + (1 - share) * _sorted_l1(p[keep_s], q[keep_t], 0)
        assert torch.allclose(value.double(), ref.detach(), rtol=1e-5), (name, float(value), float(ref))


def test_options_are_checked_up_front():
    ctx = TermContext(student_width=H_S, teacher_width=H_T)
    with pytest.raises(ValueError, match="matched_weight and unmatched_weight"):
        check_term(TermSpec("gold", options={"matched_weight": 1.0}))
    with pytest.raises(ValueError, match="map of token strings"):
        build_term(TermSpec("gold"), "gold", TermContext(cross_tokenizer=True), "distill.terms[0]")
    build_term(TermSpec("gold"), "gold", ctx, "distill.terms[0]")  # one tokenizer: every id matches itself
    with pytest.raises(ValueError, match="tokens 'image' is not accepted"):
        check_term(TermSpec("uld", tokens="image"))
    # a top-k cache across tokenizers holds the teacher's rows of its own rendering (tests/test_cross_tokenizer_cache.py)
    build_term(TermSpec("uld"), "uld", TermContext(teacher_signal="topk", cross_tokenizer=True), "t")
    with pytest.raises(ValueError, match="beta 1 \\(reverse KL\\) against a top-k teacher"):
        build_term(TermSpec("gold", options={"beta": 1.0}), "gold", TermContext(teacher_signal="topk"), "t")


@pytest.mark.parametrize("hybrid", [False, True])
def test_equals_trl_gold_loss(hybrid):
    """TRL's ULDLoss (extended alignment by byte offsets, "bayesian" merge = our merge "last", whole vocabulary)."""
    pytest.importorskip("trl")
    from trl.experimental.gold.gold_trainer import ULDLoss

    paired, tokens, h_s, h_t, head_s, head_t = _setup(seed=4, batch=1)
    matched = _matched()
    config = types.SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=True,
        uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=hybrid, uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None, beta=0.5)

    def vocab(size, ids, prefix):  # token strings: matched ids share a string, the others are unique per side
        names = {i: f"{prefix}{i}" for i in range(size)}
        names.update({int(i): f"shared{k}" for k, i in enumerate(ids)})
        return types.SimpleNamespace(get_vocab=lambda: {v: k for k, v in names.items()})

    loss = ULDLoss(config, vocab(V_S, matched.student_ids, "s"), vocab(V_T, matched.teacher_ids, "t"))
    inputs = {}
    for side, ids, h, head in (("s", paired.student_ids, h_s, head_s), ("t", paired.teacher_ids, h_t, head_t)):
        labels = torch.full_like(ids, -100)
        offsets = torch.zeros(*ids.shape, 2, dtype=torch.long)
        for pos, a, e in tokens[side][0]:
            labels[0, pos] = ids[0, pos]
            offsets[0, pos] = torch.tensor([a, e])
        inputs[side] = (head(h).detach().float(), labels, ids, offsets)
    trl_value = loss(inputs["s"][0], inputs["t"][0], inputs["s"][1], inputs["t"][1], inputs["s"][2], inputs["t"][2],
                     student_byte_offsets=inputs["s"][3], teacher_byte_offsets=inputs["t"][3])
    ours = _ours("gold" if hybrid else "uld", {"top_k": 0, "merge": "last"}, paired, h_s, h_t, head_s, head_t, matched)
    # TRL averages over a sample's groups; our term is the sum over them
    assert torch.allclose(ours.detach().float() / len(paired), trl_value.float(), rtol=1e-4), (float(ours), float(trl_value))


# each declared option of uld and gold with a base setting and one where only that option differs
CROSS_OPTION_CASES = {
    ("uld", "temperature"): ({}, {"temperature": 2.0}),
    ("uld", "top_k"): ({"top_k": 3}, {"top_k": 0}),
    ("uld", "merge"): ({}, {"merge": "last"}),
    ("gold", "temperature"): ({}, {"temperature": 2.0}),
    ("gold", "top_k"): ({"top_k": 3}, {"top_k": 0}),
    ("gold", "merge"): ({}, {"merge": "last"}),
    ("gold", "beta"): ({}, {"beta": 0.1}),
    ("gold", "matched_weight"): ({"matched_weight": 1.0, "unmatched_weight": 1.0},
                                 {"matched_weight": 2.0, "unmatched_weight": 1.0}),
    ("gold", "unmatched_weight"): ({"matched_weight": 1.0, "unmatched_weight": 1.0},
                                   {"matched_weight": 1.0, "unmatched_weight": 2.0}),
}


@pytest.mark.parametrize("case", sorted(CROSS_OPTION_CASES), ids=lambda c: f"{c[0]}.{c[1]}")
def test_each_option_changes_the_computation(case):
    paired, _, h_s, h_t, head_s, head_t = _setup(seed=5)
    base, changed = CROSS_OPTION_CASES[case]
    a = _ours(case[0], base, paired, h_s, h_t, head_s, head_t, _matched()).item()
    b = _ours(case[0], changed, paired, h_s, h_t, head_s, head_t, _matched()).item()
    assert a != pytest.approx(b, rel=1e-4, abs=0.0), f"{case}: {a} vs {b}"
