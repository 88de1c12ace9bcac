"""Benchmark adapters and the `score` / `report` subcommands on small files written in tmp_path."""

from __future__ import annotations

import base64
import json

import pytest

from llavadi.cli import build_parser
from llavadi.eval.benchmarks import (
    OPTION_LETTER_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    EvalDataError,
    get_benchmark,
    prediction_record,
    predictions_from_records,
    read_predictions,
)
from llavadi.eval.report import combine, load_result


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def run_cli(argv):
    """Parse `argv` with the `llavadi` command's parser and run the subcommand."""
    args = build_parser().parse_args(argv)
    return args.func(args)


# --------------------------------------------------------------------------- synthetic + CLI


@pytest.fixture()
def synthetic_files(tmp_path):
    questions = write_jsonl(tmp_path / "eval_questions.jsonl", [
        {"question_id": "q1", "image": "img/1.png", "text": "What color is the circle?", "answer": "red",
         "category": "color"},
        {"question_id": "q2", "image": "img/2.png", "text": "What shape is it?", "answer": "square",
         "category": "shape"},
        {"question_id": "q3", "image": "img/3.png", "text": "How many shapes?", "answer": "2",
         "category": "count"},
        {"question_id": "q4", "image": "img/4.png", "text": "What color is the square?", "answer": "blue",
         "category": "color"},
    ])
    predictions = write_jsonl(tmp_path / "student.jsonl", [
        {"question_id": "q1", "text": "Red."},       # right
        {"question_id": "q2", "text": "a square"},   # right
        {"question_id": "q4", "text": "green"},      # wrong; q3 has no prediction
        {"question_id": "zzz", "text": "blue"},      # unknown id
    ])
    return questions, predictions


def test_synthetic_missing_counted_wrong_and_reported(synthetic_files):
    questions, predictions = synthetic_files
    result = get_benchmark("synthetic").score_files(predictions, questions)
    # 2 right of 4 (q3 missing counts as wrong); color 1/2, shape 1/1, count 0/1.
    assert result.metrics["accuracy"] == pytest.approx(50.0)
    assert result.metrics["category/color"] == pytest.approx(50.0)
    assert result.metrics["category/shape"] == pytest.approx(100.0)
    assert result.metrics["category/count"] == pytest.approx(0.0)
    assert result.counts["missing"] == 1 and result.missing_ids == ["q3"]
    assert result.counts["unknown"] == 1 and result.unknown_ids == ["zzz"]
    assert any("no prediction" in note for note in result.notes)


def test_synthetic_prompt_is_the_question(synthetic_files):
    questions, _ = synthetic_files
    qs = get_benchmark("synthetic").load_questions(questions)
    assert [q.prompt for q in qs][:1] == ["What color is the circle?"]
    assert qs[0].image == "img/1.png"


