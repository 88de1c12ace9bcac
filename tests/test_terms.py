"""Term classes: every declared option changes the computation; settings that make no sense are refused;
llava_view captures exactly what the terms ask for."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_objective import PAD, RES, VOCAB, _tiny_llava, make_batch

from llavadi.distill.objective import DistillObjective
from llavadi.distill.terms import TERMS, TermSpec, check_term, term_class
from llavadi.distill.view import ModelView, Needs, llava_view

torch.set_num_threads(1)

# For each (term, option): options of a base setting and of one where only that option differs.
# Every declared option of every registered term must appear here (a new option needs its proof).
SPARSE = "topk"
OPTION_CASES = {
    ("forward_kl", "temperature"): ({}, {"temperature": 2.0}),
    ("forward_kl", "scale_t2"): ({"temperature": 2.0}, {"temperature": 2.0, "scale_t2": True}),
    ("forward_kl", "missing_mass"): ({"missing_mass": "renormalize"}, {"missing_mass": "rest"}, SPARSE),
    ("reverse_kl", "temperature"): ({}, {"temperature": 2.0}),
    ("reverse_kl", "scale_t2"): ({"temperature": 2.0}, {"temperature": 2.0, "scale_t2": True}),
    ("jsd", "temperature"): ({}, {"temperature": 2.0}),
    ("jsd", "scale_t2"): ({"temperature": 2.0}, {"temperature": 2.0, "scale_t2": True}),
    ("jsd", "beta"): ({}, {"beta": 0.2}),
    ("jsd", "missing_mass"): ({"missing_mass": "renormalize"}, {"missing_mass": "rest"}, SPARSE),
    ("tvd", "temperature"): ({}, {"temperature": 2.0}),
    ("tvd", "scale_t2"): ({"temperature": 2.0}, {"temperature": 2.0, "scale_t2": True}),
    ("skew_forward_kl", "temperature"): ({}, {"temperature": 2.0}),
    ("skew_forward_kl", "scale_t2"): ({"temperature": 2.0}, {"temperature": 2.0, "scale_t2": True}),
    ("skew_forward_kl", "alpha"): ({}, {"alpha": 0.5}),
    ("skew_reverse_kl", "temperature"): ({}, {"temperature": 2.0}),
    ("skew_reverse_kl", "scale_t2"): ({"temperature": 2.0}, {"temperature": 2.0, "scale_t2": True}),
    ("skew_reverse_kl", "alpha"): ({}, {"alpha": 0.5}),
    ("logit_mse", "temperature"): ({}, {"temperature": 2.0}),
    ("logit_mse", "scale_t2"): ({"temperature": 2.0}, {"temperature": 2.0, "scale_t2": True}),
    ("logit_mse", "zscore"): ({}, {"zscore": True}),
    ("hidden_mse", "layers"): ({}, {"layers": [[1, 1]]}),
    ("hidden_mse", "projector"): ({"projector": "linear"}, {"projector": "mlp"}),
    ("hidden_mse", "loss"): ({}, {"loss": "cosine"}),
    ("visual_align", "source"): ({}, {"source": "projector"}),
    ("visual_align", "layer"): ({}, {"layer": 1}),
    ("visual_align", "projector"): ({"projector": "linear"}, {"projector": "mlp"}),
    ("visual_align", "loss"): ({}, {"loss": "cosine"}),
    ("visual_self_corr", "source"): ({}, {"source": "projector"}),
    ("visual_self_corr", "layer"): ({}, {"layer": 1}),
    ("affinity", "rows"): ({}, {"rows": "instruction"}),
    ("affinity", "cols"): ({}, {"cols": "instruction"}),
    ("affinity", "layer"): ({}, {"layer": 1}),
    ("attention", "rows"): ({}, {"rows": "image", "cols": "image"}),
    ("attention", "cols"): ({}, {"cols": "instruction"}),
    ("attention", "layer"): ({}, {"layer": 0}),
    ("attention", "loss"): ({}, {"loss": "kl"}),
}


@pytest.fixture(scope="module")
def pair():
    """A tiny student and teacher LLaVA (same image-token count), a batch, and the teacher's top-k."""
    student, teacher = _tiny_llava(16, 2, 16, seed=1), _tiny_llava(24, 3, 16, seed=2)
    ids, types, labels, _ = make_batch(4, batch=3)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # samples 0 and 1 have images
    inputs = dict(input_ids=ids, attention_mask=(types != PAD).long(), pixel_values=pixels)
    return student, teacher, inputs, types, labels


