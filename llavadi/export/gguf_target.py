"""`llavadi export --to gguf`: a saved LLaVA-1.5 model as llama.cpp files, in the quantizations asked.

Writes into the output folder:
- `model-<quant>.gguf` per quantization: the LLaMA language model (architecture `llama`);
  f32 and f16 are written here with the `gguf` package (llama.cpp's own GGUF writer), every
  other type (q8_0, q4_0, q4_k_m, ...) by llama.cpp's own quantizer (`llama_model_quantize`
  through llama-cpp-python) from an f32 file written first and deleted after;
- `mmproj-f16.gguf`: the CLIP vision tower (the blocks LLaVA reads, no post-layernorm) and the
  projector, as llama.cpp's LLaVA-1.5 files lay them out (projector type `mlp`); shared by all
  variants, kept in f16 (llama-cpp-python has no quantizer for it);
- the tokenizer files, `llavadi.json` (how the model is prompted) and `export.json`, the
  manifest `llavadi eval --model` reads: each variant's files, sizes and per-tensor types.

llama.cpp's k-quants pack rows of 256 weights: a tensor whose rows are not a multiple of 256
(every tensor of a 128-wide model) is stored in the quantizer's fallback type (q4_K -> q5_0,
q6_K -> q8_0); the manifest records the types actually written. The folder is built beside
the destination and renamed into place, so a failed export leaves no partial folder.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

from llavadi.atomic import staged_folder, write_json_atomic
from llavadi.export.gguf_files import POSITION_ORDERS, QUANT_FTYPES, write_mmproj_gguf, write_text_gguf
from llavadi.export.support import GgufPlan, check_gguf_support

EXPORT_FILE = "export.json"
EXPORT_KIND = "llavadi-export"
MMPROJ_FILE = "mmproj-f16.gguf"
DEFAULT_QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
# the mmproj's position table layouts, or "auto": probe the installed llama.cpp (llavadi.export.gguf_probe)
POSITION_CHOICES = ("auto", *POSITION_ORDERS)


def model_file(quant: str) -> str:
    """The language-model file name of a quantization."""
    return f"model-{quant}.gguf"


def parse_quants(text: str | list[str]) -> list[str]:
    """Quantization names from 'f16,q8_0' (or a list); unknown names are refused, listing the known ones."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in QUANT_FTYPES]
    if unknown or not names:
        raise ValueError(f"unknown quantization {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(QUANT_FTYPES)}")
    return list(dict.fromkeys(names))


def quantize_gguf(src: str, dst: str, quant: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from `src` to `dst` in `quant`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if code != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant} (llama_model_quantize returned {code})")


def tensor_types(path: str) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds (what a quantization actually wrote)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def _needs_quantizer(quants: list[str]) -> bool:
    return any(q not in ("f32", "f16") for q in quants)


def _write_variants(bundle, plan: GgufPlan, folder: str, quants: list[str], name: str, threads: int) -> dict:
    """Every language-model file asked for, into `folder`; returns the manifest's variants."""
    base = None
    if _needs_quantizer(quants) or "f32" in quants:
        base = os.path.join(folder, model_file("f32"))
        write_text_gguf(bundle.model, bundle.tokenizer, plan, base, half=False, name=name)
    if "f16" in quants:
        write_text_gguf(bundle.model, bundle.tokenizer, plan, os.path.join(folder, model_file("f16")), half=True,
                        name=name)
    for quant in quants:
        if quant not in ("f32", "f16"):
            quantize_gguf(base, os.path.join(folder, model_file(quant)), quant, threads)
    if base is not None and "f32" not in quants:
        os.unlink(base)
    variants = {}
    for quant in quants:
        path = os.path.join(folder, model_file(quant))
        variants[quant] = {"model": model_file(quant), "mmproj": MMPROJ_FILE, "model_bytes": os.path.getsize(path),
                           "tensor_types": tensor_types(path)}
    return variants