def test_cli_score_writes_json_and_markdown(synthetic_files, tmp_path, capsys):
    questions, predictions = synthetic_files
    out = tmp_path / "results"
    assert run_cli(["score", "--benchmark", "synthetic", "--predictions", str(predictions),
                    "--annotations", str(questions), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["metrics"]["accuracy"] == pytest.approx(50.0)
    assert printed["run"] == "student"
    assert "1 of 4 questions have no prediction" in captured.err
    saved = json.loads((out / "synthetic.json").read_text())
    assert saved["metrics"] == printed["metrics"]
    markdown = (out / "synthetic.md").read_text()
    assert "| accuracy | 50.00 |" in markdown and "| category/shape | 100.00 |" in markdown


def test_cli_score_malformed_prediction_line_names_it(synthetic_files, tmp_path, capsys):
    questions, _ = synthetic_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "q1", "text": "red"}\n{"question_id": "q2", "text": \n')
    assert run_cli(["score", "--benchmark", "synthetic", "--predictions", str(bad),
                    "--annotations", str(questions)]) == 2
    assert f"{bad}:2: malformed JSON line" in capsys.readouterr().err


def test_prediction_missing_field_and_wrong_type_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": "q1", "text": "a"}\n\n{"question_id": "q2"}\n')
    with pytest.raises(EvalDataError, match=rf"{path}:3: missing field 'text'"):
        read_predictions(path)
    path.write_text('{"question_id": "q1", "text": 3}\n')
    with pytest.raises(EvalDataError, match=rf"{path}:1: field 'text' must be str"):
        read_predictions(path)
    path.write_text('["q1", "a"]\n')
    with pytest.raises(EvalDataError, match=rf"{path}:1: expected a JSON object"):
        read_predictions(path)


def test_malformed_annotation_line_names_it(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": "q1", "image": "a.png", "text": "?", "answer": "red", '
                         '"category": "color"}\n{"question_id": "q2", "image": "b.png", "text": "?"}\n')
    with pytest.raises(EvalDataError, match=rf"{questions}:2: missing field 'answer'"):
        get_benchmark("synthetic").load_annotations(questions)


def test_duplicate_prediction_is_an_error(synthetic_files, tmp_path):
    questions, _ = synthetic_files
    preds = write_jsonl(tmp_path / "dup.jsonl", [{"question_id": "q1", "text": "red"},
                                                 {"question_id": "q1", "text": "blue"}])
    with pytest.raises(EvalDataError, match=r"dup.jsonl:2: second prediction .* first is at .*dup.jsonl:1"):
        get_benchmark("synthetic").score_files(preds, questions)


def test_generation_round_trip_with_prediction_record(synthetic_files):
    questions, _ = synthetic_files
    bench = get_benchmark("synthetic")
    qs = bench.load_questions(questions)
    answers = {"q1": "red", "q2": "circle", "q3": "2", "q4": "blue"}
    records = [prediction_record(q, answers[q.question_id]) for q in qs]
    result = bench.score(predictions_from_records(records), bench.load_annotations(questions), qs)
    assert result.metrics["accuracy"] == pytest.approx(75.0)  # q2 wrong
    assert result.counts["missing"] == 0


def test_unknown_benchmark_name():
    with pytest.raises(KeyError, match="unknown benchmark 'pope_random'"):
        get_benchmark("pope_random")


# --------------------------------------------------------------------------- report


def test_report_combines_runs_into_one_table(synthetic_files, tmp_path, capsys):
    questions, predictions = synthetic_files
    teacher = write_jsonl(tmp_path / "teacher.jsonl", [
        {"question_id": q, "text": a} for q, a in (("q1", "red"), ("q2", "square"), ("q3", "2"), ("q4", "blue"))])
    for preds, name in ((predictions, "student"), (teacher, "teacher")):
        assert run_cli(["score", "--benchmark", "synthetic", "--predictions", str(preds), "--annotations",
                        str(questions), "--out", str(tmp_path / name), "--name", name]) == 0
    capsys.readouterr()
    out = tmp_path / "table.md"
    assert run_cli(["report", str(tmp_path / "student" / "synthetic.json"),
                    str(tmp_path / "teacher" / "synthetic.json"), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "| run | synthetic/accuracy |"
    assert lines[2] == "| student | 50.00 |" and lines[3] == "| teacher | 100.00 |"
    table = combine([load_result(tmp_path / "student" / "synthetic.json")], all_metrics=True)
    assert "synthetic/category/count" in table.splitlines()[0]


def test_report_rejects_non_result_file(tmp_path, capsys):
    other = write_json(tmp_path / "x.json", {"hello": 1})
    assert run_cli(["report", str(other)]) == 2
    assert "not a result file" in capsys.readouterr().err


# --------------------------------------------------------------------------- VQAv2


def test_vqav2_soft_accuracy_and_answer_types(tmp_path):
    annotations = write_json(tmp_path / "ann.json", {"annotations": [
        {"question_id": 1, "answer_type": "number", "answers": [{"answer": a} for a in ["2", "two"] + ["3"] * 8]},
        {"question_id": 2, "answer_type": "other", "answers": [{"answer": "dog"}] * 10},
        {"question_id": 3, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
    ]})
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Question {i}?\n{SHORT_ANSWER_SUFFIX}"}
        for i in (1, 2, 3)])
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "Two"},
                                                     {"question_id": 2, "text": "A dog."}])
    result = get_benchmark("vqav2").score_files(predictions, annotations, questions)
    # q1: 2 of 10 agree -> 0.6; q2: 1.0; q3 missing -> 0.  Mean 1.6 / 3.
    assert result.metrics["accuracy"] == pytest.approx(100 * 1.6 / 3, abs=1e-3)
    assert result.metrics["answer_type/number"] == pytest.approx(60.0)
    assert result.metrics["answer_type/yes/no"] == 0.0
    assert result.missing_ids == ["3"]


