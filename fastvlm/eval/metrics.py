"""Benchmark metrics, reproducing the official scoring scripts rule for rule, quirks included.

The paper scored GQA, ScienceQA, TextVQA and POPE with the LLaVA evaluation scripts and
everything else with lmms-eval v0.2.2 (``../shared/spec/EVAL_METRICS.md``). Published
numbers are only comparable if a prediction is scored exactly as those scripts score it,
so each function here follows one script's rule, including behaviour that looks like a
bug (each such quirk is named in the function's docstring). Where the two protocols
differ for one benchmark, a ``rule`` argument picks the protocol.

Every function is pure: it takes the model's raw answer text and the reference data and
returns numbers; the tasks in :mod:`fastvlm.eval.tasks` decide which rule a benchmark uses.
"""

from __future__ import annotations

import ast
import random
import re
import statistics
import string
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------
# VQA answer normalisation (the official VQA / EvalAI processor used by MMF, LLaVA's
# m4c_evaluator and lmms-eval)
# ---------------------------------------------------------------------------------------

_CONTRACTIONS_TABLE = """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd
itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't
mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've
shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd
somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's
someoned>someone'd someoned've>someone'd've someone'dve>someone'd've someonell>someone'll
someones>someone's somethingd>something'd somethingd've>something'd've something'dve>something'd've
somethingll>something'll thats>that's thered>there'd thered've>there'd've there'dve>there'd've
therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll
theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've
werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's whered>where'd
wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's
whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll
yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've
you'dve>you'd've youll>you'll youre>you're youve>you've
"""
# The official table, as it is: "somebody'd" -> "somebodyd" runs backwards, and the keys
# with capitals (Im, Ive, Id've) can never match because words are lower-cased first.
CONTRACTIONS: dict[str, str] = dict(pair.split(">") for pair in _CONTRACTIONS_TABLE.split())
_ZERO_TO_TEN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIGIT_WORDS = {word: str(n) for n, word in enumerate(_ZERO_TO_TEN)}
NUMBER_WORDS = {"none": "0", **DIGIT_WORDS}
ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')  # one mark per character
# Quirk: "(?!<=\d)" was meant as a look-behind but is a look-ahead for the text "<=digit",
# which can never follow a period, so every period not followed by a digit is removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_punctuation(text: str) -> str:
    """EvalAI's punctuation step.

    A mark next to a space (or any mark, when the text has a digit-comma-digit) is deleted,
    otherwise it becomes a space. Quirk: ``re.UNICODE`` (32) is passed as ``count``, so at
    most 32 periods are stripped.
    """
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def vqa_digits_articles(text: str) -> str:
    """EvalAI's word step: lower-case, number words to digits, drop articles, expand contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The full EvalAI answer processor (``EvalAIAnswerProcessor.__call__``)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))


def _leave_one_out(prediction: str, answers: Sequence[str]) -> list[float]:
    """For each human answer left out, min(1, #other answers equal to the prediction / 3)."""
    scores = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        scores.append(min(1, matches / 3))
    return scores


def vqa_accuracy(prediction: str, answers: Sequence[str], *, rule: str = "textvqa") -> float:
    """VQA soft accuracy of one prediction against its (usually 10) human answers.

    Rules:

    - ``"textvqa"``: lmms-eval ``textvqa_process_results``. Both sides go through the full
      EvalAI processor; the score is the ``statistics.mean`` over the leave-one-out subsets.
    - ``"vqav2"``: lmms-eval ``vqav2_process_results``. The prediction is fully processed.
      Answers only get ``\\n``/``\\t`` replaced and are stripped, and only if they are not all
      identical are punctuation and digit/article processing applied to the answers and
      (a second time) to the prediction.
    - ``"m4c"``: LLaVA's ``TextVQAAccuracyEvaluator`` (its TextVQA script): the same
      per-answer scores, averaged with ``sum / len`` (which can differ from ``statistics.mean``
      in the last bit).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if rule == "textvqa":
        return statistics.mean(
            _leave_one_out(normalize_vqa_answer(prediction), [normalize_vqa_answer(a) for a in answers])
        )
    if rule == "vqav2":
        pred = normalize_vqa_answer(prediction)
        refs = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(refs)) > 1:
            refs = [vqa_digits_articles(vqa_punctuation(a)) for a in refs]
            pred = vqa_digits_articles(vqa_punctuation(pred))
        return statistics.mean(_leave_one_out(pred, refs))
    if rule == "m4c":
        scores = _leave_one_out(normalize_vqa_answer(prediction), [normalize_vqa_answer(a) for a in answers])
        return sum(scores) / len(scores)
    raise ValueError(f"unknown vqa_accuracy rule {rule!r}; expected 'textvqa', 'vqav2' or 'm4c'")


# ---------------------------------------------------------------------------------------
# ANLS (DocVQA, InfoVQA) and ChartQA's relaxed accuracy
# ---------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b, start=1):
        current = [j]
        for i, ca in enumerate(a, start=1):
            current.append(previous[i - 1] if ca == cb else 1 + min(previous[i - 1], previous[i], current[-1]))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], *, threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (lmms-eval ``anls``).

    Distances are taken between ``" ".join(s.strip().lower().split())`` forms, but divided by
    the length of the **raw** strings (``len(s.upper())``, as the script does). The best
    answer's similarity is set to 0 when below ``threshold``.
    """
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else levenshtein(gt, pred) / length)
    score = 1 - min(distances)
    return 0 if score < threshold else score


