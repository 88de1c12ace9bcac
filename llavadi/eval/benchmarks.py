"""Benchmark adapters: question files, prompts, annotations and scoring, by exact name.

Each benchmark reads the files in the form LLaVA-1.5's evaluation uses:

- question JSONL (``question_id``, ``image``, ``text``) for vqav2, gqa, textvqa, pope, mme;
- MMBench's TSV (questions, options, answers and base64 images in one file);
- ScienceQA's ``llava_test_CQM-A.json`` questions with ``problems.json`` + ``pid_splits.json``;
- the synthetic set's JSONL, which is its own annotation file.

Generation asks a benchmark for its questions (``load_questions``), feeds ``question.prompt``
after the image token, and hands predictions back with ``prediction_record``; scoring reads
predictions in LLaVA's answer JSONL form (one ``{"question_id", "text"}`` object per line,
optionally ``round_id`` and ``prompt``). Missing predictions count as wrong and are reported;
predictions for unknown questions are reported too; a malformed line is an error naming it.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import defaultdict
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llavadi.eval import scorers

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."

# How many ids of missing / unknown predictions a result lists.
ID_SAMPLE = 20


class EvalDataError(ValueError):
    """A question, annotation or prediction file that cannot be used as it is."""


# --------------------------------------------------------------------------- records


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


# --------------------------------------------------------------------------- file reading


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a malformed line raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}:{line_no}: malformed JSON line ({err.msg})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON file; a malformed file raises naming its line."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def _field(obj: dict, name: str, where: str, types: type | tuple[type, ...] = str) -> Any:
    if name not in obj:
        raise EvalDataError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise EvalDataError(f"{where}: field {name!r} must be {expected}, got {value!r}")
    return value


def _question_id(obj: dict, where: str, name: str = "question_id") -> str:
    return str(_field(obj, name, where, (str, int)))


def read_predictions(path: str | os.PathLike) -> list[Prediction]:
    """Predictions from an answer JSONL file (question_id, text; optional round_id, prompt)."""
    predictions = []
    for line_no, obj in read_jsonl(path):
        where = f"{path}:{line_no}"
        round_id = obj.get("round_id", 0)
        if not isinstance(round_id, int) or isinstance(round_id, bool):
            raise EvalDataError(f"{where}: field 'round_id' must be an int, got {round_id!r}")
        prompt = obj.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise EvalDataError(f"{where}: field 'prompt' must be a string, got {prompt!r}")
        predictions.append(Prediction(_question_id(obj, where), _field(obj, "text", where), round_id,
                                      prompt, where))
    return predictions


def predictions_from_records(records: list[dict], source: str = "<predictions>") -> list[Prediction]:
    """Predictions from in-memory answer records (as `prediction_record` makes them)."""
    out = []
    for i, obj in enumerate(records, start=1):
        where = f"{source}[{i}]"
        out.append(Prediction(_question_id(obj, where), _field(obj, "text", where),
                              obj.get("round_id", 0), obj.get("prompt"), where))
    return out


def _read_llava_question_jsonl(path: str | os.PathLike, suffix: str | None) -> list[Question]:
    questions = []
    for line_no, obj in read_jsonl(path):
        where = f"{path}:{line_no}"
        text = _field(obj, "text", where)
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            raise EvalDataError(f"{where}: field 'image' must be a string, got {image!r}")
        meta = {k: v for k, v in obj.items() if k not in ("question_id", "text", "image")}
        meta["source"] = where
        questions.append(Question(_question_id(obj, where), with_suffix(text, suffix), text, image, meta=meta))
    return questions


def with_suffix(text: str, suffix: str | None) -> str:
    """`text` + newline + `suffix`, unless the text already ends with it (LLaVA files often do)."""
    if not suffix or text.rstrip().endswith(suffix):
        return text
    return f"{text}\n{suffix}"


_KNOWN_SUFFIXES = (SHORT_ANSWER_SUFFIX, OPTION_LETTER_SUFFIX, "Please answer yes or no.")


def question_core(text: str) -> str:
    """A question's text without image token, known suffixes and extra spaces, lower-cased."""
    text = text.replace("<image>", " ")
    for suffix in _KNOWN_SUFFIXES:
        text = text.replace(suffix, " ")
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------- matching


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


