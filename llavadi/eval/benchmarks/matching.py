"""Pairing predictions with questions, and the score result every benchmark builds."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from llavadi.eval.benchmarks.records import (
    ID_SAMPLE,
    OPTION_LETTER_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    EvalDataError,
    Prediction,
    Question,
    ScoreResult,
)

_KNOWN_SUFFIXES = (SHORT_ANSWER_SUFFIX, OPTION_LETTER_SUFFIX, "Please answer yes or no.")


def question_core(text: str) -> str:
    """A question's text without image token, known suffixes and extra spaces, lower-cased."""
    text = text.replace("<image>", " ")
    for suffix in _KNOWN_SUFFIXES:
        text = text.replace(suffix, " ")
    return " ".join(text.split()).lower()


@dataclass
class Matched:
    """Predictions paired with the evaluation set's questions."""

    texts: list[str | None]  # per question, None when no prediction
    unknown: list[Prediction]

    @property
    def missing_indices(self) -> list[int]:
        """Indices of the questions that got no prediction."""
        return [i for i, text in enumerate(self.texts) if text is None]


def match_predictions(questions: list[Question], predictions: list[Prediction]) -> Matched:
    """Pair predictions with questions by (question_id, round_id); the prompt settles shared ids."""
    by_key: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, question in enumerate(questions):
        by_key[question.key].append(i)
    texts: list[str | None] = [None] * len(questions)
    taken_by: dict[int, str] = {}
    unknown = []
    for prediction in predictions:
        candidates = by_key.get(prediction.key, [])
        if len(candidates) > 1:
            # LLaVA's MME and TextVQA files give several questions one id; the echoed prompt decides.
            if prediction.prompt is None:
                raise EvalDataError(
                    f"{prediction.source}: question id {prediction.question_id!r} is shared by "
                    f"{len(candidates)} questions; the prediction needs the 'prompt' field to tell them apart")
            core = question_core(prediction.prompt)
            candidates = [i for i in candidates if question_core(questions[i].text) == core]
        if not candidates:
            unknown.append(prediction)
            continue
        free = [i for i in candidates if i not in taken_by]
        if not free:
            raise EvalDataError(f"{prediction.source}: second prediction for question "
                                f"{prediction.question_id!r} (round {prediction.round_id}); "
                                f"the first is at {taken_by[candidates[0]]}")
        index = free[0]  # a question listed twice takes one prediction per listing
        taken_by[index] = prediction.source
        texts[index] = prediction.text
    return Matched(texts, unknown)


def _ids(questions: list[Question], indices: list[int]) -> list[str]:
    out = []
    for i in indices[:ID_SAMPLE]:
        q = questions[i]
        out.append(q.question_id if not q.round_id else f"{q.question_id}#round{q.round_id}")
    return out


def score_result(benchmark: str, questions: list[Question], matched: Matched, n_predictions: int,
                 metrics: dict[str, float], headline: list[str], notes: list[str] | None = None,
                 extra_counts: dict[str, int] | None = None) -> ScoreResult:
    missing = matched.missing_indices
    notes = list(notes or [])
    if missing:
        notes.append(f"{len(missing)} of {len(questions)} questions have no prediction; counted as wrong")
    if matched.unknown:
        notes.append(f"{len(matched.unknown)} predictions name no question of the evaluation set; not scored")
    counts = {"questions": len(questions), "predictions": n_predictions, "missing": len(missing),
              "unknown": len(matched.unknown), **(extra_counts or {})}
    unknown_ids = [p.question_id if not p.round_id else f"{p.question_id}#round{p.round_id}"
                   for p in matched.unknown[:ID_SAMPLE]]
    return ScoreResult(benchmark, metrics, headline, counts, _ids(questions, missing), unknown_ids, notes)


def percent(value: float) -> float:
    """A fraction as a percentage rounded to 4 decimals."""
    return round(100.0 * value, 4)
