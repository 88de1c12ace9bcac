"""The embedded demo: synthetic data, tiny teacher, SFT student, distilled student, evaluation.

Everything runs on a laptop CPU in minutes and nothing is downloaded:
1. `make-data synthetic` writes images and LLaVA-format caption / instruction / eval sets;
2. one tiny CLIP vision tower is pretrained per patch and shared by teacher and students
   (as real LLaVADI teachers and students share a pretrained CLIP);
3. the tiny teacher is trained with `llavadi train` (projector pretraining, then instruction
   tuning); it is cached, so a second demo run starts from step 4;
4. the students get the answers of only a share of the instruction questions (default 5 %;
   the teacher saw all): for each seed, the tiny student goes through the same caption stage
   and is then instruction-tuned twice from the same weights with `recipes/demo_student.yaml`
   (STUDENT_FINETUNE_STEPS steps): with its terms removed, cross-entropy only on the labelled
   share (SFT); and as written, the paper's distillation recipe (CE + forward KL on response
   logits + last-hidden-state MSE through a Linear-GELU-Linear projector) plus visual-token
   alignment (the image tokens' last hidden states, through a Linear-GELU-Linear projector), on
   the labelled share plus the other questions answered by the teacher (`llavadi regenerate`,
   cached). The two runs go in parallel, one thread each;
5. every model answers the held-out questions through the evaluation harness; the table, the
   verdict (share of the SFT-to-teacher gap closed per seed, paired gain against 2 std) and
   the cost line are printed, and everything is written to `<out>/results<tag>.json`.

The teacher's stages and the student's caption stage are the presets' (llavadi.models.presets).
`--student-fraction 1` gives the students every answer (the teacher's data);
`--no-teacher-answers` trains the distilled student on the labelled share only.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

from llavadi.atomic import write_text_atomic
from llavadi.experiments.stats import mean_std, paired_t
from llavadi.models.build import LoadedModel, save_model
from llavadi.models.presets import PRESETS, VISION_PRETRAIN, build_image_processor, build_preset

DATA_VERSION = 1  # bump when the synthetic task changes, so cached demo data is rebuilt
# the student's instruction-tuning stage (with the demo's distillation terms) and the demo's
# prompt settings: the same recipe `llavadi train` and `llavadi ablate` use
STUDENT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo_student.yaml"
TIMING_FILE = "demo_timing.json"  # a student run's seconds per instruction-tuning step, as its Trainer logged it
SMOKE = {"data": {"n_caption": 64, "n_instruct": 96, "n_eval": 24}, "steps": 3, "vision_steps": 3}
# the students get the answers of this share of the instruction set; the rest are questions only
DEFAULT_STUDENT_FRACTION = 0.05
# the students' instruction-tuning steps: recipes/demo_student.yaml's (1200 measured no better, README)
STUDENT_FINETUNE_STEPS = 600
TEACHER_ANSWERS_TAG = "-ta"  # runs of a distilled student that also learns the teacher's answers to the rest
REGENERATE = {"batch_size": 64, "max_new_tokens": 16}  # the demo's answers are a few tokens long


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _student_recipe() -> dict:
    """recipes/demo_student.yaml as a raw dict (paths in it are the demo's defaults, replaced here)."""
    if not STUDENT_RECIPE.is_file():
        raise FileNotFoundError(f"{STUDENT_RECIPE}: the demo's student recipe is missing; the demo runs from a "
                                "checkout of the repository (pip install -e .)")
    with open(STUDENT_RECIPE) as f:
        return yaml.safe_load(f)


def _named_stage(recipe: dict, name: str) -> dict:
    (stage,) = [s for s in recipe["stages"] if s["name"] == name]
    return stage


def _smoke(stage: dict) -> dict:
    """The stage cut to a few steps, logging each one (a plumbing check, not a measurement)."""
    train = stage["train"]
    train["max_steps"] = min(train.get("max_steps", SMOKE["steps"]), SMOKE["steps"])
    train["logging_steps"] = 1
    return stage


def _preset_stage(preset: str, name: str, data_path: str, smoke: bool) -> dict:
    """A preset's recipe stage, named and pointed at its data."""
    stage = {"name": name, **PRESETS[preset].stage(name)}
    stage["data"] = {**stage.get("data", {}), "path": data_path}
    return _smoke(stage) if smoke else stage


def _data_defaults(image_dir: str) -> dict:
    """The recipe-level data settings of every demo run: the student recipe's, with the demo's images."""
    return {**_student_recipe()["data"], "image_folder": image_dir}


def _write_recipe(path, recipe) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return path


def _run_trainings(jobs: list[tuple[str, str]], threads_each: int) -> dict[str, float]:
    """Run `llavadi train RECIPE` jobs in parallel subprocesses, relaying their log lines with a prefix.

    Returns each job's seconds per step in its last trained stage (from the Trainer's closing log line)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_each), MKL_NUM_THREADS=str(threads_each),
               TOKENIZERS_PARALLELISM="false", LLAVADI_THREADS=str(threads_each))
    procs = []
    for name, recipe in jobs:
        cmd = [sys.executable, "-m", "llavadi.cli", "train", recipe, "--quiet"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        procs.append((name, p))

    step_seconds: dict[str, float] = {}

    def relay(name, p, tail):
        for line in p.stdout:
            line = line.rstrip()
            tail.append(line)
            del tail[:-30]
            if line.startswith("{'train_runtime'"):  # the Trainer's summary of a stage
                step_seconds[name] = 1.0 / float(ast.literal_eval(line)["train_steps_per_second"])
            if line.startswith("{") or line.startswith("[") or "error" in line.lower():
                print(f"  {name}: {line}", flush=True)

    tails = {name: [] for name, _ in procs}
    threads = [threading.Thread(target=relay, args=(n, p, tails[n]), daemon=True) for n, p in procs]
    for t in threads:
        t.start()
    failed = []
    for (name, p), t in zip(procs, threads):
        p.wait()
        t.join()
        if p.returncode != 0:
            failed.append(name)
    if failed:
        details = "\n".join(f"--- {n} (last lines)\n" + "\n".join(tails[n]) for n in failed)
        raise RuntimeError(f"training failed for {failed}:\n{details}")
    return step_seconds


def _vision_tower(out: str, data_root: str, fresh: bool, steps: int | None = None) -> dict:
    path = os.path.join(out, "cache", "vision_tower.safetensors")
    from safetensors.torch import load_file, save_file

    if os.path.isfile(path) and not fresh:
        _say(f"vision tower: cached {path}")
        return load_file(path)
    from llavadi.train.vision_pretrain import pretrain_vision_tower

    model, _, processor = build_preset("tiny-student", seed=0)
    tower = model.model.vision_tower
    t0 = time.time()
    options = dict(VISION_PRETRAIN)
    if steps:
        options["steps"] = steps
    state, acc = pretrain_vision_tower(tower, data_root, processor, feature_layer=model.config.vision_feature_layer,
                                       seed=0, **options)
    _say(f"vision tower pretrained per patch in {time.time() - t0:.0f}s: held-out patch accuracy {acc:.3f}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)
    return state


def _init_model(preset: str, vision_state: dict, seed: int, path: str) -> str:
    model, tok, _ = build_preset(preset, vision_tower_state=vision_state, seed=seed)
    save_model(LoadedModel(model, tok, build_image_processor(PRESETS[preset].vision), {}), path)
    return path


def _split_labels(instruct: str, fraction: float, out: str, tag: str) -> tuple[str, str]:
    """The first `fraction` of the instruction set (labelled) and the rest (whose answers the students never see).

    The same split for every seed: the data is the constant of a comparison.
    """
    with open(instruct) as f:
        data = json.load(f)
    n = max(1, int(len(data) * fraction))
    labelled = os.path.join(out, f"student_instruct{tag}.json")
    unlabelled = os.path.join(out, f"unlabelled_instruct{tag}.json")
    write_text_atomic(labelled, json.dumps(data[:n]))
    write_text_atomic(unlabelled, json.dumps(data[n:]))
    return labelled, unlabelled


def _evaluate(name: str, model_dir: str, eval_file: str, image_dir: str, out: str, teacher_dir: str | None,
              max_new_tokens: int = 8):
    from llavadi.eval.eval_command import evaluate

    res = evaluate(model_dir, "synthetic", eval_file, image_dir, os.path.join(out, "eval", name),
                   teacher_dir=teacher_dir, batch_size=64, max_new_tokens=max_new_tokens, device="cpu", name=name,
                   progress=False)
    return res


def _synthetic_data(out: str, fresh: bool, smoke: bool) -> tuple[dict, bool]:
    """The task's files (written unless cached) and whether everything must be rebuilt."""
    from llavadi.data.synthetic import make_synthetic, synthetic_paths

    stamp = os.path.join(out, "DEMO_DATA_VERSION")
    if os.path.isfile(stamp) and open(stamp).read().strip() != str(DATA_VERSION) and not fresh:
        # cached models were trained on another version of the task: nothing of them can be reused
        _say(f"{out} holds a demo of data version {open(stamp).read().strip()}; starting afresh (version {DATA_VERSION})")
        fresh = True
    with open(stamp, "w") as f:
        f.write(str(DATA_VERSION))
    data_root = os.path.join(out, f"data-v{DATA_VERSION}")
    if fresh or not os.path.isfile(os.path.join(data_root, "meta.json")):
        t0 = time.time()
        make_synthetic(data_root, seed=0, overwrite=True, **(SMOKE["data"] if smoke else {}))
        _say(f"synthetic data written to {data_root} in {time.time() - t0:.0f}s")
    else:
        _say(f"synthetic data: cached {data_root}")
    return {k: str(v) for k, v in synthetic_paths(data_root).items()}, fresh


def _teacher_recipe(out: str, init: str, paths: dict, smoke: bool) -> dict:
    """The tiny teacher's recipe: the preset's caption stage, then its instruction tuning."""
    stages = [_preset_stage("tiny-teacher", "pretrain", paths["captions"], smoke),
              _preset_stage("tiny-teacher", "finetune", paths["instruct"], smoke)]
    return {"student": {"path": init}, "output_dir": os.path.join(out, "teacher"), "seed": 0, "device": "cpu",
            "data": _data_defaults(paths["image_dir"]), "stages": stages}


def _train_teacher(out: str, paths: dict, vision_state: dict, fresh: bool, smoke: bool) -> str:
    """The trained teacher's directory (trained once, cached in <out>/teacher/final)."""
    teacher_dir = os.path.join(out, "teacher", "final")
    if not fresh and os.path.isfile(os.path.join(teacher_dir, "config.json")):
        _say(f"teacher: cached {teacher_dir}")
        return teacher_dir
    init = _init_model("tiny-teacher", vision_state, 0, os.path.join(out, "init", "teacher"))
    recipe = _write_recipe(os.path.join(out, "recipes", "teacher.yaml"), _teacher_recipe(out, init, paths, smoke))
    _say(f"training the teacher ({recipe})")
    t0 = time.time()
    _run_trainings([("teacher", recipe)], threads_each=_threads())
    _say(f"teacher trained in {time.time() - t0:.0f}s")
    return teacher_dir


def _student_run_recipe(run_dir: str, init: str, paths: dict, student_data: str, seed: int,
                        teacher_dir: str | None, smoke: bool, teacher_cache: str | None = None,
                        steps: int = STUDENT_FINETUNE_STEPS) -> dict:
    """One student run: the preset's caption stage, then recipes/demo_student.yaml's instruction tuning.

    With no `teacher_dir` the finetune stage has no distillation term (cross-entropy only, SFT).
    With `teacher_cache` the distillation terms read the teacher's top-k cache instead of running it.
    The caption stage is the same for every student: no distillation there.
    """
    recipe = _student_recipe()
    finetune = _named_stage(recipe, "finetune")
    finetune["data"] = {**(finetune.get("data") or {}), "path": student_data}
    if teacher_dir is None:
        finetune["distill"] = {**(finetune.get("distill") or {}), "terms": []}
        recipe.pop("teacher", None)
    else:
        recipe["teacher"] = {"path": teacher_dir, **({"cache": teacher_cache} if teacher_cache else {})}
    finetune["train"]["max_steps"] = steps
    if smoke:
        _smoke(finetune)
    recipe.update(output_dir=run_dir, seed=seed, device="cpu", student={"path": init},
                  data=_data_defaults(paths["image_dir"]))
    recipe["stages"] = [_preset_stage("tiny-student", "pretrain", paths["captions"], smoke)] + recipe["stages"]
    return recipe


def _teacher_cache(out: str, paths: dict, teacher_dir: str, student_data: str, tag: str, fresh: bool,
                   smoke: bool) -> str:
    """The teacher's top-64 cache (and last hidden states, for hidden_mse and visual_align) over the students'
    instruction data."""
    from llavadi.recipe import recipe_from_dict
    from llavadi.teacher.cache_teacher import cache_teacher

    cache_dir = os.path.join(out, "cache", f"teacher-top64{tag}")
    manifest = os.path.join(cache_dir, "manifest.json")
    if not fresh and os.path.isfile(manifest) and json.load(open(manifest)).get("complete"):
        _say(f"teacher cache: cached {cache_dir}")
        return cache_dir
    # the distilled students' recipe: its finetune stage (data, template, terms) is what is cached; its
    # student is never loaded by cache-teacher (the teacher's directory stands in for it)
    recipe = _student_run_recipe(os.path.join(out, "unused"), teacher_dir, paths, student_data, 0, teacher_dir, smoke)
    if fresh and os.path.isdir(cache_dir):
        import shutil

        shutil.rmtree(cache_dir)
    t0 = time.time()
    stats = cache_teacher(recipe_from_dict(recipe), cache_dir, stage_name="finetune", top_k=64, hidden=True,
                          progress=False)
    _say(f"teacher cache written in {time.time() - t0:.0f}s: {stats['entries']} samples, {stats['positions']} "
         f"positions, {stats['bytes'] / 2**20:.1f} MiB ({cache_dir})")
    return cache_dir


def _train_students(out: str, paths: dict, vision_state: dict, teacher_dir: str, seeds: int, fresh: bool,
                    data: dict[str, tuple[str, str]], smoke: bool, steps: int,
                    teacher_cache: str | None = None) -> dict[str, list[str]]:
    """Per kind (student_sft, student_distilled[, student_distilled_cache]), each seed's final directory.

    `data`: per kind to train, in training order (two at a time), (its instruction file, the tag
    its runs are cached under). `student_distilled_cache` reads the teacher's top-k cache.
    """
    runs: dict[str, list[str]] = {kind: [] for kind in data}
    for seed in range(seeds):
        init = _init_model("tiny-student", vision_state, 1000 + seed, os.path.join(out, "init", f"student-s{seed}"))
        jobs = []
        for kind, (student_data, tag) in data.items():
            name = f"{kind}{tag}-s{seed}"
            run_dir = os.path.join(out, name)
            if not fresh and os.path.isfile(os.path.join(run_dir, "final", "config.json")):
                _say(f"{kind} seed {seed}: cached")
            else:
                recipe = _student_run_recipe(run_dir, init, paths, student_data, seed,
                                             teacher_dir if kind != "student_sft" else None, smoke,
                                             teacher_cache if kind == "student_distilled_cache" else None, steps)
                jobs.append((name, _write_recipe(os.path.join(out, "recipes", f"{name}.yaml"), recipe)))
            runs[kind].append(os.path.join(run_dir, "final"))
        for wave in (jobs[i:i + 2] for i in range(0, len(jobs), 2)):
            _say(f"training students for seed {seed}: {', '.join(n for n, _ in wave)} (in parallel)")
            t0 = time.time()
            for name, seconds in _run_trainings(wave, threads_each=1 if len(jobs) > 1 else _threads()).items():
                with open(os.path.join(out, name, TIMING_FILE), "w") as f:
                    json.dump({"finetune_seconds_per_step": seconds}, f)
            _say(f"students trained in {time.time() - t0:.0f}s")
    return runs


def _step_seconds(final_dir: str) -> float | None:
    """Seconds per instruction-tuning step of a student run (None when it was not timed)."""
    path = os.path.join(os.path.dirname(final_dir), TIMING_FILE)
    return json.load(open(path))["finetune_seconds_per_step"] if os.path.isfile(path) else None


def _evaluate_all(out: str, paths: dict, teacher_dir: str, runs: dict[str, list[str]],
                  data: dict[str, tuple[str, str]]) -> dict:
    _say("evaluating on the held-out questions")
    results: dict = {"teacher": _evaluate("teacher", teacher_dir, paths["eval"], paths["image_dir"], out, None)}
    for kind, dirs in runs.items():
        for seed, d in enumerate(dirs):
            results[f"{kind}-s{seed}"] = _evaluate(f"{kind}{data[kind][1]}-s{seed}", d, paths["eval"],
                                                   paths["image_dir"], out, teacher_dir)
    return results


def _threads() -> int:
    """Torch threads for the demo's own work: LLAVADI_THREADS or else OMP_NUM_THREADS when set, else up to 2."""
    return int(os.environ.get("LLAVADI_THREADS") or os.environ.get("OMP_NUM_THREADS") or
               max(1, min(2, os.cpu_count() or 1)))


def _teacher_answered(out: str, teacher_dir: str, paths: dict, labelled: str, unlabelled: str, tag: str,
                      fresh: bool) -> str:
    """The labelled subset plus the unlabelled questions answered by the teacher (`llavadi regenerate`), cached."""
    from llavadi.teacher.regenerate import regenerate

    combined = os.path.join(out, f"distilled_instruct{tag}.json")
    with open(unlabelled) as f:
        if not json.load(f):  # every question has its answer: nothing for the teacher to answer
            return labelled
    if not fresh and os.path.isfile(combined):
        _say(f"teacher-answered questions: cached {combined}")
        return combined
    answered = os.path.join(out, f"teacher_answers{tag}.json")
    t0 = time.time()
    stats = regenerate(teacher_dir, unlabelled, paths["image_dir"], answered, device="cpu", keep_original=False,
                       progress=False, **REGENERATE)
    with open(labelled) as f, open(answered) as g:
        records, answers = json.load(f), json.load(g)
    # an empty answer teaches nothing (and training refuses empty turns): such samples stay out, counted
    kept = [r for r in answers if all(t["value"].strip() for t in r["conversations"] if t["from"] == "gpt")]
    _say(f"the teacher answered {stats['samples_out']} unlabelled samples in {time.time() - t0:.0f}s "
         f"({stats['n_cut_at_max_new_tokens']} answers cut at max_new_tokens; {len(answers) - len(kept)} samples "
         f"left out for an empty answer, listed in {stats['report']})")
    write_text_atomic(combined, json.dumps(records + kept))
    return combined


def _student_data(out: str, paths: dict, teacher_dir: str, fraction: float, distill: bool, teacher_answers: bool,
                  fresh: bool) -> dict[str, tuple[str, str]]:
    """Per student kind, (its instruction file, the tag its runs are cached under)."""
    if fraction >= 1.0:
        data = {"student_sft": (paths["instruct"], "")}
        return {**data, "student_distilled": (paths["instruct"], "")} if distill else data
    tag = f"-f{fraction:g}"  # runs on a label subset are cached apart
    labelled, unlabelled = _split_labels(paths["instruct"], fraction, out, tag)
    data = {"student_sft": (labelled, tag)}
    if distill and teacher_answers:
        data["student_distilled"] = (_teacher_answered(out, teacher_dir, paths, labelled, unlabelled, tag, fresh),
                                     tag + TEACHER_ANSWERS_TAG)
    elif distill:
        data["student_distilled"] = (labelled, tag)
    return data


def _teacher_ready(out: str, fresh: bool, smoke: bool) -> tuple[str, dict, bool, dict, str]:
    """The demo's shared start: threads set, the synthetic data, the pretrained vision tower and the teacher.

    Returns (absolute output folder, data paths, whether the data was made anew, tower state, teacher folder)."""
    torch.set_num_threads(_threads())
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    paths, fresh = _synthetic_data(out, fresh, smoke)
    vision_state = _vision_tower(out, paths["root"], fresh, steps=SMOKE["vision_steps"] if smoke else None)
    return out, paths, fresh, vision_state, _train_teacher(out, paths, vision_state, fresh, smoke)


def run_demo(out: str = "runs/demo", seeds: int = 1, fresh: bool = False, distill: bool = True,
             student_fraction: float | None = None, smoke: bool = False, teacher_answers: bool = True,
             teacher_cache: bool = False, student_steps: int | None = None) -> dict:
    """Run the whole demo; returns (and writes) the results. `smoke`: a seconds-long plumbing check.

    `student_fraction` (default DEFAULT_STUDENT_FRACTION): the share of the instruction set whose
    answers the students get; with `teacher_answers` the distilled student also gets the other
    questions answered by the teacher. `teacher_cache`: also train each seed's distilled student
    from the teacher's offline top-k cache (of the distilled student's data). `student_steps`: the
    students' instruction-tuning steps (default STUDENT_FINETUNE_STEPS).
    """
    t_start = time.time()
    fraction = DEFAULT_STUDENT_FRACTION if student_fraction is None else student_fraction
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"student fraction must be in (0, 1], got {fraction}")
    student_steps = STUDENT_FINETUNE_STEPS if student_steps is None else student_steps
    if student_steps < 1:
        raise ValueError(f"student steps must be >= 1, got {student_steps}")
    out, paths, fresh, vision_state, teacher_dir = _teacher_ready(out, fresh, smoke)
    data = _student_data(out, paths, teacher_dir, fraction, distill, teacher_answers, fresh)
    if student_steps != STUDENT_FINETUNE_STEPS:  # students of another length are cached apart
        data = {kind: (path, f"{tag}-n{student_steps}") for kind, (path, tag) in data.items()}
    cache = None
    if teacher_cache and distill:  # online and cached distillation side by side: their step times compare fairly
        cache = _teacher_cache(out, paths, teacher_dir, *data["student_distilled"], fresh, smoke)
        data = {"student_distilled": data["student_distilled"], "student_distilled_cache": data["student_distilled"],
                "student_sft": data["student_sft"]}
    runs = _train_students(out, paths, vision_state, teacher_dir, seeds, fresh, data, smoke, student_steps, cache)

    results = _evaluate_all(out, paths, teacher_dir, runs, data)
    summary = summarise(results, runs)
    for kind, dirs in runs.items():
        steps = [t for t in (_step_seconds(d) for d in dirs) if t is not None]
        if steps:
            summary[kind]["seconds_per_step"] = mean_std(steps)
    summary["verdict"] = verdict(results, seeds) if distill else None
    summary["cost"] = cost_line(results, runs)
    example = _student_run_recipe("", "", paths, data["student_sft"][0], 0, teacher_dir, smoke, student_steps)
    summary["settings"] = {"seeds": seeds, "student_data_fraction": fraction,
                           "student_finetune_steps": student_steps,
                           "teacher_answers_unlabelled": bool(distill and teacher_answers and fraction < 1.0),
                           "data": {kind: path for kind, (path, _) in data.items()},
                           "distill_terms": _named_stage(example, "finetune")["distill"]["terms"],
                           "teacher_stages": _teacher_recipe(out, "", paths, smoke)["stages"],
                           "student_stages": example["stages"], "wall_seconds": round(time.time() - t_start, 1)}
    tag = data.get("student_distilled", data["student_sft"])[1]
    result_file = os.path.join(out, f"results{tag}.json")
    write_text_atomic(result_file, json.dumps({"summary": summary, "runs": results}, indent=2, default=str))
    print(format_table(summary))
    for line in verdict_lines(summary.get("verdict")) + ([summary["cost"]["sentence"]] if summary["cost"] else []):
        print(line)
    _say(f"done in {time.time() - t_start:.0f}s; results in {result_file}")
    return summary


