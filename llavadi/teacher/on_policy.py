"""On-policy distillation: the student answers some of a batch's prompts itself, the teacher scores them.

With a stage's ``on_policy: {fraction, max_new_tokens, temperature, top_p}``, each sample of every
training batch is, with probability ``fraction`` (GKD's lambda), replaced by an on-policy sample:
its prompt (everything before its last answer, images included) followed by the answer the
student samples from it now. Those samples carry no labels (CE is off on them, as in GKD); their
sampled tokens are the response tokens the distillation terms read, and the teacher scores them
online. Earlier turns of a multi-turn prompt become instruction tokens: no loss lands on them.

The choice is per SAMPLE, not per step: every step generates about ``fraction`` of its batch, so
step times stay even (no step pays for a whole batch of generation while the others wait at the
gradient all-reduce), each gradient mixes both signals, and whether a sample is on-policy at a
step depends only on (seed, step, sample id): the same whatever the batch size, accumulation or
process count, and after a resume. The draw of the answers is seeded the same way, so runs are
deterministic under a seed on CPU. Sampled image tokens are impossible: the generator suppresses
the image token. Generation is the evaluation's batched generator (``llavadi.eval.generate``).

The student's vision tower runs once per image and step when it is frozen: the tower outputs of the generation's
prefill are kept (``VisionOutputReuse``) and handed back when the training forward gives the tower the same pixel
values (LLaVA-1.5 models, a tower without dropout; the layers the projector reads only), and to an online
teacher whose tower is the same (one class, config and weights: the LLaVADI pair shares one frozen CLIP). The
outputs are the same tensors the tower would compute: the same weights, the same inputs, no gradient through a
frozen tower.

A teacher whose tokenizer is the student's up to additions (``llavadi.data.tokenizer_pair``) reads
the sampled answer through the fixed id map (``id_maps``: per view prefix, student id -> that
view's id); a sampled token the teacher does not have is an error naming the sample.
"""

from __future__ import annotations

import functools
import hashlib
import time

import torch
import torch.nn as nn

from llavadi.data.collator import IMAGE_INPUT_KEYS, combine_image_inputs
from llavadi.data.encode import IGNORE_INDEX
from llavadi.data.token_alignment import ALIGNMENT_KEY, AlignmentError, PieceReader, retokenized_answer
from llavadi.data.token_types import TokenType
from llavadi.distill.view import base_llava
from llavadi.eval.decode import eos_token_ids, pad_token_id
from llavadi.eval.generate import Sampling, generate_ids
from llavadi.models.families import family_of

RESPONSE, INSTRUCTION, IMAGE = int(TokenType.RESPONSE), int(TokenType.INSTRUCTION), int(TokenType.IMAGE)


def _uniform(*parts) -> int:
    """A 64-bit integer determined by `parts` only."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def is_on_policy(seed: int, step: int, sample_id: str, fraction: float) -> bool:
    """Whether a sample is replaced by the student's own answer at an optimisation step."""
    return _uniform("on_policy", seed, step, sample_id) < fraction * 2**64


def last_answer_start(token_types: list[int]) -> int:
    """Index of the first token of the last run of response tokens (where the last answer begins)."""
    end = max(i for i, t in enumerate(token_types) if t == RESPONSE)
    start = end
    while start > 0 and token_types[start - 1] == RESPONSE:
        start -= 1
    return start


