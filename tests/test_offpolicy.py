"""Off-policy GRPO: importance weights by hand, the staleness bound, the async pipeline's
admission and exclusion, and end-to-end runs with --max-staleness and --num-iterations."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from tunix_sglang import importance
from tunix_sglang.pipeline import RolloutPipeline

TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def test_is_weights_equal_a_hand_computation():
    # Two samples, three tokens; the last token of the second is padding.
    prox = np.log([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]])
    behav = np.log([[0.5, 0.05, 0.3], [0.55, 0.6, 0.9]])
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    # ratios pi_prox / pi_behav: [1, 4, 3], [6/11, 1, (pad)]
    w, frac = importance.is_weights(prox, behav, mask, "tis", cap=2.0)
    np.testing.assert_allclose(w, [[1.0, 2.0, 2.0], [6 / 11, 1.0, 0.0]], rtol=1e-6)
    assert frac == pytest.approx(2 / 5)  # 4 and 3 truncated at C=2
    w, frac = importance.is_weights(prox, behav, mask, "mis", cap=2.0)
    np.testing.assert_array_equal(w, [[1, 0, 0], [1, 1, 0]])  # 6/11 >= 1/2 stays
    assert frac == pytest.approx(2 / 5)
    w, frac = importance.is_weights(prox, behav, mask, "mis", cap=1.5)
    np.testing.assert_array_equal(w, [[1, 0, 0], [0, 1, 0]])  # 6/11 < 1/1.5 dropped
    assert frac == pytest.approx(3 / 5)


def test_samples_older_than_k_are_masked_by_whole_group():
    stale = importance.staleness(6, [6, 6, 4, 6, 2, 2], num_iterations=2)
    np.testing.assert_array_equal(stale, [0, 0, 1, 0, 2, 2])
    np.testing.assert_array_equal(importance.stale_groups(stale, 2, max_staleness=1),
                                  [False, False, False, False, True, True])
    np.testing.assert_array_equal(importance.stale_groups(stale, 3, max_staleness=0),
                                  [True] * 6)


@pytest.mark.parametrize("k", [1, 2])
def test_pipeline_admits_no_batch_older_than_k_and_excludes_syncs(k):
    """A trainer loop over the real thread: every batch is generated on weights at most K
    steps behind the trainer's when it trains on it, the producer does run ahead (overlap),
    and no sync ever runs while a batch is being generated."""
    engine = {"version": 0, "busy": False}
    overlap_seen = []

    def produce(step):
        engine["busy"] = True
        v = engine["version"]
        time.sleep(0.02)
        engine["busy"] = False
        return v

    def sync(v):
        assert not engine["busy"], "a sync landed during a generate"
        engine["version"] = v
        return v

    pipe = RolloutPipeline(produce, range(1, 9), k, num_iterations=1, first_version=0)
    try:
        for step in range(1, 9):
            version = pipe.get(step)
            trainer = step - 1
            assert trainer - version <= k, (step, version)
            overlap_seen.append(trainer - version)
            time.sleep(0.03)  # training while the next batch is produced
            pipe.synced(pipe.exclusive(lambda s=step: sync(s)))
    finally:
        pipe.close()
    assert max(overlap_seen) == k  # it ran ahead as far as allowed


def test_pipeline_hands_the_producers_error_to_the_trainer():
    def produce(step):
        if step == 2:
            raise ValueError("engine died")
        return step

    pipe = RolloutPipeline(produce, range(1, 4), 1, num_iterations=1, first_version=0)
    assert pipe.get(1) == 1
    with pytest.raises(ValueError, match="engine died"):
        pipe.get(2)
    pipe.close()
    assert not any(t.name == "rollout-producer" for t in threading.enumerate())


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_async_rollouts_with_tis_on_split_devices(run_cli, tmp_path):
    """The issue's done-when command at 4 steps: samples at most 1 step old and 1 step old
    from step 2 on (the overlap happened), every version proven, IS recorded, and the
    timeline shows the rollout of step n+1 running while step n trains."""
    out = tmp_path / "run"
    p = run_cli("train", "--steps", "4", "--rollout-devices", "1", "--max-staleness", "1",
                "--importance-correction", "tis", "--output-dir", str(out),
                "--eval-limit", "0", env=TWO_DEVICES)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(out)
    assert [r["staleness_max"] for r in rows] == [0, 1, 1, 1]
    assert [r["rollout_weight_version"] for r in rows] == [0, 0, 1, 2]
    assert [r["weight_version"] for r in rows] == [1, 2, 3, 4]
    assert all(r["sync_check"] == "proven" and r["stale_dropped"] == 0 for r in rows)
    assert all(r["is_clipped_frac"] is not None for r in rows)
    for prev, nxt in zip(rows[1:], rows[2:], strict=False):
        # step n+1's rollout started before step n's training ended
        assert nxt["timeline"]["rollout"][0] < prev["timeline"]["train"][1]
    assert (out / "report.html").read_text().count("Timeline") >= 1


def test_num_iterations_with_mis(run_cli, tmp_path):
    """The issue's second done-when command at 2 steps: mu=2 optimizer steps per rollout,
    each version proven, MIS recorded."""
    out = tmp_path / "run"
    p = run_cli("train", "--steps", "2", "--num-iterations", "2", "--importance-correction",
                "mis", "--output-dir", str(out), "--eval-limit", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(out)
    assert [r["weight_version"] for r in rows] == [2, 4]
    assert [r["rollout_weight_version"] for r in rows] == [0, 2]
    assert all(r["sync_check"] == "proven" and r["is_clipped_frac"] is not None for r in rows)


def test_num_iterations_reuses_the_engine_logprobs(cache_home, tmp_path, monkeypatch):
    """mu=2 without a correction: the old policy of the loss is exactly the engine's logprobs
    of the sampled tokens, and no old-policy forward runs (Tunix's anchor-actor pass or the
    rollout's scoring); the one trainer forward per step is the mismatch measurement's."""
    from tunix.rl import rl_cluster

    from tunix_sglang import grpo_step, runner
    from tunix_sglang.config import build_config
    from tunix_sglang.rollout.base import Rollout

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    calls = {"old": 0, "trainer": 0}
    examples = []

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(rl_cluster.RLCluster, "get_old_per_token_logps",
                        count("old", rl_cluster.RLCluster.get_old_per_token_logps))
    monkeypatch.setattr(Rollout, "get_per_token_logps",
                        count("old", Rollout.get_per_token_logps))
    monkeypatch.setattr(grpo_step, "trainer_logps_of_rollout",
                        count("trainer", grpo_step.trainer_logps_of_rollout))
    make = grpo_step.make_train_example

    def capture(ctx, sampled):
        example, stats = make(ctx, sampled)
        examples.append((sampled.engine_logps, example))
        return example, stats

    monkeypatch.setattr(grpo_step, "make_train_example", capture)
    cfg = build_config(None, dict(steps=2, num_iterations=2, eval_limit=0,
                                  output_dir=str(tmp_path / "run")))
    runner.train(cfg)
    assert calls == {"old": 0, "trainer": 2}
    for engine_logps, example in examples:  # [N, T], zero past each completion
        assert example.sampler_is_weights is None
        np.testing.assert_array_equal(np.asarray(example.old_per_token_logps), engine_logps)


def test_async_rollouts_on_remote_servers(cache_home, tmp_path, monkeypatch):
    """--max-staleness 1 with two real rollout servers (`--launch-servers 2`): the servers
    generate step n+1 while step n trains (staleness 1, never more), every version is
    proven, and each sample's recorded version is the one whose weights generated it: its
    engine logprobs are those of the trainer's weights at that version (kept at each sync),
    not of the newer weights it is trained with."""
    from tunix_sglang import grpo_step, runner
    from tunix_sglang.config import build_config
    from tunix_sglang.probe.scoring import tunix_token_logprobs
    from tunix_sglang.rollout.base import copy_params

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))  # the servers inherit it
    weights, trained = {}, []  # version -> trainer weights; (StepRollout, trainer version, pad)

    def keep(fn):
        def wrapped(ctx, *a, **kw):
            proof = fn(ctx, *a, **kw)
            weights[proof.version] = copy_params(ctx.cluster.actor_trainer.model)
            return proof
        return wrapped

    monkeypatch.setattr(grpo_step, "initial_sync", keep(grpo_step.initial_sync))
    monkeypatch.setattr(grpo_step, "sync_and_prove", keep(grpo_step.sync_and_prove))
    make = grpo_step.make_train_example

    def capture(ctx, sampled):
        trained.append((sampled, grpo_step.trainer_version(ctx), ctx.cluster.rollout.pad_id()))
        return make(ctx, sampled)

    monkeypatch.setattr(grpo_step, "make_train_example", capture)
    out = tmp_path / "run"
    # lr 1e-2: one step moves the logprobs far more than the engine-trainer difference.
    cfg = build_config(None, dict(
        steps=3, rollout_engine="sglang_jax_remote", launch_servers=2, max_staleness=1,
        batch_size=2, num_generations=2, max_new_tokens=8, learning_rate=1e-2,
        importance_correction="tis", eval_limit=0, output_dir=str(out)))
    runner.train(cfg)

    rows = _rows(out)
    stale = [r["staleness_max"] for r in rows]
    assert stale[0] == 0 and max(stale) == 1, stale  # the overlap happened, within K
    assert all(r["sync_check"] == "proven" and r["stale_dropped"] == 0 for r in rows)
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    assert all(r["is_clipped_frac"] is not None for r in rows)
    for prev, nxt in zip(rows, rows[1:], strict=False):
        if nxt["staleness_max"] == 1:  # generated while the previous step trained
            assert nxt["timeline"]["rollout"][0] < prev["timeline"]["train"][1]

    own_max, newer_min = 0.0, np.inf
    for sampled, now, pad in trained:
        for row, comp, lps, v in zip(sampled.prompt_ids, sampled.completion_ids,
                                     sampled.engine_logps, sampled.versions, strict=True):
            ids = row[int(np.argmax(row != pad)):]  # left padding off
            n = int((comp != pad).sum())  # right padding off
            toks, lp = comp[:n], lps[:n]
            own = np.max(np.abs(tunix_token_logprobs(weights[v], ids, toks, 1.0) - lp))
            own_max = max(own_max, own)
            if v != now:  # the newer weights it is trained with give other logprobs
                newer_min = min(newer_min, np.max(np.abs(
                    tunix_token_logprobs(weights[now], ids, toks, 1.0) - lp)))
    print(f"max |engine - trainer@own version| {own_max:.2e}, "
          f"min |engine - trainer@newer version| {newer_min:.2e}")
    assert own_max <= 2e-4 and np.isfinite(newer_min), (own_max, newer_min)
    assert newer_min > 10 * max(own_max, 1e-5), (own_max, newer_min)