def _metrics(result: dict) -> dict:
    return result.get("metrics", result)


def summarise(results: dict, runs: dict) -> dict:
    """Mean and sample std over seeds of every metric, per model kind."""
    rows = {"teacher": {k: [v] for k, v in _flat(_metrics(results["teacher"])).items()}}
    for kind, dirs in runs.items():
        if not dirs:
            continue
        per_seed = [_flat(_metrics(results[f"{kind}-s{s}"])) for s in range(len(dirs))]
        rows[kind] = {k: [m[k] for m in per_seed if k in m] for k in per_seed[0]}
    out = {}
    for kind, metrics in rows.items():
        out[kind] = {k: mean_std(v) for k, v in metrics.items() if v and all(isinstance(x, (int, float)) for x in v)}
    return out


def _flat(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = float(v)
    return flat


def format_table(summary: dict) -> str:
    """Markdown table: one row per model kind, accuracy overall and per question type."""
    kinds = [k for k in ("teacher", "student_sft", "student_distilled", "student_distilled_cache") if k in summary]
    present = {k for kind in kinds for k in summary[kind]}
    cols = ["accuracy"] + sorted(k for k in present if k.startswith("category/"))
    cols += [k for k in ("agreement", "teacher_student_kl", "seconds_per_step") if k in present]
    header = "| model | " + " | ".join(c.replace("category/", "") for c in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    for kind in kinds:
        cells = []
        for c in cols:
            m = summary[kind].get(c)
            if m is None:
                cells.append("")
            else:
                digits = 3 if c in ("teacher_student_kl", "seconds_per_step") else 1
                cells.append(f"{m['mean']:.{digits}f}" + (f" ± {m['std']:.{digits}f}" if m["n"] > 1 else ""))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: dict, seeds: int) -> dict | None:
    """Whether distillation clearly pays: per seed, the share of the SFT-to-teacher gap it closes; paired test.

    The demo's bar: the distilled student closes at least half the gap on every seed, and its
    gain over SFT exceeds twice the sample std of the per-seed gains.
    """
    teacher = _metrics(results["teacher"])["accuracy"]
    sft = [_metrics(results[f"student_sft-s{s}"])["accuracy"] for s in range(seeds)]
    distilled = [_metrics(results[f"student_distilled-s{s}"])["accuracy"] for s in range(seeds)]
    closed = [(d - b) / (teacher - b) if teacher != b else None for d, b in zip(distilled, sft)]
    test = paired_t(distilled, sft)
    half_everywhere = all(c is not None and c >= 0.5 for c in closed)
    beyond_noise = seeds > 1 and test["mean"] > 2 * test["std"]
    return {"teacher": teacher, "sft": sft, "distilled": distilled, "gap_closed": closed, "gain": test,
            "half_gap_every_seed": half_everywhere, "gain_over_2_std": beyond_noise,
            "clearly_pays": half_everywhere and beyond_noise}


def verdict_lines(v: dict | None) -> list[str]:
    """The verdict in words (empty without a distilled student)."""
    if not v:
        return []
    closed = ", ".join("–" if c is None else f"{100 * c:.0f}%" for c in v["gap_closed"])
    g = v["gain"]
    lines = [f"distilled − SFT accuracy: {g['mean']:+.1f}" + (f" ± {g['std']:.1f} (sample std over {g['n']} seeds, "
                                                              f"paired t p = {g['p']:.3f})" if g["p"] is not None else ""),
             f"share of the SFT-to-teacher gap closed, per seed: {closed}"]
    if g["n"] > 1:
        lines.append("distillation clearly pays (half the gap on every seed, gain > 2 std)" if v["clearly_pays"] else
                     f"bar not met: half the gap on every seed {v['half_gap_every_seed']}, "
                     f"gain > 2 std {v['gain_over_2_std']}")
    return lines


def cost_line(results: dict, runs: dict) -> dict | None:
    """Accuracy kept and speed / memory against the teacher (measured in each student's eval run), best student."""
    from llavadi.experiments.study_report import cost_summary

    points = []
    for kind, dirs in runs.items():
        for seed in range(len(dirs)):
            r = results[f"{kind}-s{seed}"]
            if "cost" in r and "teacher_cost" in r:
                points.append({"study": "demo", "variant": kind, "seed": seed, "baseline": kind == "student_sft",
                               "metric": "accuracy", "accuracy": r["metrics"]["accuracy"],
                               "teacher_accuracy": r["metrics"].get("teacher/accuracy"),
                               "cost": r["cost"], "teacher_cost": r["teacher_cost"]})
    best = "student_distilled" if runs.get("student_distilled") else "student_sft"
    return cost_summary(points, {"study": "demo", "variant": best, "metric": "accuracy"})


# ---------------------------------------------------------------- a student with its own tokenizer
# the cross-tokenizer students' logit terms, each replacing forward_kl in recipes/demo_student.yaml
CROSS_TOKENIZER_TERMS = {"uld": {"name": "uld", "weight": 1.0, "tokens": "response"},
                         "gold": {"name": "gold", "weight": 1.0, "tokens": "response"}}
CROSS_MAX_NEW_TOKENS = 16  # its tokenizer spells the longest answers in up to 12 tokens


def _cross_recipe(run_dir: str, init: str, paths: dict, data_file: str, seed: int, teacher_dir: str,
                  term: str | None, steps: int, smoke: bool) -> dict:
    """A cross-tokenizer student's run: the demo's stages; CE only, or forward_kl replaced by `term`."""
    recipe = _student_run_recipe(run_dir, init, paths, data_file, seed, teacher_dir if term else None, smoke,
                                 steps=steps)
    if term:
        finetune = _named_stage(recipe, "finetune")
        finetune["distill"]["terms"] = [CROSS_TOKENIZER_TERMS[term] if t["name"] == "forward_kl" else t
                                        for t in finetune["distill"]["terms"]]
    return recipe


def _init_cross_student(vision_state: dict, seed: int, path: str) -> str:
    from llavadi.models.tokenizer import build_tiny_bpe_tokenizer

    model, tok, _ = build_preset("tiny-student", tokenizer=build_tiny_bpe_tokenizer(), vision_tower_state=vision_state,
                                 seed=seed)
    save_model(LoadedModel(model, tok, build_image_processor(PRESETS["tiny-student"].vision), {}), path)
    return path


def _pretrained(out: str, name: str, init: str, paths: dict, seed: int, smoke: bool) -> tuple[str, tuple | None]:
    """The caption-pretrained student of a seed (trained once, shared by every variant); a job when not cached."""
    run_dir = os.path.join(out, name)
    final = os.path.join(run_dir, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final, None
    recipe = {"student": {"path": init}, "output_dir": run_dir, "seed": seed, "device": "cpu",
              "data": _data_defaults(paths["image_dir"]),
              "stages": [_preset_stage("tiny-student", "pretrain", paths["captions"], smoke)]}
    return final, (name, _write_recipe(os.path.join(out, "recipes", f"{name}.yaml"), recipe))


def _variant_recipe(run_dir: str, pretrained: str, paths: dict, data_file: str, seed: int, teacher_dir: str,
                    term: str | None, steps: int, smoke: bool) -> dict:
    """One instruction-tuning run from a caption-pretrained student: CE only (term None), forward_kl (the demo's
    recipe as written) or the recipe with forward_kl replaced by uld / gold."""
    recipe = _cross_recipe(run_dir, pretrained, paths, data_file, seed, teacher_dir, None if term == "forward_kl"
                           else term, steps, smoke)
    if term == "forward_kl":
        recipe = _student_run_recipe(run_dir, pretrained, paths, data_file, seed, teacher_dir, smoke, steps=steps)
    recipe["stages"] = [stage for stage in recipe["stages"] if stage["name"] == "finetune"]
    return recipe


# per variant: (caption-pretrained student of the seed, logit term or None for CE only)
CROSS_VARIANTS = {"bpe_ce": ("bpe", None), "bpe_uld": ("bpe", "uld"), "bpe_gold": ("bpe", "gold"),
                  "word_ce": ("word", None), "word_fkl": ("word", "forward_kl")}


def run_cross_tokenizer_study(out: str = "runs/demo", seeds: int = 3, smoke: bool = False,
                              student_steps: int | None = None) -> dict:
    """The tiny student with its own byte-level BPE tokenizer, distilled from the demo's teacher with uld and gold.

    Each seed caption-pretrains two students once (the demo's tiny student with its word-level
    tokenizer, the teacher's; and with its own BPE tokenizer), then instruction-tunes each on the
    same data (the labelled share plus the teacher's answers to the rest, as the demo's distilled
    student): the BPE student with CE only, and with the demo's distillation recipe where forward_kl
    is replaced by uld / gold (hidden_mse on paired answer spans and visual_align kept); the
    word-level student with CE only and with the recipe as written (forward_kl): the same-tokenizer
    comparison at the same budget.
    """
    t_start = time.time()
    steps = student_steps or STUDENT_FINETUNE_STEPS
    out, paths, fresh, vision_state, teacher_dir = _teacher_ready(out, False, smoke)
    data = _student_data(out, paths, teacher_dir, DEFAULT_STUDENT_FRACTION, True, True, fresh)
    data_file, tag = data["student_distilled"]
    tag += "" if steps == STUDENT_FINETUNE_STEPS else f"-n{steps}"
    runs: dict[str, list[str]] = {k: [] for k in CROSS_VARIANTS}
    for seed in range(seeds):
        inits = {"bpe": _init_cross_student(vision_state, 1000 + seed, os.path.join(out, "init", f"student-bpe-s{seed}")),
                 "word": _init_model("tiny-student", vision_state, 1000 + seed,
                                     os.path.join(out, "init", f"student-s{seed}"))}
        pretrained, jobs = {}, []
        for kind, init in inits.items():
            pretrained[kind], job = _pretrained(out, f"{kind}_pretrain-s{seed}", init, paths, seed, smoke)
            jobs += [job] if job else []
        if jobs:
            _say(f"caption-pretraining the students of seed {seed}")
            _run_trainings(jobs, threads_each=1 if len(jobs) > 1 else _threads())
        jobs = []
        for kind, (student, term) in CROSS_VARIANTS.items():
            name = f"{kind}{tag}-s{seed}"
            run_dir = os.path.join(out, name)
            runs[kind].append(os.path.join(run_dir, "final"))
            if os.path.isfile(os.path.join(run_dir, "final", "config.json")):
                _say(f"{name}: cached")
                continue
            recipe = _variant_recipe(run_dir, pretrained[student], paths, data_file, seed, teacher_dir, term, steps,
                                     smoke)
            jobs.append((name, _write_recipe(os.path.join(out, "recipes", f"{name}.yaml"), recipe)))
        if jobs:
            _say(f"instruction-tuning seed {seed}: {', '.join(n for n, _ in jobs)} (in parallel, one thread each)")
            _run_trainings(jobs, threads_each=1)
    # the teacher evaluated under its own name here: `llavadi demo` may be evaluating it in the same --out
    results = {"teacher": _evaluate("teacher-cross", teacher_dir, paths["eval"], paths["image_dir"], out, None)}
    for kind, dirs in runs.items():
        for seed, d in enumerate(dirs):
            results[f"{kind}-s{seed}"] = _evaluate(f"{kind}{tag}-s{seed}", d, paths["eval"], paths["image_dir"], out,
                                                   None, max_new_tokens=CROSS_MAX_NEW_TOKENS)
    summary = summarise(results, runs)
    summary["gap_closed"] = cross_gap_closed(results, seeds)
    summary["settings"] = {"seeds": seeds, "student_finetune_steps": steps, "data": data_file,
                           "wall_seconds": round(time.time() - t_start, 1)}
    result_file = os.path.join(out, f"results-cross-tokenizer{tag}.json")
    write_text_atomic(result_file, json.dumps({"summary": summary, "runs": results}, indent=2, default=str))
    print(cross_table(summary))
    _say(f"done in {time.time() - t_start:.0f}s; results in {result_file}")
    return summary


def cross_gap_closed(results: dict, seeds: int) -> dict:
    """Per seed, the share of the CE-to-teacher gap each distilled student closes (against CE of its tokenizer)."""
    teacher = _metrics(results["teacher"])["accuracy"]
    out_rows = {}
    for kind, base_kind in (("bpe_uld", "bpe_ce"), ("bpe_gold", "bpe_ce"), ("word_fkl", "word_ce")):
        shares = []
        for s in range(seeds):
            base = _metrics(results[f"{base_kind}-s{s}"])["accuracy"]
            got = _metrics(results[f"{kind}-s{s}"])["accuracy"]
            shares.append((got - base) / (teacher - base) if teacher != base else None)
        out_rows[kind] = shares
    return out_rows


def cross_table(summary: dict) -> str:
    """Accuracy per model kind (mean ± std over seeds) and the share of the gap closed per seed."""
    lines = ["| model | tokenizer | accuracy | gap to the teacher closed vs CE of the same student, per seed |",
             "|---|---|---|---|"]
    for kind in ("teacher", "word_ce", "word_fkl", "bpe_ce", "bpe_uld", "bpe_gold"):
        m = summary.get(kind, {}).get("accuracy")
        if m is None:
            continue
        acc = f"{m['mean']:.1f}" + (f" ± {m['std']:.1f}" if m["n"] > 1 else "")
        shares = summary["gap_closed"].get(kind)
        closed = ", ".join("–" if c is None else f"{100 * c:.0f}%" for c in shares) if shares else ""
        tok = "teacher's (word-level)" if kind.startswith(("teacher", "word")) else "own (byte-level BPE)"
        lines.append(f"| {kind} | {tok} | {acc} | {closed} |")
    return "\n".join(lines)
