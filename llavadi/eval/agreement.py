"""Teacher-student agreement: how often the student answers as the teacher does, and how far apart
their next-token distributions are on the teacher's own answers.

- agreement rate: exact match of the two greedy answers after `normalize_simple`.
- mean KL(p_T || p_S): both models are teacher-forced on (their own prompt + the teacher's
  generated answer tokens, eos included when the teacher emitted one); the KL is taken at every
  position that predicts an answer token and averaged over all answer tokens of all questions.
  Teacher and student may use different numbers of image tokens, so their prompts differ in
  length: answer positions are matched by their order within the answer, never by index.
  Tokenizers the same up to additions (``llavadi.data.tokenizer_pair``): the teacher's answer ids
  reach the student through the fixed id map, and the KL compares the two distributions over the
  tokens both have (each renormalised over them); different tokenizers are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llavadi.data.collator import pad_sequences
from llavadi.data.tokenizer_pair import DIFFERENT, IDENTICAL, TokenizerPair
from llavadi.distill.compat import tokenizer_pair
from llavadi.distill.divergences import ForwardKL
from llavadi.eval.decode import pad_token_id
from llavadi.eval.generate import (
    EvalQuestion,
    decode_answer,
    encode_question,
    generate_answer_ids,
    length_sorted_batches,
    model_device_dtype,
    pixel_batch,
)
from llavadi.eval.normalize import normalize_simple
from llavadi.eval.parallel import ONE_PROCESS, Shard
from llavadi.models.build import LoadedModel


@dataclass
class AgreementResult:
    """Both models' greedy answers, their agreement and the teacher-forced KL on the teacher's answers."""

    teacher_answers: list[str]
    student_answers: list[str]
    agreement: float
    mean_kl: float
    n_answer_tokens: int
    per_question_kl: list[float]  # mean KL over each question's answer tokens


def agreement_rate(teacher_answers: list[str], student_answers: list[str], normalize=normalize_simple) -> float:
    """Fraction of questions whose two answers are equal after `normalize`."""
    if len(teacher_answers) != len(student_answers):
        raise ValueError(f"{len(teacher_answers)} teacher answers vs {len(student_answers)} student answers")
    if not teacher_answers:
        raise ValueError("agreement needs at least one question")
    same = sum(normalize(t) == normalize(s) for t, s in zip(teacher_answers, student_answers))
    return same / len(teacher_answers)


def _vocabulary_pair(student: LoadedModel, teacher: LoadedModel) -> TokenizerPair | None:
    """None for one tokenizer; the pair when the same up to additions; ValueError for different tokenizers."""
    pair = tokenizer_pair(student, teacher)
    if pair.kind == DIFFERENT:
        raise ValueError("the KL on the teacher's answer tokens needs the teacher's and the student's tokenizers "
                         "to be the same (up to added tokens and padding); these differ:\n    "
                         + "\n    ".join(pair.describe()))
    v_s = student.model.get_output_embeddings().out_features
    v_t = teacher.model.get_output_embeddings().out_features
    if pair.kind == IDENTICAL and v_s != v_t:
        raise ValueError(f"student and teacher output vocabularies differ ({v_s} vs {v_t} logits) with one tokenizer")
    return None if pair.kind == IDENTICAL else pair


def _student_answers(pair: TokenizerPair | None, questions: list[EvalQuestion],
                     answers: list[list[int]]) -> list[list[int]]:
    """The teacher's answer ids in the student's vocabulary (through the pair's id map)."""
    if pair is None:
        return answers
    to_student = pair.teacher_to_student()
    out = []
    for q, a in zip(questions, answers):
        mapped = to_student[torch.tensor(a, dtype=torch.long)].tolist()
        if min(mapped) < 0:
            lacking = [t for t, m in zip(a, mapped) if m < 0]
            raise ValueError(f"question {q.question_id!r}: the teacher's answer holds token id(s) {lacking[:5]} the "
                             "student's tokenizer does not have")
        out.append(mapped)
    return out


def _answer_hidden(bundle: LoadedModel, questions: list[EvalQuestion], prompts: list[list[int]],
                   answers: list[list[int]]) -> torch.Tensor:
    """Last hidden states at the positions that predict each answer token, (sum of answer lengths, H), in order."""
    device, dtype = model_device_dtype(bundle.model)
    seqs = [p + a for p, a in zip(prompts, answers)]
    # right padding: positions 0.. are the same as unpadded
    input_ids = pad_sequences(seqs, pad_token_id(bundle.tokenizer), side="right")
    attention_mask = pad_sequences([[1] * len(s) for s in seqs], 0, side="right")
    rows, cols = [], []
    for b, (p, a) in enumerate(zip(prompts, answers)):
        rows += [b] * len(a)
        cols += range(len(p) - 1, len(p) - 1 + len(a))  # the logit at t predicts token t+1
    kwargs = {}
    image_inputs = pixel_batch(bundle, questions, device, dtype)
    if image_inputs is not None:
        kwargs.update(image_inputs)
        kwargs.update(bundle.family.text_inputs(input_ids.to(device), bundle.model.config))
    hidden = bundle.model.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                use_cache=False, **kwargs).last_hidden_state
    # only the answer positions go through lm_head: no (B, T, V) logits tensor
    return hidden[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)]


