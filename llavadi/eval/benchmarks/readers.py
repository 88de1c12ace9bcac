"""Reading question, annotation and prediction files, with errors naming the file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from llavadi.eval.benchmarks.records import EvalDataError, Prediction, Question


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


def require_field(obj: dict, name: str, where: str, types: type | tuple[type, ...] = str) -> Any:
    """`obj[name]`, checked to be of `types` (never a bool); an error names `where` otherwise."""
    if name not in obj:
        raise EvalDataError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise EvalDataError(f"{where}: field {name!r} must be {expected}, got {value!r}")
    return value


def read_question_id(obj: dict, where: str, name: str = "question_id") -> str:
    """The question id under `name` (a string or an int), as a string."""
    return str(require_field(obj, name, where, (str, int)))


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
        predictions.append(Prediction(read_question_id(obj, where), require_field(obj, "text", where), round_id,
                                      prompt, where))
    return predictions


def predictions_from_records(records: list[dict], source: str = "<predictions>") -> list[Prediction]:
    """Predictions from in-memory answer records (as `prediction_record` makes them)."""
    out = []
    for i, obj in enumerate(records, start=1):
        where = f"{source}[{i}]"
        out.append(Prediction(read_question_id(obj, where), require_field(obj, "text", where),
                              obj.get("round_id", 0), obj.get("prompt"), where))
    return out


def read_llava_question_jsonl(path: str | os.PathLike, suffix: str | None) -> list[Question]:
    """Questions from LLaVA's question JSONL (question_id, text, optional image), prompts ending in `suffix`."""
    questions = []
    for line_no, obj in read_jsonl(path):
        where = f"{path}:{line_no}"
        text = require_field(obj, "text", where)
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            raise EvalDataError(f"{where}: field 'image' must be a string, got {image!r}")
        meta = {k: v for k, v in obj.items() if k not in ("question_id", "text", "image")}
        meta["source"] = where
        questions.append(Question(read_question_id(obj, where), with_suffix(text, suffix), text, image, meta=meta))
    return questions


def with_suffix(text: str, suffix: str | None) -> str:
    """`text` + newline + `suffix`, unless the text already ends with it (LLaVA files often do)."""
    if not suffix or text.rstrip().endswith(suffix):
        return text
    return f"{text}\n{suffix}"
