"""The trainable module: the student LLaVA and the distillation terms' projectors as one nn.Module.

``DistillationModule`` is what the Trainer (and DDP, FSDP, DeepSpeed under it) treats as the
model: every trainable parameter is inside it, so gradients are reduced, clipped and stepped by
the engine, with no gradient code of ours. Its ``forward`` runs the student once (base model,
only what the terms read) and the objective; the teacher's view is passed in, computed outside.

On disk the student stays a plain HF LLaVA directory; the projectors are written beside it in
``distill_projectors.safetensors`` (keys of the objective's state dict, e.g. ``terms.1.projectors.0.0.weight``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from llavadi.distill.cross_vocab import PairedGroups
from llavadi.distill.objective import DistillObjective
from llavadi.distill.view import ModelView, base_llava, llava_view, model_inputs
from llavadi.models.families import family_of

Tensor = torch.Tensor
PROJECTOR_FILE = "distill_projectors.safetensors"
STUDENT_PREFIX = "student."
OBJECTIVE_PREFIX = "objective."


class DistillationModule(nn.Module):
    """Student + distillation projectors; forward(batch, teacher_view, normalizers) -> (loss, logged terms)."""

    def __init__(self, student: nn.Module, objective: DistillObjective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    @property
    def config(self):
        """The student's config (the Trainer reads and sets `use_cache` on it)."""
        return self.student.config

    def forward(self, batch: dict, teacher: ModelView | None = None,
                normalizers: dict | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective's loss on one micro-batch and each term's value."""
        view = llava_view(self.student, model_inputs(batch), batch["token_types"], self.objective.student_needs,
                          who="student")
        if teacher is not None:  # answer spans paired with a teacher of another tokenizer (None: one tokenization)
            teacher.alignment = PairedGroups.from_batch(batch)
        loss, logged = self.objective(view, teacher, batch["labels"], normalizers)
        if "pixel_values" not in batch and dist.is_available() and dist.is_initialized():
            loss = loss + self._touch_image_path()
        return loss, logged

    def _touch_image_path(self) -> Tensor:
        """0 * the image path run on one blank image: puts its trainable weights in this rank's graph.

        A micro-batch without images never runs the vision tower / multimodal projector; DDP
        (find_unused_parameters=False) would then all-reduce their gradient bucket on the ranks that had
        images but not on this one, a collective mismatch that aborts gloo. A zero gradient from a real
        forward (not a read of the weights, which sharding engines gather only around a module's own
        forward) makes every rank reduce the same buckets.
        """
        llava = base_llava(self.student)
        core, config = llava.model, llava.config
        family = family_of(config)
        parts = family.parts(llava)
        trainable = [p for m in (parts.vision, parts.projector) for p in m.parameters() if p.requires_grad]
        if not trainable:
            return torch.zeros((), device=llava.device)
        blank = family.blank_image_inputs(config, llava.device, llava.dtype)
        features = core.get_image_features(**blank, **family.image_feature_kwargs(config))
        return torch.stack([f.float().sum() for f in features.pooler_output]).sum() * 0.0

    # ---- the Trainer's activation-checkpointing switches act on the student (a PeftModel's adapted LLaVA)
    def activation_checkpointing_enable(self, **kwargs):
        """Activation checkpointing on the student."""
        return base_llava(self.student).activation_checkpointing_enable(**kwargs)

    def gradient_checkpointing_enable(self, **kwargs):
        """Activation checkpointing on the student (older name)."""
        return base_llava(self.student).gradient_checkpointing_enable(**kwargs)

    def student_state(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The student's part of a (possibly gathered) state dict of this module."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k[len(STUDENT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STUDENT_PREFIX)}

    def projector_state(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The projectors' part (the objective's state dict) of a state dict of this module."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k[len(OBJECTIVE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(OBJECTIVE_PREFIX)}


def save_projectors(state: dict[str, Tensor], directory: str | os.PathLike, labels: list[str]) -> str | None:
    """Write projector weights to <directory>/distill_projectors.safetensors atomically; None if there are none."""
    from safetensors.torch import save_file

    if not state:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PROJECTOR_FILE)
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata={"terms": ",".join(labels)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_projectors(objective: DistillObjective, directory: str | os.PathLike) -> DistillObjective:
    """Load projector weights saved by save_projectors into an objective built from the same recipe."""
    from safetensors.torch import load_file

    expected = set(objective.state_dict())
    path = os.path.join(directory, PROJECTOR_FILE)
    if not expected:
        return objective
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: no distillation projectors were saved in {directory}")
    state = load_file(path)
    if set(state) != expected:
        raise ValueError(
            f"{path} does not match this recipe's projectors: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    device = next(objective.parameters()).device
    objective.load_state_dict({k: v.to(device) for k, v in state.items()})
    return objective
