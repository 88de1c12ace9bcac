"""Speed of batched greedy generation vs one question at a time (LLaVA's model_vqa loop).

A random tiny LLaVA (text 256x4, vision 128x2, 48 px images, 16 px patches = 9 image tokens)
answers synthetic questions (a few text-only ones mixed in) twice: once with
`llavadi.eval.generate.generate_answers` (sorted by length, left-padded batches, KV cache),
once with a plain loop that calls `model.generate` on each prompt alone, as LLaVA's
`model_vqa*.py` scripts do. Prints samples/second side by side, the ratio, and whether the
answers are identical.

    python benchmarks/generation.py [--questions 64] [--batch-size 16] [--max-new-tokens 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def build_model(tokenizer):
    """A random tiny LLaVA of the benchmark's size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
    from llavadi.eval.generate import encode_question

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
                                 max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **kwargs)
            answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each method; the best is kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llavadi.data.synthetic import TEXT_ONLY_QA, make_synthetic
    from llavadi.eval.benchmarks import get_benchmark
    from llavadi.eval.generate import EvalQuestion, encode_question, from_benchmark_questions, generate_answers
    from llavadi.models.build import LoadedModel
    from llavadi.models.presets import build_image_processor
    from llavadi.models.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = build_model(tokenizer)
    processor = build_image_processor()
    bundle = LoadedModel(model, tokenizer, processor, {"template": "vicuna_v1", "system": ""})
    encoder = bundle.encoder()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_synthetic(f"{tmp}/set", n_caption=0, n_instruct=0, n_eval=args.questions)
        loaded = from_benchmark_questions(get_benchmark("synthetic").load_questions(paths["eval"]), paths["image_dir"])
        questions = []
        for i, q in enumerate(loaded):
            if i % 16 == 5:  # mix text-only questions into the batches
                questions.append(EvalQuestion(q.question_id, TEXT_ONLY_QA[i % len(TEXT_ONLY_QA)][0]))
            else:
                questions.append(q)
        n_text_only = sum(q.image is None for q in questions)
        lengths = [len(encode_question(encoder, q)) for q in questions]

        # warm-up (allocator, lazy imports) outside the timing
        generate_answers(bundle, questions[:4], batch_size=4, max_new_tokens=2, progress=False)
        one_at_a_time(bundle, questions[:2], 2)

        t_single, t_batched = float("inf"), float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            single = one_at_a_time(bundle, questions, args.max_new_tokens)
            t_single = min(t_single, time.perf_counter() - t0)
            t0 = time.perf_counter()
            batched = generate_answers(bundle, questions, batch_size=args.batch_size,
                                       max_new_tokens=args.max_new_tokens, progress=False)
            t_batched = min(t_batched, time.perf_counter() - t0)

    n = len(questions)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: random tiny LLaVA, {params / 1e6:.1f}M params (text 256x4, vision 128x2, 9 image tokens); "
          f"{n} questions ({n_text_only} text-only), prompt length {min(lengths)}-{max(lengths)} tokens, "
          f"max_new_tokens {args.max_new_tokens}, threads {args.threads}, best of {args.repeats}")
    print(f"{'method':<34}{'seconds':>10}{'samples/s':>12}")
    print(f"{'one at a time (model_vqa loop)':<34}{t_single:>10.2f}{n / t_single:>12.1f}")
    print(f"{f'batched (batch {args.batch_size}, left pad, KV)':<34}{t_batched:>10.2f}{n / t_batched:>12.1f}")
    print(f"speed-up: {t_single / t_batched:.2f}x")
    same = sum(a == b for a, b in zip(single, batched))
    print(f"identical answers: {same}/{n}" + ("" if same == n else "  <-- MISMATCH"))
    return 0 if same == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
