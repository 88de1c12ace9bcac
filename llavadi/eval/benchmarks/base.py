"""The benchmark base class: question loading with its prompt suffix, annotations, scoring."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

from llavadi.eval.benchmarks.readers import read_llava_question_jsonl, read_predictions
from llavadi.eval.benchmarks.records import SHORT_ANSWER_SUFFIX, EvalDataError, Prediction, Question, ScoreResult


class Benchmark(ABC):
    """A benchmark: question loading with its prompt suffix, annotation loading, scoring."""

    name = ""
    prompt_suffix: str | None = SHORT_ANSWER_SUFFIX
    # Whether scoring needs the question file (it maps question ids to the annotations).
    questions_required = False
    # Whether the question file also holds the ground truth (usable as --annotations).
    questions_are_annotations = False

    def load_questions(self, path: str | os.PathLike) -> list[Question]:
        """The evaluation questions with prompts, in the form LLaVA's evaluation uses."""
        return read_llava_question_jsonl(path, self.prompt_suffix)

    @abstractmethod
    def load_annotations(self, path: str | os.PathLike) -> Any:
        """The ground truth, in the benchmark's own file form."""

    def questions_from_annotations(self, annotations: Any) -> list[Question]:
        """The evaluation set when no question file is given."""
        raise EvalDataError(f"{self.name}: the annotations do not define the questions; pass the question file")

    @abstractmethod
    def score(self, predictions: list[Prediction], annotations: Any,
              questions: list[Question] | None = None) -> ScoreResult:
        """Score predictions against loaded annotations (questions: the evaluation set)."""

    def score_files(self, predictions_path: str | os.PathLike, annotations_path: str | os.PathLike,
                    questions_path: str | os.PathLike | None = None) -> ScoreResult:
        """Score an answer file against annotation (and optionally question) files."""
        if questions_path is None and self.questions_required:
            raise EvalDataError(f"{self.name}: scoring needs the question file (--questions): "
                                f"it links question ids to the annotations")
        annotations = self.load_annotations(annotations_path)
        questions = self.load_questions(questions_path) if questions_path is not None else None
        return self.score(read_predictions(predictions_path), annotations, questions)

    def _questions(self, annotations: Any, questions: list[Question] | None) -> list[Question]:
        if questions is not None:
            return questions
        if self.questions_required:
            raise EvalDataError(f"{self.name}: scoring needs the questions (they link ids to annotations)")
        return self.questions_from_annotations(annotations)
