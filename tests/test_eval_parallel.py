"""`llavadi eval` on several benchmarks in one call (a suite file), and data-parallel: 2 processes under torchrun
give the same answers, teacher answers, scores and KL as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_image_processor, make_tiny_llava, make_word_tokenizer, only_teardown_abort, write_images

from llavadi.cli import main
from llavadi.eval.eval_command import evaluate
from llavadi.models.build import LoadedModel, save_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["what color is the circle ?", "how many ?", "how many shape are there in the top left of the picture ?",
         "describe the image", "is there a red square ?", "what is in the picture ?", "hello world",
         "what shape is in the center ?", "are there two ?"]


def _sharpened(tok, seed, **kw):
    """A tiny random model with large weights: greedy answers depend on the prompt and the image."""
    model = make_tiny_llava(tok, seed=seed, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_parallel")
    tok = make_word_tokenizer()
    meta = {"template": "vicuna_v1", "system": ""}
    save_model(LoadedModel(_sharpened(tok, 0), tok, make_image_processor(32), meta), str(root / "student"))
    save_model(LoadedModel(_sharpened(tok, 1, text_hidden=64), tok, make_image_processor(32), meta),
               str(root / "teacher"))
    write_images(root / "imgs", 4)
    rows = [{"question_id": f"q{i}", "text": text, "answer": "red", "category": "color" if i % 2 else "count",
             **({"image": f"img{i % 4}.png"} if i != 6 else {})} for i, text in enumerate(TEXTS)]
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = [{"benchmark": "synthetic", "questions": "q.jsonl", "images": "imgs"},
             {"benchmark": "synthetic", "questions": "q.jsonl", "images": "imgs", "limit": 4, "name": "first4"}]
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root


def _eval_args(root, out, *extra):
    return ["eval", "--model", str(root / "student"), "--teacher", str(root / "teacher"), "--suite",
            str(root / "suite.yaml"), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "4",
            "--device", "cpu", "--no-progress", *extra]


def _outputs(out, folder) -> dict:
    """What a run wrote for one suite entry: answers, teacher answers, metrics and counts."""
    base = out / folder
    result = json.loads((base / "synthetic.json").read_text())
    return {"answers": (base / "answers.jsonl").read_text(), "teacher": (base / "teacher_answers.jsonl").read_text(),
            "metrics": result["metrics"], "counts": result["counts"]}


@pytest.fixture(scope="module")
def one_process(workspace):
    out = workspace / "one"
    assert main(_eval_args(workspace, out)) == 0
    return out


def test_suite_evaluates_every_benchmark_as_single_calls_do(workspace, one_process, tmp_path):
    for folder, limit in (("synthetic", None), ("first4", 4)):
        alone = evaluate(str(workspace / "student"), "synthetic", str(workspace / "q.jsonl"), str(workspace / "imgs"),
                         str(tmp_path / folder), teacher_dir=str(workspace / "teacher"), batch_size=2,
                         max_new_tokens=4, limit=limit, device="cpu", progress=False)
        got = _outputs(one_process, folder)
        assert got["metrics"] == alone["metrics"] and got["counts"] == alone["counts"]
        assert got["answers"] == (tmp_path / folder / "answers.jsonl").read_text()
    assert len(_outputs(one_process, "first4")["answers"].splitlines()) == 4
    combined = json.loads((one_process / "results.json").read_text())
    assert set(combined) == {"synthetic", "first4"}
    table = (one_process / "results.md").read_text()
    assert "synthetic/accuracy" in table and "first4/agreement" in table


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s[0].update(questions="missing.jsonl"), r"suite.yaml\[0\]: .*missing.jsonl: file not found"),
    (lambda s: s[1].update(benchmark="popee"), r"suite.yaml\[1\]: unknown benchmark 'popee'"),
    (lambda s: s[0].update(image="imgs"), r"suite.yaml\[0\]: unknown key\(s\) \['image'\]"),
    (lambda s: s[0].update(annotations="none.json"), r"suite.yaml\[0\]: annotations .*none.json not found"),
    (lambda s: s[1].pop("name"), r"\['synthetic'\] appear twice; give the entries distinct `name`s"),
    (lambda s: s[0].update(images="nowhere"), r"suite.yaml\[0\]: \d+ question\(s\) with an unusable image:\s+"
                                              r"question 'q0': .*nowhere/img0.png"),
])
def test_suite_mistakes_are_named_before_any_model_loads(workspace, tmp_path, capsys, monkeypatch, mutate, message):
    import re

    def no_loading(*_a, **_k):
        raise AssertionError("a model was loaded before the suite was checked")

    monkeypatch.setattr("llavadi.eval.generate.load_for_eval", no_loading)
    suite = yaml.safe_load((workspace / "suite.yaml").read_text())
    mutate(suite)
    path = workspace / "suite.yaml"  # relative paths resolve against the suite file's folder
    path = path.with_name(f"bad-{tmp_path.name}.suite.yaml")
    path.write_text(yaml.safe_dump(suite))
    args = _eval_args(workspace, tmp_path / "out")
    args[args.index("--suite") + 1] = str(path)
    assert main(args) == 2
    assert re.search(message.replace("suite.yaml", r"\.suite\.yaml"), capsys.readouterr().err)


def test_suite_and_single_benchmark_flags_do_not_mix(workspace, tmp_path, capsys):
    assert main(_eval_args(workspace, tmp_path / "o", "--benchmark", "pope")) == 2
    assert "--benchmark: with --suite, give these per benchmark in the suite file" in capsys.readouterr().err
    assert main(["eval", "--model", str(workspace / "student"), "--out", str(tmp_path / "o")]) == 2
    assert "give --benchmark and --questions" in capsys.readouterr().err


def test_sharded_batches_are_the_one_process_batches():
    from llavadi.eval.generate import length_sorted_batches
    from llavadi.eval.parallel import Shard

    batches = length_sorted_batches([3, 9, 1, 7, 5, 5, 2], 2)
    assert batches == [[1, 3], [4, 5], [0, 6], [2]]  # longest first, ties in question order
    shards = [Shard(rank, 2) for rank in range(2)]
    assert [[k for k in range(len(batches)) if s.owns(k)] for s in shards] == [[0, 2], [1, 3]]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_give_the_one_process_results(workspace, one_process, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llavadi", *_eval_args(workspace, out)]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers share the new session
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 180 s; output tail:\n{log[-3000:]}")
    written = [out / "results.json"]
    assert proc.returncode == 0 or only_teardown_abort(proc.returncode, log, *written), log[-3000:]
    for folder in ("synthetic", "first4"):
        assert _outputs(out, folder) == _outputs(one_process, folder), folder
        generation = json.loads((out / folder / "synthetic.json").read_text())["generation"]
        assert generation["processes"] == 2  # two real processes, not one silently
    # the answers differ between questions: the comparison can fail
    assert len({json.loads(line)["text"] for line in _outputs(out, "synthetic")["answers"].splitlines()}) > 1