def resolve_position_order(choice: str) -> dict:
    """The mmproj position table to write for `choice` (auto, hf, rotated) and why: the manifest's `position_table`.

    "auto" probes the installed llama.cpp (`gguf_probe`): "rotated" when its LLaVA graph reads the
    class token after the patches, "hf" when it reads CLIP's order; without llama-cpp-python, "hf",
    recorded as not probed.
    """
    if choice not in POSITION_CHOICES:
        raise ValueError(f"unknown position table {choice!r}; choose from {', '.join(POSITION_CHOICES)}")
    if choice != "auto":
        return {"order": choice, "chosen_by": "forced", "probe": None}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"order": "hf", "chosen_by": "not probed: llama-cpp-python is not installed", "probe": None}
    from llavadi.export.gguf_probe import probe_class_token_order

    probe = probe_class_token_order()
    return {"order": "rotated" if probe["class_token_last"] else "hf", "chosen_by": "probe", "probe": probe}


def _manifest(model_dir: str, bundle, plan: GgufPlan, variants: dict) -> dict:
    from llavadi.identity import folder_identity

    config = bundle.model.config
    return {"kind": EXPORT_KIND, "version": 1, "target": "gguf", "source": os.path.abspath(model_dir),
            "source_identity": folder_identity(model_dir), "vocabulary": plan.vocabulary,
            "image_token_id": int(config.image_token_id), "n_image_tokens": bundle.n_image_tokens,
            "image_size": int(config.vision_config.image_size),
            "n_vocab": int(bundle.model.get_input_embeddings().weight.shape[0]),
            "mmproj_bytes": None, "variants": variants}


def export_gguf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, quants=DEFAULT_QUANTS, force: bool = False,
                threads: int = 0, position_table: str = "auto") -> dict:
    """Export a saved LLaVA-1.5 folder to llama.cpp files in `out_dir`; returns the manifest.

    Refused before any weights load when llama.cpp cannot take the model (`support`), when a
    quantization needs llama-cpp-python and it is not installed, or when `out_dir` exists
    (unless `force`: then it is replaced once the new folder is complete). `position_table`
    (auto, hf, rotated) lays out the mmproj's position embeddings (`resolve_position_order`).
    """
    from llavadi.models.build import load_llava_dir
    from llavadi.models.meta import write_model_meta

    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    quants = parse_quants(quants)
    plan = check_gguf_support(model_dir)
    _require_packages(quants)
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    positions = resolve_position_order(position_table)
    bundle = load_llava_dir(model_dir, dtype=torch.float32)
    name = os.path.basename(os.path.abspath(model_dir))
    with staged_folder(out_dir) as tmp:
        write_mmproj_gguf(bundle.model, bundle.image_processor, plan, os.path.join(tmp, MMPROJ_FILE), name,
                          order=positions["order"])
        variants = _write_variants(bundle, plan, tmp, quants, name, threads)
        bundle.tokenizer.save_pretrained(tmp)  # llavadi encodes the prompts; llama.cpp runs the ids
        bundle.image_processor.save_pretrained(tmp)
        bundle.model.config.save_pretrained(tmp)
        bundle.model.generation_config.save_pretrained(tmp)
        write_model_meta(tmp, dict(bundle.meta), bundle.model.config)
        manifest = _manifest(model_dir, bundle, plan, variants)
        manifest["mmproj_bytes"] = os.path.getsize(os.path.join(tmp, MMPROJ_FILE))
        manifest["position_table"] = positions
        write_json_atomic(os.path.join(tmp, EXPORT_FILE), manifest)
    return manifest


def _require_packages(quants: list[str]) -> None:
    """The packages the export needs, or an error saying how to install them."""
    missing = []
    try:
        import gguf  # noqa: F401
    except ImportError:
        missing.append("gguf")
    if _needs_quantizer(quants):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            missing.append("llama-cpp-python")
    if missing:
        raise ImportError(f"the GGUF export needs {' and '.join(missing)}: pip install 'llavadi[export]'")