def term_value(pair, name, options, signal="dense", tokens=None):
    """The term's normalised value alone on the batch (projectors initialised from seed 0)."""
    student, teacher, inputs, types, labels = pair
    torch.manual_seed(0)
    objective = DistillObjective([TermSpec(name, tokens=tokens, options=options)], ce_weight=0.0,
                                 student_config=student.config, teacher_config=teacher.config, chunk_size=4,
                                 teacher_signal=signal)
    s_view = llava_view(student, inputs, types, objective.student_needs, who="student")
    with torch.no_grad():
        t_view = llava_view(teacher, inputs, types, objective.teacher_needs | Needs(last_hidden=True), who="teacher")
    if signal == SPARSE:
        logp = F.log_softmax(teacher.lm_head(t_view.last_hidden), dim=-1)
        top = logp.topk(5, dim=-1)  # k < vocabulary: there is missing mass
        t_view = ModelView(token_types=types, topk_ids=top.indices, topk_logprobs=top.values)
    _, logged = objective(s_view, t_view, labels)
    return logged[name].item()


def test_every_declared_option_has_a_case():
    from test_cross_vocab_terms import CROSS_OPTION_CASES  # uld and gold: proven on paired spans there

    declared = {(name, o.name) for name, cls in TERMS.items() for o in cls.options}
    assert declared == set(OPTION_CASES) | set(CROSS_OPTION_CASES)


@pytest.mark.parametrize("case", sorted(OPTION_CASES), ids=lambda c: f"{c[0]}.{c[1]}")
def test_each_option_changes_the_computation(pair, case):
    base, changed, *signal = OPTION_CASES[case]
    signal = signal[0] if signal else "dense"
    a = term_value(pair, case[0], base, signal)
    b = term_value(pair, case[0], changed, signal)
    assert torch.isfinite(torch.tensor([a, b])).all()
    assert a != pytest.approx(b, rel=1e-4, abs=0.0), f"{case}: {a} vs {b}"


def test_attention_rows_are_the_rows_it_reads(pair):
    """rows: image reads image rows (once it read `tokens` instead); checked against a hand computation."""
    student, teacher, inputs, types, labels = pair
    value = term_value(pair, "attention", {"rows": "image", "cols": "image", "layer": 0})
    with torch.no_grad():
        a_s = llava_view(student, inputs, types, Needs(attention_layers=frozenset({0}))).attention(0, "t")
        a_t = llava_view(teacher, inputs, types, Needs(attention_layers=frozenset({0}))).attention(0, "t")
    errors = []
    for b in range(types.shape[0]):
        img = (types[b] == 1).nonzero().squeeze(1)
        if len(img) == 0:
            continue
        block_s = a_s[b][:, img][:, :, img].mean(0)  # head counts differ (2 vs 3): head-averaged maps
        block_t = a_t[b][:, img][:, :, img].mean(0)
        errors.append((block_s - block_t).pow(2))
    assert value == pytest.approx(torch.cat([e.reshape(-1) for e in errors]).mean().item(), rel=1e-5)


