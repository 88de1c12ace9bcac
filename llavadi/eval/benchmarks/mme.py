"""MME: yes/no questions per subtask, perception and cognition totals."""

from __future__ import annotations

from pathlib import Path

from llavadi.eval import scorers
from llavadi.eval.benchmarks.base import Benchmark
from llavadi.eval.benchmarks.matching import match_predictions, percent, question_core, score_result
from llavadi.eval.benchmarks.readers import with_suffix
from llavadi.eval.benchmarks.records import EvalDataError, Question


class MME(Benchmark):
    """MME: per-subtask acc and acc+, score = 100 (acc + acc+), perception / cognition totals.

    Questions: ``llava_mme.jsonl`` (id ``subtask/image``, two questions per image share it).
    Annotations: ``MME_Benchmark_release_version``: one folder per subtask holding
    ``<image>.txt`` files (or a ``questions_answers_YN`` folder of them) with
    ``question<TAB>answer`` lines. A missing prediction counts as an "other" answer.
    """

    name = "mme"

    def load_annotations(self, path):
        root = Path(path)
        if not root.is_dir():
            raise EvalDataError(f"{root}: expected the MME_Benchmark_release_version folder")
        gold = {}
        for subtask_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            qa_dir = subtask_dir / "questions_answers_YN"
            image_dir = subtask_dir / "images"
            if not qa_dir.is_dir():
                qa_dir, image_dir = subtask_dir, subtask_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                image = _find_image(image_dir, txt.stem)
                with open(txt, encoding="utf-8") as handle:
                    for line_no, line in enumerate(handle, start=1):
                        if not line.strip():
                            continue
                        parts = line.rstrip("\n").split("\t")
                        if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                            raise EvalDataError(f"{txt}:{line_no}: expected 'question<TAB>Yes|No'")
                        key = (subtask_dir.name, txt.stem, question_core(parts[0]))
                        if key in gold:
                            raise EvalDataError(f"{txt}:{line_no}: the same question appears twice")
                        gold[key] = (parts[1].strip().lower(), parts[0], image)
        if not gold:
            raise EvalDataError(f"{root}: no MME question files found (subtask folders with .txt files)")
        return gold

    def questions_from_annotations(self, annotations):
        out = []
        for (subtask, _stem, _core), (_answer, question, image) in annotations.items():
            text = question.replace("Please answer yes or no.", "").strip()
            out.append(Question(f"{subtask}/{image}", with_suffix(text, self.prompt_suffix),
                                with_suffix(text, self.prompt_suffix), f"{subtask}/{image}"))
        return out

    def score(self, predictions, annotations, questions=None):
        questions = self._questions(annotations, questions)
        matched = match_predictions(questions, predictions)
        items = []
        for question, text in zip(questions, matched.texts):
            subtask = question.meta.get("category") or question.question_id.split("/")[0]
            stem = Path(question.question_id.split("/")[-1]).stem
            key = (subtask, stem, question_core(question.text))
            if key not in annotations:
                raise EvalDataError(f"{self.name}: no annotation for question {question.question_id!r} "
                                    f"({question.text.splitlines()[0]!r})")
            items.append((subtask, stem, text if text is not None else "", annotations[key][0]))
        result = scorers.mme_scores(items)
        metrics = {"perception": round(result["totals"]["perception"], 4),
                   "cognition": round(result["totals"]["cognition"], 4)}
        for subtask, values in result["subtasks"].items():
            metrics[f"{subtask}/score"] = round(values["score"], 4)
            metrics[f"{subtask}/acc"] = percent(values["acc"])
            metrics[f"{subtask}/acc_plus"] = percent(values["acc_plus"])
        notes = []
        for family in ("perception", "cognition"):
            if result["totals"][f"{family}_missing"]:
                notes.append(f"{family} total leaves out absent subtasks: {result['totals'][f'{family}_missing']}")
        if result["unknown_subtasks"]:
            notes.append(f"subtasks outside the official lists (in no total): {result['unknown_subtasks']}")
        return score_result(self.name, questions, matched, len(predictions), metrics, ["perception", "cognition"],
                            notes)


def _find_image(folder: Path, stem: str) -> str:
    for candidate in sorted(folder.glob(stem + ".*")):
        if candidate.suffix.lower() != ".txt":
            return candidate.name
    return stem + ".jpg"  # image absent (scoring does not need it); MME ships .jpg / .png
