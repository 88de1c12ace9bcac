"""Teacher-student tokenizer pairs: classification from tokenizer files, and logit terms over the shared tokens."""

import pytest
import torch
import torch.nn as nn
from tokenizer_layouts import llama_style_tokenizer

from llavadi.data.token_types import TokenType
from llavadi.data.tokenizer_pair import ADDITIONS, DIFFERENT, IDENTICAL, TokenizerPair, classify_pair
from llavadi.distill.objective import DistillObjective
from llavadi.distill.terms import TermSpec
from llavadi.distill.view import ModelView
from llavadi.distill.vocab import SharedVocab

torch.set_num_threads(1)


# ---------------------------------------------------------------- classification
def test_llava_hf_teacher_and_composed_student_are_the_same_tokenizer_up_to_additions():
    teacher = llama_style_tokenizer(("<image>", "<pad>"), pad="<pad>")  # 256 + <image> 256 + <pad> 257
    student = llama_style_tokenizer(("<image>",))  # 256 + <image> 256
    pair = classify_pair(teacher, student, teacher_rows=320, student_rows=256)
    assert pair.kind == ADDITIONS
    assert pair.n_shared == 257 and pair.teacher_ids == pair.student_ids == tuple(range(257))
    assert pair.only_teacher == (("<pad>", 257),) and pair.only_student == () and pair.moved == ()
    assert (pair.teacher_rows, pair.student_rows, pair.padded_teacher_rows, pair.padded_student_rows) == (320, 257, 62, 0)
    text = "\n".join(pair.describe())
    assert "the same tokenizer up to additions" in text and "'<pad>' (257)" in text
    assert "padded teacher LM-head rows without a token: 62 (258..319)" in text
    to_student = pair.teacher_to_student()
    assert to_student.shape == (320,) and to_student[256] == 256 and (to_student[257:] == -1).all()


def test_identical_moved_and_different_pairs():
    base = llama_style_tokenizer(("<image>",))
    assert classify_pair(base, llama_style_tokenizer(("<image>",))).kind == IDENTICAL
    assert classify_pair(base, llama_style_tokenizer(("<image>",)), 257, 320).kind == ADDITIONS  # padded rows only
    moved = classify_pair(llama_style_tokenizer(("<pad>", "<image>")), base)  # <image> at 257 vs 256
    assert moved.kind == ADDITIONS and ("<image>", 257, 256) in moved.moved
    assert moved.student_to_teacher()[256] == 257
    other = classify_pair(base, llama_style_tokenizer(("<image>",), vocab_size=240))
    assert other.kind == DIFFERENT
    assert any("merges" in d for d in other.differences) and any("base vocabulary" in d for d in other.differences)
    assert other.n_shared > 0  # exact-string matches still listed (cross-tokenizer terms read them)
    with pytest.raises(ValueError, match="different tokenizers"):
        SharedVocab.from_pair(other)


def test_a_different_normalizer_makes_a_different_tokenizer():
    from tokenizers import normalizers

    a, b = llama_style_tokenizer(), llama_style_tokenizer()
    b.backend_tokenizer.normalizer = normalizers.Lowercase()
    pair = classify_pair(a, b)
    assert pair.kind == DIFFERENT and pair.differences == ("normalizer",)


# ---------------------------------------------------------------- logit terms over the shared tokens
B, T, H_S, H_T, V = 2, 6, 5, 7, 11
INS, RES = int(TokenType.INSTRUCTION), int(TokenType.RESPONSE)
# the teacher has 3 extra rows (a <pad> at id 4 among the base tokens, and two padded rows at the end);
# the student one extra token (id 2); the shared tokens keep their order on both sides
TEACHER_IDS = tuple(i for i in range(V + 3) if i not in (4, V + 1, V + 2))
STUDENT_IDS = tuple(i for i in range(V + 1) if i != 2)


class Cfg:
    def __init__(self, width):
        self.hidden_size = width


def _pair() -> TokenizerPair:
    return TokenizerPair(ADDITIONS, TEACHER_IDS, STUDENT_IDS, (("<pad>", 4),), (("<extra>", 2),), (), V + 1, V + 1,
                         V + 3, V + 1)


