"""Run a recipe's stages in order: data, trainable modules, objective, Trainer, checkpoints, resume.

Before any model loads, the whole recipe is validated (`llavadi.train.preflight`) and every
stage's fingerprint is compared with what the output folder holds (`llavadi.train.stages`).

Layout of `output_dir`:
  recipe.yaml              the resolved recipe (written once the checks pass)
  <stage>/stage.json       the fingerprint the stage is trained under (written when it starts)
  <stage>/checkpoints/     Trainer checkpoints (resume restores weights, optimiser, scheduler)
  <stage>/model/           the student after the stage, a plain HF LLaVA directory (a LoRA student merged)
  <stage>/distill_projectors.safetensors   the distillation projectors after the stage
  <stage>/adapter/         a LoRA student's adapter, with `student.lora.save: adapter`
  <stage>/data_report.json samples used / skipped / truncated / replaced, steps, loss
  <stage>/done.json        completion marker, written after the outputs
  final/                   the student after the last stage (a copy of its <stage>/model)

Multi-process runs (torchrun, accelerate launch, DeepSpeed, FSDP): every rank runs the same
stages; the stage's student is gathered by the engine on every rank and written by rank 0, and
every stage starts from the student its previous stage saved (llavadi.train.engines).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch
import yaml
from transformers import TrainingArguments, set_seed

from llavadi.atomic import write_json_atomic, write_text_atomic
from llavadi.config import ConfigError, ModelSpec, Recipe, StageConfig, recipe_to_dict
from llavadi.data.collator import LlavaCollator
from llavadi.data.dataset import LlavaDataset
from llavadi.device import resolve_device
from llavadi.distill.module import DistillationModule
from llavadi.distill.objective import DistillObjective
from llavadi.eval.decode import eos_token_ids
from llavadi.models.build import LoadedModel, llava_processor, load_model, publish_copy, set_trainable
from llavadi.models.dtypes import torch_dtype
from llavadi.models.lora import apply_lora, quantization_config
from llavadi.models.model_card import write_model_card
from llavadi.teacher.cache import cached_teacher, dataset_teacher, stage_cache
from llavadi.teacher.on_policy import OnPolicySampler, TeacherRetokenizer
from llavadi.teacher.online import OnlineTeacher
from llavadi.train import stage_inputs
from llavadi.train.checkpoints import checkpoint_finished, latest_complete_checkpoint, read_checkpoint_marker
from llavadi.train.engines import (
    barrier,
    engine_arguments,
    is_main_process,
    release_engine_state,
    require_engine,
)
from llavadi.train.guard import NonFiniteLossError
from llavadi.train.preflight import preflight
from llavadi.train.stages import (
    StageFingerprint,
    begin_stage,
    clean_interrupted_writes,
    plan_stages,
    publish_stage,
    stage_fingerprints,
)
from llavadi.train.trainer import DistillTrainer
from llavadi.training_args import training_argument_kwargs


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The newest complete, intact checkpoint-N directory, or None (read-only: nothing is set aside)."""
    return latest_complete_checkpoint(ckpt_dir, log=lambda *_: None, set_aside=False)


def training_arguments(recipe: Recipe, stage: StageConfig, out_dir: str, device: str,
                       quiet: bool = False, train_args: dict | None = None) -> TrainingArguments:
    """TrainingArguments for a stage: its `train` fields (`train_args`: as completed by engine_arguments) plus
    what llavadi sets (llavadi.training_args)."""
    fields = stage.train.args if train_args is None else train_args
    return TrainingArguments(**training_argument_kwargs(fields, out_dir, recipe.seed, device == "cpu", quiet))


def teacher_signals(recipe: Recipe, stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None, cache,
                    objective: DistillObjective, dataset: LlavaDataset, collator: LlavaCollator, device):
    """The stage's teacher source (the cache, the online teacher, or None) and on-policy sampler (or None)."""
    source = None
    if cache is not None:
        source = cached_teacher(cache, objective, dataset, device, stage.name)
    elif teacher is not None:
        source = OnlineTeacher(teacher.model, device=recipe.teacher_device or device, prefix=stage_inputs.TEACHER_PREFIX)
    on_policy = None
    if stage.on_policy is not None:
        retokenize = None
        if dataset.aligner is not None:  # a teacher of another tokenizer reads the sampled text in its own tokens
            retokenize = TeacherRetokenizer(student.tokenizer, dataset.views[1].encoder,
                                            eos_token_ids(student.model, student.tokenizer), dataset.views[1].prefix)
        on_policy = OnPolicySampler(student.model, student.tokenizer, collator, stage.on_policy, recipe.seed,
                                    stage.data.max_length,
                                    stage_inputs.answer_id_maps(student, teacher, collator.prefixes), retokenize=retokenize,
                                    teacher=source.model if isinstance(source, OnlineTeacher) else None)
    return source, on_policy