def test_vqav2_official_question_json(tmp_path):
    questions = write_json(tmp_path / "v2_questions.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 5, "image_id": 42, "question": "What is it?"}]})
    (q,) = get_benchmark("vqav2").load_questions(questions)
    assert q.image == "COCO_val2014_000000000042.jpg"
    assert q.prompt == f"What is it?\n{SHORT_ANSWER_SUFFIX}"


# --------------------------------------------------------------------------- GQA


def test_gqa_headline_accuracy_is_the_official_rule_and_vqa_normalisation_is_secondary(tmp_path):
    annotations = write_json(tmp_path / "testdev_balanced_questions.json", {
        "201": {"question": "Is it red?", "answer": "yes", "types": {"structural": "verify"}},
        "202": {"question": "What animal?", "answer": "dog", "types": {"structural": "query"}},
        "203": {"question": "How many?", "answer": "2", "types": {"structural": "query"}},
    })
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": "201", "text": "Yes."},
                                                     {"question_id": "202", "text": "A dog"},
                                                     {"question_id": "203", "text": "two"}])
    result = get_benchmark("gqa").score_files(predictions, annotations)
    # the official GQA / LLaVA rule: rstrip('.').lower(), then exact match: "yes" matches, "a dog" and "two" do not
    assert result.headline == ["accuracy"]
    assert result.metrics["accuracy"] == pytest.approx(100 / 3, abs=1e-3)
    assert result.metrics["binary"] == 100.0 and result.metrics["open"] == 0.0  # by the same rule
    assert result.metrics["accuracy_vqa_normalised"] == pytest.approx(100.0)  # all match after VQA normalisation
    assert "accuracy_llava" not in result.metrics


# --------------------------------------------------------------------------- TextVQA


def test_textvqa_shared_ids_resolved_by_prompt(tmp_path):
    annotations = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 100, "image_id": "abc", "question": "What brand?", "answers": ["Sony"] * 10},
        {"question_id": 101, "image_id": "abc", "question": "What year?", "answers": ["1999"] * 2 + ["2000"] * 8},
    ]})
    # LLaVA's file: the image id as question id, OCR tokens and suffix after the question.
    texts = [f"What brand?\nReference OCR token: sony\n{SHORT_ANSWER_SUFFIX}",
             f"What year?\nReference OCR token: 1999\n{SHORT_ANSWER_SUFFIX}"]
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": "abc", "image": "abc.jpg", "text": t}
                                                   for t in texts])
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": "abc", "prompt": texts[1], "text": "1999"},
        {"question_id": "abc", "prompt": texts[0], "text": "sony"}])
    result = get_benchmark("textvqa").score_files(predictions, annotations, questions)
    # brand: 1.0; year: 2 of 10 agree -> 0.6.  Mean 0.8.
    assert result.metrics["accuracy"] == pytest.approx(80.0)
    no_prompt = write_jsonl(tmp_path / "np.jsonl", [{"question_id": "abc", "text": "sony"}])
    with pytest.raises(EvalDataError, match=r"np.jsonl:1: question id 'abc' is shared by 2 questions"):
        get_benchmark("textvqa").score_files(no_prompt, annotations, questions)


