"""DistillTrainer: transformers.Trainer whose model is the trainable DistillationModule.

The Trainer's model is ``DistillationModule`` (student + distillation projectors), so DDP, FSDP
and DeepSpeed own every trainable parameter: gradients are reduced, clipped (one norm over
student and projectors) and stepped by the engine. The teacher's signal (``teacher``: an object
with ``view(batch, needs)``: ``llavadi.teacher.online.OnlineTeacher`` or the offline
``llavadi.teacher.cache.CachedTeacher``) is computed outside the trainable module and passed to
its forward. ``on_policy`` (``llavadi.teacher.on_policy.OnPolicySampler``) replaces some samples
of each step by the student's own answers before the positions are counted; every log line then
carries `on_policy/share`, `on_policy/tokens_per_answer` and `on_policy/generation_seconds`.

Every term is a sum over positions divided by the number of such positions in the whole
optimisation step (all micro-batches of the accumulation window, all processes), counted in
``get_batch_samples``: accumulation and multi-process runs then give the gradients of one big batch.
Checkpoints hold the student as a plain HF directory (a LoRA student: its adapter) and the
projectors beside it; resume loads both (``_load_from_checkpoint``; DeepSpeed and FSDP resume from
their own checkpoint files). A checkpoint is marked complete (``llavadi.train.checkpoints``) after
everything in it is written. ``StepGuard`` (``llavadi.train.guard``) stops the run at a non-finite
step (or skips up to ``max_nonfinite_skips`` of them) and keeps the stage's totals. The stage's
student is written from the engine's gathered state (``gather_student_state`` on every rank, then
``write_student``; llavadi.train.engines), whatever the engine shards.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llavadi.distill.module import DistillationModule, load_projectors, save_projectors
from llavadi.distill.selection import all_reduce_counts, sum_counts
from llavadi.distributed import sum_over_processes
from llavadi.models.build import LoadedModel, save_model
from llavadi.models.lora import is_peft_model, load_adapter, merged_llava, save_adapter
from llavadi.models.meta import write_model_meta
from llavadi.train.checkpoints import read_checkpoint_marker, remove_checkpoint_marker, write_checkpoint_marker
from llavadi.train.engines import (
    engine_started,
    gathered_state_dict,
    register_student_head,
    shard_teacher,
    world_size,
    zero3_init_paused,
)
from llavadi.train.guard import StepGuard


class DistillTrainer(Trainer):
    """Trainer whose loss is the DistillationModule's objective against a frozen teacher's signal."""

    # our loss is already normalised over the accumulation window
    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher=None, meta: dict | None = None, max_nonfinite_skips: int = 0, on_policy=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, DistillationModule):
            raise TypeError(f"DistillTrainer trains a DistillationModule, got {type(self.model).__name__}")
        self.objective = self.model.objective
        register_student_head(self)
        if teacher is not None and getattr(teacher, "model", None) is not None:  # an online teacher: shard it like the student
            teacher.model, head = shard_teacher(self, teacher.model)
            if head is not None:
                teacher.lm_head = head
        self.teacher = teacher
        self.on_policy = on_policy  # llavadi.teacher.on_policy.OnPolicySampler: student answers replace some samples
        self._on_policy_logged = dict(on_policy.stats) if on_policy is not None else {}
        self.meta = meta or {}
        self._normalizers: dict | None = None
        self._term_sums: dict[str, torch.Tensor | float] = {}
        self._term_count = 0
        # a NaN loss is logged as NaN, never replaced by the mean of earlier losses
        self.args.logging_nan_inf_filter = False
        self.guard = StepGuard(self, max_nonfinite_skips)
        self.add_callback(self.guard)

    # -- global normalisers
    def _count(self, batch) -> dict:
        return self.objective.count_positions(batch["token_types"], batch["labels"])

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        self.guard.start_window()
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.on_policy is not None:  # before counting: the sampled answers are the positions the terms read
            batch_samples = self.on_policy(batch_samples, self.state.global_step)
        self._normalizers = all_reduce_counts(sum_counts([self._count(b) for b in batch_samples]))
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = None
        if self.teacher is not None and self.objective.needs_teacher:
            teacher = self.teacher.view(inputs, self.objective.teacher_needs)
        training = model.training and self._normalizers is not None
        normalizers = self._normalizers if training else self._count(inputs)
        loss, terms = model(inputs, teacher, normalizers)
        if training:
            # DDP averages gradients over processes; our loss is already a global-batch mean
            loss = loss * world_size()
        if model.training:
            for k, v in terms.items():  # tensors: no device sync per step, only at logging
                self._term_sums[k] = self._term_sums.get(k, 0.0) + v.detach()
            self._term_count += 1
            self.guard.record(loss, terms, inputs)
        return (loss, None) if return_outputs else loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self.guard.grad_norm = grad_norm  # checked by the guard before the optimiser step
        return grad_norm

    def log(self, logs: dict, *args, **kwargs):
        self.guard.adjust_log(logs, self.state.global_step)
        if "loss" in logs and (self._term_count or self.on_policy is not None):
            logs.update(self._since_last_log())
        super().log(logs, *args, **kwargs)

    def _since_last_log(self) -> dict:
        """Per-term losses and, in an on-policy stage, what the student generated, since the last log line,
        summed over processes in one all-reduce (every process logs at the same step).

        Term values are each process's share of the step's global mean, per micro-batch: summed over the
        accumulation window and the processes, averaged over the logged steps. On-policy: the share of
        samples the student answered itself, the tokens per sampled answer, the generation seconds (mean
        per process)."""
        values = {("loss", k): v for k, v in self._term_sums.items()} if self._term_count else {}
        if self.on_policy is not None:
            now = dict(self.on_policy.stats)
            values.update({("on_policy", k): now[k] - self._on_policy_logged.get(k, 0) for k in now})
            self._on_policy_logged = now
        total = sum_over_processes(values)
        steps = max(1, self._term_count / self.args.gradient_accumulation_steps)
        logs = {f"loss/{k}": round(v / steps, 6) for (kind, k), v in total.items() if kind == "loss"}
        self._term_sums.clear()
        self._term_count = 0
        if self.on_policy is not None:
            made = {k: v for (kind, k), v in total.items() if kind == "on_policy"}
            logs.update({"on_policy/share": round(made["on_policy"] / max(made["samples"], 1), 4),
                         "on_policy/tokens_per_answer": round(made["generated_tokens"] / max(made["on_policy"], 1), 2),
                         "on_policy/generation_seconds": round(made["seconds"] / world_size(), 3)})
            if "not_text" in made:  # a teacher of another tokenizer: answers it could not read back
                logs["on_policy/not_text"] = int(made["not_text"])
        return logs

    # -- the stage's totals across resumes, kept in each checkpoint's completion marker
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer.train, carrying the stage's totals over from the checkpoint it resumes."""
        if isinstance(resume_from_checkpoint, str):
            self.guard.restore(read_checkpoint_marker(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def stage_ledger(self, after_train: bool = True) -> dict:
        """The stage's totals (loss sum, skipped steps, replaced samples); call on every process."""
        if after_train:  # _finalize_training has added the last, unlogged losses
            this_run = self._total_loss_scalar
        else:
            pending = nested_gather(self._tr_loss, self.args.parallel_mode).mean().item()
            this_run = self._total_loss_scalar + pending
        return self.guard.ledger(this_run, self.state.global_step)

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        ledger = self.stage_ledger(after_train=False)  # collective: every process is here
        if self.args.should_save:
            remove_checkpoint_marker(folder)
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            write_checkpoint_marker(folder, ledger)  # last: the folder is complete

    # -- saving: checkpoints (resume) and the stage's student (a plain HF directory)
    def _save(self, output_dir: str | None = None, state_dict=None):
        """A checkpoint: the student (a LoRA student's adapter), the projectors, the processor, llavadi.json."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        module = self.accelerator.unwrap_model(self.model)
        state_dict = module.state_dict() if state_dict is None else state_dict
        os.makedirs(output_dir, exist_ok=True)
        if is_peft_model(module.student):
            save_adapter(module.student, module.student_state(state_dict), output_dir)
        else:
            module.student.save_pretrained(output_dir, state_dict=module.student_state(state_dict))
        save_projectors(module.projector_state(state_dict), output_dir, self.objective.term_labels)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.meta:
            write_model_meta(output_dir, self.meta, module.student.config)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def gather_student_state(self) -> dict:
        """The trainable module's full state, gathered by the engine; a collective: every rank calls it."""
        return gathered_state_dict(self)

    def write_student(self, state: dict, model_dir: str, projector_dir: str, adapter_dir: str | None = None) -> None:
        """From a gathered state (rank 0): the student as a plain HF LLaVA directory (a LoRA adapter merged in)
        with tokenizer, processor and llavadi.json, the projectors, and with `adapter_dir` the LoRA adapter."""
        module = self.accelerator.unwrap_model(self.model)
        student_state = module.student_state(state)
        processor = self.processing_class
        if is_peft_model(module.student):
            with zero3_init_paused(self):  # rank 0 alone builds the merged model
                if adapter_dir is not None:
                    save_adapter(module.student, student_state, adapter_dir)
                plain, weights = merged_llava(module.student, student_state), None
        else:
            plain, weights = module.student, student_state
        save_model(LoadedModel(plain, processor.tokenizer, processor.image_processor, self.meta), model_dir,
                   state_dict=weights)
        save_projectors(module.projector_state(state), projector_dir, self.objective.term_labels)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if engine_started(self):  # DeepSpeed / FSDP, mid-training: the engine's own checkpoint files
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # one process, DDP, or an engine not started yet (a finished checkpoint published without
        # training): the module is whole; the checkpoint's student files hold the gathered weights
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        student = module.student
        if is_peft_model(student):  # the same adapter was rebuilt on the stage's starting student
            load_adapter(student, resume_from_checkpoint)
        else:
            # the checkpoint's student is a plain HF directory with the checkpoint key names: let
            # from_pretrained map them, then copy the weights in strictly
            with zero3_init_paused(self):  # a whole model, not one partitioned at construction
                saved = type(student).from_pretrained(resume_from_checkpoint, local_files_only=True, dtype=student.dtype)
            student.load_state_dict(saved.state_dict(), strict=True)
        load_projectors(module.objective, resume_from_checkpoint)