def _batch_kl(student: LoadedModel, teacher: LoadedModel, questions: list[EvalQuestion], prompts_t, prompts_s,
              answers: list[list[int]], temperature: float,
              pair: TokenizerPair | None = None) -> tuple[list[float], float, int]:
    """One batch: (per-question mean KL, summed KL, number of answer tokens)."""
    h_t = _answer_hidden(teacher, questions, prompts_t, answers)
    h_s = _answer_hidden(student, questions, prompts_s, _student_answers(pair, questions, answers))
    logits_t = teacher.model.get_output_embeddings()(h_t)
    logits_s = student.model.get_output_embeddings()(h_s)
    if pair is not None:  # the distributions over the tokens both have
        logits_t = logits_t[:, torch.tensor(pair.teacher_ids, device=logits_t.device)]
        logits_s = logits_s[:, torch.tensor(pair.student_ids, device=logits_s.device)]
    kl = ForwardKL(temperature=temperature)(logits_s, logits_t.to(logits_s.device)).double().cpu()
    per_question, offset = [], 0
    for a in answers:
        per_question.append(float(kl[offset:offset + len(a)].mean()))
        offset += len(a)
    return per_question, float(kl.sum()), kl.numel()


@torch.no_grad()
def teacher_forced_kl(student: LoadedModel, teacher: LoadedModel, questions: list[EvalQuestion],
                      answer_ids: list[list[int]], batch_size: int = 16, temperature: float = 1.0,
                      progress: bool = False, shard: Shard | None = None) -> tuple[float, int, list[float]]:
    """(mean KL(p_T||p_S) over all answer tokens, number of answer tokens, per-question mean KL).

    `shard`: under data parallelism this process runs its share of the batches; the sums are
    combined in batch order, so the result equals one process's.
    """
    if not questions:
        raise ValueError("teacher-forced KL needs at least one question")
    if len(questions) != len(answer_ids):
        raise ValueError(f"{len(questions)} questions vs {len(answer_ids)} answers")
    for q, a in zip(questions, answer_ids):
        if not a:
            raise ValueError(f"question {q.question_id!r}: empty teacher answer, no token to compare on")
    pair = _vocabulary_pair(student, teacher)
    shard = shard or ONE_PROCESS
    teacher_encoder, student_encoder = teacher.encoder(), student.encoder()
    prompts_t = [encode_question(teacher_encoder, q) for q in questions]
    prompts_s = [encode_question(student_encoder, q) for q in questions]
    batches = length_sorted_batches([len(p) + len(a) for p, a in zip(prompts_t, answer_ids)], batch_size)
    mine = [k for k in range(len(batches)) if shard.owns(k)]
    bar = None
    if progress and shard.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(batches[k]) for k in mine), desc="teacher-forced KL", unit="q")
    modes = (student.model.training, teacher.model.training)
    student.model.eval()
    teacher.model.eval()
    local = {}
    try:
        for k in mine:
            idx = batches[k]
            local[k] = _batch_kl(student, teacher, [questions[i] for i in idx], [prompts_t[i] for i in idx],
                                 [prompts_s[i] for i in idx], [answer_ids[i] for i in idx], temperature, pair)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        student.model.train(modes[0])
        teacher.model.train(modes[1])
    return _combine_batches(batches, shard.gather(local), len(questions))


def _combine_batches(batches: list[list[int]], results: dict, n_questions: int) -> tuple[float, int, list[float]]:
    """Batch results put together in batch order (the same float sums as one process)."""
    per_question: list[float] = [0.0] * n_questions
    total, count = 0.0, 0
    for k, idx in enumerate(batches):
        batch_per_question, batch_sum, batch_count = results[k]
        for i, value in zip(idx, batch_per_question):
            per_question[i] = value
        total += batch_sum
        count += batch_count
    return total / count, count, per_question


def measure_agreement(student: LoadedModel, teacher: LoadedModel, questions: list[EvalQuestion],
                      batch_size: int = 16, max_new_tokens: int = 16, progress: bool = True,
                      student_answer_ids: list[list[int]] | None = None,
                      teacher_answer_ids: list[list[int]] | None = None,
                      shard: Shard | None = None) -> AgreementResult:
    """Greedy answers of both models, their agreement rate and the mean KL on the teacher's answer tokens.

    Answers already generated (e.g. resumed from a journal) are passed as `*_answer_ids`; `shard`:
    data parallelism (llavadi.eval.parallel), the results equal one process's.
    """
    teacher_ids = teacher_answer_ids
    if teacher_ids is None:
        teacher_ids = generate_answer_ids(teacher, questions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                          progress=progress, desc="teacher answers", shard=shard)
    if student_answer_ids is None:
        student_answer_ids = generate_answer_ids(student, questions, batch_size=batch_size,
                                                 max_new_tokens=max_new_tokens, progress=progress,
                                                 desc="student answers", shard=shard)
    teacher_answers = [decode_answer(teacher.tokenizer, a) for a in teacher_ids]
    student_answers = [decode_answer(student.tokenizer, a) for a in student_answer_ids]
    mean_kl, n_tokens, per_question = teacher_forced_kl(student, teacher, questions, teacher_ids,
                                                        batch_size=batch_size, progress=progress, shard=shard)
    return AgreementResult(teacher_answers, student_answers, agreement_rate(teacher_answers, student_answers),
                           mean_kl, n_tokens, per_question)
