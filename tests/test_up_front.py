"""Mistakes named before any model loads, all of them in one report; nothing silently ignored.

Each recipe mistake below used to pass `llavadi train --check` (or to be named only after an earlier
one was fixed, one per run); here `--check` exits non-zero naming every one, and no model is built.
"""

from __future__ import annotations

import pytest
import yaml

from llavadi.cli import main
from llavadi.config import ConfigError
from llavadi.recipe import recipe_from_dict


def _raw(**kw):
    raw = {"student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"},
           "data": {"image_folder": "imgs"},
           "stages": [{"name": "finetune", "data": {"path": "d.json"},
                       "distill": {"terms": [{"name": "forward_kl", "options": {"temperature": 2.0}}]}}]}
    raw.update(kw)
    return raw


def test_three_typos_in_one_recipe_are_all_named_at_once():
    raw = _raw()
    raw["student"]["vison"] = "x"                                          # a model key
    raw["stages"][0]["distill"]["terms"][0]["options"]["temprature"] = 1   # a term option
    raw["stages"][0]["train"] = {"learning_rat": 1e-4}                    # a train field
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    text = str(err.value)
    assert "3 problems" in text, text
    assert "student: unknown key(s) ['vison']" in text and "did you mean `vision`?" in text
    assert "stages[0].distill.terms[0]" in text and "temprature" in text
    assert "stages[0].train.learning_rat" in text and "learning_rate" in text


def test_every_mistake_of_one_term_is_named():
    raw = _raw()
    raw["stages"][0]["distill"]["terms"][0].update(weight=-1, tokens="nope", options={"temprature": 1, "temperature": -3})
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    text = str(err.value)
    for expected in ("weight must be >= 0, got -1", "tokens 'nope' is not accepted"):
        assert expected in text, (expected, text)
    raw["stages"][0]["distill"]["terms"][0].update(weight=1, tokens=None)
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    text = str(err.value)
    for expected in ("unknown option(s) ['temprature']", "option 'temperature' must be > 0.0, got -3"):
        assert expected in text, (expected, text)


def test_typos_and_invalid_values_of_different_parts_are_all_named():
    raw = _raw(seed="zero")
    raw["stages"][0]["data"]["template"] = "llama9"
    raw["stages"][0]["distill"]["terms"].append({"name": "kl"})
    raw["stages"].append({"name": "second", "data": {"path": "e.json", "on_error": "ignore"}, "trainable": {"llm": "yes"}})
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    text = str(err.value)
    for expected in ("seed: expected an integer", "unknown template 'llama9'", "unknown distillation term 'kl'",
                     "stages[1].trainable.llm: expected true or false", "stages[1] (second).data.on_error"):
        assert expected in text, (expected, text)


def test_check_names_every_typo_and_exits_non_zero(tmp_path, capsys):
    raw = _raw()
    raw["student"]["vison"] = "x"
    raw["stages"][0]["distill"]["terms"][0]["options"]["temprature"] = 1
    raw["stages"][0]["train"] = {"learning_rat": 1e-4}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "vison" in err and "temprature" in err and "learning_rat" in err


def test_every_mistake_of_a_suite_file_is_named_at_once(tmp_path):
    from llavadi.eval.benchmarks import EvalDataError
    from llavadi.eval.suite import load_suite

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump([
        {"benchmark": "popee", "questions": "a.jsonl"},
        {"benchmark": "synthetic", "questions": "b.jsonl", "image": "imgs"},
        {"benchmark": "synthetic", "questions": "c.jsonl", "limit": "ten", "name": "c"},
    ]))
    with pytest.raises(EvalDataError) as err:
        load_suite(str(path))
    text = str(err.value)
    assert "3 problems" in text
    assert "[0]: unknown benchmark 'popee'" in text and "[1]: unknown key(s) ['image']" in text
    assert "[2].limit: expected int or NoneType, got 'ten'" in text


def test_every_entry_of_a_suite_with_missing_files_is_named_at_once(tmp_path):
    from llavadi.eval.benchmarks import EvalDataError
    from llavadi.eval.suite import check_inputs, load_suite

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump([{"benchmark": "synthetic", "questions": "a.jsonl"},
                                    {"benchmark": "synthetic", "questions": "b.jsonl", "name": "b"}]))
    with pytest.raises(EvalDataError) as err:
        check_inputs(load_suite(str(path)))
    text = str(err.value)
    assert "suite.yaml[0]: " in text and "a.jsonl" in text and "suite.yaml[1]: " in text and "b.jsonl" in text


