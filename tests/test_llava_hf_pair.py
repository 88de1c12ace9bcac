"""The paper's pair in the layouts users download trains recipes/llavadi.yaml end to end (narrow random models).

Teacher: a llava-hf LLaVA-1.5-style folder (LLaMA-style BPE of N tokens + <image> at N + <pad> at N+1,
text_config.vocab_size padded to a multiple of 64, image_token_index N). Student: composed from a CLIP
folder + a LLaMA-style LLM folder whose tokenizer is the same N tokens (+ <image> added: N+1).
"""

import json
import os

from conftest import write_images, write_json
from tokenizer_layouts import write_pair

from llavadi.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = ["red", "green", "blue", "yellow"]


def _overrides(tmp_path, teacher, vision, llm):
    write_images(tmp_path / "imgs", 4)
    inst = [{"id": f"s{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat color is the shape?"},
                               {"from": "gpt", "value": f"{COLOURS[i % 4]} circle"}]} for i in range(8)]
    caps = [{"id": f"c{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\ndescribe the image"},
                               {"from": "gpt", "value": f"a {COLOURS[i % 4]} square"}]} for i in range(4)]
    write_json(tmp_path / "inst.json", inst)
    write_json(tmp_path / "caps.json", caps)
    tiny = {"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "bf16": False,
            "gradient_checkpointing": False, "save_steps": 100, "logging_steps": 1}
    out = [f"output_dir={tmp_path / 'run'}", "device=cpu", f"teacher.path={teacher}", "teacher.dtype=fp32",
           f"student.vision={vision}", f"student.llm={llm}", f"data.image_folder={tmp_path / 'imgs'}",
           "data.max_length=128", f"stages.pretrain.data.path={tmp_path / 'caps.json'}",
           f"stages.finetune.data.path={tmp_path / 'inst.json'}", "stages.finetune.trainable.vision_from_layer=0"]
    for stage in ("pretrain", "finetune"):
        out += [f"stages.{stage}.train.{k}={json.dumps(v)}" for k, v in tiny.items()]
    return out


def test_llava_hf_teacher_and_composed_student_train_the_paper_recipe(tmp_path, capsys):
    teacher, vision, llm = write_pair(str(tmp_path / "models"), n_base=256)
    recipe = os.path.join(ROOT, "recipes", "llavadi.yaml")
    overrides = _overrides(tmp_path, teacher, vision, llm)
    assert main(["train", recipe, *overrides, "--check", "--quiet"]) == 0
    checked = capsys.readouterr().out
    assert "tokenizers: the same tokenizer up to additions" in checked
    assert "only the teacher's: 1 token(s): '<pad>' (257)" in checked
    assert "padded teacher LM-head rows without a token: 62 (258..319)" in checked
    assert main(["train", recipe, *overrides, "--quiet"]) == 0
    run = tmp_path / "run"
    assert os.path.isfile(run / "final" / "model.safetensors")
    with open(run / "finetune" / "checkpoints" / "checkpoint-3" / "trainer_state.json") as f:
        logs = [h for h in json.load(f)["log_history"] if "loss/forward_kl" in h]
    assert len(logs) == 3
    for h in logs:  # both terms of the recipe trained, and the mass outside the shared tokens was logged
        assert h["loss/forward_kl"] > 0 and h["loss/hidden_mse"] > 0 and h["loss/ce"] > 0
        assert 0 < h["loss/vocab/outside_mass_teacher"] < 1  # <pad> and 62 padded rows of a random teacher
        assert "loss/vocab/outside_mass_student" in h  # 0: every student token is shared


