"""Forward-KL distillation loss from hidden states, forward + backward: llavadi's fused pass against TRL.

Variants (each in its own process, one thread; rounds interleaved: every variant once per round):
- ``trl_dense``: student logits by autograd, teacher logits without grad, TRL's
  ``GKDTrainer.generalized_jsd_loss(beta=0)`` (from the installed trl), backward;
- ``trl_chunked``: TRL 1.16's ``_chunked_divergence_loss(beta=0)`` from ``trl.trainer.distillation_trainer``
  (its CPU path: every position projected on 4096-token tiles);
- ``llavadi``: ``DistillObjective`` with one ``forward_kl`` term (ce_weight 0) at its default chunk size,
  or ``llavadi@<MiB>`` with ``chunk_mib`` set (``--sweep``), or ``llavadi_plain`` (the autograd reference).
All compute the same loss (sum over positions / N) and gradients for the student's hidden states and
LM-head weight; the first run of each variant is a warm-up whose loss and gradients are compared with
``trl_dense``'s. Time: median over rounds of the wall time and of the CPU time (one thread: the CPU
time does not count waiting for a core, so it is the steadier measure on a shared machine; ratios use
it); extra peak: peak RSS above the RSS before the step (VmHWM reset).

``--additions`` measures instead the same tokenizer up to additions against the identical case
(``llavadi``, one vocabulary of V tokens): ``additions`` is the llava-hf LLaVA-1.5 layout (the student
has V + 1 tokens, <image> at V; the teacher V + 2, <pad> at V + 1, its LM head padded to a multiple of
64 rows; the V + 1 shared tokens are a prefix on both sides, so no head is reordered), and
``additions_moved`` the same with the teacher's <pad> at id 3 (its shared rows are gathered in the
student's order once, and the copy kept across steps: the teacher is frozen), and
``additions_moved_regather`` the same with the copy made again at every step (as before the copy
was kept). Same hidden states and base weights; the extra rows are random.

``--baseline DIR`` adds ``baseline``: the ``llavadi`` variant of another checkout DIR (its own copy of
this script and its own package), measured side by side with this checkout's (before/after a change).

Usage: python benchmarks/kd_loss.py [--positions 1024 4096] [--rounds 3] [--sweep 8 16 32 64] [--baseline DIR]
       python benchmarks/kd_loss.py --additions [--vocab 32000] [--positions 4096]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

from llavadi.process_memory import reset_peak_rss, status_kib  # noqa: E402 (after the path above)


class Problem:
    """The inputs of every variant, from one seed: hidden states (N, H) of both models and their LM heads."""

    def __init__(self, n: int, width: int, vocab: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.hidden_s = torch.randn(n, width, generator=g)
        self.hidden_t = torch.randn(n, width, generator=g)
        self.weight_s = torch.nn.Parameter(torch.randn(vocab, width, generator=g) * 0.02)
        self.weight_t = torch.randn(vocab, width, generator=g) * 0.02


def _step_fn(variant: str, p: Problem):
    """A function running one forward + backward; returns (loss, the gradient of the student's hidden states)."""
    import torch
    import torch.nn.functional as F

    n, width = p.hidden_s.shape
    if variant == "trl_dense":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        labels = torch.zeros(1, n, dtype=torch.long)  # every position counts

        def step():
            leaf = p.hidden_s.clone().requires_grad_(True)
            student_logits = F.linear(leaf, p.weight_s).unsqueeze(0)
            with torch.no_grad():
                teacher_logits = F.linear(p.hidden_t, p.weight_t).unsqueeze(0)
            loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=0.0)
            loss.backward()
            return loss, leaf.grad

        return step
    if variant == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(1, n, dtype=torch.long)

        def step():
            leaf = p.hidden_s.clone().requires_grad_(True)
            loss, _, _ = _chunked_divergence_loss(leaf.unsqueeze(0), p.hidden_t.unsqueeze(0), p.weight_s, p.weight_t,
                                                  mask, beta=0.0)
            loss.backward()
            return loss, leaf.grad

        return step
    return _llavadi_step(variant, p)


