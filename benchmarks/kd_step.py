"""A full distillation step against its floor (the student's SFT step + the teacher's no-grad forward).

Tiny LLaVA models with a 32000-token vocabulary (the LM heads then cost what they cost in real
models relative to a thin body), the paper's recipe: CE + forward KL on response logits (T=1) +
last-hidden-state MSE through Linear-GELU-Linear, on response tokens. One process, one thread,
rounds interleaved (every measurement once per round), median reported; forward + backward (the
optimizer step is the same for SFT and KD and is left out). Wall and CPU time are both measured;
ratios use CPU time (one thread: it does not count waiting for a core on a shared machine).

Two batches of 8 x 256 tokens:
- ``text``: 16 instruction tokens then 240 response tokens (every position but the first few has a loss);
- ``llava``: the LLaVA layout with 144 image tokens (192 px images, 16 px patches), 40 instruction
  tokens and 40-72 response tokens (padding after), where positions without a loss should cost nothing.

Measured: ``sft`` (the student's CE-only step through DistillationModule), ``teacher_forward`` (the
teacher's HF forward under no_grad, logits at every position), ``teacher_view`` (what KD reads: the
base model's last hidden state) + ``teacher_head_rows`` (its LM head at the KD positions only), and
``kd`` (teacher view + the KD step). Floors: A = sft + teacher_forward; B = sft + teacher_view +
teacher_head_rows (the least any KD implementation must compute). Then a profile of one KD step.

Usage: python benchmarks/kd_step.py [--rounds 5] [--layouts text llava] [--plain]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

import torch  # noqa: E402

VOCAB, IMAGE_ID, SEQ, BATCH = 32000, 1, 256, 8
PAD, IMG, INS, RES = 0, 1, 2, 3  # TokenType values


def tiny_llava(width: int, layers: int, seed: int):
    """A LLaVA with a 32000-token LM and a small CLIP tower giving 144 image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              image_size=192, patch_size=16)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=int(2.75 * width),
                       num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 64,
                       max_position_embeddings=SEQ)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def batch_of(layout: str) -> dict:
    """Input ids, attention mask, token types, labels (and pixels for `llava`) of 8 samples x 256 tokens."""
    g = torch.Generator().manual_seed(1)
    types = torch.full((BATCH, SEQ), PAD)
    for i in range(BATCH):
        if layout == "text":
            parts = [(INS, 16), (RES, SEQ - 16)]
        else:
            parts = [(INS, 8), (IMG, 144), (INS, 32), (RES, 40 + 4 * i)]
        at = 0
        for token_type, n in parts:
            types[i, at:at + n] = token_type
            at += n
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    ids = torch.where(types == IMG, torch.full_like(ids, IMAGE_ID), ids)
    batch = {"input_ids": ids, "attention_mask": (types != PAD).long(), "token_types": types,
             "labels": torch.where(types == RES, ids, torch.full_like(ids, -100))}
    if layout == "llava":
        batch["pixel_values"] = torch.randn(BATCH, 3, 192, 192, generator=g)
    return batch


def _objective(terms, student, teacher, plain: bool):
    from llavadi.distill.objective import DistillObjective

    kwargs = {"fused": False} if plain else {}
    return DistillObjective(terms, ce_weight=1.0, student_config=student.config, teacher_config=teacher.config,
                            **kwargs)


