"""The same on-policy VLM distillation job run by TRL's DistillationTrainer and by `llavadi train`, side by side.

One LLaVA pair made here with random weights and saved as HF folders (llavadi's `save_model`: weights,
tokenizer, processor with the chat template that renders llavadi's prompt): teacher LLaMA 1024 x 4 layers,
student 512 x 2, vocabulary 32000, one CLIP-shaped tower (336 px, 14 px patches: 576 image tokens; width 256,
2 layers so a step takes seconds here), the same tower weights in both. 64 LLaVA-format samples (synthetic
336 px images of shapes, a question, an answer). Both trainers: forward KL (TRL beta = 0, temperature 1;
llavadi `forward_kl`, temperature 1), every sample answered by the student (TRL is on-policy only; llavadi
`on_policy: {fraction: 1}`), the same batch, max_new_tokens, sampling (temperature 1, top_p 1, no top-k),
optimizer (AdamW, constant lr), trainable set (projector + language model, vision tower frozen), fp32,
gradient checkpointing off, one process each with the same thread count.

Each trainer runs in its own process, alternately (TRL, llavadi, TRL, llavadi, ...) so machine drift hits
both. Per optimisation step after the warm-up steps: wall seconds, the seconds spent generating (TRL:
`_generate_single_turn`; llavadi: `OnPolicySampler._generate`; both pad the prompts, generate, cut at eos)
and the rest; tokens generated per second of generation; the peak RSS of the process and its RSS when training
begins (models, optimizer not yet built; weights read through mmap count once touched). RSS by phase: VmHWM is
reset at every phase boundary (PhaseMeter), so each phase (generation, teacher forward, student forward, the
LM-head loss, backward, optimizer step, and before / after training) gets its own peak and its RSS at its end,
on both sides at the same points.

    python benchmarks/vs_trl.py [--batch-size 8] [--max-new-tokens 64] [--steps 3] [--warmup 1] [--rounds 2]
                                [--threads 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from llavadi.process_memory import reset_peak_rss, status_kib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VOCAB = 32000
IMAGE_SIZE, PATCH = 336, 14
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


# ----------------------------------------------------------------------------- the job (built once)

def build_tokenizer():
    """llavadi's tiny word-level tokenizer padded with filler words to exactly VOCAB tokens."""
    from llavadi.models.tokenizer import build_tiny_tokenizer

    base = len(build_tiny_tokenizer())
    tok = build_tiny_tokenizer(" ".join(f"filler{i:05d}" for i in range(VOCAB - base)))
    if len(tok) != VOCAB:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, wanted {VOCAB}")
    tok.model_max_length = 2048  # 576 image tokens + text
    return tok


