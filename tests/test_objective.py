"""DistillObjective: routing, normalisation (grad accumulation), chunked = plain, sparse teacher, errors, I/O."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llavadi.data.token_types import TokenType
from llavadi.data.tokenizer_pair import classify_pair
from llavadi.distill.compat import logit_vocab
from llavadi.distill.module import PROJECTOR_FILE, load_projectors, save_projectors
from llavadi.distill.objective import DistillObjective
from llavadi.distill.selection import Pairs, Predictions, Targets, Tokens
from llavadi.distill.terms import TermSpec, check_term, is_logit_term
from llavadi.distill.view import ModelView, Needs

torch.set_num_threads(1)

VOCAB = 29
IMAGE_ID = 1
PAD, IMG, INS, RES = int(TokenType.PAD), int(TokenType.IMAGE), int(TokenType.INSTRUCTION), int(TokenType.RESPONSE)


class StandIn(nn.Module):
    """A tiny causal LM stand-in for the LLaVA language side: what the objective reads, nothing more."""

    def __init__(self, width, heads, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.image_proj = nn.Linear(3, width)  # "multi-modal projector": pixel features -> image-token embeddings
        self.layer1 = nn.Linear(width, width)
        self.layer2 = nn.Linear(width, width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        self.heads = heads

    def forward(self, input_ids, token_types, pixels):
        image_features = self.image_proj(pixels)  # (n_images, n_tok, width)
        h0 = self.embed(input_ids)
        h0 = h0.masked_scatter((token_types == IMG).unsqueeze(-1), image_features.reshape(-1, h0.shape[-1]))
        h1 = torch.tanh(self.layer1(h0))
        h2 = torch.tanh(self.layer2(h1)) + h1
        b, t, w = h2.shape
        q = h2.reshape(b, t, self.heads, w // self.heads).transpose(1, 2)
        scores = q @ q.transpose(-1, -2) / (w // self.heads) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        return ModelView(
            last_hidden=h2,
            lm_head=self.lm_head,
            token_types=token_types,
            hidden_states=(h0, h1, h2),
            attentions=(attn,),
            image_features=image_features,
        )


def make_batch(n_image_tokens, seed=0, batch=8):
    """Samples: instruction, [image], instruction, response, padding. Text identical for any n_image_tokens.

    Returns input_ids, token_types, labels and per-image "pixel" features (n_images, n_image_tokens, 3): a 4x4
    grid of random features, average-pooled to the requested square grid.
    """
    g = torch.Generator().manual_seed(seed)
    rows, grids = [], []
    for i in range(batch):
        n_pre = 1 + int(torch.randint(0, 3, (1,), generator=g))
        has_image = i % 3 != 2  # some text-only samples
        n_mid = 2 + int(torch.randint(0, 3, (1,), generator=g))
        n_res = 1 + int(torch.randint(0, 4, (1,), generator=g))
        text = torch.randint(2, VOCAB, (n_pre + n_mid + n_res,), generator=g)
        grid = torch.randn(3, 4, 4, generator=g)
        if has_image:
            grids.append(grid)
        types = [INS] * n_pre + ([IMG] * n_image_tokens if has_image else []) + [INS] * n_mid + [RES] * n_res
        ids = list(text[:n_pre]) + ([IMAGE_ID] * n_image_tokens if has_image else []) + list(text[n_pre:])
        rows.append((ids, types))
    length = max(len(r[0]) for r in rows)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    token_types = torch.zeros(batch, length, dtype=torch.long)
    for i, (ids, types) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor([int(x) for x in ids])
        token_types[i, : len(types)] = torch.tensor(types)
    labels = torch.where(token_types == RES, input_ids, torch.full_like(input_ids, -100))
    side = int(n_image_tokens**0.5)
    pixels = F.adaptive_avg_pool2d(torch.stack(grids), side).flatten(2).transpose(1, 2)
    return input_ids, token_types, labels, pixels


def images_of(pixels, sl, token_types):
    """The images of a slice of the batch (images are in sample order)."""
    per_sample = (token_types == IMG).any(dim=1).long()
    first = int(per_sample[: sl.start].sum()) if sl.start else 0
    count = int(per_sample[sl].sum())
    return pixels[first : first + count]


class Cfg:
    """Minimal config with the fields the objective reads."""

    def __init__(self, width):
        self.hidden_size = width


S_WIDTH, T_WIDTH, S_IMG, T_IMG = 8, 12, 4, 16

ALL_TERMS = [
    TermSpec("forward_kl", weight=0.7, options={"temperature": 2.0}),
    TermSpec("jsd", weight=0.3, tokens="text", options={"beta": 0.4}),
    TermSpec("reverse_kl", weight=0.2, tokens="instruction"),
    TermSpec("tvd", weight=0.2),
    TermSpec("skew_forward_kl", weight=0.2, options={"alpha": 0.1}),
    TermSpec("skew_reverse_kl", weight=0.2, options={"alpha": 0.1}),
    TermSpec("logit_mse", weight=0.1, options={"zscore": True}),
    TermSpec("hidden_mse", weight=1.0, options={"layers": [[1, 1], [-1, -1]]}),
    TermSpec("hidden_mse", weight=0.5, tokens="text", options={"loss": "cosine", "projector": "linear"}),
    TermSpec("visual_align", weight=0.5),
    TermSpec("visual_align", weight=0.5, options={"source": "projector", "loss": "cosine"}),
    TermSpec("visual_self_corr", weight=0.5),
    TermSpec("affinity", weight=0.5),
    TermSpec("attention", weight=0.5, options={"cols": "text"}),
    TermSpec("attention", weight=0.5, options={"cols": "instruction", "loss": "kl"}),
]


def build(terms=ALL_TERMS, chunk_size=5, ce_weight=1.0, seed=0):
    torch.manual_seed(seed)
    objective = DistillObjective(
        terms,
        ce_weight=ce_weight,
        student_config=Cfg(S_WIDTH),
        teacher_config=Cfg(T_WIDTH),
        chunk_size=chunk_size,
        student_tokens_per_image=S_IMG,
        teacher_tokens_per_image=T_IMG,
    )
    student = StandIn(S_WIDTH, 2, seed=1)
    teacher = StandIn(T_WIDTH, 3, seed=2)
    return objective, student, teacher


def views(student, teacher, sl=slice(None), n_teacher_tokens=T_IMG):
    """Student view (with grad), teacher view (no grad) and labels of the batch slice."""
    ids_s, types_s, labels, pix_s = make_batch(S_IMG)
    ids_t, types_t, _, pix_t = make_batch(n_teacher_tokens)
    s_view = student(ids_s[sl], types_s[sl], images_of(pix_s, sl, types_s))
    with torch.no_grad():
        t_view = teacher(ids_t[sl], types_t[sl], images_of(pix_t, sl, types_t))
    return s_view, t_view, labels[sl]


def run(objective, student, teacher, sl=slice(None), normalizers=None):
    s_view, t_view, labels = views(student, teacher, sl)
    return objective(s_view, t_view, labels, normalizers)


def grads(*modules):
    return {
        f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters() if p.grad is not None
    }


def test_gradient_accumulation_2x4_equals_one_batch_of_8():
    objective, student, teacher = build()
    loss_full, logged_full = run(objective, student, teacher)
    loss_full.backward()
    g_full = grads(student, objective)

    objective.zero_grad()
    student.zero_grad()
    _, types_s, labels, _ = make_batch(S_IMG)
    halves = [slice(0, 4), slice(4, 8)]
    counts = [objective.count_positions(types_s[h], labels[h]) for h in halves]
    totals = {k: sum(c[k] for c in counts) for k in counts[0]}
    assert totals == objective.count_positions(types_s, labels)
    loss_acc = 0.0
    logged_acc = {k: 0.0 for k in logged_full}
    for h in halves:
        loss, logged = run(objective, student, teacher, sl=h, normalizers=totals)
        loss.backward()
        loss_acc += loss.item()
        for k in logged:
            logged_acc[k] += logged[k].item()
    g_acc = grads(student, objective)

    assert loss_acc == pytest.approx(loss_full.item(), rel=1e-5)
    for k in logged_full:
        assert logged_acc[k] == pytest.approx(logged_full[k].item(), rel=1e-5, abs=1e-7), k
    assert set(g_acc) == set(g_full)
    for name in g_full:
        torch.testing.assert_close(g_acc[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_every_term_gives_finite_nonzero_gradient():
    for term in ALL_TERMS:
        objective, student, teacher = build([term], ce_weight=0.0)
        loss, logged = run(objective, student, teacher)
        assert torch.isfinite(loss) and loss.item() > 0, term
        loss.backward()
        g = [p.grad for p in list(student.parameters()) + list(objective.parameters()) if p.grad is not None]
        assert g and all(torch.isfinite(x).all() for x in g), term
        assert sum(x.abs().sum() for x in g) > 0, term
        assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters()), (
            "teacher got gradient"
        )


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunked_equals_plain_in_value_and_gradient(chunk_size):
    terms = [t for t in ALL_TERMS if is_logit_term(t)]
    plain, student, teacher = build(terms, chunk_size=None)
    plain.fused = False
    loss_plain, logged_plain = run(plain, student, teacher)
    loss_plain.backward()
    g_plain = grads(student)
    student.zero_grad()
    chunked = copy.deepcopy(plain)
    chunked.chunk_size = chunk_size
    chunked.fused = True
    loss_chunked, logged_chunked = run(chunked, student, teacher)
    loss_chunked.backward()
    g_chunked = grads(student)
    assert loss_chunked.item() == pytest.approx(loss_plain.item(), rel=1e-5, abs=1e-5)
    for k in logged_plain:
        assert logged_chunked[k].item() == pytest.approx(logged_plain[k].item(), rel=1e-5, abs=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-5, atol=1e-5)


def test_logit_term_and_ce_match_reference_on_full_logits():
    """CE + forward KL on response prediction positions, recomputed by hand from full (B, T, V) logits."""
    terms = [TermSpec("forward_kl", weight=0.5, options={"temperature": 1.5})]
    objective, student, teacher = build(terms, chunk_size=4)
    loss, logged = run(objective, student, teacher)
    s_view, t_view, labels = views(student, teacher)
    types_s = s_view.token_types
    logits_s = s_view.last_hidden @ student.lm_head.weight.T
    logits_t = t_view.last_hidden @ teacher.lm_head.weight.T
    ce_terms, kl_terms = [], []
    for b in range(8):
        s_pos = [t for t in range(types_s.shape[1] - 1) if types_s[b, t + 1] == RES]
        # teacher positions: same text, shifted by the extra image tokens when the sample has an image
        shift = (T_IMG - S_IMG) if (types_s[b] == IMG).any() else 0
        for t in s_pos:
            ce_terms.append(F.cross_entropy(logits_s[b, t][None], labels[b, t + 1][None]))
            p_t = F.softmax(logits_t[b, t + shift] / 1.5, -1)
            log_p_s = F.log_softmax(logits_s[b, t] / 1.5, -1)
            kl_terms.append((p_t * (p_t.log() - log_p_s)).sum())
    ce_ref = torch.stack(ce_terms).mean()
    kl_ref = torch.stack(kl_terms).mean()
    assert logged["ce"].item() == pytest.approx(ce_ref.item(), rel=1e-5)
    assert logged["forward_kl"].item() == pytest.approx(kl_ref.item(), rel=1e-5)
    assert loss.item() == pytest.approx((ce_ref + 0.5 * kl_ref).item(), rel=1e-5)


def _gradient_positions(term, n_teacher_images=S_IMG):
    """Positions of the student's last hidden state that receive gradient from this term alone."""
    objective = DistillObjective(
        [term],
        ce_weight=0.0,
        student_config=Cfg(S_WIDTH),
        teacher_config=Cfg(T_WIDTH),
        chunk_size=3,
        student_tokens_per_image=S_IMG,
        teacher_tokens_per_image=n_teacher_images,
    )
    student, teacher = StandIn(S_WIDTH, 2, seed=1), StandIn(T_WIDTH, 3, seed=2)
    view, t_view, labels = views(student, teacher, n_teacher_tokens=n_teacher_images)
    types_s = view.token_types
    leaf = view.last_hidden.detach().requires_grad_(True)
    view.last_hidden = leaf
    view.hidden_states[len(view.hidden_states) - 1] = leaf
    loss, _ = objective(view, t_view, labels)
    loss.backward()
    return leaf.grad.abs().sum(-1) > 0, types_s


