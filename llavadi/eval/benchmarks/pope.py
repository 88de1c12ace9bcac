"""POPE: object-hallucination yes/no questions, scored per split."""

from __future__ import annotations

import re
from pathlib import Path

from llavadi.eval import scorers
from llavadi.eval.benchmarks.base import Benchmark
from llavadi.eval.benchmarks.matching import match_predictions, percent, question_core, score_result
from llavadi.eval.benchmarks.readers import read_jsonl, require_field
from llavadi.eval.benchmarks.records import EvalDataError

_POPE_FILE = re.compile(r"^coco_pope_(\w+)\.json$")


class POPE(Benchmark):
    """POPE: accuracy, precision, recall, F1 and yes-ratio per split, LLaVA's answer parsing.

    Questions: ``llava_pope_test.jsonl`` (with ``category`` = split). Annotations: the folder of
    ``coco_pope_<split>.json`` label files (or one such file). A question is found by
    (split, image, question text) rather than by file order, which LLaVA relies on.
    A missing prediction counts as the wrong label.
    """

    name = "pope"
    questions_required = True

    def load_annotations(self, path):
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if _POPE_FILE.match(p.name))
            if not files:
                raise EvalDataError(f"{path}: no coco_pope_<split>.json files in this folder")
        else:
            files = [path]
        labels = {}
        for file in files:
            match = _POPE_FILE.match(file.name)
            for line_no, obj in read_jsonl(file):
                where = f"{file}:{line_no}"
                split = obj.get("category") or (match.group(1) if match else None)
                if split is None:
                    raise EvalDataError(f"{where}: no split: name the file coco_pope_<split>.json "
                                        f"or give each line a 'category'")
                label = require_field(obj, "label", where).strip().lower()
                if label not in ("yes", "no"):
                    raise EvalDataError(f"{where}: label must be yes or no, got {label!r}")
                key = (split, require_field(obj, "image", where), question_core(require_field(obj, "text", where)))
                if key in labels:
                    raise EvalDataError(f"{where}: the same question appears twice ({key})")
                labels[key] = label
        return labels

    def score(self, predictions, annotations, questions=None):
        questions = self._questions(annotations, questions)
        matched = match_predictions(questions, predictions)
        answers, gold, splits = [], [], []
        for question, text in zip(questions, matched.texts):
            split = question.meta.get("category")
            if not isinstance(split, str):
                raise EvalDataError(f"{question.meta.get('source', self.name)}: POPE question "
                                    f"{question.question_id!r} needs a 'category' (its split)")
            key = (split, question.image, question_core(question.text.split("\n")[0]))
            if key not in annotations:
                raise EvalDataError(f"{self.name}: no label for question {question.question_id!r} {key}")
            label = annotations[key]
            # A missing prediction is given the wrong answer so that it counts as an error.
            answers.append(text if text is not None else ("No" if label == "yes" else "Yes"))
            gold.append(label)
            splits.append(split)
        per_split = scorers.pope_metrics(answers, gold, splits)
        metrics: dict[str, float] = {}
        for split, values in per_split.items():
            for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
                metrics[f"{split}/{name}"] = percent(values[name])
        present = [s for s in per_split]
        for name in ("accuracy", "f1"):
            metrics[f"mean/{name}"] = percent(scorers.mean([per_split[s][name] for s in present]))
        headline = ["mean/f1"] + [f"{s}/f1" for s in present]
        return score_result(self.name, questions, matched, len(predictions), metrics, headline,
                            extra_counts={f"{s}/questions": per_split[s]["count"] for s in present})
