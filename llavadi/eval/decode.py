"""Batched decoding of left-padded prompts: one prefill, then one token per step through a preallocated KV cache.

Used by evaluation (`llavadi.eval.generate`), on-policy sampling and teacher regeneration (both through
`generate_ids`). On the same left-padded batch it picks exactly the tokens HF `generate` picks (greedy; sampled
ones follow the same distribution and the same warpers), for less work:

- the KV cache of every layer is allocated once (prompt + `max_new_tokens` positions) and written in place;
  attention reads a view of its filled part: the same values and shapes as HF's growing cache, without the
  `torch.cat` that copies the whole cache at every step (most of a decode step's time on a CPU at LLaVA's
  600-token prompts);
- rows that have emitted an end-of-sequence token leave the batch (once they are a quarter of it: each removal
  copies the cache): cache, mask and positions are narrowed to the running rows, so a batch costs about the sum
  of its answers' lengths, not its longest answer times its size;
- the image features are computed once, in the prefill (pixel values go to the first forward only), and the
  prefill computes the last position's logits only.

Position ids are the ones `generate` passes: they follow the attention mask (each row's first real token is
position 0), and each decoding step adds 1 to the last ones; Qwen2-VL's multimodal rotary positions (M-RoPE) are
(4, B, T): the text positions, then the (time, height, width) positions of `get_rope_index`. A mask without padding
is dropped as `generate` drops it. Families are served by exact model type (`FAST_DECODE_MODEL_TYPES`) when every
decoder layer is full attention: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Idefics3, SmolVLM, Qwen2-VL, Qwen2.5-VL.
Anything else goes to `model.generate` with the same settings: Gemma 3 (its sliding-window layers keep a rolling
window of keys, not a growing cache, and its prefill attends both ways inside an image through `token_type_ids`),
and any model type not named.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# model types whose forward takes (input_ids, attention_mask, position_ids, cache, logits_to_keep) as LLaVA does,
# the image inputs in the prefill only; tests/test_decode.py checks each against `generate`
FAST_DECODE_MODEL_TYPES = frozenset({"llava", "llava_next", "llava_onevision", "idefics3", "smolvlm", "qwen2_vl",
                                     "qwen2_5_vl"})
# model types whose positions are M-RoPE's (4, B, T): text positions, then get_rope_index's (time, height, width)
MROPE_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})
# finished rows leave the batch once they are at least 1/COMPACT_FRACTION of it: each removal copies the
# cache, so rows ending one by one are dropped in a few copies, not one copy per step
COMPACT_FRACTION = 4


class PreallocatedLayer(DynamicLayer):
    """A layer's KV cache allocated once for `capacity` positions; `keys`/`values` are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._keys = self._values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the buffers with the shape of the first states, `capacity` positions long."""
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self._keys = key_states.new_empty((b, h, self.capacity, d))
        self._values = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new states after the filled part; return views of everything written so far."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions is full ({end} needed)")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (a copy of the buffers, made when rows finish, not at every step)."""
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]


def fast_decode_supported(model) -> bool:
    """Whether `decode` runs its own loop for this model (else it calls `model.generate`)."""
    if getattr(model.config, "model_type", None) not in FAST_DECODE_MODEL_TYPES:
        return False
    probe = DynamicCache(config=model.config)
    return bool(probe.layers) and all(type(layer) is DynamicLayer for layer in probe.layers)


def preallocated_cache(model, capacity: int) -> DynamicCache:
    """A DynamicCache of the model's layers whose every layer is a PreallocatedLayer of `capacity` positions."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def prompt_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefill_inputs: dict) -> torch.Tensor:
    """The position ids `generate` gives a left-padded prompt: (B, T) from the mask, or M-RoPE's (4, B, T)."""
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if model.config.model_type not in MROPE_MODEL_TYPES:
        return positions
    grids = {k: prefill_inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if prefill_inputs.get(k) is not None}
    if grids and prefill_inputs.get("mm_token_type_ids") is not None:
        spatial, _ = model.model.get_rope_index(input_ids, prefill_inputs["mm_token_type_ids"],
                                                attention_mask=attention_mask, **grids)
    else:  # text only: every rotary section reads the text position
        spatial = positions[None].expand(3, -1, -1)
    return torch.cat([positions[None], spatial.to(positions)], dim=0)


