"""Run the `llavadi` command with a real SIGKILL at one named point: no cleanup code runs.

    python fault_driver.py FAULT AT llavadi-args...

FAULT (AT counts from 1 unless said otherwise):
  forward            during the AT-th forward pass of the trainable module (mid-step)
  after_checkpoint   right after checkpoint-AT is complete (marker written)
  inside_checkpoint  while checkpoint-AT is written: model saved, optimiser and marker not yet
  before_publish     after the last step's checkpoint of stage AT (0-based), before its outputs
  publish_rename     at the AT-th rename of a stage's outputs into place (model/ may be there, not the rest)
  done_marker        outputs in place, completion marker not yet written
  final_save         before final/ is renamed into place
  generate           before the AT-th generation batch (eval, regenerate)
"""

from __future__ import annotations

import os
import signal
import sys

FAULT, AT = sys.argv[1], int(sys.argv[2])
ARGS = sys.argv[3:]
calls = {"n": 0}


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def counted(fn, predicate=lambda *a, **k: True):
    """`fn` that dies at its AT-th call for which `predicate` holds."""
    def wrapper(*args, **kwargs):
        if predicate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == AT:
                die()
        return fn(*args, **kwargs)
    return wrapper


def install() -> None:
    import transformers

    import llavadi.eval.generate as generate
    import llavadi.train.runner as runner
    import llavadi.train.stages as stages
    from llavadi.distill.module import DistillationModule
    from llavadi.train.trainer import DistillTrainer

    if FAULT == "forward":
        DistillationModule.forward = counted(DistillationModule.forward)
    elif FAULT == "after_checkpoint":
        real = DistillTrainer._save_checkpoint

        def save_then_die(self, *a, **k):
            real(self, *a, **k)
            if self.state.global_step == AT:
                die()
        DistillTrainer._save_checkpoint = save_then_die
    elif FAULT == "inside_checkpoint":
        real = transformers.Trainer._save_optimizer_and_scheduler

        def die_inside(self, *a, **k):
            if self.state.global_step == AT:
                die()
            return real(self, *a, **k)
        transformers.Trainer._save_optimizer_and_scheduler = die_inside
    elif FAULT == "before_publish":
        stage_names = []
        real = runner._publish

        def die_before(stage_dir, *a, **k):
            stage_names.append(stage_dir)
            if len(stage_names) == AT + 1:
                die()
            return real(stage_dir, *a, **k)
        runner._publish = die_before
    elif FAULT == "publish_rename":  # renames out of the staging folder into the stage folder
        def into_stage(src, dst, *a, **k):
            return (os.path.basename(os.path.dirname(str(src))) == stages.STAGING_DIR
                    and os.path.basename(os.path.dirname(str(dst))) != stages.STAGING_DIR)
        os.replace = counted(os.replace, into_stage)
    elif FAULT == "done_marker":
        stages.write_json_atomic = counted(stages.write_json_atomic,
                                           lambda path, *a, **k: str(path).endswith("done.json"))
    elif FAULT == "final_save":
        os.replace = counted(os.replace, lambda src, dst, *a, **k: str(dst).endswith(os.sep + "final"))
    elif FAULT == "generate":
        generate._generate_batch = counted(generate._generate_batch)
    else:
        raise SystemExit(f"unknown fault {FAULT!r}")


if __name__ == "__main__":
    install()
    from llavadi.cli import main

    sys.exit(main(ARGS))
