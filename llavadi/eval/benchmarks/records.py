"""The records benchmarks pass around: questions, predictions, score results, the data error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."

# How many ids of missing / unknown predictions a result lists.
ID_SAMPLE = 20


class EvalDataError(ValueError):
    """A question, annotation or prediction file that cannot be used as it is."""


@dataclass(frozen=True)
class Question:
    """One question as the model sees it.

    `prompt` is the text that follows the image token (with the benchmark's suffix);
    `text` is the question file's own text, which LLaVA echoes as an answer's "prompt".
    """

    question_id: str
    prompt: str
    text: str
    image: str | None = None
    image_base64: str | None = None
    round_id: int = 0
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, int]:
        """The (question_id, round_id) a prediction names."""
        return (self.question_id, self.round_id)


@dataclass(frozen=True)
class Prediction:
    """One line of an answer file."""

    question_id: str
    text: str
    round_id: int = 0
    prompt: str | None = None
    source: str = ""  # "file:line", for messages

    @property
    def key(self) -> tuple[str, int]:
        """The (question_id, round_id) of the question answered."""
        return (self.question_id, self.round_id)


def prediction_record(question: Question, text: str) -> dict:
    """The answer-file line for `question` answered with `text` (LLaVA's answer JSONL form)."""
    record: dict[str, Any] = {"question_id": question.question_id, "prompt": question.text, "text": text}
    if question.round_id:
        record["round_id"] = question.round_id
    return record


@dataclass
class ScoreResult:
    """Metrics of one benchmark run plus what was missing or unexpected."""

    benchmark: str
    metrics: dict[str, float]
    headline: list[str]
    counts: dict[str, int]
    missing_ids: list[str] = field(default_factory=list)
    unknown_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready dict (the metrics JSON file)."""
        return {"run": self.run, "benchmark": self.benchmark, "unit": "percent (MME scores: points)",
                "headline": self.headline, "metrics": self.metrics, "counts": self.counts,
                "missing_ids": self.missing_ids, "unknown_ids": self.unknown_ids, "notes": self.notes}
