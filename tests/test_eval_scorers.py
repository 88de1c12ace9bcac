"""Scoring rules on hand-made cases; every expected number is worked out in the test."""

from __future__ import annotations

import itertools

import pytest

from llavadi.eval.normalize import normalize_simple, normalize_vqa_answer, process_digits_articles, process_punctuation
from llavadi.eval.scorers import (
    binary_metrics,
    circular_accuracy,
    exact_match,
    llava_gqa_answer,
    mme_scores,
    parse_mmbench_answer,
    parse_mme_answer,
    parse_pope_answer,
    parse_scienceqa_answer,
    pope_metrics,
    rotate_options,
    scienceqa_choice_index,
    synthetic_accuracy,
    vqa_soft_accuracy,
)

# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),              # number word -> digit, case folded
    ("two", "2"),
    ("none", "0"),
    ("a dog", "dog"),          # article dropped
    ("The Dog", "dog"),
    ("an apple", "apple"),
    ("dog.", "dog"),           # trailing period dropped
    ("yes.", "yes"),
    ("Yes!", "yes"),           # '!' not touching a space -> space, then stripped by the word split
    ("2.5", "2.5"),            # a period before a digit stays
    ("dont", "don't"),         # contraction table
    ("isnt", "isn't"),
    ("t-shirt", "t shirt"),    # a mark inside a word becomes a space
    ("a - b", "b"),            # a mark touching a space is deleted; 'a' is an article
    ("1,000", "1000"),         # commas are dropped before the punctuation rule
    ("what?", "what"),
    ("dog's bone", "dog 's bone"),  # possessive split off
    ("  red \t car\n", "red car"),
])
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_punctuation_digit_comma_rule_deletes_every_mark():
    # Without a digit-comma-digit group the hyphen is spaced out; with one, it is deleted.
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("1,000 t-shirt") == "1000 tshirt"


def test_punctuation_period_rule():
    # Periods go unless a digit follows: "3.5" keeps its period, "m." loses it.
    assert process_punctuation("3.5 m.") == "3.5 m"
    assert process_punctuation("e.g") == "eg"


def test_digits_articles_keeps_other_words():
    assert process_digits_articles("the three little pigs") == "3 little pigs"


def test_normalize_simple():
    assert normalize_simple("A Red circle.") == "red circle"
    assert normalize_simple("  The   BLUE,  square!! ") == "blue square"
    assert normalize_simple("Two") == "two"  # the simple normaliser maps no numbers


# --------------------------------------------------------------------------- VQA soft accuracy


def _reference_vqa(prediction: str, humans: list[str]) -> float:
    """Plain reference: mean over every 9-of-10 subset of min(matches / 3, 1)."""
    pred = normalize_vqa_answer(prediction)
    normalised = [normalize_vqa_answer(h) for h in humans]
    subsets = list(itertools.combinations(range(len(humans)), len(humans) - 1))
    return sum(min(sum(normalised[i] == pred for i in subset) / 3, 1) for subset in subsets) / len(subsets)


def test_vqa_two_of_ten_humans_agree():
    humans = ["2", "Two"] + ["3"] * 8
    # Leaving out one of the two agreeing humans leaves 1 match (1/3); leaving out any of the
    # other eight leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 18/30 = 0.6.
    assert vqa_soft_accuracy("two", humans) == pytest.approx(0.6)
    assert vqa_soft_accuracy("two", humans) == pytest.approx(_reference_vqa("two", humans))


@pytest.mark.parametrize("agreeing, expected", [
    (0, 0.0),
    (1, 9 * (1 / 3) / 10),                 # 0.3
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),     # 0.9
    (4, 1.0),                              # any 9 of them still hold >= 3 matches
    (10, 1.0),
])
def test_vqa_soft_accuracy_by_agreement(agreeing, expected):
    humans = ["a dog"] * agreeing + ["cat"] * (10 - agreeing)
    assert vqa_soft_accuracy("Dog.", humans) == pytest.approx(expected)
    assert vqa_soft_accuracy("Dog.", humans) == pytest.approx(_reference_vqa("Dog.", humans))


