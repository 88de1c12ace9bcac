"""Offline top-k teacher cache: format, round trip against the teacher, lookup by sample id, stale entries,
crash safety (SIGKILL + resume), torchrun, and training from a cache against training with the online teacher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import (
    make_image_processor,
    make_tiny_llava,
    make_word_tokenizer,
    only_teardown_abort,
    write_images,
    write_json,
)
from safetensors import safe_open
from safetensors.torch import load_file

from llavadi.data.collator import LlavaCollator
from llavadi.distill.selection import Predictions, Tokens
from llavadi.distill.view import Needs
from llavadi.models.build import LoadedModel, load_llava_dir, save_model
from llavadi.recipe import recipe_from_dict
from llavadi.teacher.cache import CachedTeacher, open_cache, sample_images
from llavadi.teacher.cache_format import (
    CacheError,
    cache_identity,
    id_dtype,
    position_runs,
    run_positions,
)
from llavadi.teacher.cache_teacher import cache_teacher
from llavadi.train.runner import run_recipe
from llavadi.train.stage_inputs import build_dataset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWERS = ["red", "a circle", "a red circle", "one blue square there", "a green triangle in middle",
           "a red circle and a square", "a blue square in the top left",
           "there is a yellow triangle in the bottom right"]
N_SAMPLES = 8


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    tok = make_word_tokenizer()
    save_model(LoadedModel(make_tiny_llava(tok), tok, make_image_processor(32), {}), str(root / "student0"))
    save_model(LoadedModel(make_tiny_llava(tok, text_hidden=64, seed=1), tok, make_image_processor(32), {}),
               str(root / "teacher0"))
    save_model(LoadedModel(make_tiny_llava(tok, text_hidden=64, seed=2), tok, make_image_processor(32), {}),
               str(root / "teacher_other"))
    write_images(root / "imgs", 4)
    data = [{"id": f"s{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\ndescribe the image"},
                               {"from": "gpt", "value": ANSWERS[i]}]} for i in range(N_SAMPLES)]
    data[5] = {"id": "s5", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"},
                                             {"from": "human", "value": "how many?"}, {"from": "gpt", "value": "two"}]}
    write_json(root / "data.json", data)
    return root


def _raw(ws, out, teacher=None, terms=None, data="data.json", batch_size=8, grad_accum=1, steps=1, **train_extra):
    train = {"learning_rate": 0.5, "max_steps": steps, "per_device_train_batch_size": batch_size,
             "gradient_accumulation_steps": grad_accum, "lr_scheduler_type": "constant", "warmup_steps": 0,
             "max_grad_norm": 1e9, "logging_steps": 1, "save_steps": 100, "optim": "sgd", **train_extra}
    raw = {"student": {"path": str(ws / "student0")}, "output_dir": str(out), "device": "cpu", "seed": 0,
           "data": {"image_folder": str(ws / "imgs"), "template": "vicuna_v1", "system": ""},
           "stages": [{"name": "finetune", "data": {"path": str(ws / data)}, "train": train,
                       "distill": {"terms": [{"name": "forward_kl"}] if terms is None else terms}}]}
    if teacher is not False:
        raw["teacher"] = teacher or {"path": str(ws / "teacher0")}
    return raw


def _cache(ws, out, data="data.json", **kwargs):
    kwargs.setdefault("progress", False)
    terms = kwargs.pop("terms", None)
    return cache_teacher(recipe_from_dict(_raw(ws, out / "unused-run", terms=terms, data=data)), str(out), **kwargs)


@pytest.fixture(scope="module")
def full_fp32(ws):
    """k = vocabulary, fp32 values: the teacher's whole distribution at the response prediction positions."""
    out = ws / "cache_full_fp32"
    _cache(ws, out, top_k=len(make_word_tokenizer()), values="fp32", shard_samples=3, batch_size=3)
    return out


def _batch(ws, order=None):
    """The stage's samples collated as training collates them (optionally in another order)."""
    stage = recipe_from_dict(_raw(ws, ws / "x")).stages[0]
    student = load_llava_dir(str(ws / "student0"))
    ds = build_dataset(stage, student, None)
    items = [ds[i] for i in (order or range(len(ds)))]
    return ds, LlavaCollator(student.tokenizer.pad_token_id)(items)


def _teacher_logprobs(ws, batch):
    """Reference: the teacher's full-vocabulary log-probs from a plain HF forward (B, T, V)."""
    teacher = load_llava_dir(str(ws / "teacher0")).model.eval()
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"]).logits
    return F.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("values,atol", [("fp32", 1e-5), ("fp16", 2e-2)])
