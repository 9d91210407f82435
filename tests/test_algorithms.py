"""`--algorithm grpo|dapo|drgrpo|gspo`: each one's loss and advantages against a hand
calculation of its paper's formula (numpy, written out here, not Tunix's code), DAPO's
overlong shaping, and its dynamic sampling with a real rollout."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_device_mesh

from tunix_sglang import algorithms
from tunix_sglang.config import TrainConfig, build_config
from tunix_sglang.errors import UserError

# ---------------------------------------------------------------------------------------
# Configuration: knobs, defaults, one-line errors
# ---------------------------------------------------------------------------------------


def test_each_algorithm_gets_its_defaults_and_given_knobs_win():
    dapo = build_config(None, {"algorithm": "dapo", "max_new_tokens": 50})
    assert (dapo.beta, dapo.epsilon, dapo.epsilon_high, dapo.loss_agg_mode) == \
        (0.0, 0.2, 0.28, "token-mean")
    assert (dapo.overlong_buffer_len, dapo.overlong_penalty, dapo.max_resample_rounds) == \
        (10, 1.0, 4)
    gspo = build_config(None, {"algorithm": "gspo"})
    assert (gspo.epsilon, gspo.epsilon_high, gspo.loss_agg_mode) == \
        (3e-4, 4e-4, "sequence-mean-token-mean")
    dr = build_config(None, {"algorithm": "drgrpo"})
    assert (dr.beta, dr.loss_agg_mode, dr.epsilon_high) == (0.04, "sequence-mean-token-scale",
                                                            None)
    grpo = build_config(None, {})
    assert (grpo.algorithm, grpo.loss_agg_mode, grpo.max_resample_rounds) == \
        ("grpo", "sequence-mean-token-mean", None)
    given = build_config(None, {"algorithm": "gspo", "epsilon": 0.1, "epsilon_high": 0.3,
                                "loss_agg_mode": "token-mean"})
    assert (given.epsilon, given.epsilon_high, given.loss_agg_mode) == (0.1, 0.3, "token-mean")


def test_yaml_keys(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("algorithm: dapo\nepsilon_high: 0.3\noverlong_buffer_len: 4\n"
                 "overlong_penalty: 0.5\nmax_resample_rounds: 2\nloss_agg_mode: token-mean\n")
    cfg = build_config(str(y), {"max_resample_rounds": 0})
    assert (cfg.algorithm, cfg.epsilon_high, cfg.overlong_buffer_len, cfg.overlong_penalty,
            cfg.max_resample_rounds) == ("dapo", 0.3, 4, 0.5, 0)


@pytest.mark.parametrize("given,needle", [
    ({"algorithm": "ppo"}, "--algorithm 'ppo' is unknown"),
    ({"algorithm": "dapo", "epsilon_high": -0.1}, "--epsilon-high -0.1: must be >= 0"),
    ({"algorithm": "gspo", "epsilon_high": -1.0}, "--epsilon-high -1.0: must be >= 0"),
    ({"algorithm": "dapo", "epsilon_high": 0.1}, "clip-higher needs"),
    ({"epsilon_high": 0.3}, "--epsilon-high is a knob of --algorithm dapo / gspo"),
    ({"algorithm": "drgrpo", "overlong_penalty": 1.0}, "--overlong-penalty is a knob"),
    ({"algorithm": "gspo", "max_resample_rounds": 2}, "--max-resample-rounds is a knob"),
    ({"algorithm": "grpo", "overlong_buffer_len": 8}, "--overlong-buffer-len is a knob"),
    ({"algorithm": "dapo", "beta": 0.04}, "DAPO has no KL term"),
    ({"algorithm": "dapo", "overlong_buffer_len": 49}, "--overlong-buffer-len 49"),
    ({"algorithm": "dapo", "overlong_penalty": -1}, "--overlong-penalty"),
    ({"algorithm": "dapo", "max_resample_rounds": -1}, "--max-resample-rounds -1"),
    ({"loss_agg_mode": "mean"}, "--loss-agg-mode 'mean' is unknown"),
    ({"epsilon": 0.0}, "--epsilon 0.0"),
    ({"beta": -0.1}, "--beta -0.1"),
])
def test_bad_values_are_one_line(given, needle):
    with pytest.raises(UserError) as e:
        build_config(None, given)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unknown_algorithm_exits_2_with_one_line(run_cli, tmp_path):
    p = run_cli("train", "--algorithm", "ppo", "--output-dir", str(tmp_path / "run"),
                timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: --algorithm 'ppo' is unknown; use one of grpo, dapo, drgrpo, gspo"]
    assert not (tmp_path / "run").exists()


def test_doctor_plans_the_algorithm_on_a_recipe(capsys, monkeypatch, tmp_path):
    """`doctor --plan --config RECIPE --algorithm dapo`: the recipe (algorithm: grpo) takes
    the flag, DAPO's beta 0 drops the reference model copy from the plan; GRPO's keeps it."""
    import json

    from conftest import REPO

    from tunix_sglang.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = str(REPO / "recipes" / "qwen3-4b-gsm8k-v4-8.yaml")
    plans = {}
    for algo in ("grpo", "dapo"):
        assert main(["doctor", "--plan", "--config", recipe, "--algorithm", algo,
                     "--json"]) == 0
        plans[algo] = json.loads(capsys.readouterr().out)
    ref = "reference parameters (beta != 0)"
    assert (plans["grpo"]["algorithm"], plans["grpo"]["beta"]) == ("grpo", 0.04)
    assert plans["grpo"]["memory"]["parts"][ref] > 0
    assert (plans["dapo"]["algorithm"], plans["dapo"]["beta"]) == ("dapo", 0.0)
    assert ref not in plans["dapo"]["memory"]["parts"]
    assert plans["dapo"]["memory"]["training_device_total"] == \
        plans["grpo"]["memory"]["training_device_total"] - plans["grpo"]["memory"]["parts"][ref]


def test_report_summarises_dynamic_sampling():
    from tunix_sglang import report

    def rows(filtered, rounds, trained):
        return [{"step": i + 1, "reward_mean": 1.0, "groups_filtered": f,
                 "resample_rounds": r, "groups_trained": t}
                for i, (f, r, t) in enumerate(zip(filtered, rounds, trained, strict=True))]

    dapo = dict(report.summary(rows([0, 2, 5], [0, 1, 4], [4, 4, 3]), []))
    assert dapo["zero-variance groups dropped (total)"] == 7
    assert dapo["refill rollouts (total)"] == 5
    assert dapo["fewest groups trained in a step"] == 3
    grpo = dict(report.summary(rows([0, 0], [0, 0], [4, 4]), []))  # nothing filtered
    assert not any("groups" in k or "refill" in k for k in grpo)


# ---------------------------------------------------------------------------------------
# Losses and advantages against hand calculations
# ---------------------------------------------------------------------------------------
# A hand-made batch: 2 prompts x 3 completions of different lengths (5 token slots).
G, T = 3, 5
LENGTHS = np.array([5, 3, 1, 4, 2, 5])
MASK = np.arange(T)[None, :] < LENGTHS[:, None]
REWARDS = np.array([1.0, 0.0, 2.5, 3.0, -1.0, 0.5], np.float32)
# Per-token ratios pi_theta / pi_old, chosen across the clip bounds of every algorithm:
# below 1 - 0.2, inside, in (1.2, 1.28] (clipped by GRPO, not by DAPO's clip-higher), above.
RATIO = np.array([[0.70, 0.95, 1.25, 1.40, 1.10],
                  [1.25, 0.85, 1.05, 9.00, 9.00],
                  [1.30, 9.00, 9.00, 9.00, 9.00],
                  [0.75, 1.25, 1.00, 1.27, 9.00],
                  [1.22, 0.79, 9.00, 9.00, 9.00],
                  [1.00, 1.15, 0.81, 1.26, 0.60]])
# GSPO's ratios are per sequence and its clip range is 3e-4 / 4e-4: log-ratios around it,
# varied per token (so the token-level and sequence-level ratios differ).
GSPO_LOG_RATIO = np.array([[6e-4, 4e-4, 5e-4, 4e-4, 6e-4],  # A < 0, s above: not clipped
                           [-9e-4, 1e-4, -3e-4, 0, 0],  # A < 0, s below 1 - 3e-4: clipped
                           [1e-3, 0, 0, 0, 0],  # A > 0, s above 1 + 4e-4: clipped
                           [8e-4, 12e-4, 6e-4, 10e-4, 0],  # A > 0, above: clipped
                           [-5e-4, -11e-4, 0, 0, 0],  # A < 0, below: clipped
                           [-2e-4, 2e-4, 1e-4, -1e-4, 0]])  # inside


def hand_grpo_advantages(r: np.ndarray, group: int = G) -> np.ndarray:
    """GRPO (DeepSeekMath Eq. 3 with outcome rewards): (r_i - mean) / std over the group;
    Tunix takes the sample std (ddof 1) plus 1e-6."""
    g = r.astype(np.float64).reshape(-1, group)
    return ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)).ravel()


def hand_drgrpo_advantages(r: np.ndarray) -> np.ndarray:
    """Dr. GRPO (arXiv 2503.20783, Eq. 3): r_i - mean; no division by the std."""
    g = r.astype(np.float64).reshape(-1, G)
    return (g - g.mean(1, keepdims=True)).ravel()


def hand_token_terms(adv: np.ndarray, ratio: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """-min(ratio A, clip(ratio, 1 - lo, 1 + hi) A) per token: PPO's clipped surrogate, as
    a loss."""
    a = adv[:, None]
    return -np.minimum(ratio * a, np.clip(ratio, 1 - lo, 1 + hi) * a)


def test_grpo_and_drgrpo_advantages_by_hand():
    cfg = _cfg("grpo")
    np.testing.assert_allclose(algorithms.advantages(algorithms.tunix_config(cfg)[0], REWARDS),
                               hand_grpo_advantages(REWARDS), rtol=1e-5)
    dr, _ = algorithms.tunix_config(_cfg("drgrpo"))
    np.testing.assert_allclose(algorithms.advantages(dr, REWARDS),
                               hand_drgrpo_advantages(REWARDS), rtol=1e-6, atol=1e-6)
    # A group with equal rewards: 0 under both (what dynamic sampling filters out).
    same = np.array([2, 2, 2, 1, 0, 1], np.float32)
    for algo in ("grpo", "drgrpo"):
        adv = algorithms.advantages(algorithms.tunix_config(_cfg(algo))[0], same)
        assert np.all(adv[:3] == 0) and np.all(adv[3:] != 0), (algo, adv)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tunix_sglang import models
    from tunix_sglang.tiny_model import ensure_tiny_model

    md = models.inspect_model_dir(ensure_tiny_model(cache_dir=tmp_path_factory.mktemp("m")))
    return models.load_model(md, one_device_mesh())


def _cfg(algorithm: str, **knobs) -> TrainConfig:
    cfg = TrainConfig(algorithm=algorithm, num_generations=G, max_new_tokens=T, **knobs)
    algorithms.fill_defaults(cfg, set(knobs))
    cfg.validate()
    return cfg


def _loss(model, algorithm: str, log_ratio: np.ndarray, kl_offset: np.ndarray | None = None,
          **knobs) -> tuple[float, object]:
    """The loss the actor trainer computes for the run's algorithm (the policy loss Tunix's
    learner installs, with the run's config and advantages) on the hand-made batch, with
    old log-probs set so that pi_theta / pi_old = exp(log_ratio) exactly."""
    from flax import nnx
    from tunix.rl import common, function_registry

    algo, _ = algorithms.tunix_config(_cfg(algorithm, **knobs))
    algo.temperature = 1.0  # what the learner copies from the rollout config
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(10, 1000, (len(LENGTHS), 4)), jnp.int32)
    completion = jnp.asarray(rng.integers(10, 1000, (len(LENGTHS), T)), jnp.int32)
    pad, eos = 0, 1
    graphdef, state = nnx.split(model)
    logps = np.asarray(common.compute_per_token_logps(
        graphdef, state, prompt, completion, pad, eos, stop_gradient=True), np.float64)
    example = common.TrainExample(
        prompt_ids=prompt, prompt_mask=prompt != pad, completion_ids=completion,
        completion_mask=jnp.asarray(MASK),
        ref_per_token_logps=None if kl_offset is None else jnp.asarray(logps - kl_offset,
                                                                       jnp.float32),
        advantages=jax.device_put(algorithms.advantages(algo, REWARDS)),
        old_per_token_logps=jnp.asarray(logps - log_ratio, jnp.float32))
    loss_fn = function_registry.get_policy_loss_fn(algo.policy_loss_fn)
    loss, _ = loss_fn(model, example, algo_config=algo, pad_id=pad, eos_id=eos)
    return float(loss), algo


def test_grpo_loss_by_hand(model):
    """GRPO (DeepSeekMath Eq. 3): per sequence the token mean of the clipped surrogate at
    1 +- 0.2, then the mean over sequences, plus beta times the KL term under the same
    aggregation. Tunix's GRPOConfig estimates that KL per token as log pi - log pi_ref (its
    default `kl_loss_mode="kl"`; the paper's estimator is k3)."""
    kl = np.where(MASK, 0.01 * np.outer([1, -1, 2, 1, 3, 1], np.arange(1, T + 1)), 0)
    loss, algo = _loss(model, "grpo", np.log(RATIO), kl_offset=kl)
    terms = hand_token_terms(hand_grpo_advantages(REWARDS), RATIO, 0.2, 0.2) + 0.04 * kl
    expected = np.mean([terms[i, MASK[i]].mean() for i in range(len(LENGTHS))])
    assert algo.beta == 0.04
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=1e-6)