# --------------------------------------------------------------------------- GQA


def test_gqa_exact_match_after_normalisation():
    assert exact_match("Two", "2")
    assert exact_match("a dog", "dog")
    assert exact_match("Yes.", "yes")
    assert not exact_match("dogs", "dog")
    # scored by the GQA benchmark itself: 2 of 3 after VQA normalisation, none by the official rule
    from llavadi.eval.benchmarks import get_benchmark, predictions_from_records

    gold = {"g1": "2", "g2": "dog", "g3": "no"}
    annotations = {qid: {"answer": a, "question": "", "structural": None} for qid, a in gold.items()}
    predictions = predictions_from_records([{"question_id": qid, "text": t}
                                            for qid, t in zip(gold, ["Two", "a dog", "yes."])])
    metrics = get_benchmark("gqa").score(predictions, annotations).metrics
    assert metrics["accuracy_vqa_normalised"] == pytest.approx(200 / 3)
    assert metrics["accuracy"] == 0.0  # "two" != "2", "a dog" != "dog", "yes" != "no"
    assert llava_gqa_answer("Yes..") == "yes"
    assert llava_gqa_answer("A dog") == "a dog"  # LLaVA keeps the article: no match with "dog"


# --------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("answer, label", [
    ("Yes, there is a dog in the image.", "yes"),
    ("Yes, there is", "yes"),
    ("No, there is not.", "no"),
    ("No", "no"),
    ("no.", "no"),
    ("There is not a dog", "no"),
    ("Yes. There is no cat though.", "yes"),  # only the first sentence counts
    ("Not really", "yes"),  # LLaVA looks for 'No', 'no', 'not' only: capitalised 'Not' is missed
])
def test_parse_pope_answer(answer, label):
    assert parse_pope_answer(answer) == label


def test_pope_metrics_per_split():
    answers = ["Yes, there is", "No, there is not.", "Yes", "no",   # random
               "Yes", "Yes", "No"]                                  # popular
    gold = ["yes", "yes", "no", "no", "yes", "no", "no"]
    splits = ["random"] * 4 + ["popular"] * 3
    metrics = pope_metrics(answers, gold, splits)
    # random: preds yes,no,yes,no vs gold yes,yes,no,no -> TP=1 FN=1 FP=1 TN=1.
    r = metrics["random"]
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (1, 1, 1, 1)
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(0.5)
    assert r["yes_ratio"] == pytest.approx(0.5)
    # popular: preds yes,yes,no vs gold yes,no,no -> TP=1 FP=1 TN=1 FN=0.
    p = metrics["popular"]
    assert p["accuracy"] == pytest.approx(2 / 3)
    assert p["precision"] == pytest.approx(1 / 2)
    assert p["recall"] == pytest.approx(1.0)
    assert p["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert p["yes_ratio"] == pytest.approx(2 / 3)


def test_binary_metrics_no_positive_predictions():
    m = binary_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'maybe'"):
        binary_metrics(["maybe"], ["yes"])


# --------------------------------------------------------------------------- MME


@pytest.mark.parametrize("answer, label", [
    ("Yes", "yes"), ("yes.", "yes"), (" No, it is not.", "no"), ("nope", "no"),
    ("The answer is yes", "other"),  # neither starts with nor has yes/no in its first 4 chars
    ("I'd say yes", "other"),
    ("Oh yes", "other"),  # first four characters "oh y" hold neither yes nor no
    ("Ano", "no"),        # ... but "ano" holds "no"
])
def test_parse_mme_answer(answer, label):
    assert parse_mme_answer(answer) == label


def test_mme_acc_plus_and_score():
    items = [
        # existence: image 1 both right, image 2 one right, one wrong.
        ("existence", "1.jpg", "Yes", "Yes"), ("existence", "1.jpg", "No", "No"),
        ("existence", "2.jpg", "Yes", "Yes"), ("existence", "2.jpg", "Yes", "No"),
        # code_reasoning: one image, both wrong (one unparsable answer).
        ("code_reasoning", "a.png", "No", "yes"), ("code_reasoning", "a.png", "maybe", "no"),
    ]
    result = mme_scores(items)
    existence = result["subtasks"]["existence"]
    assert existence["acc"] == pytest.approx(3 / 4)
    assert existence["acc_plus"] == pytest.approx(1 / 2)
    assert existence["score"] == pytest.approx(100 * (0.75 + 0.5))  # 125
    assert result["subtasks"]["code_reasoning"]["score"] == 0.0
    assert result["totals"]["perception"] == pytest.approx(125.0)
    assert result["totals"]["cognition"] == 0.0
    assert "count" in result["totals"]["perception_missing"]
    assert "existence" not in result["totals"]["perception_missing"]


# --------------------------------------------------------------------------- MMBench


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), (" c ", "C"), ("The answer is D.", "D"),
    ("cat", "A"),          # quotes exactly one option's text
    ("I am not sure", None),
    ("o", None),           # inside two options ("dog", "horse") -> ambiguous
])
def test_parse_mmbench_answer(answer, letter):
    assert parse_mmbench_answer(answer, ["a cat", "dog", "horse", "bird"]) == letter


