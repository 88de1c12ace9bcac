"""Per-token types that route every loss: each position of a batch is exactly one of these."""

from enum import IntEnum

import torch


class TokenType(IntEnum):
    """What a token of an input sequence is."""

    PAD = 0
    IMAGE = 1
    INSTRUCTION = 2  # system prompt, role tags, the human turns: everything not trained on
    RESPONSE = 3  # assistant tokens (incl. the end-of-turn token): the ones with labels


# names a recipe may use for the token types a term reads
TYPE_GROUPS: dict[str, tuple[TokenType, ...]] = {
    "response": (TokenType.RESPONSE,),
    "image": (TokenType.IMAGE,),
    "instruction": (TokenType.INSTRUCTION,),
    "text": (TokenType.INSTRUCTION, TokenType.RESPONSE),
    "all": (TokenType.IMAGE, TokenType.INSTRUCTION, TokenType.RESPONSE),
}


def type_mask(token_types: torch.Tensor, group: str) -> torch.Tensor:
    """Boolean mask of the positions whose type is in the named group."""
    if group not in TYPE_GROUPS:
        raise ValueError(f"unknown token-type group {group!r}; choose one of {sorted(TYPE_GROUPS)}")
    mask = torch.zeros_like(token_types, dtype=torch.bool)
    for t in TYPE_GROUPS[group]:
        mask |= token_types == int(t)
    return mask