def test_dapo_loss_by_hand(model):
    """DAPO (arXiv 2503.14476, Eq. 8): clip-higher (ratio clipped to [1 - 0.2, 1 + 0.28]) and
    the token-level loss: every token of the batch weighs the same, 1 / sum_i |o_i|; no KL."""
    loss, _ = _loss(model, "dapo", np.log(RATIO))
    terms = hand_token_terms(hand_grpo_advantages(REWARDS), RATIO, 0.2, 0.28)
    expected = terms[MASK].sum() / LENGTHS.sum()
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=1e-6)
    # Clip-higher and the token-level sum are what make it differ from GRPO's number.
    grpo_terms = hand_token_terms(hand_grpo_advantages(REWARDS), RATIO, 0.2, 0.2)
    assert abs(expected - grpo_terms[MASK].sum() / LENGTHS.sum()) > 1e-3
    assert abs(expected - np.mean([terms[i, MASK[i]].mean() for i in range(6)])) > 1e-3


def test_drgrpo_loss_by_hand(model):
    """Dr. GRPO (arXiv 2503.20783, Eq. 3): advantages without the std, and no 1/|o_i|: each
    sequence's token sum divided by one constant, the generation budget (T tokens), then the
    mean over sequences."""
    loss, _ = _loss(model, "drgrpo", np.log(RATIO))
    terms = hand_token_terms(hand_drgrpo_advantages(REWARDS), RATIO, 0.2, 0.2)
    expected = np.mean([terms[i, MASK[i]].sum() / T for i in range(len(LENGTHS))])
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=1e-6)