def _chartqa_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, *, max_relative_change: float = 0.05) -> float:
    """ChartQA's relaxed correctness (lmms-eval ``relaxed_correctness``), as 1.0 or 0.0.

    When both parse as floats (a trailing ``%`` divides by 100) and the target is non-zero,
    the relative error must be at most 5%; otherwise a case-insensitive exact match. Neither
    side is stripped.
    """
    pred, tgt = _chartqa_float(prediction), _chartqa_float(target)
    if pred is not None and tgt:
        return float(abs(pred - tgt) / abs(tgt) <= max_relative_change)
    return float(prediction.lower() == target.lower())


# ---------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------


def pope_answer(text: str, *, rule: str = "llava") -> str:
    """The yes/no a POPE answer counts as.

    ``"llava"`` (``eval_pope.py``): keep the text before the first ``.``, drop commas, split
    on single spaces; any word ``No``, ``not`` or ``no`` makes it "no", anything else "yes".
    ``"lmms-eval"``: the lower-cased, stripped text itself (only "yes"/"no" can be right).
    """
    if rule == "llava":
        if "." in text:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    if rule == "lmms-eval":
        return text.lower().strip()
    raise ValueError(f"unknown POPE rule {rule!r}; expected 'llava' or 'lmms-eval'")


def pope_scores(predictions: Sequence[str], labels: Sequence[str], *, rule: str = "llava") -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio of raw POPE answers against yes/no labels.

    ``"llava"``: answers parsed by :func:`pope_answer`; ``yes_ratio`` is the share of answers
    counted "yes". (The script divides by zero in precision when nothing is predicted "yes",
    in recall when no label is "yes", and in F1 when both are 0; here an undefined ratio is 0.)
    ``"lmms-eval"``: exact "yes"/"no"; anything else is neither a positive nor a negative
    prediction. Quirk kept: its ``yes_ratio`` is the share of **labels** that are "yes".
    Counts ``tp``, ``fp``, ``tn``, ``fn`` are returned too.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} POPE predictions for {len(labels)} labels")
    labels = [label.lower().strip() for label in labels]
    bad = sorted({label for label in labels if label not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad}")
    preds = [pope_answer(p, rule=rule) for p in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels, strict=True))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels, strict=True))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels, strict=True))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels, strict=True))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
    if rule == "llava":
        accuracy = (tp + tn) / (tp + tn + fp + fn) if n else 0
        yes_ratio = preds.count("yes") / n if n else 0
    else:
        accuracy = sum(p == g for p, g in zip(preds, labels, strict=True)) / n if n else 0
        yes_ratio = labels.count("yes") / n if n else 0
    rates = {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}
    return {**rates, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ---------------------------------------------------------------------------------------
# Exact match (HF evaluate's, as lmms-eval uses it), GQA, OCRBench
# ---------------------------------------------------------------------------------------

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _numpy_str(text: str, width: int) -> str:
    """What one element of a numpy ``<U{width}`` array holds: cut to ``width`` characters,
    trailing NULs dropped (they are the array's padding)."""
    return text[:width].rstrip("\x00")


def exact_match(prediction: str, reference: str, *, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """HF ``evaluate``'s exact_match for one pair: optional lower-casing, then removal of
    ``string.punctuation``; no stripping of spaces.

    Quirks kept from its numpy string arrays (each side is a one-element ``<U{len}`` array):
    trailing ``"\\x00"`` characters vanish, and lower-casing that lengthens a string (``"İ"``
    becomes two code points) is cut back to the original length.
    """
    pred_width, ref_width = len(prediction), len(reference)
    prediction, reference = _numpy_str(prediction, pred_width), _numpy_str(reference, ref_width)
    if ignore_case:
        prediction = _numpy_str(prediction.lower(), pred_width)
        reference = _numpy_str(reference.lower(), ref_width)
    if ignore_punctuation:
        prediction = _numpy_str(prediction.translate(_NO_PUNCTUATION), pred_width)
        reference = _numpy_str(reference.translate(_NO_PUNCTUATION), ref_width)
    return float(prediction == reference)


def gqa_correct(prediction: str, answer: str) -> float:
    """LLaVA's GQA rule: ``prediction.rstrip('.').lower()`` must equal the official answer."""
    return float(prediction.rstrip(".").lower() == answer)


def ocrbench_correct(prediction: str, answers: str | Sequence[str], dataset: str) -> float:
    """OCRBench: 1 if any answer (lower-cased, stripped, newlines as spaces) is a substring of
    the lower-cased prediction. For the HME100k set (handwritten formulas) the answer is not
    lower-cased but all spaces are removed from both sides."""
    pred = prediction.lower().strip()
    answers = [answers] if isinstance(answers, str) else list(answers)
    for answer in answers:
        if dataset == "HME100k":
            if answer.strip().replace("\n", " ").replace(" ", "") in pred.strip().replace("\n", " ").replace(" ", ""):
                return 1.0
        elif answer.lower().strip().replace("\n", " ") in pred.lower().strip().replace("\n", " "):
            return 1.0
    return 0.0


# ---------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------


def option_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def seedbench_choice(prediction: str) -> str:
    """SeedBench: the stripped prediction, cut to its first character when longer."""
    pred = prediction.strip()
    return pred[0] if len(pred) > 1 else pred


def seedbench_correct(prediction: str, answer: str) -> float:
    """SeedBench: the first character matches the answer letter, ignoring case."""
    return float(seedbench_choice(prediction).lower().strip() == answer.lower().strip())


_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_choice(prediction: str, n_choices: int, *, options: Sequence[str] = ("A", "B", "C", "D", "E")) -> int:
    """LLaVA ``eval_science_qa.py``: the chosen option index, or -1 ("FAILED").

    Accepted: the bare letter, ``"X. ..."``, or exactly one ``The answer is X`` (the regex's
    final ``.`` matches any character).
    """
    options = list(options)
    if prediction in options:
        letter = prediction
    elif len(prediction) >= 3 and prediction[0] in options and prediction[1:3] == ". ":
        letter = prediction[0]
    else:
        found = _SQA_ANSWER_IS.findall(prediction)
        letter = found[0] if len(found) == 1 else "FAILED"
    return options.index(letter) if letter in options[:n_choices] else -1


def scienceqa_lmms_correct(prediction: str, answer_index: int, n_choices: int) -> float:
    """lmms-eval ``scienceqa_img``: the lower-cased, stripped prediction equals the letter.

    Quirk kept: its ``"X. ..."`` branch tests ``pred[0].isupper()`` after lower-casing, so
    it never fires; only the bare letter counts.
    """
    target = option_letters(n_choices)[answer_index].strip().lower()
    pred = prediction.strip().lower()
    if pred == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":  # unreachable, as in lmms-eval
        return float(pred[0] == target)
    return 0.0


_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")


def ai2d_choice(prediction: str) -> str:
    """AI2D's filter: the letter of a leading ``"X."``, else the response unchanged."""
    match = _LEADING_LETTER.match(prediction)
    return match.group(1) if match else prediction


_OPTION_IN_QUESTION = re.compile(r"\b([A-Z])\.\s+([^\n]*)")


def realworldqa_choice(prediction: str, question: str) -> str:
    """RealWorldQA's two filters: a whole-answer number word becomes its digit; then the
    punctuation-free answer is searched for the text of an option listed in the question as
    ``"X. text"``. A found option gives its letter (letters are assigned in the order the
    options are listed), otherwise the punctuation-free answer is returned."""
    resp = DIGIT_WORDS.get(prediction.lower(), prediction)
    to_letter: dict[str, str] = {}
    patterns = []
    for i, (_, text) in enumerate(_OPTION_IN_QUESTION.findall(question)):
        text = text.strip()
        patterns.append(re.escape(text))
        to_letter[text] = chr(ord("A") + i)
    cleaned = re.sub(r"[^\w\s]", "", resp).strip()
    match = re.compile("|".join(patterns)).search(cleaned)
    if match and match.group() in to_letter:
        return to_letter[match.group()]
    return cleaned


# MMMU (the official parse_multi_choice_response / parse_open_response / eval_open rules)


def mmmu_options(options: str | Sequence[str]) -> list[str]:
    """MMMU stores options as the text of a Python list."""
    return list(ast.literal_eval(options)) if isinstance(options, str) else list(options)


def mmmu_parse_choice(response: str, options: Sequence[str], rng: random.Random) -> str:
    """The letter MMMU's parser reads from a multiple-choice answer.

    In order: ``(A)``; ``"A "``; ``"A."``; the option text when the answer has more than 5
    words. Several candidates: the one occurring last. None: a random letter drawn from
    ``rng`` (the official script's fallback; seed it for reproducible scores).
    """
    letters = option_letters(len(options))
    index2ans = dict(zip(letters, options, strict=True))
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    by_text = False
    bracketed = False
    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [c for c in letters if f"{c} " in response]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in index2ans.items() if text.lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return rng.choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracketed:
        starts = [response.rfind(f"({c})") for c in candidates]
    else:
        starts = [response.rfind(f" {c} ") for c in candidates]
    return candidates[starts.index(max(starts))]  # first maximum, like np.argmax


_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _mmmu_normalize(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_parse_open(response: str) -> list:
    """MMMU's open-answer parser: the tails after key phrases ("is ", "so ", "answer "...,
    and "=" in the last sentence), plus every number in them, normalised (numbers to
    floats rounded to 2 places, text lower-cased)."""
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (("=",) if i == len(parts) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in part:
                tail = part.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    if not keys:
        keys = [response]
    found = list(keys)
    for key in keys:
        found += _NUMBER_WITH_COMMAS.findall(key) + _NUMBER_SCIENTIFIC.findall(key) + _NUMBER_SIMPLE.findall(key)
    normalized = []
    for item in found:
        normalized.extend(_mmmu_normalize(item))
    return list(dict.fromkeys(normalized))


def mmmu_open_correct(parsed: Sequence, answer: str | Sequence[str]) -> float:
    """MMMU ``eval_open``: a normalised answer string inside a parsed string, or an equal number."""
    golds: list = []
    for a in [answer] if isinstance(answer, str) else answer:
        golds.extend(_mmmu_normalize(a))
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return 1.0
        elif pred in golds:
            return 1.0
    return 0.0


def mmmu_choice_correct(letter: str, answer: str | Sequence[str]) -> float:
    """MMMU ``eval_multi_choice``: the parsed letter equals the answer (or one of a list)."""
    return float(letter in answer) if not isinstance(answer, str) else float(letter == answer)
