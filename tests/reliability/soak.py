"""Fault soak: 2-process runs SIGKILLed at random moments, restarted with the same command, end bit-identical.

    python tests/reliability/soak.py [--kills 10] [--engines ddp,zero2] [--work DIR] [--seed 0]

For each engine (DDP with gloo, DeepSpeed ZeRO-2), a two-stage recipe of the tiny presets (a projector
stage on captions, then an instruction stage with forward KL + last-hidden MSE; constant learning rate,
a checkpoint every 2 steps) is trained once without interruption under `torchrun --nproc_per_node 2`.
Then the same command is started again and again in a fresh output folder, and the whole process tree
(launcher and both workers) is frozen and SIGKILLed at a moment chosen by turns:
  random      a uniformly random time in the uninterrupted run's duration
  checkpoint  when a checkpoint-N folder exists without its completion marker (a save under way): the 1st to
              4th such save the attempt starts, drawn at random
  publish     when a stage's staging folder or a final/ in the making exists (a stage being published): the
              1st to 3rd such write, drawn at random
A run that completes ends its series: its final student, each stage's projectors and data_report.json
must equal the uninterrupted run's bit for bit; a new series starts until `--kills` kills landed.
Prints kills survived (by kind), restarts, and time lost (wall time of all attempts minus the
uninterrupted run's time per series). Not part of the test suite: `make soak`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KINDS = ("random", "checkpoint", "publish")
PRETRAIN_STEPS, FINETUNE_STEPS, SAVE_STEPS = 4, 8, 2
STAGING = (".publish-staging", ".tmp-save-")


def make_inputs(root: Path) -> Path:
    """The synthetic task (small) under root/data."""
    from llavadi.data.synthetic import make_synthetic

    data = root / "data"
    if not (data / "meta.json").exists():
        make_synthetic(data, seed=0, n_caption=32, n_instruct=64, n_eval=0, overwrite=True)
    return data


def recipe(data: Path, out: Path, engine: str) -> dict:
    """Two stages of the tiny presets; two distillation terms; constant learning rate."""
    train = {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "lr_scheduler_type": "constant",
             "warmup_steps": 0.0, "weight_decay": 0.0, "logging_steps": 1, "save_steps": SAVE_STEPS,
             "max_grad_norm": 1.0}
    if engine == "ddp":
        train["ddp_backend"] = "gloo"
    elif engine == "zero2":
        train["deepspeed"] = str(REPO / "configs" / "zero2.json")
    else:
        raise SystemExit(f"unknown engine {engine!r}; choose ddp or zero2")
    return {
        "student": {"preset": "tiny-student"}, "teacher": {"preset": "tiny-teacher"},
        "output_dir": str(out), "device": "cpu", "seed": 0,
        "data": {"image_folder": str(data / "images"), "template": "vicuna_v1", "system": "", "max_length": 128},
        "stages": [
            {"name": "pretrain", "data": {"path": str(data / "captions.json"), "template": "plain"},
             "trainable": {"projector": True, "llm": False}, "train": {**train, "max_steps": PRETRAIN_STEPS}},
            {"name": "finetune", "data": {"path": str(data / "instruct.json")},
             "distill": {"terms": [{"name": "forward_kl"}, {"name": "hidden_mse"}]},
             "train": {**train, "max_steps": FINETUNE_STEPS}},
        ],
    }


def environment() -> dict:
    """One thread per process (two processes on two cores); the DeepSpeed op built once into the venv."""
    return dict(os.environ, OMP_NUM_THREADS="1", LLAVADI_THREADS="1", TOKENIZERS_PARALLELISM="false",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                    os.path.join(sys.prefix, "torch_extensions")),
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def command(recipe_path: Path) -> list[str]:
    """The training command: 2 processes under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(random.Random(str(recipe_path)).randint(20000, 40000)),
            "-m", "llavadi", "train", str(recipe_path), "--quiet"]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def kill_tree(pid: int) -> int:
    """Freeze the whole tree, then SIGKILL every process of it; returns how many were killed."""
    tree = descendants(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
    return len(tree)


def unfinished_checkpoints(out: Path) -> set[str]:
    """Checkpoint folders without their completion marker (a save under way, or left by a kill)."""
    found = set()
    for stage in ("pretrain", "finetune"):
        folder = out / stage / "checkpoints"
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found |= {str(folder / n) for n in names
                  if n.startswith("checkpoint-") and not (folder / n / "llavadi_checkpoint.json").exists()}
    return found


def publish_folders(out: Path) -> set[str]:
    """Staging and temporary folders of a stage's outputs or final/ (a publish under way, or left by a kill)."""
    found = set()
    for folder in (out, out / "pretrain", out / "finetune"):
        try:
            found |= {str(folder / n) for n in os.listdir(folder) if n.startswith(STAGING)}
        except OSError:
            continue
    return found


class Trigger:
    """When to kill: a kind; for a write, the n-th new one seen (leftovers of the previous attempt, removed at
    start, are not new writes)."""

    def __init__(self, kind: str | None, out: Path, deadline: float, nth: int = 1):
        self.kind, self.out, self.deadline, self.nth = kind, out, deadline, nth
        self.stale = self._seen()
        self.new: set[str] = set()

    def _seen(self) -> set[str]:
        if self.kind == "checkpoint":
            return unfinished_checkpoints(self.out)
        if self.kind == "publish":
            return publish_folders(self.out)
        return set()

    def fires(self, elapsed: float) -> str | None:
        """What makes the kill due now (a time, or the folder being written), else None."""
        if self.kind == "random":
            return f"at {elapsed:.1f} s" if elapsed >= self.deadline else None
        if self.kind is None:
            return None
        seen = self._seen()
        self.stale &= seen  # a leftover removed and written again is a new write
        now = seen - self.stale
        self.new |= now
        if now and len(self.new) >= self.nth:
            return f"while writing {os.path.relpath(sorted(now)[0], self.out)}"
        return None


def attempt(cmd: list[str], out: Path, kind: str | None, deadline: float, log_path: Path,
            nth: int = 1) -> tuple[str, float]:
    """Run the command once; kill it when `kind` triggers (a write: at the `nth` new one). Returns (what
    happened, seconds)."""
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n=== attempt, kill: {kind}\n")
        log.flush()
        trigger = Trigger(kind, out, deadline, nth)
        proc = subprocess.Popen(cmd, env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            now = time.monotonic() - start
            why = trigger.fires(now)
            if why:
                n = kill_tree(proc.pid)
                proc.wait()
                log.write(f"\n=== SIGKILL to {n} processes {why}\n")
                return f"killed {why}", time.monotonic() - start
            if now > 1800:
                kill_tree(proc.pid)
                proc.wait()
                raise SystemExit(f"an attempt ran for 30 minutes; see {log_path}")
            time.sleep(0.002)
    return ("completed" if proc.returncode == 0 else f"exit {proc.returncode}"), time.monotonic() - start


def compare(reference: Path, out: Path) -> list[str]:
    """What differs between two runs' final student, projectors and data reports (empty: bit-identical)."""
    from safetensors.torch import load_file

    def same_tensors(a: Path, b: Path) -> bool:
        ta, tb = load_file(str(a)), load_file(str(b))
        return set(ta) == set(tb) and all(ta[k].dtype == tb[k].dtype and ta[k].equal(tb[k]) for k in ta)

    problems = []
    pairs = [("final/model.safetensors", same_tensors)]
    for stage in ("pretrain", "finetune"):
        pairs.append((f"{stage}/distill_projectors.safetensors", same_tensors))
        pairs.append((f"{stage}/data_report.json",
                      lambda a, b: json.loads(a.read_text()) == json.loads(b.read_text())))
    for name, same in pairs:
        a, b = reference / name, out / name
        if not a.exists() and not b.exists():
            continue
        if not b.exists() or not a.exists() or not same(a, b):
            problems.append(name)
    return problems


def soak(engine: str, root: Path, data: Path, kills: int, rng: random.Random) -> dict:
    """The uninterrupted run, then killed series until `kills` kills landed; the figures."""
    work = root / engine
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reference = work / "reference"
    (work / "reference.json").write_text(json.dumps(recipe(data, reference, engine)))
    outcome, straight = attempt(command(work / "reference.json"), reference, None, 0, work / "reference.log")
    if outcome != "completed" and not (reference / "final" / "model.safetensors").exists():
        raise SystemExit(f"[{engine}] the uninterrupted run failed ({outcome}); see {work / 'reference.log'}")
    print(f"[{engine}] uninterrupted run: {straight:.1f} s", flush=True)
    figures = {"engine": engine, "uninterrupted_s": round(straight, 1), "kills": {k: 0 for k in KINDS},
               "restarts": 0, "series": 0, "other_exits": 0, "attempts_s": 0.0, "mismatches": []}
    turn = 0
    while sum(figures["kills"].values()) < kills:
        figures["series"] += 1
        out = work / f"series{figures['series']}"
        path = work / f"series{figures['series']}.json"
        path.write_text(json.dumps(recipe(data, out, engine)))
        while True:
            kind = KINDS[turn % len(KINDS)] if sum(figures["kills"].values()) < kills else None
            # checkpoints: 2 in the pretrain stage, 4 in finetune; publishes: the 2 stages and final/
            nth = rng.randint(1, 4) if kind == "checkpoint" else rng.randint(1, 3)
            outcome, seconds = attempt(command(path), out, kind, rng.uniform(0.5, straight), work / f"{out.name}.log",
                                       nth)
            figures["attempts_s"] += seconds
            print(f"[{engine}] series {figures['series']}: kill={kind} -> {outcome} after {seconds:.1f} s", flush=True)
            if outcome.startswith("killed"):
                figures["kills"][kind] += 1
                figures["restarts"] += 1
                turn += 1
                continue
            if outcome != "completed":  # e.g. gloo's rare abort at exit: the same command again
                figures["other_exits"] += 1
                figures["restarts"] += 1
                if figures["other_exits"] > 5:
                    raise SystemExit(f"[{engine}] too many failed attempts; see {work / (out.name + '.log')}")
                continue
            break  # a run that finished before its kill came: the kind is tried again in the next series
        differs = compare(reference, out)
        figures["mismatches"] += [f"series{figures['series']}: {d}" for d in differs]
        print(f"[{engine}] series {figures['series']} completed: "
              + ("bit-identical to the uninterrupted run" if not differs else f"DIFFERS in {differs}"), flush=True)
    figures["time_lost_s"] = round(figures["attempts_s"] - figures["series"] * straight, 1)
    figures["attempts_s"] = round(figures["attempts_s"], 1)
    return figures


def main(argv=None) -> int:
    """Run the soak for each engine; print the figures; exit 1 when a result differs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10, help="kills per engine (default 10)")
    p.add_argument("--engines", default="ddp,zero2")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    root = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="llavadi-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    data = make_inputs(root)
    rng = random.Random(a.seed)
    results = [soak(engine, root, data, a.kills, rng) for engine in a.engines.split(",")]
    for r in results:
        print(f"{r['engine']}: {sum(r['kills'].values())} kills survived ({', '.join(f'{k} {v}' for k, v in r['kills'].items())}), "
              f"{r['restarts']} restarts in {r['series']} series, uninterrupted {r['uninterrupted_s']} s, "
              f"all attempts {r['attempts_s']} s, time lost {r['time_lost_s']} s, "
              + ("every series bit-identical" if not r["mismatches"] else f"MISMATCHES {r['mismatches']}"))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    if not a.work:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(r["mismatches"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
