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

import numpy as np
import torch

from llavadi.atomic import staged_folder, write_json_atomic
from llavadi.export.support import GgufPlan, check_gguf_support

EXPORT_FILE = "export.json"
EXPORT_KIND = "llavadi-export"
MMPROJ_FILE = "mmproj-f16.gguf"
# quantization name -> llama.cpp's LLAMA_FTYPE_* value (include/llama.h); f32 and f16 need no quantizer
QUANT_FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q5_0": 8, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
DEFAULT_QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
# the mmproj's position table layouts ("auto": probe the installed llama.cpp, see llavadi.export.gguf_probe)
POSITION_ORDERS = ("hf", "rotated")
POSITION_CHOICES = ("auto", *POSITION_ORDERS)
POSITION_TABLE_KEY = "llavadi.position_table"  # the mmproj's metadata key recording the layout written


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


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


def _weight(tensor: torch.Tensor, half: bool) -> np.ndarray:
    """Matrices in f16 when `half`; vectors (norms, biases) stay f32, as llama.cpp's converters keep them."""
    array = _f32(tensor)
    return array.astype(np.float16) if half and array.ndim >= 2 else array


def _rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF LLaMA's q/k rows (rotate-half RoPE) in the interleaved order llama.cpp's RoPE reads."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rope_theta(text_config) -> float:
    params = getattr(text_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))


def _write_text_hparams(writer, text_config, n_vocab: int, ftype: int) -> None:
    import gguf

    t = text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_hidden_layers)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(t.num_attention_heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(t))
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(ftype)
    writer.add_type(gguf.GGUFType.MODEL)


