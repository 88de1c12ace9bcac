"""Batched greedy answer generation for evaluation, prompted exactly as the model was trained.

Questions are sorted by prompt length so each batch pads little, left-padded (a decoder
continues from the last position of every row) and generated with the KV cache by HF
`generate`, which derives position ids from the attention mask so padded rows see the same
positions as unpadded ones. Pixel values are passed only for questions that have an image, in
batch order, so text-only questions can share a batch with image questions. Answers come back
in the questions' original order.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from llavadi.data.dataset import expand_to_square, load_image, pixel_values_for
from llavadi.data.encode import ConversationEncoder, SampleError
from llavadi.device import resolve_device
from llavadi.models.build import encoder_for
from llavadi.models.build import n_image_tokens as n_image_tokens_of
from llavadi.data.templates import IMAGE_PLACEHOLDER, LLAVA_SYSTEM, Turn

MODEL_INFO_FILE = "llavadi.json"
DEFAULT_TEMPLATE = "vicuna_v1"


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


@dataclass
class EvalModel:
    """A loaded model with everything needed to prompt it as it was trained."""

    model: object
    tokenizer: object
    image_processor: object
    encoder: ConversationEncoder
    model_dir: str = ""
    info: dict = field(default_factory=dict)
    pad_to_square: bool = True


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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


def read_model_info(model_dir: str | os.PathLike, config, template: str | None = None,
                    system: str | None = None) -> dict:
    """How a saved model is prompted: llavadi.json if present, LLaVA-1.5 defaults otherwise, then overrides."""
    path = Path(model_dir) / MODEL_INFO_FILE
    info: dict = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
        if not isinstance(info, dict):
            raise ValueError(f"{path}: must hold a JSON object, got {type(info).__name__}")
    info = dict(info)
    info.setdefault("template", DEFAULT_TEMPLATE)
    info.setdefault("system", LLAVA_SYSTEM)
    n_expected = n_image_tokens_of(config)
    info.setdefault("n_image_tokens", n_expected)
    if template is not None:
        info["template"] = template
    if system is not None:
        info["system"] = system
    if int(info["n_image_tokens"]) != n_expected:
        raise ValueError(
            f"{path}: n_image_tokens {info['n_image_tokens']} does not match the model's vision tower, which "
            f"gives {n_expected} tokens per image (image_size/patch_size, strategy "
            f"{config.vision_feature_select_strategy!r}); fix or delete n_image_tokens in {MODEL_INFO_FILE}"
        )
    return info


def make_encoder(tokenizer, config, info: dict, max_length: int = 4096) -> ConversationEncoder:
    """The ConversationEncoder that builds this model's prompts (same code path as training)."""
    return encoder_for(tokenizer, config, info["template"], info.get("system"), max_length)


def make_eval_model(model, tokenizer, image_processor, template: str = DEFAULT_TEMPLATE, system: str | None = None,
                    n_image_tokens: int | None = None, name: str = "model", pad_to_square: bool = True) -> EvalModel:
    """An EvalModel from objects already in memory (e.g. a model just trained), prompted with `template`."""
    info = {"template": template, "system": LLAVA_SYSTEM if system is None else system,
            "n_image_tokens": n_image_tokens_of(model.config) if n_image_tokens is None else n_image_tokens}
    if int(info["n_image_tokens"]) != n_image_tokens_of(model.config):
        raise ValueError(f"n_image_tokens {n_image_tokens} does not match the model's vision tower "
                         f"({n_image_tokens_of(model.config)} tokens per image)")
    return EvalModel(model, tokenizer, image_processor, make_encoder(tokenizer, model.config, info), model_dir=name,
                     info=info, pad_to_square=pad_to_square)


def load_for_eval(model_dir: str | os.PathLike, device: str | torch.device = "auto",
                  dtype: str | torch.dtype | None = "auto", template: str | None = None,
                  system: str | None = None) -> EvalModel:
    """Load a saved llavadi/HF LLaVA directory (model, tokenizer, image processor, prompt info) for eval."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir}: no config.json; is this a saved model directory?")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dt)
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{model_dir}: no image processor saved ({e})") from e
    info = read_model_info(model_dir, model.config, template=template, system=system)
    encoder = make_encoder(tokenizer, model.config, info)
    return EvalModel(model, tokenizer, image_processor, encoder, model_dir=model_dir, info=info,
                     pad_to_square=bool(info.get("pad_to_square", True)))


def user_text(question: EvalQuestion) -> str:
    """The user turn: '<image>\\n' before the question when it has an image, as LLaVA's eval scripts do."""
    if IMAGE_PLACEHOLDER in question.prompt:
        raise ValueError(f"question {question.question_id!r}: its prompt already holds {IMAGE_PLACEHOLDER!r}; "
                         "pass the bare question, the image placeholder is added here")
    return f"{IMAGE_PLACEHOLDER}\n{question.prompt}" if question.has_image else question.prompt


