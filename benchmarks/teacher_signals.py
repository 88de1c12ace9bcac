"""Teacher signals: the offline top-k cache (size, write speed, training step) and on-policy steps.

Random LLaVA models with a 32000-token vocabulary (word-level tokenizer built here; teacher text
384x4, student text 256x2, vision 128x2, 48 px images = 9 image tokens), a synthetic set of
samples with a 16-word question and a 48-word answer (49 response positions with </s>).

1. Cache size: `llavadi cache-teacher` (top-64, fp16 values) over the set; bytes on disk (shards,
   index, manifest) per cached position, and the shard bytes alone.
2. Cache write throughput against the plain teacher forward (full logits at every position) over
   the same batches.
3. One optimisation step (forward, backward, AdamW) of the same student on the same batch: SFT
   (CE only), CE + forward KL from the cache (lookup by id, content check, sparse KL), CE + forward
   KL with the online teacher, and on-policy steps (lambda = 1 and 0.5: the student samples up to
   48 tokens, the teacher scores them online) with where their time goes. Variants are
   interleaved round by round and the median is reported, so a shared machine slows them alike.

    python benchmarks/teacher_signals.py [--samples 96] [--batch-size 8] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch

VOCAB = 32000
WORDS = ("USER ASSISTANT : what is in the image describe it ? . ,").split()


def build_tokenizer():
    """A word-level fast tokenizer of exactly VOCAB tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    names = specials + WORDS + [f"w{i}" for i in range(VOCAB - len(specials) - len(WORDS))]
    vocab = {t: i for i, t in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert len(hf) == VOCAB
    return hf


def build_model(tokenizer, width, layers, seed):
    """A random LLaVA: CLIP 128x2 on 48 px images (9 tokens), Llama `width` x `layers`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=48, patch_size=16, projection_dim=128)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def write_workspace(root, n_samples):
    """Teacher and student directories, images and a LLaVA-format data file under root."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from llavadi.models.build import LoadedModel, save_model

    tok = build_tokenizer()
    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    save_model(LoadedModel(build_model(tok, 384, 4, 1), tok, processor, {}), os.path.join(root, "teacher"))
    save_model(LoadedModel(build_model(tok, 256, 2, 0), tok, processor, {}), os.path.join(root, "student"))
    os.makedirs(os.path.join(root, "imgs"))
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        Image.new("RGB", (48, 48), tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g))).save(
            os.path.join(root, "imgs", f"img{i}.png"))

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 20, (n,), generator=g))

    data = [{"id": f"q{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": f"<image>\n{words(16)}"},
                               {"from": "gpt", "value": words(48)}]}
            for i in range(n_samples)]
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(data, f)


def recipe(root, out, teacher, batch_size):
    """The recipe the cache and the training steps use."""
    from llavadi.recipe import recipe_from_dict

    return recipe_from_dict({
        "student": {"path": os.path.join(root, "student")}, "teacher": teacher, "output_dir": out, "device": "cpu",
        "data": {"image_folder": os.path.join(root, "imgs"), "template": "vicuna_v1", "system": "", "max_length": 256},
        "stages": [{"name": "finetune", "data": {"path": os.path.join(root, "data.json")},
                    "train": {"per_device_train_batch_size": batch_size}, "distill": {"terms": [{"name": "forward_kl"}]}}]})


def dir_bytes(directory, pick=lambda name: True):
    """Bytes of the files under a directory whose name `pick` accepts."""
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(directory) for n in names if pick(n))


def plain_forward_seconds(root, batch_size):
    """The plain teacher forward (full logits at every position) over the data, batched as the cache batches."""
    from llavadi.data.collator import LlavaCollator
    from llavadi.models.build import load_llava_dir
    from llavadi.train.stage_inputs import build_dataset

    teacher = load_llava_dir(os.path.join(root, "teacher"))
    ds = build_dataset(recipe(root, "", {"path": os.path.join(root, "teacher")}, batch_size).stages[0], teacher, None)
    collate = LlavaCollator(teacher.tokenizer.pad_token_id)
    model = teacher.model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(ds), batch_size):
            batch = collate([ds[i] for i in range(b, min(b + batch_size, len(ds)))])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"]).logits.float().log_softmax(-1)
    return time.perf_counter() - start, len(ds)


def measure_cache(root, batch_size, repeats):
    """Cache size per position, and cache-write vs plain-forward seconds (interleaved, best of `repeats`)."""
    from llavadi.teacher.cache_teacher import cache_teacher

    commands, writes, plains = [], [], []
    for r in range(repeats):
        out = os.path.join(root, f"cache{r}")
        start = time.perf_counter()
        stats = cache_teacher(recipe(root, "", {"path": os.path.join(root, "teacher")}, batch_size), out, top_k=64,
                              progress=False)
        commands.append(time.perf_counter() - start)  # with loading, fingerprinting and tokenizing the data
        writes.append(stats["this_process"]["seconds"])  # the caching loop: forward, top-k, shard transactions
        plains.append(plain_forward_seconds(root, batch_size)[0])
    positions, cache_dir = stats["positions"], os.path.join(root, "cache0")
    return {"cache_dir": cache_dir, "positions": positions, "samples": stats["entries"],
            "bytes_per_position": dir_bytes(cache_dir) / positions,
            "shard_bytes_per_position": dir_bytes(cache_dir, lambda n: n.endswith(".safetensors")) / positions,
            "index_bytes_per_position": dir_bytes(cache_dir, lambda n: n == "index.json") / positions,
            "command_seconds": min(commands), "write_seconds": min(writes), "plain_forward_seconds": min(plains)}


