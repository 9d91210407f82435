"""Answer extraction, answer comparison and GRPO reward functions for GSM8K-style math.

The model is asked to answer as ``<reasoning>...</reasoning><answer>...</answer>``.

Numbers are canonicalised through exact rationals (``fractions.Fraction``):
integers print without decimals (``"18"``), terminating decimals print with trailing zeros
stripped (``"2.5"``), and fractions are evaluated (``"3/4"`` -> ``"0.75"``, ``"6/3"`` -> ``"2"``);
only non-terminating fractions stay as a reduced ``"p/q"`` (``"2/6"`` -> ``"1/3"``). So two
canonical strings are equal exactly when the values are equal.

Reward functions follow the Tunix signature ``fn(prompts, completions, **kwargs) -> list[float]``;
dataset columns (``answer``) arrive as keyword arguments aligned with ``completions``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_REWARD_FNS",
    "answers_match",
    "check_answer",
    "check_numbers",
    "correct",
    "extract_answer",
    "extract_last_number",
    "format_completion",
    "match_format_approximately",
    "match_format_exactly",
    "normalize_number",
]

REASONING_START, REASONING_END = "<reasoning>", "</reasoning>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
_TAGS = (REASONING_START, REASONING_END, ANSWER_START, ANSWER_END)

# Reward values (public so training configs and logs can refer to them).
FORMAT_EXACT_REWARD = 3.0
FORMAT_TAG_REWARD = 0.5
ANSWER_EXACT_REWARD = 3.0
ANSWER_CLOSE_REWARD = 1.5
ANSWER_CLOSE_RATIO = 0.1
ANSWER_WRONG_REWARD = -1.0
NUMBER_MATCH_REWARD = 1.5

# Relative tolerance that only absorbs float rounding (0.1 + 0.2, 1/3 vs 0.333333).
_REL_TOL = Fraction(1, 10**6)
# Longer number tokens are not answers; also keeps int() below Python's digit limit.
_MAX_DIGITS = 60
# math_verify runs sympy; bound input size and wall time so a reward never stalls training.
_MV_MAX_CHARS = 200
_MV_TIMEOUT_S = 2

# A number: optional sign (not glued to a preceding word/number, so "5-3" is 5 and 3),
# optional currency sign, digits with optional thousands commas and decimals, and an
# optional "/denominator". The lookbehind keeps us from starting inside a word or number.
_NUMBER_RE = re.compile(
    r"(?:(?<![\w.)\]}])(?P<sign>[-+]))?\$?"
    r"(?<![\w.])(?P<num>\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_THIN_SEP_RE = re.compile(r"(?<=\d)(?:\\,|\{,\}|\\!|\\ )(?=\d{3})")
_LEADING_SIGN_RE = re.compile(r"^\s*([-+])\s+(?=\$?\s*[\d.])")
# Strings whose meaning plain number scanning can miss (powers, roots, latex, products...).
_SYMBOLIC_RE = re.compile(r"\\|\^|sqrt|pi|\*|[a-zA-Z]\s*\(")

_ANSWER_START_RE = re.compile(re.escape(ANSWER_START), re.IGNORECASE)
_ANSWER_END_RE = re.compile(re.escape(ANSWER_END), re.IGNORECASE)
# Rollout engines sometimes keep the end-of-turn marker; it does not break the format.
_END_MARKERS = r"(?:<\|[^|<>\s]{1,30}\|>|<eos>|</s>|<end_of_turn>|\s)*"
_EXACT_FORMAT_RE = re.compile(
    rf"^\s*{REASONING_START}(?P<reasoning>.*?){REASONING_END}\s*"
    rf"{ANSWER_START}(?P<answer>.*?){ANSWER_END}{_END_MARKERS}$",
    re.DOTALL,
)


# --------------------------------------------------------------------------- numbers


def _preprocess(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\\$", "$").replace("\\%", "%")
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = _LATEX_THIN_SEP_RE.sub(",", text)
    return _LEADING_SIGN_RE.sub(r"\1", text)


def _to_fraction(num: str) -> Fraction | None:
    num = num.replace(",", "")
    if len(num) > _MAX_DIGITS:
        return None
    return Fraction(num)


def _numbers(text: str) -> list[Fraction]:
    """All numbers in ``text``, in order, as exact rationals."""
    values: list[Fraction] = []
    for m in _NUMBER_RE.finditer(_preprocess(text)):
        value = _to_fraction(m["num"])
        if value is None:
            continue
        if m["den"] is not None:
            den = _to_fraction(m["den"])
            # "3/0" is not a number; keep the numerator rather than dropping the token.
            if den:
                value /= den
        if m["sign"] == "-":
            value = -value
        values.append(value)
    return values


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:  # non-terminating decimal: the reduced fraction is the exact form
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    whole, frac = divmod(scaled, 10**places)
    sign = "-" if value < 0 else ""
    return f"{sign}{whole}.{str(frac).rjust(places, '0').rstrip('0')}"


def extract_last_number(text: str | None) -> str | None:
    """Lenient extraction: the last number anywhere in ``text``, canonicalised, or None."""
    if not text:
        return None
    values = _numbers(text)
    return _canonical(values[-1]) if values else None


def normalize_number(s: str | None) -> str | None:
    """Canonical form of the number written in ``s`` (the last one if there are several).

    Handles ``1,000``, ``$18.00 per day``, ``50%``, ``-3``, ``+ 4``, ``2.50``, ``\\frac{3}{4}``.
    Returns None when ``s`` holds no number.
    """
    return extract_last_number(s)


def _close(a: Fraction, b: Fraction) -> bool:
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1:
        return False  # integers must match exactly; tolerance is only for rounding noise
    return abs(a - b) <= _REL_TOL * max(1, abs(a), abs(b))


# ----------------------------------------------------------------------- math_verify


def _math_verify_call(pred: str, gold: str, timeout: int | None) -> bool:
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    def parse_any(text: str) -> list[Any]:
        # Bare latex such as "\\sqrt{4}" or "2 \\times 3" is only read whole inside math
        # delimiters; outside them math_verify picks a fragment ("3") or nothing.
        if "\\" in text and "$" not in text:
            parsed = parse(f"${text}$", parsing_timeout=timeout)
            if parsed:
                return parsed
        return parse(text, parsing_timeout=timeout)

    try:
        gold_parsed = parse_any(gold)
        pred_parsed = parse_any(pred)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException):
        logger.debug("math_verify failed on %r vs %r", pred, gold, exc_info=True)
        return False


@lru_cache(maxsize=8192)
def _math_verify_equal(pred: str, gold: str) -> bool:
    """math_verify equivalence, bounded in time whichever thread calls it."""
    if len(pred) > _MV_MAX_CHARS or len(gold) > _MV_MAX_CHARS:
        return False
    if threading.current_thread() is threading.main_thread():
        # math_verify's own timeout uses SIGALRM, which only works in the main thread.
        return _math_verify_call(pred, gold, _MV_TIMEOUT_S)
    # Elsewhere signals are unavailable: run without its timeout in a daemon thread and stop
    # waiting after the deadline (a stuck sympy call is abandoned, not joined).
    result: list[bool] = []
    worker = threading.Thread(
        target=lambda: result.append(_math_verify_call(pred, gold, None)),
        name="math-verify",
        daemon=True,
    )
    worker.start()
    worker.join(_MV_TIMEOUT_S)
    if worker.is_alive():
        logger.warning("math_verify timed out comparing %r with %r", pred[:50], gold[:50])
        return False
    return bool(result and result[0])


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True if ``pred`` and ``gold`` denote the same number.

    Compares the last number in each (exact rationals, tiny tolerance for float rounding);
    falls back to math_verify only when the plain comparison is not conclusive (latex,
    expressions, several numbers, or no number found).
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold:
        return False
    pred_nums, gold_nums = _numbers(pred), _numbers(gold)
    if pred_nums and gold_nums:
        if _close(pred_nums[-1], gold_nums[-1]):
            return True
        simple = len(pred_nums) == 1 and len(gold_nums) == 1
        if simple and not _SYMBOLIC_RE.search(pred) and not _SYMBOLIC_RE.search(gold):
            return False  # two plain, different numbers: nothing left to check
    return _math_verify_equal(pred, gold)


# --------------------------------------------------------------------------- answers


def _answer_tag_content(text: str) -> str | None:
    """Content of the last ``<answer>`` tag (up to ``</answer>`` or end of text), or None."""
    starts = list(_ANSWER_START_RE.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    end = _ANSWER_END_RE.search(text, begin)
    return text[begin : end.start() if end else len(text)]


def extract_answer(text: str | None) -> str | None:
    """Normalized final answer of a completion or of a GSM8K gold answer.

    Uses the last ``<answer>...</answer>`` (a missing closing tag is tolerated), else the
    text after the final ``####``. Returns None if neither is present or holds no number.
    """
    if not text:
        return None
    content = _answer_tag_content(text)
    if content is not None:
        return normalize_number(content)
    if "####" in text:
        return normalize_number(text.rsplit("####", 1)[1])
    return None


def _gold_text(gold: Any) -> str | None:
    """The gold answer as text: the part after ``####`` for a full GSM8K answer."""
    if gold is None:
        return None
    if isinstance(gold, bytes):
        gold = gold.decode("utf-8", errors="replace")
    gold = str(gold)
    return gold.rsplit("####", 1)[1].strip() if "####" in gold else gold.strip()