def test_gspo_loss_by_hand(model):
    """GSPO (arXiv 2507.18071, Eqs. 5-7): one importance ratio per sequence,
    s_i = (pi_theta(y_i) / pi_old(y_i)) ** (1 / |y_i|), clipped to [1 - 3e-4, 1 + 4e-4];
    J = mean_i min(s_i A_i, clip(s_i) A_i). (Tunix's gspo-token has the same value, with
    the gradient flowing through each token.)"""
    loss, _ = _loss(model, "gspo", GSPO_LOG_RATIO)
    s = np.exp((GSPO_LOG_RATIO * MASK).sum(1) / LENGTHS)
    adv = hand_grpo_advantages(REWARDS)
    expected = np.mean(-np.minimum(s * adv, np.clip(s, 1 - 3e-4, 1 + 4e-4) * adv))
    # The loss is O(1e-4) (advantages sum to 0 in a group, ratios are 1 +- 1e-3): an
    # absolute bound, 10x below what the clipping and the sequence-level ratio change.
    np.testing.assert_allclose(loss, expected, rtol=0, atol=2e-6)
    assert abs(expected - np.mean(-s * adv)) > 1e-4  # the clipping matters here
    tokens = hand_token_terms(adv, np.exp(GSPO_LOG_RATIO), 3e-4, 4e-4)
    assert abs(expected - np.mean([tokens[i, MASK[i]].mean() for i in range(6)])) > 1e-5