def unbatch(batch: dict, prefixes: tuple[str, ...]) -> list[dict]:
    """The collated batch back as dataset items (padding removed), image inputs per item that has images."""
    items = [{"sample_id": sid} for sid in batch["sample_ids"]]
    if ALIGNMENT_KEY in batch:  # paired answer spans, back to each sample's unpadded positions
        rows = batch[ALIGNMENT_KEY].cpu()
        first = [batch[p + "attention_mask"].cpu().long().argmax(dim=1) for p in prefixes[:2]]
        for b, item in enumerate(items):
            groups = rows[rows[:, 0] == b, 1:].clone()
            groups[:, :2] -= first[0][b]
            groups[:, 2:] -= first[1][b]
            item[ALIGNMENT_KEY] = groups
    for p in prefixes:
        keep = batch[p + "attention_mask"].bool().cpu()
        for b, item in enumerate(items):
            for key in ("input_ids", "token_types", "labels"):
                if p + key in batch:
                    item[p + key] = batch[p + key][b].cpu()[keep[b]].tolist()
        if p + "image_grid_thw" in batch:
            _split_grid_images(batch, items, p)
            continue
        if p + "image_sizes" in batch:
            _split_tiled_images(batch, items, p)
            continue
        if p + "pixel_attention_mask" in batch:  # Idefics3 / SmolVLM: a row of images per sample with images
            with_images = [item for item in items if IMAGE in item[p + "token_types"]]
            for row, item in enumerate(with_images):
                for key in ("pixel_values", "pixel_attention_mask"):
                    item[p + key] = batch[p + key][row:row + 1]
            continue
        # one pixel row per image, in order (LLaVA-1.5: one image per sample; Gemma 3: one per run of image tokens)
        runs = [_image_runs(item[p + "token_types"]) for item in items]
        several = any(n > 1 for n in runs)
        pixel_row = 0
        for item, n in zip(items, runs):
            if n:
                pixels = batch[p + "pixel_values"]
                item[p + "pixel_values"] = pixels[pixel_row:pixel_row + n] if several else pixels[pixel_row]
                pixel_row += n
    return items


def _image_runs(token_types: list[int]) -> int:
    """How many separate runs of image tokens a sample has (one per image where images do not touch)."""
    return sum(1 for i, t in enumerate(token_types) if t == IMAGE and (i == 0 or token_types[i - 1] != IMAGE))


def _split_tiled_images(batch: dict, items: list[dict], p: str) -> None:
    """Give each item with images its rows of `pixel_values` and `image_sizes` (any-resolution families: a row
    per image; `batch_num_images`, when there, says how many images each sample with images has)."""
    with_images = [item for item in items if IMAGE in item[p + "token_types"]]
    counts = batch[p + "batch_num_images"].tolist() if p + "batch_num_images" in batch else [1] * len(with_images)
    row = 0
    for item, n in zip(with_images, counts):
        item[p + "pixel_values"] = batch[p + "pixel_values"][row:row + n]
        item[p + "image_sizes"] = batch[p + "image_sizes"][row:row + n]
        if p + "batch_num_images" in batch:
            item[p + "batch_num_images"] = torch.tensor([n])
        row += n


def _split_grid_images(batch: dict, items: list[dict], p: str) -> None:
    """Give each item its rows of `pixel_values` and `image_grid_thw` (dynamic-resolution families: one grid row
    per image, t*h*w patch rows per image, patches / tokens the same merge factor for every image)."""
    grids, pixels = batch[p + "image_grid_thw"], batch[p + "pixel_values"]
    patches = grids.prod(dim=1).tolist()
    n_tokens = [item[p + "token_types"].count(IMAGE) for item in items]
    merge, rest = divmod(sum(patches), max(sum(n_tokens), 1))
    if rest or not merge:
        raise ValueError(f"{sum(patches)} image patches for {sum(n_tokens)} image tokens: not a whole merge factor")
    image, row = 0, 0
    for item, tokens in zip(items, n_tokens):
        first_image, first_row = image, row
        while tokens > 0:
            tokens -= patches[image] // merge
            row += patches[image]
            image += 1
        if image > first_image:
            item[p + "pixel_values"] = pixels[first_row:row]
            item[p + "image_grid_thw"] = grids[first_image:image]