def test_round_trip_equals_the_teachers_top_k(ws, tmp_path, values, atol):
    k = 5
    stats = _cache(ws, tmp_path / "c", top_k=k, values=values, shard_samples=3, batch_size=2)
    assert stats["entries"] == N_SAMPLES and stats["computed"] == N_SAMPLES
    ds, batch = _batch(ws)
    reference = _teacher_logprobs(ws, batch).topk(k, dim=-1)
    cached = CachedTeacher(open_cache(str(tmp_path / "c")), sample_images(ds), [Predictions("response")])
    view = cached.view(batch, Needs())
    rows = Predictions("response").mask(batch["token_types"])
    assert rows.sum() > 20
    assert torch.equal(view.topk_ids[rows], reference.indices[rows])
    assert torch.allclose(view.topk_logprobs[rows], reference.values[rows], atol=atol, rtol=0)
    assert view.topk_logprobs[~rows].isnan().all()  # nothing cached there: never a silent zero


def test_format_manifest_index_and_narrow_types(ws, full_fp32):
    manifest = json.loads((full_fp32 / "manifest.json").read_text())
    raw_index = json.loads((full_fp32 / "index.json").read_text())
    index = {sid: {**e, "shard": raw_index["shards"][e["shard"]]} for sid, e in raw_index["samples"].items()}
    assert manifest["complete"] and manifest["topk"] == manifest["vocab_size"] == len(make_word_tokenizer())
    assert manifest["template"] == "vicuna_v1" and manifest["max_length"] == 2048 and manifest["system"] == ""
    assert list(manifest["teacher"]["fingerprint"]["weights"]) == ["model.safetensors"]
    assert manifest["data"]["sha256"] and manifest["tokenizer"] and manifest["logit_groups"] == ["response"]
    assert sorted(index) == [f"s{i}" for i in range(N_SAMPLES)]
    assert not list(full_fp32.glob("journal-*")) and not list((full_fp32 / "shards").glob("*.tmp"))
    entry = index["s7"]
    assert set(entry) == {"shard", "rows", "runs", "digest"} and set(entry["digest"]) == {"ids", "types", "image"}
    with safe_open(str(full_fp32 / "shards" / entry["shard"]), "pt") as f:
        assert f.get_slice("topk_ids").get_dtype() == "U8"  # a 61-token vocabulary fits in one byte
        assert f.get_slice("topk_logprobs").get_dtype() == "F32"
        start, n = entry["runs"]
        runs = f.get_slice("logit_runs")[start:start + n]
    # the response of s7 is 9 words + </s>: 10 prediction positions, one run; the multi-turn s5 has two runs
    assert entry["rows"][1] == len(ANSWERS[7].split()) + 1 == 10 and runs.shape == (1, 2) and int(runs[0, 1]) == 10
    assert index["s5"]["runs"][1] == 2
    assert (id_dtype(32000), id_dtype(256), id_dtype(257), id_dtype(70000)) == \
        (torch.uint16, torch.uint8, torch.uint16, torch.int32)
    positions = torch.tensor([3, 4, 5, 9, 10, 20])
    assert position_runs(positions).tolist() == [[3, 3], [9, 2], [20, 1]]
    assert torch.equal(run_positions(position_runs(positions)), positions)


def test_lookup_is_by_sample_id_whatever_the_order(ws, full_fp32):
    reader = open_cache(str(full_fp32))
    ds, batch = _batch(ws)
    order = [6, 2, 7, 0, 5, 3, 1, 4]
    _, shuffled = _batch(ws, order)
    a = CachedTeacher(reader, sample_images(ds), [Predictions("response")]).view(batch, Needs())
    b = CachedTeacher(reader, sample_images(ds), [Predictions("response")]).view(shuffled, Needs())
    for j, i in enumerate(order):
        n = int(batch["attention_mask"][i].sum())
        assert torch.equal(a.topk_ids[i, :n], b.topk_ids[j, :n])
        assert torch.equal(a.topk_logprobs[i, :n].nan_to_num(7.0), b.topk_logprobs[j, :n].nan_to_num(7.0))


def test_rows_a_term_reads_but_were_not_cached_are_an_error(ws, full_fp32):
    ds, batch = _batch(ws)
    cached = CachedTeacher(open_cache(str(full_fp32)), sample_images(ds), [Predictions("text")])
    with pytest.raises(CacheError, match=r"sample 's0' position \d+ is read by the terms .*'text'.* not cached"):
        cached.view(batch, Needs())


