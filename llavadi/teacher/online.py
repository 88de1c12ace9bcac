"""The online teacher: a frozen LLaVA model run next to the student, in eval mode, without gradients."""

from __future__ import annotations

import torch
import torch.nn as nn

from llavadi.distill.view import ModelView, Needs, llava_view, model_inputs


class OnlineTeacher:
    """A frozen teacher model giving ModelViews of collated batches (only what the terms read).

    When the teacher's image layout differs from the student's, the collator carries the
    teacher's own tokens and pixels under `prefix` (e.g. ``teacher_input_ids``).
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, prefix: str = "") -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.prefix = prefix
        self.lm_head: nn.Module | None = None  # set when the model's own head is partitioned (ZeRO-3): a full copy
        model.to(self.device)
        model.eval()
        model.requires_grad_(False)

    def view(self, batch: dict, needs: Needs) -> ModelView:
        """The teacher's view of one collated batch."""
        prefix = self.prefix if self.prefix + "input_ids" in batch else ""
        inputs = {k: v.to(self.device) for k, v in model_inputs(batch, prefix).items()}
        token_types = batch[prefix + "token_types"].to(self.device)
        with torch.no_grad():
            view = llava_view(self.model, inputs, token_types, needs, who="teacher")
        if self.lm_head is not None:
            view.lm_head = self.lm_head
        return view