# --------------------------------------------------------------------------- POPE


@pytest.fixture()
def pope_files(tmp_path):
    coco = tmp_path / "coco"
    coco.mkdir()
    write_jsonl(coco / "coco_pope_random.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"},
    ])
    write_jsonl(coco / "coco_pope_popular.json", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "b.jpg", "text": "Is there a bus in the image?", "label": "no"},
    ])
    rows = [("random", "a.jpg", "dog"), ("random", "a.jpg", "cat"), ("random", "b.jpg", "car"),
            ("popular", "a.jpg", "dog"), ("popular", "b.jpg", "bus")]
    questions = write_jsonl(tmp_path / "llava_pope_test.jsonl", [
        {"question_id": 10 + i, "image": img, "category": split,
         "text": f"Is there a {obj} in the image?\n{SHORT_ANSWER_SUFFIX}"} for i, (split, img, obj) in enumerate(rows)])
    return coco, questions


def test_pope_per_split_with_llava_parsing(pope_files, tmp_path):
    coco, questions = pope_files
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        # predictions out of file order: matching does not rely on order
        {"question_id": 12, "text": "No, there is not."},    # random car: gold yes -> FN
        {"question_id": 10, "text": "Yes, there is a dog."},  # random dog: TP
        {"question_id": 11, "text": "Yes, there is"},        # random cat: gold no -> FP
        {"question_id": 13, "text": "Yes"},                  # popular dog: TP
        {"question_id": 14, "text": "There is not a bus."},  # popular bus: TN
    ])
    result = get_benchmark("pope").score_files(predictions, coco, questions)
    m = result.metrics
    # random: TP=1 FP=1 FN=1 TN=0 -> acc 1/3, precision 1/2, recall 1/2, F1 1/2, yes-ratio 2/3.
    assert m["random/accuracy"] == pytest.approx(100 / 3, abs=1e-3)
    assert m["random/precision"] == pytest.approx(50.0)
    assert m["random/recall"] == pytest.approx(50.0)
    assert m["random/f1"] == pytest.approx(50.0)
    assert m["random/yes_ratio"] == pytest.approx(200 / 3, abs=1e-3)
    # popular: TP=1 TN=1 -> everything 1.0, yes-ratio 1/2.
    assert m["popular/f1"] == pytest.approx(100.0)
    assert m["popular/yes_ratio"] == pytest.approx(50.0)
    assert m["mean/f1"] == pytest.approx(75.0)


def test_pope_missing_prediction_counts_wrong(pope_files, tmp_path):
    coco, questions = pope_files
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": 10, "text": "Yes"}, {"question_id": 11, "text": "No"}, {"question_id": 12, "text": "Yes"},
        {"question_id": 13, "text": "Yes"}])  # popular bus (gold no) missing
    result = get_benchmark("pope").score_files(predictions, coco, questions)
    assert result.metrics["random/accuracy"] == pytest.approx(100.0)
    # Missing bus gets the wrong label "yes": popular TP=1 FP=1 -> accuracy 1/2.
    assert result.metrics["popular/accuracy"] == pytest.approx(50.0)
    assert result.missing_ids == ["14"]


def test_pope_needs_questions_and_reports_bad_label_line(pope_files, tmp_path):
    coco, _ = pope_files
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 10, "text": "Yes"}])
    with pytest.raises(EvalDataError, match="needs the question file"):
        get_benchmark("pope").score_files(predictions, coco)
    (coco / "coco_pope_random.json").write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}\n'
        '{"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}\n')
    with pytest.raises(EvalDataError, match=r"coco_pope_random.json:2: label must be yes or no"):
        get_benchmark("pope").load_annotations(coco)


# --------------------------------------------------------------------------- MME


