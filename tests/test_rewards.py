"""Reward functions and answer parsing, including every gold solution of the GSM8K sample."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import GSM8K_DIR

from tunix_sglang.rewards import (
    DEFAULT_REWARD_FNS,
    answers_match,
    check_answer,
    check_numbers,
    correct,
    extract_answer,
    extract_last_number,
    format_completion,
    match_format_approximately,
    match_format_exactly,
    normalize_number,
)

# Every gold solution of the repository's GSM8K sample (train and test files).
GSM8K_ROWS = [json.loads(line) for f in ("train.jsonl", "test.jsonl")
              for line in (GSM8K_DIR / f).read_text().splitlines() if line.strip()]


def _answer(text: str) -> str:
    return format_completion("Some reasoning with 1 and 2.", text)


# ----------------------------------------------------------------------- real data


def test_every_gsm8k_gold_solution_gets_full_reward(monkeypatch) -> None:
    from tunix_sglang import rewards

    def no_fallback(pred, gold):
        raise AssertionError(f"math_verify fallback on {pred!r} vs {gold!r}")

    # Plain numeric comparison must decide all of these without falling back to math_verify.
    monkeypatch.setattr(rewards, "_math_verify_equal", no_fallback)
    rows = GSM8K_ROWS
    assert len(rows) == 128
    completions, golds = [], []
    for row in rows:
        assert extract_answer(row["answer"]) is not None, row["answer"]
        solution, final = row["answer"].rsplit("####", 1)
        completions.append(format_completion(reasoning=solution, answer=final))
        golds.append(row["answer"])

    prompts = [""] * len(rows)
    exact = check_answer(prompts, completions, answer=golds)
    fmt = match_format_exactly(prompts, completions)
    approx = match_format_approximately(prompts, completions)
    lenient = check_numbers(prompts, completions, answer=golds)

    bad = [i for i, (a, f) in enumerate(zip(exact, fmt, strict=True)) if a != 3.0 or f != 3.0]
    assert not bad, [(completions[i][-80:], golds[i][-20:]) for i in bad[:5]]
    assert set(approx) == {2.0}
    assert set(lenient) == {1.5}


def test_gsm8k_gold_with_commas_matches_plain_number() -> None:
    with_commas = [r["answer"] for r in GSM8K_ROWS if "," in r["answer"].rsplit("####", 1)[1]]
    assert len(with_commas) == 8
    for gold in with_commas:
        plain = gold.rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_answer(gold) == plain
        assert check_answer([""], [_answer(plain)], answer=[gold]) == [3.0]


# ------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18", "18"),
        ("1,000", "1000"),
        ("1,234,567", "1234567"),
        ("$18", "18"),
        ("$18.00 per day", "18"),
        ("18 dollars", "18"),
        ("50%", "50"),
        ("18.0", "18"),
        ("2.50", "2.5"),
        ("0.125", "0.125"),
        (".5", "0.5"),
        ("-3", "-3"),
        ("-$4.50", "-4.5"),
        ("$-4.50", "-4.5"),
        ("\u22127", "-7"),
        ("- 5", "-5"),
        ("+4", "4"),
        ("  42  ", "42"),
        ("-0.0", "0"),
        ("007", "7"),
        ("3/4", "0.75"),
        ("6/3", "2"),
        ("2/6", "1/3"),
        ("\\frac{3}{4}", "0.75"),
        ("\\boxed{72}", "72"),
        ("\\$1{,}250", "1250"),
        ("1\\,000", "1000"),
        ("He pays 5 + 3 = 8 dollars in total", "8"),
        ("5-3", "3"),
        ("1,000, 2", "2"),
        ("no number here", None),
        ("", None),
    ],
)
def test_normalize_number(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


def test_extract_last_number() -> None:
    assert extract_last_number("First 3 apples, then 1,200 pears.") == "1200"
    assert extract_last_number("<answer>72</answer>") == "72"
    assert extract_last_number("nothing") is None
    assert extract_last_number(None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<reasoning>r</reasoning><answer>72</answer>", "72"),
        ("<reasoning>r</reasoning><answer> $1,080.00 </answer>", "1080"),
        ("<answer>1</answer> wait <answer>2</answer>", "2"),  # the last tag wins
        ("<reasoning>r</reasoning><answer>72", "72"),  # missing closing tag at the end
        ("<ANSWER>9</ANSWER>", "9"),
        ("<answer>many</answer>", None),
        ("The answer is 72", None),  # no tag: strict extraction finds nothing
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("some work\n#### 1,080", "1080"),
        ("#### -5", "-5"),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("18", "18"),
        ("$18.00", "18"),
        ("1,000", "1000"),
        ("18 dollars", "18"),
        ("0.30000000000000004", "0.3"),
        ("0.333333", "1/3"),
        ("3/4", "0.75"),
        ("\\frac{1}{2}", "0.5"),
        ("\\sqrt{4}", "2"),  # needs math_verify
        ("2 \\times 3", "6"),  # needs math_verify
        ("-7", "-7.0"),
    ],
)
def test_answers_match(pred: str, gold: str) -> None:
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("17", "18"),
        ("-18", "18"),
        ("1000001", "1000000"),
        ("0.33", "1/3"),
        ("\\sqrt{5}", "2"),
        ("banana", "2"),
        (None, "2"),
        ("2", None),
        ("", "2"),
    ],
)
def test_answers_do_not_match(pred: str | None, gold: str | None) -> None:
    assert not answers_match(pred, gold)


def test_answers_match_outside_main_thread() -> None:
    """math_verify's signal-based timeout cannot run in worker threads; we must still work."""
    results: dict[str, bool] = {}

    def work() -> None:
        results["sqrt"] = answers_match("\\sqrt{9}", "3")
        results["frac"] = answers_match("\\dfrac{10}{4}", "2.5")
        results["wrong"] = answers_match("\\sqrt{10}", "3")

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    assert results == {"sqrt": True, "frac": True, "wrong": False}


