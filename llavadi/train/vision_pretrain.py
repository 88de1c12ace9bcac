"""Per-patch pretraining of the tiny vision tower on the synthetic task (seconds on a CPU).

A tiny CLIP tower trained from scratch inside LLaVA learns too slowly for a minutes-long demo:
the projector and LLM cannot read features spread over patches that do not yet exist. So the
tower is first trained alone: linear heads on the hidden layer LLaVA reads predict, for every
patch (one grid cell), the colour, shape and size of its object or "empty", and the cell's
index. The cell index matters: the LLM's rotary positions are relative, so "the shape in the
top left" is only a lookup if each image token's feature says which cell it is. This stands in
for the pretrained CLIP that real LLaVA teachers and students share.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from llavadi.data.synthetic import COLORS, SHAPES, SIZES, patch_labels


def load_patch_dataset(data_dir: str | os.PathLike, image_processor, prefixes=("cap_", "inst_"),
                       max_images: int | None = None):
    """(pixel_values, labels) of a synthetic set's images; labels (N, cells, 3) = colour, shape, size ids (0 = empty)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    scenes = json.loads((data_dir / "scenes.json").read_text())
    grid = meta["grid"]
    names = sorted(n for n in scenes if n.startswith(tuple(prefixes)))[:max_images]
    if not names:
        raise ValueError(f"{data_dir}: no images starting with {prefixes} in scenes.json")
    images = [Image.open(data_dir / "images" / n).convert("RGB") for n in names]
    pixel_values = torch.as_tensor(np.stack(image_processor(images=images, return_tensors="np")["pixel_values"]))
    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    labels = torch.zeros(len(names), grid * grid, 3, dtype=torch.long)
    for i, n in enumerate(names):
        for j, o in enumerate(patch_labels(scenes[n], grid)):
            if o is not None:
                labels[i, j] = torch.tensor([colors.index(o["color"]) + 1, shapes.index(o["shape"]) + 1,
                                             sizes.index(o["size"]) + 1])
    return pixel_values, labels


class PatchHeads(nn.Module):
    """Linear heads reading each patch feature: colour, shape, size (each with an "empty" class), cell."""

    def __init__(self, hidden_size: int, n_cells: int):
        super().__init__()
        sizes = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1, n_cells)
        self.heads = nn.ModuleList(nn.Linear(hidden_size, n) for n in sizes)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [h(features) for h in self.heads]


def _with_cell_ids(labels: torch.Tensor) -> torch.Tensor:
    """Append each patch's own cell index as a 4th label."""
    cells = torch.arange(labels.shape[1], device=labels.device).expand(labels.shape[0], -1)
    return torch.cat([labels, cells[..., None]], dim=-1)


def patch_features(vision_model: nn.Module, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """The patch features LLaVA reads ("default" strategy: CLS dropped)."""
    out = vision_model(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[feature_layer][:, 1:]


def patch_accuracy(vision_model, heads, pixel_values, labels, feature_layer, batch_size=256) -> float:
    """Fraction of patches whose colour, shape, size and cell are all predicted right."""
    correct = total = 0
    with torch.no_grad():
        for s in range(0, len(pixel_values), batch_size):
            feats = patch_features(vision_model, pixel_values[s:s + batch_size], feature_layer)
            preds = torch.stack([lg.argmax(-1) for lg in heads(feats.float())], dim=-1)
            y = _with_cell_ids(labels[s:s + batch_size].to(preds.device))
            correct += (preds == y).all(-1).sum().item()
            total += preds.shape[0] * preds.shape[1]
    return correct / total


def pretrain_vision_tower(vision_model: nn.Module, data_dir: str | os.PathLike, image_processor,
                          steps: int = 150, lr: float = 3e-3, seed: int = 0, batch_size: int = 64,
                          feature_layer: int = -1, max_images: int | None = 2000,
                          holdout_fraction: float = 0.1, position_lr_scale: float = 10.0) -> tuple[dict, float]:
    """Train the tower's patch features in place; return its state_dict and held-out patch accuracy."""
    torch.manual_seed(seed)
    pixel_values, labels = load_patch_dataset(data_dir, image_processor, max_images=max_images)
    n_hold = max(1, int(len(pixel_values) * holdout_fraction))
    order = torch.randperm(len(pixel_values), generator=torch.Generator().manual_seed(seed))
    hold, train = order[:n_hold], order[n_hold:]
    device = next(vision_model.parameters()).device
    dtype = next(vision_model.parameters()).dtype
    heads = PatchHeads(vision_model.config.hidden_size, labels.shape[1]).to(device)
    # the position embedding starts ~50x smaller than the patch content: a larger lr lets the
    # features learn which cell they are in within the same few hundred steps
    pos = [p for n, p in vision_model.named_parameters() if "position_embedding" in n and p.requires_grad]
    rest = [p for n, p in vision_model.named_parameters() if "position_embedding" not in n and p.requires_grad]
    opt = torch.optim.AdamW([{"params": rest + list(heads.parameters()), "lr": lr},
                             {"params": pos, "lr": lr * position_lr_scale}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    rng = random.Random(seed)
    vision_model.train()
    for _ in range(steps):
        idx = train[torch.tensor(rng.sample(range(len(train)), min(batch_size, len(train))))]
        feats = patch_features(vision_model, pixel_values[idx].to(device, dtype), feature_layer)
        y = _with_cell_ids(labels[idx].to(device))
        loss = sum(nn.functional.cross_entropy(lg.float().flatten(0, 1), y[..., k].flatten())
                   for k, lg in enumerate(heads(feats.float())))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vision_model.eval()
    acc = patch_accuracy(vision_model, heads, pixel_values[hold].to(device, dtype), labels[hold], feature_layer)
    state = {k: v.detach().clone() for k, v in vision_model.state_dict().items()}
    return state, acc
