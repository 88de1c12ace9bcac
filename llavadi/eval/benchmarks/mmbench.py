"""MMBench: multiple choice from one TSV, scored with CircularEval."""

from __future__ import annotations

import csv
from pathlib import Path

from llavadi.eval import scorers
from llavadi.eval.benchmarks.base import Benchmark
from llavadi.eval.benchmarks.matching import match_predictions, percent, score_result
from llavadi.eval.benchmarks.readers import with_suffix
from llavadi.eval.benchmarks.records import OPTION_LETTER_SUFFIX, EvalDataError, Question

_CIRCULAR_STRIDE = 1_000_000  # the MMBench TSV stores rotated copies at index + k * 1e6


def _is_none(value: str | None) -> bool:
    """LLaVA's is_none for a TSV cell: empty, NaN, 'nan' or 'none'."""
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


class MMBench(Benchmark):
    """MMBench (dev TSV): LLaVA's option-letter parsing and CircularEval, per category.

    A question counts only if the model is right on every rotation of its options: the rows of
    a circular group (index mod 1e6 in the official TSV) and, with ``all_rounds``, every
    rotation LLaVA's ``--all-rounds`` asks (round_id k = options shifted left by k).
    Answers LLaVA would hand to ChatGPT (no letter found) count as wrong.
    """

    name = "mmbench"
    prompt_suffix = OPTION_LETTER_SUFFIX

    def __init__(self, all_rounds: bool = False):
        self.all_rounds = all_rounds

    def _rows(self, path) -> list[dict]:
        path = Path(path)
        if not path.is_file():
            raise EvalDataError(f"{path}: file not found")
        csv.field_size_limit(2**31 - 1)  # base64 images are long cells
        rows = []
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            for col in ("index", "question", "A", "B"):
                if reader.fieldnames is None or col not in reader.fieldnames:
                    raise EvalDataError(f"{path}: MMBench TSV needs a {col!r} column")
            for row_no, row in enumerate(reader, start=2):
                where = f"{path}:{row_no}"
                if None in row or any(v is None for v in row.values()):
                    raise EvalDataError(f"{where}: wrong number of tab-separated cells")
                try:
                    int(float(row["index"]))
                except ValueError:
                    raise EvalDataError(f"{where}: index {row['index']!r} is not a number") from None
                options = []
                for letter in scorers.OPTION_LETTERS:
                    if _is_none(row.get(letter)):
                        break
                    options.append(row[letter])
                if len(options) < 2:
                    raise EvalDataError(f"{where}: fewer than two options")
                row["_options"], row["_where"] = options, where
                rows.append(row)
        return rows

    def _questions_from_rows(self, rows: list[dict], all_rounds: bool) -> list[Question]:
        out = []
        for row in rows:
            question = row["question"]
            if not _is_none(row.get("hint")):
                question = row["hint"] + "\n" + question
            rounds = len(row["_options"]) if all_rounds else 1
            for round_id in range(rounds):
                shown, original = scorers.rotate_options(row["_options"], round_id)
                text = question + "".join(f"\n{letter}. {option}"
                                          for letter, option in zip(scorers.OPTION_LETTERS, shown))
                image = row.get("image")
                out.append(Question(str(int(float(row["index"]))), with_suffix(text, self.prompt_suffix), text,
                                    image_base64=None if _is_none(image) else image, round_id=round_id,
                                    meta={"options": shown, "original_letters": original,
                                          "answer": row.get("answer"), "category": row.get("category") or "",
                                          "l2_category": row.get("l2-category") or "", "source": row["_where"]}))
        return out

    def load_questions(self, path):
        return self._questions_from_rows(self._rows(path), self.all_rounds)

    def load_annotations(self, path):
        rows = self._rows(path)
        for row in rows:
            if _is_none(row.get("answer")):
                raise EvalDataError(f"{row['_where']}: no 'answer' (MMBench test answers are not public; "
                                    f"score the dev split)")
        return rows

    def questions_from_annotations(self, annotations):
        return self._questions_from_rows(annotations, self.all_rounds)

    def score(self, predictions, annotations, questions=None):
        notes = []
        if questions is None:
            all_rounds = self.all_rounds or any(p.round_id > 0 for p in predictions)
            if all_rounds and not self.all_rounds:
                notes.append("predictions carry round_id > 0: every rotation of every question is expected")
            questions = self._questions_from_rows(annotations, all_rounds)
        answers = {str(int(float(row["index"]))): row["answer"].strip() for row in annotations}
        matched = match_predictions(questions, predictions)
        outcomes, vanilla, unparsed = [], [], 0
        for question, text in zip(questions, matched.texts):
            gold = answers.get(question.question_id)
            if gold is None:
                raise EvalDataError(f"{self.name}: no annotation row for index {question.question_id!r}")
            letter = None if text is None else scorers.parse_mmbench_answer(text, question.meta["options"])
            if text is not None and letter is None:
                unparsed += 1
            original = None
            if letter is not None:
                original = question.meta["original_letters"][scorers.OPTION_LETTERS.index(letter)]
            correct = original == gold
            vanilla.append(1.0 if correct else 0.0)
            group = str(int(question.question_id) % _CIRCULAR_STRIDE)
            outcomes.append((group, question.meta["category"], correct))
        circular = scorers.circular_accuracy(outcomes)
        metrics = {"circular_accuracy": percent(circular["accuracy"]),
                   "vanilla_accuracy": percent(scorers.mean(vanilla))}
        for category, value in circular["per_category"].items():
            metrics[f"category/{category}"] = percent(value)
        if unparsed:
            notes.append(f"{unparsed} answers had no option letter LLaVA's parser finds; counted as wrong")
        return score_result(self.name, questions, matched, len(predictions), metrics, ["circular_accuracy"], notes,
                            extra_counts={"circular_groups": circular["groups"], "unparsed": unparsed})
