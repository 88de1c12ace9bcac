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
