"""The short-answer VQA benchmarks: VQAv2, TextVQA and GQA."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from llavadi.eval import scorers
from llavadi.eval.benchmarks.base import Benchmark
from llavadi.eval.benchmarks.matching import match_predictions, percent, score_result
from llavadi.eval.benchmarks.readers import read_json, read_question_id, require_field, with_suffix
from llavadi.eval.benchmarks.records import EvalDataError, Question


class VQAv2(Benchmark):
    """VQAv2: soft accuracy after the official normalisation, per answer type.

    Prediction and human answers are always normalised (as m4c does); the VQA server skips
    this when all ten humans agree, which changes nothing for LLaVA, whose answers are
    normalised before submission, against the already normalised VQA annotations.

    Annotations: the official ``v2_mscoco_*_annotations.json``. Questions: LLaVA's JSONL or the
    official ``v2_OpenEnded_mscoco_*_questions.json``. (test-dev answers are not public: score val.)
    """

    name = "vqav2"

    def load_questions(self, path):
        if str(path).endswith(".json"):
            data = read_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
                raise EvalDataError(f"{path}: expected the official VQA questions JSON with a 'questions' list")
            subtype = data.get("data_subtype", "val2014")
            out = []
            for i, obj in enumerate(data["questions"]):
                where = f"{path}: questions[{i}]"
                image_id = require_field(obj, "image_id", where, int)
                text = require_field(obj, "question", where)
                out.append(Question(read_question_id(obj, where), with_suffix(text, self.prompt_suffix), text,
                                    f"COCO_{subtype}_{image_id:012d}.jpg"))
            return out
        return super().load_questions(path)

    def load_annotations(self, path):
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise EvalDataError(f"{path}: expected the official VQA annotations JSON with an 'annotations' list")
        out = {}
        for i, obj in enumerate(data["annotations"]):
            where = f"{path}: annotations[{i}]"
            answers = require_field(obj, "answers", where, list)
            texts = [a.get("answer") if isinstance(a, dict) else None for a in answers]
            if not all(isinstance(t, str) for t in texts):
                raise EvalDataError(f"{where}: 'answers' must be a list of {{'answer': str}} objects")
            if not texts:
                raise EvalDataError(f"{where}: no human answers")
            out[read_question_id(obj, where)] = {"answers": texts, "answer_type": obj.get("answer_type", "all")}
        return out

    def questions_from_annotations(self, annotations):
        return [Question(qid, "", "") for qid in annotations]

    def score(self, predictions, annotations, questions=None):
        questions = self._questions(annotations, questions)
        matched = match_predictions(questions, predictions)
        scores, types = [], []
        for question, text in zip(questions, matched.texts):
            ann = annotations.get(question.question_id)
            if ann is None:
                raise EvalDataError(f"{self.name}: no annotation for question {question.question_id!r} "
                                    f"(test-dev answers are not public: score val questions with val annotations)")
            scores.append(0.0 if text is None else scorers.vqa_soft_accuracy(text, ann["answers"]))
            types.append(ann["answer_type"])
        metrics = {"accuracy": percent(scorers.mean(scores))}
        per_type: dict[str, list[float]] = defaultdict(list)
        for t, s in zip(types, scores):
            per_type[t].append(s)
        for t, values in sorted(per_type.items()):
            metrics[f"answer_type/{t}"] = percent(scorers.mean(values))
        return score_result(self.name, questions, matched, len(predictions), metrics, ["accuracy"])


class TextVQA(Benchmark):
    """TextVQA: soft accuracy (m4c evaluator) after the official normalisation.

    Annotations: ``TextVQA_0.5.1_val.json``. LLaVA's question file may reuse one id for several
    questions of an image; a question is found by (image id, question text) as LLaVA does.
    """

    name = "textvqa"

    def load_annotations(self, path):
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise EvalDataError(f"{path}: expected the TextVQA JSON with a 'data' list")
        by_qid, by_image_question = {}, {}
        for i, obj in enumerate(data["data"]):
            where = f"{path}: data[{i}]"
            answers = require_field(obj, "answers", where, list)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise EvalDataError(f"{where}: 'answers' must be a non-empty list of strings")
            entry = {"answers": answers, "question": require_field(obj, "question", where)}
            by_qid[read_question_id(obj, where)] = entry
            image_id = str(require_field(obj, "image_id", where, (str, int)))
            by_image_question[(image_id, entry["question"].lower())] = entry
        return {"by_qid": by_qid, "by_image_question": by_image_question}

    def questions_from_annotations(self, annotations):
        return [Question(qid, "", entry["question"]) for qid, entry in annotations["by_qid"].items()]

    def _annotation(self, question: Question, annotations) -> dict:
        asked = question.text.split("\n")[0].lower()  # LLaVA's text: question, OCR tokens, suffix
        keys = []
        if question.image:
            keys.append((Path(question.image).stem, asked))
        keys.append((question.question_id, asked))
        for key in keys:
            if key in annotations["by_image_question"]:
                return annotations["by_image_question"][key]
        entry = annotations["by_qid"].get(question.question_id)
        if entry is None:
            raise EvalDataError(f"{self.name}: no annotation for question {question.question_id!r} ({asked!r})")
        return entry

    def score(self, predictions, annotations, questions=None):
        questions = self._questions(annotations, questions)
        matched = match_predictions(questions, predictions)
        scores = []
        for question, text in zip(questions, matched.texts):
            ann = self._annotation(question, annotations)
            scores.append(0.0 if text is None else scorers.vqa_soft_accuracy(text, ann["answers"]))
        return score_result(self.name, questions, matched, len(predictions),
                            {"accuracy": percent(scorers.mean(scores))}, ["accuracy"])


class GQA(Benchmark):
    """GQA: exact match on the balanced test-dev questions.

    ``accuracy`` (the headline, and ``binary``, ``open``, ``structural/*``) is the official rule as
    LLaVA applies it: the prediction converted by rstrip('.') and lower(), then compared with the raw
    gold answer by the official GQA script's exact match. ``accuracy_vqa_normalised`` is a secondary
    figure comparing after the VQA normalisation of both sides (articles, number words, punctuation),
    which counts "a dog" for "dog" and "two" for "2". Annotations: ``testdev_balanced_questions.json``.
    """

    name = "gqa"

    def load_annotations(self, path):
        data = read_json(path)
        if not isinstance(data, dict):
            raise EvalDataError(f"{path}: expected the GQA questions JSON (a dict keyed by question id)")
        out = {}
        for qid, obj in data.items():
            where = f"{path}: question {qid!r}"
            if not isinstance(obj, dict):
                raise EvalDataError(f"{where}: expected an object")
            types = obj.get("types") or {}
            out[str(qid)] = {"answer": require_field(obj, "answer", where), "question": obj.get("question", ""),
                             "structural": types.get("structural")}
        return out

    def questions_from_annotations(self, annotations):
        return [Question(qid, "", entry["question"]) for qid, entry in annotations.items()]

    def score(self, predictions, annotations, questions=None):
        questions = self._questions(annotations, questions)
        matched = match_predictions(questions, predictions)
        official, normalised, structural = [], [], []
        for question, text in zip(questions, matched.texts):
            ann = annotations.get(question.question_id)
            if ann is None:
                raise EvalDataError(f"{self.name}: no annotation for question {question.question_id!r}")
            official.append(text is not None and scorers.llava_gqa_answer(text) == ann["answer"])
            normalised.append(text is not None and scorers.exact_match(text, ann["answer"]))
            structural.append(ann["structural"])
        metrics = {"accuracy": percent(scorers.mean([float(x) for x in official])),
                   "accuracy_vqa_normalised": percent(scorers.mean([float(x) for x in normalised]))}
        if any(s is not None for s in structural):
            by_kind = scorers.grouped_accuracy(
                ("open" if s == "query" else "binary", ok) for s, ok in zip(structural, official) if s)
            by_struct = scorers.grouped_accuracy((s, ok) for s, ok in zip(structural, official) if s)
            metrics.update({f"{k}": percent(v) for k, v in by_kind.items()})
            metrics.update({f"structural/{k}": percent(v) for k, v in by_struct.items()})
        return score_result(self.name, questions, matched, len(predictions), metrics, ["accuracy"])
