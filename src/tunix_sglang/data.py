"""GSM8K-style problems: loading (local files or the HF hub), synthetic problems, the run's
train and held-out splits, prompts that fit the rollout, and the batches of each step."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunix_sglang.errors import UserError
from tunix_sglang.rewards import format_completion, normalize_number

__all__ = [
    "HUB_DATASET",
    "SYNTHETIC_SPLIT",
    "SYSTEM_PROMPT",
    "Batches",
    "Problem",
    "fit_prompts",
    "heldout_problems",
    "load_gsm8k",
    "prompt_rows",
    "prompt_messages",
    "render_prompt",
    "sft_completion",
    "synthetic_problems",
    "synthetic_split",
    "to_dataset_rows",
    "train_problems",
    "worked_solution",
]

HUB_DATASET = "openai/gsm8k"
# The synthetic data of every run (and of the embedded model's warm start): 2,000 training
# problems and 200 held out, disjoint, for the run's seed.
SYNTHETIC_SPLIT = dict(n_train=2000, n_test=200)

SYSTEM_PROMPT = (
    "You are given a math word problem. Think about it step by step and write your reasoning "
    "between <reasoning> and </reasoning>. Then write only the final numeric answer, without "
    "units, between <answer> and </answer>. Use exactly this format:\n"
    + format_completion("...", "...")
)

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COLUMNS = ("question", "answer")


@dataclass(frozen=True)
class Problem:
    """One math word problem; ``answer`` is the full GSM8K solution ending in ``#### N``."""

    question: str
    answer: str

    @property
    def gold(self) -> str:
        """The normalized final number of ``answer``."""
        gold = _final_number(self.answer)
        if gold is None:
            raise UserError(
                f"answer {self.answer[-40:]!r} has no '#### <number>' line; "
                "GSM8K answers must end with '#### N'"
            )
        return gold


def _final_number(answer: str) -> str | None:
    # Only the '####' line counts: the solution text may itself mention other numbers.
    return normalize_number(answer.rsplit("####", 1)[1]) if "####" in answer else None


def worked_solution(problem: Problem) -> str:
    """The solution's reasoning, without the '#### N' line."""
    reasoning = problem.answer.rsplit("####", 1)[0]
    # GSM8K's "<<48/2=24>>" calculator annotations are not something the model should emit.
    return _CALCULATOR_RE.sub("", reasoning).strip()


def sft_completion(problem: Problem) -> str:
    """Target response for supervised warm-up: the worked solution in the answer format."""
    return format_completion(worked_solution(problem), problem.gold)


# ------------------------------------------------------------------------- prompts


def prompt_messages(question: str) -> list[dict[str, str]]:
    """System + user chat messages for one question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question.strip()},
    ]


def render_prompt(question: str, tokenizer: Any) -> str:
    """The question rendered with the tokenizer's chat template, ready for generation."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "use an instruct/chat model's tokenizer or set tokenizer.chat_template"
        )
    messages = prompt_messages(question)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        # Some templates (e.g. Gemma) reject the system role: fold it into the user turn.
        if "system" not in str(e).lower():
            raise
    merged = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{question.strip()}"}]
    return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


def to_dataset_rows(problems: Iterable[Problem], tokenizer: Any) -> list[dict[str, str]]:
    """Rows for the Tunix GRPO dataset: rendered ``prompts``, ``question`` and gold ``answer``."""
    return [
        {"prompts": render_prompt(p.question, tokenizer), "question": p.question, "answer": p.gold}
        for p in problems
    ]


def fit_prompts(rows: list[dict[str, str]], tokenizer: Any, max_len: int, what: str,
                log: Callable[[str], None] = print) -> list[dict[str, str]]:
    """The rows whose prompt fits --max-prompt-length tokens; says how many were skipped and
    why (the engine's shapes are fixed by that length), and fails when none is left."""
    lengths = [len(tokenizer.encode(r["prompts"])) for r in rows]
    kept = [r for r, n in zip(rows, lengths, strict=True) if n <= max_len]
    if rows and not kept:
        raise UserError(f"every {what} prompt is longer than --max-prompt-length {max_len} "
                        f"tokens (shortest: {min(lengths)}); raise --max-prompt-length")
    if len(kept) < len(rows):
        log(f"skipped {len(rows) - len(kept)} of {len(rows)} {what} prompts longer than "
            f"--max-prompt-length {max_len} tokens (longest: {max(lengths)}); raise "
            "--max-prompt-length to keep them")
    return kept


def prompt_rows(problems: Iterable[Problem], tokenizer: Any, max_len: int,
                what: str) -> list[dict[str, str]]:
    """Dataset rows (rendered prompts, question, gold answer) of the problems whose prompt
    fits the rollout's prompt length (the others are skipped, counted on the console)."""
    return fit_prompts(to_dataset_rows(problems, tokenizer), tokenizer, max_len, what)