@pytest.mark.parametrize(
    "group,types", [("image", (IMG,)), ("instruction", (INS,)), ("response", (RES,)), ("text", (INS, RES))]
)
def test_routing_logit_terms_read_prediction_positions_of_their_group(group, types):
    touched, types_s = _gradient_positions(TermSpec("forward_kl", tokens=group))
    expected = torch.zeros_like(types_s, dtype=torch.bool)
    expected[:, :-1] = torch.isin(types_s[:, 1:], torch.tensor(types)) & (types_s[:, :-1] != PAD)
    assert expected.any()
    assert torch.equal(touched, expected)


@pytest.mark.parametrize(
    "group,types", [("image", (IMG,)), ("instruction", (INS,)), ("response", (RES,)), ("all", (IMG, INS, RES))]
)
def test_routing_hidden_terms_read_token_positions_of_their_group(group, types):
    touched, types_s = _gradient_positions(TermSpec("hidden_mse", tokens=group))
    assert torch.equal(touched, torch.isin(types_s, torch.tensor(types)))


def test_routing_visual_and_affinity_terms():
    touched, types_s = _gradient_positions(TermSpec("visual_align"), n_teacher_images=T_IMG)
    assert torch.equal(touched, types_s == IMG)
    touched, types_s = _gradient_positions(TermSpec("affinity"), n_teacher_images=T_IMG)
    has_image = (types_s == IMG).any(dim=1, keepdim=True)
    assert torch.equal(touched, ((types_s == IMG) | (types_s == RES)) & has_image)


