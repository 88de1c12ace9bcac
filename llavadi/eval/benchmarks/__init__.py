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

from llavadi.eval.benchmarks.base import Benchmark
from llavadi.eval.benchmarks.matching import Matched, match_predictions, question_core
from llavadi.eval.benchmarks.mmbench import MMBench
from llavadi.eval.benchmarks.mme import MME
from llavadi.eval.benchmarks.pope import POPE
from llavadi.eval.benchmarks.readers import (
    predictions_from_records,
    read_json,
    read_jsonl,
    read_predictions,
    with_suffix,
)
from llavadi.eval.benchmarks.records import (
    ID_SAMPLE,
    OPTION_LETTER_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    EvalDataError,
    Prediction,
    Question,
    ScoreResult,
    prediction_record,
)
from llavadi.eval.benchmarks.scienceqa import ScienceQAImg
from llavadi.eval.benchmarks.synthetic import Synthetic
from llavadi.eval.benchmarks.vqa import GQA, TextVQA, VQAv2

__all__ = [
    "BENCHMARKS", "GQA", "ID_SAMPLE", "MME", "MMBench", "OPTION_LETTER_SUFFIX", "POPE", "SHORT_ANSWER_SUFFIX",
    "Benchmark", "EvalDataError", "Matched", "Prediction", "Question", "ScienceQAImg", "ScoreResult", "Synthetic",
    "TextVQA", "VQAv2", "get_benchmark", "match_predictions", "prediction_record", "predictions_from_records",
    "question_core", "read_json", "read_jsonl", "read_predictions", "with_suffix",
]

BENCHMARKS: dict[str, type[Benchmark]] = {
    cls.name: cls for cls in (VQAv2, GQA, TextVQA, POPE, MME, MMBench, ScienceQAImg, Synthetic)
}


def get_benchmark(name: str, **options) -> Benchmark:
    """The benchmark registered under exactly `name`."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](**options)