def _text_tensors(model, half: bool):
    """(GGUF base name, array) of the language model, q/k permuted for llama.cpp's RoPE."""
    import gguf

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    lm = model.model.language_model
    n_head, n_kv = lm.config.num_attention_heads, lm.config.num_key_value_heads
    yield names[T.TOKEN_EMBD], _weight(lm.embed_tokens.weight, half)
    for i, layer in enumerate(lm.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield names[T.ATTN_NORM].format(bid=i), _f32(layer.input_layernorm.weight)
        yield names[T.ATTN_Q].format(bid=i), _weight(_rope_permute(attn.q_proj.weight, n_head), half)
        yield names[T.ATTN_K].format(bid=i), _weight(_rope_permute(attn.k_proj.weight, n_kv), half)
        yield names[T.ATTN_V].format(bid=i), _weight(attn.v_proj.weight, half)
        yield names[T.ATTN_OUT].format(bid=i), _weight(attn.o_proj.weight, half)
        yield names[T.FFN_NORM].format(bid=i), _f32(layer.post_attention_layernorm.weight)
        yield names[T.FFN_GATE].format(bid=i), _weight(mlp.gate_proj.weight, half)
        yield names[T.FFN_UP].format(bid=i), _weight(mlp.up_proj.weight, half)
        yield names[T.FFN_DOWN].format(bid=i), _weight(mlp.down_proj.weight, half)
    yield names[T.OUTPUT_NORM], _f32(lm.norm.weight)
    yield names[T.OUTPUT], _weight(model.get_output_embeddings().weight, half)


def _vocabulary(tokenizer, plan: GgufPlan, n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """Token strings, types and scores, padded to the embedding's rows with unused tokens."""
    import gguf

    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL)
        elif plan.vocabulary == "bert":  # llama.cpp's WPM: "##x" continues a word, anything else starts one
            tokens.append(tok[2:] if tok.startswith("##") else "\u2581" + tok)
            types.append(gguf.TokenType.NORMAL)
        else:  # LLaMA's byte-fallback BPE: <0xNN> byte tokens, "▁" marks a space
            tokens.append(tok)
            types.append(gguf.TokenType.BYTE if len(tok) == 6 and tok.startswith("<0x") else gguf.TokenType.NORMAL)
        scores.append(-float(i))  # SPM merges by score: earlier (more frequent) tokens first
    return tokens, [int(t) for t in types], scores


def _write_vocabulary(writer, tokenizer, plan: GgufPlan, n_vocab: int) -> None:
    tokens, types, scores = _vocabulary(tokenizer, plan, n_vocab)
    writer.add_tokenizer_model(plan.vocabulary)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if plan.vocabulary == "llama":
        writer.add_token_scores(scores)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    writer.add_bos_token_id(int(ids["bos"] if ids["bos"] is not None else ids["eos"]))
    writer.add_eos_token_id(int(ids["eos"]))
    if ids["unk"] is not None:
        writer.add_unk_token_id(int(ids["unk"]))
    writer.add_pad_token_id(int(ids["pad"]))
    writer.add_sep_token_id(int(ids["eos"]))  # WPM's defaults (sep 102, mask 103) would name ordinary tokens
    writer.add_mask_token_id(int(ids["unk"] if ids["unk"] is not None else ids["eos"]))
    writer.add_add_bos_token(ids["bos"] is not None)
    writer.add_add_sep_token(False)
    writer.add_add_eos_token(False)


def write_text_gguf(model, tokenizer, plan: GgufPlan, path: str, half: bool, name: str) -> None:
    """The language model as a llama.cpp GGUF (f16 matrices when `half`, else f32)."""
    import gguf

    n_vocab = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    _write_text_hparams(writer, model.config.text_config, n_vocab, QUANT_FTYPES["f16" if half else "f32"])
    _write_vocabulary(writer, tokenizer, plan, n_vocab)
    for tensor_name, array in _text_tensors(model, half):
        writer.add_tensor(tensor_name + ".weight", array)
    _finish(writer)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def position_table(weight: torch.Tensor, order: str) -> torch.Tensor:
    """CLIP's position embedding table as written for `order`: "hf" as it is; "rotated" for [patches, CLS].

    "rotated": row i = HF row i+1 for i < n, row n = HF row 0, so that a graph that appends the class
    token after the n patches and adds rows 0..n in order gives each patch and the class token their own.
    """
    if order == "hf":
        return weight
    if order == "rotated":
        return torch.cat([weight[1:], weight[:1]], dim=0)
    raise ValueError(f"unknown position table order {order!r}; choose from {', '.join(POSITION_ORDERS)}")


def _vision_tensors(model, blocks: int, order: str = "hf", half: bool = True):
    """(GGUF name, array) of the CLIP blocks LLaVA reads and the projector, in llama.cpp's mmproj names."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # transformers 5's CLIPVisionModel holds the parts itself
    emb = tower.embeddings
    yield "v.class_embd", _f32(emb.class_embedding)
    yield "v.patch_embd.weight", _f32(emb.patch_embedding.weight).astype(np.float16)  # ggml's conv takes f16
    if emb.patch_embedding.bias is not None:
        yield "v.patch_embd.bias", _f32(emb.patch_embedding.bias)
    yield "v.position_embd.weight", _weight(position_table(emb.position_embedding.weight, order), half)
    yield "v.pre_ln.weight", _f32(tower.pre_layrnorm.weight)
    yield "v.pre_ln.bias", _f32(tower.pre_layrnorm.bias)
    for i, layer in enumerate(tower.encoder.layers[:blocks]):
        parts = {"attn_q": layer.self_attn.q_proj, "attn_k": layer.self_attn.k_proj, "attn_v": layer.self_attn.v_proj,
                 "attn_out": layer.self_attn.out_proj, "ln1": layer.layer_norm1, "ln2": layer.layer_norm2,
                 "ffn_up": layer.mlp.fc1, "ffn_down": layer.mlp.fc2}
        for part, module in parts.items():
            yield f"v.blk.{i}.{part}.weight", _weight(module.weight, half)
            yield f"v.blk.{i}.{part}.bias", _f32(module.bias)
    projector = model.model.multi_modal_projector
    for index, linear in ((0, projector.linear_1), (2, projector.linear_2)):
        yield f"mm.{index}.weight", _weight(linear.weight, half)
        yield f"mm.{index}.bias", _f32(linear.bias)


def write_mmproj_gguf(model, image_processor, plan: GgufPlan, path: str, name: str, order: str = "hf",
                      half: bool = True) -> None:
    """The vision tower + projector as llama.cpp's LLaVA-1.5 `mmproj` GGUF (f16 matrices unless not `half`).

    `order` is the position table's layout (`position_table`); it is recorded under `llavadi.position_table`.
    """
    import gguf

    v = model.config.vision_config
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(QUANT_FTYPES["f16" if half else "f32"])
    writer.add_string(POSITION_TABLE_KEY, order)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", v.hidden_act == "gelu")  # else quick GELU, CLIP's default
    writer.add_uint32("clip.vision.image_size", v.image_size)
    writer.add_uint32("clip.vision.patch_size", v.patch_size)
    writer.add_uint32("clip.vision.embedding_length", v.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", model.config.text_config.hidden_size)
    writer.add_uint32("clip.vision.attention.head_count", v.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
    writer.add_uint32("clip.vision.block_count", plan.feature_layer)
    writer.add_array("clip.vision.feature_layer", [plan.feature_layer])
    writer.add_array("clip.vision.image_mean", [float(x) for x in image_processor.image_mean])
    writer.add_array("clip.vision.image_std", [float(x) for x in image_processor.image_std])
    for tensor_name, array in _vision_tensors(model, plan.feature_layer, order, half):
        writer.add_tensor(tensor_name, array)
    _finish(writer)


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
