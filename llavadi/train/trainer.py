"""DistillTrainer: transformers.Trainer with a frozen teacher and a composed objective.

The student goes through its own (possibly DDP/FSDP-wrapped) forward with `logits_to_keep=1`,
so full B*T*V logits are never built there; the objective applies the LM head only at the
positions each term selects. Every term is a sum over positions divided by the number of such
positions in the whole optimisation step (all micro-batches of the accumulation window, all
processes), counted in `get_batch_samples`: accumulation and multi-process runs then give the
gradients of one big batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from llavadi.distill.objective import ModelView, all_reduce_counts, save_objective, sum_counts

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values")


def model_inputs(batch: dict, prefix: str = "") -> dict:
    """The tensors a LLaVA forward takes, from a collated batch (keys with `prefix`)."""
    return {k: batch[prefix + k] for k in MODEL_KEYS if prefix + k in batch}


def forward_view(model, batch: dict, prefix: str, hidden: bool, attentions: bool) -> ModelView:
    """Run a LLaVA model and package what the objective reads."""
    out = model(
        **model_inputs(batch, prefix),
        output_hidden_states=True,
        output_attentions=attentions,
        logits_to_keep=1,  # the LM head runs later, only at selected positions
        return_dict=True,
    )
    core = model.module if hasattr(model, "module") else model
    image_features = None
    if out.image_outputs is not None and out.image_outputs.pooler_output is not None:
        image_features = torch.stack(list(out.image_outputs.pooler_output))
    return ModelView(
        last_hidden=out.hidden_states[-1],  # the final norm's output: what lm_head reads
        lm_head=core.get_output_embeddings(),
        token_types=batch[prefix + "token_types"],
        hidden_states=out.hidden_states if hidden else None,
        attentions=out.attentions if attentions else None,
        image_features=image_features,
    )


def _touch_image_path(model) -> torch.Tensor:
    """0 * (sum of the trainable vision tower / projector weights): puts them in this rank's graph.

    A micro-batch without images never runs them; DDP (find_unused_parameters=False) would then
    all-reduce their gradient bucket on the ranks that had images but not on this one, a collective
    mismatch that aborts gloo. With a zero gradient here every rank reduces the same buckets.
    """
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and ("vision_tower" in name or "multi_modal_projector" in name)]
    if not params:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack([p.sum() for p in params]).sum() * 0.0


class _ObjectiveGrads(TrainerCallback):
    """The objective's own parameters (projectors) live outside the model the Trainer manages:
    average their grads across processes as DDP does for the model, clip them, and zero them
    after each optimiser step (the Trainer only zeroes the model's)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _params(self):
        return [p for p in self.trainer.objective.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = self._params()
        if not params:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for p in self._params():
            p.grad = None


class DistillTrainer(Trainer):
    """Trainer whose loss is `objective(student, teacher)`; the teacher is frozen, eval mode, no_grad."""

    # our loss is already normalised over the accumulation window
    loss_is_scaled_for_ga = True

    def __init__(self, *args, objective, teacher=None, teacher_prefix: str = "", teacher_device=None,
                 meta: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective.to(self.args.device)
        self.teacher = teacher
        self.teacher_prefix = teacher_prefix
        self.meta = meta or {}
        if teacher is not None:
            self.teacher_device = torch.device(teacher_device) if teacher_device else self.args.device
            teacher.to(self.teacher_device)
            teacher.eval()
            teacher.requires_grad_(False)
        self._normalizers: dict[str, float] | None = None
        self._term_sums: dict[str, torch.Tensor | float] = {}
        self._term_count = 0
        self.add_callback(_ObjectiveGrads(self))

    # -- optimiser: the objective's projectors train with the student
    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        extra = [p for p in self.objective.parameters() if p.requires_grad]
        known = {id(p) for g in opt.param_groups for p in g["params"]}
        extra = [p for p in extra if id(p) not in known]
        if extra:
            opt.add_param_group({"params": extra, "weight_decay": 0.0})
        return opt

    # -- global normalisers
    def _count(self, batch) -> dict[str, float]:
        return self.objective.count_positions(batch["token_types"], batch["labels"])

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._normalizers = all_reduce_counts(sum_counts([self._count(b) for b in batch_samples]))
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        obj = self.objective
        student = forward_view(model, inputs, "", obj.needs_hidden_states, obj.needs_attentions)
        teacher = None
        if self.teacher is not None and obj.needs_teacher:
            tin = {k: (v.to(self.teacher_device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
            prefix = self.teacher_prefix if self.teacher_prefix + "input_ids" in tin else ""
            with torch.no_grad():
                teacher = forward_view(self.teacher, tin, prefix, obj.needs_hidden_states, obj.needs_attentions)
        training = model.training and self._normalizers is not None
        normalizers = self._normalizers if training else self._count(inputs)
        loss, terms = obj(student, teacher, inputs["labels"], normalizers)
        if training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # DDP averages gradients over processes; our loss is already a global-batch mean
            loss = loss * dist.get_world_size()
            if "pixel_values" not in inputs:
                loss = loss + _touch_image_path(model)
        if model.training:
            for k, v in terms.items():  # tensors: no device sync per step, only at logging
                self._term_sums[k] = self._term_sums.get(k, 0.0) + v.detach()
            self._term_count += 1
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if self._term_count and "loss" in logs:
            # term values are per micro-batch shares of the step's mean: sum over the window
            steps = max(1, self._term_count / self.args.gradient_accumulation_steps)
            for k, v in self._term_sums.items():
                logs[f"loss/{k}"] = round(float(v) / steps, 6)
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, *args, **kwargs)

    # -- saving: plain HF student; projectors beside it; how to prompt it
    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_objective(self.objective, output_dir)
            if self.meta:
                import json

                with open(os.path.join(output_dir, "llavadi.json"), "w") as f:
                    json.dump(self.meta, f, indent=2)