def run_stage(recipe: Recipe, stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
              fingerprint: StageFingerprint, status: str = "fresh", log=print, callbacks=None,
              quiet: bool = False) -> LoadedModel:
    """Train the student through one stage (`status` from `plan_stages`); returns it, published in <stage>/."""
    stage_dir = os.path.join(recipe.output_dir, stage.name)
    final_dir = os.path.join(stage_dir, "model")
    meta = _stage_meta(student, stage)
    if status == "done":
        log(f"[{stage.name}] already done: loading {final_dir}")
        return load_student(recipe, final_dir)
    main = is_main_process()
    device = resolve_device(recipe.device).type
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    ckpt = latest_complete_checkpoint(ckpt_dir, log=log, set_aside=main) if status == "resume" else None
    if main:
        begin_stage(stage_dir, fingerprint)
    use_teacher = teacher if stage.distill.terms else None
    cache = stage_cache(recipe, stage, student)  # None: the teacher runs online
    student, trained, lora = trainable_student(recipe, stage, student, log)
    data_teacher = use_teacher if cache is None else dataset_teacher(cache)  # whose view the samples also get
    dataset = stage_inputs.build_dataset(stage, student, data_teacher)
    log(dataset.report())
    # the projectors' initial weights must not depend on what ran before in this process (a stage
    # found done, or a previous stage trained): seed them from the recipe
    torch.manual_seed(recipe.seed)
    objective = stage_inputs.build_objective(stage, student, use_teacher, cache)
    if objective.needs_attentions:
        for m in (student.model, use_teacher.model if use_teacher else None):
            if m is not None:
                m.set_attn_implementation("eager")
    if stage.train.args.get("gradient_checkpointing"):
        student.model.config.use_cache = False
    prefixes = tuple(v.prefix for v in dataset.views)
    teacher_pad = {}
    if data_teacher is not None and stage_inputs.different_tokenizers(student, data_teacher):
        teacher_pad = {stage_inputs.TEACHER_PREFIX: data_teacher.tokenizer.pad_token_id or 0}
    collator = LlavaCollator(student.tokenizer.pad_token_id, prefixes, pad_token_ids=teacher_pad)
    processor = llava_processor(LoadedModel(student.model, student.tokenizer, student.image_processor, meta))
    where = f"stages.{stage.name}.train"
    train_args = engine_arguments(stage.train.args, student.model, where)
    args = training_arguments(recipe, stage, ckpt_dir, device, quiet=quiet, train_args=train_args)
    # the sampler generates with the student's model, whose layers carry a LoRA student's adapters
    source, on_policy = teacher_signals(recipe, stage, student, use_teacher, cache, objective, dataset, collator,
                                        args.device)
    module = DistillationModule(trained, objective)
    trainer = DistillTrainer(
        model=module, args=args, train_dataset=dataset, data_collator=collator,
        processing_class=processor, teacher=source, meta=meta, callbacks=callbacks, on_policy=on_policy,
        max_nonfinite_skips=stage.train.max_nonfinite_skips,
    )
    require_engine(trainer, train_args, where)
    ledger = _train_or_finish(trainer, ckpt, stage.name, log)
    state = trainer.gather_student_state()  # every rank: the engine gathers what it shards
    if trainer.args.should_save:
        _publish(stage_dir, fingerprint, trainer, state, dataset, ledger, stage.data.path, _last_logged(trainer, ckpt),
                 adapter=lora is not None and lora.save == "adapter")
    if dataset.skipped:
        log(f"[{stage.name}] WARNING: {len(dataset.skipped)} sample(s) skipped: see {stage_dir}/data_report.json")
    del trainer, module, source, on_policy, state
    release_engine_state()
    barrier()  # the stage's files are written before any rank reads them
    # the next stage starts from the saved student, as when this stage is found done: a LoRA student is
    # merged there, and a sharded one is whole again
    return load_student(recipe, final_dir)


def _stage_meta(student: LoadedModel, stage: StageConfig) -> dict:
    """The llavadi.json of the stage's student: how to prompt it, and the stage that made it."""
    if stage.data.template == "plain":  # a pretrain stage does not change how the model is prompted
        return {**student.meta, "stage": stage.name}
    return {**student.meta, "template": stage.data.template, "system": stage.data.system, "stage": stage.name}


