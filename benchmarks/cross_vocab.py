"""Cost of the cross-tokenizer logit terms (uld, gold) against the same-tokenizer fused pass (forward_kl).

Variants (each in its own process, one thread), forward + backward from hidden states, fp32:
- ``forward_kl``: ``DistillObjective`` with one ``forward_kl`` term (ce_weight 0) on N answer positions:
  the fused chunked LM-head pass of one shared tokenizer;
- ``uld`` / ``gold``: the term on N student answer tokens paired with a teacher tokenization of the
  same text: 80 % of the groups one token to one, 10 % two student tokens to one teacher token, 10 %
  one to two (so both sides hold about N tokens); both vocabularies of size V, different tokenizers;
  ``gold`` with half of each vocabulary matched by string. Default options (top_k 256, merge first).
Each variant runs once to warm up, then once measured (CPU time of its one thread, and the extra peak
RSS above the RSS before the step: VmHWM reset). Ratios are against ``forward_kl`` of the same run.
``--baseline DIR`` also runs the uld / gold variants of another checkout DIR (its own copy of this
script and its package), side by side with this checkout's: before / after a change.

Usage: python benchmarks/cross_vocab.py [--vocab 32000 151646] [--positions 4096] [--hidden 2048] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

from llavadi.process_memory import reset_peak_rss, status_kib  # noqa: E402 (after the path above)


def _groups(n: int):
    """(n_groups, 5) groups over n student tokens (positions 1..n) and the teacher's token count."""
    import torch

    g = torch.Generator().manual_seed(0)
    rows, s, t = [], 1, 1
    while s <= n:
        kind = int(torch.randint(0, 10, (1,), generator=g))
        n_s = 2 if kind == 8 and s < n else 1
        n_t = 2 if kind == 9 else 1
        rows.append([0, s, s + n_s - 1, t, t + n_t - 1])
        s, t = s + n_s, t + n_t
    return torch.tensor(rows), t - 1


def _step(variant: str, n: int, width: int, vocab: int):
    import torch
    from torch import nn

    from llavadi.distill.cross_vocab import MatchedTokens, PairedGroups
    from llavadi.distill.objective import DistillObjective
    from llavadi.distill.terms import TermContext, TermSpec, build_term
    from llavadi.distill.view import ModelView

    gen = torch.Generator().manual_seed(0)
    groups, n_t = _groups(n) if variant != "forward_kl" else (None, n)
    hidden_s = torch.randn(1, n + 1, width, generator=gen)
    hidden_t = torch.randn(1, n_t + 1, width, generator=gen)
    head_s, head_t = nn.Linear(width, vocab, bias=False), nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        head_s.weight.normal_(0, 0.02, generator=gen)
        head_t.weight.normal_(0, 0.02, generator=gen)
    head_t.requires_grad_(False)
    types_s, types_t = torch.full((1, n + 1), 3), torch.full((1, n_t + 1), 3)
    if variant == "forward_kl":
        class Cfg:
            hidden_size = width

        objective = DistillObjective([TermSpec("forward_kl")], ce_weight=0.0, teacher_config=Cfg())
        labels = torch.zeros(1, n + 1, dtype=torch.long)

        def loss_of(student, teacher):
            return objective(student, teacher, labels)[0]
    else:
        ids_s = torch.randint(0, vocab, (1, n + 1), generator=gen)
        ids_t = torch.randint(0, vocab, (1, n_t + 1), generator=gen)
        half = torch.randperm(vocab, generator=gen)[: vocab // 2]
        matched = MatchedTokens(half, torch.randperm(vocab, generator=gen)[: vocab // 2], vocab)
        ctx = TermContext(student_width=width, teacher_width=width, cross_tokenizer=True, matched_tokens=matched)
        term = build_term(TermSpec(variant), variant, ctx, "benchmark")
        paired = PairedGroups(groups, ids_s, ids_t)

        def loss_of(student, teacher):
            teacher.alignment = paired
            return term(student, teacher) / n

    teacher = ModelView(token_types=types_t, last_hidden=hidden_t, lm_head=head_t)

    def step():
        leaf = hidden_s.clone().requires_grad_(True)
        head_s.weight.grad = None
        loss = loss_of(ModelView(token_types=types_s, last_hidden=leaf, lm_head=head_s), teacher)
        loss.backward()
        return float(loss)

    return step, (len(groups) if groups is not None else n)


def worker(variant: str, n: int, width: int, vocab: int) -> None:
    """Warm-up, then one measured step; prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    step, n_groups = _step(variant, n, width, vocab)
    step()
    before = status_kib("VmRSS")
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    loss = step()
    print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                      "extra_peak_mib": (status_kib("VmHWM") - before) / 1024, "loss": loss, "groups": n_groups}))


def main() -> None:
    """One table: per vocabulary, each variant's CPU time and extra peak, as ratios to forward_kl."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151646])
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--variants", nargs="+", default=["forward_kl", "uld", "gold"])
    parser.add_argument("--baseline", help="also the uld / gold variants of this other checkout (side by side)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], *(int(x) for x in args.worker[1:]))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print(f"N={args.positions} student answer tokens, H={args.hidden}, fp32, forward + backward, 1 thread per process")
    print("| V | variant | groups | CPU (s) | wall (s) | extra peak (MiB) | CPU / forward_kl | peak / forward_kl |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [(v, os.path.abspath(__file__), v) for v in args.variants]
    if args.baseline:  # interleaved: each aligned variant of the other checkout next to this one's
        other = os.path.join(os.path.abspath(args.baseline), "benchmarks", "cross_vocab.py")
        runs = [r for v in args.variants for r in ([(v, runs[0][1], v)] if v == "forward_kl" else
                                                    [(v + " (baseline)", other, v), (v, runs[0][1], v)])]
    for vocab in args.vocab:
        res = {}
        for label, script, variant in runs:
            cmd = [sys.executable, script, "--worker", variant, str(args.positions), str(args.hidden), str(vocab)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            res[label] = json.loads(out.strip().splitlines()[-1])
            base = res[runs[0][0]]
            r = res[label]
            print(f"| {vocab} | {label} | {r['groups']} | {r['cpu_seconds']:.2f} | {r['seconds']:.2f} | "
                  f"{r['extra_peak_mib']:.0f} | {r['cpu_seconds'] / base['cpu_seconds']:.2f}x | "
                  f"{r['extra_peak_mib'] / base['extra_peak_mib']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
