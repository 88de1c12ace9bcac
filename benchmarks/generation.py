"""Speed of llavadi's batched greedy generation vs plain `model.generate` on the same batches, and vs one
question at a time (LLaVA's model_vqa loop).

A random LLaVA answers synthetic questions (a few text-only ones mixed in):
- `--model tiny`: text 256x4, vision 128x2, 48 px images, 16 px patches = 9 image tokens;
- `--model llava576`: the student of benchmarks/vs_trl.py (text 512x2, vocabulary 32000, a CLIP-shaped
  tower of 336 px / 14 px patches = 576 image tokens).
Methods, timed in alternation (`--repeats` rounds, best kept):
- plain: `model.generate` on each length-sorted, left-padded batch (`llavadi.eval.decode.hf_generate`);
- llavadi: `llavadi.eval.generate.generate_answer_ids` on the same batches (`llavadi.eval.decode.decode`:
  preallocated KV cache, finished rows leave the batch);
- one at a time (`--single`): `model.generate` on each prompt alone, as LLaVA's `model_vqa*.py` scripts do.
Prints generated tokens per second side by side and the ratio, and exits non-zero unless llavadi's answers
are token for token plain generate's. A random model almost never emits its end token, so every answer
runs to max_new_tokens; `--eos frequent` makes the random model's most frequent answer token an end token
as well, so answers end at different lengths as real ones do.

    python benchmarks/generation.py [--model tiny] [--questions 64] [--batch-size 32] [--max-new-tokens 16]
                                    [--threads 2] [--eos never|frequent] [--single]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def build_model(tokenizer):
    """A random tiny LLaVA of the benchmark's size."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=48, patch_size=16, projection_dim=128)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).eval()


def one_at_a_time(bundle, questions, max_new_tokens):
    """LLaVA's model_vqa loop: tokenize, load the image, generate, decode, one question after another."""
    from llavadi.data.dataset import load_image, pixel_values_for
    from llavadi.eval.generate import encode_question, eos_token_ids

    model, tok, encoder = bundle.model, bundle.tokenizer, bundle.encoder()
    answers = []
    with torch.inference_mode():
        for q in questions:
            ids = torch.tensor([encode_question(encoder, q)])
            kwargs = {}
            if q.image:
                img = load_image(q.image, q.question_id)
                kwargs["pixel_values"] = pixel_values_for(bundle.image_processor, img, bundle.pad_to_square)[None]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                 max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=eos_token_ids(model, tok),
                                 pad_token_id=tok.pad_token_id, **kwargs)
            answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def plain_generate(bundle, questions, batch_size, max_new_tokens):
    """HF `model.generate` on the length-sorted, left-padded batches llavadi generates."""
    from llavadi.data.collator import pad_sequences
    from llavadi.eval.decode import eos_token_ids, hf_generate, pad_token_id
    from llavadi.eval.generate import encode_question, length_sorted_batches, pixel_batch

    model, encoder = bundle.model, bundle.encoder()
    pad_id, eos_ids = pad_token_id(bundle.tokenizer), eos_token_ids(model, bundle.tokenizer)
    prompts = [encode_question(encoder, q) for q in questions]
    answers = [None] * len(questions)
    with torch.inference_mode():
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            ids = pad_sequences([prompts[i] for i in batch], pad_id, side="left")
            mask = pad_sequences([[1] * len(prompts[i]) for i in batch], 0, side="left")
            pixels = pixel_batch(bundle, [questions[i] for i in batch], "cpu", torch.float32)
            kwargs = {} if pixels is None else {"pixel_values": pixels}
            out = hf_generate(model, ids, mask, max_new_tokens, pad_id, eos_ids, [encoder.image_token_id], **kwargs)
            for i, row in zip(batch, out):
                answers[i] = row
    return answers


def build_bundle(kind: str):
    """(LoadedModel, number of image tokens) of the benchmark's random model."""
    from llavadi.models.build import LoadedModel
    from llavadi.models.presets import VisionSpec, build_image_processor
    from llavadi.models.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    if kind == "tiny":
        tokenizer = build_tiny_tokenizer()
        model, processor = build_model(tokenizer), build_image_processor()
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import vs_trl

        tokenizer = vs_trl.build_tokenizer()
        _, model = vs_trl.build_pair(tokenizer)
        processor = build_image_processor(VisionSpec(image_size=vs_trl.IMAGE_SIZE, patch_size=vs_trl.PATCH))
    bundle = LoadedModel(model.eval(), tokenizer, processor, {"template": "vicuna_v1", "system": ""})
    return bundle, bundle.n_image_tokens


def make_frequent_token_an_eos(bundle, questions, batch_size, max_new_tokens):
    """Add the random model's most frequent answer token (after the first) to its end tokens."""
    from collections import Counter

    counts = Counter(t for a in plain_generate(bundle, questions, batch_size, max_new_tokens) for t in a[1:])
    token = counts.most_common(1)[0][0]
    eos = bundle.tokenizer.eos_token_id
    bundle.model.generation_config.eos_token_id = [eos, token]
    return token


def synthetic_questions(folder: str, n: int) -> list:
    """n synthetic eval questions with images, every 16th (from the 6th) replaced by a text-only question."""
    from llavadi.data.synthetic import TEXT_ONLY_QA, make_synthetic
    from llavadi.eval.benchmarks import get_benchmark
    from llavadi.eval.generate import EvalQuestion, from_benchmark_questions

    paths = make_synthetic(f"{folder}/set", n_caption=0, n_instruct=0, n_eval=n)
    loaded = from_benchmark_questions(get_benchmark("synthetic").load_questions(paths["eval"]), paths["image_dir"])
    return [EvalQuestion(q.question_id, TEXT_ONLY_QA[i % len(TEXT_ONLY_QA)][0]) if i % 16 == 5 else q
            for i, q in enumerate(loaded)]


