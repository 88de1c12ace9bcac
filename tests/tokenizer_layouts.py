"""Tokenizers and checkpoint folders in the layouts users download, built offline with narrow random weights.

- ``llama_style_tokenizer(extra)``: a LLaMA-style BPE (SentencePiece-like "▁" word starts, byte
  fallback, <unk> <s> </s> at 0..2) of N base tokens, then the `extra` added tokens at N, N+1...
- ``write_llava_hf_teacher``: a llava-hf LLaVA-1.5-style folder: tokenizer N + <image> (N) + <pad>
  (N+1), text_config.vocab_size padded to a multiple of 64, image_token_index N.
- ``write_clip_tower`` / ``write_llama_llm``: a CLIP vision folder and a LLaMA-style LLM folder whose
  tokenizer is the N base tokens (the composed student adds <image> at N: vocabulary N+1).
"""

from __future__ import annotations

import os

import torch

CORPUS = [
    "USER: what color is the shape in the top left? ASSISTANT: red",
    "how many circles are there in the picture? three circles and one square",
    "describe the image: a blue triangle in the middle, a yellow square at the bottom right",
    "is there a green circle? yes there is a green circle on the left",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "hello world 0 1 2 3 4 5 6 7 8 9 cat dog",
]


def llama_style_tokenizer(extra: tuple[str, ...] = (), vocab_size: int = 256, pad: str | None = None):
    """A LLaMA-style BPE fast tokenizer of `vocab_size` base tokens plus `extra` added special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # SentencePiece-like: words start with "▁" and no token spans two words
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 padding_side="right")
    if extra:
        hf.add_special_tokens({"additional_special_tokens": list(extra)})
    if pad is not None:
        hf.pad_token = pad
    return hf


def _vision_config(image_size: int = 32, patch: int = 16):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=patch, projection_dim=32)


def _llama_config(vocab: int, tokenizer, width: int, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def _image_processor(image_size: int = 32):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def write_llava_hf_teacher(folder: str, n_base: int = 256, width: int = 48, seed: int = 0):
    """A llava-hf LLaVA-1.5-layout teacher folder; returns its tokenizer."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = llama_style_tokenizer(("<image>", "<pad>"), n_base, pad="<pad>")
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [n_base, n_base + 1]
    padded = -(-(n_base + 2) // 64) * 64  # llava-hf pads the embeddings to a multiple of 64
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=_vision_config(), text_config=_llama_config(padded, tokenizer, width),
                         image_token_index=n_base, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=n_base + 1)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _image_processor().save_pretrained(folder)
    return tokenizer


def write_clip_tower(folder: str, seed: int = 1) -> None:
    """A CLIP vision encoder folder (config, weights, image processor)."""
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(_vision_config()).save_pretrained(folder)
    _image_processor().save_pretrained(folder)


def write_llama_llm(folder: str, n_base: int = 256, width: int = 32, seed: int = 2):
    """A LLaMA-style causal LM folder with the N-token tokenizer (no <image>, no <pad>); returns its tokenizer."""
    from transformers import LlamaForCausalLM

    tokenizer = llama_style_tokenizer((), n_base)
    torch.manual_seed(seed)
    LlamaForCausalLM(_llama_config(n_base, tokenizer, width)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_pair(root: str, n_base: int = 256) -> tuple[str, str, str]:
    """The paper's pair in llava-hf layout under `root`: (teacher folder, vision folder, llm folder)."""
    paths = tuple(os.path.join(root, name) for name in ("llava-1.5-hf", "clip", "mobilellama"))
    write_llava_hf_teacher(paths[0], n_base)
    write_clip_tower(paths[1])
    write_llama_llm(paths[2], n_base)
    return paths
