"""The tokens a teacher and a student both have, as the LM-head pass reads them (same tokenizer up to additions).

A ``SharedVocab`` comes from a ``TokenizerPair`` (``llavadi.data.tokenizer_pair``) of kind
``additions``: the fixed map of token ids matched by string. The fused pass orders each LM head's
rows shared-first (the shared tokens in one common order, then the others), once per forward, so
within every chunk:
- the student's logits over its whole vocabulary are one matmul (CE reads them all); the logit
  terms read its first ``n_shared`` columns, renormalised over them;
- the teacher's logits are computed over its shared rows only (one matmul of ``n_shared`` rows),
  plus its few other rows (added tokens, padding) in a small matmul whose only use is the logged
  mass outside the shared tokens.
When a side's shared tokens are its first ``n_shared`` ids in the common order (LLaVA-1.5: the
32000 base tokens and ``<image>`` on both sides), its order is the identity and nothing is copied;
otherwise its LM-head weight is gathered in that order (and the student's gradient scattered
back). The student's head changes every step: gathered once per forward. A frozen teacher's head
(no ``requires_grad``) is gathered once and the copy kept (``FrozenRowCopy``) while the head is the
same tensor with the same version counter: replacing it or writing into it in place
(``load_state_dict``, ``copy_``, an optimizer step) makes a new copy at the next read.

A top-k teacher's ids (an offline cache stores the teacher's vocabulary ids) are mapped to the
shared order when read; ids the student does not have become -1: their mass joins the missing mass.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from llavadi.data.tokenizer_pair import DIFFERENT, TokenizerPair

Tensor = torch.Tensor


def _order(shared: tuple[int, ...], rows: int) -> Tensor | None:
    """Rows shared-first (in the given order), then the others ascending; None when that is the identity."""
    ids = torch.tensor(shared, dtype=torch.long, device="cpu")
    if torch.equal(ids, torch.arange(len(shared), device="cpu")):
        return None
    rest = torch.ones(rows, dtype=torch.bool, device="cpu")
    rest[ids] = False
    return torch.cat([ids, rest.nonzero().squeeze(1)])


def _inverse(order: Tensor) -> Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


def _stamp(tensor: Tensor | None) -> tuple | None:
    """What identifies a tensor's current content without reading it: storage, layout and in-place version."""
    if tensor is None:
        return None
    return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.device, tensor._version


class FrozenRowCopy:
    """A frozen LM head's rows in another order, gathered once and kept while the head is unchanged.

    Unchanged: the very tensors (held by weak reference, so a replaced head is not kept alive) with
    the same storage and version counter (every in-place write, ``copy_`` as ``load_state_dict``
    does it or an optimizer's update, bumps it). A head that requires grad is gathered at every
    read (it is being trained). Writes through ``.data`` bypass version counters (and autograd's own
    checks): a teacher must not be edited that way between steps.
    """

    def __init__(self) -> None:
        self._refs: tuple | None = None
        self._stamps: tuple | None = None
        self._rows: tuple[Tensor, Tensor | None] | None = None
        self.gathers = 0  # how many times the rows were gathered (a test and the benchmark read it)

    def __getstate__(self) -> dict:
        """A pickled or deep-copied vocabulary map starts without the copy (weak references do not pickle)."""
        return {"_refs": None, "_stamps": None, "_rows": None, "gathers": self.gathers}

    def _same(self, weight: Tensor, bias: Tensor | None) -> bool:
        if self._refs is None:
            return False
        ref_w, ref_b = self._refs
        same_bias = (ref_b is None and bias is None) or (ref_b is not None and ref_b() is bias)
        return ref_w() is weight and same_bias and self._stamps == (_stamp(weight), _stamp(bias))

    def rows(self, weight: Tensor, bias: Tensor | None, order: Tensor) -> tuple[Tensor, Tensor | None]:
        """weight[order], bias[order]: the kept copy when the head is frozen and unchanged since it was made."""
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return _ordered(weight, bias, order)
        if not self._same(weight, bias):
            self._rows = None  # drop the old copy before making the new one
            with torch.no_grad():
                self._rows = _ordered(weight, bias, order)
            self._refs = (weakref.ref(weight), None if bias is None else weakref.ref(bias))
            self._stamps = (_stamp(weight), _stamp(bias))
            self.gathers += 1
        return self._rows