def test_refused_settings_say_why():
    with pytest.raises(ValueError, match="missing_mass applies to a top-k"):
        DistillObjective([TermSpec("forward_kl", options={"missing_mass": "rest"})],
                         teacher_config=SimpleNamespace(hidden_size=8))
    with pytest.raises(ValueError, match="beta 1 .* renormalised top-k teacher"):
        DistillObjective([TermSpec("jsd", options={"beta": 1.0})], teacher_signal="topk")
    with pytest.raises(ValueError, match="needs dense teacher logits"):
        DistillObjective([TermSpec("reverse_kl")], teacher_signal="topk")
    with pytest.raises(ValueError, match="selects rows and columns: set options rows/cols"):
        check_term(TermSpec("affinity", tokens="response"))
    with pytest.raises(ValueError, match="selects rows and columns"):
        check_term(TermSpec("attention", tokens="image"))
    with pytest.raises(ValueError, match="temperature cancels in z-scored logits"):
        check_term(TermSpec("logit_mse", options={"zscore": True, "temperature": 2.0}))
    check_term(TermSpec("logit_mse", options={"zscore": True, "temperature": 2.0, "scale_t2": True}))  # T acts through T^2
    with pytest.raises(ValueError, match="`layer` applies to source 'hidden' only"):
        check_term(TermSpec("visual_align", options={"source": "projector", "layer": 1}))
    with pytest.raises(ValueError, match="option 'rows' must be a token group"):
        check_term(TermSpec("affinity", options={"rows": "answers"}))
    with pytest.raises(ValueError, match="option 'temperature' must be a number"):
        check_term(TermSpec("forward_kl", options={"temperature": "hot"}))
    with pytest.raises(ValueError, match="option 'scale_t2' must be true or false"):
        check_term(TermSpec("forward_kl", options={"scale_t2": 1}))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        TermSpec("forward_kl", weight=-1)
    with pytest.raises(ValueError, match="unknown distillation term 'fkl'; valid terms: forward_kl, reverse_kl"):
        term_class("fkl")


def test_unknown_option_lists_the_declared_ones_with_defaults():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temp'\]; valid options: temperature \(0.0 < x, "
                                         r"default 1.0\)"):
        check_term(TermSpec("forward_kl", options={"temp": 2}))


def test_defaults_match_the_documented_paper_recipe():
    hidden = term_class("hidden_mse").resolve(None, {}, "")
    assert hidden == ("response", {"layers": None, "projector": "mlp", "loss": "mse"})
    assert term_class("forward_kl").resolve(None, {}, "")[1]["temperature"] == 1.0
    assert term_class("visual_align").resolve(None, {}, "")[0] == "image"
    assert term_class("affinity").resolve(None, {}, "") == (None, {"rows": "image", "cols": "response", "layer": None})


def test_llava_view_captures_only_what_is_asked(pair):
    student, _, inputs, types, _ = pair
    ref = student.model(**inputs, output_hidden_states=True, output_attentions=True)
    view = llava_view(student, inputs, types, Needs(hidden_layers=frozenset({0, -2}), attention_layers=frozenset({-1})))
    assert sorted(view.hidden_states) == [0, 1] and sorted(view.attentions) == [1]
    for layer in (0, 1, 2, -1, -2, -3):
        torch.testing.assert_close(view.hidden(layer, "t"), ref.hidden_states[layer])
    torch.testing.assert_close(view.attention(-1, "t"), ref.attentions[-1])
    assert view.image_features is None
    with pytest.raises(ValueError, match="hidden state 3 is out of range for the model's 3 hidden states"):
        view.hidden(3, "t")
    with pytest.raises(ValueError, match="attention maps of layer 0, which were not captured"):
        view.attention(0, "t")
    bare = llava_view(student, inputs, types, Needs(last_hidden=True))
    assert bare.hidden_states == {} and bare.attentions == {}


def test_token_types_route_hidden_terms_to_their_group(pair):
    """Same term, other group: a different value; response rows == RES tokens."""
    assert term_value(pair, "hidden_mse", {}, tokens="response") != pytest.approx(
        term_value(pair, "hidden_mse", {}, tokens="instruction"))
    assert RES == 3 and VOCAB > 5