def test_rotate_options():
    shown, original = rotate_options(["w", "x", "y", "z"], 1)
    assert shown == ["x", "y", "z", "w"] and original == ["B", "C", "D", "A"]
    shown, original = rotate_options(["w", "x", "y"], 5)  # 5 mod 3 = 2
    assert shown == ["y", "w", "x"] and original == ["C", "A", "B"]


def test_circular_eval_rotation_failure_makes_question_wrong():
    options, gold = ["w", "x", "y", "z"], "B"

    def correct(round_id: int, answer: str) -> bool:
        shown, original = rotate_options(options, round_id)
        letter = parse_mmbench_answer(answer, shown)
        return letter is not None and original["ABCD".index(letter)] == gold

    # q1 follows the content "x" through every rotation: right each time.
    q1 = [correct(0, "B"), correct(1, "A"), correct(2, "D"), correct(3, "C")]
    # q2 always says "B": right in round 0 only (after one rotation B shows "y").
    q2 = [correct(0, "B"), correct(1, "B"), correct(2, "B"), correct(3, "B")]
    assert q1 == [True] * 4 and q2 == [True, False, False, False]
    outcomes = [("1", "ocr", ok) for ok in q1] + [("2", "ocr", ok) for ok in q2] + [("3", "logic", True)]
    result = circular_accuracy(outcomes)
    assert result["accuracy"] == pytest.approx(2 / 3)  # groups 1 and 3 pass, 2 fails
    assert result["per_category"] == {"logic": 1.0, "ocr": 0.5}
    # Per-answer ("vanilla") accuracy would have been 6/9: circular is stricter.


# --------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("answer, letter", [
    ("A", "A"),
    ("B. Because plants need light.", "B"),
    ("The answer is C.", "C"),
    ("Hmm. The answer is D", "FAILED"),              # the pattern needs one character after the letter
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("The answer is A. Not the answer is B.", "A"),  # the pattern is case-sensitive: one match
    ("b", "FAILED"),                                 # lower case is not a letter option
    (" A", "FAILED"),                                # LLaVA does not strip
])
def test_parse_scienceqa_answer(answer, letter):
    assert parse_scienceqa_answer(answer) == letter


def test_scienceqa_choice_index():
    assert scienceqa_choice_index("B", 3) == 1
    assert scienceqa_choice_index("D", 3) == -1  # beyond the three choices
    assert scienceqa_choice_index("FAILED", 3) == -1


# --------------------------------------------------------------------------- synthetic


def test_synthetic_accuracy_overall_and_per_category():
    items = [("Red.", "red", "color"), ("a circle", "circle", "shape"), ("blue", "red", "color"),
             (None, "", "count"), ("3", "3", "count")]
    result = synthetic_accuracy(items)
    # right: 1st, 2nd, 5th -> 3 / 5; None is wrong even against an empty reference.
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["per_category"] == {"color": 0.5, "count": 0.5, "shape": 1.0}
