"""Conversation templates: turn a LLaVA conversation into text segments typed instruction/response.

A template never tokenizes. It returns the conversation as an ordered list of character
segments, each marked as trained (the assistant's answer and its end-of-turn marker) or not.
`llavadi.data.encode` tokenizes the joined text once and types every token by the segment its
characters fall in, so the label mask is exact by construction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Segment:
    """A piece of the conversation text; `trained` marks assistant tokens."""

    text: str
    trained: bool


@dataclass(frozen=True)
class Turn:
    """One message: role is 'user' or 'assistant'."""

    role: str
    text: str


class Template(ABC):
    """Base class: render turns into typed segments, and a generation prompt."""

    name = "base"

    @abstractmethod
    def segments(self, turns: list[Turn], tokenizer=None) -> list[Segment]:
        """Typed segments of a whole conversation (ends with an assistant turn)."""

    @abstractmethod
    def prompt(self, turns: list[Turn], tokenizer=None) -> str:
        """Text to generate the next assistant turn from (turns end with a user turn)."""


class VicunaV1(Template):
    """LLaVA-1.5's `vicuna_v1`: '{system} USER: {q} ASSISTANT: {a}</s>USER: ...'."""

    name = "vicuna_v1"

    def __init__(self, system: str = LLAVA_SYSTEM, eos: str = "</s>"):
        self.system = system
        self.eos = eos

    def _head(self) -> str:
        return f"{self.system} " if self.system else ""

    def segments(self, turns, tokenizer=None):
        out = [Segment(self._head(), False)]
        for turn in turns:
            if turn.role == "user":
                out.append(Segment(f"USER: {turn.text} ASSISTANT:", False))
            else:
                # the space after "ASSISTANT:" belongs to the answer, as the model generates it
                out.append(Segment(f" {turn.text}{self.eos}", True))
        return [s for s in out if s.text]

    def prompt(self, turns, tokenizer=None):
        text = self._head()
        for turn in turns:
            if turn.role == "user":
                text += f"USER: {turn.text} ASSISTANT:"
            else:
                text += f" {turn.text}{self.eos}"
        return text


class Plain(Template):
    """LLaVA's projector-pretraining template: the image, then the caption (trained), then eos.

    The human turn's words are dropped, as LLaVA does: only `<image>` is kept from it.
    """

    name = "plain"

    def __init__(self, eos: str = "</s>"):
        self.eos = eos

    def segments(self, turns, tokenizer=None):
        if len(turns) != 2:
            raise ValueError("the 'plain' template takes exactly one human and one gpt turn")
        image = IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0].text else ""
        return [s for s in (Segment(image, False), Segment(turns[1].text + self.eos, True)) if s.text]

    def prompt(self, turns, tokenizer=None):
        return IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in turns[0].text else ""


class ChatTemplate(Template):
    """The tokenizer's own chat template (e.g. Qwen2, Llama-3 instruct checkpoints).

    Assistant spans are found by rendering the conversation prefix with a generation prompt and
    the prefix plus the answer: what the answer adds is trained. A template that does not render
    prefixes as prefixes of the whole is reported, never guessed around.
    """

    name = "chat_template"

    def __init__(self, image_parts: bool = False):
        # image_parts: the template renders images itself from {"type": "image"} content parts (the
        # processor templates of Qwen2-VL and later families); else content is the text, `<image>` kept
        self.image_parts = image_parts

    def _messages(self, turns):
        if not self.image_parts:
            return [{"role": t.role, "content": t.text} for t in turns]
        return [{"role": t.role, "content": content_parts(t.text)} for t in turns]

    def segments(self, turns, tokenizer=None):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat_template' needs a tokenizer that has a chat template")
        msgs = self._messages(turns)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        out: list[Segment] = []
        done = 0
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            after = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not (after.startswith(before) and full.startswith(after) and len(before) >= done):
                raise ValueError(
                    "the tokenizer's chat template does not render conversation prefixes as prefixes "
                    "of the whole conversation; use template 'vicuna_v1' or fix the chat template"
                )
            out.append(Segment(full[done : len(before)], False))
            out.append(Segment(full[len(before) : len(after)], True))
            done = len(after)
        out.append(Segment(full[done:], False))
        return [s for s in out if s.text]

    def prompt(self, turns, tokenizer=None):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat_template' needs a tokenizer that has a chat template")
        return tokenizer.apply_chat_template(self._messages(turns), tokenize=False, add_generation_prompt=True)


def content_parts(text: str) -> list[dict]:
    """A turn's text as chat content parts: an image part for each `<image>`, text parts between them.

    The newline LLaVA data puts after `<image>` belongs to the placeholder (LLaVA-1.5's prompt joins
    image and text with it), so it is dropped: a family's template writes its own separators.
    """
    parts: list[dict] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


TEMPLATES = {"vicuna_v1": VicunaV1, "plain": Plain, "chat_template": ChatTemplate}


def get_template(name: str, system: str | None = None, eos: str = "</s>", image_parts: bool = False) -> Template:
    """Template by exact name; `system` overrides vicuna_v1's system prompt ('' for none); `image_parts`:
    a chat template renders images from content parts (see ChatTemplate)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    if name == "vicuna_v1":
        return VicunaV1(system=LLAVA_SYSTEM if system is None else system, eos=eos)
    if name == "plain":
        return Plain(eos=eos)
    return ChatTemplate(image_parts=image_parts)