# ----------------------------------------------------------------------------- what the machine must provide

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny student and teacher, 4 images, 8 instruction samples."""
    from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, write_images, write_json

    from llavadi.models.build import LoadedModel, save_model

    root = tmp_path_factory.mktemp("up_front")
    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(root / "student"))
    save_model(LoadedModel(make_tiny_llava(tok, text_hidden=64, seed=1), tok, make_image_processor(32), {}),
               str(root / "teacher"))
    write_images(root / "imgs", 4)
    write_json(root / "inst.json", [
        {"id": f"s{i}", "image": f"img{i % 4}.png",
         "conversations": [{"from": "human", "value": "<image>\nwhat color is the square?"},
                           {"from": "gpt", "value": "red"}]} for i in range(8)])
    return root


def _saved_recipe(root, **student) -> dict:
    return {"student": {"path": str(root / "student"), **student}, "teacher": {"path": str(root / "teacher")},
            "output_dir": str(root / "out"), "device": "cpu",
            "data": {"image_folder": str(root / "imgs"), "template": "vicuna_v1", "system": ""},
            "stages": [{"name": "finetune", "data": {"path": str(root / "inst.json")},
                        "distill": {"terms": [{"name": "forward_kl"}]}, "train": {"max_steps": 1}}]}


def _check(tmp_path, raw, monkeypatch, capsys) -> tuple[int, str]:
    """`llavadi train RECIPE --check`: (exit code, stderr); loading a model fails the test."""
    def no_loading(*_a, **_k):
        raise AssertionError("a model was loaded during --check")

    monkeypatch.setattr("llavadi.models.build.load_model", no_loading)
    monkeypatch.setattr("llavadi.train.runner.load_model", no_loading)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["train", str(path), "--check"])
    return code, capsys.readouterr().err


def test_check_names_every_thing_the_machine_cannot_run(saved, tmp_path, monkeypatch, capsys):
    """flash-attn, QLoRA, fp16 on the CPU, on_policy under FSDP, and a DeepSpeed CPU-Adam op that cannot be
    built: all named by one --check, which exits non-zero (this machine: CPU, no flash-attn, no bitsandbytes)."""
    import importlib.util

    import torch.utils.cpp_extension

    if importlib.util.find_spec("flash_attn") or importlib.util.find_spec("bitsandbytes"):
        pytest.skip("flash-attn or bitsandbytes is installed here")
    raw = _saved_recipe(saved, attn_implementation="flash_attention_2", lora={"quantize": "4bit"})
    raw["stages"][0]["train"]["fp16"] = True
    raw["stages"].append({"name": "sampled", "data": {"path": str(saved / "inst.json")},
                          "distill": {"terms": [{"name": "forward_kl"}]}, "on_policy": {"fraction": 0.5},
                          "train": {"max_steps": 1, "fsdp": "full_shard"}})
    problems = ["student.attn_implementation: flash_attention_2 needs the flash-attn package",
                "student.attn_implementation: flash_attention_2 runs on CUDA GPUs only",
                "student.lora.quantize: 4-bit loading needs the bitsandbytes package",
                "student.lora.quantize: 4-bit loading (bitsandbytes) runs on CUDA GPUs",
                "stages.finetune.train.fp16: fp16 mixed precision needs a GPU",
                "stages.sampled.train.fsdp: FSDP runs only on accelerator devices",
                "stages.sampled.train.fsdp: on_policy generates with the student, whose weights FSDP shards"]
    if importlib.util.find_spec("deepspeed"):
        monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
        raw["stages"].append({"name": "offload", "data": {"path": str(saved / "inst.json")},
                              "train": {"max_steps": 1, "deepspeed": {"zero_optimization": {
                                  "stage": 2, "offload_optimizer": {"device": "cpu"}}}}})
        problems.append("stages.offload.train.deepspeed: offloading to the CPU (zero_optimization.offload_*) uses "
                        "DeepSpeed's CPU Adam op, compiled on first use, and it cannot be built here: ninja is not installed")
    code, err = _check(tmp_path, raw, monkeypatch, capsys)
    assert code == 2
    assert f"{len(problems)} problem(s) found before loading any model" in err, err
    for problem in problems:
        assert problem in err, (problem, err)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_check_accepts_the_attention_implementations_this_machine_runs(saved, tmp_path, monkeypatch, capsys, attn):
    code, err = _check(tmp_path, _saved_recipe(saved, attn_implementation=attn), monkeypatch, capsys)
    assert code == 0, err


def test_bf16_on_a_gpu_without_bf16_and_qlora_of_a_preset_student_are_refused(monkeypatch):
    from llavadi.train import requirements

    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: False)
    assert requirements.precision_problems({"bf16": True}, "cuda", "stages.x.train") == [
        "stages.x.train.bf16: this GPU does not support bf16; write fp16: true instead"]
    assert requirements.precision_problems({"bf16": True}, "cpu", "stages.x.train") == []  # CPU autocast runs bf16
    recipe = recipe_from_dict(_raw(student={"preset": "tiny-student", "dtype": "bf16"}))
    assert requirements.model_problems(recipe.student, "student", "cuda") == [
        "student.dtype: bf16 is not supported by this GPU; write fp16 or fp32"]
    recipe = recipe_from_dict(_raw(student={"preset": "tiny-student", "lora": {"quantize": "4bit"}}))
    assert any("a preset or composed student is on disk only after a first stage" in p
               for p in requirements.quantization_problems(recipe, "cuda"))


# ----------------------------------------------------------------------------- the command's own errors

def test_an_unexpected_exception_is_one_line_naming_the_cause_and_a_log_with_the_traceback(
        tmp_path, monkeypatch, capsys):
    import llavadi.cli as cli

    def broken(args):
        raise RuntimeError("the disk said no\nsecond line of detail")

    monkeypatch.setenv("LLAVADI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "_cmd_make_data", broken)
    assert cli.main(["make-data", "synthetic", "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("llavadi make-data: unexpected error: RuntimeError: the disk said no"), err
    log = err.split("full traceback in ")[1].strip().rstrip(")")
    text = open(log).read()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "second line of detail" in text


@pytest.mark.parametrize("field, value", [("push_to_hub", True), ("hub_model_id", "me/student")])
def test_pushing_to_the_hub_from_a_stage_is_refused_saying_how_to_upload(field, value):
    raw = _raw()
    raw["stages"][0]["train"] = {field: value}
    with pytest.raises(ConfigError, match=rf"stages\[0\].train.{field}: not supported; llavadi does not upload during "
                                          r"training .*`hf upload REPO_ID <output_dir>/final`"):
        recipe_from_dict(raw)


def test_make_bench_installs_what_the_benchmarks_import():
    """`make bench` from a fresh clone: the benchmarks' extra (trl) is installed before they run."""
    import os
    import re

    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(re.match(r"trl\b", d) for d in extras["bench"])
    makefile = open(os.path.join(root, "Makefile")).read()
    bench = re.search(r"^bench:(.*)$", makefile, re.M).group(1).split()
    installers = [t for t in bench
                  if re.search(rf"^{re.escape(t)}:.*\n\t.*pip install .*\[[^]]*\bbench\b", makefile, re.M)]
    assert installers, f"the bench target's prerequisites {bench} install no [bench] extra"
    assert "kd_loss.py" in makefile.split("\nbench:")[1].split("\n\n")[0]


