"""Answer normalisation: the official VQA (EvalAI / m4c) answer processor and a simple one.

The VQA processor follows the rules of the EvalAI VQA answer processor used by the VQAv2
server and by TextVQA's m4c evaluator (LLaVA's ``m4c_evaluator.EvalAIAnswerProcessor``):

1. lower-case; drop ``,`` and ``?``; split the possessive ``'s`` off (``dog's`` -> ``dog 's``);
   newlines and tabs become spaces; strip.
2. punctuation: each mark of ``PUNCTUATION`` is deleted when it touches a space in the input
   (``"a - b"``) or when the input holds a digit-comma-digit group (``"1,000"``), otherwise it
   becomes a space (``"t-shirt"`` -> ``"t shirt"``). A period is deleted unless a digit follows it,
   so ``"dog."`` -> ``"dog"`` but ``"2.5"`` stays.
3. words: number words zero..ten (and "none") become digits, the articles a/an/the are
   removed, and apostrophe-less contractions get their apostrophe back (``"dont"`` -> ``"don't"``).
"""

from __future__ import annotations

import re

# Number words the VQA rules map to digits ("manualMap" in the VQA eval code).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# Marks handled by the punctuation rule (the period has its own rule).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")

# A digit-comma-digit group ("1,000") switches every mark to deletion.
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
# A period not followed by a digit ("dog." but not "2.5").
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _contraction_table() -> dict[str, str]:
    """Apostrophe-less spelling -> canonical contraction, as the VQA rules list them."""
    # Written as "canonical: extra spellings" so that each canonical form appears once.
    groups = {
        "ain't": ["aint"], "aren't": ["arent"], "can't": ["cant"], "could've": ["couldve"],
        "couldn't": ["couldnt"], "couldn't've": ["couldn'tve", "couldnt've"], "didn't": ["didnt"],
        "doesn't": ["doesnt"], "don't": ["dont"], "hadn't": ["hadnt"],
        "hadn't've": ["hadnt've", "hadn'tve"], "hasn't": ["hasnt"], "haven't": ["havent"],
        "he'd": ["hed"], "he'd've": ["hed've", "he'dve"], "he's": ["hes"], "how'd": ["howd"],
        "how'll": ["howll"], "how's": ["hows"], "isn't": ["isnt"], "it'd": ["itd"],
        "it'd've": ["itd've", "it'dve"], "it'll": ["itll"], "let's": ["let's"], "ma'am": ["maam"],
        "mightn't": ["mightnt"], "mightn't've": ["mightnt've", "mightn'tve"],
        "might've": ["mightve"], "mustn't": ["mustnt"], "must've": ["mustve"],
        "needn't": ["neednt"], "not've": ["notve"], "o'clock": ["oclock"], "oughtn't": ["oughtnt"],
        "'ow's'at": ["ow's'at", "'ows'at", "'ow'sat"], "shan't": ["shant"],
        "she'd've": ["shed've", "she'dve"], "she's": ["she's"], "should've": ["shouldve"],
        "shouldn't": ["shouldnt"], "shouldn't've": ["shouldnt've", "shouldn'tve"],
        "somebody'd've": ["somebodyd've", "somebody'dve"], "somebody'll": ["somebodyll"],
        "somebody's": ["somebodys"], "someone'd": ["someoned"],
        "someone'd've": ["someoned've", "someone'dve"], "someone'll": ["someonell"],
        "someone's": ["someones"], "something'd": ["somethingd"],
        "something'd've": ["somethingd've", "something'dve"], "something'll": ["somethingll"],
        "that's": ["thats"], "there'd": ["thered"], "there'd've": ["thered've", "there'dve"],
        "there're": ["therere"], "there's": ["theres"], "they'd": ["theyd"],
        "they'd've": ["theyd've", "they'dve"], "they'll": ["theyll"], "they're": ["theyre"],
        "they've": ["theyve"], "'twas": ["twas"], "wasn't": ["wasnt"],
        "we'd've": ["wed've", "we'dve"], "we've": ["weve"], "weren't": ["werent"],
        "what'll": ["whatll"], "what're": ["whatre"], "what's": ["whats"], "what've": ["whatve"],
        "when's": ["whens"], "where'd": ["whered"], "where's": ["wheres"],
        "where've": ["whereve"], "who'd": ["whod"], "who'd've": ["whod've", "who'dve"],
        "who'll": ["wholl"], "who's": ["whos"], "who've": ["whove"], "why'll": ["whyll"],
        "why're": ["whyre"], "why's": ["whys"], "won't": ["wont"], "would've": ["wouldve"],
        "wouldn't": ["wouldnt"], "wouldn't've": ["wouldnt've", "wouldn'tve"], "y'all": ["yall"],
        "y'all'll": ["yall'll", "y'allll"], "y'all'd've": ["yall'd've", "y'alld've", "y'all'dve"],
        "you'd": ["youd"], "you'd've": ["youd've", "you'dve"], "you'll": ["youll"],
        "you're": ["youre"], "you've": ["youve"],
        # Lower-case forms of the table's "Id've", "Im", "Ive" entries can never match after
        # lower-casing in the official code, so they are left out here on purpose.
    }
    table = {spelling: canonical for canonical, spellings in groups.items() for spelling in spellings}
    # The official table maps this one entry the other way round; kept so scores match.
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS: dict[str, str] = _contraction_table()


def process_punctuation(text: str) -> str:
    """Apply the VQA punctuation rule (delete or space out marks, drop non-decimal periods)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test looks at the input text, not the partly processed one (as the official rule).
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digits_articles(text: str) -> str:
    """Map number words to digits, drop articles, restore contractions; words joined by one space."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA / TextVQA answer normalisation (EvalAI answer processor)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    return process_digits_articles(text)


_NON_WORD = re.compile(r"[^\w\s]")


def normalize_simple(answer: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (synthetic set)."""
    text = _NON_WORD.sub(" ", answer.lower())
    return " ".join(word for word in text.split() if word not in ARTICLES)