@pytest.fixture()
def mme_files(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    existence = root / "existence"
    existence.mkdir(parents=True)
    for stem, lines in (("1", ["Is there a dog in this image? Please answer yes or no.\tYes",
                                "Is there a cat in this image? Please answer yes or no.\tNo"]),
                        ("2", ["Is there a car in this image? Please answer yes or no.\tYes",
                               "Is there a bus in this image? Please answer yes or no.\tNo"])):
        (existence / f"{stem}.jpg").write_bytes(b"")
        (existence / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    artwork = root / "artwork"
    (artwork / "images").mkdir(parents=True)
    (artwork / "questions_answers_YN").mkdir()
    (artwork / "images" / "10.jpg").write_bytes(b"")
    (artwork / "questions_answers_YN" / "10.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork by Dali? Please answer yes or no.\tNo\n")
    # LLaVA's llava_mme.jsonl: "Please answer yes or no." replaced by the short-answer suffix.
    entries = [("existence/1.jpg", "Is there a dog in this image?"),
               ("existence/1.jpg", "Is there a cat in this image?"),
               ("existence/2.jpg", "Is there a car in this image?"),
               ("existence/2.jpg", "Is there a bus in this image?"),
               ("artwork/10.jpg", "Is this artwork by Monet?"), ("artwork/10.jpg", "Is this artwork by Dali?")]
    questions = write_jsonl(tmp_path / "llava_mme.jsonl", [
        {"question_id": qid, "image": qid, "text": f"{q}\n{SHORT_ANSWER_SUFFIX}"} for qid, q in entries])
    return root, questions, entries


def test_mme_acc_plus_and_totals(mme_files, tmp_path):
    root, questions, entries = mme_files
    answers = ["Yes", "No",      # existence/1: both right
               "Yes", "Yes",     # existence/2: bus wrong
               "No", "No"]       # artwork/10: Monet wrong
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": qid, "prompt": f"{q}\n{SHORT_ANSWER_SUFFIX}", "text": a}
        for (qid, q), a in zip(entries, answers)])
    result = get_benchmark("mme").score_files(predictions, root, questions)
    m = result.metrics
    # existence: acc 3/4, acc+ 1/2 -> 125; artwork: acc 1/2, acc+ 0 -> 50; perception = 175.
    assert m["existence/acc"] == pytest.approx(75.0) and m["existence/acc_plus"] == pytest.approx(50.0)
    assert m["existence/score"] == pytest.approx(125.0)
    assert m["artwork/score"] == pytest.approx(50.0)
    assert m["perception"] == pytest.approx(175.0)
    assert m["cognition"] == 0.0
    assert any("perception total leaves out" in note for note in result.notes)


def test_mme_without_question_file_uses_annotations(mme_files, tmp_path):
    root, _, entries = mme_files
    bench = get_benchmark("mme")
    qs = bench.questions_from_annotations(bench.load_annotations(root))
    assert len(qs) == 6
    assert {q.question_id for q in qs} == {"existence/1.jpg", "existence/2.jpg", "artwork/10.jpg"}
    records = [prediction_record(q, "Yes" if "dog" in q.text or "car" in q.text or "Monet" in q.text else "No")
               for q in qs]
    result = bench.score(predictions_from_records(records), bench.load_annotations(root))
    assert result.metrics["perception"] == pytest.approx(400.0)  # two subtasks, each 100 + 100


# --------------------------------------------------------------------------- MMBench


