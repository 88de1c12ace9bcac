"""llama.cpp's GGUF files of a LLaVA-1.5 model: the language model and the `mmproj` (vision tower + projector).

Written with the `gguf` package (llama.cpp's own GGUF writer) in f32 or f16, in the layout of
llama.cpp's converters: q/k rows permuted for its RoPE, CLIP's `fc1`/`fc2` as `ffn_up`/`ffn_down`,
the class token kept (llama.cpp drops it as the `default` feature strategy does), no
post-layernorm (LLaVA never reads it). The position table is written in CLIP's order ("hf") or
rotated for a graph that appends the class token after the patches (`position_table`).
"""

from __future__ import annotations

import numpy as np
import torch

from llavadi.export.support import GgufPlan

# quantization name -> llama.cpp's LLAMA_FTYPE_* value (include/llama.h); f32 and f16 need no quantizer
QUANT_FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q5_0": 8, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
POSITION_ORDERS = ("hf", "rotated")
POSITION_TABLE_KEY = "llavadi.position_table"  # the mmproj's metadata key recording the layout written


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