def _in_view(answer: list[int], id_map: torch.Tensor | None, sample_id: str, prefix: str) -> list[int]:
    """The answer's ids in a view whose tokenizer maps student ids through `id_map` (-1: the view lacks the token)."""
    if id_map is None:
        return answer
    mapped = id_map[torch.tensor(answer, dtype=torch.long)].tolist() if answer else []
    missing = [a for a, m in zip(answer, mapped) if m < 0]
    if missing:
        raise ValueError(f"sample {sample_id!r}: the student sampled token id(s) {missing[:5]} that the "
                         f"{prefix.rstrip('_') or 'student'} tokenizer does not have")
    return mapped


def with_answer(item: dict, answer: list[int], prefixes: tuple[str, ...], max_length: int,
                id_maps: dict[str, torch.Tensor] | None = None) -> dict:
    """The item with its last answer replaced by `answer` (cut to max_length): no labels, loss on `answer` only.

    `id_maps`: per view prefix, the student id -> view id map of a view with another tokenizer."""
    starts = {p: last_answer_start(item[p + "token_types"]) for p in prefixes}
    answer = answer[:max_length - max(starts.values())]  # the same tokens in every view
    out = dict(item)
    for p, start in starts.items():
        prompt_types = [INSTRUCTION if t == RESPONSE else t for t in item[p + "token_types"][:start]]
        view_answer = _in_view(answer, (id_maps or {}).get(p), item.get("sample_id", "?"), p)
        out[p + "input_ids"] = item[p + "input_ids"][:start] + view_answer
        out[p + "token_types"] = prompt_types + [RESPONSE] * len(answer)
        out[p + "labels"] = [IGNORE_INDEX] * (start + len(answer))
    return out


class TeacherRetokenizer:
    """A student's sampled answer re-tokenized for a teacher of another tokenizer, and the two paired."""

    def __init__(self, student_tokenizer, teacher_encoder, stop_ids: set[int], prefix: str) -> None:
        self.student_reader = PieceReader(student_tokenizer)
        self.teacher, self.teacher_reader = teacher_encoder, PieceReader(teacher_encoder.tokenizer)
        self.stop_ids, self.prefix = set(stop_ids), prefix

    def __call__(self, item: dict, answer: list[int], max_length: int) -> dict | None:
        """The on-policy item (student's own tokens, the teacher's tokens of the same text).

        None (the sample is kept as it was): the sampled ids spell no valid text, or text the teacher's
        tokenizer does not reproduce exactly, so no answer token could be paired."""
        p = self.prefix
        start_s, start_t = last_answer_start(item["token_types"]), last_answer_start(item[p + "token_types"])
        answer = answer[:max_length - start_s]
        try:
            made = retokenized_answer(self.student_reader, answer, start_s, self.teacher, self.teacher_reader,
                                      start_t, self.stop_ids, item["sample_id"])
        except AlignmentError:  # text the teacher's tokenizer does not reproduce (an unknown token, a normaliser)
            return None
        if made is None:
            return None
        teacher_ids, groups = made
        teacher_ids = teacher_ids[:max_length - start_t]
        out = with_answer(item, answer, ("",), max_length)
        prompt_types = [INSTRUCTION if t == RESPONSE else t for t in item[p + "token_types"][:start_t]]
        out[p + "input_ids"] = item[p + "input_ids"][:start_t] + teacher_ids
        out[p + "token_types"] = prompt_types + [RESPONSE] * len(teacher_ids)
        out[p + "labels"] = [IGNORE_INDEX] * (start_t + len(teacher_ids))
        inside = (groups[:, 1] < start_s + len(answer)) & (groups[:, 3] < start_t + len(teacher_ids))
        out[ALIGNMENT_KEY] = groups[inside]
        return out


# model types whose projector reads `vision_feature_layer` of the tower's hidden states and nothing else of them
REUSE_MODEL_TYPES = frozenset({"llava"})
# options the model passes on to its tower that a vision encoder ignores (the decoder's cache switch)
UNUSED_BY_TOWERS = frozenset({"use_cache"})


def _llava_tower(model: nn.Module | None) -> nn.Module | None:
    """The vision tower of a model whose projector reads only `vision_feature_layer` of it (None: another kind)."""
    if model is None:
        return None
    llava = base_llava(model)
    return llava.model.vision_tower if llava.config.model_type in REUSE_MODEL_TYPES else None