def encode_question(encoder: ConversationEncoder, question: EvalQuestion) -> list[int]:
    """Prompt token ids (image placeholder expanded) of one question."""
    turn = Turn("user", user_text(question))
    return encoder.encode_prompt([turn], n_images=1 if question.has_image else 0,
                                 sample_id=str(question.question_id)).input_ids


def question_image(question: EvalQuestion, pad_to_square: bool = True) -> Image.Image:
    """The question's RGB image (from its file or its base64 bytes), padded to a square as in training."""
    if question.image is not None:
        return load_image(question.image, str(question.question_id), pad_to_square)
    try:
        with Image.open(io.BytesIO(base64.b64decode(question.image_base64))) as im:
            img = im.convert("RGB")
    except Exception as e:  # binascii and PIL raise several types for bad data
        raise SampleError(f"question {question.question_id!r}: undecodable base64 image ({e})") from e
    return expand_to_square(img) if pad_to_square else img


def _pad_id(tokenizer) -> int:
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


def _pixel_batch(bundle: EvalModel, questions: list[EvalQuestion], device, dtype) -> torch.Tensor | None:
    pix = [pixel_values_for(bundle.image_processor, question_image(q, bundle.pad_to_square))
           for q in questions if q.has_image]
    if not pix:
        return None
    return torch.stack(pix).to(device=device, dtype=dtype)


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids.to(device), mask.to(device)


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _as_bundle(model, tokenizer, image_processor, encoder) -> EvalModel:
    return model if isinstance(model, EvalModel) else EvalModel(model, tokenizer, image_processor, encoder)


@torch.no_grad()
def generate_answer_ids(model, tokenizer, image_processor, encoder, questions: list[EvalQuestion],
                        batch_size: int = 16, max_new_tokens: int = 16, device=None,
                        progress: bool = True, desc: str = "generating",
                        prompt_ids: list[list[int]] | None = None) -> list[list[int]]:
    """Greedy answer token ids per question (original order), up to and including the first eos.

    `device`: where to run (the model is moved there if it is elsewhere); None keeps the model's device.
    `prompt_ids`: ready-made prompts (e.g. multi-turn histories), one per question, instead of
    encoding each question's one-turn prompt; the questions then only bring their images.
    """
    device_override = device
    bundle = _as_bundle(model, tokenizer, image_processor, encoder)
    net, tok, enc = bundle.model, bundle.tokenizer, bundle.encoder
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    device, dtype = _model_device_dtype(net)
    if device_override is not None and resolve_device(device_override) != device:
        net.to(resolve_device(device_override))  # run where asked: the model moves there
        device, dtype = _model_device_dtype(net)
    pad_id, eos_ids = _pad_id(tok), eos_token_ids(net, tok)
    if prompt_ids is not None and len(prompt_ids) != len(questions):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(questions)} questions")
    prompts = prompt_ids if prompt_ids is not None else [encode_question(enc, q) for q in questions]
    # longest first: a batch that does not fit in memory fails at once, not at the end
    order = sorted(range(len(questions)), key=lambda i: -len(prompts[i]))
    answers: list[list[int] | None] = [None] * len(questions)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(questions), desc=desc, unit="q")
    was_training = net.training
    net.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            input_ids, attention_mask = _left_pad([prompts[i] for i in idx], pad_id, device)
            kwargs = {}
            pixel_values = _pixel_batch(bundle, [questions[i] for i in idx], device, dtype)
            if pixel_values is not None:
                kwargs["pixel_values"] = pixel_values
            out = net.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                               num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                               eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True,
                               # an image placeholder in an answer has no image behind it: never emit it
                               suppress_tokens=[enc.image_token_id],
                               temperature=None, top_p=None, top_k=None, **kwargs)
            new = out[:, input_ids.shape[1]:].tolist()
            for row, i in zip(new, idx):
                # rows that finished early are filled with padding after their eos: cut there
                cut = next((k + 1 for k, t in enumerate(row) if t in eos_ids), len(row))
                answers[i] = row[:cut]
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        net.train(was_training)
    return answers  # type: ignore[return-value]


def decode_answer(tokenizer, ids: list[int]) -> str:
    """Answer text from generated ids: special tokens (eos, pad) dropped, whitespace stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_answers(model, tokenizer, image_processor, encoder, questions: list[EvalQuestion],
                     batch_size: int = 16, max_new_tokens: int = 16, device=None,
                     progress: bool = True) -> list[str]:
    """Greedy answers (decoded, stripped) to `questions`, in their order; batched with left padding."""
    bundle = _as_bundle(model, tokenizer, image_processor, encoder)
    ids = generate_answer_ids(bundle, None, None, None, questions, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, device=device, progress=progress)
    return [decode_answer(bundle.tokenizer, a) for a in ids]