def _weights(out):
    return load_file(os.path.join(out, "finetune", "model", "model.safetensors"))


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _run(raw):
    run_recipe(recipe_from_dict(raw), log=lambda *_: None)
    return _weights(raw["output_dir"])


@pytest.fixture(scope="module")
def online_step(ws):
    """The reference: one SGD step on the 8 samples with CE + forward KL against the online teacher."""
    return _run(_raw(ws, ws / "online"))


def test_training_from_a_full_cache_gives_the_online_weights(ws, full_fp32, online_step, tmp_path):
    initial = load_file(os.path.join(ws, "student0", "model.safetensors"))
    assert _max_diff(initial, online_step) > 1e-2  # the step moved the student
    cached = _run(_raw(ws, tmp_path / "cached", teacher={"cache": str(full_fp32)}))
    # measured 1.5e-8: fp32 values at k = V carry the teacher's whole distribution
    assert _max_diff(online_step, cached) <= 1e-5
    # grad accumulation 2 x 4 (other micro-batches, other order) looks the same entries up by id
    accumulated = _run(_raw(ws, tmp_path / "accum", teacher={"cache": str(full_fp32)}, batch_size=4, grad_accum=2))
    assert _max_diff(online_step, accumulated) <= 1e-5


def test_fp16_values_are_far_closer_to_online_than_ce_only(ws, online_step, tmp_path):
    out = tmp_path / "fp16"
    _cache(ws, out, top_k=len(make_word_tokenizer()), values="fp16")
    cached = _run(_raw(ws, tmp_path / "cached", teacher={"cache": str(out)}))
    ce_only = _run(_raw(ws, tmp_path / "ce", teacher=False, terms=[]))
    # measured: fp16 cache 3.0e-5 from online, CE only 1.0e-2
    assert _max_diff(online_step, cached) < _max_diff(online_step, ce_only) / 100


def _refused_up_front(raw, pattern):
    """The run stops with an error matching `pattern` before the stage starts (preflight: no model loaded)."""
    with pytest.raises(ValueError, match=pattern):
        run_recipe(recipe_from_dict(raw), log=lambda *_: None)
    assert not os.path.exists(os.path.join(raw["output_dir"], "finetune", "stage.json"))


def test_edited_sample_is_refused_by_id(ws, full_fp32, tmp_path):
    data = json.loads((ws / "data.json").read_text())
    data[3]["conversations"][1]["value"] = "a blue square"
    write_json(tmp_path / "edited.json", data)
    raw = _raw(ws, tmp_path / "edited", teacher={"cache": str(full_fp32)})
    raw["stages"][0]["data"]["path"] = str(tmp_path / "edited.json")
    _refused_up_front(raw, r"sample 's3' changed since it was cached: its token ids differ")
    # a new sample is named too
    write_json(tmp_path / "added.json", json.loads((ws / "data.json").read_text()) + [dict(data[0], id="new1")])
    raw = _raw(ws, tmp_path / "added", teacher={"cache": str(full_fp32)})
    raw["stages"][0]["data"]["path"] = str(tmp_path / "added.json")
    _refused_up_front(raw, r"1 sample\(s\) are not in teacher cache .*'new1'")


def test_edited_image_is_refused_before_training(ws, full_fp32, tmp_path):
    from PIL import Image

    shutil.copytree(ws / "imgs", tmp_path / "imgs")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "imgs" / "img2.png")  # s2 and s6 use it
    raw = _raw(ws, tmp_path / "run", teacher={"cache": str(full_fp32)})
    raw["data"]["image_folder"] = str(tmp_path / "imgs")
    _refused_up_front(raw, r"sample 's2' changed since it was cached: its image bytes differ.*\(1 more changed: 's6'\)")


def test_other_setting_or_teacher_is_refused_saying_what_differs(ws, full_fp32, tmp_path):
    raw = _raw(ws, tmp_path / "length", teacher={"cache": str(full_fp32)})
    raw["data"]["max_length"] = 512
    _refused_up_front(raw, r"another setting: max_length: cache 2048, here 512")
    raw = _raw(ws, tmp_path / "other", teacher={"cache": str(full_fp32), "path": str(ws / "teacher_other")})
    _refused_up_front(raw, r"another teacher than .*teacher_other \(its weights differ\)")
    raw = _raw(ws, tmp_path / "missing", teacher={"cache": str(tmp_path / "nowhere")})
    _refused_up_front(raw, r"teacher cache .*nowhere does not exist")
    # the teacher that wrote it is accepted, and is not loaded
    raw = _raw(ws, tmp_path / "ok", teacher={"cache": str(full_fp32), "path": str(ws / "teacher0")})
    messages = []
    run_recipe(recipe_from_dict(raw), log=messages.append)
    assert any("the top-k cache" in str(m) for m in messages)