class Variant:
    """One kind of training step: its own copy of the student, objective, optimiser and teacher source."""

    def __init__(self, name, student, objective, teacher=None, sampler=None):
        from llavadi.distill.module import DistillationModule

        self.name, self.teacher = name, teacher
        self.module = DistillationModule(copy.deepcopy(student), objective)
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=1e-4)
        self.sampler = sampler(self.module.student) if sampler else None
        self.times = {"step": [], "generation": [], "teacher": []}

    def step(self, batch, step):
        """One optimisation step; records its time and the generation and teacher parts."""
        start = time.perf_counter()
        generation = 0.0
        if self.sampler is not None:
            before = self.sampler.stats["seconds"]
            (batch,) = self.sampler([batch], step)
            generation = self.sampler.stats["seconds"] - before
        t0 = time.perf_counter()
        view = self.teacher.view(batch, self.module.objective.teacher_needs) if self.teacher else None
        teacher = time.perf_counter() - t0
        loss, _ = self.module(batch, view)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times["step"].append(time.perf_counter() - start)
        self.times["generation"].append(generation)
        self.times["teacher"].append(teacher)


def build_variants(root, cache_dir, batch_size, max_new_tokens):
    """SFT, cached KD, online KD and on-policy (lambda 1 and 0.5) steps on the same student."""
    from llavadi.config import OnPolicyConfig
    from llavadi.data.collator import LlavaCollator
    from llavadi.distill.objective import DistillObjective
    from llavadi.models.build import load_llava_dir
    from llavadi.teacher.cache import cached_teacher, open_cache, teacher_config
    from llavadi.teacher.on_policy import OnPolicySampler
    from llavadi.teacher.online import OnlineTeacher
    from llavadi.train.stage_inputs import build_dataset

    student = load_llava_dir(os.path.join(root, "student"))
    teacher = load_llava_dir(os.path.join(root, "teacher"))
    ds = build_dataset(recipe(root, "", {"path": os.path.join(root, "teacher")}, batch_size).stages[0], student, None)
    collate = LlavaCollator(student.tokenizer.pad_token_id)
    batch = collate([ds[i] for i in range(batch_size)])
    kd = [{"name": "forward_kl"}]
    cfg = student.model.config
    reader = open_cache(cache_dir)
    cached_objective = DistillObjective(kd, student_config=cfg, teacher_config=teacher_config(reader),
                                        teacher_signal="topk")
    online = OnlineTeacher(teacher.model, device="cpu")

    def on_policy(fraction):
        config = OnPolicyConfig(fraction=fraction, max_new_tokens=max_new_tokens)
        return lambda s: OnPolicySampler(s, student.tokenizer, collate, config, seed=0, max_length=256)

    variants = [
        Variant("SFT (CE only)", student.model, DistillObjective([], student_config=cfg)),
        Variant("CE + forward KL, top-64 cache", student.model, cached_objective,
                cached_teacher(reader, cached_objective, ds, "cpu", "finetune")),
        Variant("CE + forward KL, online teacher", student.model,
                DistillObjective(kd, student_config=cfg, teacher_config=teacher.model.config), online),
    ]
    for fraction in (1.0, 0.5):
        variants.append(Variant(f"on-policy lambda={fraction:g}, online teacher", student.model,
                                DistillObjective(kd, student_config=cfg, teacher_config=teacher.model.config),
                                online, on_policy(fraction)))
    return variants, batch


def measure_steps(root, cache_dir, batch_size, rounds, max_new_tokens):
    """Median step times of each variant, interleaved round by round after one warm-up step each."""
    variants, batch = build_variants(root, cache_dir, batch_size, max_new_tokens)
    for v in variants:  # warm-up, not recorded
        v.step(batch, 0)
        v.times = {k: [] for k in v.times}
    for r in range(rounds):
        for v in variants:
            v.step(batch, r + 1)
    return {v.name: {k: statistics.median(x) for k, x in v.times.items()} for v in variants}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2, help="cache writes (best of)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as root:
        write_workspace(root, args.samples)
        cache = measure_cache(root, args.batch_size, args.repeats)
        steps = measure_steps(root, cache["cache_dir"], args.batch_size, args.rounds, args.max_new_tokens)
    print(f"cache: {cache['samples']} samples, {cache['positions']} positions, top-64 of {VOCAB}, fp16")
    print(f"  bytes per cached position: {cache['bytes_per_position']:.1f} (shards "
          f"{cache['shard_bytes_per_position']:.1f}, index {cache['index_bytes_per_position']:.1f})")
    rate = cache["samples"] / cache["write_seconds"]
    plain = cache["samples"] / cache["plain_forward_seconds"]
    print(f"  cache write {rate:.1f} samples/s (whole command incl. load and hashing: "
          f"{cache['samples'] / cache['command_seconds']:.1f}/s); plain teacher forward {plain:.1f} samples/s; "
          f"ratio write/plain time {cache['write_seconds'] / cache['plain_forward_seconds']:.2f}x")
    sft = steps["SFT (CE only)"]["step"]
    offline = steps["CE + forward KL, top-64 cache"]["step"]
    print(f"step times, batch {args.batch_size}, median of {args.rounds} (ms): step | generation | teacher")
    for name, t in steps.items():
        print(f"  {name:40s} {1000 * t['step']:8.1f} | {1000 * t['generation']:8.1f} | {1000 * t['teacher']:7.1f}"
              f"   {t['step'] / sft:.2f}x SFT, {t['step'] / offline:.2f}x offline")


if __name__ == "__main__":
    main()