def test_dapo_overlong_shaping_by_hand():
    """DAPO Eq. 13: 0 while |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache up
    to L_max, in tokens (scaled by the penalty)."""
    algo, _ = algorithms.tunix_config(_cfg("dapo", overlong_buffer_len=2))  # L_max = T = 5
    lengths = [0, 2, 3, 4, 5]
    tokens = [[7] * n for n in lengths]
    expected = [0.0 if n <= 3 else (3 - n) / 2 for n in lengths]
    np.testing.assert_allclose(algorithms.overlong_rewards(algo, tokens), expected)
    half, _ = algorithms.tunix_config(_cfg("dapo", overlong_buffer_len=2, overlong_penalty=0.5))
    np.testing.assert_allclose(algorithms.overlong_rewards(half, tokens),
                               0.5 * np.array(expected))
    off, _ = algorithms.tunix_config(_cfg("dapo", overlong_penalty=0.0))
    assert algorithms.overlong_rewards(off, tokens) is None
    assert algorithms.overlong_rewards(algorithms.tunix_config(_cfg("grpo"))[0], tokens) is None


# ---------------------------------------------------------------------------------------
# Dynamic sampling
# ---------------------------------------------------------------------------------------


def test_dynamic_sampling_selection_by_hand():
    """B = 3 groups of 2. Zero-variance groups are dropped, refills are taken in order until
    the batch is full, the surplus is left; at the bound the batch is padded."""
    rounds = {0: [1, 1, 0, 1, 2, 2],  # groups: same, informative, same
              1: [0, 0, 3, 3, 1, 0],  # same, same, informative
              2: [5, 4, 1, 0, 2, 2]}  # informative, informative (surplus), same
    asked = []

    def more(r):
        asked.append(r)
        return np.array(rounds[r], np.float32)

    sel = algorithms.dynamic_sampling(np.array(rounds[0], np.float32), more, 2, max_rounds=5)
    assert asked == [1, 2]
    assert sel.groups == [(0, 1), (1, 2), (2, 0)] and sel.padding == 0
    # Filtered: every zero-variance group rolled out (round 2's last one too); the surplus
    # informative group (2, 1) is neither trained on nor counted as filtered.
    assert (sel.groups_filtered, sel.resample_rounds, sel.groups_trained) == (5, 2, 3)

    asked.clear()
    sel = algorithms.dynamic_sampling(np.array(rounds[0], np.float32), more, 2, max_rounds=1)
    assert asked == [1]  # the bound: informative (0, 1), (1, 2), then padding
    assert sel.groups == [(0, 1), (1, 2), (0, 0)] and sel.padding == 1
    assert (sel.groups_filtered, sel.resample_rounds, sel.groups_trained) == (4, 1, 2)

    none = algorithms.dynamic_sampling(np.array([3, 3, 1, 1], np.float32), more, 2, 0)
    assert none.groups == [(0, 0), (0, 1)] and none.padding == 2 and none.groups_trained == 0
    full = algorithms.dynamic_sampling(np.array([3, 2, 1, 0], np.float32), more, 2, 3)
    assert full == algorithms.Selection.everything(2)