def _llavadi_step(variant: str, p: Problem):
    import torch
    import torch.nn as nn

    from llavadi.data.token_types import TokenType
    from llavadi.distill.objective import DistillObjective
    from llavadi.distill.terms import TermSpec
    from llavadi.distill.view import ModelView

    n, width = p.hidden_s.shape

    class Cfg:
        hidden_size = width

    kwargs = {}
    weight_s, weight_t = p.weight_s, p.weight_t
    if variant.startswith("additions"):
        weight_s, weight_t, kwargs["vocab"] = _additions(p, moved=variant.startswith("additions_moved"))
        if variant == "additions_moved_regather":  # the teacher's reordered rows gathered at every step
            object.__setattr__(kwargs["vocab"], "teacher_copy", _Regather())
    if variant.startswith("llavadi@"):
        kwargs["chunk_mib"] = float(variant.split("@")[1])
    elif variant == "llavadi_plain":
        kwargs["fused"] = False
    objective = DistillObjective([TermSpec("forward_kl")], ce_weight=0.0, teacher_config=Cfg(), **kwargs)
    head_s = nn.Linear(width, weight_s.shape[0], bias=False)
    head_t = nn.Linear(width, weight_t.shape[0], bias=False)
    head_s.weight = weight_s
    head_t.weight = nn.Parameter(weight_t, requires_grad=False)
    # n + 1 response tokens: the logit at position t predicts token t + 1, so positions 0..n-1 are read
    types = torch.full((1, n + 1), int(TokenType.RESPONSE))
    labels = torch.zeros(1, n + 1, dtype=torch.long)
    pad = torch.zeros(1, width)
    teacher = ModelView(token_types=types, last_hidden=torch.cat([p.hidden_t, pad]).unsqueeze(0), lm_head=head_t)
    hidden_s = torch.cat([p.hidden_s, pad]).unsqueeze(0)

    def step():
        leaf = hidden_s.clone().requires_grad_(True)  # one copy of the inputs, as in the other variants
        loss, _ = objective(ModelView(token_types=types, last_hidden=leaf, lm_head=head_s), teacher, labels)
        loss.backward()
        return loss, leaf.grad[0, :n]

    step.weights = (weight_s,)
    return step


class _Regather:
    """A teacher row copy that is never kept (the reordered rows gathered at every read)."""

    def rows(self, weight, bias, order):
        """weight[order], bias[order], gathered now."""
        return weight.index_select(0, order), None if bias is None else bias.index_select(0, order)


def _additions(p: Problem, moved: bool):
    """Student and teacher LM heads in the llava-hf layout around the problem's V base rows, and their vocabulary map."""
    import torch

    from llavadi.data.tokenizer_pair import ADDITIONS, TokenizerPair
    from llavadi.distill.vocab import SharedVocab

    vocab, width = p.weight_s.shape
    g = torch.Generator().manual_seed(1)
    rows_t = -(-(vocab + 2) // 64) * 64
    extra_t = torch.randn(rows_t - vocab, width, generator=g) * 0.02  # <image>, <pad>, padding
    weight_s = torch.nn.Parameter(torch.cat([p.weight_s.detach(), torch.randn(1, width, generator=g) * 0.02]))
    if moved:  # <pad> at id 3: the teacher's shared rows are 0..2, 4..V+1
        weight_t = torch.cat([p.weight_t[:3], extra_t[1:2], p.weight_t[3:], extra_t[:1], extra_t[2:]])
        teacher_ids = tuple(range(3)) + tuple(range(4, vocab + 2))
    else:
        weight_t = torch.cat([p.weight_t, extra_t])
        teacher_ids = tuple(range(vocab + 1))
    pair = TokenizerPair(ADDITIONS, teacher_ids, tuple(range(vocab + 1)), (("<pad>", 3 if moved else vocab + 1),), (),
                         (), vocab + 2, vocab + 1, rows_t, vocab + 1)
    return weight_s, weight_t, SharedVocab.from_pair(pair)


def worker(args: argparse.Namespace) -> None:
    """Serve `run` / `check DIR` commands from stdin for one variant; one JSON line per command."""
    import torch

    torch.set_num_threads(1)
    problem = Problem(args.n, args.hidden, args.vocab)
    step = _step_fn(args.variant, problem)
    for line in sys.stdin:
        command = line.split()
        for weight in getattr(step, "weights", (problem.weight_s,)):
            weight.grad = None
        before = status_kib("VmRSS")
        reset_peak_rss()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, grad_h = step()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        extra = (status_kib("VmHWM") - before) / 1024
        if command[0] == "check":
            grad_w = getattr(step, "weights", (problem.weight_s,))[0].grad[:args.vocab]  # the V base rows
            sample_w = grad_w.flatten()[::7].clone()  # every 7th entry of the weight gradient
            torch.save({"loss": loss.item(), "grad_h": grad_h, "grad_w": sample_w},
                       os.path.join(command[1], f"{args.variant}.pt"))
        del loss, grad_h
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "extra_peak_mib": extra}), flush=True)