@dataclass(frozen=True)
class SharedVocab:
    """Row orders of both LM heads that put the shared tokens first, in one common order."""

    n_shared: int
    student_rows: int
    teacher_rows: int
    student_order: Tensor | None  # (student_rows,) original row of each ordered row; None: identity
    teacher_order: Tensor | None
    teacher_to_shared: Tensor  # (teacher_rows,) position of each teacher id in the common order, -1: not shared
    teacher_copy: FrozenRowCopy = field(default_factory=FrozenRowCopy, compare=False, repr=False)

    @classmethod
    def from_pair(cls, pair: TokenizerPair) -> SharedVocab:
        """The shared vocabulary of a pair of kind `additions` (refused for different tokenizers)."""
        if pair.kind == DIFFERENT:
            raise ValueError("teacher and student have different tokenizers: their distributions cannot be compared "
                             "over shared tokens")
        to_shared = torch.full((pair.teacher_rows,), -1, dtype=torch.long, device="cpu")
        shared_ids = torch.tensor(pair.teacher_ids, dtype=torch.long, device="cpu")
        to_shared[shared_ids] = torch.arange(pair.n_shared, device="cpu")
        return cls(pair.n_shared, pair.student_rows, pair.teacher_rows, _order(pair.student_ids, pair.student_rows),
                   _order(pair.teacher_ids, pair.teacher_rows), to_shared)

    @property
    def student_narrowed(self) -> bool:
        """Whether the student has tokens the teacher lacks (then terms renormalise over the shared columns)."""
        return self.n_shared < self.student_rows

    def check_heads(self, student_rows: int, teacher_rows: int | None) -> None:
        """The LM heads have the rows the tokenizer pair was classified with."""
        for who, got, want in (("student", student_rows, self.student_rows), ("teacher", teacher_rows,
                                                                                self.teacher_rows)):
            if got is not None and got != want:
                raise ValueError(f"the {who}'s LM head has {got} rows but its tokenizer and config gave {want}: "
                                 "the vocabulary map was built for another model")

    def student_head(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The student's LM head in shared-first order (the same tensors when the order is the identity)."""
        return _ordered(weight, bias, self.student_order)

    def teacher_heads(self, weight: Tensor, bias: Tensor | None):
        """The teacher's LM head split into its shared rows (common order) and its other rows (None if none).

        A frozen head's reordered copy is kept across calls while the head is unchanged (``FrozenRowCopy``)."""
        if self.teacher_order is not None:
            weight, bias = self.teacher_copy.rows(weight, bias, self.teacher_order)
        n = self.n_shared
        shared = (weight[:n], None if bias is None else bias[:n])
        other = (weight[n:], None if bias is None else bias[n:]) if weight.shape[0] > n else None
        return shared, other

    def student_grad(self, grad_ordered: Tensor) -> Tensor:
        """A gradient over the student's ordered rows back in its original row order."""
        if self.student_order is None:
            return grad_ordered
        return grad_ordered.index_select(0, _inverse(self.student_order).to(grad_ordered.device))

    def student_targets(self, targets: Tensor) -> Tensor:
        """CE target ids (student vocabulary; negative: ignored) as positions in the ordered student head."""
        if self.student_order is None:
            return targets
        inverse = _inverse(self.student_order)
        return torch.where(targets >= 0, inverse[targets.clamp_min(0)], targets)

    def shared_student_columns(self) -> Tensor:
        """The student ids of the shared tokens, in the common order."""
        if self.student_order is None:
            return torch.arange(self.n_shared, device="cpu")
        return self.student_order[:self.n_shared]

    def shared_teacher_columns(self) -> Tensor:
        """The teacher ids of the shared tokens, in the common order."""
        if self.teacher_order is None:
            return torch.arange(self.n_shared, device="cpu")
        return self.teacher_order[:self.n_shared]

    def map_topk(self, topk_ids: Tensor, topk_logprobs: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher top-k ids as positions in the common order (-1, log-prob -inf: a token the student lacks)."""
        mapped = self.teacher_to_shared.to(topk_ids.device)[topk_ids.long()]
        logprobs = torch.where(mapped >= 0, topk_logprobs, torch.full_like(topk_logprobs, float("-inf")))
        return mapped, logprobs


def _ordered(weight: Tensor, bias: Tensor | None, order: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if order is None:
        return weight, bias
    order = order.to(weight.device)
    return weight.index_select(0, order), None if bias is None else bias.index_select(0, order)