def test_visual_align_with_unequal_token_counts_matches_manual_pooling():
    term = TermSpec("visual_align", options={"projector": "linear"})
    objective, student, teacher = build([term], ce_weight=0.0)
    loss, logged = run(objective, student, teacher)
    s_view, t_view, _ = views(student, teacher)
    h_s = s_view.last_hidden[s_view.token_types == IMG].reshape(-1, 2, 2, S_WIDTH)
    h_t = t_view.last_hidden[t_view.token_types == IMG].reshape(-1, 4, 4, T_WIDTH)
    proj = objective.terms[0].projectors[0]
    errors = []
    for img in range(h_s.shape[0]):
        for r in range(2):
            for c in range(2):
                target = h_t[img, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(4, T_WIDTH).mean(0)
                errors.append(((proj(h_s[img, r, c]) - target) ** 2).mean())
    assert loss.item() == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)


def test_sparse_teacher_with_k_equal_vocab_matches_dense():
    terms = [
        TermSpec("forward_kl", options={"temperature": 2.0}),
        TermSpec("jsd", tokens="text", options={"beta": 0.3}),
    ]
    objective, student, teacher = build(terms, chunk_size=3)
    dense_loss, dense_logged = run(objective, student, teacher)
    s_view, t_view, labels = views(student, teacher)
    with torch.no_grad():
        logp = F.log_softmax(t_view.lm_head(t_view.last_hidden), -1)
    topk = logp.topk(VOCAB, dim=-1)
    sparse_view = ModelView(token_types=t_view.token_types, topk_ids=topk.indices, topk_logprobs=topk.values)
    sparse_terms = [TermSpec("forward_kl", options={"temperature": 2.0}),
                    TermSpec("jsd", tokens="text", options={"beta": 0.3, "missing_mass": "rest"})]
    sparse_objective = DistillObjective(sparse_terms, student_config=Cfg(S_WIDTH), chunk_size=3,
                                        teacher_signal="topk")
    sparse_loss, sparse_logged = sparse_objective(s_view, sparse_view, labels)
    assert sparse_loss.item() == pytest.approx(dense_loss.item(), rel=1e-5)
    for k in dense_logged:
        assert sparse_logged[k].item() == pytest.approx(dense_logged[k].item(), rel=1e-5, abs=1e-6)
    # a dense objective refuses a top-k view and the other way round
    with pytest.raises(ValueError, match="teacher_signal='dense' but got a top-k teacher"):
        objective(s_view, sparse_view, labels)
    with pytest.raises(ValueError, match="teacher_signal='topk' but got a dense teacher"):
        sparse_objective(s_view, t_view, labels)
    # a top-k teacher refuses divergences that need dense logits, before any batch
    with pytest.raises(ValueError, match=r"distill.terms\[0\]: term 'tvd' needs dense teacher logits"):
        DistillObjective([TermSpec("tvd")], teacher_signal="topk")


