"""Run a recipe's stages in order: data, trainable modules, objective, Trainer, checkpoints, resume.

Layout of `output_dir`:
  recipe.yaml              the resolved recipe
  <stage>/checkpoints/     Trainer checkpoints (resume restores weights, optimiser, scheduler)
  <stage>/model/           the student after the stage, a plain HF LLaVA directory
  <stage>/data_report.json samples used / skipped / truncated
  final/                   the student after the last stage
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re

import torch
import yaml
from transformers import TrainingArguments, set_seed

from llavadi.config import Recipe, StageConfig, recipe_to_dict
from llavadi.data.collator import LlavaCollator
from llavadi.data.dataset import LlavaDataset, View
from llavadi.distill.compat import check_same_tokenizer
from llavadi.distill.module import DistillationModule, save_projectors
from llavadi.distill.objective import DistillObjective
from llavadi.device import resolve_device
from llavadi.models.build import (
    LoadedModel,
    llava_processor,
    load_llava_dir,
    load_model,
    save_model,
    set_trainable,
)
from llavadi.teacher.online import OnlineTeacher
from llavadi.train.trainer import DistillTrainer

TEACHER_PREFIX = "teacher_"


def _same_image_layout(a: LoadedModel, b: LoadedModel) -> bool:
    pa, pb = a.image_processor, b.image_processor
    keys = ("crop_size", "size", "image_mean", "image_std", "do_normalize", "do_center_crop", "resample")
    same_proc = all(str(getattr(pa, k, None)) == str(getattr(pb, k, None)) for k in keys)
    return same_proc and a.n_image_tokens == b.n_image_tokens and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def build_dataset(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None) -> LlavaDataset:
    """The stage's dataset with a student view, and a teacher view when the teacher's layout differs."""
    d = stage.data
    views = [View(student.encoder(d.template, d.system, d.max_length), student.image_processor)]
    if teacher is not None and stage.distill.terms and not _same_image_layout(student, teacher):
        views.append(View(teacher.encoder(d.template, d.system, d.max_length), teacher.image_processor,
                          prefix=TEACHER_PREFIX))
    return LlavaDataset(stage.data.path, stage.data.image_folder, views, on_error=stage.data.on_error)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The highest-numbered checkpoint-N directory, or None."""
    found = []
    for d in glob.glob(os.path.join(ckpt_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
        if m and os.path.isfile(os.path.join(d, "trainer_state.json")):
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


def training_arguments(recipe: Recipe, stage: StageConfig, out_dir: str, device: str,
                       quiet: bool = False) -> TrainingArguments:
    """TrainingArguments for a stage."""
    t = stage.train
    report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    kwargs = dict(
        output_dir=out_dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=t.bf16,
        fp16=t.fp16,
        dataloader_num_workers=t.dataloader_workers,
        remove_unused_columns=False,
        report_to=report_to,
        seed=recipe.seed,
        use_cpu=device == "cpu",
        ddp_find_unused_parameters=False,
        save_only_model=False,
        disable_tqdm=quiet,  # quiet: log lines instead of a progress bar (parallel runs, CI logs)
    )
    if t.gradient_checkpointing:
        kwargs["gradient_checkpointing"] = True
    kwargs.update(t.extra)
    return TrainingArguments(**kwargs)


def build_objective(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None) -> DistillObjective:
    """The stage's objective; checks up front that logit terms have a shared tokenizer."""
    terms = stage.distill.terms
    if teacher is not None and any(t.is_logit_term for t in terms):
        check_same_tokenizer(student.tokenizer, teacher.tokenizer)
    return DistillObjective(terms, ce_weight=stage.distill.ce_weight, student_config=student.model.config,
                            teacher_config=teacher.model.config if teacher is not None else None,
                            chunk_size=stage.distill.chunk_size)


def run_stage(recipe: Recipe, stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
              log=print, resume: bool = True, callbacks=None, quiet: bool = False) -> LoadedModel:
    """Train the student through one stage; returns the student after it (saved in <stage>/model)."""
    stage_dir = os.path.join(recipe.output_dir, stage.name)
    final_dir = os.path.join(stage_dir, "model")
    meta = {**student.meta, "template": stage.data.template, "system": stage.data.system, "stage": stage.name}
    if stage.data.template == "plain":  # a pretrain stage does not change how the model is prompted
        meta = {**student.meta, "stage": stage.name}
    if resume and os.path.isfile(os.path.join(final_dir, "config.json")):
        log(f"[{stage.name}] already done: loading {final_dir}")
        done = load_llava_dir(final_dir)
        return done
    device = resolve_device(recipe.device).type
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    ckpt = latest_checkpoint(ckpt_dir) if resume else None
    if ckpt:
        log(f"[{stage.name}] resuming from {ckpt}")
    use_teacher = teacher if stage.distill.terms else None
    counts = set_trainable(student.model, stage.trainable.projector, stage.trainable.llm,
                           stage.trainable.vision_from_layer)
    log(f"[{stage.name}] trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    dataset = build_dataset(stage, student, use_teacher)
    log(dataset.report())
    # the projectors' initial weights must not depend on what ran before in this process (a stage
    # found done, or a previous stage trained): seed them from the recipe
    torch.manual_seed(recipe.seed)
    objective = build_objective(stage, student, use_teacher)
    if objective.needs_attentions:
        for m in (student.model, use_teacher.model if use_teacher else None):
            if m is not None:
                m.set_attn_implementation("eager")
    if stage.train.gradient_checkpointing:
        student.model.config.use_cache = False
    prefixes = tuple(v.prefix for v in dataset.views)
    collator = LlavaCollator(student.tokenizer.pad_token_id, prefixes)
    processor = llava_processor(student)
    args = training_arguments(recipe, stage, ckpt_dir, device, quiet=quiet)
    online = None
    if use_teacher is not None:
        online = OnlineTeacher(use_teacher.model, device=recipe.teacher_device or args.device, prefix=TEACHER_PREFIX)
    module = DistillationModule(student.model, objective)
    trainer = DistillTrainer(
        model=module, args=args, train_dataset=dataset, data_collator=collator,
        processing_class=processor, teacher=online, meta=meta, callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=ckpt)
    out = LoadedModel(module.student, student.tokenizer, student.image_processor, meta)
    if trainer.args.should_save:
        save_model(out, final_dir, meta)
        save_projectors(module.projector_state(), stage_dir, objective.term_labels)
        with open(os.path.join(stage_dir, "data_report.json"), "w") as f:
            json.dump({
                "data": stage.data.path, "used": len(dataset), "truncated": dataset.n_truncated,
                "skipped": [vars(s) for s in dataset.skipped],
                "train_loss": result.training_loss, "steps": result.global_step,
            }, f, indent=2)
    if dataset.skipped:
        log(f"[{stage.name}] WARNING: {len(dataset.skipped)} sample(s) skipped: see {stage_dir}/data_report.json")
    return out


def _is_main_process() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def run_recipe(recipe: Recipe, resume: bool = True, log=print, callbacks=None, quiet: bool = False) -> str:
    """Run every stage; returns the directory of the final student."""
    set_seed(recipe.seed)
    main = _is_main_process()
    if not main:
        log = lambda *_: None  # noqa: E731 - one process speaks
    os.makedirs(recipe.output_dir, exist_ok=True)
    if main:
        with open(os.path.join(recipe.output_dir, "recipe.yaml"), "w") as f:
            yaml.safe_dump(recipe_to_dict(recipe), f, sort_keys=False)
    student = load_model(recipe.student)
    teacher = load_model(recipe.teacher) if recipe.teacher is not None else None
    log(f"student: {recipe.student.describe()} ({sum(p.numel() for p in student.model.parameters()):,} params)")
    if teacher is not None:
        log(f"teacher: {recipe.teacher.describe()} ({sum(p.numel() for p in teacher.model.parameters()):,} params)")
    for stage in recipe.stages:
        student = run_stage(recipe, stage, student, teacher, log=log, resume=resume, callbacks=callbacks,
                            quiet=quiet)
    final = os.path.join(recipe.output_dir, "final")
    if _is_main_process():
        save_model(student, final, student.meta)
    for stage in recipe.stages:  # what was left out, said once more at the end of the run
        report = os.path.join(recipe.output_dir, stage.name, "data_report.json")
        if os.path.isfile(report):
            with open(report) as f:
                skipped = json.load(f)["skipped"]
            if skipped:
                ids = ", ".join(s["sample_id"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
                log(f"[{stage.name}] {len(skipped)} sample(s) skipped ({ids}); reasons in {report}")
    log(f"final student: {final}")
    return final
