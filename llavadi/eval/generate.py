"""Batched greedy answer generation for evaluation, prompted exactly as the model was trained.

Questions are sorted by prompt length so each batch pads little, left-padded (a decoder
continues from the last position of every row) and decoded by `llavadi.eval.decode.decode`
(the tokens HF `generate` picks, through a preallocated KV cache; position ids derived from the
attention mask, so padded rows see the same positions as unpadded ones). Pixel values are passed
only for questions that have an image, in batch order, so text-only questions can share a batch
with image questions. Answers come back in the questions' original order.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from llavadi.data.collator import pad_sequences
from llavadi.data.dataset import load_image
from llavadi.data.encode import ConversationEncoder, SampleError
from llavadi.data.images import open_image
from llavadi.data.templates import IMAGE_PLACEHOLDER, Turn
from llavadi.device import resolve_device
from llavadi.eval.decode import decode, eos_token_ids, pad_token_id
from llavadi.eval.parallel import ONE_PROCESS, Shard
from llavadi.models.build import LoadedModel, load_llava_dir
from llavadi.models.dtypes import DTYPES as _DTYPES
from llavadi.models.families import FAMILIES


@dataclass(frozen=True)
class EvalQuestion:
    """One question to answer: its id, the user text (prompt suffix included) and an optional image.

    The image is a file path or base64-encoded bytes (MMBench's TSV); at most one of the two.
    """

    question_id: str
    prompt: str
    image: str | None = None
    image_base64: str | None = None

    def __post_init__(self):
        if self.image is not None and self.image_base64 is not None:
            raise ValueError(f"question {self.question_id!r}: give an image path or base64 image data, not both")

    @property
    def has_image(self) -> bool:
        """Whether the question comes with an image."""
        return self.image is not None or self.image_base64 is not None


def from_benchmark_questions(questions, image_root: str | os.PathLike | None) -> list[EvalQuestion]:
    """EvalQuestions from `llavadi.eval.benchmarks.Question`s; image paths are resolved under `image_root`."""
    out = []
    for q in questions:
        image = None
        if q.image is not None and q.image_base64 is None:
            image = str(Path(image_root) / q.image) if image_root is not None else str(q.image)
        qid = q.question_id if not getattr(q, "round_id", 0) else f"{q.question_id}#round{q.round_id}"
        out.append(EvalQuestion(qid, q.prompt, image, q.image_base64))
    return out




def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' (or None) is bf16 on a GPU that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def load_for_eval(model_dir: str | os.PathLike, device: str | torch.device = "auto",
                  dtype: str | torch.dtype | None = "auto", template: str | None = None,
                  system: str | None = None) -> LoadedModel:
    """A saved model directory loaded for evaluation: on `device`, in `dtype`, in eval mode.

    `template` / `system` override how it is prompted (its llavadi.json); `system=""` for none.
    An export (`llavadi export`: its folder, or one of its model files) is run by its runtime.
    """
    model_dir = str(model_dir)
    from llavadi.export.gguf_runtime import find_export, load_exported

    if find_export(model_dir) is not None:
        bundle = load_exported(model_dir)
        if template is not None:
            bundle.meta["template"] = template
        if system is not None:
            bundle.meta["system"] = system
        return bundle
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    dev = resolve_device(device)
    bundle = load_llava_dir(model_dir, dtype=resolve_dtype(dtype, dev))
    bundle.model.to(dev).eval()
    if template is not None:
        bundle.meta["template"] = template
    if system is not None:
        bundle.meta["system"] = system
    return bundle


def user_text(question: EvalQuestion) -> str:
    """The user turn: '<image>\\n' before the question when it has an image, as LLaVA's eval scripts do."""
    if IMAGE_PLACEHOLDER in question.prompt:
        raise ValueError(f"question {question.question_id!r}: its prompt already holds {IMAGE_PLACEHOLDER!r}; "
                         "pass the bare question, the image placeholder is added here")
    return f"{IMAGE_PLACEHOLDER}\n{question.prompt}" if question.has_image else question.prompt


def encode_question(encoder: ConversationEncoder, question: EvalQuestion) -> list[int]:
    """Prompt token ids (image placeholder expanded) of one question."""
    turn = Turn("user", user_text(question))
    sizes = None
    if question.has_image and encoder.n_image_tokens is None:  # the count depends on the image's size
        sizes = [question_image(question).size]
    return encoder.encode_prompt([turn], n_images=1 if question.has_image else 0,
                                 sample_id=str(question.question_id), image_sizes=sizes).input_ids


def question_image(question: EvalQuestion) -> Image.Image:
    """The question's RGB image, from its file or its base64 bytes (padding happens in `pixel_values_for`)."""
    if question.image is not None:
        return load_image(question.image, str(question.question_id))
    try:
        return open_image(io.BytesIO(base64.b64decode(question.image_base64)))
    except Exception as e:  # binascii and PIL raise several types for bad data (and ImageTooLarge)
        raise SampleError(f"question {question.question_id!r}: undecodable base64 image ({e})") from e


def pixel_batch(bundle: LoadedModel, questions: list[EvalQuestion], device, dtype) -> dict | None:
    """The image inputs of the questions that have an image, in batch order (None: no image)."""
    inputs = bundle.batch_image_inputs([[question_image(q)] for q in questions if q.has_image])
    if not inputs:
        return None
    return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's first parameter."""
    param = next(model.parameters())
    return param.device, param.dtype


@dataclass(frozen=True)
class Sampling:
    """Sampling instead of greedy decoding: temperature, nucleus (top_p), and the seed of the draw."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0 and top_p in (0, 1], got {self.temperature}, "
                             f"{self.top_p}")


def generate_ids(model, prompts: list[list[int]], pixel_values: torch.Tensor | dict | None, max_new_tokens: int,
                 pad_id: int, eos_ids: list[int], image_token_id: int,
                 sampling: Sampling | None = None) -> list[list[int]]:
    """Answer ids of one left-padded batch of prompts (greedy, or sampled under `sampling.seed`), each cut
    after its first eos. `pixel_values`: one per prompt that has image tokens, in batch order, or a dict of
    the batch's image inputs (a family's: pixel_values, image_grid_thw, ...).
    Decoded by `llavadi.eval.decode.decode` (the same tokens as HF `generate`, faster)."""
    device, _ = model_device_dtype(model)
    input_ids = pad_sequences(prompts, pad_id, side="left").to(device)
    attention_mask = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(device)
    if pixel_values is None:
        kwargs = {}
    else:
        kwargs = dict(pixel_values) if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "model_type", None) in FAMILIES:
            kwargs.update(FAMILIES[config.model_type].text_inputs(input_ids, config))
    # the draw depends on the seed only, and leaves the caller's random state (dropout, shuffling) untouched
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if sampling is not None:
            torch.manual_seed(sampling.seed)
        # an image placeholder in an answer has no image behind it: never emit it
        return decode(model, input_ids, attention_mask, max_new_tokens, pad_id, eos_ids, [image_token_id],
                      temperature=None if sampling is None else sampling.temperature,
                      top_p=1.0 if sampling is None else sampling.top_p, **kwargs)


def _generate_batch(bundle: LoadedModel, prompts: list[list[int]], questions: list[EvalQuestion],
                    max_new_tokens: int, pad_id: int, eos_ids: list[int], image_token_id: int) -> list[list[int]]:
    """Greedy answer ids of one batch of questions, each cut after its first eos."""
    if hasattr(bundle, "answer_prompts"):  # an exported model (llavadi.export): its runtime answers
        images = [question_image(q) if q.has_image else None for q in questions]
        return bundle.answer_prompts(prompts, images, max_new_tokens, eos_ids, image_token_id)
    device, dtype = model_device_dtype(bundle.model)
    pixel_values = pixel_batch(bundle, questions, device, dtype)
    return generate_ids(bundle.model, prompts, pixel_values, max_new_tokens, pad_id, eos_ids, image_token_id)


@torch.no_grad()
def generate_answer_ids(bundle: LoadedModel, questions: list[EvalQuestion], batch_size: int = 16,
                        max_new_tokens: int = 16, device=None, progress: bool = True, desc: str = "generating",
                        prompt_ids: list[list[int]] | None = None, on_batch=None,
                        shard: Shard | None = None) -> list[list[int]]:
    """Greedy answer token ids per question (original order), up to and including the first eos.

    `device`: where to run (the model is moved there if it is elsewhere); None keeps the model's device.
    `prompt_ids`: ready-made prompts (e.g. multi-turn histories), one per question, instead of
    encoding each question's one-turn prompt with the model's own template; the questions then
    only bring their images. `on_batch(indices, answer_ids)` is called as each batch finishes
    (e.g. to persist it), with the questions' indices. `shard`: under data parallelism each
    process generates every world-th batch; the batches of a round are gathered, so every process
    gets every answer (and every `on_batch` call) back (llavadi.eval.parallel).
    """
    net, tok = bundle.model, bundle.tokenizer
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if device is not None and resolve_device(device) != model_device_dtype(net)[0]:
        net.to(resolve_device(device))  # run where asked: the model moves there
    pad_id, eos_ids = pad_token_id(tok), eos_token_ids(net, tok)
    if prompt_ids is not None and len(prompt_ids) != len(questions):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(questions)} questions")
    shard = shard or ONE_PROCESS
    encoder = bundle.encoder()
    prompts = prompt_ids if prompt_ids is not None else [encode_question(encoder, q) for q in questions]
    batches = length_sorted_batches([len(p) for p in prompts], batch_size)
    answers: list[list[int] | None] = [None] * len(questions)
    bar = None
    if progress and shard.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(questions), desc=desc, unit="q")
    was_training = net.training
    net.eval()
    try:
        for first in range(0, len(batches), shard.world):  # one round: a batch per process
            k = first + shard.rank
            local = {}
            if k < len(batches):
                local[k] = _generate_batch(bundle, [prompts[i] for i in batches[k]],
                                           [questions[i] for i in batches[k]], max_new_tokens, pad_id, eos_ids,
                                           encoder.image_token_id)
            for done, batch_answers in sorted(shard.gather(local).items()):
                for i, ids in zip(batches[done], batch_answers):
                    answers[i] = ids
                if on_batch is not None:
                    on_batch(batches[done], batch_answers)
                if bar is not None:
                    bar.update(len(batches[done]))
    finally:
        if bar is not None:
            bar.close()
        net.train(was_training)
    return answers  # type: ignore[return-value]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of `batch_size`, longest first: a batch that does not fit in memory fails at once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def decode_answer(tokenizer, ids: list[int]) -> str:
    """Answer text from generated ids: special tokens (eos, pad) dropped, whitespace stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_answers(bundle: LoadedModel, questions: list[EvalQuestion], batch_size: int = 16,
                     max_new_tokens: int = 16, device=None, progress: bool = True) -> list[str]:
    """Greedy answers (decoded, stripped) to `questions`, in their order; batched with left padding."""
    ids = generate_answer_ids(bundle, questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              device=device, progress=progress)
    return [decode_answer(bundle.tokenizer, a) for a in ids]