# ----------------------------------------------------------------------------- model options applied or refused

def test_vision_feature_layer_on_a_folder_or_preset_model_that_reads_another_layer_is_refused(
        saved, tmp_path, monkeypatch, capsys):
    """It is used only when composing vision + llm; a LLaVA folder or preset reads the layer its config names."""
    from llavadi.models.describe import describe_model
    from llavadi.train.preflight import feature_layer_problems

    raw = _saved_recipe(saved, vision_feature_layer=-1)  # the saved tiny models read layer -2
    raw["teacher"]["vision_feature_layer"] = 0
    code, err = _check(tmp_path, raw, monkeypatch, capsys)
    assert code == 2
    assert "student.vision_feature_layer: -1, but the model reads layer -2 (its config's vision_feature_layer)" in err
    assert "teacher.vision_feature_layer: 0, but the model reads layer -2" in err
    preset = recipe_from_dict(_raw(student={"preset": "tiny-student", "vision_feature_layer": -2})).student
    assert feature_layer_problems(preset, describe_model(preset), "student") == [
        "student.vision_feature_layer: -2, but the model reads layer -1 (its config's vision_feature_layer); the "
        "key applies when composing `vision` + `llm` only: remove it"]
    # the layer the model reads anyway is accepted (e.g. a resolved recipe.yaml), and so is no value
    assert _check(tmp_path, _saved_recipe(saved, vision_feature_layer=-2), monkeypatch, capsys)[0] == 0
    assert recipe_from_dict(_raw()).student.vision_feature_layer is None
    composed = recipe_from_dict(_raw(student={"vision": "v", "llm": "l"}))
    assert composed.student.vision_feature_layer == -2  # LLaVA-1.5's layer when composing


def _vision_llm(tmp_path, vision_config, processor=None):
    from conftest import make_word_tokenizer
    from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

    AutoModel.from_config(vision_config).save_pretrained(tmp_path / "vision")
    if processor is not None:
        processor.save_pretrained(tmp_path / "vision")
    tok = make_word_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4)).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    return str(tmp_path / "vision"), str(tmp_path / "llm")


