"""Estimated per-GPU memory and step time of the paper's distillation run on 8 x 80 GB, per engine.

The pair: teacher LLaVA-1.5-13B (Vicuna-13B + CLIP ViT-L/14-336), student MobileLLaMA-2.7B + the
same CLIP; the finetune stage of recipes/llavadi.yaml (LLM and projector trained, vision tower from
layer 6, bf16, AdamW, global batch 128, 665K samples of ~900 tokens of which 576 image tokens).
Everything is computed from the model configs with closed formulas, and two formulas are checked
in this run against the real thing:

1. parameter counts against the real architectures built on the meta device from the same configs;
2. the activation formula against the tensors autograd saves (and the RSS growth) in a real forward
   of a small LLaVA on the CPU, with and without activation checkpointing.

Estimates, not measurements: nothing here ran on a GPU. Step time assumes a model-FLOPs
utilisation (MFU) and a collective bandwidth (both printed); communication is counted apart from
compute, not overlapped (an upper bound). Usage: python benchmarks/scale_estimate.py [--mfu 0.4]
"""

from __future__ import annotations

import argparse
import os
import resource
from dataclasses import dataclass

import torch

GB = 1e9


# ----------------------------------------------------------------------------- configs

def clip_l_336():
    """CLIP ViT-L/14 at 336 px (the vision tower of LLaVA-1.5 and of the paper's student)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768)


def llama(hidden, intermediate, layers, heads, vocab=32064):
    """A LLaMA-family language model config (vocabulary of llava-1.5-hf, shared by teacher and student)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)


def llava(text):
    """A LLaVA-1.5 config: CLIP-L/336 (penultimate layer) + 2-layer GELU projector + `text`."""
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=clip_l_336(), text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


TEACHER = ("LLaVA-1.5-13B", lambda: llava(llama(5120, 13824, 40, 40)))
STUDENT = ("MobileLLaMA-2.7B + CLIP-L/336", lambda: llava(llama(2560, 6912, 32, 32)))


# ----------------------------------------------------------------------------- parameter counts