def test_sft_is_ce_only_without_teacher():
    objective = DistillObjective([], ce_weight=1.0, chunk_size=4)
    assert not objective.needs_teacher
    student = StandIn(S_WIDTH, 2, seed=1)
    view, _, labels = views(student, StandIn(T_WIDTH, 3, seed=2))
    loss, logged = objective(view, None, labels)
    logits = view.lm_head(view.last_hidden)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert set(logged) == {"ce"}


def test_text_only_micro_batch_gives_zero_visual_terms_and_keeps_the_graph():
    objective, student, teacher = build(
        [TermSpec("visual_align"), TermSpec("visual_self_corr"), TermSpec("affinity")], ce_weight=0.0
    )
    text_only = slice(2, 3)  # sample 2 has no image
    s_view, t_view, labels = views(student, teacher, text_only)
    assert not (s_view.token_types == IMG).any()
    s_view.image_features = t_view.image_features = None  # no pixel_values in a text-only batch
    counts = objective.count_positions(s_view.token_types, labels)
    assert counts[Tokens("image")] == 0 and counts[Pairs("image", "response")] == 0
    loss, logged = objective(s_view, t_view, labels)
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in logged.values())
    loss.backward()  # still differentiable (DDP / accumulation steps on text-only batches)


def test_needs_and_selections():
    objective, _, _ = build()
    assert objective.needs_teacher and objective.needs_attentions
    student, teacher = objective.student_needs, objective.teacher_needs
    assert student.last_hidden and student.image_features and student.hidden_layers == {1, -1}
    assert student.attention_layers == {-1} and teacher.attention_layers == {-1}
    assert set(objective.selections) >= {
        Targets(),
        Predictions("response"),
        Predictions("text"),
        Predictions("instruction"),
        Tokens("response"),
        Tokens("text"),
        Tokens("image"),
        Pairs("image", "response"),
        Pairs("response", "text"),
        Tokens("response"),
    }
    simple, _, _ = build([TermSpec("forward_kl"), TermSpec("hidden_mse")])
    assert simple.student_needs == Needs(last_hidden=True) and simple.teacher_needs == Needs(last_hidden=True)
    assert not simple.needs_attentions
    hidden_only, _, _ = build([TermSpec("hidden_mse", options={"layers": [[0, 2]]})])
    assert hidden_only.teacher_needs == Needs(last_hidden=True, hidden_layers=frozenset({2}))