@dataclass
class Batches:
    """Deterministic batches: the rows of step s depend only on (seed, s), so resume is exact."""

    rows: list[dict[str, Any]]
    batch_size: int
    seed: int

    def batch(self, step: int) -> dict[str, np.ndarray]:
        n = len(self.rows)
        start = (step - 1) * self.batch_size
        picked = []
        for i in range(start, start + self.batch_size):
            epoch, pos = divmod(i, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            picked.append(self.rows[order[pos]])
        # Tunix needs numpy arrays, not lists of str (lists are split per character).
        return {k: np.array([r[k] for r in picked]) for k in picked[0]}


# --------------------------------------------------------------------- the run's splits


def train_problems(data: str, data_path: str | None, seed: int) -> list[Problem]:
    """The training split: synthetic problems for `seed`, or GSM8K's train split."""
    if data == "synthetic":
        return synthetic_split(seed=seed, **SYNTHETIC_SPLIT)[0]
    return load_gsm8k(data_path, split="train")


def heldout_problems(data: str, data_path: str | None, seed: int,
                     limit: int | None = None) -> list[Problem]:
    """The held-out split: synthetic test problems for `seed`, or GSM8K's test split."""
    if data == "synthetic":
        problems = synthetic_split(seed=seed, **SYNTHETIC_SPLIT)[1]
    elif data == "gsm8k":
        problems = load_gsm8k(data_path, split="test")
    else:
        raise UserError(f"--data {data!r} is unknown; use synthetic or gsm8k")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit {limit}: must be >= 1")
        problems = problems[:limit]
    return problems


# ----------------------------------------------------------------------- synthetic

_PEOPLE = [
    ("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Maria", "she"), ("Leo", "he"),
    ("Sara", "she"), ("Omar", "he"), ("Lily", "she"), ("Sam", "he"), ("Nina", "she"),
]  # fmt: skip
_ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "shells"]
_GOODS = ["notebooks", "toys", "tickets", "pens", "plants", "mugs"]

# A template draws numbers and returns (question, worked solution without the #### line, result).
_Template = Callable[[random.Random, str, str, str, str], tuple[str, str, int]]