def vision_params(v) -> dict[str, int]:
    """Parameters of a CLIP vision tower, by part."""
    h, f, n_pos = v.hidden_size, v.intermediate_size, (v.image_size // v.patch_size) ** 2 + 1
    embeddings = 3 * v.patch_size ** 2 * h + h + n_pos * h  # patch conv (no bias), class token, positions
    layer = 4 * (h * h + h) + 2 * 2 * h + (h * f + f) + (f * h + h)  # attention, 2 LayerNorms, MLP
    return {"embeddings+norms": embeddings + 2 * 2 * h, "layer": layer, "layers": v.num_hidden_layers}


def text_params(t) -> dict[str, int]:
    """Parameters of a LLaMA language model with its LM head, by part."""
    h, f, kv = t.hidden_size, t.intermediate_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return {"embeddings": t.vocab_size * h, "layer": layer, "layers": t.num_hidden_layers, "norm": h,
            "lm_head": t.vocab_size * h}


def llava_params(cfg) -> dict[str, int]:
    """Parameter counts of a LLaVA config: vision, projector, language model (with LM head), total."""
    v, t = vision_params(cfg.vision_config), text_params(cfg.text_config)
    d_v, d_t = cfg.vision_config.hidden_size, cfg.text_config.hidden_size
    counts = {"vision": v["embeddings+norms"] + v["layers"] * v["layer"],
              "projector": d_v * d_t + d_t + d_t * d_t + d_t,
              "llm": t["embeddings"] + t["layers"] * t["layer"] + t["norm"] + t["lm_head"]}
    counts["total"] = sum(counts.values())
    return counts


def meta_params(cfg) -> dict[str, int]:
    """The same counts from the real architecture, built on the meta device (no memory, no download)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    core = model.model
    counts = {"vision": sum(p.numel() for p in core.vision_tower.parameters()),
              "projector": sum(p.numel() for p in core.multi_modal_projector.parameters()),
              "llm": sum(p.numel() for p in core.language_model.parameters()) + model.lm_head.weight.numel()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


# ----------------------------------------------------------------------------- activations

def text_layer_activations(t, eager: bool = False) -> int:
    """Elements autograd keeps per token in one LLaMA decoder layer (SDPA attention).

    RMSNorm: input, 1/rms, output, and the linear's input (2 norms); q, k, v, attention output and
    its log-sum-exp (heads); o_proj input; MLP: gate out, SiLU out, up out, product (4 x intermediate).
    Eager attention also keeps the (heads x T) attention probabilities; added by the caller.
    """
    h, f, a = t.hidden_size, t.intermediate_size, t.num_attention_heads
    return 2 * (3 * h + 1) + 5 * h + a + 4 * f


def vision_layer_activations(v) -> int:
    """Elements autograd keeps per token in one CLIP encoder layer (SDPA, quick GELU).

    LayerNorm: input, mean, 1/std, output (2 norms); q, k, v, attention output, log-sum-exp; out_proj
    input; MLP: fc1 out, sigmoid out, product (quick GELU = x * sigmoid(1.702 x)).
    """
    h, f, a = v.hidden_size, v.intermediate_size, v.num_attention_heads
    return 2 * (2 * h + 2) + 5 * h + a + 3 * f


@dataclass
class Shape:
    """What one micro-batch holds."""

    batch: int
    tokens: int  # sequence length, image tokens included
    images: int  # per sample
    vision_tokens: int  # per image (CLS included)
    vision_layers_with_grad: int  # encoder layers whose input needs a gradient (tuned layers)


def activation_bytes(cfg, shape: Shape, checkpointing: bool, dtype_bytes: int = 2) -> float:
    """Activation memory of the student's trainable forward (bytes) for one micro-batch, at its peak.

    Besides the layers: the final norm (input, 1/rms) per text token, the projector's GELU input and
    output and the merged image features per image token. With activation checkpointing every
    layer keeps its input (checkpointing saves it whether or not it needs a gradient) and one
    layer's activations live again while it is recomputed in backward.
    """
    t, v = cfg.text_config, cfg.vision_config
    text_tokens, vision_tokens = shape.batch * shape.tokens, shape.batch * shape.images * shape.vision_tokens
    per_text, per_vision = text_layer_activations(t), vision_layer_activations(v)
    common = text_tokens * (2 * t.hidden_size + 1) + shape.batch * shape.images * (shape.vision_tokens - 1) * 3 * t.hidden_size
    if checkpointing:
        text = text_tokens * (t.num_hidden_layers * t.hidden_size + per_text)
        vision = vision_tokens * (v.num_hidden_layers * v.hidden_size + per_vision)
    else:
        text = text_tokens * t.num_hidden_layers * per_text
        vision = vision_tokens * shape.vision_layers_with_grad * per_vision
    return (common + text + vision) * dtype_bytes


def recompute_bytes(cfg, shape: Shape, dtype_bytes: int = 2) -> float:
    """The part of activation_bytes(checkpointing=True) that only exists during a layer's recompute."""
    t, v = cfg.text_config, cfg.vision_config
    return dtype_bytes * (shape.batch * shape.tokens * text_layer_activations(t)
                          + shape.batch * shape.images * shape.vision_tokens * vision_layer_activations(v))


# ----------------------------------------------------------------------------- the activation check (CPU)

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_activations(checkpointing: bool) -> tuple[float, float, float]:
    """(formula bytes, bytes autograd saved, RSS growth) for one forward of a small LLaVA on the CPU (fp32)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=14, hidden_act="quick_gelu")
    cfg = LlavaConfig(vision_config=vision, text_config=llama(256, 688, 4, 4, vocab=1000), image_token_id=999,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg)
    from_layer = 1  # as `vision_from_layer`: encoder layers 1.. are tuned, their inputs need a gradient
    model.model.vision_tower.requires_grad_(False)
    for layer in model.model.vision_tower.encoder.layers[from_layer:]:
        layer.requires_grad_(True)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shape = Shape(batch=4, tokens=300, images=1, vision_tokens=257, vision_layers_with_grad=4 - from_layer)
    ids = torch.randint(0, 998, (shape.batch, shape.tokens))
    ids[:, 1:257] = 999  # 256 image tokens per sample
    pixels = torch.randn(shape.batch, 3, 224, 224)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    before = _rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model.model(input_ids=ids, pixel_values=pixels).last_hidden_state
    grown = _rss_bytes() - before
    del out
    kept = activation_bytes(cfg, shape, checkpointing, dtype_bytes=4)
    if checkpointing:  # the recompute happens in backward: nothing of it is saved during the forward
        kept -= recompute_bytes(cfg, shape, dtype_bytes=4)
    return kept, float(sum(saved.values())), float(grown)


# ----------------------------------------------------------------------------- the paper's run on 8 GPUs

@dataclass
class Run:
    """The paper's finetune stage (recipes/llavadi.yaml) on one node."""

    gpus: int = 8
    gpu_memory: float = 80 * GB
    peak_flops: float = 312e12  # A100 bf16 dense
    mfu: float = 0.40  # assumed model-FLOPs utilisation
    bus_bandwidth: float = 200e9  # assumed collective bus bandwidth per GPU (NVLink), bytes/s
    samples: int = 665_000
    tokens: int = 900  # per sample, the 576 image tokens included
    response_tokens: int = 150  # per sample: where CE and the logit terms read the LM heads (assumed)
    global_batch: int = 128
    micro_batch: int = 8
    vision_from_layer: int = 6
    lora_r: int = 16
    logit_chunk_rows: int = 1024
    max_live_parameters: float = 1e9  # configs/zero3.json stage3_max_live_parameters

    @property
    def accumulation(self) -> int:
        """Micro-batches per GPU per optimisation step."""
        return self.global_batch // (self.gpus * self.micro_batch)

    def shape(self, cfg) -> Shape:
        """A micro-batch of the student."""
        v = cfg.vision_config
        used = v.num_hidden_layers - 1  # LLaVA reads the penultimate layer; set_trainable tunes layers up to it
        return Shape(self.micro_batch, self.tokens, 1, (v.image_size // v.patch_size) ** 2 + 1, used - self.vision_from_layer)


def lora_params(t, r: int) -> int:
    """LoRA parameters on q, k, v, o, gate, up and down of every decoder layer (r x (in + out) each)."""
    h, f = t.hidden_size, t.intermediate_size
    return t.num_hidden_layers * r * (4 * 2 * h + 3 * (h + f))


def trainable_params(cfg, run: Run, lora: bool) -> tuple[int, int]:
    """(trainable, frozen) student parameters: LLM (or its LoRA), projector, vision layers from run.vision_from_layer.

    A LoRA student keeps a frozen original of every fully trained module (peft modules_to_save).
    """
    counts, v = llava_params(cfg), vision_params(cfg.vision_config)
    vision = run.shape(cfg).vision_layers_with_grad * v["layer"]
    if lora:
        trainable = lora_params(cfg.text_config, run.lora_r) + counts["projector"] + vision
        return trainable, counts["total"] + counts["projector"] + vision
    trainable = counts["llm"] + counts["projector"] + vision
    return trainable, counts["total"] - trainable


ENGINES = ("DDP", "ZeRO-2", "ZeRO-3", "ZeRO-3 + LoRA", "offline teacher cache (ZeRO-2)")


def memory(engine: str, student, teacher, run: Run, checkpointing: bool) -> dict[str, float]:
    """Estimated bytes per GPU by part (bf16 weights; AdamW with fp32 master weights: 16 bytes per trainable parameter)."""
    n, lora = run.gpus, engine.endswith("LoRA")
    trainable, frozen = trainable_params(student, run, lora)
    zero = 3 if engine.startswith("ZeRO-3") else 2 if "ZeRO-2" in engine else 0
    biggest = student.text_config.vocab_size * student.text_config.hidden_size  # embeddings / LM head
    parts = {
        "student weights": (2 * (trainable + frozen)) / (n if zero == 3 else 1),
        "gradients": 2 * trainable / (n if zero >= 2 else 1),
        "optimizer": 12 * trainable / (n if zero >= 1 else 1),
        "gathered (ZeRO-3)": 2 * 2 * biggest if zero == 3 else 0.0,
        "activations": activation_bytes(student, run.shape(student), checkpointing),
        "logit-pass chunks": run.logit_chunk_rows * student.text_config.vocab_size * 4 * 4,
    }
    t = teacher.text_config
    if "offline" in engine:
        parts["teacher"] = 0.0
    else:
        weights = 2 * llava_params(teacher)["total"]
        head = 2 * t.vocab_size * t.hidden_size  # a whole copy of its LM head, kept on every rank
        parts["teacher"] = weights / n + 2 * 2 * t.vocab_size * t.hidden_size + head if zero == 3 else weights
        # no-grad forward: its last hidden states for the terms, one layer's temporaries
        parts["teacher"] += 2 * run.micro_batch * run.tokens * (t.hidden_size + 2 * t.intermediate_size + 4 * t.hidden_size)
    parts["total"] = sum(parts.values())
    return parts


def forward_flops(cfg, run: Run, per_sample_rows: int) -> dict[str, float]:
    """Forward FLOPs per sample by part: vision tower, projector, language model layers, LM head rows."""
    v, t = cfg.vision_config, cfg.text_config
    vp, tp = vision_params(v), text_params(t)
    n_vis = (v.image_size // v.patch_size) ** 2 + 1
    vision_layer = 2 * vp["layer"] * n_vis + 4 * n_vis * n_vis * v.hidden_size
    text_layer = 2 * tp["layer"] * run.tokens + 2 * run.tokens * run.tokens * t.hidden_size  # causal attention
    return {"vision_layer": vision_layer, "vision_layers": v.num_hidden_layers,
            "projector": 2 * llava_params(cfg)["projector"] * (n_vis - 1),
            "text_layer": text_layer, "text_layers": t.num_hidden_layers,
            "lm_head": 2 * t.vocab_size * t.hidden_size * per_sample_rows}


def step_time(engine: str, student, teacher, run: Run, checkpointing: bool) -> dict[str, float]:
    """Estimated seconds per optimisation step: compute at the assumed MFU, and communication apart."""
    lora, s = engine.endswith("LoRA"), forward_flops(student, run, run.response_tokens)
    tuned = run.shape(student).vision_layers_with_grad
    fwd = s["vision_layers"] * s["vision_layer"] + s["projector"] + s["text_layers"] * s["text_layer"] + s["lm_head"]
    # backward: input gradients (1x forward) through every layer after the first tuned one, weight gradients (1x)
    # where weights train; LoRA trains no LLM weight (its own are negligible)
    weight_grads = s["projector"] + tuned * s["vision_layer"] + (0 if lora else s["text_layers"] * s["text_layer"] + s["lm_head"])
    input_grads = s["projector"] + tuned * s["vision_layer"] + s["text_layers"] * s["text_layer"] + s["lm_head"]
    recompute = (s["vision_layers"] * s["vision_layer"] + s["text_layers"] * s["text_layer"]) if checkpointing else 0
    student_flops = fwd + weight_grads + input_grads + recompute
    teacher_flops = 0.0
    if "offline" not in engine:
        tf = forward_flops(teacher, run, run.response_tokens)
        teacher_flops = tf["vision_layers"] * tf["vision_layer"] + tf["projector"] + tf["text_layers"] * tf["text_layer"] \
            + tf["lm_head"]
    per_gpu = run.global_batch * (student_flops + teacher_flops) / run.gpus
    compute = per_gpu / (run.peak_flops * run.mfu)
    return {"compute": compute, "communication": communication_bytes(engine, student, teacher, run, checkpointing)
            / run.bus_bandwidth}


def communication_bytes(engine: str, student, teacher, run: Run, checkpointing: bool) -> float:
    """Bytes each GPU sends per optimisation step in its collectives (ring: (n-1)/n of the data per pass)."""
    ring = (run.gpus - 1) / run.gpus
    lora = engine.endswith("LoRA")
    trainable, frozen = trainable_params(student, run, lora)
    if engine == "DDP":  # one all-reduce of bf16 gradients per step (no sync while accumulating)
        return 2 * ring * 2 * trainable
    grads = run.accumulation * ring * 2 * trainable  # reduce-scatter of bf16 gradients every micro-batch
    if engine.startswith("ZeRO-3"):  # all-gather the weights for forward, backward (and the recompute)
        gathers = 3 if checkpointing else 2
        teacher_gather = ring * 2 * llava_params(teacher)["total"]
        return grads + run.accumulation * (gathers * ring * 2 * (trainable + frozen) + teacher_gather)
    return grads + ring * 2 * trainable  # ZeRO-2: all-gather the updated bf16 weights once per step


# ----------------------------------------------------------------------------- report

def _check_params() -> None:
    print("## Parameter counts: formula vs the architecture built on the meta device\n")
    print("| model | part | formula | meta device | ratio |\n|---|---|---|---|---|")
    for name, make in (TEACHER, STUDENT):
        cfg = make()
        ours, real = llava_params(cfg), meta_params(cfg)
        for part in ours:
            print(f"| {name} | {part} | {ours[part]:,} | {real[part]:,} | {ours[part] / real[part]:.4f} |")


def _check_activations() -> None:
    print("\n## Activations: formula vs a small LLaVA's forward on the CPU (fp32, batch 4 x 300 tokens, 257 vision tokens)\n")
    print("| checkpointing | formula (MB) | saved by autograd (MB) | RSS growth (MB) | formula / saved |\n|---|---|---|---|---|")
    for checkpointing in (False, True):
        formula, saved, grown = measure_activations(checkpointing)
        print(f"| {'yes' if checkpointing else 'no'} | {formula / 1e6:.1f} | {saved / 1e6:.1f} | {grown / 1e6:.1f} | "
              f"{formula / saved:.2f} |")


def _table(run: Run) -> None:
    student, teacher = STUDENT[1](), TEACHER[1]()
    steps = run.samples // run.global_batch
    print(f"\n## Per-GPU estimate: {run.gpus} x {run.gpu_memory / GB:.0f} GB, micro-batch {run.micro_batch} x "
          f"{run.tokens} tokens, accumulation {run.accumulation}, global batch {run.global_batch}, {steps:,} steps\n")
    print("| engine | checkpointing | student weights | grads | optimizer | activations | teacher | other | "
          "total (GB) | fits | compute (s/step) | comm (s/step) | epoch (h, compute + comm) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for engine in ENGINES:
        for checkpointing in (False, True):
            m = memory(engine, student, teacher, run, checkpointing)
            t = step_time(engine, student, teacher, run, checkpointing)
            other = m["gathered (ZeRO-3)"] + m["logit-pass chunks"]
            hours = steps * (t["compute"] + t["communication"]) / 3600
            print(f"| {engine} | {'yes' if checkpointing else 'no'} | {m['student weights'] / GB:.1f} | "
                  f"{m['gradients'] / GB:.1f} | {m['optimizer'] / GB:.1f} | {m['activations'] / GB:.1f} | "
                  f"{m['teacher'] / GB:.1f} | {other / GB:.1f} | **{m['total'] / GB:.1f}** | "
                  f"{'yes' if m['total'] < 0.9 * run.gpu_memory else 'no'} | {t['compute']:.2f} | "
                  f"{t['communication']:.2f} | {hours:.1f} |")
    t = teacher.text_config
    topk = run.samples * run.response_tokens * 64 * (4 + 2)
    hidden = run.samples * run.response_tokens * t.hidden_size * 2
    print(f"\nOffline teacher cache for the whole set: top-64 ids + log-probs at {run.response_tokens} response "
          f"positions per sample: {topk / 1e9:.0f} GB; hidden_mse would also need the teacher's last hidden states "
          f"there: {hidden / 1e12:.2f} TB in bf16.")


def main() -> None:
    """Print the parameter check, the activation check and the per-GPU table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=Run.mfu, help="assumed model-FLOPs utilisation")
    parser.add_argument("--micro-batch", type=int, default=Run.micro_batch)
    parser.add_argument("--skip-cpu-check", action="store_true", help="no activation measurement on the CPU")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _check_params()
    if not args.skip_cpu_check:
        _check_activations()
    _table(Run(mfu=args.mfu, micro_batch=args.micro_batch))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n(this process's peak RSS: {peak:.0f} MB)")


if __name__ == "__main__":
    main()
