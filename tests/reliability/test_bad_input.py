"""Bad input to `llavadi train`: reported before any model loads, in one report, never a bare traceback.

Each test feeds one kind of bad input the way a user would (files on disk, the CLI or
`run_recipe`) and checks the exit code or exception, the message (file, line, sample or key), and
that no model was loaded or published.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from workspace import make_workspace, one_stage, report, truncate

import llavadi.train.runner as runner
import llavadi.train.stage_inputs as stage_inputs
from llavadi.cli import main
from llavadi.data.encode import SampleError
from llavadi.recipe import recipe_from_dict
from llavadi.train.preflight import PreflightError


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("bad"))


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if the runner loads a model."""
    def refuse(spec, *a, **k):
        raise AssertionError(f"a model was loaded ({spec}) before the bad input was reported")
    monkeypatch.setattr(runner, "load_model", refuse)


def _data(ws: Path, tmp_path: Path, rows: list | None = None, name: str = "inst.json") -> Path:
    rows = json.loads((ws / "inst.json").read_text()) if rows is None else rows
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def _cli(ws, tmp_path, raw: dict, *extra: str) -> int:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return main(["train", str(path), *extra, "--quiet"])


def _images_copy(ws: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in (ws / "imgs").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_image_is_found_before_training(ws, tmp_path, no_model_loads, capsys, fmt):
    images = _images_copy(ws, tmp_path)
    noise = Image.frombytes("RGB", (96, 96), bytes(range(256)) * 108)  # pixel data well past the header
    noise.save(images / "img1.png", format=fmt)  # a JPEG under a .png name too: formats are read from the bytes
    truncate(images / "img1.png")
    with Image.open(images / "img1.png") as im:  # the header alone still reads fine
        assert im.size == (96, 96)
    raw = one_stage(ws, tmp_path / "run", data={"image_folder": str(images)})
    assert _cli(ws, tmp_path, raw) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "before loading any model" in err
    assert "inst.json[1] (sample 's1'): unreadable image" in err and "img1.png" in err
    assert "4 bad sample(s) of 16" in err  # s1, s5, s9, s13 use img1.png: all listed in one report
    assert not (tmp_path / "run" / "finetune").exists()


def test_truncated_image_is_skipped_and_counted_under_skip(ws, tmp_path):
    images = _images_copy(ws, tmp_path)
    truncate(images / "img2.png")
    raw = one_stage(ws, tmp_path / "run", train={"max_steps": 2}, data={"image_folder": str(images),
                                                                          "on_error": "skip"})
    runner.run_recipe(recipe_from_dict(raw), log=lambda *_: None)
    rep = report(tmp_path / "run")
    assert rep["used"] == 12 and sorted(s["sample_id"] for s in rep["skipped"]) == ["s10", "s14", "s2", "s6"]
    assert all("unreadable image" in s["reason"] for s in rep["skipped"])


def _truncate_after_validation(monkeypatch, image: Path):
    """The image breaks after the training dataset validated it (changed on disk while training)."""
    real = stage_inputs.build_dataset
    calls = []

    def build_then_break(*a, **k):
        dataset = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:  # the first build is the up-front check's
            truncate(image)
        return dataset
    monkeypatch.setattr(stage_inputs, "build_dataset", build_then_break)


def test_image_failing_at_load_time_is_replaced_and_counted_under_skip(ws, tmp_path, monkeypatch):
    images = _images_copy(ws, tmp_path)
    _truncate_after_validation(monkeypatch, images / "img3.png")
    raw = one_stage(ws, tmp_path / "run", train={"max_steps": 4}, data={"image_folder": str(images),
                                                                          "on_error": "skip"})
    runner.run_recipe(recipe_from_dict(raw), log=lambda *_: None)  # 4 steps of 4 = every sample once
    rep = report(tmp_path / "run")
    assert rep["steps"] == 4 and rep["skipped"] == []
    assert sorted(r["sample_id"] for r in rep["replaced_at_load"]) == ["s11", "s15", "s3", "s7"]
    assert all("img3.png" in r["reason"] for r in rep["replaced_at_load"])


def test_image_failing_at_load_time_names_the_sample_under_raise(ws, tmp_path, monkeypatch, capsys):
    images = _images_copy(ws, tmp_path)
    _truncate_after_validation(monkeypatch, images / "img3.png")
    raw = one_stage(ws, tmp_path / "run", train={"max_steps": 4}, data={"image_folder": str(images)})
    with pytest.raises(SampleError, match=r"inst\.json\[\d+\]: sample 's\d+': unreadable image .*img3\.png"):
        runner.run_recipe(recipe_from_dict(raw), log=lambda *_: None)
    monkeypatch.undo()
    assert _cli(ws, tmp_path, raw) == 2  # the rerun finds it up front
    assert "img3.png" in capsys.readouterr().err


def test_every_recipe_mistake_is_reported_at_once_before_any_model_loads(ws, tmp_path, no_model_loads, capsys):
    """Malformed data, a missing data file (stage 2), a missing image, vision_from_layer out of range, a
    layer index out of range: one report. (The train section's own mistakes are all named when the
    recipe is read: test_train_section_mistakes_are_named_together.)"""
    rows = json.loads((ws / "inst.json").read_text())
    rows[2]["image"] = "missing.png"
    data = _data(ws, tmp_path, rows)
    raw = one_stage(ws, tmp_path / "run", data={"path": str(data)},
                    terms=[{"name": "hidden_mse", "options": {"layers": [[9, -1]]}}])
    raw["stages"][0]["trainable"] = {"vision_from_layer": 5}
    (tmp_path / "broken.json").write_text('[{"id": "a", "conversations": [}]')
    raw["stages"].append({"name": "second", "data": {"path": str(tmp_path / "nope.json")}})
    raw["stages"].append({"name": "third", "data": {"path": str(tmp_path / "broken.json")}})
    assert _cli(ws, tmp_path, raw) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for expected in ("5 problem(s) found before loading any model",
                     "inst.json[2] (sample 's2'): image file not found",
                     "vision_from_layer: 5 is out of range: the student's vision tower has 2 layers",
                     "hidden state 9 is out of range for the student's 3 hidden states",
                     "stages[1] (second).data: " + str(tmp_path / "nope.json") + ": cannot read data file",
                     "broken.json:1: malformed JSON"):
        assert expected in err, expected
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_train_section_mistakes_are_named_together(ws, tmp_path, no_model_loads, capsys):
    """A misspelt TrainingArguments field, a field llavadi sets, a bad scheduler: one message."""
    raw = one_stage(ws, tmp_path / "run", train={"gradient_acumulation_steps": 2, "output_dir": "elsewhere",
                                                  "lr_scheduler_type": "cosin"})
    assert _cli(ws, tmp_path, raw) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for expected in ("3 problems in the recipe",
                     "train.gradient_acumulation_steps: not a transformers.TrainingArguments field; "
                     "did you mean `gradient_accumulation_steps`?",
                     "train.output_dir: set by llavadi; a stage's checkpoints go to <output_dir>/<stage>/checkpoints",
                     "train.lr_scheduler_type: 'cosin' is not a valid choice; did you mean 'cosine'?"):
        assert expected in err, expected
    assert not (tmp_path / "run").exists()


def test_tokenizer_mismatch_for_logit_terms_is_reported_up_front(ws, tmp_path, no_model_loads, capsys):
    from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer
    from tokenizers import models

    from llavadi.models.build import LoadedModel, save_model

    tok = make_word_tokenizer()  # another base vocabulary: a different tokenizer (an added token alone is not)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    tok.backend_tokenizer.model = models.WordLevel(vocab={**vocab, "zebra": len(vocab)}, unk_token="<unk>")
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(tmp_path / "other"))
    raw = one_stage(ws, tmp_path / "run")
    raw["teacher"] = {"path": str(tmp_path / "other")}
    assert _cli(ws, tmp_path, raw) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "different tokenizers" in err and "'zebra'" in err
    assert "use uld or gold" in err


