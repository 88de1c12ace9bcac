"""`llavadi export --to gguf`: refusal by name, and the exported files run by llama.cpp (llama-cpp-python).

The runtime tests build the demo's tiny student (random weights: its greedy answers are
arbitrary token strings, which makes a stricter comparison than a trained model's few words)
and the demo's held-out question format (`make_synthetic`), export it, load the files with
llama-cpp-python, and compare with the HF model through the same evaluation code.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llavadi.cli import main
from llavadi.export.gguf_target import parse_quants
from llavadi.export.support import ExportRefused, check_gguf_support


def _save_config(folder, config) -> str:
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    return str(folder)


def _llava_config(**changes):
    from llavadi.models.presets import PRESETS, llava_config
    from llavadi.models.tokenizer import build_tiny_tokenizer

    config = llava_config(PRESETS["tiny-student"], build_tiny_tokenizer())
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_other_families_are_refused_by_name_before_any_weights(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl",
                                                    "architectures": ["Qwen2VLForConditionalGeneration"]}))
    with pytest.raises(ExportRefused, match="model type 'qwen2_vl' is not supported by the GGUF export"):
        check_gguf_support(folder)  # no weights in the folder: nothing was loaded


def test_siglip_tower_and_unsupported_settings_are_refused_by_name(tmp_path):
    from transformers import SiglipVisionConfig

    siglip = _llava_config()
    siglip.vision_config = SiglipVisionConfig(image_size=48, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128)
    with pytest.raises(ExportRefused, match="vision tower 'siglip_vision_model' is not supported"):
        check_gguf_support(_save_config(tmp_path / "siglip", siglip))
    with pytest.raises(ExportRefused, match="vision_feature_layer \\[-2, -1\\] \\(several layers\\)"):
        check_gguf_support(_save_config(tmp_path / "layers", _llava_config(vision_feature_layer=[-2, -1])))
    with pytest.raises(ExportRefused, match="vision_feature_select_strategy 'full'"):
        check_gguf_support(_save_config(tmp_path / "full", _llava_config(vision_feature_select_strategy="full")))


def test_cli_refusal_exits_2_naming_the_family(tmp_path, capsys):
    folder = tmp_path / "idefics"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    assert main(["export", str(folder), "--to", "gguf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model type 'idefics3' is not supported by the GGUF export" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_quantization_is_refused_listing_the_known_ones():
    assert parse_quants("F16, q4_k_m,f16") == ["f16", "q4_k_m"]
    with pytest.raises(ValueError, match="unknown quantization q3_xs; choose from f32, f16, q4_0"):
        parse_quants("f16,q3_xs")


# --------------------------------------------------------------------------- against llama.cpp


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The demo's tiny student (random weights), saved, exported to f16 / q8_0 / q4_0 / q4_k_m, + held-out questions."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (pip install 'llavadi[export]') runs the GGUF files")
    pytest.importorskip("gguf", reason="the gguf package (pip install 'llavadi[export]') writes the GGUF files")
    from llavadi.data.synthetic import make_synthetic
    from llavadi.export.gguf_target import export_gguf
    from llavadi.models.build import LoadedModel, save_model
    from llavadi.models.presets import build_preset

    root = tmp_path_factory.mktemp("export")
    model, tok, processor = build_preset("tiny-student", seed=0)
    hf_dir = save_model(LoadedModel(model, tok, processor, {}), str(root / "student"))
    paths = make_synthetic(root / "data", seed=1, n_caption=4, n_instruct=4, n_eval=24)
    manifest = export_gguf(hf_dir, root / "gguf", ["f16", "q8_0", "q4_0", "q4_k_m"])
    return {"hf": hf_dir, "gguf": str(root / "gguf"), "manifest": manifest, "questions": str(paths["eval"]),
            "images": str(paths["image_dir"]), "root": root}


def _eval_questions(exported):
    from llavadi.eval.benchmarks import get_benchmark
    from llavadi.eval.generate import from_benchmark_questions

    return from_benchmark_questions(get_benchmark("synthetic").load_questions(exported["questions"]),
                                    exported["images"])


def _answer_ids(model_path, questions):
    from llavadi.eval.generate import generate_answer_ids, load_for_eval

    bundle = load_for_eval(model_path, device="cpu", dtype="float32")
    return generate_answer_ids(bundle, questions, batch_size=8, max_new_tokens=8, progress=False), bundle


def _hf_features(model, pixels, strategy: str) -> np.ndarray:
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                        vision_feature_select_strategy=strategy).pooler_output[0].numpy()


def test_f16_export_against_the_hf_student(exported):
    """The f16 files run by llama.cpp against the HF student, on 24 held-out questions of the demo's format.

    - Image embeddings (tolerance 1e-2 of their scale: f16 weights, activations rounded to f16 in
      llama.cpp's matrix products, its tanh GELU): the export probed llama.cpp, found its LLaVA graph
      reads [patches, CLS] with table rows 0..n, and wrote the position table rotated; llama.cpp's 9
      image embeddings then equal HF's features of patches 2..9 and of the class token, in that
      order (the HF tower's own order, CLS kept: "full"); patch 1 is dropped by llama.cpp.
    - Text: the first answer token's logits of a text-only prompt within 1e-3 (f16 KV cache).
    - Greedy answers (8 tokens) equal the HF student's, no tolerance. This random student's answers do
      not depend on the image, so the image path is checked by the embeddings above, not by the answers.
    """
    from llavadi.eval.generate import EvalQuestion, encode_question, generate_answer_ids, question_image
    from llavadi.export.gguf_runtime import runtime_image

    questions = _eval_questions(exported)
    hf_ids, hf = _answer_ids(exported["hf"], questions)
    gguf_ids, exported_model = _answer_ids(os.path.join(exported["gguf"], "model-f16.gguf"), questions)
    runtime, model = exported_model.model, hf.model.model
    image = runtime_image(hf, question_image(questions[0]))
    pixels = hf.image_processor(images=image, return_tensors="pt")["pixel_values"]
    theirs = runtime.image_embeddings(image)
    full = _hf_features(model, pixels, "full")  # [CLS, patch 1..9], projected
    positions = exported["manifest"]["position_table"]
    assert positions["chosen_by"] == "probe" and positions["probe"]["runtime"].startswith("llama-cpp-python")
    if positions["probe"]["class_token_last"]:
        assert positions["order"] == "rotated"
        expected = np.concatenate([full[2:], full[:1]])  # llama.cpp keeps [patch 2..9, CLS]
    else:  # a llama.cpp that reads CLIP's order: the HF table, HF's own features
        assert positions["order"] == "hf"
        expected = full[1:]
    scale = float(np.abs(expected).max())
    assert theirs.shape == expected.shape == (9, 128)
    assert float(np.abs(theirs - expected).max()) <= 1e-2 * scale
    assert float(np.abs(theirs - full[1:]).max()) > 1e-1 * scale or not positions["probe"]["class_token_last"]
    prompt = encode_question(hf.encoder(), EvalQuestion("text", "What color is the circle?"))
    with torch.no_grad():
        hf_logits = hf.model(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    runtime.answer(prompt, None, 1, [], hf.model.config.image_token_id)
    np.testing.assert_allclose(runtime._last_logits(), hf_logits, atol=1e-3, rtol=0)
    assert gguf_ids == hf_ids
    assert gguf_ids == generate_answer_ids(hf, questions, batch_size=8, max_new_tokens=8, progress=False)


def test_hf_position_table_is_read_in_llama_cpps_token_order(exported):
    """The mmproj written with CLIP's own table (--position-table hf), run by llama.cpp.

    Under a graph that reads [patches, CLS] with rows 0..n, every patch gets its neighbour's position
    embedding: llama.cpp's embeddings equal the HF tower's read that way (`read_tokens_as_llama_cpp`),
    within 1e-2 of their scale, and differ from HF's own by more than 1e-1. The mmproj records the
    table it holds. A llama.cpp that reads CLIP's order gives HF's own features instead.
    """
    import gguf

    from llavadi.eval.generate import question_image
    from llavadi.export.gguf_files import POSITION_TABLE_KEY, write_mmproj_gguf
    from llavadi.export.gguf_runtime import GgufRuntime, read_tokens_as_llama_cpp, runtime_image
    from llavadi.export.support import check_gguf_support
    from llavadi.models.build import load_llava_dir

    hf = load_llava_dir(exported["hf"], dtype=torch.float32)
    mmproj = str(exported["root"] / "mmproj-hf-table.gguf")
    write_mmproj_gguf(hf.model, hf.image_processor, check_gguf_support(exported["hf"]), mmproj, "hf-table", order="hf")
    field = gguf.GGUFReader(mmproj).get_field(POSITION_TABLE_KEY)
    assert bytes(field.parts[field.data[0]]).decode() == "hf"
    runtime = GgufRuntime(os.path.join(exported["gguf"], "model-f16.gguf"), mmproj, hf.model.config,
                          hf.model.generation_config, n_ctx=64)
    image = runtime_image(hf, question_image(_eval_questions(exported)[0]))
    pixels = hf.image_processor(images=image, return_tensors="pt")["pixel_values"]
    try:
        theirs = runtime.image_embeddings(image)
    finally:
        runtime.close()
    hf_order = _hf_features(hf.model.model, pixels, "default")
    read_tokens_as_llama_cpp(hf.model.model.vision_tower, "hf")
    cpp_order = _hf_features(hf.model.model, pixels, "default")
    scale = float(np.abs(cpp_order).max())
    if exported["manifest"]["position_table"]["probe"]["class_token_last"]:
        assert float(np.abs(theirs - cpp_order).max()) <= 1e-2 * scale
        assert float(np.abs(theirs - hf_order).max()) > 1e-1 * scale
    else:
        assert float(np.abs(theirs - hf_order).max()) <= 1e-2 * scale


def test_position_table_rotation_and_choices():
    """Row i of the rotated table is HF row i+1, its last row HF row 0; unknown choices are refused by name."""
    from llavadi.export.gguf_files import position_table
    from llavadi.export.gguf_target import resolve_position_order

    table = torch.arange(10.0)[:, None].expand(10, 3)
    assert position_table(table, "rotated")[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert position_table(table, "hf") is table
    assert resolve_position_order("hf") == {"order": "hf", "chosen_by": "forced", "probe": None}
    with pytest.raises(ValueError, match="unknown position table 'cls'; choose from auto, hf, rotated"):
        resolve_position_order("cls")


def test_quantized_variants_load_answer_and_are_scored(exported):
    """q8_0 / q4_0 / q4_k_m load in llama.cpp, answer every question, and are scored by `llavadi eval`'s scorer."""
    from llavadi.eval.eval_command import evaluate

    manifest = exported["manifest"]
    types = {name: v["tensor_types"] for name, v in manifest["variants"].items()}
    assert types["f16"] == {"F16": 9, "F32": 3} and set(types["q8_0"]) >= {"Q8_0"}
    assert "Q4_0" in types["q4_0"]
    # 128-wide rows are not a multiple of 256: llama.cpp's k-quants fall back (q4_K -> q5_0, q6_K -> q8_0)
    assert not {"Q4_K", "Q6_K"} & set(types["q4_k_m"]) and "Q5_0" in types["q4_k_m"]
    sizes = {name: v["model_bytes"] for name, v in manifest["variants"].items()}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
    for quant in ("q8_0", "q4_0", "q4_k_m"):
        out = exported["root"] / f"eval-{quant}"
        result = evaluate(os.path.join(exported["gguf"], f"model-{quant}.gguf"), "synthetic", exported["questions"],
                          exported["images"], str(out), teacher_dir=exported["hf"], batch_size=8,
                          max_new_tokens=8, progress=False)
        assert result["counts"]["predictions"] == 24 and 0.0 <= result["metrics"]["accuracy"] <= 100.0
        assert "agreement" in result["metrics"] and "teacher_student_kl" not in result["metrics"]
        answers = [json.loads(line) for line in open(out / "answers.jsonl")]
        assert len(answers) == 24 and answers[0]["model_id"] == f"model-{quant}.gguf"


def test_export_folder_with_several_variants_asks_for_one(exported):
    from llavadi.export.gguf_runtime import ExportedModelError, load_exported

    with pytest.raises(ExportedModelError, match="holds 4 variants"):
        load_exported(exported["gguf"])


def test_plain_int8_linear_is_per_channel_absmax_and_matches_torchao():
    """The PyTorch baseline: weights rounded to int8 with one absmax/127 scale per output row."""
    from torch import nn

    from llavadi.export.torch_int8 import PerChannelInt8Linear

    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    x = torch.randn(5, 64)
    q = PerChannelInt8Linear(linear)
    w = linear.weight.detach()
    scale = w.abs().max(dim=1).values / 127  # written plainly: one scale per output channel
    expected_w = torch.round(w / scale[:, None]) * scale[:, None]
    assert q.weight_int8.dtype == torch.int8 and int(q.weight_int8.abs().max()) == 127
    torch.testing.assert_close(q(x), x @ expected_w.T + linear.bias.detach(), atol=1e-5, rtol=0)
    assert float((expected_w - w).abs().max()) <= float(scale.max()) / 2 + 1e-7
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return  # torchao is optional (pip install 'llavadi[torchao]'): the plain scheme is checked above
    peer = nn.Sequential(nn.Linear(64, 24))
    peer[0].load_state_dict(linear.state_dict())
    quantize_(peer, Int8WeightOnlyConfig())
    # torchao's scheme (range -128..127) rounds some weights differently: both stay within half a step per weight
    bound = x.abs() @ (scale[:, None].expand_as(w) / 2).T + 1e-5
    exact = x @ w.T + linear.bias.detach()
    with torch.no_grad():
        assert bool(((peer(x) - exact).abs() <= bound).all()) and bool(((q(x) - exact).abs() <= bound).all())


def test_measure_exported_answers_as_eval_does_and_counts_what_it_read(exported):
    """`measure_exported` (the cost rows' measurement): its answers are `llavadi eval`'s, its counts and size add up."""
    from llavadi.eval.decode import eos_token_ids
    from llavadi.eval.generate import encode_question, generate_answer_ids, load_for_eval, question_image
    from llavadi.export.gguf_runtime import load_export_prompter
    from llavadi.export.measure import measure_exported

    path = os.path.join(exported["gguf"], "model-q4_0.gguf")
    questions = _eval_questions(exported)[:4]
    bundle = load_for_eval(path)
    expected = generate_answer_ids(bundle, questions, batch_size=1, max_new_tokens=8, progress=False)
    bundle.model.close()
    prompter = load_export_prompter(path)  # no model: the same prompts and eos ids as the loaded bundle's
    prompts = [encode_question(prompter.encoder(), q) for q in questions]
    assert prompts == [encode_question(bundle.encoder(), q) for q in questions]
    assert eos_token_ids(prompter.model, prompter.tokenizer) == eos_token_ids(bundle.model, bundle.tokenizer)
    images = [question_image(q) if q.has_image else None for q in questions]
    row = measure_exported(path, prompts, images, 8, eos_token_ids(prompter.model, prompter.tokenizer), n_ttft=2,
                           threads=1)
    assert row["answers"] == expected and row["n_answers"] == 4 and row["tokens"] == sum(map(len, expected))
    assert row["file_bytes"] == os.path.getsize(path) + os.path.getsize(os.path.join(exported["gguf"],
                                                                                     "mmproj-f16.gguf"))
    assert row["quant"] == "q4_0" and row["threads"] == 1
    assert row["position_table"] == exported["manifest"]["position_table"]
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
    with pytest.raises(ValueError, match="4 prompts for 3 images"):
        measure_exported(path, prompts, images[:3], 8, [0])
    # the student's own prompts, exported and measured in one call, give the same answers
    from llavadi.eval.generate import load_for_eval as load_hf
    from llavadi.export.measure import export_and_measure

    hf = load_hf(exported["hf"], device="cpu", dtype="float32")
    assert [encode_question(hf.encoder(), q) for q in questions] == prompts
    one = export_and_measure(exported["hf"], exported["root"] / "one-q4_0", "q4_0", prompts, images, 8,
                             eos_token_ids(hf.model, hf.tokenizer), n_ttft=1, threads=1)
    assert one["answers"] == expected and set(one["export"]["variants"]) == {"q4_0"}
    assert one["model"].endswith("model-q4_0.gguf") and one["file_bytes"] == row["file_bytes"]


def test_cli_position_table_forced_is_written_and_recorded(exported, capsys):
    """`--position-table rotated|hf` skips the probe, writes that table into the mmproj and records it."""
    import gguf

    from llavadi.export.gguf_files import POSITION_TABLE_KEY
    from llavadi.models.build import load_llava_dir

    tower = load_llava_dir(exported["hf"], dtype=torch.float32).model.model.vision_tower
    weight = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight.detach().numpy()
    for order, expected in (("hf", weight), ("rotated", np.concatenate([weight[1:], weight[:1]]))):
        out = exported["root"] / f"cli-{order}"
        assert main(["export", exported["hf"], "--to", "gguf", "--out", str(out), "--quant", "f16",
                     "--position-table", order]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["position_table"] == {"order": order, "chosen_by": "forced", "probe": None}
        reader = gguf.GGUFReader(str(out / "mmproj-f16.gguf"))
        field = reader.get_field(POSITION_TABLE_KEY)
        assert bytes(field.parts[field.data[0]]).decode() == order
        table = next(t for t in reader.tensors if t.name == "v.position_embd.weight")
        np.testing.assert_allclose(np.asarray(table.data, dtype=np.float32).reshape(expected.shape), expected,
                                   atol=1e-3, rtol=1e-3)  # stored in f16
        assert json.loads((out / "export.json").read_text())["position_table"]["order"] == order