def test_the_documented_example_term_works_end_to_end():
    """docs/adding-a-term.md's example term class, run as written, against a plain reference."""
    import re
    from pathlib import Path

    from llavadi.distill.terms import TERMS

    page = (Path(__file__).resolve().parents[1] / "docs" / "adding-a-term.md").read_text()
    code = re.search(r"## A term\n.*?```python\n(.*?)```", page, re.S).group(1)
    try:
        exec(compile(code, "docs/adding-a-term.md", "exec"), {})
        assert "hidden_l1" in TERMS
        spec = TermSpec("hidden_l1", options={"layer": 1})
        objective = DistillObjective([spec], ce_weight=0.0, teacher_signal="dense", teacher_config=SimpleNamespace(
            hidden_size=16), student_config=SimpleNamespace(hidden_size=16))
        student, teacher = _tiny_llava(16, 2, 16, seed=1), _tiny_llava(16, 2, 16, seed=2)
        ids, types, labels, _ = make_batch(4, batch=3)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        inputs = dict(input_ids=ids, attention_mask=(types != PAD).long(), pixel_values=pixels)
        s_view = llava_view(student, inputs, types, objective.student_needs)
        with torch.no_grad():
            t_view = llava_view(teacher, inputs, types, objective.teacher_needs)
        loss, logged = objective(s_view, t_view, labels)
        ref_s = student.model(**inputs, output_hidden_states=True).hidden_states[1]
        ref_t = teacher.model(**inputs, output_hidden_states=True).hidden_states[1]
        mask = types == RES
        assert loss.item() == pytest.approx((ref_s[mask] - ref_t[mask]).abs().mean(-1).mean().item(), rel=1e-5)
        loss.backward()
    finally:
        TERMS.pop("hidden_l1", None)


def test_terms_command_lists_every_term_with_its_declared_options(capsys):
    from llavadi.cli import main

    assert main(["terms"]) == 0
    out = capsys.readouterr().out
    for name, cls in TERMS.items():
        assert f"{name}: {cls.summary}" in out
        for option in cls.options:
            assert option.describe() in out
    assert main(["terms", "fkl"]) == 2
    assert "unknown distillation term 'fkl'" in capsys.readouterr().err


def test_a_logit_term_that_cannot_compute_is_refused_when_its_class_is_defined():
    from llavadi.distill.divergences import TVD, Divergence
    from llavadi.distill.terms.logit_terms import LogitTerm, divergence_term

    with pytest.raises(TypeError, match="'no_way' gives no dense"):
        type("NoWay", (LogitTerm,), {"name": "no_way"})
    with pytest.raises(TypeError, match="'own_topk' sets supports_sparse but gives no sparse"):
        type("OwnTopk", (LogitTerm,), {"name": "own_topk", "supports_sparse": True,
                                       "dense": lambda self, s, t: (s - t).pow(2).mean(-1)})
    with pytest.raises(TypeError, match="has no name of its own"):
        divergence_term(type("Unnamed", (TVD,), {}))
    # giving the missing method makes each class valid (defined, not registered)
    type("Own", (LogitTerm,), {"name": "own", "dense": lambda self, s, t: (s - t).pow(2).mean(-1)})
    type("OwnTopk", (LogitTerm,), {"name": "own_topk", "supports_sparse": True,
                                   "dense": lambda self, s, t: (s - t).pow(2).mean(-1),
                                   "sparse": lambda self, s, ids, lp: s.new_zeros(s.shape[0])})
    # a divergence class is a term: its name, summary and options (declared once, on the divergence)
    term = TERMS["tvd"]
    assert term.divergence is TVD and term.options is TVD.options and term.summary == TVD.summary
    assert issubclass(TVD, Divergence) and not term.supports_sparse and TERMS["jsd"].supports_sparse