def test_bare_tracebacks_of_old_are_messages(ws, tmp_path, no_model_loads, capsys):
    """Non-UTF-8 data, a malformed override, an empty model folder: exit 2 with a message."""
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps([{"id": "é", "conversations": []}]).encode().replace(b"\\u00e9", b"\xe9"))
    raw = one_stage(ws, tmp_path / "run", data={"path": str(latin)})
    assert _cli(ws, tmp_path, raw) == 2
    assert "latin.json:1: not UTF-8 text (byte" in capsys.readouterr().err

    raw = one_stage(ws, tmp_path / "run")
    assert _cli(ws, tmp_path, raw, "stages.finetune.train.optim={bad: [}") == 2
    assert "not valid YAML" in capsys.readouterr().err

    (tmp_path / "empty_model").mkdir()
    raw["student"] = {"path": str(tmp_path / "empty_model")}
    assert _cli(ws, tmp_path, raw) == 2
    err = capsys.readouterr().err
    assert "student: model path" in err and "no config.json (the folder holds nothing)" in err
    assert "Traceback" not in err


def test_empty_assistant_turn_is_an_error_or_a_counted_skip(ws, tmp_path, no_model_loads, capsys):
    rows = json.loads((ws / "inst.json").read_text())
    rows[4]["conversations"][1]["value"] = "  "
    data = _data(ws, tmp_path, rows)
    assert _cli(ws, tmp_path, one_stage(ws, tmp_path / "run", data={"path": str(data)})) == 2
    assert "inst.json[4] (sample 's4'): conversations[1] is an empty gpt turn" in capsys.readouterr().err
    checks = runner.preflight(recipe_from_dict(one_stage(ws, tmp_path / "run", data={"path": str(data),
                                                                                        "on_error": "skip"})),
                              log=lambda *_: None, progress=False)
    assert [s.sample_id for s in checks["finetune"].skipped] == ["s4"] and checks["finetune"].used == 15


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own notice at 89 MP
def test_pixel_limit_refuses_huge_images_without_decoding_them(ws, tmp_path, no_model_loads, capsys):
    images = _images_copy(ws, tmp_path)
    Image.new("1", (12000, 12000)).save(images / "img0.png")  # 144 megapixels, a few kB on disk
    raw = one_stage(ws, tmp_path / "run", data={"image_folder": str(images)})
    assert _cli(ws, tmp_path, raw) == 2
    err = capsys.readouterr().err
    assert "image of 12000x12000 = 144.0 megapixels is over the limit of 50 megapixels (data.max_pixels" in err
    # the limit is the recipe's: a small one refuses the 32x32 images too
    raw = one_stage(ws, tmp_path / "run2", data={"max_pixels": 1000})
    assert _cli(ws, tmp_path, raw) == 2
    assert "32x32 = 0.0 megapixels is over the limit of 0.001 megapixels" in capsys.readouterr().err


def test_check_only_validates_and_writes_nothing(ws, tmp_path, no_model_loads, capsys):
    raw = one_stage(ws, tmp_path / "run")
    assert _cli(ws, tmp_path, raw, "--check") == 0
    assert "recipe OK; stages: finetune fresh" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["preflight_report.json"]


def test_bad_sample_under_raise_leaves_no_stage_behind(ws, tmp_path):
    with pytest.raises(PreflightError):
        rows = json.loads((ws / "inst.json").read_text())
        rows[0]["conversations"] = rows[0]["conversations"][:1]
        runner.run_recipe(recipe_from_dict(one_stage(ws, tmp_path / "run", data={"path": str(_data(ws, tmp_path, rows))})),
                          log=lambda *_: None)
    assert not (tmp_path / "run" / "finetune").exists()