def _tsv(path, rows):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    lines = ["\t".join(header)] + ["\t".join(str(r.get(h, "")) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def mmbench_tsv(tmp_path):
    image = base64.b64encode(b"not-a-real-image").decode()
    return _tsv(tmp_path / "mmbench_dev.tsv", [
        # question 1 and its circular copy (options shifted, answer follows the content "x").
        {"index": 1, "question": "Which is x?", "hint": "nan", "A": "w", "B": "x", "C": "y", "D": "z",
         "answer": "B", "category": "ocr", "image": image},
        {"index": 1000001, "question": "Which is x?", "hint": "nan", "A": "x", "B": "y", "C": "z", "D": "w",
         "answer": "A", "category": "ocr", "image": image},
        {"index": 2, "question": "Pick the cat.", "hint": "A pet photo.", "A": "cat", "B": "dog", "C": "nan",
         "D": "nan", "answer": "A", "category": "logic", "image": image},
    ])


def test_mmbench_prompt_format(mmbench_tsv):
    qs = get_benchmark("mmbench").load_questions(mmbench_tsv)
    assert qs[2].prompt == f"A pet photo.\nPick the cat.\nA. cat\nB. dog\n{OPTION_LETTER_SUFFIX}"
    assert qs[0].image_base64 is not None and qs[0].meta["options"] == ["w", "x", "y", "z"]


def test_mmbench_circular_copy_failure(mmbench_tsv, tmp_path):
    # Always answering "B" is right on row 1, wrong on its copy -> question 1 fails CircularEval.
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": 1, "text": "B"}, {"question_id": 1000001, "text": "B"},
        {"question_id": 2, "text": "The answer is A."}])
    result = get_benchmark("mmbench").score_files(predictions, mmbench_tsv)
    assert result.metrics["vanilla_accuracy"] == pytest.approx(200 / 3, abs=1e-3)
    assert result.metrics["circular_accuracy"] == pytest.approx(50.0)  # group 2 passes, group 1 fails
    assert result.metrics["category/ocr"] == 0.0 and result.metrics["category/logic"] == 100.0
    assert result.counts["circular_groups"] == 2


def test_mmbench_all_rounds(mmbench_tsv, tmp_path):
    # LLaVA --all-rounds on row 2 only (2 options -> rounds 0 and 1); answer follows "cat".
    rows = mmbench_tsv.read_text().splitlines()
    single = _tsv(tmp_path / "one.tsv", [])
    single.write_text("\n".join([rows[0], rows[3]]) + "\n")
    good = write_jsonl(tmp_path / "good.jsonl", [{"question_id": 2, "round_id": 0, "text": "A"},
                                                 {"question_id": 2, "round_id": 1, "text": "B"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 2, "round_id": 0, "text": "A"},
                                               {"question_id": 2, "round_id": 1, "text": "A"}])
    bench = get_benchmark("mmbench", all_rounds=True)
    assert bench.score_files(good, single).metrics["circular_accuracy"] == 100.0
    assert bench.score_files(bad, single).metrics["circular_accuracy"] == 0.0
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"question_id": 2, "round_id": 0, "text": "A"}])
    result = bench.score_files(missing, single)
    assert result.metrics["circular_accuracy"] == 0.0 and result.missing_ids == ["2#round1"]


def test_mmbench_bad_row_names_line(tmp_path):
    path = _tsv(tmp_path / "bad.tsv", [{"index": 1, "question": "q", "A": "a", "B": "b", "answer": "A"},
                                       {"index": "x1", "question": "q", "A": "a", "B": "b", "answer": "A"}])
    with pytest.raises(EvalDataError, match=rf"{path}:3: index 'x1' is not a number"):
        get_benchmark("mmbench").load_annotations(path)


# --------------------------------------------------------------------------- ScienceQA-IMG


