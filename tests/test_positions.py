"""Student <-> teacher token correspondence (vectorised) against a per-sample loop written plainly."""

import torch

from llavadi.data.token_types import TokenType
from llavadi.distill.positions import corresponding_positions, prediction_rows

MATCHED = (TokenType.IMAGE, TokenType.INSTRUCTION, TokenType.RESPONSE)


def _reference(student_types, teacher_types):
    """Per sample and type with equal counts in both models, the k-th student token maps to the k-th teacher one."""
    mapping = torch.full_like(student_types, -1)
    for b in range(student_types.shape[0]):
        for token_type in MATCHED:
            s_pos = [i for i, x in enumerate(student_types[b].tolist()) if x == int(token_type)]
            t_pos = [i for i, x in enumerate(teacher_types[b].tolist()) if x == int(token_type)]
            if len(s_pos) == len(t_pos):
                for s, t in zip(s_pos, t_pos):
                    mapping[b, s] = t
    return mapping


def test_corresponding_positions_equal_the_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        batch = int(torch.randint(1, 5, (1,), generator=g))
        s_len, t_len = (int(x) for x in torch.randint(1, 30, (2,), generator=g))
        student = torch.randint(0, 4, (batch, s_len), generator=g)
        teacher = student.clone() if trial % 3 == 0 else torch.randint(0, 4, (batch, t_len), generator=g)
        got = corresponding_positions(student, teacher)
        assert torch.equal(got, _reference(student, teacher)), (student, teacher)


def test_image_tokens_of_different_counts_do_not_correspond_but_text_does():
    img, ins, res, pad = (int(t) for t in (TokenType.IMAGE, TokenType.INSTRUCTION, TokenType.RESPONSE, TokenType.PAD))
    student = torch.tensor([[ins, img, img, ins, res, res, pad]])
    teacher = torch.tensor([[ins, img, img, img, img, ins, res, res]])
    assert corresponding_positions(student, teacher).tolist() == [[0, -1, -1, 5, 6, 7, -1]]
    # the logit at student position t predicts token t+1: it maps to the teacher position before token t+1's match
    assert prediction_rows(student, teacher).tolist() == [-1, -1, 4, 5, 6, -1, -1]
