"""Tokenize conversations with exact label masks and per-token types.

The template's typed segments are joined and tokenized once (the tokenizer sees the same text
it sees at generation time); each token is typed by the segment its characters fall in, read
from the tokenizer's offset mapping. A token that mixes a trained and an untrained segment is a
template/tokenizer disagreement and raises with the sample id, instead of silently zeroing the
sample's labels as LLaVA's "tokenization mismatch" does.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from llavadi.data.templates import IMAGE_PLACEHOLDER, ChatTemplate, Segment, Template, Turn
from llavadi.data.token_types import TokenType

IGNORE_INDEX = -100


class SampleError(ValueError):
    """A sample that cannot be used; the message names the file and sample id."""


@dataclass
class Encoded:
    """One tokenized sample: ids with image placeholders expanded, types and labels aligned."""

    input_ids: list[int]
    token_types: list[int]
    labels: list[int]
    truncated: bool = False


class ConversationEncoder:
    """Turns (turns, has_image) into ids, token types and labels for one model's layout."""

    def __init__(self, tokenizer, template: Template, image_token_id: int, n_image_tokens: int | None,
                 max_length: int = 2048, *, image_marker: str = IMAGE_PLACEHOLDER,
                 tokens_per_image: Callable[[tuple[int, int], int], int] | None = None, multi_image: bool = False,
                 family: str = "llava", template_image_text: str | None = None):
        """`image_marker`: the text one image becomes, holding the image token once; `n_image_tokens`: copies
        of it per image, or None with `tokens_per_image((width, height), n_images)` when the count depends on
        the image (and on how many the sample holds); `multi_image`: whether a sample may hold several images
        (else refused, naming `family`); `template_image_text`: what the family's chat template writes for an
        image (and what `<image>` first becomes) when it is not the marker itself (Gemma 3 writes
        `<start_of_image>`, which its processor expands around the image token)."""
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = int(image_token_id)
        self.n_image_tokens = None if n_image_tokens is None else int(n_image_tokens)
        if self.n_image_tokens is None and tokens_per_image is None:
            raise ValueError("an encoder needs n_image_tokens or tokens_per_image")
        self.tokens_per_image = tokens_per_image
        self.image_marker = image_marker
        self.template_image_text = template_image_text or image_marker
        self.multi_image = multi_image
        self.family = family
        self.max_length = int(max_length)
        # chat templates write their own BOS; other templates rely on the tokenizer adding it
        self.add_special_tokens = not isinstance(template, ChatTemplate)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("llavadi needs a fast tokenizer (offset mapping) to build exact label masks")
        if image_marker != IMAGE_PLACEHOLDER:
            marker_ids = tokenizer(image_marker, add_special_tokens=False)["input_ids"]
            if marker_ids.count(self.image_token_id) != 1:
                raise ValueError(f"the image marker {image_marker!r} tokenizes to {marker_ids}, which does not hold "
                                 f"the image token {self.image_token_id} exactly once; load the model's own tokenizer")
            return
        ids = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if ids != self.image_token_id:
            raise ValueError(
                f"the tokenizer maps {IMAGE_PLACEHOLDER!r} to id {ids}, but the model's image_token_id is "
                f"{self.image_token_id}; add the image token to the tokenizer (llavadi.models does this "
                "when it composes a model) or load the matching tokenizer"
            )

    def _tokenize(self, text: str):
        enc = self.tokenizer(text, add_special_tokens=self.add_special_tokens, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def image_counts(self, sample_id: str, n_images: int, image_sizes: list[tuple[int, int]] | None) -> list[int]:
        """Image tokens of each of a sample's images (from their (width, height) when the count depends on it)."""
        if n_images > 1 and not self.multi_image:
            raise SampleError(f"sample {sample_id!r}: {n_images} images, but a {self.family} model takes one image "
                              "per sample")
        if self.n_image_tokens is not None or n_images == 0:
            return [self.n_image_tokens] * n_images
        if image_sizes is None or len(image_sizes) != n_images:
            raise ValueError(f"sample {sample_id!r}: the image-token count of a {self.family} model depends on the "
                             f"image: give the (width, height) of each of its {n_images} image(s)")
        return [int(self.tokens_per_image(size, n_images)) for size in image_sizes]

    def _expand_images(self, ids: list[int], types: list[int], sample_id: str, n_images: int,
                       image_sizes: list[tuple[int, int]] | None = None):
        found = sum(1 for i in ids if i == self.image_token_id)
        if found != n_images:
            raise SampleError(
                f"sample {sample_id!r}: {found} image tokens after tokenization but {n_images} image(s); "
                f"the text must hold one {IMAGE_PLACEHOLDER!r} per image"
            )
        counts = iter(self.image_counts(sample_id, n_images, image_sizes))
        out_ids: list[int] = []
        out_types: list[int] = []
        for i, t in zip(ids, types):
            if i == self.image_token_id:
                n = next(counts)
                out_ids.extend([i] * n)
                out_types.extend([int(TokenType.IMAGE)] * n)
            else:
                out_ids.append(i)
                out_types.append(t)
        return out_ids, out_types

    def _with_marker(self, text: str) -> str:
        if self.template_image_text != IMAGE_PLACEHOLDER:
            text = text.replace(IMAGE_PLACEHOLDER, self.template_image_text)
        if self.image_marker != self.template_image_text:
            text = text.replace(self.template_image_text, self.image_marker)
        return text

    def segments(self, turns: list[Turn]) -> list[Segment]:
        """The template's segments of `turns`, each image written as this model's image marker (the text `encode`
        tokenizes before expanding the image token)."""
        return [Segment(self._with_marker(s.text), s.trained) for s in self.template.segments(turns, self.tokenizer)]

    def encode(self, sample_id: str, turns: list[Turn], n_images: int,
               image_sizes: list[tuple[int, int]] | None = None) -> Encoded:
        """Ids, token types and labels of a whole conversation (truncated to max_length); `image_sizes`:
        (width, height) of each image, needed when the image-token count depends on the image."""
        segments = self.segments(turns)
        text = "".join(s.text for s in segments)
        starts, pos = [], 0
        for s in segments:
            starts.append(pos)
            pos += len(s.text)
        ids, offsets = self._tokenize(text)
        types: list[int] = []
        for tok, (a, b) in zip(ids, offsets):
            if tok == self.image_token_id:
                types.append(int(TokenType.IMAGE))
                continue
            if a == b:  # added special token (BOS) or an empty-span token
                types.append(int(TokenType.INSTRUCTION))
                continue
            seg = bisect.bisect_right(starts, b - 1) - 1
            first = bisect.bisect_right(starts, a) - 1
            if first != seg and segments[first].trained != segments[seg].trained:
                spill = text[a : starts[seg]]
                if spill.strip():
                    raise SampleError(
                        f"sample {sample_id!r}: token {text[a:b]!r} spans an answer boundary of template "
                        f"{self.template.name!r}; the template and the tokenizer disagree"
                    )
            types.append(int(TokenType.RESPONSE if segments[seg].trained else TokenType.INSTRUCTION))
        ids, types = self._expand_images(ids, types, sample_id, n_images, image_sizes)
        truncated = False
        if len(ids) > self.max_length:
            last_image = max((i for i, t in enumerate(types) if t == TokenType.IMAGE), default=-1)
            if last_image >= self.max_length:
                raise SampleError(
                    f"sample {sample_id!r}: its image tokens end at position {last_image + 1}, beyond "
                    f"max_length {self.max_length}; raise max_length or shorten the text before the image"
                )
            ids, types, truncated = ids[: self.max_length], types[: self.max_length], True
        if not any(t == TokenType.RESPONSE for t in types):
            why = "after truncation to max_length" if truncated else "(no assistant text)"
            raise SampleError(f"sample {sample_id!r}: no answer token left to train on {why}")
        labels = [i if t == TokenType.RESPONSE else IGNORE_INDEX for i, t in zip(ids, types)]
        return Encoded(ids, types, labels, truncated)

    def encode_prompt(self, turns: list[Turn], n_images: int, sample_id: str = "?",
                      image_sizes: list[tuple[int, int]] | None = None) -> Encoded:
        """Ids and types of a generation prompt (turns end with a user turn); no labels."""
        text = self._with_marker(self.template.prompt(turns, self.tokenizer))
        ids, _ = self._tokenize(text)
        types = [int(TokenType.IMAGE if i == self.image_token_id else TokenType.INSTRUCTION) for i in ids]
        ids, types = self._expand_images(ids, types, sample_id, n_images, image_sizes)
        return Encoded(ids, types, [IGNORE_INDEX] * len(ids))
