"""FSDP2 by hand on CPU (the stock Trainer enables FSDP only on accelerators): shard the trainable module
as accelerate would (the wrap classes llavadi resolves, then the root), run the objective, save.

`torchrun --nproc_per_node 2 tests/fsdp2_worker.py workspace_dir out_dir`, with workspace_dir holding
student0/, teacher0/, imgs/ and data.json (tests/test_equivalence.py's workspace). Each rank trains
on its half of the 8 samples with the global normalisers; rank r writes out_dir/rank<r>.json with
its loss, and rank 0 writes out_dir/unsharded.json (the unsharded module on the whole batch) and
out_dir/grads.safetensors (sharded gradients gathered whole, and the unsharded module's) and
out_dir/unsharded_projectors.safetensors. The stage
save path (DistillTrainer.gather_student_state through accelerate's FSDP2 state-dict gathering, then
write_student) writes
out_dir/model and out_dir/distill_projectors.safetensors.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llavadi.data.collator import LlavaCollator  # noqa: E402
from llavadi.distill.module import DistillationModule  # noqa: E402
from llavadi.distill.selection import all_reduce_counts  # noqa: E402
from llavadi.models.build import llava_processor, load_model  # noqa: E402
from llavadi.recipe import recipe_from_dict  # noqa: E402
from llavadi.teacher.online import OnlineTeacher  # noqa: E402
from llavadi.train.engines import layer_classes_to_wrap, teardown_process_group  # noqa: E402
from llavadi.train.stage_inputs import TEACHER_PREFIX, build_dataset, build_objective  # noqa: E402
from llavadi.train.trainer import DistillTrainer  # noqa: E402

TERMS = [{"name": "forward_kl", "weight": 1.0}, {"name": "hidden_mse", "weight": 0.5}]


def _setup(root: str):
    recipe = recipe_from_dict({
        "student": {"path": f"{root}/student0"}, "teacher": {"path": f"{root}/teacher0"}, "device": "cpu",
        "data": {"image_folder": f"{root}/imgs", "template": "vicuna_v1", "system": ""},
        "stages": [{"name": "finetune", "data": {"path": f"{root}/data.json"}, "distill": {"terms": TERMS}}]})
    student, teacher = load_model(recipe.student), load_model(recipe.teacher)
    stage = recipe.stages[0]
    dataset = build_dataset(stage, student, teacher)
    torch.manual_seed(0)
    module = DistillationModule(student.model, build_objective(stage, student, teacher))
    batch = LlavaCollator(student.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    return module, OnlineTeacher(teacher.model, device="cpu", prefix=TEACHER_PREFIX), batch, student


def _loss(module, teacher, batch, normalizers):
    view = teacher.view(batch, module.objective.teacher_needs)
    return module(batch, view, normalizers)[0]


def _shard(module) -> None:
    """fully_shard the transformer blocks of the classes llavadi resolves, then the root (accelerate's order)."""
    from torch.distributed.fsdp import fully_shard

    names = set(layer_classes_to_wrap(module.student))
    for block in [m for m in module.modules() if type(m).__name__ in names]:
        fully_shard(block)
    fully_shard(module)


def main(root: str, out: str) -> None:
    """Loss and gradients sharded vs unsharded, then the stage save path on the sharded module."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module, teacher, batch, student = _setup(root)
    reference = copy.deepcopy(module)
    normalizers = module.objective.count_positions(batch["token_types"], batch["labels"])
    full_loss = _loss(reference, teacher, batch, normalizers)
    full_loss.backward()
    half = len(batch["sample_ids"]) // world
    mine = {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}  # one image per sample here
    counts = all_reduce_counts(module.objective.count_positions(mine["token_types"], mine["labels"]))
    _shard(module)
    loss = _loss(module, teacher, mine, counts)
    (loss * world).backward()  # FSDP averages gradients over ranks; the loss is a share of the global mean
    grads = {n: p.grad.full_tensor() for n, p in module.named_parameters() if p.grad is not None}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"loss": loss.item(), "sharded": type(module.student.lm_head.weight).__name__}, f)
    if rank == 0:
        with open(os.path.join(out, "unsharded.json"), "w") as f:
            json.dump({"loss": full_loss.item()}, f)
        ref = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        save_file({**{f"sharded/{n}": g.contiguous() for n, g in grads.items()},
                   **{f"unsharded/{n}": g.contiguous() for n, g in ref.items()}}, os.path.join(out, "grads.safetensors"))
        save_file({k: v.contiguous() for k, v in reference.projector_state().items()},
                  os.path.join(out, "unsharded_projectors.safetensors"))
    _save(module, student, out, rank)
    teardown_process_group()


def _save(module, student, out: str, rank: int) -> None:
    """The stage save path (DistillTrainer.gather_student_state, write_student) on the sharded module, gathering
    through accelerate's FSDP2 path."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, unwrap_model=lambda m: m)
    accelerator.get_state_dict = lambda model: Accelerator.get_state_dict(accelerator, model)
    trainer = SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=True, model=module, accelerator=accelerator,
                              args=SimpleNamespace(should_save=rank == 0), processing_class=llava_processor(student),
                              meta={"stage": "finetune"}, objective=module.objective)
    state = DistillTrainer.gather_student_state(trainer)  # every rank
    if rank == 0:
        DistillTrainer.write_student(trainer, state, os.path.join(out, "model"), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