def time_methods(bundle, questions, args) -> tuple[dict, dict, dict, list]:
    """Best wall and CPU seconds of each method over `args.repeats` alternating rounds, their answers, the load."""
    from llavadi.eval.generate import generate_answer_ids

    def ours(max_new_tokens):
        return generate_answer_ids(bundle, questions, batch_size=args.batch_size, max_new_tokens=max_new_tokens,
                                   progress=False)

    # warm-up (allocator, lazy imports) outside the timing
    generate_answer_ids(bundle, questions[:4], batch_size=4, max_new_tokens=2, progress=False)
    plain_generate(bundle, questions[:4], 4, 2)
    best = {k: float("inf") for k in ("plain", "llavadi", "plain_first", "llavadi_first", "single")}
    best_cpu, answers, load = dict(best), {}, []

    def timed(key, run):
        t0, c0 = time.perf_counter(), time.process_time()
        answers[key] = run()
        best[key] = min(best[key], time.perf_counter() - t0)
        best_cpu[key] = min(best_cpu[key], time.process_time() - c0)

    for _ in range(args.repeats):
        load.append(os.getloadavg()[0])
        timed("plain", lambda: plain_generate(bundle, questions, args.batch_size, args.max_new_tokens))
        timed("llavadi", lambda: ours(args.max_new_tokens))
        # the prefill and first token alone: what the decoding steps add is the difference
        timed("plain_first", lambda: plain_generate(bundle, questions, args.batch_size, 1))
        timed("llavadi_first", lambda: ours(1))
        if args.single:
            timed("single", lambda: one_at_a_time(bundle, questions, args.max_new_tokens))
    load.append(os.getloadavg()[0])
    return best, best_cpu, answers, load


def _ratio(plain: float, ours: float) -> str:
    return f"{plain / ours:.2f}x" if plain > 0 and ours > 0 else "n/a (prefill-only run not faster)"


def print_speeds(best: dict, best_cpu: dict, tokens: int, n: int, args) -> None:
    """Seconds and tokens/s of each method, the ratios, with the decoding steps apart."""
    later = tokens - n  # tokens after each answer's first, made by the decoding steps
    print(f"{'method':<44}{'seconds':>10}{'tokens/s':>12}{'prefill+1st s':>15}{'later tokens/s':>16}")
    for name, key in (("plain model.generate, same batches", "plain"), ("llavadi (llavadi.eval.decode)", "llavadi")):
        steps = best[key] - best[key + "_first"]
        print(f"{name:<44}{best[key]:>10.2f}{tokens / best[key]:>12.1f}{best[key + '_first']:>15.2f}"
              f"{later / steps if steps > 0 else float('nan'):>16.1f}")
    if args.single:
        print(f"{'one at a time (model_vqa loop)':<44}{best['single']:>10.2f}{tokens / best['single']:>12.1f}")
    for label, b in (("llavadi / plain generate tokens/s", best), (f"the same in CPU seconds (best of {args.repeats})",
                                                                    best_cpu)):
        steps = _ratio(b["plain"] - b["plain_first"], b["llavadi"] - b["llavadi_first"])
        print(f"{label}: plain {b['plain']:.2f} s, llavadi {b['llavadi']:.2f} s: {_ratio(b['plain'], b['llavadi'])} "
              f"(decoding steps alone: {steps})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "llava576"], default="tiny")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method; the best is kept")
    parser.add_argument("--eos", choices=["never", "frequent"], default="never",
                        help="frequent: the random model's most frequent answer token also ends an answer")
    parser.add_argument("--single", action="store_true", help="also time one question at a time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llavadi.eval.generate import decode_answer, encode_question

    bundle, n_image = build_bundle(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        questions = synthetic_questions(tmp, args.questions)
        lengths = [len(encode_question(bundle.encoder(), q)) for q in questions]
        extra_eos = None
        if args.eos == "frequent":
            extra_eos = make_frequent_token_an_eos(bundle, questions, args.batch_size, args.max_new_tokens)
        best, best_cpu, answers, load = time_methods(bundle, questions, args)

    plain, fast, n = answers["plain"], answers["llavadi"], len(questions)
    tokens = sum(len(a) for a in plain)
    params = sum(p.numel() for p in bundle.model.parameters())
    print(f"model: random {args.model} LLaVA, {params / 1e6:.1f}M params, {n_image} image tokens; {n} questions "
          f"({sum(q.image is None for q in questions)} text-only), prompt length {min(lengths)}-{max(lengths)} "
          f"tokens, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, end tokens: eos"
          + (f" + {extra_eos}" if extra_eos else "")
          + f"; answer lengths {min(len(a) for a in plain)}-{max(len(a) for a in plain)}, {tokens} tokens; "
          f"threads {args.threads}, best of {args.repeats}; load average {min(load):.1f}-{max(load):.1f}")
    print_speeds(best, best_cpu, tokens, n, args)
    same = sum(a == b for a, b in zip(plain, fast))
    print(f"identical answers (token ids) llavadi vs plain generate: {same}/{n}" + ("" if same == n else "  <-- MISMATCH"))
    ok = same == n
    if args.single:
        texts = [decode_answer(bundle.tokenizer, a) for a in fast]
        same_single = sum(a == b for a, b in zip(answers["single"], texts))
        print(f"identical answers (text) llavadi vs one at a time: {same_single}/{n}")
        ok = ok and same_single == n
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