def _next_tokens(logits: torch.Tensor, suppress: torch.Tensor | None, temperature: float | None,
                 top_p: float) -> torch.Tensor:
    """The next token per row, as `generate` picks it: suppressed tokens removed, then argmax, or
    temperature, nucleus (top_p) and a multinomial draw."""
    scores = logits.to(copy=True, dtype=torch.float32)
    if suppress is not None:
        scores[:, suppress] = float("-inf")
    if temperature is None:
        return scores.argmax(-1)
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[:, -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, pad_id: int,
           eos_ids: list[int], suppress_ids: list[int] = (), temperature: float | None = None, top_p: float = 1.0,
           **prefill_inputs) -> list[list[int]]:
    """New token ids per row of a left-padded batch, each cut after its first eos: greedy (`temperature` None)
    or sampled from the global random state. `prefill_inputs` (e.g. pixel_values) go to the first forward only."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not fast_decode_supported(model):
        return hf_generate(model, input_ids, attention_mask, max_new_tokens, pad_id, eos_ids, suppress_ids,
                           temperature, top_p, **prefill_inputs)
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    suppress = torch.tensor(list(suppress_ids), device=device, dtype=torch.long) if len(suppress_ids) else None
    # as generate: positions count the real tokens; a mask without padding is dropped
    positions = prompt_positions(model, input_ids, attention_mask, prefill_inputs)
    mask = torch.ones((batch, prompt_len + max_new_tokens), dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_len] = attention_mask
    keep_mask = not bool(attention_mask.all())
    cache = preallocated_cache(model, prompt_len + max_new_tokens)
    out = model(input_ids=input_ids, attention_mask=attention_mask if keep_mask else None, position_ids=positions,
                cache=cache, use_cache=True, logits_to_keep=1, return_dict=True, **prefill_inputs)
    rows = torch.arange(batch, device=device)  # original index of each row in the running batch
    alive = torch.ones(batch, dtype=torch.bool, device=device)  # rows that have not emitted an eos yet
    last = positions[..., -1:]  # (B, 1), or (4, B, 1) for M-RoPE: each step adds 1 as generate does
    answers: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        tokens = _next_tokens(out.logits[:, -1], suppress, temperature, top_p)
        for r, t, a in zip(rows.tolist(), tokens.tolist(), alive.tolist()):
            if a:
                answers[r].append(t)
        alive &= ~torch.isin(tokens, eos)
        n_alive = int(alive.sum())
        if step == max_new_tokens - 1 or n_alive == 0:
            break
        if len(rows) - n_alive >= max(1, len(rows) // COMPACT_FRACTION):  # finished rows leave the batch
            keep = alive.nonzero().squeeze(1)
            rows, tokens, last, mask, alive = rows[keep], tokens[keep], last[..., keep, :], mask[keep], alive[keep]
            for layer in cache.layers:
                layer.batch_select_indices(keep)
        last = last + 1
        width = prompt_len + step + 1  # the prompt, the answers so far and the token fed now
        out = model(input_ids=tokens[:, None], attention_mask=mask[:, :width] if keep_mask else None,
                    position_ids=last, cache=cache, use_cache=True, return_dict=True)
    return answers


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the pad token, else the eos token."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:  # LLaMA tokenizers often have no pad token
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def eos_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos plus the model's generation eos ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise ValueError("no eos token: the tokenizer and the model's generation config both lack one")
    return sorted(ids)


def cut_after_eos(rows: list[list[int]], eos_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first eos (the padding `generate` writes after it dropped)."""
    eos = set(eos_ids)
    return [row[:next((k + 1 for k, t in enumerate(row) if t in eos), len(row))] for row in rows]


def hf_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, pad_id: int,
                eos_ids: list[int], suppress_ids: list[int] = (), temperature: float | None = None,
                top_p: float = 1.0, **prefill_inputs) -> list[list[int]]:
    """The same answers through HF `model.generate` (the reference, and the path of models `decode` does not serve)."""
    if temperature is None:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:  # top_k=0: no top-k cut, whatever the model's generation config says
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1,
                         max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=list(eos_ids),
                         pad_token_id=pad_id, use_cache=True, suppress_tokens=list(suppress_ids) or None,
                         **sampling, **prefill_inputs)
    return cut_after_eos(out[:, input_ids.shape[1]:].tolist(), eos_ids)
