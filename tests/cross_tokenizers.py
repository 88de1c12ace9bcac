"""Two really different tiny tokenizers for cross-tokenizer tests, built offline with the `tokenizers` library.

- ``byte_level_bpe()``: GPT-2/Qwen style, byte-level BPE (``Ġ`` spaces), a ChatML chat template with
  ``<|im_start|>`` / ``<|im_end|>``.
- ``sentencepiece_bpe()``: LLaMA style, BPE over ``▁``-marked text with byte fallback (``<0xNN>``) for
  every character outside its small alphabet, ``<s>`` added in front, ``</s>`` end of turn.
"""

from __future__ import annotations

from functools import cache

CORPUS = [
    "the red circle is left of 12 blue squares, and 3 green triangles.",
    "How many shapes are there? There are three. What color is the square? It is yellow.",
    "A chat between a curious human and an artificial intelligence assistant. USER: ASSISTANT:",
    "describe the picture: a cat and a dog, 0 1 2 3 4 5 6 7 8 9 1999 2026 hello world",
] * 30

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@cache
def byte_level_bpe(vocab_size: int = 400):
    """A byte-level BPE fast tokenizer with `<image>` and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 extra_special_tokens={"image_token": "<image>"})
    hf.chat_template = CHATML
    return hf


@cache
def sentencepiece_bpe(vocab_size: int = 300):
    """A SentencePiece-like BPE fast tokenizer (``▁``, byte fallback) with `<s>` in front and `</s>`."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size + len(specials), special_tokens=specials,
                                                        limit_alphabet=40))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # byte pieces are ordinary vocabulary entries of a SentencePiece model, not added tokens
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


ANSWERS = ["a red circle", "There are 3 blue squares.", "yes", "the green one, on the left"]


def write_pair(root) -> list[dict]:
    """A SentencePiece-BPE student (32 px), a wider byte-level-BPE teacher (64 px) and 4 images under `root`;
    returns 8 samples of LLaVA JSON about them, for the caller to edit and write."""
    from conftest import make_image_processor, make_tiny_llava, write_images

    from llavadi.models.build import LoadedModel, save_model

    student_tok, teacher_tok = sentencepiece_bpe(), byte_level_bpe()
    save_model(LoadedModel(make_tiny_llava(student_tok), student_tok, make_image_processor(32), {}),
               str(root / "student"))
    save_model(LoadedModel(make_tiny_llava(teacher_tok, text_hidden=48, image_size=64, seed=1), teacher_tok,
                           make_image_processor(64), {}), str(root / "teacher"))
    write_images(root / "imgs", 4)
    return [{"id": f"s{i}", "image": f"img{i % 4}.png",
             "conversations": [{"from": "human", "value": "<image>\nwhat is there?"},
                               {"from": "gpt", "value": ANSWERS[i % 4]}]} for i in range(8)]