def _heads(seed, extra_logit):
    """Identical-vocabulary heads (V rows) and the same heads with extra rows of bias `extra_logit` (float64)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    ws, bs = torch.randn(V, H_S, generator=g, dtype=dt), torch.randn(V, generator=g, dtype=dt)
    wt, bt = torch.randn(V, H_T, generator=g, dtype=dt), torch.randn(V, generator=g, dtype=dt)
    heads = {}
    for name, (w, b, ids, rows, width) in {"student": (ws, bs, STUDENT_IDS, V + 1, H_S),
                                           "teacher": (wt, bt, TEACHER_IDS, V + 3, H_T)}.items():
        plain = nn.Linear(width, V).double()
        wide = nn.Linear(width, rows).double()
        with torch.no_grad():
            plain.weight.copy_(w), plain.bias.copy_(b)
            wide.weight.copy_(torch.randn(rows, width, generator=g, dtype=dt))
            wide.bias.fill_(extra_logit)
            wide.weight[list(ids)] = w
            wide.bias[list(ids)] = b
        heads[name] = (plain, wide)
    return heads


def _run(spec, student_head, teacher_head, teacher_topk=None, vocab=None, fused=True, ce_weight=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    types = torch.full((B, T), RES)
    types[:, :2] = INS
    labels = torch.where(types == RES, torch.randint(0, V, (B, T), generator=g), torch.full((B, T), -100))
    if vocab is not None:  # the student's ids of the same tokens
        labels = torch.where(labels >= 0, torch.tensor(STUDENT_IDS)[labels.clamp_min(0)], labels)
    hidden_s = torch.randn(B, T, H_S, generator=g, dtype=torch.float64).requires_grad_(True)
    hidden_t = torch.randn(B, T, H_T, generator=g, dtype=torch.float64)
    signal = "dense" if teacher_topk is None else "topk"
    objective = DistillObjective(spec if isinstance(spec, list) else [spec], ce_weight=ce_weight,
                                 teacher_config=Cfg(H_T), student_config=Cfg(H_S), chunk_size=4,
                                 teacher_signal=signal, vocab=vocab, fused=fused)
    for p in student_head.parameters():
        p.grad = None
    student = ModelView(token_types=types, last_hidden=hidden_s, lm_head=student_head, who="student")
    if teacher_topk is None:
        teacher = ModelView(token_types=types, last_hidden=hidden_t, lm_head=teacher_head, who="teacher")
    else:
        with torch.no_grad():
            logp = torch.log_softmax(teacher_head(hidden_t), -1)
        top = logp.topk(teacher_topk, dim=-1).indices
        teacher = ModelView(token_types=types, topk_ids=top, topk_logprobs=logp.gather(-1, top), who="teacher")
    loss, logged = objective(student, teacher, labels)
    loss.backward()
    return loss.detach(), logged, hidden_s.grad, student_head.weight.grad.clone(), student_head.bias.grad.clone()


EXACT_SPECS = [TermSpec("forward_kl", 0.7), TermSpec("jsd", 0.5, options={"beta": 0.3, "temperature": 2.0}),
               TermSpec("logit_mse", 0.2), TermSpec("reverse_kl", 0.4, options={"temperature": 0.8})]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("spec", EXACT_SPECS, ids=lambda s: s.name)
def test_extra_rows_without_mass_give_the_identical_tokenizer_loss_and_gradients(spec, fused):
    heads = _heads(0, extra_logit=-1e4)  # exp(-1e4) is 0 in float64: the extra rows carry no mass
    want = _run(spec, heads["student"][0], heads["teacher"][0], fused=fused)
    got = _run(spec, heads["student"][1], heads["teacher"][1], vocab=SharedVocab.from_pair(_pair()), fused=fused)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-10, atol=1e-12)  # hidden
    ids = list(STUDENT_IDS)
    torch.testing.assert_close(got[3][ids], want[3], rtol=1e-10, atol=1e-12)  # weight rows of the shared tokens
    torch.testing.assert_close(got[4][ids], want[4], rtol=1e-10, atol=1e-12)
    assert got[3][2].abs().max() < 1e-12 and got[4][2].abs() < 1e-12  # the student-only row: no mass, no gradient
    for side in ("teacher", "student"):
        assert abs(float(got[1][f"vocab/outside_mass_{side}"])) < 1e-15  # the plain path's 1 - sum: rounding


@pytest.mark.parametrize("missing_mass", ["renormalize", "rest"])
@pytest.mark.parametrize("k", [4, V + 3])
def test_extra_rows_without_mass_give_the_identical_tokenizer_result_from_a_topk_teacher(k, missing_mass):
    heads = _heads(1, extra_logit=-1e4)
    spec = TermSpec("forward_kl", 0.6, options={"missing_mass": missing_mass, "temperature": 1.5})
    want = _run(spec, heads["student"][0], heads["teacher"][0], teacher_topk=min(k, V))
    # the cache holds the teacher's own ids; with k = V + 3 the 3 rows without mass are among them
    got = _run(spec, heads["student"][1], heads["teacher"][1], teacher_topk=k, vocab=SharedVocab.from_pair(_pair()))
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[3][list(STUDENT_IDS)], want[3], rtol=1e-9, atol=1e-12)


def test_with_mass_outside_terms_compare_the_renormalised_shared_distributions_and_log_the_outside_mass():
    heads = _heads(2, extra_logit=1.0)  # the extra rows carry real mass
    vocab = SharedVocab.from_pair(_pair())
    spec = TermSpec("forward_kl", 1.0)
    fused = _run(spec, heads["student"][1], heads["teacher"][1], vocab=vocab, ce_weight=0.0)
    # written out: softmax over each side's shared columns, KL(p_T || p_S) averaged over the term's rows
    g = torch.Generator().manual_seed(100)
    types = torch.full((B, T), RES)
    types[:, :2] = INS
    torch.randint(0, V, (B, T), generator=g)
    hidden_s = torch.randn(B, T, H_S, generator=g, dtype=torch.float64).requires_grad_(True)
    hidden_t = torch.randn(B, T, H_T, generator=g, dtype=torch.float64)
    rows = torch.zeros(B, T, dtype=torch.bool)
    rows[:, :-1] = types[:, 1:] == RES
    z_s = heads["student"][1](hidden_s)[rows]
    with torch.no_grad():
        z_t = heads["teacher"][1](hidden_t)[rows]
    p_s, p_t = torch.softmax(z_s[:, list(STUDENT_IDS)], -1), torch.softmax(z_t[:, list(TEACHER_IDS)], -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    kl.backward()
    torch.testing.assert_close(fused[0], kl.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[2], hidden_s.grad, rtol=1e-10, atol=1e-12)
    outside_t = torch.softmax(z_t, -1)[:, [4, V + 1, V + 2]].sum(-1).mean()
    outside_s = torch.softmax(z_s.detach(), -1)[:, 2].mean()
    assert outside_t > 0.05 and outside_s > 0.01
    torch.testing.assert_close(fused[1]["vocab/outside_mass_teacher"], outside_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused[1]["vocab/outside_mass_student"], outside_s, rtol=1e-10, atol=1e-12)
    plain = _run(spec, heads["student"][1], heads["teacher"][1], vocab=vocab, ce_weight=0.0, fused=False)
    for a, b in zip(fused[:1] + fused[2:], plain[:1] + plain[2:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key in fused[1]:
        torch.testing.assert_close(fused[1][key], plain[1][key], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- on-policy answers in the teacher's ids
def test_on_policy_answers_reach_the_teacher_view_through_the_id_map():
    from types import SimpleNamespace

    from llavadi.teacher.on_policy import with_answer
    from llavadi.train.stage_inputs import TEACHER_PREFIX, answer_id_maps

    teacher = llama_style_tokenizer(("<pad>", "<image>"), pad="<pad>")  # <image> at 257 (the student's: 256)
    student = llama_style_tokenizer(("<image>", "<extra>"))  # <extra> (257) the teacher lacks

    def loaded(tok, rows):
        return SimpleNamespace(tokenizer=tok, model=SimpleNamespace(config=SimpleNamespace(vocab_size=rows)))

    maps = answer_id_maps(loaded(student, 258), loaded(teacher, 320), ("", TEACHER_PREFIX))
    ins, res = int(TokenType.INSTRUCTION), int(TokenType.RESPONSE)
    item = {"sample_id": "q7", "input_ids": [1, 256, 5, 9], "token_types": [ins, ins, ins, res], "labels": [-100] * 4,
            TEACHER_PREFIX + "input_ids": [1, 257, 5, 9], TEACHER_PREFIX + "token_types": [ins, ins, ins, res],
            TEACHER_PREFIX + "labels": [-100] * 4}
    word = student.convert_tokens_to_ids("▁red")
    out = with_answer(item, [word, 256, 2], ("", TEACHER_PREFIX), 64, maps)
    assert out["input_ids"] == [1, 256, 5, word, 256, 2]
    assert out[TEACHER_PREFIX + "input_ids"] == [1, 257, 5, teacher.convert_tokens_to_ids("▁red"), 257, 2]
    with pytest.raises(ValueError, match=r"sample 'q7': the student sampled token id\(s\) \[257\] that the teacher"):
        with_answer(item, [word, 257], ("", TEACHER_PREFIX), 64, maps)
    same = answer_id_maps(loaded(student, 258), loaded(student, 258), ("", TEACHER_PREFIX))
    assert same == {}  # one tokenizer (another image layout): the ids are the teacher's already
    # different tokenizers: no id map (the sampled answer is re-tokenized for the teacher, TeacherRetokenizer)
    assert answer_id_maps(loaded(student, 258), loaded(llama_style_tokenizer(vocab_size=240), 240),
                          ("", TEACHER_PREFIX)) == {}


@pytest.mark.parametrize("k", [None, 5])
def test_fused_equals_plain_over_the_shared_tokens_with_ce_and_terms_on_other_rows(k):
    """CE on the student's whole vocabulary, terms on different row groups (chunks read subsets), extra rows with mass."""
    heads = _heads(3, extra_logit=0.5)
    vocab = SharedVocab.from_pair(_pair())
    specs = [TermSpec("forward_kl", 0.5, tokens="all"), TermSpec("jsd", 0.3, options={"beta": 0.4})]
    if k is not None:
        specs = [TermSpec("forward_kl", 0.5, tokens="all", options={"missing_mass": "rest"}),
                 TermSpec("jsd", 0.3, options={"beta": 0.4})]
    got, want = (_run(specs, heads["student"][1], heads["teacher"][1], teacher_topk=k, vocab=vocab, fused=fused)
                 for fused in (True, False))
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert list(got[1]) == ["ce", "forward_kl", "jsd", "vocab/outside_mass_teacher", "vocab/outside_mass_student"]
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-9, atol=1e-12, msg=key)


