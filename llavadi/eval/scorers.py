"""Official scoring rules of the LLaVA-1.5 benchmarks as pure functions (no file I/O).

Each parser reproduces the answer parsing of LLaVA's evaluation scripts; each metric the rule
of the benchmark's official evaluation. Inputs are plain strings and lists, outputs plain numbers
and dicts, so every rule can be checked by hand.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from llavadi.eval.normalize import normalize_simple, normalize_vqa_answer

# --------------------------------------------------------------------------- generic


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for an empty sequence (an empty benchmark scores nothing)."""
    return float(sum(values)) / len(values) if values else 0.0


def grouped_accuracy(outcomes: Iterable[tuple[str, bool]]) -> dict[str, float]:
    """Accuracy per group from (group, correct) pairs, groups sorted by name."""
    per_group: dict[str, list[float]] = defaultdict(list)
    for group, correct in outcomes:
        per_group[group].append(1.0 if correct else 0.0)
    return {group: mean(values) for group, values in sorted(per_group.items())}


# --------------------------------------------------------------------------- VQAv2 / TextVQA


def vqa_soft_accuracy(prediction: str, human_answers: Sequence[str],
                      normalize: Callable[[str], str] = normalize_vqa_answer) -> float:
    """VQA accuracy: min(#matching humans / 3, 1) averaged over the leave-one-out subsets."""
    if not human_answers:
        raise ValueError("vqa_soft_accuracy needs at least one human answer")
    predicted = normalize(prediction)
    humans = [normalize(answer) for answer in human_answers]
    scores = []
    for left_out in range(len(humans)):
        matches = sum(1 for i, answer in enumerate(humans) if i != left_out and answer == predicted)
        scores.append(min(1.0, matches / 3.0))
    return mean(scores)


# --------------------------------------------------------------------------- GQA


def exact_match(prediction: str, reference: str,
                normalize: Callable[[str], str] = normalize_vqa_answer) -> bool:
    """True when prediction and reference are equal after `normalize`."""
    return normalize(prediction) == normalize(reference)


def llava_gqa_answer(prediction: str) -> str:
    """LLaVA's conversion of a GQA prediction before the official exact match: rstrip '.', lower."""
    return prediction.rstrip(".").lower()


# --------------------------------------------------------------------------- POPE


def parse_pope_answer(text: str) -> str:
    """LLaVA's eval_pope parsing: first sentence, commas dropped; a word no/No/not means "no"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no labels ("yes" is positive)."""
    _check_same_length(predicted, gold)
    for label in list(predicted) + list(gold):
        if label not in ("yes", "no"):
            raise ValueError(f"binary labels must be 'yes' or 'no', got {label!r}")
    tp = sum(1 for p, g in zip(predicted, gold) if p == "yes" and g == "yes")
    fp = sum(1 for p, g in zip(predicted, gold) if p == "yes" and g == "no")
    tn = sum(1 for p, g in zip(predicted, gold) if p == "no" and g == "no")
    fn = sum(1 for p, g in zip(predicted, gold) if p == "no" and g == "yes")
    n = len(gold)
    # LLaVA divides without a guard; a zero denominator gives 0.0 here instead of a crash.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(1 for p in predicted if p == "yes") / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "count": n,
    }


def pope_metrics(answers: Sequence[str], gold: Sequence[str], splits: Sequence[str]) -> dict[str, dict[str, float]]:
    """POPE metrics per split (adversarial / popular / random) from raw answers and gold labels."""
    _check_same_length(answers, gold)
    _check_same_length(answers, splits)
    by_split: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for answer, label, split in zip(answers, gold, splits):
        by_split[split][0].append(parse_pope_answer(answer))
        by_split[split][1].append(label)
    return {split: binary_metrics(pred, ref) for split, (pred, ref) in sorted(by_split.items())}