def test_bad_recipes_fail_with_actionable_errors():
    with pytest.raises(ValueError, match="valid terms: .*forward_kl"):
        check_term(TermSpec("kl_forward"))
    with pytest.raises(ValueError, match="unknown option.*valid options"):
        check_term(TermSpec("forward_kl", options={"beta": 0.5}))
    with pytest.raises(ValueError, match="option 'beta' must be <= 1.0, got 2"):
        check_term(TermSpec("jsd", options={"beta": 2}))
    with pytest.raises(ValueError, match="tokens 'answers' is not accepted"):
        check_term(TermSpec("forward_kl", tokens="answers"))
    with pytest.raises(ValueError, match=r"tokens 'response' is not accepted; choose one of \['image'\]"):
        check_term(TermSpec("visual_align", tokens="response"))
    with pytest.raises(ValueError, match="option 'layers' must be a non-empty list"):
        check_term(TermSpec("hidden_mse", options={"layers": [1, 2]}))
    with pytest.raises(ValueError, match=r"distill.terms\[1\]: unknown key\(s\) \['temperature'\]"):
        DistillObjective([{"name": "forward_kl"}, {"name": "jsd", "temperature": 2.0}], teacher_config=Cfg(8))
    with pytest.raises(ValueError, match=r"distill.terms\[0\]: term 'jsd': option 'beta' must be >= 0.0"):
        DistillObjective([{"name": "jsd", "options": {"beta": -1}}], teacher_config=Cfg(8))
    from_recipe = DistillObjective(
        [{"name": "jsd", "weight": 0.5, "tokens": "all", "options": {"beta": 0.2}}], teacher_config=Cfg(8)
    )
    assert from_recipe.specs == [TermSpec("jsd", 0.5, "all", {"beta": 0.2})]
    with pytest.raises(ValueError, match="teacher_config"):
        DistillObjective([TermSpec("forward_kl")], student_config=Cfg(8))
    objective, student, teacher = build([TermSpec("hidden_mse", tokens="image")])
    with pytest.raises(ValueError, match="image 4 vs 16"):  # image counts differ: token alignment cannot pair them
        run(objective, student, teacher)


