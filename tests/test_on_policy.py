"""On-policy samples: seeded sampling (temperature, top_p) against reference distributions, no image token ever
sampled, loss only on the sampled answer tokens (CE off), deterministic training, recipe validation."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, write_images, write_json
from safetensors.torch import load_file

from llavadi.config import ConfigError, OnPolicyConfig
from llavadi.data.collator import LlavaCollator
from llavadi.data.encode import IGNORE_INDEX
from llavadi.data.token_types import TokenType
from llavadi.distill.objective import DistillObjective
from llavadi.distill.selection import Predictions, Targets
from llavadi.distill.view import Needs, llava_view
from llavadi.eval.generate import Sampling, generate_ids
from llavadi.models.build import LoadedModel, load_llava_dir, save_model
from llavadi.recipe import recipe_from_dict
from llavadi.teacher.on_policy import OnPolicySampler, is_on_policy
from llavadi.teacher.online import OnlineTeacher
from llavadi.train.runner import run_recipe
from llavadi.train.stage_inputs import build_dataset

RES, INS = int(TokenType.RESPONSE), int(TokenType.INSTRUCTION)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("on_policy")
    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(root / "student0"))
    save_model(LoadedModel(make_tiny_llava(tok, text_hidden=64, seed=1), tok, make_image_processor(32), {}),
               str(root / "teacher0"))
    write_images(root / "imgs", 4)
    data = [{"id": f"s{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                               {"from": "gpt", "value": ["red", "a blue circle", "green", "yes"][i % 4]}]}
            for i in range(8)]
    data[3] = {"id": "s3", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"},
                                             {"from": "human", "value": "how many?"}, {"from": "gpt", "value": "two"}]}
    write_json(root / "data.json", data)
    return root


def _raw(ws, out, on_policy=None, terms=None, steps=2, **train):
    stage = {"name": "finetune", "data": {"path": str(ws / "data.json")},
             "train": {"learning_rate": 1e-2, "max_steps": steps, "per_device_train_batch_size": 4,
                       "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1, "save_steps": 100, **train},
             "distill": {"terms": [{"name": "forward_kl"}] if terms is None else terms}}
    if on_policy is not None:
        stage["on_policy"] = on_policy
    return {"student": {"path": str(ws / "student0")}, "teacher": {"path": str(ws / "teacher0")},
            "output_dir": str(out), "device": "cpu", "seed": 0,
            "data": {"image_folder": str(ws / "imgs"), "template": "vicuna_v1", "system": "", "max_length": 64},
            "stages": [stage]}


def _prompt(student):
    from llavadi.data.templates import Turn

    return student.encoder("vicuna_v1", "").encode_prompt([Turn("user", "what color is the shape?")], 0).input_ids


def _sample(student, prompts, sampling, max_new=1):
    tok = student.tokenizer
    return generate_ids(student.model.eval(), prompts, None, max_new, tok.pad_token_id, [tok.eos_token_id],
                        student.model.config.image_token_id, sampling)


def _next_token_probs(student, prompt, temperature, suppressed):
    """Reference: softmax(logits / T) of the next token, the suppressed token removed."""
    with torch.no_grad():
        logits = student.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    logits[suppressed] = float("-inf")
    return F.softmax(logits / temperature, dim=-1)


def test_sampling_matches_the_tempered_distribution_and_never_emits_the_image_token(ws):
    student = load_llava_dir(str(ws / "student0"))
    image_id = student.model.config.image_token_id
    prompt = _prompt(student)
    with torch.no_grad():  # make the image token the model's favourite (logit 20): only suppression keeps it out
        h = student.model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        student.model.get_output_embeddings().weight[image_id] = h * (20.0 / h.dot(h))
        raw = student.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    assert int(raw.argmax()) == image_id  # greedy without suppression would pick it
    n, temperature = 2000, 1.5
    draws = torch.tensor(_sample(student, [prompt] * n, Sampling(temperature, 1.0, seed=3)))[:, 0]
    assert image_id not in draws.tolist()
    expected = _next_token_probs(student, prompt, temperature, image_id)
    empirical = torch.bincount(draws, minlength=expected.shape[0]).float() / n
    assert (empirical - expected).abs().max() < 0.05  # 3 standard deviations of a frequency out of 2000 draws
    # the same seed draws the same tokens; another seed other ones
    again = torch.tensor(_sample(student, [prompt] * n, Sampling(temperature, 1.0, seed=3)))[:, 0]
    other = torch.tensor(_sample(student, [prompt] * n, Sampling(temperature, 1.0, seed=4)))[:, 0]
    assert torch.equal(draws, again) and not torch.equal(draws, other)


def test_top_p_keeps_only_the_nucleus(ws):
    student = load_llava_dir(str(ws / "student0"))
    prompt = _prompt(student)
    image_id = student.model.config.image_token_id
    probs = _next_token_probs(student, prompt, 1.0, image_id)
    order = probs.argsort(descending=True)
    top_p = float(probs[order[:3]].sum()) - 1e-4  # the nucleus is exactly the 3 most likely tokens
    draws = torch.tensor(_sample(student, [prompt] * 600, Sampling(1.0, top_p, seed=0)))[:, 0]
    assert set(draws.tolist()) == set(order[:3].tolist())
    # p -> 0 keeps only the most likely token: sampling equals greedy decoding over several tokens
    greedy = _sample(student, [prompt] * 4, None, max_new=6)
    assert _sample(student, [prompt] * 4, Sampling(1.0, 1e-9, seed=5), max_new=6) == greedy


def test_the_on_policy_choice_is_per_sample_with_the_configured_rate():
    picks = [is_on_policy(0, 7, f"id{i}", 0.3) for i in range(20000)]
    assert abs(sum(picks) / len(picks) - 0.3) < 0.015
    assert picks == [is_on_policy(0, 7, f"id{i}", 0.3) for i in range(20000)]  # a function of (seed, step, id)
    assert picks != [is_on_policy(0, 8, f"id{i}", 0.3) for i in range(20000)]
    assert all(is_on_policy(1, 2, f"id{i}", 1.0) for i in range(1000))


def _collated(ws, student):
    stage = recipe_from_dict(_raw(ws, ws / "x")).stages[0]
    ds = build_dataset(stage, student, None)
    collator = LlavaCollator(student.tokenizer.pad_token_id)
    return ds, collator, collator([ds[i] for i in range(len(ds))])


def test_on_policy_samples_carry_loss_only_on_their_sampled_answer(ws):
    student = load_llava_dir(str(ws / "student0"))
    ds, collator, batch = _collated(ws, student)
    sampler = OnPolicySampler(student.model, student.tokenizer, collator,
                              OnPolicyConfig(fraction=1.0, max_new_tokens=5, temperature=1.0), seed=0, max_length=64)
    (new,) = sampler([batch], step=0)
    image_id = student.model.config.image_token_id
    for b, item in enumerate(ds[i] for i in range(len(ds))):
        n = int(new["attention_mask"][b].sum())
        ids, types, labels = (new[k][b, :n].tolist() for k in ("input_ids", "token_types", "labels"))
        start = 1 + max(i for i, t in enumerate(item["token_types"]) if t != RES)  # the last answer ends the sample
        assert ids[:start] == item["input_ids"][:start]  # the prompt is the sample's own, images included
        answer = ids[start:]
        assert 1 <= len(answer) <= 5 and image_id not in answer
        assert types[start:] == [RES] * len(answer) and RES not in types[:start]  # earlier answers: instruction
        assert labels == [IGNORE_INDEX] * n  # CE is off on on-policy samples
    assert torch.equal(new["pixel_values"], batch["pixel_values"])
    assert sampler.stats["on_policy"] == len(ds) and sampler.stats["generated_tokens"] > 0

    # the objective: no CE position, and forward KL exactly on the positions predicting sampled tokens
    teacher = OnlineTeacher(load_llava_dir(str(ws / "teacher0")).model)
    objective = DistillObjective([{"name": "forward_kl"}], student_config=student.model.config,
                                 teacher_config=teacher.model.config)
    assert objective.count_positions(new["token_types"], new["labels"])[Targets()] == 0
    s_view = llava_view(student.model, {k: new[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                        new["token_types"], Needs(last_hidden=True))
    total, logged = objective(s_view, teacher.view(new, objective.teacher_needs), new["labels"])
    with torch.no_grad():
        out_s = student.model(input_ids=new["input_ids"], attention_mask=new["attention_mask"],
                              pixel_values=new["pixel_values"]).logits
        out_t = teacher.model(input_ids=new["input_ids"], attention_mask=new["attention_mask"],
                              pixel_values=new["pixel_values"]).logits
    rows = torch.zeros_like(new["token_types"], dtype=torch.bool)
    rows[:, :-1] = new["token_types"][:, 1:] == RES  # positions predicting a sampled token
    p_t = F.log_softmax(out_t[rows].float(), -1)
    reference = (p_t.exp() * (p_t - F.log_softmax(out_s[rows].float(), -1))).sum(-1).mean()
    assert float(logged["forward_kl"]) == pytest.approx(float(reference), rel=1e-4)
    assert rows.sum() == Predictions("response").count(new["token_types"], new["labels"])


def test_unchosen_samples_are_left_as_they_were(ws):
    student = load_llava_dir(str(ws / "student0"))
    ds, collator, batch = _collated(ws, student)
    sampler = OnPolicySampler(student.model, student.tokenizer, collator, OnPolicyConfig(fraction=0.5), 0, 64)
    step = next(s for s in range(100) if 0 < sum(is_on_policy(0, s, sid, 0.5) for sid in batch["sample_ids"]) < 8)
    (new,) = sampler([batch], step=step)
    for b, sid in enumerate(batch["sample_ids"]):
        n_old, n_new = int(batch["attention_mask"][b].sum()), int(new["attention_mask"][b].sum())
        same = (n_old == n_new and torch.equal(batch["input_ids"][b, :n_old], new["input_ids"][b, :n_new])
                and torch.equal(batch["labels"][b, :n_old], new["labels"][b, :n_new]))
        assert same != is_on_policy(0, step, sid, 0.5), sid


def _weights(out):
    return load_file(os.path.join(out, "finetune", "model", "model.safetensors"))


def test_on_policy_training_is_deterministic_under_a_seed(ws, tmp_path):
    on_policy = {"fraction": 0.5, "max_new_tokens": 4, "temperature": 1.0, "top_p": 0.95}
    run_recipe(recipe_from_dict(_raw(ws, tmp_path / "a", on_policy)), log=lambda *_: None)
    run_recipe(recipe_from_dict(_raw(ws, tmp_path / "b", on_policy)), log=lambda *_: None)
    run_recipe(recipe_from_dict(_raw(ws, tmp_path / "off")), log=lambda *_: None)
    a, b, off = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "off")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - off[k]).abs().max().item() for k in a) > 1e-4  # the on-policy samples changed the training
    history = json.loads(next((tmp_path / "a" / "finetune" / "checkpoints").glob("checkpoint-*/trainer_state.json"))
                         .read_text())["log_history"]
    assert all("loss/forward_kl" in h for h in history if "loss" in h)


def test_each_log_line_reports_the_on_policy_share_and_answer_length(ws, tmp_path, monkeypatch):
    from llavadi.train import trainer as trainer_module

    seen = []  # (step, sample ids) of every training micro-batch
    original = trainer_module.DistillTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.append((self.state.global_step, list(inputs["sample_ids"])))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.DistillTrainer, "compute_loss", recording)
    run_recipe(recipe_from_dict(_raw(ws, tmp_path / "run", {"fraction": 0.5, "max_new_tokens": 4}, steps=4)),
               log=lambda *_: None)
    state = sorted((tmp_path / "run" / "finetune" / "checkpoints").glob("checkpoint-*/trainer_state.json"))[-1]
    history = [h for h in json.loads(state.read_text())["log_history"] if "loss" in h]
    assert len(history) == len(seen) == 4
    for h, (step, ids) in zip(history, seen):
        expected = sum(is_on_policy(0, step, sid, 0.5) for sid in ids) / len(ids)  # the per-sample choice
        assert h["on_policy/share"] == pytest.approx(expected, abs=1e-4)
        if expected:
            assert 1 <= h["on_policy/tokens_per_answer"] <= 4 and h["on_policy/generation_seconds"] > 0
    assert 0 < sum(h["on_policy/share"] for h in history) < len(history)  # both kinds of samples were trained


def test_on_policy_recipe_validation(ws, tmp_path):
    for bad, pattern in (({"fraction": 0.0}, r"on_policy.fraction must be in \(0, 1\]"),
                         ({"top_p": 1.5}, r"on_policy.top_p must be in"),
                         ({"temperature": 0}, r"on_policy.temperature must be > 0"),
                         ({"max_new_tokens": 0}, r"on_policy.max_new_tokens must be >= 1")):
        with pytest.raises(ConfigError, match=pattern):
            recipe_from_dict(_raw(ws, tmp_path, bad))
    with pytest.raises(ConfigError, match=r"on-policy samples carry no labels"):
        recipe_from_dict(_raw(ws, tmp_path, {"fraction": 0.5}, terms=[]))
    raw = _raw(ws, tmp_path, {"fraction": 0.5})
    raw["teacher"]["cache"] = str(tmp_path)
    with pytest.raises(ConfigError, match=r"teacher.cache: stages \['finetune'\] use on_policy"):
        recipe_from_dict(raw)


def test_a_frozen_tower_runs_once_per_step_and_the_loss_and_gradients_are_the_plain_ones(ws):
    from llavadi.distill.view import model_inputs

    student = load_llava_dir(str(ws / "student0"))
    tower = student.model.model.vision_tower
    tower.requires_grad_(False)
    ds, collator, batch = _collated(ws, student)
    teacher = OnlineTeacher(load_llava_dir(str(ws / "teacher0")).model)
    objective = DistillObjective([{"name": "forward_kl"}], student_config=student.model.config,
                                 teacher_config=teacher.model.config)
    runs = []  # the tower's own computations (its embeddings run only when it really runs)
    getattr(tower, "vision_model", tower).embeddings.register_forward_hook(lambda *_: runs.append(1))

    def loss_and_grads(new):
        student.model.train().zero_grad(set_to_none=True)
        view = llava_view(student.model, model_inputs(new), new["token_types"], objective.student_needs)
        loss, _ = objective(view, teacher.view(new, objective.teacher_needs), new["labels"])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None}

    sampler = OnPolicySampler(student.model, student.tokenizer, collator,
                              OnPolicyConfig(fraction=1.0, max_new_tokens=5, temperature=1.0), seed=0, max_length=64)
    (new,) = sampler([batch], step=0)
    assert len(runs) == 1 and len(sampler.vision_outputs.entries) == 1  # the prefill's outputs wait
    loss, grads = loss_and_grads(new)
    assert len(runs) == 1 and sampler.vision_outputs.reused == 1  # the training forward reused them
    assert not sampler.vision_outputs.entries and "forward" not in tower.__dict__  # used once, then gone
    plain_loss, plain_grads = loss_and_grads(new)  # nothing waits: the tower runs
    assert len(runs) == 2
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    assert any(".multi_modal_projector." in f".{n}" for n in grads)  # the projector trains on the reused states
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)

    tower.requires_grad_(True)  # a tower that trains: nothing kept, it runs in both
    sampler([batch], step=1)
    assert len(runs) == 3 and not sampler.vision_outputs.entries and "forward" not in tower.__dict__


def test_a_teacher_with_the_same_frozen_tower_is_handed_the_same_outputs(ws):
    from llavadi.distill.view import model_inputs

    student = load_llava_dir(str(ws / "student0"))
    teacher_model = load_llava_dir(str(ws / "teacher0")).model
    s_tower, t_tower = student.model.model.vision_tower, teacher_model.model.vision_tower
    s_tower.requires_grad_(False)
    ds, collator, batch = _collated(ws, student)
    teacher = OnlineTeacher(teacher_model)
    needs = Needs(last_hidden=True)
    config = OnPolicyConfig(fraction=1.0, max_new_tokens=3, temperature=1.0)
    # the two tiny models' towers differ: nothing is shared, the teacher's tower runs
    assert OnPolicySampler(student.model, student.tokenizer, collator, config, 0, 64,
                           teacher=teacher_model).vision_outputs.towers == [s_tower]
    t_tower.load_state_dict(s_tower.state_dict())  # the LLaVADI pair: one frozen tower in both
    runs = {"student": [], "teacher": []}
    for who, tower in (("student", s_tower), ("teacher", t_tower)):
        getattr(tower, "vision_model", tower).embeddings.register_forward_hook(lambda *_, w=who: runs[w].append(1))
    sampler = OnPolicySampler(student.model, student.tokenizer, collator, config, 0, 64, teacher=teacher_model)
    assert sampler.vision_outputs.towers == [s_tower, t_tower]
    (new,) = sampler([batch], step=0)
    shared = teacher.view(new, needs).last_hidden
    student_view = llava_view(student.model, model_inputs(new), new["token_types"], needs).last_hidden
    assert runs == {"student": [1], "teacher": []} and sampler.vision_outputs.reused == 2
    assert "forward" not in t_tower.__dict__ and "forward" not in s_tower.__dict__
    assert torch.equal(shared, teacher.view(new, needs).last_hidden)  # the teacher's own tower ran this time
    assert torch.equal(student_view, llava_view(student.model, model_inputs(new), new["token_types"], needs).last_hidden)
    assert runs == {"student": [1, 1], "teacher": [1]}