def same_tower(a: nn.Module, b: nn.Module) -> bool:
    """Whether two towers compute the same outputs: one class, one config, equal weights (dtype, device, values)."""
    skip = {"_name_or_path", "transformers_version"}
    if type(a) is not type(b):
        return False
    if {k: v for k, v in a.config.to_dict().items() if k not in skip} != \
            {k: v for k, v in b.config.to_dict().items() if k not in skip}:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device
        and torch.equal(sa[k], sb[k]) for k in sa)


class VisionOutputReuse:
    """A frozen vision tower's outputs from the generation's prefill, handed back to the training forward that
    gives the tower the same pixel values (equal values, dtype and shape) and options; forgotten at the next
    generation.

    Only while the tower is frozen and has no dropout; only the hidden states the projectors read are kept (the
    others are None), so CLIP-L's 25 layers of states are not held. A teacher whose tower is the same (`same_tower`:
    the LLaVADI pair shares one frozen CLIP) is handed the same outputs: each entry serves every tower once.
    Installed as the towers' forward while entries wait, removed when none does."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None) -> None:
        tower = _llava_tower(model)
        self.towers = [] if tower is None else [tower]
        shared = _llava_tower(teacher)
        self.models = [base_llava(model)]
        if tower is not None and shared is not None and same_tower(tower, shared):
            self.towers.append(shared)
            self.models.append(base_llava(teacher))
        layers = [getattr(m.config, "vision_feature_layer", None) for m in self.models]
        self.layers = [i for layer in layers for i in ([layer] if isinstance(layer, int) else list(layer or []))]
        self.entries: list[list] = []  # [pixel values, keyword arguments, output, uses left]
        self.recording = False
        self.reused = 0  # tower forwards skipped (tests read it)

    def applies(self) -> bool:
        """Whether the towers' outputs can be reused now: LLaVA-1.5 towers, frozen, without dropout."""
        if not self.towers:
            return False
        for tower in self.towers:
            if any(p.requires_grad for p in tower.parameters()):
                return False
            if getattr(getattr(tower, "config", None), "attention_dropout", 0.0):
                return False
            if any(isinstance(m, nn.Dropout) and m.p > 0 for m in tower.modules()):
                return False
        return True

    def start(self) -> None:
        """Before a generation: forget the earlier entries, record the tower's outputs from now on."""
        self.entries.clear()
        self.recording = self.applies()
        if self.recording:
            for tower in self.towers:  # an instance attribute: the class's forward is untouched
                tower.forward = functools.partial(self._forward, tower)

    def stop(self) -> None:
        """After a generation: stop recording; the towers' own forward comes back if nothing waits."""
        self.recording = False
        if not self.entries:
            self._uninstall()

    def _uninstall(self) -> None:
        for tower in self.towers:
            if "forward" in tower.__dict__:
                del tower.forward

    def _forward(self, tower, pixel_values, *args, **kwargs):
        original = type(tower).forward.__get__(tower)
        plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in kwargs.values())
        if args or not plain or not isinstance(pixel_values, torch.Tensor):
            return original(pixel_values, *args, **kwargs)
        options = {k: v for k, v in kwargs.items() if k not in UNUSED_BY_TOWERS}
        for k, entry in enumerate(self.entries):
            stored, stored_options, output, _ = entry
            if (stored_options == options and stored.shape == pixel_values.shape and stored.dtype == pixel_values.dtype
                    and stored.device == pixel_values.device and torch.equal(stored, pixel_values)
                    and self.applies()):
                entry[3] -= 1
                if not entry[3]:
                    del self.entries[k]
                if not self.entries and not self.recording:
                    self._uninstall()
                self.reused += 1
                return type(output)(**output)  # a fresh object: the model writes pooler_output into it
        output = original(pixel_values, **kwargs)
        if self.recording and getattr(output, "hidden_states", None) is not None:
            kept = {i % len(output.hidden_states) for i in self.layers}
            thin = tuple(h if i in kept else None for i, h in enumerate(output.hidden_states))
            self.entries.append([pixel_values, options, type(output)(**{**output, "hidden_states": thin}),
                                 len(self.towers)])
        return output