def test_normalizers_must_cover_every_key():
    objective, student, teacher = build([TermSpec("forward_kl")])
    with pytest.raises(ValueError, match=r"normalizers lack \['predictions:response'\]"):
        run(objective, student, teacher, normalizers={Targets(): 3.0})


def _tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_tokenizer_mismatch_raises_for_logit_terms_only():
    same_a = _tokenizer(["<unk>", "red", "blue", "circle"])
    same_b = _tokenizer(["<unk>", "red", "blue", "circle"])
    other = _tokenizer(["<unk>", "red", "green", "circle"])
    assert logit_vocab(classify_pair(same_a, same_b)) is None  # one tokenizer: no map
    with pytest.raises(ValueError, match=r"(?s)different tokenizers.*'blue'.*'green'.*use uld or gold"):
        logit_vocab(classify_pair(same_a, other))
    swapped = _tokenizer(["<unk>", "blue", "red", "circle"])
    with pytest.raises(ValueError, match="base vocabulary"):
        logit_vocab(classify_pair(same_a, swapped))
    # the runner checks the tokenizers only when logit terms compare the two models' distributions
    from types import SimpleNamespace

    from llavadi.config import DistillConfig
    from llavadi.train.stage_inputs import build_objective

    def loaded(tok, width):
        return SimpleNamespace(tokenizer=tok, model=SimpleNamespace(config=Cfg(width)))

    def stage(terms):
        return SimpleNamespace(distill=DistillConfig(terms=terms))

    with pytest.raises(ValueError, match="different tokenizers"):
        build_objective(stage([TermSpec("forward_kl")]), loaded(same_a, S_WIDTH), loaded(other, T_WIDTH))
    hidden = build_objective(stage([TermSpec("hidden_mse")]), loaded(same_a, S_WIDTH), loaded(other, T_WIDTH))
    assert hidden.term_labels == ["hidden_mse"]  # no logits compared: allowed