class Worker:
    """A variant's process, kept alive across rounds."""

    def __init__(self, variant: str, n: int, args: argparse.Namespace) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1")
        script, worker_variant = os.path.abspath(__file__), variant
        if variant == "baseline":  # the other checkout's script imports its own package first
            script, worker_variant = os.path.join(os.path.abspath(args.baseline), "benchmarks", "kd_loss.py"), "llavadi"
            env.pop("PYTHONPATH", None)
        cmd = [sys.executable, script, "--worker", worker_variant, "--n", str(n),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: str) -> dict:
        """Run one step in the worker; its time and extra peak memory."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"variant {self.variant} failed (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        """End the worker."""
        self.proc.stdin.close()
        self.proc.wait()


def _agreement(tmp: str, variants: list[str], reference: str = "trl_dense") -> dict[str, float]:
    """Largest difference of loss / hidden gradient / sampled weight gradient from `reference`, relative to its max."""
    import torch

    ref = torch.load(os.path.join(tmp, f"{reference}.pt"))
    out = {}
    for v in variants:
        got = torch.load(os.path.join(tmp, f"{v}.pt"))
        out[v] = max(abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
                     float((got["grad_h"] - ref["grad_h"]).abs().max() / ref["grad_h"].abs().max()),
                     float((got["grad_w"] - ref["grad_w"]).abs().max() / ref["grad_w"].abs().max()))
    return out


def measure(n: int, variants: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Warm-up + check, then `rounds` interleaved rounds; per variant the median time and extra peak."""
    workers = [Worker(v, n, args) for v in variants]
    results: dict[str, dict] = {v: {"seconds": [], "cpu_seconds": [], "extra_peak_mib": []} for v in variants}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for w in workers:
                if w.variant == "baseline":  # it saves under its own variant name: into a folder of its own
                    os.makedirs(os.path.join(tmp, "baseline"))
                    w.ask(f"check {os.path.join(tmp, 'baseline')}")
                    os.replace(os.path.join(tmp, "baseline", "llavadi.pt"), os.path.join(tmp, "baseline.pt"))
                else:
                    w.ask(f"check {tmp}")
            agreement = _agreement(tmp, variants, "llavadi" if args.additions or args.no_trl else "trl_dense")
        for _ in range(args.rounds):
            for w in workers:
                r = w.ask("run")
                for key in r:
                    results[w.variant][key].append(r[key])
    finally:
        for w in workers:
            w.close()
    return {v: {"seconds": statistics.median(r["seconds"]), "cpu_seconds": statistics.median(r["cpu_seconds"]),
                "extra_peak_mib": statistics.median(r["extra_peak_mib"]),
                "max_extra_peak_mib": max(r["extra_peak_mib"]), "agreement": agreement[v]}
            for v, r in results.items()}


