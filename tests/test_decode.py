"""The decoding loop (llavadi.eval.decode) picks exactly the tokens HF `generate` picks on the same batch:
greedy with rows finishing at different steps (and leaving the batch), with and without padding, images and
text-only prompts mixed, sampled under one seed; other model types go to `generate` itself."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_tiny_llava, make_word_tokenizer

from llavadi.data.collator import pad_sequences
from llavadi.eval.decode import (
    PreallocatedLayer,
    decode,
    fast_decode_supported,
    hf_generate,
)

MAX_NEW = 12


@pytest.fixture(scope="module")
def model_and_batch():
    tok = make_word_tokenizer()
    model = make_tiny_llava(tok, text_hidden=64, seed=3).eval()
    image_id = model.config.image_token_id
    n_image = 4  # (32 px / 16 px patches)^2
    gen = torch.Generator().manual_seed(0)
    prompts = []
    for i in range(10):
        words = torch.randint(5, len(tok), (3 + i % 5,), generator=gen).tolist()
        prompts.append([tok.bos_token_id] + ([image_id] * n_image if i % 3 else []) + words)
    pixels = torch.randn(sum(image_id in p for p in prompts), 3, 32, 32, generator=gen)
    ids = pad_sequences(prompts, tok.pad_token_id, side="left")
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left")
    return model, tok, ids, mask, pixels


def _both(model, tok, ids, mask, pixels, eos, **sampling):
    kwargs = {} if pixels is None else {"pixel_values": pixels}
    image_id = [model.config.image_token_id]
    seed = sampling.pop("seed", 0)
    torch.manual_seed(seed)
    ours = decode(model, ids, mask, MAX_NEW, tok.pad_token_id, eos, image_id, **sampling, **kwargs)
    torch.manual_seed(seed)
    reference = hf_generate(model, ids, mask, MAX_NEW, tok.pad_token_id, eos, image_id, **sampling, **kwargs)
    return ours, reference


def test_greedy_tokens_equal_generate_when_rows_finish_at_different_steps(model_and_batch, monkeypatch):
    model, tok, ids, mask, pixels = model_and_batch
    kept = []  # the rows kept at each removal of finished rows
    select = PreallocatedLayer.batch_select_indices
    monkeypatch.setattr(PreallocatedLayer, "batch_select_indices",
                        lambda layer, indices: (kept.append(len(indices)), select(layer, indices))[1])
    assert fast_decode_supported(model)
    never = [tok.eos_token_id]
    ours, reference = _both(model, tok, ids, mask, pixels, never)
    assert ours == reference
    # an end token the model does emit mid-answer: rows stop at different steps and leave the batch
    counts = Counter(t for row in reference for t in row[1:] if t not in never)
    eos = [counts.most_common(1)[0][0]]
    ours, reference = _both(model, tok, ids, mask, pixels, eos)
    lengths = [len(r) for r in reference]
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW and len(set(lengths)) >= 3
    assert ours == reference
    assert kept and all(n < ids.shape[0] for n in kept)  # finished rows did leave the batch


def test_greedy_tokens_equal_generate_without_padding_or_images(model_and_batch):
    model, tok, ids, mask, _ = model_and_batch
    text_rows = [b for b in range(ids.shape[0]) if not (ids[b] == model.config.image_token_id).any()]
    length = int(mask[text_rows].sum(1).min())
    same_length = torch.stack([ids[b, -length:] for b in text_rows])  # no padding: the mask is dropped
    ours, reference = _both(model, tok, same_length, torch.ones_like(same_length), None, [tok.eos_token_id])
    assert ours == reference


def test_sampled_tokens_equal_generate_under_one_seed(model_and_batch):
    model, tok, ids, mask, pixels = model_and_batch
    # no row ends early, so both draw from the same (rows, vocabulary) probabilities at every step
    ours, reference = _both(model, tok, ids, mask, pixels, [tok.eos_token_id], temperature=0.7, top_p=0.9, seed=5)
    assert ours == reference
    again, _ = _both(model, tok, ids, mask, pixels, [tok.eos_token_id], temperature=0.7, top_p=0.9, seed=6)
    assert again != ours  # another seed, other draws: the comparison can fail


def test_other_model_types_use_generate_itself():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    assert not fast_decode_supported(model)
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert decode(model, ids, mask, 5, 0, [1]) == hf_generate(model, ids, mask, 5, 0, [1])


def test_a_full_cache_raises():
    layer = PreallocatedLayer(capacity=3)
    layer.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))
    keys, _ = layer.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert keys.shape == (1, 2, 3, 4) and keys[:, :, 2].eq(1).all() and keys[:, :, :2].eq(0).all()
    with pytest.raises(RuntimeError, match="KV cache of 3 positions is full"):
        layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