class OnPolicySampler:
    """Replaces a fraction of each training batch's samples by the student's sampled answers.

    With ``retokenize`` (a teacher of another tokenizer) the teacher reads the sampled answer's text
    in its own tokens, paired with the student's; a sampled answer that is not valid text, or whose
    text the teacher's tokenizer does not reproduce, leaves its sample as it was (counted in
    ``stats["not_text"]``).
    """

    def __init__(self, student, tokenizer, collator, config, seed: int, max_length: int,
                 id_maps: dict[str, torch.Tensor] | None = None, retokenize: TeacherRetokenizer | None = None,
                 teacher: nn.Module | None = None) -> None:
        self.retokenize = retokenize
        self.student = student
        self.id_maps = id_maps or {}  # view prefix -> student id to that view's id (a teacher's tokenizer)
        self.collator = collator
        self.config = config
        self.seed = seed
        self.max_length = max_length
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = eos_token_ids(student, tokenizer)
        self.image_token_id = family_of(student.config).image_token_id(student.config)
        self.stats = {"samples": 0, "on_policy": 0, "generated_tokens": 0, "seconds": 0.0}
        self.vision_outputs = VisionOutputReuse(student, teacher)  # `teacher`: the online teacher's model
        if retokenize is not None:
            self.stats["not_text"] = 0

    def __call__(self, batches: list[dict], step: int) -> list[dict]:
        """The micro-batches of one optimisation step, some samples replaced by on-policy ones."""
        self.vision_outputs.start()
        try:
            return [self._replace(batch, step) for batch in batches]
        finally:
            self.vision_outputs.stop()

    def _replace(self, batch: dict, step: int) -> dict:
        ids = batch["sample_ids"]
        self.stats["samples"] += len(ids)
        chosen = [i for i, sid in enumerate(ids) if is_on_policy(self.seed, step, sid, self.config.fraction)]
        if not chosen:
            return batch
        start = time.perf_counter()
        items = unbatch(batch, self.collator.prefixes)
        seed = _uniform("sampling", self.seed, step, [ids[i] for i in chosen])
        answers = self._generate([items[i] for i in chosen], seed)
        for i, answer in zip(chosen, answers):
            if self.retokenize is None:
                items[i] = with_answer(items[i], answer, self.collator.prefixes, self.max_length, self.id_maps)
                continue
            replaced = self.retokenize(items[i], answer, self.max_length)
            if replaced is None:
                self.stats["not_text"] += 1
                chosen = [c for c in chosen if c != i]
            else:
                items[i] = replaced
        self.stats["on_policy"] += len(chosen)
        self.stats["generated_tokens"] += sum(len(a) for a in answers)
        self.stats["seconds"] += time.perf_counter() - start
        return self.collator(items)

    def _generate(self, items: list[dict], seed: int) -> list[list[int]]:
        prompts = [item["input_ids"][:last_answer_start(item["token_types"])] for item in items]
        param = next(self.student.parameters())
        pixel_values = None
        with_images = [item for item in items if "pixel_values" in item]
        if with_images:
            pixel_values = {k: combine_image_inputs([item[k] for item in with_images], k) for k in IMAGE_INPUT_KEYS
                            if k in with_images[0]}
            pixel_values = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
                            for k, v in pixel_values.items()}
        was_training = self.student.training
        self.student.eval()
        try:
            c = self.config
            return generate_ids(self.student, prompts, pixel_values, c.max_new_tokens, self.pad_id, self.eos_ids,
                                self.image_token_id, Sampling(c.temperature, c.top_p, seed))
        finally:
            self.student.train(was_training)