# --------------------------------------------------------------------------- MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> str:
    """LLaVA's MME conversion + the MME tool: "yes"/"no" from the answer's start, else "other"."""
    answer = text.strip().lower()
    if answer.startswith("yes"):
        return "yes"
    if answer.startswith("no"):
        return "no"
    # The MME calculation tool then looks for yes/no in the first four characters.
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(items: Iterable[tuple[str, str, str, str]]) -> dict:
    """MME scores from (subtask, image, answer text, gold yes/no) items.

    Per subtask: acc over questions, acc+ over images (every question of the image right),
    score = 100 * (acc + acc+). Perception and cognition totals sum the subtask scores.
    """
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for subtask, image, text, gold in items:
        gold = gold.strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"MME gold answer must be yes or no, got {gold!r} ({subtask}/{image})")
        per_image[subtask][image].append(parse_mme_answer(text) == gold)
    subtasks = {}
    for subtask, images in sorted(per_image.items()):
        outcomes = [ok for results in images.values() for ok in results]
        acc = mean([1.0 if ok else 0.0 for ok in outcomes])
        acc_plus = mean([1.0 if all(results) else 0.0 for results in images.values()])
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus),
                             "questions": len(outcomes), "images": len(images)}
    totals = {}
    for family, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [name for name in names if name in subtasks]
        totals[family] = sum(subtasks[name]["score"] for name in present)
        totals[f"{family}_missing"] = [name for name in names if name not in subtasks]
    unknown = sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    return {"subtasks": subtasks, "totals": totals, "unknown_subtasks": unknown}


# --------------------------------------------------------------------------- MMBench

OPTION_LETTERS = ("A", "B", "C", "D")


def parse_mmbench_answer(text: str, options: Sequence[str]) -> str | None:
    """LLaVA's auto_parse_answer: the letter shown, "The answer is X.", or the one option quoted.

    Returns None where LLaVA would fall back to ChatGPT; that answer counts as wrong here.
    """
    letters = OPTION_LETTERS[: len(options)]
    bare = text.strip(".").strip().upper()
    if bare in letters:
        return bare
    for letter in letters:
        if f"the answer is {letter}.".lower() in text.lower():
            return letter
    quoted = [letter for letter, option in zip(letters, options) if text.lower() in option.lower()]
    return quoted[0] if len(quoted) == 1 else None


def rotate_options(options: Sequence[str], round_id: int) -> tuple[list[str], list[str]]:
    """Options and their original letters after `round_id` left rotations (LLaVA --all-rounds)."""
    n = len(options)
    shift = round_id % n if n else 0
    letters = list(OPTION_LETTERS[:n])
    return list(options[shift:]) + list(options[:shift]), letters[shift:] + letters[:shift]


def circular_accuracy(outcomes: Iterable[tuple[str, str, bool]]) -> dict:
    """CircularEval from (group, category, correct) outcomes: a group passes only if all pass."""
    groups: dict[str, list[bool]] = defaultdict(list)
    group_category: dict[str, str] = {}
    for group, category, correct in outcomes:
        groups[group].append(correct)
        group_category.setdefault(group, category)
    passed = {group: all(results) for group, results in groups.items()}
    return {
        "accuracy": mean([1.0 if ok else 0.0 for ok in passed.values()]),
        "per_category": grouped_accuracy((group_category[g], ok) for g, ok in passed.items()),
        "groups": len(groups),
    }


# --------------------------------------------------------------------------- ScienceQA

SCIENCEQA_LETTERS = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_scienceqa_answer(text: str) -> str:
    """LLaVA's eval_science_qa parsing: a bare letter, "X. ...", or one "The answer is X."; else FAILED."""
    if text in SCIENCEQA_LETTERS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_LETTERS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_choice_index(text: str, n_choices: int) -> int:
    """Index of the chosen option, or -1 when the letter is unparsed or beyond the choices."""
    letter = parse_scienceqa_answer(text)
    letters = SCIENCEQA_LETTERS[:n_choices]
    return letters.index(letter) if letter in letters else -1


# --------------------------------------------------------------------------- synthetic


def synthetic_accuracy(items: Iterable[tuple[str | None, str, str]]) -> dict:
    """Exact match after the simple normaliser, overall and per category, from (pred, ref, category).

    A None prediction (no answer given) is wrong, even against an empty reference.
    """
    outcomes = [(category, pred is not None and normalize_simple(pred) == normalize_simple(ref))
                for pred, ref, category in items]
    return {"accuracy": mean([1.0 if ok else 0.0 for _, ok in outcomes]),
            "per_category": grouped_accuracy(outcomes)}


def _check_same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} predictions vs {len(b)} references")
