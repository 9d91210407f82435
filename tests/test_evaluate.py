"""Evaluation: greedy configs per engine, accuracy bookkeeping, and a real Tunix greedy pass."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from tunix_sglang import evaluate, run_files, tunix_cluster
from tunix_sglang.errors import UserError


def train_rollout_config():
    from tunix.rl.rollout import base_rollout

    return base_rollout.RolloutConfig(
        max_tokens_to_generate=32, max_prompt_length=128, kv_cache_size=176, temperature=0.9,
        top_p=1.0, top_k=None, eos_tokens=[3], seed=7,
    )


def test_eval_rollout_config_is_greedy_for_every_engine():
    from tunix.rl.rl_cluster import Mode

    train = train_rollout_config()
    ev = tunix_cluster.eval_rollout_config(train)
    # Tunix's vanilla sampler: top_p None (no beam) selects its "greedy" (argmax) mode.
    assert ev.top_p is None
    # sglang-jax / generic engines: temperature 0 and top_k 1 are greedy.
    assert ev.temperature == 0.0 and ev.top_k == 1
    for f in ("max_tokens_to_generate", "max_prompt_length", "kv_cache_size", "eos_tokens"):
        assert getattr(ev, f) == getattr(train, f)
    assert train.temperature == 0.9 and train.top_p == 1.0  # the train config is untouched
    both = tunix_cluster.rollout_configs(train)
    assert both[Mode.TRAIN] is train and both[Mode.EVAL] == ev
    # What the engine rollouts send their engines (and servers) for each.
    from tunix_sglang.rollout.base import Sampling

    assert Sampling.of(ev) == Sampling(max_new_tokens=32, temperature=0.0, top_p=1.0, top_k=1,
                                       stop_token_ids=[3])
    assert Sampling.of(train) == Sampling(max_new_tokens=32, temperature=0.9, top_p=1.0,
                                          top_k=None, stop_token_ids=[3])


@dataclasses.dataclass
class _Out:
    text: list[str]


class FakeCluster:
    """Answers each prompt 'Q<k>' with a fixed completion; records calls."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls: list[tuple[int, object, object]] = []

    def generate(self, prompts, mode, max_generation_steps=None):
        self.calls.append((len(prompts), mode, max_generation_steps))
        return _Out([self.answers[p] for p in prompts])


def test_evaluate_counts_strict_and_lenient_and_pads_batches():
    from tunix.rl.rl_cluster import Mode

    answers = {
        "Q0": "<reasoning>2+2=4</reasoning>\n<answer>4</answer>",  # strict and lenient
        "Q1": "<reasoning>so it is 7</reasoning>\n<answer>6</answer>",  # neither
        "Q2": "the answer is 1,000",  # lenient only
        "Q3": "<reasoning>x</reasoning><answer>$12.00</answer>",  # both (normalized)
        "Q4": "nothing",
    }
    golds = ["4", "7", "1000", "12", "5"]
    rows = [{"prompts": f"Q{i}", "question": f"q{i}", "answer": g} for i, g in enumerate(golds)]
    cluster = FakeCluster(answers)
    r = evaluate.evaluate(cluster, rows, max_new_tokens=40, batch_size=2)
    assert r.n == 5
    assert r.strict_acc == pytest.approx(2 / 5)
    assert r.lenient_acc == pytest.approx(3 / 5)
    # Every call has the same batch size (the last one is padded) and runs in EVAL mode.
    assert cluster.calls == [(2, Mode.EVAL, 40)] * 3
    assert r.samples[0]["completion"] == answers["Q0"] and r.samples[0]["strict"]
    # The mean over the problems of the sum of the reward functions, each graded alone.
    from tunix_sglang import rewards

    by_hand = [sum(fn(prompts=[""], completions=[answers[f"Q{i}"]], answer=[g])[0]
                   for fn in rewards.DEFAULT_REWARD_FNS) for i, g in enumerate(golds)]
    assert len(set(by_hand)) >= 3  # the five completions earn different rewards
    assert r.reward_mean == pytest.approx(sum(by_hand) / 5)
    with pytest.raises(UserError):
        evaluate.evaluate(cluster, [], 40, 2)