def build_pair(tok):
    """(teacher, student): random LLaVAs, text 1024x4 and 512x2, one CLIP-shaped tower of 576 image tokens."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    def config(hidden, layers, heads, intermediate):
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=256)
        text = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                           vision_feature_layer=-2, vision_feature_select_strategy="default")

    torch.manual_seed(0)
    teacher = LlavaForConditionalGeneration(config(1024, 4, 16, 2816))
    torch.manual_seed(1)
    student = LlavaForConditionalGeneration(config(512, 2, 8, 1408))
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    return teacher, student


def write_samples(work: str, n: int) -> str:
    """n LLaVA-format samples with synthetic 336 px images (one to three coloured shapes)."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    records = []
    for i in range(n):
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 240))
        draw = ImageDraw.Draw(img)
        objects = []
        for _ in range(rng.randint(1, 3)):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            x, y, r = rng.randint(40, 296), rng.randint(40, 296), rng.randint(15, 40)
            box = (x - r, y - r, x + r, y + r)
            if shape == "circle":
                draw.ellipse(box, fill=COLORS[color])
            elif shape == "square":
                draw.rectangle(box, fill=COLORS[color])
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
            objects.append(f"a {color} {shape}")
        name = f"img{i:03d}.png"
        img.save(os.path.join(work, "images", name))
        question = rng.choice(["What shapes are in the image?", "Describe the image in detail.",
                               "How many shapes are there and what colors are they?"])
        answer = f"There are {len(objects)} shapes: " + ", ".join(objects) + "."
        records.append({"id": f"s{i}", "image": name,
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer}]})
    path = os.path.join(work, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def build_job(work: str, n_samples: int) -> None:
    """Models, data and nothing else, once per work folder."""
    if os.path.exists(os.path.join(work, "job.done")):
        return
    from llavadi.models.build import LoadedModel, save_model
    from llavadi.models.presets import VisionSpec, build_image_processor

    tok = build_tokenizer()
    teacher, student = build_pair(tok)
    processor = build_image_processor(VisionSpec(image_size=IMAGE_SIZE, patch_size=PATCH))
    meta = {"template": "vicuna_v1", "system": ""}
    save_model(LoadedModel(teacher, tok, processor, dict(meta)), os.path.join(work, "teacher"))
    save_model(LoadedModel(student, tok, processor, dict(meta)), os.path.join(work, "student"))
    write_samples(work, n_samples)
    open(os.path.join(work, "job.done"), "w").close()


def llavadi_recipe(work: str, out: str, args) -> str:
    """The llavadi recipe of the job (JSON is valid YAML)."""
    recipe = {
        "output_dir": out, "seed": 0, "device": "cpu",
        "student": {"path": os.path.join(work, "student")}, "teacher": {"path": os.path.join(work, "teacher")},
        "data": {"image_folder": os.path.join(work, "images"), "template": "vicuna_v1", "system": "",
                 "max_length": 1024},
        "stages": [{
            "name": "finetune", "data": {"path": os.path.join(work, "data.json")},
            "trainable": {"projector": True, "llm": True},
            "distill": {"ce_weight": 0.0,
                        "terms": [{"name": "forward_kl", "weight": 1.0, "tokens": "response",
                                   "options": {"temperature": 1.0}}]},
            "on_policy": {"fraction": 1.0, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0},
            "train": {"learning_rate": 1e-5, "max_steps": args.warmup + args.steps,
                      "per_device_train_batch_size": args.batch_size, "lr_scheduler_type": "constant",
                      "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 1,
                      "save_steps": 100000, "dataloader_num_workers": 0},
        }],
    }
    path = os.path.join(out + ".recipe.yaml")
    with open(path, "w") as f:
        json.dump(recipe, f, indent=1)
    return path


# ----------------------------------------------------------------------------- inside a child process

class PhaseMeter:
    """Peak and end RSS of named phases (nested ones too), from VmHWM reset at every phase boundary.

    Writing 5 to /proc/self/clear_refs resets the process's peak RSS (VmHWM) to its current RSS; the peak
    read at a boundary is folded into every phase open at that moment, so a phase's peak is the highest RSS
    anywhere inside it, its nested phases included."""

    def __init__(self):
        self.stack: list[list] = []  # [name, start time, peak KiB so far, CPU time at the start]
        self.records: list[tuple] = []  # (name, start time, peak KiB, RSS KiB at the end, CPU seconds)

    @staticmethod
    def take_peak() -> int:
        """VmHWM since the last reset, then reset it."""
        peak = status_kib("VmHWM")
        reset_peak_rss()
        return peak

    def _fold(self) -> None:
        peak = self.take_peak()
        for entry in self.stack:
            entry[2] = max(entry[2], peak)

    def enter(self, name: str) -> None:
        """A phase begins."""
        self._fold()
        self.stack.append([name, time.perf_counter(), status_kib("VmRSS"), time.process_time()])

    def exit(self) -> None:
        """The innermost open phase ends."""
        self._fold()
        name, start, peak, cpu = self.stack.pop()
        self.records.append((name, start, peak, status_kib("VmRSS"), time.process_time() - cpu))

    def wrap(self, cls, method: str, name: str, when=None) -> None:
        """Measure every call of cls.method (those for which `when(args)` holds) as phase `name`."""
        original = getattr(cls, method)
        meter = self

        def measured(*a, **k):
            if when is not None and not when(a):
                return original(*a, **k)
            meter.enter(name)
            try:
                return original(*a, **k)
            finally:
                meter.exit()

        setattr(cls, method, measured)


class Clock:
    """Step ends and generation calls, timed around the trainers' own functions (nothing else changes)."""

    def __init__(self):
        self.train_begin = None
        self.rss_at_begin = None
        self.trainable = None  # parameters the trainer's model trains
        self.step_ends: list[float] = []
        self.generations: list[tuple] = []  # (start, seconds, tokens, CPU seconds)
        self.teacher: list[tuple] = []  # (start, seconds, 0, CPU seconds): the teacher's forward
        self.meter = PhaseMeter()
        self.peak_before_train = None  # KiB: loading the models, checks, building the dataset
        self.peak_kib = 0  # the highest RSS any reset saw (resetting VmHWM also lowers wait4's ru_maxrss)

    def install(self, cls, method: str, count_tokens, record=None, when=None):
        """Time every call of cls.method (those for which `when(args)` holds) into `record`."""
        original = getattr(cls, method)
        record = self.generations if record is None else record

        def timed(*a, **k):
            if when is not None and not when(a):
                return original(*a, **k)
            start, cpu = time.perf_counter(), time.process_time()
            out = original(*a, **k)
            record.append((start, time.perf_counter() - start, count_tokens(out), time.process_time() - cpu))
            return out

        setattr(cls, method, timed)

    def install_steps(self):
        from accelerate import Accelerator
        from transformers.trainer_callback import CallbackHandler

        on_begin, on_end = CallbackHandler.on_train_begin, CallbackHandler.on_step_end
        before_opt, after_opt = CallbackHandler.on_pre_optimizer_step, CallbackHandler.on_optimizer_step
        clock, meter = self, self.meter

        def begin(handler, *a, **k):
            clock.train_begin = (time.perf_counter(), time.process_time())
            clock.rss_at_begin = status_kib("VmRSS")
            clock.peak_before_train = meter.take_peak()
            clock.trainable = sum(p.numel() for p in handler.model.parameters() if p.requires_grad)
            meter.enter("whole step")
            return on_begin(handler, *a, **k)

        def end(handler, *a, **k):
            clock.step_ends.append((time.perf_counter(), time.process_time()))
            meter.exit()
            meter.enter("whole step")
            return on_end(handler, *a, **k)

        def optimizer_begins(handler, *a, **k):
            meter.enter("optimizer step")
            return before_opt(handler, *a, **k)

        def optimizer_ends(handler, *a, **k):
            meter.exit()
            return after_opt(handler, *a, **k)

        CallbackHandler.on_train_begin, CallbackHandler.on_step_end = begin, end
        CallbackHandler.on_pre_optimizer_step, CallbackHandler.on_optimizer_step = optimizer_begins, optimizer_ends
        meter.wrap(Accelerator, "backward", "backward")

    def finish(self) -> None:
        """Close the open step phase; the peak after training (writing the student) goes to `peak_after_train`."""
        if self.meter.stack:
            self.meter.exit()
        self.peak_after_train = self.meter.take_peak()
        self.peak_kib = max([self.peak_before_train or 0, self.peak_after_train]
                            + [r[2] for r in self.meter.records])

    def phases(self) -> list[dict]:
        """Per optimisation step: per phase, its peak RSS, its RSS at the end (KiB) and its CPU seconds."""
        bounds = [self.train_begin[0]] + [e[0] for e in self.step_ends]
        out = []
        for start, end in itertools.pairwise(bounds):
            step: dict = {}
            for name, begin, peak, rss_end, cpu in self.meter.records:
                if start <= begin < end:
                    prior = step.get(name, (0, 0, 0.0))
                    step[name] = (max(prior[0], peak), rss_end, prior[2] + cpu)
            out.append(step)
        return out

    def steps(self) -> list[dict]:
        """Per optimisation step: wall and CPU seconds, and the generation and teacher calls inside it."""
        bounds = [self.train_begin] + self.step_ends
        out = []
        for (start, cpu_start), (end, cpu_end) in itertools.pairwise(bounds):
            gens = [g for g in self.generations if start <= g[0] < end]
            teacher = [g for g in self.teacher if start <= g[0] < end]
            out.append({"seconds": end - start, "cpu_seconds": cpu_end - cpu_start,
                        "generation_seconds": sum(g[1] for g in gens), "generation_cpu": sum(g[3] for g in gens),
                        "tokens": sum(g[2] for g in gens), "teacher_seconds": sum(g[1] for g in teacher),
                        "teacher_cpu": sum(g[3] for g in teacher)})
        return out


def run_llavadi(work: str, out: str, args, clock: Clock) -> dict:
    """`llavadi train` on the job's recipe, in this process."""
    from llavadi.cli import main
    from llavadi.distill import module
    from llavadi.distill.objective import DistillObjective
    from llavadi.teacher.on_policy import OnPolicySampler
    from llavadi.teacher.online import OnlineTeacher
    from llavadi.train.trainer import DistillTrainer

    clock.install(OnPolicySampler, "_generate", lambda answers: sum(len(a) for a in answers))
    clock.install(OnlineTeacher, "view", lambda _: 0, record=clock.teacher)
    if args.no_tower_reuse:  # the ablation: the frozen tower runs again in the training forward
        from llavadi.teacher.on_policy import VisionOutputReuse

        VisionOutputReuse.applies = lambda self: False
    clock.meter.wrap(DistillTrainer, "get_batch_samples", "batch: fetch + on-policy answers")
    clock.meter.wrap(OnPolicySampler, "_generate", "generation")
    clock.meter.wrap(DistillTrainer, "compute_loss", "forward + loss (teacher, student)")
    clock.meter.wrap(OnlineTeacher, "view", "teacher forward")
    clock.meter.wrap(module, "llava_view", "student forward")
    clock.meter.wrap(DistillObjective, "forward", "loss (LM-head pass)")
    recipe = llavadi_recipe(work, out, args)
    code = main(["train", recipe])
    if code not in (0, None):
        raise RuntimeError(f"llavadi train exited with {code}")
    return {"command": f"llavadi train {recipe}"}


def trl_dataset(work: str):
    """The job's samples as TRL's conversational prompts with their images."""
    from datasets import Dataset
    from PIL import Image

    with open(os.path.join(work, "data.json")) as f:
        records = json.load(f)
    prompts, images = [], []
    for r in records:
        question = r["conversations"][0]["value"].replace("<image>\n", "")
        prompts.append([{"role": "user", "content": question}])  # TRL puts the image before the text
        images.append(Image.open(os.path.join(work, "images", r["image"])).convert("RGB"))
    return Dataset.from_dict({"prompt": prompts, "image": images})


def check_same_prompt(work: str, processor) -> None:
    """TRL's rendering of the first sample's prompt must be llavadi's token for token (a fair comparison);
    checked in the parent process, so neither side's memory holds the other's code or models."""
    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    from llavadi.data.templates import Turn
    from llavadi.models.build import load_llava_dir

    with open(os.path.join(work, "data.json")) as f:
        first = json.load(f)[0]
    student = load_llava_dir(os.path.join(work, "student"))
    ours = student.encoder().encode_prompt([Turn("user", first["conversations"][0]["value"])], 1).input_ids
    image = Image.open(os.path.join(work, "images", first["image"])).convert("RGB")
    question = first["conversations"][0]["value"].replace("<image>\n", "")
    messages = prepare_multimodal_messages([{"role": "user", "content": question}], images=[image])
    theirs = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"][0]
    if list(theirs) != list(ours):
        raise RuntimeError(f"TRL's prompt differs from llavadi's:\n{list(theirs)[-30:]}\n{list(ours)[-30:]}")


def run_trl(work: str, out: str, args, clock: Clock) -> dict:
    """TRL's DistillationTrainer on the same job, in this process."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DistillationConfig, DistillationTrainer
    from trl.trainer import distillation_trainer

    processor = AutoProcessor.from_pretrained(os.path.join(work, "student"), padding_side="left")
    student = LlavaForConditionalGeneration.from_pretrained(os.path.join(work, "student"), dtype=torch.float32)
    teacher = LlavaForConditionalGeneration.from_pretrained(os.path.join(work, "teacher"), dtype=torch.float32)
    for p in student.model.vision_tower.parameters():  # as llavadi's trainable: projector + language model
        p.requires_grad_(False)
    config = DistillationConfig(
        output_dir=out, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", seed=0,
        dataloader_num_workers=0, beta=0.0, temperature=1.0, top_p=1.0, top_k=0,
        max_completion_length=args.max_new_tokens)
    clock.install(DistillationTrainer, "_generate_single_turn", lambda completions: sum(len(c) for c in completions))
    clock.install(DistillationTrainer, "_get_last_hidden_state", lambda _: 0, record=clock.teacher,
                  when=lambda a: a[1] is a[0].teacher_model)  # the teacher's backbone (its head is in the loss)
    meter = clock.meter
    meter.wrap(DistillationTrainer, "get_batch_samples", "batch: fetch + on-policy answers")
    meter.wrap(DistillationTrainer, "_prepare_inputs", "batch: fetch + on-policy answers",
               when=lambda a: a[0].model.training)
    meter.wrap(DistillationTrainer, "_generate_single_turn", "generation")
    meter.wrap(DistillationTrainer, "compute_loss", "forward + loss (teacher, student)")
    meter.wrap(DistillationTrainer, "_get_last_hidden_state", "teacher forward",
               when=lambda a: a[1] is a[0].teacher_model)
    meter.wrap(DistillationTrainer, "_get_last_hidden_state", "student forward",
               when=lambda a: a[1] is not a[0].teacher_model)
    meter.wrap(distillation_trainer, "_chunked_divergence_loss", "loss (LM-head pass)")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=trl_dataset(work),
                                  processing_class=processor)
    trainer.train()
    return {"command": "trl.DistillationTrainer(...).train()"}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    clock = Clock()
    clock.install_steps()
    out = tempfile.mkdtemp(prefix=f"vs_trl-{args.child}-", dir=args.work)
    info = (run_trl if args.child == "trl" else run_llavadi)(args.work, out, args, clock)
    clock.finish()
    info.update({"steps": clock.steps(), "rss_at_begin_kib": clock.rss_at_begin, "phases": clock.phases(),
                 "peak_before_train_kib": clock.peak_before_train, "peak_after_train_kib": clock.peak_after_train,
                 "peak_kib": clock.peak_kib,
                 "trainable": clock.trainable,
                 "threads": torch.get_num_threads()})
    with open(args.result, "w") as f:
        json.dump(info, f)


# ----------------------------------------------------------------------------- the parent

def launch(side: str, args) -> dict:
    """Run one side in a fresh process; its step timings plus its peak RSS from wait4."""
    result = os.path.join(args.work, f"result-{side}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--work", args.work, "--result", result,
           "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--no-tower-reuse"] if args.no_tower_reuse else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log_path = os.path.join(args.work, f"log-{side}.txt")
    load_before = os.getloadavg()[0]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS)
        proc.returncode = status = os.waitstatus_to_exitcode(status)
    if status != 0:
        raise SystemExit(f"{side} failed (status {status}); see {log_path}")
    with open(result) as f:
        info = json.load(f)
    # the child resets its VmHWM at phase boundaries, which lowers ru_maxrss: its own record of the peak counts
    info["peak_rss_kib"] = max(usage.ru_maxrss, info["peak_kib"])
    info["load"] = (load_before, os.getloadavg()[0])
    return info


def summarize(info: dict, warmup: int) -> dict:
    """Medians over the timed steps of one run (wall and CPU seconds), its tokens, memory and load."""
    steps = info["steps"][warmup:]
    out = {}
    for suffix, step, gen, teacher in (("", "seconds", "generation_seconds", "teacher_seconds"),
                                       ("_cpu", "cpu_seconds", "generation_cpu", "teacher_cpu")):
        out["step" + suffix] = statistics.median(s[step] for s in steps)
        out["generation" + suffix] = statistics.median(s[gen] for s in steps)
        out["rest" + suffix] = statistics.median(s[step] - s[gen] for s in steps)
        out["teacher" + suffix] = statistics.median(s[teacher] for s in steps)
        spent = sum(s[gen] for s in steps)
        out["tokens_per_s" + suffix] = sum(s["tokens"] for s in steps) / spent if spent else float("nan")
    out.update({"tokens_per_step": statistics.median(s["tokens"] for s in steps),
                "peak_mib": info["peak_rss_kib"] / 1024, "begin_mib": info["rss_at_begin_kib"] / 1024,
                "load": info["load"], "trainable": info["trainable"],
                "before_train_peak_mib": info["peak_before_train_kib"] / 1024,
                "after_train_peak_mib": info["peak_after_train_kib"] / 1024})
    phases = info["phases"][warmup:]
    for name in PHASES:
        if all(name in step for step in phases):
            out["phase_peak_mib", name] = statistics.median(step[name][0] for step in phases) / 1024
            out["phase_end_mib", name] = statistics.median(step[name][1] for step in phases) / 1024
            out["phase_cpu", name] = statistics.median(step[name][2] for step in phases)
    return out


PHASES = ("whole step", "batch: fetch + on-policy answers", "generation", "forward + loss (teacher, student)",
          "teacher forward", "student forward", "loss (LM-head pass)", "backward", "optimizer step")


ROWS = (("step", "seconds per step"), ("generation", "generation seconds per step"),
        ("rest", "rest of the step (teacher, student forward/backward, optimizer)"),
        ("teacher", "  of which the teacher's forward"), ("tokens_per_s", "tokens generated per second"))


def report(runs: dict, work: str) -> None:
    """Medians over rounds of each side, and llavadi / TRL, in wall and CPU seconds."""
    med = {side: {k: statistics.median(run[k] for run in rs) for k in rs[0] if k != "load"}
           for side, rs in runs.items()}
    print(f"medians over rounds{'':<49}{'TRL':>10}{'llavadi':>10}{'ratio':>8}{'TRL cpu':>10}{'llavadi cpu':>12}"
          f"{'ratio':>8}")
    for key, label in ROWS:
        t, l, tc, lc = med["trl"][key], med["llavadi"][key], med["trl"][key + "_cpu"], med["llavadi"][key + "_cpu"]
        print(f"  {label:<66}{t:>10.2f}{l:>10.2f}{l / t:>7.2f}x{tc:>10.2f}{lc:>12.2f}{lc / tc:>7.2f}x")
    for key, label in (("peak_mib", "peak RSS (MiB)"), ("begin_mib", "RSS when training begins (MiB)")):
        t, l = med["trl"][key], med["llavadi"][key]
        print(f"  {label:<66}{t:>10.0f}{l:>10.0f}{l / t:>7.2f}x")
    print("RSS by phase (MiB; medians over the timed steps, then over rounds): the peak inside the phase and "
          "the RSS when it ends; CPU seconds inside it")
    print(f"  {'phase':<44}{'TRL peak':>10}{'llavadi peak':>14}{'ratio':>8}{'TRL end':>10}{'llavadi end':>13}"
          f"{'TRL cpu s':>11}{'llavadi cpu s':>15}{'ratio':>8}")
    for label, key in (("before training (load, checks, dataset)", "before_train_peak_mib"),
                       ("after training (writing the student)", "after_train_peak_mib")):
        t, l = med["trl"][key], med["llavadi"][key]
        print(f"  {label:<44}{t:>10.0f}{l:>14.0f}{l / t:>7.2f}x")
    for name in PHASES:
        if ("phase_peak_mib", name) in med["trl"] and ("phase_peak_mib", name) in med["llavadi"]:
            t, l = med["trl"]["phase_peak_mib", name], med["llavadi"]["phase_peak_mib", name]
            te, le = med["trl"]["phase_end_mib", name], med["llavadi"]["phase_end_mib", name]
            tc, lc = med["trl"]["phase_cpu", name], med["llavadi"]["phase_cpu", name]
            print(f"  {name:<44}{t:>10.0f}{l:>14.0f}{l / t:>7.2f}x{te:>10.0f}{le:>13.0f}{tc:>11.2f}{lc:>15.2f}"
                  f"{lc / max(tc, 1e-9):>7.2f}x")
    trainable = trainable_parameters(work)
    print(f"the same in both: {trainable / 1e6:.1f}M trainable parameters (projector + language model), whose "
          f"gradients and AdamW states take {12 * trainable / 2**20:.0f} MiB (fp32: 4 B each x 3)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed optimisation steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimisation steps first")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the job (kept and reused when given)")
    parser.add_argument("--no-tower-reuse", action="store_true",
                        help="llavadi runs its frozen vision tower again in the training forward (an ablation)")
    parser.add_argument("--child", choices=["trl", "llavadi"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="vs_trl-"))
    os.makedirs(args.work, exist_ok=True)
    build_job(args.work, args.samples)
    import trl
    from transformers import AutoProcessor

    check_same_prompt(args.work, AutoProcessor.from_pretrained(os.path.join(args.work, "student")))

    print(f"TRL {trl.__version__}; batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
          f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} rounds (TRL, llavadi alternating), "
          f"{args.threads} thread(s) per process, fp32; job in {args.work}")
    runs = {"trl": [], "llavadi": []}
    header = (f"{'round':<6}{'side':<9}{'step s':>8}{'gen s':>8}{'rest s':>8}{'teacher s':>10}{'step cpu':>9}"
              f"{'gen cpu':>8}{'tok/step':>9}{'gen tok/s':>10}{'peak MiB':>10}{'begin MiB':>10}{'load avg':>12}")
    print(header)
    for r in range(args.rounds):
        for side in ("trl", "llavadi"):
            s = summarize(launch(side, args), args.warmup)
            runs[side].append(s)
            print(f"{r:<6}{side:<9}{s['step']:>8.2f}{s['generation']:>8.2f}{s['rest']:>8.2f}{s['teacher']:>10.2f}"
                  f"{s['step_cpu']:>9.2f}{s['generation_cpu']:>8.2f}{s['tokens_per_step']:>9.0f}"
                  f"{s['tokens_per_s']:>10.1f}{s['peak_mib']:>10.0f}{s['begin_mib']:>10.0f}"
                  f"{s['load'][0]:>6.1f}-{s['load'][1]:<5.1f}", flush=True)
    for side, rs in runs.items():
        if any(run["trainable"] != trainable_parameters(args.work) for run in rs):
            raise SystemExit(f"{side} trained {rs[0]['trainable']} parameters, not the student's "
                             f"{trainable_parameters(args.work)} outside its vision tower")
    report(runs, args.work)
    return 0


def trainable_parameters(work: str) -> int:
    """Parameters of the student outside its vision tower (what both trainers train)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        config = LlavaForConditionalGeneration.config_class.from_pretrained(os.path.join(work, "student"))
        model = LlavaForConditionalGeneration(config)
    return sum(p.numel() for n, p in model.named_parameters() if ".vision_tower." not in f".{n}")


if __name__ == "__main__":
    raise SystemExit(main())