def test_terms_a_cache_cannot_serve_are_refused_by_name(ws, full_fp32, tmp_path):
    with pytest.raises(ValueError, match=r"reverse_kl.*needs dense teacher logits"):
        _cache(ws, tmp_path / "c1", terms=[{"name": "reverse_kl"}], top_k=8)
    with pytest.raises(CacheError, match=r"term 'hidden_mse' reads the teacher's hidden states: cache them with "
                                         r"--hidden"):
        _cache(ws, tmp_path / "c2", terms=[{"name": "forward_kl"}, {"name": "hidden_mse"}], top_k=8)
    for term in ({"name": "visual_align", "options": {"source": "projector"}}, {"name": "affinity"},
                 {"name": "hidden_mse", "options": {"layers": [[1, 1]]}}):
        with pytest.raises(CacheError, match=rf"term '{term['name']}' reads teacher states a top-k cache cannot hold"):
            _cache(ws, tmp_path / "c3", terms=[term], hidden=True, top_k=8)
    # training: a cache of response positions cannot serve a term on all text tokens, nor hidden states, nor a
    # divergence without a top-k form
    for i, (terms, pattern) in enumerate((
            ([{"name": "forward_kl", "tokens": "text"}], r"term 'forward_kl' reads teacher prediction positions of "
                                                         r"the 'text' tokens"),
            ([{"name": "hidden_mse"}], r"term 'hidden_mse' reads teacher hidden states"),
            ([{"name": "tvd"}], r"term 'tvd' needs dense teacher logits"))):
        _refused_up_front(_raw(ws, tmp_path / f"run{i}", teacher={"cache": str(full_fp32)}, terms=terms), pattern)


def test_cached_hidden_states_serve_the_last_layer_alignment_terms(ws, tmp_path):
    terms = [{"name": "forward_kl"}, {"name": "hidden_mse"}, {"name": "visual_align", "weight": 0.5}]
    out = tmp_path / "c"
    _cache(ws, out, terms=terms, top_k=len(make_word_tokenizer()), values="fp32", hidden=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hidden_width"] == 64 and manifest["hidden_groups"] == ["response", "image"]
    online = _run(_raw(ws, tmp_path / "online", terms=terms))
    cached = _run(_raw(ws, tmp_path / "cached", teacher={"cache": str(out)}, terms=terms))
    assert _max_diff(online, cached) <= 1e-5
    ds, batch = _batch(ws)
    cached = CachedTeacher(open_cache(str(out)), sample_images(ds), [Tokens("response")])
    view = cached.view(batch, Needs(last_hidden=True))
    teacher = load_llava_dir(str(ws / "teacher0")).model.eval()
    with torch.no_grad():
        reference = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-1]
    rows = Tokens("response").mask(batch["token_types"])
    assert torch.allclose(view.last_hidden[rows], reference[rows], atol=1e-5)


# ---------------------------------------------------------------- crash safety


def _entries_equal(a_dir, b_dir):
    """Every sample's cached rows are the same in two caches."""
    a, b = open_cache(str(a_dir)), open_cache(str(b_dir))
    assert sorted(a.index) == sorted(b.index)
    for sid in a.index:
        ra, rb = a.rows(sid), b.rows(sid)
        assert torch.equal(ra.positions, rb.positions) and torch.equal(ra.topk_ids, rb.topk_ids), sid
        assert torch.allclose(ra.topk_logprobs, rb.topk_logprobs, atol=1e-6), sid
        assert a.index[sid]["digest"] == b.index[sid]["digest"]


