"""Which positions a loss reads, typed, and how many there are in a batch (the normalisers).

Every term of the objective is a SUM over the positions (or matrix entries) of its selection,
divided by the number of such positions in the whole optimisation step: all micro-batches of a
gradient-accumulation window and all processes. A selection is a small frozen dataclass, so it
is its own normaliser key:

- ``Targets()``: CE; position t when ``labels[t + 1] != -100``.
- ``Predictions(group)``: logit terms; position t when token t+1 is of the token-type group and
  t is not padding (the logit at t predicts token t+1).
- ``Tokens(group)``: hidden-state and per-row terms; the tokens of the group themselves.
- ``Pairs(rows, cols)``: relation matrices; per sample, (#rows of the group) x (#cols of the group).

``count_selections`` gives one micro-batch's counts; ``sum_counts`` adds the micro-batches of an
accumulation window and ``all_reduce_counts`` sums them over processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from llavadi.data.token_types import TYPE_GROUPS, TokenType, type_mask
from llavadi.distributed import sum_over_processes

Tensor = torch.Tensor
IGNORE_INDEX = -100


def _check_group(group: str) -> None:
    if group not in TYPE_GROUPS:
        raise ValueError(f"unknown token-type group {group!r}; choose one of {sorted(TYPE_GROUPS)}")


@dataclass(frozen=True)
class Targets:
    """CE's positions: every position whose next label is trained on."""

    def mask(self, token_types: Tensor, labels: Tensor) -> Tensor:
        """(B, T) positions selected."""
        return shifted_labels(labels) != IGNORE_INDEX

    def count(self, token_types: Tensor, labels: Tensor) -> Tensor:
        """Number of selected positions in this micro-batch."""
        return self.mask(token_types, labels).sum()


@dataclass(frozen=True)
class Predictions:
    """Logit terms' positions: those that predict a token of the group."""

    group: str

    def __post_init__(self) -> None:
        _check_group(self.group)

    def mask(self, token_types: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, T) positions selected."""
        return prediction_mask(token_types, self.group)

    def count(self, token_types: Tensor, labels: Tensor) -> Tensor:
        """Number of selected positions in this micro-batch."""
        return self.mask(token_types).sum()


@dataclass(frozen=True)
class Tokens:
    """The tokens of a group themselves (hidden-state terms, per-row terms)."""

    group: str

    def __post_init__(self) -> None:
        _check_group(self.group)

    def mask(self, token_types: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, T) positions selected."""
        return type_mask(token_types, self.group)

    def count(self, token_types: Tensor, labels: Tensor) -> Tensor:
        """Number of selected tokens in this micro-batch."""
        return self.mask(token_types).sum()


@dataclass(frozen=True)
class Pairs:
    """Entries of per-sample relation matrices: rows of one group x columns of another."""

    rows: str
    cols: str

    def __post_init__(self) -> None:
        _check_group(self.rows)
        _check_group(self.cols)

    def count(self, token_types: Tensor, labels: Tensor) -> Tensor:
        """Sum over samples of (#row tokens) x (#column tokens)."""
        n_rows = type_mask(token_types, self.rows).sum(dim=1)
        n_cols = type_mask(token_types, self.cols).sum(dim=1)
        return (n_rows * n_cols).sum()


Selection = Union[Targets, Predictions, Tokens, Pairs]


def selection_name(selection: Selection) -> str:
    """A stable text name of a selection (sort key across processes, messages)."""
    if isinstance(selection, Targets):
        return "targets"
    if isinstance(selection, Pairs):
        return f"pairs:{selection.rows},{selection.cols}"
    return f"{type(selection).__name__.lower()}:{selection.group}"


# ---------------------------------------------------------------- positions
def prediction_mask(token_types: Tensor, group: str) -> Tensor:
    """(B, T) positions whose next token is of the group and which are not padding."""
    next_in_group = torch.zeros_like(token_types, dtype=torch.bool)
    next_in_group[:, :-1] = type_mask(token_types[:, 1:], group)
    return next_in_group & (token_types != int(TokenType.PAD))


def shifted_labels(labels: Tensor) -> Tensor:
    """labels[t + 1] at position t (IGNORE_INDEX at the last position): the target of the logit at t."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


# ---------------------------------------------------------------- normalisers
def count_selections(selections, token_types: Tensor, labels: Tensor) -> dict[Selection, float]:
    """Per selection, the number of positions (or entries) this micro-batch contributes."""
    if not selections:
        return {}
    values = torch.stack([s.count(token_types, labels).to(torch.float64) for s in selections]).tolist()
    return dict(zip(selections, values))


def sum_counts(counts: list[dict[Selection, float]]) -> dict[Selection, float]:
    """Per-selection sum of count_selections results (the micro-batches of one accumulation window)."""
    total: dict[Selection, float] = {}
    for c in counts:
        for key, value in c.items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


def all_reduce_counts(counts: dict[Selection, float]) -> dict[Selection, float]:
    """Sum per-selection counts over all processes of torch.distributed (unchanged when not distributed)."""
    return sum_over_processes(counts, key=selection_name)