def test_a_frozen_teachers_reordered_head_is_gathered_once_and_again_when_it_changes():
    """The <pad>-moved teacher's shared rows are a copy kept across steps while its head tensors are unchanged."""
    vocab = SharedVocab.from_pair(_pair())
    head = nn.Linear(H_T, V + 3).double().requires_grad_(False)  # frozen, as an online teacher is
    ids = list(TEACHER_IDS)

    def shared():
        return vocab.teacher_heads(head.weight, head.bias)[0]

    first, second = shared(), shared()
    assert vocab.teacher_copy.gathers == 1 and second[0].data_ptr() == first[0].data_ptr()  # the same copy
    assert torch.equal(first[0], head.weight[ids]) and torch.equal(first[1], head.bias[ids])
    with torch.no_grad():
        head.weight.mul_(2.0)  # written in place: its version counter moves
    assert torch.equal(shared()[0], head.weight[ids]) and vocab.teacher_copy.gathers == 2
    head.load_state_dict({"weight": torch.zeros_like(head.weight), "bias": head.bias.detach() + 1})
    rows = shared()
    assert vocab.teacher_copy.gathers == 3 and rows[0].abs().sum() == 0 and torch.equal(rows[1], head.bias[ids])
    head.weight = nn.Parameter(torch.ones_like(head.weight), requires_grad=False)  # another tensor
    assert torch.equal(shared()[0], head.weight[ids]) and vocab.teacher_copy.gathers == 4
    import copy
    import pickle

    for other in (copy.deepcopy(vocab), pickle.loads(pickle.dumps(vocab))):  # a copy starts without the rows
        assert other.teacher_copy._rows is None and torch.equal(other.teacher_heads(head.weight, head.bias)[0][0],
                                                                 head.weight[ids])
    trained = nn.Linear(H_T, V + 3).double()  # requires grad: gathered at every read, nothing kept
    for _ in range(2):
        assert torch.equal(vocab.teacher_heads(trained.weight, trained.bias)[0][0], trained.weight[ids])
    assert vocab.teacher_copy.gathers == 4