def test_resume_ignores_torn_and_temporary_writes(ws, full_fp32, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(full_fp32, out)
    index = json.loads((out / "index.json").read_text())
    # a killed run's leftovers: index lost three entries, a torn journal line, a temporary and an orphan shard
    for sid in ("s1", "s4", "s6"):
        del index["samples"][sid]
    write_json(out / "index.json", index)
    manifest = json.loads((out / "manifest.json").read_text())
    write_json(out / "manifest.json", {**manifest, "complete": False})
    (out / "journal-rank00000.jsonl").write_text('{"s1": {"shard": "shard-999999-rank00000.saf')
    (out / "shards" / ".shard-000123-rank00000.safetensors.abc.tmp").write_bytes(b"partial")
    shutil.copy(next((out / "shards").glob("*.safetensors")), out / "shards" / "shard-000099-rank00000.safetensors")
    with pytest.raises(CacheError, match="did not finish"):
        open_cache(str(out))
    stats = _cache(ws, out, top_k=len(make_word_tokenizer()), values="fp32", shard_samples=3, batch_size=3)
    assert stats["computed"] == 3 and stats["kept"] == N_SAMPLES - 3
    _entries_equal(full_fp32, out)
    names = {p.name for p in (out / "shards").iterdir()}
    assert names == set(json.loads((out / "index.json").read_text())["shards"])  # no leftovers
    # a rerun with nothing to do keeps the cache's content identity (what training stages are fingerprinted with)
    identity = cache_identity(str(out))
    again = _cache(ws, out, top_k=len(make_word_tokenizer()), values="fp32", shard_samples=3, batch_size=3)
    assert again["computed"] == 0 and cache_identity(str(out)) == identity
    # a cache written another way is not resumed
    with pytest.raises(CacheError, match=r"holds a teacher cache written differently \(topk, values_dtype differ\)"):
        _cache(ws, out, top_k=8)


def _write_recipe(ws, path, **kw):
    raw = _raw(ws, path.parent / "run", **kw)
    path.write_text(yaml.safe_dump(raw))
    return path


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}


def test_sigkill_mid_run_then_resume_completes_with_every_entry_valid(ws, tmp_path):
    data = json.loads((ws / "data.json").read_text())
    many = [dict(data[i % N_SAMPLES], id=f"m{i}") for i in range(160)]
    write_json(ws / "many.json", many)
    recipe = _write_recipe(ws, tmp_path / "recipe.yaml", data="many.json")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "llavadi.cli", "cache-teacher", str(recipe), "--out", str(out), "--top-k", "8",
           "--shard-samples", "2", "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = out / "journal-rank00000.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.is_file() and journal.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # while it computes the next shards
    proc.wait()
    committed = journal.read_text().count("\n")
    assert 2 <= committed < 80 and not json.loads((out / "manifest.json").read_text())["complete"]
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    stats = json.loads(resumed.stdout[resumed.stdout.index("{"):])
    assert stats["entries"] == 160 and stats["kept"] >= 2 * committed and stats["computed"] == 160 - stats["kept"]
    clean = tmp_path / "clean"
    _cache(ws, clean, data="many.json", top_k=8, shard_samples=2, batch_size=1)
    _entries_equal(clean, out)


def test_torchrun_processes_each_cache_a_share_into_one_index(ws, tmp_path):
    recipe = _write_recipe(ws, tmp_path / "recipe.yaml", terms=[{"name": "forward_kl"}])
    single = tmp_path / "single"
    _cache(ws, single, top_k=8, values="fp32", shard_samples=2, batch_size=2)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llavadi.cli",
           "cache-teacher", str(recipe), "--out", str(out), "--top-k", "8", "--values", "fp32", "--shard-samples", "2",
           "--batch-size", "2", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 or only_teardown_abort(proc.returncode, log, out / "index.json"), log[-3000:]
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert {s.split("rank")[1] for s in shards} == {"00000.safetensors", "00001.safetensors"}  # both processes wrote
    _entries_equal(single, out)


def test_training_from_a_cache_with_two_processes_gives_the_online_weights(ws, full_fp32, online_step, tmp_path):
    raw = _raw(ws, tmp_path / "ddp", teacher={"cache": str(full_fp32)}, batch_size=4, ddp_backend="gloo")
    write_json(tmp_path / "recipe.json", raw)
    reports = tmp_path / "reports"
    reports.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO_ROOT, "tests", "dist_worker.py"), str(tmp_path / "recipe.json"), str(reports)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    written = [reports / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 or only_teardown_abort(proc.returncode, proc.stdout + proc.stderr, *written), \
        proc.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in written]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(ranks[0]["micro_batches"][0] + ranks[1]["micro_batches"][0]) == [f"s{i}" for i in range(N_SAMPLES)]
    assert _max_diff(online_step, _weights(tmp_path / "ddp")) <= 1e-5