def test_refill_prompts_depend_only_on_seed_step_round():
    from tunix_sglang.data import Batches

    rows = [{"prompts": f"p{i}", "answer": str(i)} for i in range(50)]
    b = Batches(rows, batch_size=4, seed=3)
    first = b.refill(7, 2)["prompts"].tolist()
    b.refill(1, 1), b.batch(9)  # other draws in between change nothing
    assert Batches(rows, 4, 3).refill(7, 2)["prompts"].tolist() == first
    assert len(set(first)) == 4
    others = [b.refill(7, 1), b.refill(8, 2), Batches(rows, 4, 4).refill(7, 2)]
    assert all(o["prompts"].tolist() != first for o in others)


def _crc_reward_fn(calls: list):
    """A reward that is the same for every completion of a prompt whose text has an even
    CRC (a zero-variance group) and differs per completion otherwise. Records each call."""

    def reward(prompts, completions, **_):
        r = [0.5 if zlib.crc32(p.encode()) % 2 == 0 else float(zlib.crc32(c.encode()) % 9973)
             for p, c in zip(prompts, completions, strict=True)]
        calls.append((list(prompts), np.array(r, np.float32)))
        return r

    return reward


@pytest.fixture(scope="module")
def dapo_run(tmp_path_factory):
    """A real DAPO cluster with Tunix's own sampler (vanilla rollout), random tiny model
    (untied: the tied one's samples are all alike)."""
    from tunix_sglang import grpo_step, runner, tunix_cluster
    from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model

    md = ensure_tiny_model(TinyModelSpec(tie_word_embeddings=False),
                           cache_dir=tmp_path_factory.mktemp("untied"))
    cfg = TrainConfig(local_model_dir=str(md), algorithm="dapo", rollout_engine="vanilla",
                      batch_size=2,
                      num_generations=4, max_new_tokens=8, eval_limit=0, steps=3,
                      overlong_penalty=0.0, max_resample_rounds=3,
                      output_dir=str(tmp_path_factory.mktemp("dapo")))
    algorithms.fill_defaults(cfg, {"overlong_penalty", "max_resample_rounds"})
    cfg.validate()
    inputs = runner.prepare(cfg, None)
    cluster, algo = tunix_cluster.build_cluster(cfg, inputs.md, inputs.tokenizer)
    calls: list = []
    ctx = grpo_step.StepContext(cluster, algo, [_crc_reward_fn(calls)], cfg.seed, None,
                                max_resample_rounds=3, refill=inputs.batches.refill)
    grpo_step.initial_sync(ctx)
    yield ctx, inputs.batches, calls
    cluster.close()


