"""Data loading (local files, HF layout, offline hub), synthetic problems and prompt rendering."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import GSM8K_DIR, GSM8K_TRAIN
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tunix_sglang.data import (
    SYSTEM_PROMPT,
    Problem,
    load_gsm8k,
    prompt_messages,
    render_prompt,
    sft_completion,
    synthetic_problems,
    synthetic_split,
    to_dataset_rows,
)
from tunix_sglang.errors import UserError
from tunix_sglang.rewards import check_answer, extract_answer, match_format_exactly

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Like Gemma's template: no system role.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _real_rows(n: int) -> list[dict[str, str]]:
    with GSM8K_TRAIN.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "apples"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# ------------------------------------------------------------------------ loading


def test_load_real_jsonl() -> None:
    problems = load_gsm8k(str(GSM8K_TRAIN))
    assert len(problems) == sum(1 for line in GSM8K_TRAIN.open() if line.strip())
    first = problems[0]
    assert first.question.startswith("Natalia sold clips")
    assert first.gold == "72"
    assert all(p.gold is not None for p in problems)
    assert len(load_gsm8k(str(GSM8K_TRAIN), limit=5)) == 5


def test_load_directory_with_split_jsonl() -> None:
    problems = load_gsm8k(str(GSM8K_TRAIN.parent), split="train", limit=3)
    assert [p.question for p in problems] == [r["question"] for r in _real_rows(3)]


def test_load_parquet(tmp_path: Path) -> None:
    rows = _real_rows(7)
    path = _write_parquet(tmp_path / "gsm8k.parquet", rows)
    problems = load_gsm8k(str(path))
    assert [(p.question, p.answer) for p in problems] == [
        (r["question"], r["answer"]) for r in rows
    ]
    assert len(load_gsm8k(str(path), limit=2)) == 2


def test_load_hf_layout_directory(tmp_path: Path) -> None:
    rows = _real_rows(6)
    _write_parquet(tmp_path / "main" / "train-00000-of-00002.parquet", rows[:4])
    _write_parquet(tmp_path / "main" / "train-00001-of-00002.parquet", rows[4:])
    _write_parquet(tmp_path / "main" / "test-00000-of-00001.parquet", rows[:1])
    train = load_gsm8k(str(tmp_path), split="train")
    assert [p.question for p in train] == [r["question"] for r in rows]
    assert len(load_gsm8k(str(tmp_path), split="train", limit=5)) == 5
    assert len(load_gsm8k(str(tmp_path / "main"), split="test")) == 1


def test_load_json_list_and_extra_columns(tmp_path: Path) -> None:
    rows = [{**r, "id": i} for i, r in enumerate(_real_rows(3))]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    assert [p.gold for p in load_gsm8k(str(path))] == [extract_answer(r["answer"]) for r in rows]


def test_missing_file_is_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match=r"does not exist.*--data-path"):
        load_gsm8k(str(missing))


def test_directory_without_split_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no 'validation' data"):
        load_gsm8k(str(tmp_path), split="validation")


def test_missing_columns_jsonl(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "solution": "#### 1"}])
    with pytest.raises(UserError, match=r"bad\.jsonl row 0 lacks field\(s\) answer"):
        load_gsm8k(str(path))


def test_missing_columns_parquet(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "bad.parquet", [{"problem": "q", "answer": "#### 1"}])
    with pytest.raises(UserError, match=r"bad\.parquet lacks column\(s\) question"):
        load_gsm8k(str(path))


def test_answer_without_hashes_is_user_error(tmp_path: Path) -> None:
    rows = [{"question": "q1", "answer": "x\n#### 1"}, {"question": "q2", "answer": "it is 2"}]
    path = _write_jsonl(tmp_path / "nohash.jsonl", rows)
    with pytest.raises(UserError, match=r"nohash\.jsonl row 1: answer does not end with '####"):
        load_gsm8k(str(path))


def test_invalid_json_and_unsupported_suffix(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(UserError, match=r"broken\.jsonl:2 is not a JSON object"):
        load_gsm8k(str(broken))
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(UserError, match=r"unsupported data file .*data\.csv"):
        load_gsm8k(str(csv))
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(UserError, match=r"cannot read parquet file .*fake\.parquet"):
        load_gsm8k(str(not_parquet))


def test_empty_file_and_bad_limit(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no problems found"):
        load_gsm8k(str(empty))
    with pytest.raises(UserError, match="limit must be >= 0"):
        load_gsm8k(str(empty), limit=-1)


@pytest.mark.parametrize("path", [None, "openai/gsm8k"])
def test_hub_offline_is_user_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, path: str | None
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy can satisfy the load
    monkeypatch.chdir(tmp_path)  # so "openai/gsm8k" cannot resolve to a local folder
    # The env vars are read at import time; patch modules another test may have imported.
    for module_name, attr in [
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ]:
        if module_name in sys.modules:
            monkeypatch.setattr(sys.modules[module_name], attr, True)
    with pytest.raises(UserError, match=r"could not download dataset openai/gsm8k.*--data-path"):
        load_gsm8k(path, split="train")


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        load_gsm8k(str(tmp_path / "missing.parquet"))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- synthetic

_RECOMPUTE = [
    (r"has (\d+) \w+ and buys (\d+) more\.", lambda a, b: a + b),
    (r"had (\d+) \w+ and gave (\d+) of them", lambda a, b: a - b),
    (r"buys (\d+) bags of \w+\. Each bag has (\d+)", lambda a, b: a * b),
    (r"shares (\d+) \w+ equally among (\d+) friends", lambda a, b: a // b),
    (r"buys (\d+) \w+ that cost \$(\d+) each", lambda a, b: a * b),
    (r"has (\d+) \w+\. \w+ buys (\d+) more and then gives (\d+)", lambda a, b, c: a + b - c),
]


def _recompute(question: str) -> int:
    """Solve a synthetic question from its text alone, independently of the generator."""
    for pattern, solve in _RECOMPUTE:
        m = re.search(pattern, question)
        if m:
            return solve(*map(int, m.groups()))
    raise AssertionError(f"unrecognised synthetic question: {question}")


def test_synthetic_problems_are_correct() -> None:
    problems = synthetic_problems(300, seed=0)
    assert len(problems) == 300
    assert len({p.question for p in problems}) == 300
    kinds = set()
    for p in problems:
        assert p.answer.rstrip().splitlines()[-1].startswith("#### ")
        expected = _recompute(p.question)
        assert p.gold == str(expected), p
        assert 0 < expected < 100
        if "shares" in p.question:
            a, b = map(int, re.findall(r"\d+", p.question)[:2])
            assert a % b == 0
        kinds.add(next(i for i, (pat, _) in enumerate(_RECOMPUTE) if re.search(pat, p.question)))
    assert kinds == set(range(len(_RECOMPUTE)))  # every template is used


def test_synthetic_problems_deterministic_per_seed() -> None:
    assert synthetic_problems(50, seed=3) == synthetic_problems(50, seed=3)
    assert synthetic_problems(50, seed=3) != synthetic_problems(50, seed=4)
    assert synthetic_problems(20, seed=3) == synthetic_problems(50, seed=3)[:20]
    assert synthetic_problems(0, seed=1) == []


def test_synthetic_split_disjoint() -> None:
    train, test = synthetic_split(400, 100, seed=7)
    assert (len(train), len(test)) == (400, 100)
    assert not {p.question for p in train} & {p.question for p in test}
    assert synthetic_split(400, 100, seed=7) == (train, test)


def test_synthetic_bad_sizes() -> None:
    with pytest.raises(UserError):
        synthetic_problems(-1, seed=0)
    with pytest.raises(UserError):
        synthetic_split(-1, 5, seed=0)


def test_sft_completion_gets_full_reward() -> None:
    for p in synthetic_problems(20, seed=1):
        completion = sft_completion(p)
        assert match_format_exactly([""], [completion]) == [3.0]
        assert check_answer([""], [completion], answer=[p.answer]) == [3.0]
    gsm_style = Problem("q", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 24")
    assert "<<" not in sft_completion(gsm_style)


def test_problem_gold_requires_hashes() -> None:
    assert Problem("q", "so 1,080 in total\n#### 1,080").gold == "1080"
    with pytest.raises(UserError, match="####"):
        _ = Problem("q", "no final line").gold


# ------------------------------------------------------------------------ prompts


def test_prompt_messages() -> None:
    messages = prompt_messages("  How many apples?  ")
    assert messages == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "How many apples?"},
    ]
    for tag in ("<reasoning>", "</reasoning>", "<answer>", "</answer>"):
        assert tag in SYSTEM_PROMPT


def test_render_prompt_chatml(chatml_tokenizer: PreTrainedTokenizerFast) -> None:
    text = render_prompt("How many apples?", chatml_tokenizer)
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nHow many apples?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = chatml_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chatml_tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


def test_render_prompt_without_system_role(chatml_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer = chatml_tokenizer.__class__(tokenizer_object=chatml_tokenizer.backend_tokenizer)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    text = render_prompt("How many apples?", tokenizer)
    assert text.startswith(f"<start_of_turn>user\n{SYSTEM_PROMPT}\n\nHow many apples?")
    assert text.endswith("<start_of_turn>model\n")


def test_render_prompt_needs_chat_template(chatml_tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer = chatml_tokenizer.__class__(tokenizer_object=chatml_tokenizer.backend_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render_prompt("q", tokenizer)


def test_to_dataset_rows(chatml_tokenizer: PreTrainedTokenizerFast) -> None:
    problems = synthetic_problems(3, seed=2)
    rows = to_dataset_rows(problems, chatml_tokenizer)
    assert [set(r) for r in rows] == [{"prompts", "question", "answer"}] * 3
    for row, p in zip(rows, problems, strict=True):
        assert row["question"] == p.question
        assert row["answer"] == p.gold == str(_recompute(p.question))
        assert row["prompts"] == render_prompt(p.question, chatml_tokenizer)
        assert row["prompts"].endswith("<|im_start|>assistant\n")


def test_fit_prompts_counts_what_it_skips(tmp_path):
    from tunix_sglang.data import fit_prompts
    from tunix_sglang.tiny_model import ensure_tiny_model

    tok = AutoTokenizer.from_pretrained(ensure_tiny_model(cache_dir=tmp_path))
    rows = [{"prompts": "7 + 5 = ?"}, {"prompts": "Tom has 3 apples. " * 40},
            {"prompts": "2 * 3"}]
    lines: list[str] = []
    kept = fit_prompts(rows, tok, 32, "training", lines.append)
    assert kept == [rows[0], rows[2]]
    longest = len(tok.encode(rows[1]["prompts"]))
    assert lines == [f"skipped 1 of 3 training prompts longer than --max-prompt-length 32 "
                     f"tokens (longest: {longest}); raise --max-prompt-length to keep them"]
    assert fit_prompts(rows[:1], tok, 32, "training", lines.append) == rows[:1]
    assert len(lines) == 1  # nothing skipped, nothing said
    with pytest.raises(UserError, match="every held-out prompt is longer than "
                       "--max-prompt-length 2 tokens .*raise --max-prompt-length"):
        fit_prompts(rows, tok, 2, "held-out", lines.append)


# ------------------------------------------------------------------ the run's splits


def test_heldout_split_is_disjoint_from_training_problems():
    from tunix_sglang.data import heldout_problems, train_problems

    train = train_problems("synthetic", None, seed=0)
    held = heldout_problems("synthetic", None, seed=0, limit=50)
    assert len(train) == 2000 and len(held) == 50
    assert not {p.question for p in held} & {p.question for p in train}
    # GSM8K in its Hugging Face layout: the train and test files of the directory.
    gsm_train = train_problems("gsm8k", str(GSM8K_DIR), seed=0)
    gsm_test = heldout_problems("gsm8k", str(GSM8K_DIR), seed=0)
    assert (len(gsm_train), len(gsm_test)) == (64, 64)
    assert not {p.question for p in gsm_test} & {p.question for p in gsm_train}
    assert heldout_problems("gsm8k", str(GSM8K_DIR), seed=0, limit=3) == gsm_test[:3]
    with pytest.raises(UserError, match="--limit"):
        heldout_problems("synthetic", None, seed=0, limit=0)


def test_batches_depend_only_on_seed_and_step():
    from tunix_sglang.data import Batches

    rows = [{"prompts": f"p{i}", "answer": str(i)} for i in range(10)]
    b = Batches(rows, batch_size=4, seed=3)
    first = [b.batch(s) for s in (1, 2, 3, 4, 5)]
    # A resumed run (a new Batches) sees the same batch at the same step.
    assert [Batches(rows, 4, 3).batch(s)["answer"].tolist() for s in (4, 2)] == [
        first[3]["answer"].tolist(), first[1]["answer"].tolist()]
    assert first[0]["prompts"].dtype.kind == "U"  # numpy strings: Tunix splits lists per char
    # Each epoch (10 rows) shows every row once; another seed another order.
    epoch = [a for x in first for a in x["answer"].tolist()][:10]
    assert sorted(epoch, key=int) == [str(i) for i in range(10)]
    assert Batches(rows, 4, 4).batch(1)["answer"].tolist() != first[0]["answer"].tolist()
