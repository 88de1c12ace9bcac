"""Peak memory and time of forward KL (+ CE) + backward: chunked vs plain logit path of DistillObjective.

Each variant runs in its own subprocess so peak RSS (VmHWM, reset after setup) is not shared.
Usage: python benchmarks/distill_memory.py [--positions 2048 --vocab 32000 --hidden 512 --chunk-size 256 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def run_variant(args: argparse.Namespace) -> dict:
    """One measurement in this process: returns times and memory in MiB."""
    import torch
    import torch.nn as nn

    from llavadi.data.token_types import TokenType
    from llavadi.distill.objective import DistillObjective
    from llavadi.distill.terms import TermSpec
    from llavadi.distill.view import ModelView

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, vocab, width = args.positions, args.vocab, args.hidden

    class Cfg:
        hidden_size = width

    chunk = None if args.variant == "plain" else args.chunk_size
    objective = DistillObjective(
        [TermSpec("forward_kl")], ce_weight=1.0, student_config=Cfg(), teacher_config=Cfg(), chunk_size=chunk
    )
    head_s, head_t = nn.Linear(width, vocab, bias=False), nn.Linear(width, vocab, bias=False)
    types = torch.full((1, n + 1), int(TokenType.RESPONSE))
    labels = torch.randint(0, vocab, (1, n + 1))
    hidden_t = torch.randn(1, n + 1, width)
    teacher = ModelView(last_hidden=hidden_t, lm_head=head_t, token_types=types)
    times = []
    peaks = []
    for repeat in range(args.repeats + 1):  # the first run warms up (lazy imports, allocator) and is not counted
        hidden_s = torch.randn(1, n + 1, width, requires_grad=True)
        head_s.zero_grad()
        student = ModelView(last_hidden=hidden_s, lm_head=head_s, token_types=types)
        before = _rss_kib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        loss, _ = objective(student, teacher, labels)
        loss.backward()
        if repeat > 0:
            times.append(time.perf_counter() - start)
            peaks.append((_rss_kib("VmHWM") - before) / 1024)
        del loss, student, hidden_s
    times.sort()
    peaks.sort()
    return {
        "variant": args.variant,
        "seconds": times[len(times) // 2],
        "extra_peak_mib": peaks[len(peaks) // 2],
        "peak_reset": _reset_peak(),
    }


def main() -> None:
    """Run both variants in subprocesses and print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--positions={args.positions}",
            f"--vocab={args.vocab}",
            f"--hidden={args.hidden}",
            f"--chunk-size={args.chunk_size}",
            f"--repeats={args.repeats}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{proc.stderr}")
        out = proc.stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    plain, chunked = results["plain"], results["chunked"]
    print(
        f"forward KL + CE, forward + backward, N={args.positions} positions, V={args.vocab}, H={args.hidden}, "
        f"1 thread, median of {args.repeats} after a warm-up; memory = peak RSS above the pre-loss RSS"
    )
    print(f"{'variant':<22}{'time (s)':>10}{'extra peak (MiB)':>18}")
    print(f"{'plain':<22}{plain['seconds']:>10.2f}{plain['extra_peak_mib']:>18.0f}")
    print(
        f"{'chunked (' + str(args.chunk_size) + ')':<22}{chunked['seconds']:>10.2f}{chunked['extra_peak_mib']:>18.0f}"
    )
    print(
        f"ratio chunked/plain: time {chunked['seconds'] / plain['seconds']:.2f}x, "
        f"memory {chunked['extra_peak_mib'] / plain['extra_peak_mib']:.3f}x"
    )
    if not (plain["peak_reset"] and chunked["peak_reset"]):
        print("warning: could not reset VmHWM; memory includes setup")


if __name__ == "__main__":
    main()
