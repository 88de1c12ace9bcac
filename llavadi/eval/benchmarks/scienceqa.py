"""ScienceQA-IMG: multiple choice on the test problems that have an image."""

from __future__ import annotations

from pathlib import Path

from llavadi.eval import scorers
from llavadi.eval.benchmarks.base import Benchmark
from llavadi.eval.benchmarks.matching import match_predictions, percent, score_result
from llavadi.eval.benchmarks.readers import read_json, read_question_id, require_field, with_suffix
from llavadi.eval.benchmarks.records import OPTION_LETTER_SUFFIX, EvalDataError, Question


class ScienceQAImg(Benchmark):
    """ScienceQA-IMG: LLaVA's letter parsing, accuracy on the test problems that have an image.

    Questions: ``llava_test_CQM-A.json``. Annotations: ``problems.json`` with ``pid_splits.json``
    beside it (or their folder). A missing prediction counts as FAILED, as LLaVA does.
    """

    name = "scienceqa_img"
    prompt_suffix = OPTION_LETTER_SUFFIX
    split = "test"

    def load_questions(self, path):
        data = read_json(path)
        if not isinstance(data, list):
            raise EvalDataError(f"{path}: expected LLaVA's ScienceQA question list (llava_test_CQM-A.json)")
        out = []
        for i, obj in enumerate(data):
            where = f"{path}: item {i}"
            if not isinstance(obj, dict):
                raise EvalDataError(f"{where}: expected an object")
            if "image" not in obj:
                continue  # not in the IMG subset
            turns = require_field(obj, "conversations", where, list)
            if not turns or not isinstance(turns[0], dict) or not isinstance(turns[0].get("value"), str):
                raise EvalDataError(f"{where}: 'conversations' must start with a {{'value': str}} turn")
            body = turns[0]["value"].replace("<image>", "").strip()
            prompt = with_suffix(body, self.prompt_suffix)
            out.append(Question(read_question_id(obj, where, "id"), prompt, "<image>\n" + prompt,
                                require_field(obj, "image", where), meta={"source": where}))
        return out

    def load_annotations(self, path):
        path = Path(path)
        problems_path = path / "problems.json" if path.is_dir() else path
        splits_path = problems_path.parent / "pid_splits.json"
        problems = read_json(problems_path)
        splits = read_json(splits_path)
        if not isinstance(problems, dict):
            raise EvalDataError(f"{problems_path}: expected a dict of problems keyed by id")
        if not isinstance(splits, dict) or self.split not in splits:
            raise EvalDataError(f"{splits_path}: no {self.split!r} split")
        out, without_image = {}, 0
        for pid in splits[self.split]:
            pid = str(pid)
            problem = problems.get(pid)
            if not isinstance(problem, dict):
                raise EvalDataError(f"{problems_path}: problem {pid!r} of the {self.split} split is missing")
            where = f"{problems_path}: problem {pid!r}"
            if problem.get("image") is None:
                without_image += 1
                continue
            answer = require_field(problem, "answer", where, int)
            choices = require_field(problem, "choices", where, list)
            if not 0 <= answer < len(choices):
                raise EvalDataError(f"{where}: answer {answer} outside the {len(choices)} choices")
            out[pid] = {"answer": answer, "choices": choices, "subject": problem.get("subject", "")}
        return {"problems": out, "without_image": without_image}

    def questions_from_annotations(self, annotations):
        return [Question(pid, "", "") for pid in annotations["problems"]]

    def score(self, predictions, annotations, questions=None):
        questions = self._questions(annotations, questions)
        matched = match_predictions(questions, predictions)
        outcomes, failed = [], 0
        for question, text in zip(questions, matched.texts):
            problem = annotations["problems"].get(question.question_id)
            if problem is None:
                raise EvalDataError(f"{self.name}: question {question.question_id!r} is not an image problem "
                                    f"of the {self.split} split")
            index = -1 if text is None else scorers.scienceqa_choice_index(text, len(problem["choices"]))
            if text is not None and index == -1:
                failed += 1
            outcomes.append((problem["subject"], index == problem["answer"]))
        metrics = {"img_accuracy": percent(scorers.mean([1.0 if ok else 0.0 for _, ok in outcomes]))}
        for subject, value in scorers.grouped_accuracy(o for o in outcomes if o[0]).items():
            metrics[f"subject/{subject}"] = percent(value)
        notes = [f"{annotations['without_image']} {self.split} problems without an image are outside ScienceQA-IMG"]
        if failed:
            notes.append(f"{failed} answers had no parsable option letter (FAILED); counted as wrong")
        return score_result(self.name, questions, matched, len(predictions), metrics, ["img_accuracy"], notes,
                            extra_counts={"unparsed": failed})