def _add(rng: random.Random, name: str, pron: str, friend: str, item: str) -> tuple[str, str, int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c = a + b
    question = f"{name} has {a} {item} and buys {b} more. How many {item} does {pron} have now?"
    return question, f"{name} has {a} + {b} = {c} {item} now.", c


def _subtract(
    rng: random.Random, name: str, pron: str, friend: str, item: str
) -> tuple[str, str, int]:
    b = rng.randint(1, 9)
    a = b + rng.randint(1, 9)
    c = a - b
    question = (
        f"{name} had {a} {item} and gave {b} of them to {friend}. "
        f"How many {item} does {name} have left?"
    )
    return question, f"{name} has {a} - {b} = {c} {item} left.", c


def _multiply(
    rng: random.Random, name: str, pron: str, friend: str, item: str
) -> tuple[str, str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = a * b
    question = (
        f"{name} buys {a} bags of {item}. Each bag has {b} {item}. "
        f"How many {item} does {name} buy in total?"
    )
    return question, f"{name} buys {a} * {b} = {c} {item}.", c


def _divide(
    rng: random.Random, name: str, pron: str, friend: str, item: str
) -> tuple[str, str, int]:
    b, c = rng.randint(2, 9), rng.randint(2, 9)
    a = b * c
    question = (
        f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
    )
    return question, f"Each friend gets {a} / {b} = {c} {item}.", c


def _money(
    rng: random.Random, name: str, pron: str, friend: str, item: str
) -> tuple[str, str, int]:
    goods = rng.choice(_GOODS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = a * b
    question = f"{name} buys {a} {goods} that cost ${b} each. How many dollars does {pron} spend?"
    return question, f"{name} spends {a} * ${b} = ${c}.", c


def _two_step(
    rng: random.Random, name: str, pron: str, friend: str, item: str
) -> tuple[str, str, int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    total = a + b
    c = rng.randint(1, min(9, total - 1))
    left = total - c
    question = (
        f"{name} has {a} {item}. {pron.capitalize()} buys {b} more and then gives {c} to "
        f"{friend}. How many {item} does {name} have now?"
    )
    solution = (
        f"After buying, {name} has {a} + {b} = {total} {item}.\n"
        f"After giving {c} away, {pron} has {total} - {c} = {left} {item}."
    )
    return question, solution, left


_TEMPLATES: list[_Template] = [_add, _subtract, _multiply, _divide, _money, _two_step]


def synthetic_problems(n: int, seed: int) -> list[Problem]:
    """``n`` distinct small arithmetic word problems in GSM8K format, deterministic per seed.

    A longer list for the same seed starts with the shorter one.
    """
    if n < 0:
        raise UserError(f"number of synthetic problems must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    for _ in range(50 * n + 1000):  # bounded: the template space is far larger than any n used
        if len(problems) == n:
            break
        template = rng.choice(_TEMPLATES)
        (name, pron), (friend, _) = rng.sample(_PEOPLE, 2)
        question, solution, result = template(rng, name, pron, friend, rng.choice(_ITEMS))
        if question in seen:
            continue
        seen.add(question)
        problems.append(Problem(question=question, answer=f"{solution}\n#### {result}"))
    if len(problems) < n:
        raise UserError(f"could not make {n} distinct synthetic problems; ask for fewer")
    return problems


def synthetic_split(n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train/test lists of synthetic problems (no question appears in both)."""
    if n_train < 0 or n_test < 0:
        raise UserError(f"split sizes must be >= 0, got train={n_train} test={n_test}")
    problems = synthetic_problems(n_train + n_test, seed)
    return problems[:n_train], problems[n_train:]


# -------------------------------------------------------------------------- GSM8K

_DATA_PATH_HINT = "pass --data-path to a local GSM8K .jsonl or .parquet file"


def _iter_json_rows(path: Path) -> Iterator[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; {_DATA_PATH_HINT}") from e
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); fix the file or use .jsonl") from e
        yield from rows
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{lineno} is not a JSON object ({e.msg}); "
                "expected one {'question': ..., 'answer': ...} per line"
            ) from e


def _iter_parquet_rows(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as e:
        raise UserError(f"cannot read parquet file {path}: {e}; {_DATA_PATH_HINT}") from e
    missing = [c for c in _COLUMNS if c not in names]
    if missing:
        raise UserError(
            f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(names)}); "
            "GSM8K data needs 'question' and 'answer' columns"
        )
    for batch in parquet.iter_batches(columns=list(_COLUMNS)):
        yield from batch.to_pylist()


def _read_file(path: Path, limit: int | None) -> list[Problem]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _iter_json_rows(path)
    elif suffix == ".parquet":
        rows = _iter_parquet_rows(path)
    else:
        raise UserError(f"unsupported data file {path}; use a .jsonl, .json or .parquet file")
    problems: list[Problem] = []
    for i, row in enumerate(rows):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_to_problem(row, path, i))
    return problems


def _to_problem(row: Any, path: Path, index: int) -> Problem:
    where = f"{path} row {index}"
    if not isinstance(row, dict):
        raise UserError(f"{where} is not an object; expected {{'question': ..., 'answer': ...}}")
    missing = [c for c in _COLUMNS if c not in row]
    if missing:
        raise UserError(
            f"{where} lacks field(s) {', '.join(missing)} (has {', '.join(map(str, row))}); "
            "GSM8K data needs 'question' and 'answer'"
        )
    question, answer = row["question"], row["answer"]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise UserError(f"{where}: 'question' and 'answer' must be strings")
    if _final_number(answer) is None:
        raise UserError(
            f"{where}: answer does not end with '#### <number>'; "
            "use GSM8K-format answers (solution, then '#### N')"
        )
    return Problem(question=question, answer=answer)


def _split_files(directory: Path, split: str) -> list[Path]:
    """Data files for ``split`` in a directory, including the HF ``main/`` layout."""
    for base in (directory, directory / "main"):
        for pattern in (f"{split}.jsonl", f"{split}.json", f"{split}.parquet"):
            if (base / pattern).is_file():
                return [base / pattern]
        for pattern in (f"{split}-*.parquet", f"{split}-*.jsonl"):
            shards = sorted(base.glob(pattern))
            if shards:
                return shards
    raise UserError(
        f"no '{split}' data in {directory} (looked for {split}.jsonl, {split}.json, "
        f"{split}.parquet, {split}-*.parquet, also under main/); point --data-path at the file"
    )


def _load_hub(dataset_id: str, split: str, limit: int | None) -> list[Problem]:
    try:
        import datasets

        config = "main" if dataset_id.rstrip("/").endswith("gsm8k") else None
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:
        # Offline (as here) this always fails; say what to do instead.
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(
            f"could not download dataset {dataset_id} (split {split}): {reason}; {_DATA_PATH_HINT}"
        ) from e
    source = Path(dataset_id)
    problems: list[Problem] = []
    for i, row in enumerate(ds):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_to_problem(row, source, i))
    return problems


def load_gsm8k(
    path: str | None = None, split: str = "train", limit: int | None = None
) -> list[Problem]:
    """Load GSM8K-format problems.

    ``path`` may be a ``.jsonl``/``.json``/``.parquet`` file, a directory holding
    ``{split}.jsonl``, ``{split}.parquet`` or ``{split}-*.parquet`` (also under ``main/``, the
    HF layout), or None / a hub id such as ``openai/gsm8k`` (downloaded with ``datasets``).
    ``limit`` keeps the first rows only.
    """
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0, got {limit}")
    if path is None:
        problems = _load_hub(HUB_DATASET, split, limit)
    else:
        local = Path(path).expanduser()
        if local.is_dir():
            problems = []
            for file in _split_files(local, split):
                remaining = None if limit is None else limit - len(problems)
                problems += _read_file(file, remaining)
        elif local.is_file():
            problems = _read_file(local, limit)
        elif _HUB_ID_RE.fullmatch(path) and not local.suffix:
            problems = _load_hub(path, split, limit)
        else:
            raise UserError(f"data path {path} does not exist; {_DATA_PATH_HINT}")
    if not problems and limit != 0:
        raise UserError(f"no problems found in {path or HUB_DATASET}; {_DATA_PATH_HINT}")
    return problems