def main() -> None:
    """Measure every N and print one table with the ratios of this run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweep", type=float, nargs="*", default=[],
                        help="also llavadi with these chunk_mib values (the default is chosen from this)")
    parser.add_argument("--plain", action="store_true", help="also llavadi's plain autograd path")
    parser.add_argument("--baseline", help="also the llavadi variant of this other checkout (side by side)")
    parser.add_argument("--additions", action="store_true",
                        help="same tokenizer up to additions (llava-hf layout) against the identical vocabulary")
    parser.add_argument("--no-moved", action="store_true", help="--additions without the <pad>-moved variant")
    parser.add_argument("--no-trl", action="store_true",
                        help="only llavadi (and --baseline): ratios to the baseline instead of TRL")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    if args.additions:
        additions_table(args)
        return
    if args.no_trl:
        baseline_table(args)
        return
    if importlib.util.find_spec("trl") is None:  # every row is measured against TRL's dense loss
        sys.exit("benchmarks/kd_loss.py compares with TRL's loss functions, and trl is not installed: "
                 "pip install -e '.[bench]' (`make bench` installs it)")
    variants = ["trl_dense", "trl_chunked", "llavadi"] + [f"llavadi@{m:g}" for m in args.sweep]
    variants += ["llavadi_plain"] if args.plain else []
    variants += ["baseline"] if args.baseline else []
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc defaults (no MALLOC_* set)"
    print(f"forward KL from hidden states, forward + backward, H={args.hidden}, V={args.vocab}, fp32, 1 thread per "
          f"process, median of {args.rounds} interleaved rounds after a warm-up; allocator: {malloc}")
    print("| N | variant | wall (s) | CPU (s) | extra peak (MiB, median / max) | CPU / TRL dense | CPU / TRL chunked "
          "| peak / TRL chunked | max diff vs TRL dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.positions:
        res = measure(n, variants, args)
        dense, chunked = res["trl_dense"], res["trl_chunked"]
        for v in variants:
            r = res[v]
            print(f"| {n} | {v} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['extra_peak_mib']:.0f} / "
                  f"{r['max_extra_peak_mib']:.0f} | {r['cpu_seconds'] / dense['cpu_seconds']:.2f}x | "
                  f"{r['cpu_seconds'] / chunked['cpu_seconds']:.2f}x | "
                  f"{r['extra_peak_mib'] / chunked['extra_peak_mib']:.3f}x | {r['agreement']:.1e} |", flush=True)
        if args.baseline:
            print(f"N={n}: llavadi / baseline CPU {res['llavadi']['cpu_seconds'] / res['baseline']['cpu_seconds']:.3f}x, "
                  f"extra peak {res['llavadi']['extra_peak_mib'] / res['baseline']['extra_peak_mib']:.3f}x", flush=True)


def baseline_table(args: argparse.Namespace) -> None:
    """This checkout's llavadi against --baseline's, side by side (no TRL: less memory), as ratios."""
    if not args.baseline:
        raise SystemExit("--no-trl compares with --baseline DIR")
    variants = ["llavadi", "baseline"]
    print(f"forward KL from hidden states, forward + backward, H={args.hidden}, V={args.vocab}, fp32, 1 thread per "
          f"process, median of {args.rounds} interleaved rounds after a warm-up; baseline: {args.baseline}")
    print("| N | variant | wall (s) | CPU (s) | extra peak (MiB, median / max) | CPU / baseline | peak / baseline "
          "| max diff vs llavadi |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.positions:
        res = measure(n, variants, args)
        for v in variants:
            r, b = res[v], res["baseline"]
            print(f"| {n} | {v} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['extra_peak_mib']:.0f} / "
                  f"{r['max_extra_peak_mib']:.0f} | {r['cpu_seconds'] / b['cpu_seconds']:.3f}x | "
                  f"{r['extra_peak_mib'] / b['extra_peak_mib']:.3f}x | {r['agreement']:.1e} |", flush=True)


def additions_table(args: argparse.Namespace) -> None:
    """The same tokenizer up to additions against the identical case, side by side, as ratios."""
    variants = ["llavadi", "additions"] + ([] if args.no_moved else ["additions_moved", "additions_moved_regather"])
    print(f"forward KL from hidden states, forward + backward, H={args.hidden}, base V={args.vocab}, fp32, 1 thread "
          f"per process, median of {args.rounds} interleaved rounds after a warm-up")
    print("| N | V | variant | wall (s) | CPU (s) | extra peak (MiB, median / max) | CPU / identical "
          "| peak / identical | rel. diff vs identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.positions:
        res = measure(n, variants, args)
        ref = res["llavadi"]
        for v in variants:
            r = res[v]
            print(f"| {n} | {args.vocab} | {'identical' if v == 'llavadi' else v} | {r['seconds']:.2f} | "
                  f"{r['cpu_seconds']:.2f} | {r['extra_peak_mib']:.0f} / {r['max_extra_peak_mib']:.0f} | "
                  f"{r['cpu_seconds'] / ref['cpu_seconds']:.3f}x | {r['extra_peak_mib'] / ref['extra_peak_mib']:.3f}x "
                  f"| {r['agreement']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
