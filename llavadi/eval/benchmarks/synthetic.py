"""The synthetic shapes set, whose question file is its own annotation file."""

from __future__ import annotations

from llavadi.eval import scorers
from llavadi.eval.benchmarks.base import Benchmark
from llavadi.eval.benchmarks.matching import match_predictions, percent, score_result
from llavadi.eval.benchmarks.readers import require_field
from llavadi.eval.benchmarks.records import EvalDataError


class Synthetic(Benchmark):
    """The synthetic shapes set: exact match after the simple normaliser, overall and per category.

    Its JSONL question file (question_id, image, text, answer, category) is its own annotation
    file. The prompt is the question as is: the synthetic training data has no suffix.
    """

    name = "synthetic"
    prompt_suffix = None
    questions_are_annotations = True

    def load_questions(self, path):
        questions = super().load_questions(path)
        for question in questions:
            where = question.meta["source"]
            require_field(question.meta, "answer", where)
            require_field(question.meta, "category", where)
        return questions

    def load_annotations(self, path):
        return {q.question_id: q for q in self.load_questions(path)}

    def questions_from_annotations(self, annotations):
        return list(annotations.values())

    def score(self, predictions, annotations, questions=None):
        questions = self._questions(annotations, questions)
        matched = match_predictions(questions, predictions)
        items = []
        for question, text in zip(questions, matched.texts):
            ann = annotations.get(question.question_id)
            if ann is None:
                raise EvalDataError(f"{self.name}: no annotation for question {question.question_id!r}")
            items.append((text, ann.meta["answer"], ann.meta["category"]))
        scored = scorers.synthetic_accuracy(items)
        metrics = {"accuracy": percent(scored["accuracy"])}
        for category, value in scored["per_category"].items():
            metrics[f"category/{category}"] = percent(value)
        return score_result(self.name, questions, matched, len(predictions), metrics, ["accuracy"])