def test_answers_match_survives_garbage() -> None:
    assert not answers_match("\\frac{{{" * 50, "3")
    assert not answers_match("1" * 5000, "3")  # beyond Python's int-parsing digit limit
    assert not answers_match("x" * 10_000, "3")


# ------------------------------------------------------------------------ rewards


def test_format_completion_round_trip() -> None:
    text = format_completion("  2 + 2 = 4  ", " 4 ")
    assert text == "<reasoning>2 + 2 = 4</reasoning>\n<answer>4</answer>"
    assert extract_answer(text) == "4"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<reasoning>r</reasoning><answer>1</answer>", 3.0),
        ("\n <reasoning>\nr\n</reasoning>\n\n<answer>\n1\n</answer>\n", 3.0),
        ("<reasoning>r</reasoning><answer>1</answer><|im_end|>", 3.0),
        ("Sure! <reasoning>r</reasoning><answer>1</answer>", 0.0),
        ("<reasoning>r</reasoning><answer>1</answer> and more text", 0.0),
        ("<reasoning>r</reasoning><answer>1</answer><answer>2</answer>", 0.0),
        ("<reasoning>r</reasoning><reasoning>s</reasoning><answer>1</answer>", 0.0),
        ("<answer>1</answer><reasoning>r</reasoning>", 0.0),
        ("<reasoning>r</reasoning><answer>1", 0.0),
        ("<reasoning>r</reasoning><answer> </answer>", 0.0),
        ("<reasoning></reasoning><answer>1</answer>", 0.0),
        ("1", 0.0),
    ],
)
def test_match_format_exactly(completion: str, expected: float) -> None:
    assert match_format_exactly([""], [completion]) == [expected]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<reasoning>r</reasoning><answer>1</answer>", 2.0),
        ("<reasoning>r</reasoning><answer>1", 1.0),
        ("<answer>1</answer>", 0.0),
        ("no tags at all", -2.0),
        ("<reasoning>r</reasoning><answer>1</answer><answer>2</answer>", 0.0),
    ],
)
def test_match_format_approximately(completion: str, expected: float) -> None:
    assert match_format_approximately([""], [completion]) == [expected]


@pytest.mark.parametrize(
    ("answer_text", "gold", "expected"),
    [
        ("72", "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", 3.0),
        ("72", "72", 3.0),
        ("$72.00", "72", 3.0),
        ("72 clips", "#### 72", 3.0),
        ("1,080", "1080", 3.0),
        ("-5", "#### -5", 3.0),
        ("75", "72", 1.5),  # within 10%
        ("68", "72", 1.5),
        ("80", "72", -1.0),
        ("-72", "72", -1.0),
        ("5", "0", -1.0),
        ("I don't know", "72", -1.0),
    ],
)
def test_check_answer(answer_text: str, gold: str, expected: float) -> None:
    assert check_answer([""], [_answer(answer_text)], answer=[gold]) == [expected]


def test_check_answer_without_answer_tag_is_zero() -> None:
    completions = ["<reasoning>48 + 24 = 72</reasoning>", "The answer is 72."]
    assert check_answer(["", ""], completions, answer=["72", "72"]) == [0.0, 0.0]


def test_check_answer_uses_last_answer_tag() -> None:
    completion = "<reasoning>r</reasoning><answer>5</answer><answer>72</answer>"
    assert check_answer([""], [completion], answer=["72"]) == [3.0]


def test_check_answer_accepts_extra_kwargs_and_array_like_answers() -> None:
    np = pytest.importorskip("numpy")
    completions = [_answer("72"), _answer("71")]
    scores = check_answer(
        ["p", "p"], completions, answer=np.array(["72", "72"]), question=["q", "q"], mode="train"
    )
    assert scores == [3.0, 1.5]


def test_check_answer_requires_aligned_answers() -> None:
    with pytest.raises(ValueError, match="answer"):
        check_answer([""], [_answer("1")])
    with pytest.raises(ValueError, match="2 answers for 1 completions"):
        check_answer([""], [_answer("1")], answer=["1", "2"])


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("so she has 48 + 24 = 72 clips", "#### 72", 1.5),
        ("<reasoning>r</reasoning><answer>72</answer>", "72", 1.5),
        ("<answer>$1,080</answer>", "1080", 1.5),
        ("72 clips, wait, no: 70", "72", 0.0),
        ("no numbers", "72", 0.0),
    ],
)
def test_check_numbers(completion: str, gold: str, expected: float) -> None:
    assert check_numbers([""], [completion], answer=[gold]) == [expected]


def test_correct_strict_and_lenient() -> None:
    tagged = _answer("72")
    untagged = "48 + 24 = 72"
    assert correct(tagged, "#### 72")
    assert correct(tagged, "72", strict=False)
    assert not correct(untagged, "72")
    assert correct(untagged, "72", strict=False)
    assert not correct(_answer("71"), "72")
    assert not correct("", "72", strict=False)


def test_default_reward_fns() -> None:
    assert DEFAULT_REWARD_FNS == [
        match_format_exactly,
        match_format_approximately,
        check_answer,
        check_numbers,
    ]
    completion = _answer("72")
    total = sum(fn([""], [completion], answer=["#### 72"])[0] for fn in DEFAULT_REWARD_FNS)
    assert total == 3.0 + 2.0 + 3.0 + 1.5