def test_dynamic_sampling_drops_exactly_the_zero_variance_groups_and_refills(dapo_run):
    from tunix_sglang import grpo_step

    ctx, batches, calls = dapo_run
    g, b = 4, 2
    zero = [zlib.crc32(p.encode()) % 2 == 0 for p in batches.batch(1)["prompts"]]
    assert zero.count(True) == 1  # step 1 of seed 0: one informative group, one not
    calls.clear()
    example, stats = grpo_step.make_train_example(
        ctx, grpo_step.sample(ctx, batches.batch(1), 1))

    # Round 0 is the step's batch, round r the refill drawn for (seed, step 1, r).
    drawn = [batches.batch(1)] + [batches.refill(1, r) for r in range(1, len(calls))]
    for (prompts, _), batch in zip(calls, drawn, strict=True):
        assert prompts == list(np.repeat(batch["prompts"], g))
    # Exactly the groups whose rewards are all equal are dropped, over every round...
    groups = [(r, i, rew[i * g:(i + 1) * g]) for r, (_, rew) in enumerate(calls)
              for i in range(b)]
    informative = [x for x in groups if np.ptp(x[2]) > 0]
    assert stats["groups_filtered"] == len(groups) - len(informative) >= 1
    assert stats["resample_rounds"] == len(calls) - 1 >= 1
    # ...and the batch is the first B informative groups found, in order.
    assert stats["groups_trained"] == b and len(informative) >= b
    expected_adv = np.concatenate([hand_grpo_advantages(x[2], g) for x in informative[:b]])
    np.testing.assert_allclose(np.asarray(example.advantages), expected_adv, rtol=1e-5)
    assert np.asarray(example.completion_mask).any(axis=1).all()
    assert stats["num_samples"] == len(calls) * b * g