def _result(benchmark: str, questions: list[Question], matched: Matched, n_predictions: int,
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


def _pct(value: float) -> float:
    return round(100.0 * value, 4)


# --------------------------------------------------------------------------- base class


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
        return _read_llava_question_jsonl(path, self.prompt_suffix)

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


# --------------------------------------------------------------------------- VQAv2


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
                image_id = _field(obj, "image_id", where, int)
                text = _field(obj, "question", where)
                out.append(Question(_question_id(obj, where), with_suffix(text, self.prompt_suffix), text,
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
            answers = _field(obj, "answers", where, list)
            texts = [a.get("answer") if isinstance(a, dict) else None for a in answers]
            if not all(isinstance(t, str) for t in texts):
                raise EvalDataError(f"{where}: 'answers' must be a list of {{'answer': str}} objects")
            if not texts:
                raise EvalDataError(f"{where}: no human answers")
            out[_question_id(obj, where)] = {"answers": texts, "answer_type": obj.get("answer_type", "all")}
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
        metrics = {"accuracy": _pct(scorers.mean(scores))}
        per_type: dict[str, list[float]] = defaultdict(list)
        for t, s in zip(types, scores):
            per_type[t].append(s)
        for t, values in sorted(per_type.items()):
            metrics[f"answer_type/{t}"] = _pct(scorers.mean(values))
        return _result(self.name, questions, matched, len(predictions), metrics, ["accuracy"])


# --------------------------------------------------------------------------- TextVQA


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
            answers = _field(obj, "answers", where, list)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise EvalDataError(f"{where}: 'answers' must be a non-empty list of strings")
            entry = {"answers": answers, "question": _field(obj, "question", where)}
            by_qid[_question_id(obj, where)] = entry
            by_image_question[(str(_field(obj, "image_id", where, (str, int))), entry["question"].lower())] = entry
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
        return _result(self.name, questions, matched, len(predictions),
                       {"accuracy": _pct(scorers.mean(scores))}, ["accuracy"])


# --------------------------------------------------------------------------- GQA


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
            out[str(qid)] = {"answer": _field(obj, "answer", where), "question": obj.get("question", ""),
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
        metrics = {"accuracy": _pct(scorers.mean([float(x) for x in official])),
                   "accuracy_vqa_normalised": _pct(scorers.mean([float(x) for x in normalised]))}
        if any(s is not None for s in structural):
            by_kind = scorers.grouped_accuracy(
                ("open" if s == "query" else "binary", ok) for s, ok in zip(structural, official) if s)
            by_struct = scorers.grouped_accuracy((s, ok) for s, ok in zip(structural, official) if s)
            metrics.update({f"{k}": _pct(v) for k, v in by_kind.items()})
            metrics.update({f"structural/{k}": _pct(v) for k, v in by_struct.items()})
        return _result(self.name, questions, matched, len(predictions), metrics, ["accuracy"])


# --------------------------------------------------------------------------- POPE

POPE_SPLITS = ("adversarial", "popular", "random")
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
                label = _field(obj, "label", where).strip().lower()
                if label not in ("yes", "no"):
                    raise EvalDataError(f"{where}: label must be yes or no, got {label!r}")
                key = (split, _field(obj, "image", where), question_core(_field(obj, "text", where)))
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
                metrics[f"{split}/{name}"] = _pct(values[name])
        present = [s for s in per_split]
        for name in ("accuracy", "f1"):
            metrics[f"mean/{name}"] = _pct(scorers.mean([per_split[s][name] for s in present]))
        headline = ["mean/f1"] + [f"{s}/f1" for s in present]
        return _result(self.name, questions, matched, len(predictions), metrics, headline,
                       extra_counts={f"{s}/questions": per_split[s]["count"] for s in present})


# --------------------------------------------------------------------------- MME


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
            metrics[f"{subtask}/acc"] = _pct(values["acc"])
            metrics[f"{subtask}/acc_plus"] = _pct(values["acc_plus"])
        notes = []
        for family in ("perception", "cognition"):
            if result["totals"][f"{family}_missing"]:
                notes.append(f"{family} total leaves out absent subtasks: {result['totals'][f'{family}_missing']}")
        if result["unknown_subtasks"]:
            notes.append(f"subtasks outside the official lists (in no total): {result['unknown_subtasks']}")
        return _result(self.name, questions, matched, len(predictions), metrics, ["perception", "cognition"],
                       notes)


def _find_image(folder: Path, stem: str) -> str:
    for candidate in sorted(folder.glob(stem + ".*")):
        if candidate.suffix.lower() != ".txt":
            return candidate.name
    return stem + ".jpg"  # image absent (scoring does not need it); MME ships .jpg / .png


# --------------------------------------------------------------------------- MMBench

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
        metrics = {"circular_accuracy": _pct(circular["accuracy"]), "vanilla_accuracy": _pct(scorers.mean(vanilla))}
        for category, value in circular["per_category"].items():
            metrics[f"category/{category}"] = _pct(value)
        if unparsed:
            notes.append(f"{unparsed} answers had no option letter LLaVA's parser finds; counted as wrong")
        return _result(self.name, questions, matched, len(predictions), metrics, ["circular_accuracy"], notes,
                       extra_counts={"circular_groups": circular["groups"], "unparsed": unparsed})


# --------------------------------------------------------------------------- ScienceQA-IMG


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
            turns = _field(obj, "conversations", where, list)
            if not turns or not isinstance(turns[0], dict) or not isinstance(turns[0].get("value"), str):
                raise EvalDataError(f"{where}: 'conversations' must start with a {{'value': str}} turn")
            body = turns[0]["value"].replace("<image>", "").strip()
            prompt = with_suffix(body, self.prompt_suffix)
            out.append(Question(_question_id(obj, where, "id"), prompt, "<image>\n" + prompt,
                                _field(obj, "image", where), meta={"source": where}))
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
            answer = _field(problem, "answer", where, int)
            choices = _field(problem, "choices", where, list)
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
        metrics = {"img_accuracy": _pct(scorers.mean([1.0 if ok else 0.0 for _, ok in outcomes]))}
        for subject, value in scorers.grouped_accuracy(o for o in outcomes if o[0]).items():
            metrics[f"subject/{subject}"] = _pct(value)
        notes = [f"{annotations['without_image']} {self.split} problems without an image are outside ScienceQA-IMG"]
        if failed:
            notes.append(f"{failed} answers had no parsable option letter (FAILED); counted as wrong")
        return _result(self.name, questions, matched, len(predictions), metrics, ["img_accuracy"], notes,
                       extra_counts={"unparsed": failed})


# --------------------------------------------------------------------------- synthetic


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
            _field(question.meta, "answer", where)
            _field(question.meta, "category", where)
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
        metrics = {"accuracy": _pct(scored["accuracy"])}
        for category, value in scored["per_category"].items():
            metrics[f"category/{category}"] = _pct(value)
        return _result(self.name, questions, matched, len(predictions), metrics, ["accuracy"])


# --------------------------------------------------------------------------- registry

BENCHMARKS: dict[str, type[Benchmark]] = {
    cls.name: cls for cls in (VQAv2, GQA, TextVQA, POPE, MME, MMBench, ScienceQAImg, Synthetic)
}


def get_benchmark(name: str, **options) -> Benchmark:
    """The benchmark registered under exactly `name`."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](**options)
