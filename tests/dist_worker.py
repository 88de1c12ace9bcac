"""Run one recipe (a JSON file) through `llavadi train` in a torchrun / accelerate process; write what this
rank trained on. The CLI tears the process group down at the end, as for a user's run.

Used by tests/test_equivalence.py and tests/test_scale_out.py:
`torchrun --nproc_per_node 2 tests/dist_worker.py recipe.json report_dir`.
Each rank writes <report_dir>/rank<r>.json with the world size it saw (when training or saving a stage), the sample ids of every
micro-batch it trained on (so the test can check that the ranks split the data without overlap),
and how many teacher weights this rank owns against the teacher's total (a ZeRO-3 teacher is
partitioned: each rank owns about 1/world of it). With <report_dir>/probe.json ({"input_ids": [[...]], "image_size": S}), the trained
student's logits on those inputs (a blank image), computed just before the stage's student is
gathered for saving, are written to <report_dir>/rank<r>_logits.safetensors.
"""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)  # two processes share the cores: two threads each slowed a step 40x on 2 cores

import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llavadi import cli  # noqa: E402
from llavadi.train import trainer as trainer_module  # noqa: E402


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _teacher_weights(model) -> dict:
    """Weights this rank owns of the teacher (its ZeRO-3 partition, `ds_tensor`, when partitioned) and the total."""
    params = list(model.parameters())
    return {"local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "total": sum(getattr(p, "ds_numel", p.numel()) for p in params)}


def _record_probe_logits(report_dir: str) -> None:
    """Make DistillTrainer.gather_student_state first write the trained student's logits on the probe inputs."""
    with open(os.path.join(report_dir, "probe.json")) as f:
        probe = json.load(f)
    original = trainer_module.DistillTrainer.gather_student_state

    def gather_student_state(self, *args, **kwargs):
        student = self.accelerator.unwrap_model(self.model).student
        size, training = probe["image_size"], student.training
        student.eval()  # no dropout
        with torch.no_grad():
            logits = student(input_ids=torch.tensor(probe["input_ids"]),
                             pixel_values=torch.zeros(1, 3, size, size)).logits
        student.train(training)
        save_file({"logits": logits.float().contiguous()}, os.path.join(report_dir, f"rank{_rank()}_logits.safetensors"))
        return original(self, *args, **kwargs)

    trainer_module.DistillTrainer.gather_student_state = gather_student_state


def main(recipe_path: str, report_dir: str) -> None:
    """Train the recipe with `llavadi train`, then record what this rank saw."""
    seen: list[list[str]] = []
    facts: dict = {"world_size": 1, "teacher_weights": {}}
    original = trainer_module.DistillTrainer.compute_loss

    def recording_compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.append(list(inputs["sample_ids"]))
            facts["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
            if not facts["teacher_weights"] and getattr(self.teacher, "model", None) is not None:  # an online teacher
                facts["teacher_weights"] = _teacher_weights(self.teacher.model)
        return original(self, model, inputs, *args, **kwargs)

    trainer_module.DistillTrainer.compute_loss = recording_compute_loss
    original_gather = trainer_module.DistillTrainer.gather_student_state

    def recording_gather(self, *args, **kwargs):  # every rank, also when a stage is published without training
        facts["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        return original_gather(self, *args, **kwargs)

    trainer_module.DistillTrainer.gather_student_state = recording_gather
    if os.path.isfile(os.path.join(report_dir, "probe.json")):
        _record_probe_logits(report_dir)
    rank = _rank()
    code = cli.main(["train", recipe_path, "--quiet"])
    if code != 0:
        sys.exit(code)
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "micro_batches": seen, **facts}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