def test_eval_jsonl_round_trip_and_resume_truncation(tmp_path):
    res = evaluate.EvalResult(n=10, strict_acc=0.2, lenient_acc=0.3, reward_mean=1.5, samples=[])
    for step in (0, 5, 10):
        evaluate.record(tmp_path, step, res)
    with (tmp_path / "eval.jsonl").open("a") as f:
        f.write('{"step": 15, "n"')  # a row cut by a kill
    rows = run_files.read_evals(tmp_path)
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert rows[0] | {"eval_sec": 0.0} == {"step": 0, "n": 10, "strict_acc": 0.2,
                                          "lenient_acc": 0.3, "reward_mean": 1.5,
                                          "eval_sec": 0.0}
    run_files.truncate_after(tmp_path / "eval.jsonl", 5)
    assert [r["step"] for r in run_files.read_evals(tmp_path)] == [0, 5]
    rerun = (tmp_path / "eval.jsonl.rerun").read_text().splitlines()
    assert json.loads(rerun[0])["step"] == 10 and rerun[1] == '{"step": 15, "n"'
    line = evaluate.summary_line(res, dataclasses.replace(res, strict_acc=0.5))
    assert "strict 0.200 -> 0.500" in line and "lenient 0.300 -> 0.300" in line


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_eval_parser(parser.add_subparsers(dest="command"))
    argv = ["eval"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parser.parse_args(argv)


def test_eval_cli_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        evaluate.eval_config(_args(run_dir=tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(UserError, match="no checkpoint"):
        evaluate.eval_config(_args(run_dir=tmp_path))


def test_eval_config_fits_the_data_and_the_devices():
    cfg = evaluate.eval_config(_args(data="gsm8k"))
    assert cfg.max_prompt_length == 256  # GSM8K prompts run past the synthetic 128
    assert evaluate.eval_config(_args(data="gsm8k", max_prompt_length=300)).max_prompt_length \
        == 300
    # One generate call's prompts, split over 1, 2, 4 or 8 training chips (a v4-8 has 4).
    for n in (1, 2, 4, 8):
        cfg.validate_devices(n)


def test_greedy_eval_through_tunix_vanilla_is_deterministic(tmp_path, cache_home, monkeypatch):
    """The real path: embedded model, Tunix RLCluster with the vanilla sampler, Mode.EVAL."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    from tunix_sglang import data, models, rewards
    from tunix_sglang.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model()
    args = _args(local_model_dir=model_dir, limit=6, batch_size=4, max_new_tokens=12)
    cfg = evaluate.eval_config(args)
    cfg.output_dir = str(tmp_path / "scratch")
    md = models.inspect_model_dir(model_dir)
    tok = models.load_tokenizer(md)
    rows = data.prompt_rows(data.heldout_problems("synthetic", None, 0, 6), tok,
                            cfg.max_prompt_length, "held-out")
    cluster, _ = tunix_cluster.build_cluster(cfg, md, tok)
    first = evaluate.evaluate(cluster, rows, 12, batch_size=4, num_samples=6)
    second = evaluate.evaluate(cluster, rows, 12, batch_size=4, num_samples=6)
    texts = [s["completion"] for s in first.samples]
    assert len(texts) == 6 and any(texts)
    assert texts == [s["completion"] for s in second.samples]  # greedy: no sampling noise
    # Padding a batch does not change a prompt's greedy completion.
    solo = evaluate.evaluate(cluster, rows[:1], 12, batch_size=4, num_samples=1)
    assert solo.samples[0]["completion"] == texts[0]
    # The accuracies are those of these completions, graded here one by one.
    golds = [r["answer"] for r in rows]
    for key, strict in (("strict_acc", True), ("lenient_acc", False)):
        want = sum(rewards.correct(c, g, strict=strict)
                   for c, g in zip(texts, golds, strict=True)) / len(rows)
        assert getattr(first, key) == pytest.approx(want), key