def test_scienceqa_img_subset_and_letter_parsing(tmp_path):
    problems = {
        "1": {"image": "image.png", "choices": ["a", "b", "c"], "answer": 1, "subject": "natural science"},
        "2": {"image": "image.png", "choices": ["a", "b"], "answer": 0, "subject": "social science"},
        "3": {"image": None, "choices": ["a", "b"], "answer": 0, "subject": "language science"},
        "4": {"image": "image.png", "choices": ["a", "b"], "answer": 1, "subject": "natural science"},
        "9": {"image": "image.png", "choices": ["a", "b"], "answer": 0, "subject": "natural science"},
    }
    write_json(tmp_path / "problems.json", problems)
    write_json(tmp_path / "pid_splits.json", {"test": ["1", "2", "3", "4"], "train": ["9"]})
    questions = write_json(tmp_path / "llava_test_CQM-A.json", [
        {"id": "1", "image": "1/image.png",
         "conversations": [{"from": "human", "value": "Q1?\nA. a\nB. b\nC. c\n<image>"}]},
        {"id": "2", "image": "2/image.png", "conversations": [{"from": "human", "value": "Q2?\nA. a\nB. b\n<image>"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Q3?\nA. a\nB. b"}]},
        {"id": "4", "image": "4/image.png", "conversations": [{"from": "human", "value": "Q4?\nA. a\nB. b\n<image>"}]},
    ])
    predictions = write_jsonl(tmp_path / "p.jsonl", [
        {"question_id": "1", "text": "B. b"},      # right
        {"question_id": "2", "text": "b"},         # FAILED -> wrong
        {"question_id": "3", "text": "A"},         # text-only problem: outside the IMG subset
    ])                                             # problem 4 missing -> wrong
    bench = get_benchmark("scienceqa_img")
    qs = bench.load_questions(questions)
    assert [q.question_id for q in qs] == ["1", "2", "4"]
    assert qs[0].prompt == f"Q1?\nA. a\nB. b\nC. c\n{OPTION_LETTER_SUFFIX}"
    result = bench.score_files(predictions, tmp_path / "problems.json", questions)
    assert result.metrics["img_accuracy"] == pytest.approx(100 / 3, abs=1e-3)
    assert result.counts["unparsed"] == 1 and result.missing_ids == ["4"] and result.unknown_ids == ["3"]
    # Without the question file the IMG test problems define the set: same numbers.
    assert bench.score_files(predictions, tmp_path).metrics["img_accuracy"] == pytest.approx(100 / 3, abs=1e-3)


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("name", ["vqav2", "gqa", "textvqa", "pope", "mme"])
def test_short_answer_suffix_added_once(name, tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "What is it?"},
        {"question_id": 2, "image": "a.jpg", "text": f"What is it?\n{SHORT_ANSWER_SUFFIX}"}])
    prompts = [q.prompt for q in get_benchmark(name).load_questions(questions)]
    assert prompts == [f"What is it?\n{SHORT_ANSWER_SUFFIX}"] * 2


def test_cli_score_pope_with_questions_flag(pope_files, tmp_path, capsys):
    coco, questions = pope_files
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 10 + i, "text": t} for i, t in
                                                     enumerate(["Yes", "No", "Yes", "Yes", "No"])])
    assert run_cli(["score", "--benchmark", "pope", "--predictions", str(predictions), "--annotations", str(coco),
                    "--questions", str(questions)]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["mean/f1"] == pytest.approx(100.0)
    assert metrics["random/yes_ratio"] == pytest.approx(200 / 3, abs=1e-3)
    assert run_cli(["score", "--benchmark", "pope", "--predictions", str(predictions), "--annotations", str(coco)]) == 2
    assert "needs the question file (--questions)" in capsys.readouterr().err


def test_cli_score_mmbench_all_rounds_flag(mmbench_tsv, tmp_path, capsys):
    # Every rotation of the three rows asked; the answers follow the right content each time.
    bench = get_benchmark("mmbench", all_rounds=True)
    records = []
    for q in bench.load_questions(mmbench_tsv):
        gold = q.meta["answer"]
        records.append(prediction_record(q, "ABCD"[q.meta["original_letters"].index(gold)]))
    predictions = write_jsonl(tmp_path / "p.jsonl", records)
    assert len(records) == 4 + 4 + 2
    assert run_cli(["score", "--benchmark", "mmbench", "--predictions", str(predictions), "--annotations",
                    str(mmbench_tsv), "--all-rounds"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["circular_accuracy"] == 100.0 and result["counts"]["missing"] == 0
