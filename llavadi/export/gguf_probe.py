"""Which token order the installed llama.cpp's LLaVA graph reads, found by running it once.

llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp in the llama-cpp-python 0.3.36 build;
ggml-org/llama.cpp issue 25814) appends CLIP's class token after the patches while it adds the
position table's rows 0..n in order and keeps rows 1..n. An mmproj whose table is written
"rotated" (`gguf_files.position_table`) gives every token its own position embedding under that
graph; under a graph that reads [CLS, patches] as CLIP does, the rotation would be the defect.
So `llavadi export --position-table auto` asks the runtime: a tiny random LLaVA (the demo's
student preset) is written with the HF table (f32 matrices) and run through llama.cpp's mtmd;
its image embeddings are compared with the HF tower + projector read in CLIP's order and in
llama.cpp's [patches, CLS] order. The answer is kept for the process.
"""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np

# llama.cpp's embeddings equal one order's within this share of their largest magnitude (f16 patch
# convolution, tanh GELU, f32 matmuls: measured 4e-5 absolute on a scale near 1) and differ from
# the other's by more than DIFFERENT (the two orders differ by about the embeddings' own scale)
SAME, DIFFERENT = 1e-2, 1e-1


class ProbeInconclusive(RuntimeError):
    """llama.cpp's image embeddings match neither token order; the message gives both distances."""


def _hf_embeddings(model, pixels, order: str | None) -> np.ndarray:
    """The HF model's projected image features: CLIP's order (None) or llama.cpp's with the `order` table."""
    import torch

    from llavadi.export.gguf_runtime import read_tokens_as_llama_cpp

    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    saved = embeddings.forward
    try:
        if order is not None:
            read_tokens_as_llama_cpp(tower, order)
        with torch.no_grad():
            return model.get_image_features(pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
                                            vision_feature_select_strategy="default").pooler_output[0].numpy()
    finally:
        embeddings.forward = saved


def _tiny_model():
    """The demo's student preset with random weights (seed 0), without touching the global RNG."""
    import torch

    from llavadi.models.presets import build_preset

    with torch.random.fork_rng(devices=[]):
        model, tokenizer, processor = build_preset("tiny-student", seed=0)
    return model.eval(), tokenizer, processor


@functools.cache
def probe_class_token_order() -> dict:
    """Run the installed llama.cpp once on a tiny mmproj; returns {"class_token_last": bool, distances, runtime}.

    `class_token_last` is True when llama.cpp reads [patches, CLS] with rows 0..n of the table (the
    defect), False when it reads CLIP's [CLS, patches]; ProbeInconclusive when it matches neither.
    """
    import llama_cpp
    from PIL import Image

    from llavadi.export.gguf_files import write_mmproj_gguf, write_text_gguf
    from llavadi.export.gguf_runtime import GgufRuntime
    from llavadi.export.support import GgufPlan, vision_blocks

    model, tokenizer, processor = _tiny_model()
    plan = GgufPlan(vocabulary="bert", feature_layer=vision_blocks(model.config, "the probe's tiny model"))
    side = int(model.config.vision_config.image_size)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory(prefix="llavadi-probe-") as tmp:
        text_path, mmproj_path = os.path.join(tmp, "model-f32.gguf"), os.path.join(tmp, "mmproj-f32.gguf")
        write_text_gguf(model, tokenizer, plan, text_path, half=False, name="probe")
        write_mmproj_gguf(model, processor, plan, mmproj_path, "probe", order="hf", half=False)
        runtime = GgufRuntime(text_path, mmproj_path, model.config, model.generation_config, threads=1, n_ctx=64)
        try:
            theirs = runtime.image_embeddings(image)
        finally:
            runtime.close()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    clip_order, cls_last = _hf_embeddings(model, pixels, None), _hf_embeddings(model, pixels, "hf")
    scale = float(np.abs(clip_order).max())
    result = {"runtime": f"llama-cpp-python {llama_cpp.__version__}", "scale": scale,
              "distance_clip_order": float(np.abs(theirs - clip_order).max()),
              "distance_class_token_last": float(np.abs(theirs - cls_last).max())}
    near = {k: result[k] <= SAME * scale for k in ("distance_clip_order", "distance_class_token_last")}
    far = {k: result[k] > DIFFERENT * scale for k in near}
    if near["distance_class_token_last"] and far["distance_clip_order"]:
        return {**result, "class_token_last": True}
    if near["distance_clip_order"] and far["distance_class_token_last"]:
        return {**result, "class_token_last": False}
    raise ProbeInconclusive(f"llama.cpp's image embeddings ({result['runtime']}) match neither token order "
                            f"(largest distance {result['distance_clip_order']:.3g} from CLIP's order, "
                            f"{result['distance_class_token_last']:.3g} from [patches, CLS], scale {scale:.3g}); "
                            "choose the position table with --position-table hf or rotated")