def test_a_siglip_tower_without_a_preprocessor_config_gets_siglips_preprocessing(tmp_path):
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig

    from llavadi.config import ModelSpec
    from llavadi.models.describe import describe_model

    vision, llm = _vision_llm(tmp_path, SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=32, patch_size=16))
    processor = describe_model(ModelSpec(vision=vision, llm=llm, vision_feature_layer=-2)).image_processor
    reference = SiglipImageProcessorPil(size={"height": 32, "width": 32})  # SigLIP's: resize, no crop, mean/std 0.5
    assert type(processor).__name__.startswith("SiglipImageProcessor")
    for key in ("size", "image_mean", "image_std", "resample", "do_normalize", "do_rescale"):
        assert getattr(processor, key) == getattr(reference, key), key
    assert not getattr(processor, "do_center_crop", False)


def test_a_tower_of_unknown_preprocessing_without_a_preprocessor_config_is_refused_by_name(tmp_path):
    from transformers import Dinov2Config

    from llavadi.models.build import vision_image_processor

    with pytest.raises(ValueError, match=r"/v: no image processor \(preprocessor_config.json\) for a 'dinov2' tower"):
        vision_image_processor(Dinov2Config(image_size=32), str(tmp_path / "v"))


# ----------------------------------------------------------------------------- a student given by hub id

HUB_PROBE = """
import json, sys, warnings
from llavadi.models.build import load_llava_dir
from llavadi.models.describe import describe_llava_dir
out = {}
for name in sys.argv[1:]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_llava_dir(name)
        described = describe_llava_dir(name)
    out[name] = {"meta": loaded.meta, "described": described.meta, "template": loaded.template,
                 "warned": any("load it once online" in str(w.message) for w in caught)}
print(json.dumps(out))
"""
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hub_snapshot(cache, name: str, files_from, with_meta: bool = True, known_absent: bool = False) -> str:
    """One model in an HF hub cache folder (models--org--name/snapshots/<rev>/..., refs/main); `known_absent`:
    the hub client recorded that the repository has no llavadi.json (.no_exist/<rev>/llavadi.json)."""
    import shutil

    repo = cache / f"models--llavadi-test--{name}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(files_from, snapshot)
    if not with_meta:
        (snapshot / "llavadi.json").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    if known_absent:
        (repo / ".no_exist" / REVISION).mkdir(parents=True)
        (repo / ".no_exist" / REVISION / "llavadi.json").touch()
    return f"llavadi-test/{name}"


def test_a_model_given_by_hub_id_keeps_its_llavadi_json_read_offline_from_the_hub_cache(tmp_path):
    """Its template and system prompt (what training and eval prompt it with) come from the snapshot's llavadi.json;
    a repository recorded without one gets the defaults; offline, a cache that never asked cannot tell: the
    defaults with a warning saying so."""
    import json
    import os
    import subprocess
    import sys

    from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer

    from llavadi.models.build import LoadedModel, save_model

    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32),
                           {"template": "vicuna_v1", "system": "Answer in one word."}), str(tmp_path / "student"))
    cache = tmp_path / "hub"
    names = [_hub_snapshot(cache, "prompted", tmp_path / "student"),
             _hub_snapshot(cache, "plain", tmp_path / "student", with_meta=False, known_absent=True),
             _hub_snapshot(cache, "unknown", tmp_path / "student", with_meta=False)]
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", HUB_PROBE, *names], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    prompted, plain, unknown = (got[n] for n in names)
    for meta in (prompted["meta"], prompted["described"]):
        assert meta["template"] == "vicuna_v1" and meta["system"] == "Answer in one word.", got
    assert not prompted["warned"]
    assert plain == {"meta": {}, "described": {}, "template": "vicuna_v1", "warned": False}
    assert unknown == {"meta": {}, "described": {}, "template": "vicuna_v1", "warned": True}


def test_an_unset_vision_feature_layer_keeps_the_fingerprints_of_stages_finished_before():
    """Stages finished when the key defaulted to -2 stay done: the fingerprint records an unset key as -2."""
    from llavadi.train.stages import stage_recipe

    unset = recipe_from_dict(_raw())
    former = recipe_from_dict(_raw(student={"preset": "tiny-student", "vision_feature_layer": -2},
                                   teacher={"preset": "tiny-teacher", "vision_feature_layer": -2}))
    assert stage_recipe(unset, unset.stages[0]) == stage_recipe(former, former.stages[0])
    assert stage_recipe(unset, unset.stages[0])["student"]["vision_feature_layer"] == -2