def test_agreement_kl_of_the_pair_compares_the_distributions_over_the_shared_tokens(tmp_path):
    import pytest
    import torch

    from llavadi.data.dataset import pixel_values_for
    from llavadi.eval.agreement import teacher_forced_kl
    from llavadi.eval.generate import EvalQuestion, encode_question, question_image
    from llavadi.models.build import LoadedModel, compose_llava, load_llava_dir

    teacher_dir, vision, llm = write_pair(str(tmp_path / "models"), n_base=256)
    meta = {"template": "vicuna_v1", "system": ""}
    t = load_llava_dir(teacher_dir)
    teacher = LoadedModel(t.model.eval(), t.tokenizer, t.image_processor, meta)
    s = compose_llava(vision, llm, seed=3)
    student = LoadedModel(s.model.eval(), s.tokenizer, s.image_processor, meta)
    write_images(tmp_path / "imgs", 2)
    questions = [EvalQuestion("q0", "what color is the shape?", str(tmp_path / "imgs" / "img0.png")),
                 EvalQuestion("q1", "hello world")]
    answers = [teacher.tokenizer("red circle", add_special_tokens=False).input_ids + [teacher.tokenizer.eos_token_id],
               teacher.tokenizer("three", add_special_tokens=False).input_ids]

    def answer_logits(bundle, q, a):
        ids = encode_question(bundle.encoder(), q)
        kwargs = {}
        if q.has_image:
            kwargs["pixel_values"] = pixel_values_for(bundle.image_processor, question_image(q))[None]
        with torch.no_grad():
            logits = bundle.model(input_ids=torch.tensor([ids + a]), **kwargs).logits[0]
        return logits[len(ids) - 1: len(ids) - 1 + len(a), :257].double()  # the 257 shared tokens: ids 0..256

    kls = []
    for q, a in zip(questions, answers):
        log_t = torch.log_softmax(answer_logits(teacher, q, a), -1)
        log_s = torch.log_softmax(answer_logits(student, q, a), -1)  # the same ids on the student's side
        kls.append((log_t.exp() * (log_t - log_s)).sum(-1))
    mean_kl, n, per_question = teacher_forced_kl(student, teacher, questions, answers, batch_size=2)
    assert n == sum(len(a) for a in answers) and torch.cat(kls).mean().item() > 1e-3
    assert mean_kl == pytest.approx(torch.cat(kls).mean().item(), rel=1e-4)
    assert per_question == pytest.approx([k.mean().item() for k in kls], rel=1e-4)
    with pytest.raises(ValueError, match=r"question 'q1': the teacher's answer holds token id\(s\) \[257\]"):
        teacher_forced_kl(student, teacher, questions, [answers[0], answers[1] + [257]])


def test_the_pair_trains_from_a_top_k_cache_of_the_teacher_read_through_the_id_map(tmp_path, capsys):
    teacher, vision, llm = write_pair(str(tmp_path / "models"), n_base=256)
    recipe = os.path.join(ROOT, "recipes", "llavadi.yaml")
    overrides = _overrides(tmp_path, teacher, vision, llm)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", recipe, *overrides, "--stage", "finetune", "--out", str(cache), "--top-k", "8",
                 "--hidden", "--values", "fp32", "--no-progress"]) == 0
    cached = overrides + [f"teacher.cache={cache}"]
    assert main(["train", recipe, *cached, "--quiet"]) == 0
    with open(tmp_path / "run" / "finetune" / "checkpoints" / "checkpoint-3" / "trainer_state.json") as f:
        logs = [h for h in json.load(f)["log_history"] if "loss/forward_kl" in h]
    assert len(logs) == 3 and all(h["loss/forward_kl"] > 0 and h["loss/hidden_mse"] > 0 for h in logs)
    # the known part of the teacher's mass outside the shared tokens: its top-8 ids the student lacks
    assert all(0 <= h["loss/vocab/outside_mass_teacher"] < 1 for h in logs)
    capsys.readouterr()
    without_teacher = [o for o in cached if not o.startswith("teacher.path=")] + ["teacher.path=",
                                                                                    f"output_dir={tmp_path / 'r2'}"]
    # the cache carries the teacher's tokenizer files: the id map needs no teacher folder
    assert main(["train", recipe, *without_teacher, "--check", "--quiet"]) == 0