def test_projectors_save_and_load_round_trip(tmp_path):
    objective, _, _ = build()
    path = save_projectors(objective.state_dict(), tmp_path / "ckpt", objective.term_labels)
    assert path.endswith(PROJECTOR_FILE)
    fresh, _, _ = build(seed=123)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), objective.state_dict().values()))
    load_projectors(fresh, tmp_path / "ckpt")
    for k, v in objective.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    other, _, _ = build([TermSpec("hidden_mse", options={"projector": "linear"})])
    with pytest.raises(ValueError, match="does not match"):
        load_projectors(other, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        load_projectors(fresh, tmp_path / "missing")
    no_projectors, _, _ = build([TermSpec("forward_kl")])
    assert save_projectors(no_projectors.state_dict(), tmp_path / "none", no_projectors.term_labels) is None


# ---------------------------------------------------------------- with real tiny LLaVA models
def _tiny_llava(width, heads, patch, seed):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=patch,
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "eager"  # attention maps are read by the attention term
    return LlavaForConditionalGeneration(config)


def test_real_tiny_llava_pair_with_different_image_token_counts():
    from llavadi.distill.view import llava_view

    student, teacher = _tiny_llava(16, 2, 16, seed=1), _tiny_llava(24, 3, 8, seed=2)  # 4 vs 16 image tokens per image
    terms = [
        TermSpec("forward_kl", weight=0.5),
        TermSpec("hidden_mse", options={"layers": [[1, 1], [2, 2]]}),
        TermSpec("visual_align", options={"source": "projector"}),
        TermSpec("visual_self_corr"),
        TermSpec("affinity"),
        TermSpec("attention", options={"cols": "instruction"}),
    ]
    kwargs = dict(student_config=student.config, teacher_config=teacher.config)
    chunked = DistillObjective(terms, chunk_size=3, **kwargs)
    assert (chunked.ctx.student_tokens_per_image, chunked.ctx.teacher_tokens_per_image) == (4, 16)
    plain = copy.deepcopy(chunked)
    plain.fused = False
    ids_s, types_s, labels, _ = make_batch(4, batch=3)
    ids_t, types_t, _, _ = make_batch(16, batch=3)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # samples 0 and 1 have images
    with torch.no_grad():
        t_inputs = dict(input_ids=ids_t, attention_mask=(types_t != PAD).long(), pixel_values=pixels)
        t_view = llava_view(teacher, t_inputs, types_t, chunked.teacher_needs)
    results = []
    for objective in (plain, chunked):
        student.zero_grad()
        objective.zero_grad()
        s_inputs = dict(input_ids=ids_s, attention_mask=(types_s != PAD).long(), pixel_values=pixels)
        loss, logged = objective(llava_view(student, s_inputs, types_s, objective.student_needs), t_view, labels)
        loss.backward()
        assert all(torch.isfinite(v) and v > 0 for v in logged.values()), logged
        results.append((loss.item(), grads(student, objective)))
    (loss_plain, g_plain), (loss_chunked, g_chunked) = results
    assert loss_chunked == pytest.approx(loss_plain, rel=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-5, atol=1e-6)
    assert g_plain["0.lm_head.weight"].abs().sum() > 0
    assert any(k.startswith("0.model.multi_modal_projector") and v.abs().sum() > 0 for k, v in g_plain.items())


def test_two_processes_of_4_equal_one_batch_of_8(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "dist.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(__file__), "distributed_objective_worker.py")
    proc = subprocess.run(
        [sys.executable, worker, str(tmp_path / "init"), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    from conftest import only_teardown_abort

    assert proc.returncode == 0 or only_teardown_abort(proc.returncode, proc.stderr, out), proc.stderr[-3000:]
    result = torch.load(out)
    objective, student, teacher = build()
    loss, _ = run(objective, student, teacher)
    loss.backward()
    g_full = grads(student, objective)
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert set(result["grads"]) == set(g_full)
    for name in g_full:
        torch.testing.assert_close(result["grads"][name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)