def load_student(recipe: Recipe, model_dir: str) -> LoadedModel:
    """A student saved by a stage, loaded as the recipe's student spec says (dtype, attention implementation)."""
    spec = recipe.student
    return load_model(ModelSpec(path=model_dir, dtype=spec.dtype, attn_implementation=spec.attn_implementation))


def trainable_student(recipe: Recipe, stage: StageConfig, student: LoadedModel, log=print):
    """(student, the module to train, the LoRA spec or None): trainable flags set by the stage's rule, and
    the student wrapped in a LoRA PeftModel when the recipe has `student.lora` and the stage trains the LLM."""
    lora = recipe.student.lora if stage.trainable.llm else None
    if lora is not None and lora.quantize:  # QLoRA: the language model's linear layers loaded in 4 bits
        if student.source is None:
            raise ConfigError("student.lora.quantize: 4-bit loading reads the student from disk; a preset or composed "
                              "student is on disk only after a first stage (e.g. a projector pretraining stage)")
        spec = recipe.student
        student = load_model(ModelSpec(path=student.source, dtype=spec.dtype, attn_implementation=spec.attn_implementation),
                             quantization_config=quantization_config(lora, torch_dtype(spec.dtype)))
    counts = set_trainable(student.model, stage.trainable.projector, stage.trainable.llm,
                           stage.trainable.vision_from_layer)
    trained = apply_lora(student.model, lora, base_path=student.source) if lora else student.model
    if lora:
        counts["llm"] = sum(p.numel() for n, p in trained.named_parameters() if p.requires_grad and "lora_" in n)
    log(f"[{stage.name}] trainable parameters{' (LLM: LoRA)' if lora else ''}: "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return student, trained, lora


def _train_or_finish(trainer: DistillTrainer, ckpt: str | None, name: str, log) -> dict:
    """Train, resuming from `ckpt`; a checkpoint of the stage's last step is loaded, not trained on.

    (The Trainer, resumed from its last step, would run one step more than the recipe asks.)
    Returns the stage's ledger: steps, loss, skipped steps, replaced samples.
    """
    if ckpt is not None and checkpoint_finished(ckpt):
        log(f"[{name}] {ckpt} is the stage's last step: publishing it without training")
        trainer._load_from_checkpoint(ckpt)
        return read_checkpoint_marker(ckpt) or {}
    if ckpt is not None:
        log(f"[{name}] resuming from {ckpt}")
    trainer.train(resume_from_checkpoint=ckpt)
    ledger = trainer.stage_ledger()  # every process takes part
    last = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    marker = read_checkpoint_marker(last)  # the end-of-stage checkpoint's totals are gathered over processes
    return marker if marker and marker.get("step") == trainer.state.global_step else ledger


def _last_logged(trainer: DistillTrainer, ckpt: str | None) -> dict:
    """The stage's last log line with a loss (from the checkpoint when the stage was published without training)."""
    history = trainer.state.log_history
    if not history and ckpt is not None:
        try:
            with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
                history = json.load(f).get("log_history", [])
        except (OSError, ValueError):
            history = []
    return next((h for h in reversed(history) if "loss" in h), {})


def _publish(stage_dir: str, fingerprint: StageFingerprint, trainer: DistillTrainer, state: dict,
             dataset: LlavaDataset, ledger: dict, data_path: str, last_logs: dict, adapter: bool = False) -> None:
    """Write model, projectors (from the gathered `state`) and data report, then the completion marker."""
    bad = [n for n, p in state.items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:  # the guard stops non-finite steps; this catches what slips past it (e.g. overflow in a cast)
        raise NonFiniteLossError(f"the stage's weights hold NaN or inf ({len(bad)} tensors, e.g. {bad[:3]}); "
                                 "nothing was published. Lower the learning rate and rerun with --force")
    loss = ledger.get("train_loss")
    report = {
        "data": data_path, "used": len(dataset), "truncated": dataset.n_truncated,
        "skipped": [vars(s) for s in dataset.skipped],
        "replaced_at_load": ledger.get("replaced_samples", []),
        "nonfinite_steps_skipped": ledger.get("nonfinite_skipped", []),
        "train_loss": loss if loss is not None and math.isfinite(loss) else None,
        "steps": ledger.get("step"),
        "last_logs": last_logs,  # the model card's final term values
    }

    def write(folder: str) -> None:
        trainer.write_student(state, os.path.join(folder, "model"), folder,
                              adapter_dir=os.path.join(folder, "adapter") if adapter else None)
        write_json_atomic(os.path.join(folder, "data_report.json"), report)

    publish_stage(stage_dir, fingerprint, write, summary={"steps": report["steps"], "train_loss": report["train_loss"]})


def write_card(recipe: Recipe, model_dir: str, student: LoadedModel, teacher: LoadedModel | None) -> str:
    """The model card of `model_dir` from the recipe and each stage's data_report.json."""
    reports = {}
    for stage in recipe.stages:
        path = os.path.join(recipe.output_dir, stage.name, "data_report.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                reports[stage.name] = json.load(f)
    def count(model):  # a ZeRO-3 partitioned parameter keeps its full size in ds_numel
        return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    params = {"student": count(student.model), "teacher": count(teacher.model) if teacher is not None else None}
    return write_model_card(model_dir, recipe_to_dict(recipe), reports, params)


def prepare_run(recipe: Recipe, resume: bool = True, force: bool = False, log=print, quiet: bool = False,
                act: bool = True) -> tuple[dict[str, str], dict[str, StageFingerprint]]:
    """Before any model loads: clean interrupted writes, validate everything, plan the stages.

    Returns each stage's status ('done', 'resume', 'fresh') and fingerprint. `act=False` (a check
    only) deletes and writes nothing but the preflight report.
    """
    main = is_main_process()
    names = [s.name for s in recipe.stages]
    if main and act:
        for path in clean_interrupted_writes(recipe.output_dir, names):
            log(f"removed {path} (left by an interrupted write)")
    checks = preflight(recipe, log=log, progress=main and not quiet, report_dir=recipe.output_dir if main else None,
                       resume=resume)
    fingerprints = stage_fingerprints(recipe, {name: c.identity for name, c in checks.items()})
    plan = plan_stages(recipe, fingerprints, resume=resume, force=force, log=log, act=main and act)
    if main and act:
        write_text_atomic(os.path.join(recipe.output_dir, "recipe.yaml"),
                          yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        final = os.path.join(recipe.output_dir, "final")
        if os.path.isdir(final) and any(status != "done" for status in plan.values()):
            log(f"removing {final}: a stage is not done, so it is not this run's result")
            shutil.rmtree(final)
    return plan, fingerprints


def run_recipe(recipe: Recipe, resume: bool = True, log=print, callbacks=None, quiet: bool = False,
               force: bool = False) -> str:
    """Run every stage; returns the directory of the final student."""
    set_seed(recipe.seed)
    if not is_main_process():
        log = lambda *_: None  # noqa: E731 - one process speaks
    os.makedirs(recipe.output_dir, exist_ok=True)
    plan, fingerprints = prepare_run(recipe, resume=resume, force=force, log=log, quiet=quiet)
    student = load_model(recipe.student)
    # a cached teacher is never loaded: its signal is read from the cache
    teacher = load_model(recipe.teacher) if recipe.teacher is not None and not recipe.teacher.cache else None
    log(f"student: {recipe.student.describe()} ({sum(p.numel() for p in student.model.parameters()):,} params)")
    if teacher is not None:
        log(f"teacher: {recipe.teacher.describe()} ({sum(p.numel() for p in teacher.model.parameters()):,} params)")
    elif recipe.teacher is not None:
        log(f"teacher: the top-k cache {recipe.teacher.cache}")
    for stage in recipe.stages:
        student = run_stage(recipe, stage, student, teacher, fingerprints[stage.name], plan[stage.name], log=log,
                            callbacks=callbacks, quiet=quiet)
    final = os.path.join(recipe.output_dir, "final")
    if is_main_process():  # the last stage's student, as saved (gathered from every rank), and its card
        publish_copy(os.path.join(recipe.output_dir, recipe.stages[-1].name, "model"), final)
        write_card(recipe, final, student, teacher)
    barrier()
    _say_skipped(recipe, log)
    log(f"final student: {final}")
    return final


def _say_skipped(recipe: Recipe, log) -> None:
    """What was left out, said once more at the end of the run."""
    for stage in recipe.stages:
        report = os.path.join(recipe.output_dir, stage.name, "data_report.json")
        try:
            with open(report, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        skipped = data.get("skipped", []) + data.get("replaced_at_load", [])
        if skipped:
            ids = ", ".join(str(s["sample_id"]) for s in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
            log(f"[{stage.name}] {len(skipped)} sample(s) skipped ({ids}); reasons in {report}")
        for step in data.get("nonfinite_steps_skipped", []):
            log(f"[{stage.name}] skipped {step['what']}")