def format_completion(reasoning: str, answer: str) -> str:
    """Render the target response format (SFT targets, tests, prompt examples)."""
    return (
        f"{REASONING_START}{reasoning.strip()}{REASONING_END}\n"
        f"{ANSWER_START}{str(answer).strip()}{ANSWER_END}"
    )


def correct(completion: str, gold: str, strict: bool = True) -> bool:
    """Evaluation accuracy: strict reads the answer tag, lenient the last number."""
    gold_text = _gold_text(gold)
    if strict:
        return answers_match(_answer_tag_content(completion or ""), gold_text)
    return answers_match(extract_last_number(completion), gold_text)


# --------------------------------------------------------------------------- rewards


def _aligned(name: str, completions: Sequence[str], answer: Any) -> list[Any]:
    if answer is None:
        raise ValueError(f"{name} needs the dataset column 'answer' passed as a keyword argument")
    answers = list(answer)
    if len(answers) != len(completions):
        raise ValueError(
            f"{name}: got {len(answers)} answers for {len(completions)} completions; "
            "repeat the answer column per generation"
        )
    return answers


def match_format_exactly(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """3.0 when the completion is exactly reasoning then answer (whitespace allowed), else 0."""
    scores = []
    for completion in completions:
        m = _EXACT_FORMAT_RE.match(completion)
        ok = (
            m is not None
            and all(completion.count(tag) == 1 for tag in _TAGS)
            and bool(m["reasoning"].strip())
            and bool(m["answer"].strip())
        )
        scores.append(FORMAT_EXACT_REWARD if ok else 0.0)
    return scores


def match_format_approximately(
    prompts: list[str], completions: list[str], **kwargs: Any
) -> list[float]:
    """Partial format credit in [-2, 2]: +0.5 per tag seen exactly once, -0.5 otherwise."""
    return [
        sum(FORMAT_TAG_REWARD if c.count(tag) == 1 else -FORMAT_TAG_REWARD for tag in _TAGS)
        for c in completions
    ]


def _answer_score(completion: str, gold: Any) -> float:
    content = _answer_tag_content(completion)
    gold_text = _gold_text(gold)
    if content is None or not gold_text:
        return 0.0
    if answers_match(content, gold_text):
        return ANSWER_EXACT_REWARD
    pred_nums, gold_nums = _numbers(content), _numbers(gold_text)
    if pred_nums and gold_nums and gold_nums[-1] != 0:
        ratio = pred_nums[-1] / gold_nums[-1]
        if abs(ratio - 1) <= ANSWER_CLOSE_RATIO:
            return ANSWER_CLOSE_REWARD
    return ANSWER_WRONG_REWARD


def check_answer(
    prompts: list[str], completions: list[str], answer: Sequence[str] | None = None, **kwargs: Any
) -> list[float]:
    """Correctness of the answer tag against ``answer`` (``#### N`` text or a bare number).

    3.0 equal, 1.5 within 10% of the gold, -1.0 wrong, 0.0 when there is no answer tag.
    """
    answers = _aligned("check_answer", completions, answer)
    return [_answer_score(c, g) for c, g in zip(completions, answers, strict=True)]


def check_numbers(
    prompts: list[str], completions: list[str], answer: Sequence[str] | None = None, **kwargs: Any
) -> list[float]:
    """Lenient correctness: 1.5 if the last number in the completion equals the gold, else 0."""
    answers = _aligned("check_numbers", completions, answer)
    return [
        NUMBER_MATCH_REWARD if correct(c, g, strict=False) else 0.0
        for c, g in zip(completions, answers, strict=True)
    ]


DEFAULT_REWARD_FNS: list[Callable[..., list[float]]] = [
    match_format_exactly,
    match_format_approximately,
    check_answer,
    check_numbers,
]
