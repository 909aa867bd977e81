"""Hand-made cases for the official benchmark scoring rules in :mod:`fastvlm.eval.metrics`.

Every expected score is worked out in the test from the rule (the comment or the arithmetic
next to it says why), never copied from running the code. Where the official script's own
floating-point arithmetic decides the last bit, the expression reproduces that arithmetic.
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from fastvlm.eval import metrics
from fastvlm.eval.metrics import (
    ai2d_choice,
    anls,
    exact_match,
    gqa_correct,
    levenshtein,
    mmmu_choice_correct,
    mmmu_open_correct,
    mmmu_options,
    mmmu_parse_choice,
    mmmu_parse_open,
    normalize_vqa_answer,
    ocrbench_correct,
    pope_answer,
    pope_scores,
    realworldqa_choice,
    relaxed_accuracy,
    scienceqa_choice,
    scienceqa_lmms_correct,
    seedbench_choice,
    seedbench_correct,
    vqa_accuracy,
    vqa_digits_articles,
    vqa_punctuation,
)

# ---------------------------------------------------------------------------------------
# VQA answer normalisation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("YES", "yes"),  # lower-cased
        ("Yes?", "yes"),  # "?" removed before anything else
        ("1,000", "1000"),  # commas removed before the punctuation step
        ("red\nblue\t", "red blue"),  # newline and tab become spaces, then stripped
        ("man's hat", "man 's hat"),  # "'s" split off as its own word; "'" is not a punctuation mark here
    ],
)
def test_normalize_vqa_answer_first_step(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # "/" never touches a space: replaced by a space
        ("x/y", "x y"),
        # " /" occurs somewhere, so every "/" is deleted, also the one inside "x/y"
        ("x/y /", "xy"),
        # "-" touches no space but "(" does (" ("): "-" becomes a space, "(" and ")" are deleted
        ("t-shirt (red)", "t shirt red"),
        # "!" touches the end of the text only, not a space: replaced by a space, then stripped
        ("wow!", "wow"),
    ],
)
def test_normalize_vqa_answer_punctuation_deleted_or_spaced(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_punctuation_digit_comma_digit_deletes_every_mark():
    # A digit-comma-digit anywhere makes every mark be deleted, not spaced: "1,000-2,000" -> "10002000".
    assert vqa_punctuation("1,000-2,000") == "10002000"
    # Without it, "," and "-" (touching no space) each become a space.
    assert vqa_punctuation("a,b-c") == "a b c"
    # The full processor removes commas first, so the rule can only fire on raw text (vqav2 answers).
    assert normalize_vqa_answer("1,000-2,000") == "1000 2000"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("mr. smith", "mr smith"),  # period followed by a space: stripped
        ("3.5", "3.5"),  # period followed by a digit: kept
        (".5", ".5"),  # kept, followed by a digit
        ("5.", "5"),  # stripped, nothing follows
        ("a.5", "a.5"),  # kept, followed by a digit
        # The look-behind meant to keep "1.a" is really a look-ahead, so a period after a digit goes too.
        ("1.a", "1a"),
    ],
)
def test_normalize_vqa_answer_periods(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_normalize_vqa_answer_period_count_quirk():
    # re.UNICODE (32) is passed as re.sub's count: of 33 strippable periods only the first 32 go.
    assert normalize_vqa_answer("a" + "." * 32 + "b") == "ab"
    assert normalize_vqa_answer("a" + "." * 33 + "b") == "a.b"
    assert normalize_vqa_answer("a" + "." * 40 + "b") == "a" + "." * 8 + "b"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two dogs", "2 dogs"),
        ("Three", "3"),  # lower-cased first, then mapped
        ("none", "0"),  # "none" counts as zero
        ("ten", "10"),
        ("eleven", "eleven"),  # the table stops at ten
        ("twenty-two", "twenty 2"),  # "-" becomes a space first, then "two" is a whole word
        ("the cat", "cat"),  # articles dropped
        ("a an the", ""),
        ("theatre", "theatre"),  # only whole words are articles
        ("A dog", "dog"),
    ],
)
def test_normalize_vqa_answer_number_words_and_articles(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("dont", "don't"),
        ("Dont know", "don't know"),
        ("isn't", "isn't"),  # already contracted: untouched
        ("yall", "y'all"),
        ("oclock", "o'clock"),
        ("somebody'd", "somebodyd"),  # the table's one backwards entry
        ("Im", "im"),  # the key "Im" has a capital, and words are lower-cased first: never matches
        ("let's", "let 's"),  # "'s" is split off before the table is consulted, so "let's" never matches either
    ],
)
def test_normalize_vqa_answer_contractions(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_digits_articles_alone_does_not_touch_punctuation():
    assert vqa_digits_articles("The Two cats.") == "2 cats."
    assert metrics.CONTRACTIONS["somebody'd"] == "somebodyd"
    assert metrics.NUMBER_WORDS["none"] == "0"


# ---------------------------------------------------------------------------------------
# VQA soft accuracy
# ---------------------------------------------------------------------------------------


def test_vqa_accuracy_textvqa_leave_one_out():
    # "The Cat." normalises to "cat". 2 of 10 answers are "cat".
    # Leaving out a "cat" (2 subsets): 1 match of 9 -> 1/3. Leaving out a "dog" (8 subsets): 2 matches -> 2/3.
    answers = ["cat", "Cat"] + ["dog"] * 8
    assert vqa_accuracy("The Cat.", answers, rule="textvqa") == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # 3 matches: leaving one of them out leaves 2 -> 2/3 (3 subsets); otherwise 3 -> 1 (7 subsets).
    answers = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("Yes", answers, rule="textvqa") == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    # 4 matches: every subset keeps at least 3 -> 1 everywhere.
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6, rule="textvqa") == 1
    assert vqa_accuracy("maybe", ["yes"] * 10, rule="textvqa") == 0


def test_vqa_accuracy_textvqa_normalises_both_sides():
    # Both sides go through the full processor: "Two" -> "2", "2." -> "2".
    assert vqa_accuracy("Two", ["2."] * 10, rule="textvqa") == 1


def test_vqa_accuracy_vqav2_identical_answers_stay_raw():
    # All 10 answers identical: they are only stripped, so "t-shirt" keeps its hyphen, while the prediction
    # is fully processed to "t shirt": no match at all.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10, rule="vqav2") == 0
    # Same under "textvqa": both become "t shirt" -> 1.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10, rule="textvqa") == 1
    # Identical raw answers are not lower-cased either: "Yes" never equals the processed "yes".
    assert vqa_accuracy("yes", ["Yes"] * 10, rule="vqav2") == 0
    # ... but punctuation on the prediction side is always processed away: "Yes!" -> "yes".
    assert vqa_accuracy("Yes!", ["yes"] * 10, rule="vqav2") == 1
    # Surrounding spaces and newlines in the answers are stripped first.
    assert vqa_accuracy("yes", [" yes\n"] * 10, rule="vqav2") == 1


def test_vqa_accuracy_vqav2_mixed_answers_are_processed():
    # Not all identical: answers get the punctuation and word steps, "t-shirt" -> "t shirt" (9 of them).
    # Leaving out a "t shirt" leaves 8 matches -> 1; leaving out "shirt" leaves 9 -> 1.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"], rule="vqav2") == 1
    # The answers skip the first step, so "Yes" is only lower-cased by the word step: "yes" (2 of them)
    # and "no" x 8: leaving out a "yes" -> 1/3 (2 subsets), leaving out a "no" -> 2/3 (8 subsets).
    assert vqa_accuracy("yes", ["Yes", "yes"] + ["no"] * 8, rule="vqav2") == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    # A digit-comma-digit answer loses its comma in the punctuation step: "1,000" -> "1000" (3 of them).
    assert vqa_accuracy("1000", ["1,000"] * 3 + ["100"] * 7, rule="vqav2") == pytest.approx((3 * 2 / 3 + 7) / 10)


def test_vqa_accuracy_m4c_uses_sum_over_len():
    # 3 of 5 answers match: leaving out one of them -> 2/3 (3 subsets), otherwise 1 (2 subsets).
    answers = ["x", "x", "x", "y", "z"]
    # LLaVA's evaluator sums the floats left to right: 2/3 + 2/3 + 2/3 rounds to 2.0, so 4.0 / 5.
    assert vqa_accuracy("x", answers, rule="m4c") == 0.8
    # statistics.mean adds the floats exactly (3 * fl(2/3) is a hair under 2) and rounds once.
    textvqa = float((3 * Fraction(2 / 3) + 2) / 5)
    assert textvqa != 0.8
    assert vqa_accuracy("x", answers, rule="textvqa") == textvqa
    # With 10 answers the two agree: 3 matches -> (3 * 2/3 + 7) / 10.
    ten = ["x"] * 3 + ["y"] * 7
    assert vqa_accuracy("X.", ten, rule="m4c") == pytest.approx(0.9)
    assert vqa_accuracy("X.", ten, rule="m4c") == vqa_accuracy("X.", ten, rule="textvqa")


def test_vqa_accuracy_rejects_bad_input():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError):
        vqa_accuracy("yes", ["yes"], rule="vqa")


# ---------------------------------------------------------------------------------------
# Levenshtein and ANLS
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, insert g
        ("flaw", "lawn", 2),  # delete f, insert n
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("ab", "ba", 2),  # no transpositions: two substitutions
    ],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_anls_exact_and_partial():
    assert anls("Paris", ["paris"]) == 1.0  # distance 0 after lower-casing
    # "hello world" vs "hello word": 1 deletion, longest raw string 11 characters.
    assert anls("hello world", ["hello word"]) == 1 - 1 / 11


def test_anls_threshold():
    # 3 substitutions over 6 characters: 1 - 3/6 = 0.5, not below the threshold, kept.
    assert anls("abcdef", ["abcxyz"]) == 0.5
    # 4 substitutions over 6: 1 - 4/6 = 1/3 < 0.5 -> 0.
    assert anls("abcdef", ["abwxyz"]) == 0
    assert anls("abcdef", ["abwxyz"], threshold=0.3) == 1 - 4 / 6


def test_anls_normalises_case_and_spaces():
    # "  New   York " and "new york" are both "new york" after lower-casing and re-joining the words.
    assert anls("  New   York ", ["new york"]) == 1.0


def test_anls_length_from_raw_strings():
    # Normalised "cats" vs "cat": distance 1. The divisor is the raw prediction's length, 8 ("  cats  "),
    # not the normalised 4: 1 - 1/8 (1 - 1/4 if the normalised length were used).
    assert anls("  cats  ", ["cat"]) == 1 - 1 / 8
    # The raw length is taken of the upper-cased string, and "ß".upper() is "SS": "ßß" counts as 4 long.
    # "ßß" vs "ss": 2 substitutions, 1 - 2/4 = 0.5 (with len("ßß") = 2 it would be 1 - 2/2 = 0).
    assert anls("ßß", ["ss"]) == 0.5


def test_anls_best_answer_wins():
    # Distances 2/4 and 1/4: the best is 1 - 1/4.
    assert anls("abcd", ["abxx", "abcx"]) == 0.75
    assert anls("colour", ["color", "colour", "red"]) == 1.0


def test_anls_empty_strings():
    assert anls("", [""]) == 1.0  # length 0 counts as distance 0
    assert anls("", ["abc"]) == 0  # 3 insertions over 3 -> similarity 0
    assert anls("abc", [""]) == 0
    with pytest.raises(ValueError):
        anls("abc", [])


# ---------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "target", "score"),
    [
        ("10.4", "10", 1.0),  # 0.4 / 10 = 4% <= 5%
        ("9.6", "10", 1.0),  # 4% below
        ("10.6", "10", 0.0),  # 6% > 5%
        # Exactly 5%: 1 / 20 is the correctly rounded 0.05, the same double as the bound -> within.
        ("21", "20", 1.0),
        ("19", "20", 1.0),
        ("105", "100", 1.0),  # 5 / 100 is again the double 0.05
        ("21.001", "20", 0.0),
        # fl(1.05) - 1 is exact and equals 0.050000000000000044 > fl(0.05): just outside, by float rounding.
        ("1.05", "1", 0.0),
        ("-10.4", "-10", 1.0),  # relative to |target|
        ("-10", "10", 0.0),
        ("1e2", "100", 1.0),  # anything float() accepts is a number
        ("1_000", "1000", 1.0),  # float() accepts digit-group underscores too
    ],
)
def test_relaxed_accuracy_numbers(prediction, target, score):
    assert relaxed_accuracy(prediction, target) == score


def test_relaxed_accuracy_boundary_arithmetic():
    # The reasoning behind the boundary cases above, checked on the floats themselves.
    assert 1 / 20 == 0.05
    assert 5 / 100 == 0.05
    assert 1.05 - 1 > 0.05


@pytest.mark.parametrize(
    ("prediction", "target", "score"),
    [
        ("50%", "0.5", 1.0),  # "50%" -> 50 / 100 = 0.5
        ("0.5", "50%", 1.0),
        ("50", "50%", 0.0),  # 50 vs 0.5
        ("12%", "12.5%", 1.0),  # 0.12 vs 0.125: 0.005 / 0.125 = 4%
        ("5 %", "5%", 1.0),  # "5 " parses: float() ignores surrounding spaces
        ("5%%", "0.05", 1.0),  # every trailing "%" is stripped, divided by 100 once
    ],
)
def test_relaxed_accuracy_percent(prediction, target, score):
    assert relaxed_accuracy(prediction, target) == score


@pytest.mark.parametrize(
    ("prediction", "target", "score"),
    [
        ("0", "0", 1.0),  # target 0: no relative error, string comparison instead
        ("0.0", "0", 0.0),  # equal numbers but different strings
        ("0.01", "0", 0.0),
        ("Yes", "yes", 1.0),  # non-numeric: case-insensitive string match
        ("Yes ", "yes", 0.0),  # ... without stripping
        (" 5", "5", 1.0),  # but numbers parse with spaces: 5.0 == 5.0
        ("5", "five", 0.0),  # target not a number: string match
        ("five", "5", 0.0),  # prediction not a number: string match
    ],
)
def test_relaxed_accuracy_string_fallback(prediction, target, score):
    assert relaxed_accuracy(prediction, target) == score


# ---------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is no dog.", "no"),  # "No" (comma dropped)
        ("There is not a dog.", "no"),  # "not"
        ("no", "no"),
        ("no,", "no"),  # the comma is dropped, leaving the word "no"
        ("Not at all.", "yes"),  # capitalised "Not" is not a no-word
        ("There is nothing.", "yes"),  # "nothing" is not "no"
        ("NO", "yes"),
        ("no!", "yes"),  # "!" is kept, and "no!" is not "no"
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("I see a dog.There is no cat", "yes"),  # first sentence ends at the first "." even without a space
        ("It is\nno", "yes"),  # split on single spaces only: "is\nno" is one word
        ("", "yes"),
    ],
)
def test_pope_answer_llava(text, answer):
    assert pope_answer(text, rule="llava") == answer


def test_pope_answer_lmms_eval():
    assert pope_answer(" Yes \n", rule="lmms-eval") == "yes"
    assert pope_answer("No.", rule="lmms-eval") == "no."  # not a "no": only exact text counts
    with pytest.raises(ValueError):
        pope_answer("yes", rule="pope")


def test_pope_scores_llava():
    predictions = ["Yes", "No.", "yes", "There is not.", "Not sure", "no"]
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    # Parsed: yes, no, yes, no, yes ("Not" is no no-word), no.
    # Pairs (pred, label): tp, fn, fp, tn, tp, tn -> tp=2, fp=1, tn=2, fn=1.
    scores = pope_scores(predictions, labels, rule="llava")
    assert (scores["tp"], scores["fp"], scores["tn"], scores["fn"]) == (2, 1, 2, 1)
    assert scores["accuracy"] == (2 + 2) / 6
    assert scores["precision"] == 2 / (2 + 1)
    assert scores["recall"] == 2 / (2 + 1)
    assert scores["f1"] == 2 * (2 / 3) * (2 / 3) / (2 / 3 + 2 / 3)
    assert scores["yes_ratio"] == 3 / 6  # share of answers counted "yes"


def test_pope_scores_lmms_eval():
    predictions = ["yes", " No ", "Yes, there is.", "no", "maybe", "YES"]
    labels = ["yes", "no", "yes", "yes", "no", "Yes"]
    # Parsed: yes, no, "yes, there is." (neither), no, "maybe" (neither), yes.
    # Pairs: tp, tn, -, fn, -, tp -> tp=2, fp=0, tn=1, fn=1; 3 of 6 right.
    scores = pope_scores(predictions, labels, rule="lmms-eval")
    assert (scores["tp"], scores["fp"], scores["tn"], scores["fn"]) == (2, 0, 1, 1)
    assert scores["accuracy"] == 3 / 6
    assert scores["precision"] == 2 / 2
    assert scores["recall"] == 2 / 3
    assert scores["f1"] == 2 * 1.0 * (2 / 3) / (1.0 + 2 / 3)
    # Quirk: 4 of 6 labels are "yes", although only 2 predictions are.
    assert scores["yes_ratio"] == 4 / 6


def test_pope_scores_same_answers_differ_by_rule():
    # "Yes, there is." counts as yes under LLaVA's parser and as nothing under lmms-eval's.
    assert pope_scores(["Yes, there is."], ["yes"], rule="llava")["accuracy"] == 1.0
    assert pope_scores(["Yes, there is."], ["yes"], rule="lmms-eval")["accuracy"] == 0.0


def test_pope_scores_degenerate():
    # Nothing predicted "yes": precision, recall and F1 would divide by zero; they are 0.
    scores = pope_scores(["no", "no"], ["yes", "no"], rule="llava")
    assert (scores["precision"], scores["recall"], scores["f1"], scores["yes_ratio"]) == (0, 0, 0, 0)
    assert scores["accuracy"] == 1 / 2


def test_pope_scores_rejects_bad_labels():
    with pytest.raises(ValueError, match="maybe"):
        pope_scores(["yes", "no"], ["yes", "maybe"])
    with pytest.raises(ValueError):
        pope_scores(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        pope_scores(["yes"], ["yes"], rule="pope")


# ---------------------------------------------------------------------------------------
# Exact match, GQA, OCRBench
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "kwargs", "score"),
    [
        ("Hello, World!", "hello world", {}, 1.0),
        ("don't", "dont", {}, 1.0),  # the apostrophe is in string.punctuation
        (" cat", "cat", {}, 0.0),  # spaces are kept
        ("cat…", "cat", {}, 0.0),  # "…" is not ASCII punctuation
        ("Cat", "cat", {"ignore_case": False}, 0.0),
        ("cat.", "cat", {"ignore_punctuation": False}, 0.0),
        # numpy string arrays: trailing NULs are padding and vanish
        ("cat\x00", "cat", {}, 1.0),
        ("cat\x00.", "cat", {}, 1.0),  # the NUL becomes trailing once "." is removed
        # "İ".lower() is two code points ("i" + combining dot) and is cut back to the array's width of 1
        ("İ", "i", {}, 1.0),
        ("İ", "i", {"ignore_punctuation": False}, 1.0),
        ("İ", "i", {"ignore_case": False}, 0.0),
    ],
)
def test_exact_match(prediction, reference, kwargs, score):
    assert exact_match(prediction, reference, **kwargs) == score


@pytest.mark.parametrize(
    ("prediction", "answer", "score"),
    [
        ("Yes.", "yes", 1.0),
        ("Yes..", "yes", 1.0),  # rstrip removes every trailing period
        (" yes", "yes", 0.0),  # no stripping of spaces
        ("yes!", "yes", 0.0),
        ("yes", "Yes", 0.0),  # the official answer is not lower-cased
        ("left side", "left", 0.0),
    ],
)
def test_gqa_correct(prediction, answer, score):
    assert gqa_correct(prediction, answer) == score


def test_ocrbench_substring():
    assert ocrbench_correct("The sign says STOP here", "stop", "IIIT5K") == 1.0
    assert ocrbench_correct("The sign says STOP here", "  Stop \n", "IIIT5K") == 1.0  # answer stripped, lower-cased
    assert ocrbench_correct("hello World", "hello\nworld", "IIIT5K") == 1.0  # newline read as a space
    assert ocrbench_correct("stop", "stop sign", "IIIT5K") == 0.0  # the answer must lie inside the prediction
    assert ocrbench_correct("The sign says STOP", ["go", "stop"], "IIIT5K") == 1.0  # any answer will do
    assert ocrbench_correct("The sign says STOP", ["go", "yield"], "IIIT5K") == 0.0


def test_ocrbench_hme100k():
    # All spaces go: "x ^ 2 + 1" -> "x^2+1" contains "x^2".
    assert ocrbench_correct("x ^ 2 + 1", "x^2", "HME100k") == 1.0
    assert ocrbench_correct("x^2+1", "x ^ { 2 }", "HME100k") == 0.0  # "x^{2}" is not in "x^2+1"
    # The prediction is lower-cased but the HME100k answer is not: "X^{2}" is never found.
    assert ocrbench_correct("X^{2}", "X^{2}", "HME100k") == 0.0
    assert ocrbench_correct("X^{2}", "X^{2}", "IIIT5K") == 1.0  # other sets lower-case both sides
    # Other sets keep the spaces.
    assert ocrbench_correct("x ^ 2", "x^2", "IIIT5K") == 0.0


# ---------------------------------------------------------------------------------------
# SeedBench, ScienceQA, AI2D, RealWorldQA
# ---------------------------------------------------------------------------------------


def test_seedbench():
    assert seedbench_choice(" B. dog") == "B"  # stripped, then the first character
    assert seedbench_choice("AB") == "A"
    assert seedbench_choice("b") == "b"
    assert seedbench_choice("") == ""
    assert seedbench_correct("b", "B") == 1.0  # case ignored
    assert seedbench_correct("  C\n", "C") == 1.0
    assert seedbench_correct("The answer is B", "B") == 0.0  # first character "T"
    assert seedbench_correct("", "A") == 0.0


@pytest.mark.parametrize(
    ("prediction", "n_choices", "index"),
    [
        ("B", 4, 1),  # bare letter
        ("B. a dog", 4, 1),  # "X. ..."
        ("B.", 4, -1),  # not a bare letter, too short for "X. ", no "The answer is": FAILED
        ("The answer is C.", 4, 2),
        ("The answer is Cat", 4, 2),  # the regex's final "." matches any character: "Ca"
        ("The answer is C", 4, -1),  # nothing after the letter for the regex's "."
        ("The answer is A. The answer is B.", 4, -1),  # two matches -> FAILED
        ("E", 4, -1),  # beyond the 4 choices
        ("The answer is E.", 5, 4),
        ("The answer is F.", 5, -1),  # F is not an option letter at all
        ("", 4, -1),
        ("b", 4, -1),  # lower case is not a letter option
        (" B", 4, -1),  # not stripped
        ("B.text", 4, -1),  # "X." must be followed by a space
    ],
)
def test_scienceqa_choice(prediction, n_choices, index):
    assert scienceqa_choice(prediction, n_choices) == index


def test_scienceqa_lmms_correct():
    assert scienceqa_lmms_correct("B", 1, 4) == 1.0
    assert scienceqa_lmms_correct(" b \n", 1, 4) == 1.0  # stripped and lower-cased
    assert scienceqa_lmms_correct("A", 1, 4) == 0.0
    # Quirk: the "X." branch tests for an upper-case letter after lower-casing, so it never fires.
    assert scienceqa_lmms_correct("B. a dog", 1, 4) == 0.0
    assert scienceqa_lmms_correct("B.", 1, 4) == 0.0


def test_ai2d_choice_then_exact_match():
    assert ai2d_choice("B. A dog") == "B"
    assert ai2d_choice("  C.") == "C"  # leading white space allowed
    assert ai2d_choice("c. dog") == "c. dog"  # lower-case letter: left as it is
    assert ai2d_choice("(B)") == "(B)"
    # The filtered answer is then scored by exact match, ignoring case and punctuation.
    assert exact_match(ai2d_choice("(B)"), "B") == 1.0  # "(B)" loses its brackets
    assert exact_match(ai2d_choice("b"), "B") == 1.0
    assert exact_match(ai2d_choice("c. dog"), "C") == 0.0  # "c dog" vs "c"
    assert exact_match(ai2d_choice("B dog"), "B") == 0.0


COUNT_QUESTION = "How many cars are there?\nA. 1\nB. 2\nC. 3"
LANE_QUESTION = "Which lane is the bus in?\nA. Left lane\nB. Right lane"


@pytest.mark.parametrize(
    ("prediction", "question", "choice"),
    [
        ("two", COUNT_QUESTION, "B"),  # "two" -> "2", the text of option B
        ("Two", COUNT_QUESTION, "B"),  # the number-word lookup lower-cases
        ("two cars", COUNT_QUESTION, "two cars"),  # only a whole-answer number word is converted
        ("B", COUNT_QUESTION, "B"),  # no option text in "B": returned as it is
        ("(C)", COUNT_QUESTION, "C"),  # punctuation removed
        ("B.", COUNT_QUESTION, "B"),
        ("Right lane.", LANE_QUESTION, "B"),
        ("I'd say Left lane!", LANE_QUESTION, "A"),  # "Id say Left lane" contains option A's text
        ("The right lane.", LANE_QUESTION, "The right lane"),  # the search is case-sensitive
        ("RIGHT lane? No, Left lane", LANE_QUESTION, "A"),  # the first case-exact option text found
        ("A dog.", "What is this?", "A dog"),  # no options listed: punctuation-free answer
        ("blue", "Colour?\nA. red\nC. blue", "B"),  # letters follow the listing order, not the printed letter
        ("10", "How many?\nA. 1\nB. 10", "A"),  # alternation tries "1" first, which matches inside "10"
    ],
)
def test_realworldqa_choice(prediction, question, choice):
    assert realworldqa_choice(prediction, question) == choice


def test_realworldqa_scored_by_exact_match():
    assert exact_match(realworldqa_choice("two", COUNT_QUESTION), "B") == 1.0
    assert exact_match(realworldqa_choice("b", COUNT_QUESTION), "B") == 1.0  # case ignored by exact match


# ---------------------------------------------------------------------------------------
# MMMU
# ---------------------------------------------------------------------------------------

OPTIONS = ["cat", "dog", "fox", "owl"]


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("(B)", "B"),
        ("I pick (C) fox", "C"),  # bracketed letter
        ("B", "B"),  # " B " contains "B "
        ("B.", "B"),  # the trailing "." is stripped, leaving "B"
        ("The answer is B. dog", "B"),  # no "X " form, so "B." counts
        ("(B) or (D)", "D"),  # two bracketed candidates: the last one
        ("(D) or (B)", "B"),
        ("A or C", "C"),  # two "X " candidates: the last " X "
        ("A fox is shown", "A"),  # the article "A " reads as option A
        ("I believe it is the fox here", "C"),  # 7 words > 5: option text "fox"
        ("the dog chased the cat around", "A"),  # 6 words, texts "cat" (A) and "dog" (B): the later, "cat"
        ("'(B)'", "B"),  # quotes stripped from the ends
    ],
)
def test_mmmu_parse_choice(response, letter):
    assert mmmu_parse_choice(response, OPTIONS, random.Random(0)) == letter


def test_mmmu_parse_choice_random_fallback():
    # "so it is the fox" has 5 words (not more than 5), so "fox" is not looked for, and there is no
    # letter form: a random letter from the rng.
    expected = [random.Random(seed).choice(["A", "B", "C", "D"]) for seed in range(8)]
    assert set(expected) != {"C"}
    assert [mmmu_parse_choice("so it is the fox", OPTIONS, random.Random(seed)) for seed in range(8)] == expected
    # Deterministic: the same seed gives the same sequence of draws.
    # Each unparsed answer makes exactly one rng.choice(letters) draw, so a seeded rng replays the sequence.
    rng, reference = random.Random(123), random.Random(123)
    draws = [mmmu_parse_choice("no idea", OPTIONS, rng) for _ in range(20)]
    assert draws == [reference.choice(["A", "B", "C", "D"]) for _ in range(20)]
    assert len(set(draws)) > 1  # really random, not a constant fallback
    # A parsed answer draws nothing from the rng.
    rng = random.Random(7)
    mmmu_parse_choice("(A)", OPTIONS, rng)
    assert rng.random() == random.Random(7).random()


def test_mmmu_parse_open_key_phrases():
    # "answer " leaves "is 42", "is " leaves "42": the shorter tail wins; its number is 42.0.
    assert mmmu_parse_open("The answer is 42.") == [42.0]
    # No key phrase: the whole (lower-cased) response; a single character is padded both ways.
    assert mmmu_parse_open("Paris") == ["paris"]
    assert mmmu_parse_open("B") == [" b", "b "]
    # Numbers are rounded to 2 places.
    assert mmmu_parse_open("it is 3.14159") == [3.14]
    # A key phrase whose tail is a lone punctuation mark is ignored: back to the whole response.
    assert mmmu_parse_open("so :") == ["so :"]


def test_mmmu_parse_open_numbers():
    # Tail "1,234,567 dollars"; the comma pattern finds 1,234,567, and the simple pattern also finds
    # the last group "567" (it is not followed by a comma or a digit).
    assert set(mmmu_parse_open("so the total is 1,234,567 dollars")) == {"1,234,567 dollars", 1234567.0, 567.0}
    # Scientific notation: "2e5" -> 200000.0; the simple pattern skips the "2" (an exponent follows it)
    # but takes the exponent's "5".
    assert set(mmmu_parse_open("the speed is 2e5")) == {200000.0, 5.0}


def test_mmmu_parse_open_equals_sign_and_sentences():
    # "=" is a key phrase in the last line only: "a = 1" gives nothing, "b = 2" gives 2.
    assert mmmu_parse_open("a = 1\nb = 2") == [2.0]
    assert mmmu_parse_open("a = 1") == [1.0]
    # The text is lower-cased before splitting at ". " + capital, so only newlines split:
    # one sentence, whose last "is " tail is "6".
    assert mmmu_parse_open("It is 5. Then it is 6") == [6.0]


def test_mmmu_open_correct():
    assert mmmu_open_correct([42.0], "42") == 1.0
    assert mmmu_open_correct([42.0], "42.001") == 1.0  # rounded to 42.0
    assert mmmu_open_correct([42.0], "41") == 0.0
    assert mmmu_open_correct(["paris, france"], "Paris") == 1.0  # lower-cased answer inside the string
    assert mmmu_open_correct(["a cat"], "a") == 1.0  # one character: "a " is inside
    assert mmmu_open_correct(["ba"], "a") == 0.0  # neither " a" nor "a " is
    assert mmmu_open_correct([7.0], ["7", "seven"]) == 1.0  # any of several answers
    assert mmmu_open_correct(["42 apples"], "42") == 0.0  # a numeric answer is only compared with numbers
    assert mmmu_open_correct(mmmu_parse_open("The answer is 1,000."), "1000") == 1.0


def test_mmmu_choice_correct_and_options():
    assert mmmu_choice_correct("B", "B") == 1.0
    assert mmmu_choice_correct("B", "A") == 0.0
    assert mmmu_choice_correct("B", ["A", "B"]) == 1.0
    assert mmmu_choice_correct("A", "AB") == 0.0  # a string answer must be equal, not contain the letter
    assert mmmu_options("['cat', 'dog']") == ["cat", "dog"]
    assert mmmu_options(("cat", "dog")) == ["cat", "dog"]