def steps(student, teacher, batch: dict, plain: bool) -> tuple[dict, object, object]:
    """The measured functions by name, the KD module and the online teacher."""
    from llavadi.distill.module import DistillationModule
    from llavadi.distill.terms import TermSpec
    from llavadi.teacher.online import OnlineTeacher

    sft = DistillationModule(student, _objective([], student, teacher, False))
    kd = DistillationModule(student, _objective([TermSpec("forward_kl"), TermSpec("hidden_mse")], student, teacher,
                                                False))
    online = OnlineTeacher(teacher)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    rows = torch.zeros_like(batch["token_types"], dtype=torch.bool)  # the KD positions: predicting response tokens
    rows[:, :-1] = batch["token_types"][:, 1:] == RES
    head = teacher.get_output_embeddings()

    def train_step(module):
        def run():
            module.zero_grad(set_to_none=True)
            needs = module.objective.teacher_needs
            teacher_view = online.view(batch, needs) if module.objective.needs_teacher else None
            loss, _ = module(batch, teacher_view)
            loss.backward()
        return run

    def teacher_forward():
        with torch.no_grad():
            teacher(**inputs)

    def teacher_head_rows():
        view = online.view(batch, kd.objective.teacher_needs)
        with torch.no_grad():
            head(view.last_hidden[rows])

    out = {"sft": train_step(sft), "teacher_forward": teacher_forward,
           "teacher_view": lambda: online.view(batch, kd.objective.teacher_needs),
           "teacher_view+head_rows": teacher_head_rows, "kd": train_step(kd)}
    if plain:
        out["kd_plain"] = train_step(DistillationModule(student, _objective(
            [TermSpec("forward_kl"), TermSpec("hidden_mse")], student, teacher, True)))
    return out, kd, online


def measure(fns: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each function over interleaved rounds, after one warm-up call each."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            if r:
                times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}


def profile_kd(kd, online, batch: dict, top: int) -> None:
    """Self CPU time of the top operators of one KD step (after the measurements: warm)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        kd.zero_grad(set_to_none=True)
        loss, _ = kd(batch, online.view(batch, kd.objective.teacher_needs))
        loss.backward()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"  profile of one KD step (self CPU time, total {total / 1e6:.2f} s):")
    for e in events[:top]:
        print(f"    {e.key:<40} {e.self_cpu_time_total / 1e6:7.3f} s {100 * e.self_cpu_time_total / total:5.1f} %"
              f"  ({e.count} calls)")


def main() -> None:
    """Measure each layout and print times, floors and ratios from this run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layouts", nargs="+", default=["text", "llava"], choices=["text", "llava"])
    parser.add_argument("--plain", action="store_true", help="also the KD step on llavadi's plain autograd path")
    parser.add_argument("--top", type=int, default=12, help="operators shown in the profile")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from llavadi.models.build import set_trainable

    student, teacher = tiny_llava(256, 2, seed=1), tiny_llava(512, 4, seed=2)
    set_trainable(student, projector=True, llm=True)  # the instruction-tuning stage: vision tower frozen
    n_s, n_t = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (student, teacher))
    print(f"student {n_s:.1f}M parameters (text 256 x 2), teacher {n_t:.1f}M (text 512 x 4), vocabulary {VOCAB}, "
          f"batch {BATCH} x {SEQ}, fp32, 1 thread, forward + backward, median of {args.rounds} interleaved rounds")
    for layout in args.layouts:
        batch = batch_of(layout)
        fns, kd, online = steps(student, teacher, batch, args.plain)
        times = measure(fns, args.rounds)
        t = {k: cpu for k, (_, cpu) in times.items()}
        floor_a = t["sft"] + t["teacher_forward"]
        floor_b = t["sft"] + t["teacher_view+head_rows"]
        n_rows = int((batch["token_types"][:, 1:] == RES).sum())
        print(f"\nlayout {layout!r}: {n_rows} KD positions of {BATCH * SEQ}")
        print("| measurement | wall (s) | CPU (s) |\n|---|---|---|")
        for name, (wall, cpu) in times.items():
            print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
        print(f"| floor A = sft + teacher_forward | | {floor_a:.3f} |\n| floor B = sft + teacher_view+head_rows | | "
              f"{floor_b:.3f} |")
        print(f"CPU time: kd / floor A = {t['kd'] / floor_a:.2f}x, kd / floor B = {t['kd'] / floor_b:.2f}x"
              + (f", kd_plain / kd = {t['kd_plain'] / t['kd']:.2f}x" if "kd_plain" in t else ""))
        profile_kd(kd, online, batch, args.top)


if __name__ == "__main__":
    main()