def test_dynamic_sampling_at_its_bound_trains_on_nothing_else(dapo_run):
    """Every group uninformative: 3 refills, then the batch is padding whose loss mask is
    zero, and the optimizer step's loss is exactly 0."""
    from tunix_sglang import grpo_step

    ctx, batches, calls = dapo_run
    ctx.reward_fns = [lambda prompts, completions, **_: [1.0] * len(completions)]
    example, stats = grpo_step.make_train_example(
        ctx, grpo_step.sample(ctx, batches.batch(2), 2))
    assert (stats["groups_filtered"], stats["resample_rounds"], stats["groups_trained"]) == \
        (8, 3, 0)
    assert not np.asarray(example.completion_mask).any()
    assert not np.asarray(example.advantages).any()
    assert grpo_step.update(ctx, example) == 0.0


# ---------------------------------------------------------------------------------------
# Dynamic sampling through the other rollout engines (the random tiny model's completions
# are all alike, so every group is uninformative and every step refills to its bound)
# ---------------------------------------------------------------------------------------
SMALL = ("--algorithm", "dapo", "--max-resample-rounds", "2", "--steps", "2", "--batch-size",
         "2", "--num-generations", "2", "--max-new-tokens", "8", "--eval-limit", "0")


def _rows(path) -> list[dict]:
    import json

    return [json.loads(x) for x in path.read_text().splitlines()]


def _assert_refilled(rows: list[dict]) -> None:
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # each refill round is a full rollout of the batch's shape
        assert r["num_samples"] == (1 + r["resample_rounds"]) * 2 * 2, r
        assert r["groups_filtered"] == 2 * (1 + r["resample_rounds"]) - r["groups_trained"], r
        assert r["resample_rounds"] == 2 or r["groups_trained"] == 2, r
    assert any(r["resample_rounds"] > 0 for r in rows), rows


def test_dynamic_sampling_with_remote_rollout_servers(run_cli, tmp_path):
    out = tmp_path / "run"
    p = run_cli("train", *SMALL, "--rollout-engine", "sglang_jax_remote", "--launch-servers",
                "1", "--output-dir", str(out), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(out / "metrics.jsonl")
    _assert_refilled(rows)
    assert all(r["sync_check"] == "proven" for r in rows)


def test_dynamic_sampling_on_two_processes_in_step(run_cli, tmp_path):
    """Both processes take the same filter and refill decisions (they draw the same refill
    prompts and score the same samples), so their rounds and losses agree."""
    out = tmp_path / "run"
    p = run_cli("launch", "--num-processes", "2", "--devices-per-process", "2", "--", "train",
                *SMALL, "--rollout-engine", "vanilla", "--output-dir", str(out), timeout=900)
    assert p.returncode == 0, p.stdout[-4000:]
    rows, other = _rows(out / "metrics.jsonl"), _rows(out / "metrics.process1.jsonl")
    _assert_refilled(rows)
    keys = ("loss", "groups_filtered", "resample_rounds", "groups_trained", "num_samples")
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in other]
