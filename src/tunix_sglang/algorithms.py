"""`train --algorithm`: GRPO and the variants Tunix 0.1.7 implements, and DAPO's dynamic
sampling, which Tunix leaves as a TODO.

| algorithm | Tunix config, learner | advantage | loss aggregation | ratio clipped |
|---|---|---|---|---|
| grpo | GRPOConfig, GRPOLearner | (r - mean) / std | sequence-mean-token-mean | token, 1±ε |
| dapo | DAPOConfig, DAPOLearner | (r - mean) / std | token-mean | token, 1-ε..1+ε_high |
| drgrpo | DrGRPOConfig, DrGRPOLearner | r - mean | sequence-mean-token-scale | token, 1±ε |
| gspo | GRPOConfig, gspo-token loss | (r - mean) / std | sequence-mean-token-mean | sequence |

The loss and advantages are Tunix's (`algo_core.grpo_loss_fn`, its registered advantage
estimators, `common.aggregate_loss`); this module maps the run's config onto them, checks the
knobs, shapes DAPO's overlong rewards in tokens and picks the groups a dynamic-sampling step
trains on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tunix_sglang.errors import UserError

ALGORITHMS = ("grpo", "dapo", "drgrpo", "gspo")
# common.aggregate_loss's modes in Tunix 0.1.7.
LOSS_AGG_MODES = ("token-mean", "sequence-mean-token-mean", "sequence-mean-token-scale",
                  "seq-mean-token-sum", "sequence-mean-token-sum-norm")


def _dapo_buffer(cfg: Any) -> int:
    # The paper's L_cache = 4096 of L_max = 20480: the last fifth of the completion budget.
    return max(1, cfg.max_new_tokens // 5)


# TrainConfig fields only some algorithms use, and each one's default there (a value, or a
# function of the config). None in TrainConfig: not given (filled by `fill_defaults`).
KNOB_DEFAULTS: dict[str, dict[str, Any]] = {
    "loss_agg_mode": {"grpo": "sequence-mean-token-mean", "dapo": "token-mean",
                      "drgrpo": "sequence-mean-token-scale", "gspo": "sequence-mean-token-mean"},
    "epsilon_high": {"dapo": 0.28, "gspo": 4e-4},
    "overlong_buffer_len": {"dapo": _dapo_buffer},
    "overlong_penalty": {"dapo": 1.0},
    "max_resample_rounds": {"dapo": 4},
}
# Shared knobs whose default differs by algorithm: DAPO drops the KL term; GSPO's clip range
# is on a sequence-level ratio (the paper's 3e-4 / 4e-4; Tunix ships no GSPO default).
SHARED_DEFAULTS: dict[str, dict[str, Any]] = {"beta": {"dapo": 0.0}, "epsilon": {"gspo": 3e-4}}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def knob_help(name: str) -> str:
    """The per-algorithm defaults of a knob, for `train --help`."""
    return "; ".join(f"{a}: {'a fifth of --max-new-tokens' if callable(v) else v}"
                     for a, v in KNOB_DEFAULTS[name].items())


def fill_defaults(cfg: Any, given: set[str]) -> None:
    """Set the algorithm's defaults on `cfg` for the knobs it uses that were not given
    (YAML or flag), so config.json records the values the run used."""
    for table in (KNOB_DEFAULTS, SHARED_DEFAULTS):
        for name, by_algo in table.items():
            if name in given or cfg.algorithm not in by_algo:
                continue
            value = by_algo[cfg.algorithm]
            setattr(cfg, name, value(cfg) if callable(value) else value)


def knob(cfg: Any, name: str) -> Any:
    """A knob's value for the run: the one given, else the algorithm's default."""
    value = getattr(cfg, name)
    if value is None:
        value = KNOB_DEFAULTS[name][cfg.algorithm]
        value = value(cfg) if callable(value) else value
    return value


def validate(cfg: Any) -> None:
    """UserError (one line: the problem and the fix) for a bad algorithm or knob."""
    algo = cfg.algorithm
    if algo not in ALGORITHMS:
        raise UserError(f"--algorithm {algo!r} is unknown; use one of {', '.join(ALGORITHMS)}")
    for name, by_algo in KNOB_DEFAULTS.items():
        if getattr(cfg, name) is not None and algo not in by_algo:
            raise UserError(f"{_flag(name)} is a knob of --algorithm {' / '.join(by_algo)}; "
                            f"--algorithm {algo} does not use it (drop it)")
    if algo == "dapo" and cfg.beta:
        raise UserError(f"--beta {cfg.beta}: DAPO has no KL term; drop --beta (or the YAML "
                        "key) or set it to 0")
    if not 0.0 < cfg.epsilon < 1.0:
        raise UserError(f"--epsilon {cfg.epsilon}: the clip range must be in (0, 1), e.g. 0.2")
    if cfg.beta < 0:
        raise UserError(f"--beta {cfg.beta}: must be >= 0")
    mode = knob(cfg, "loss_agg_mode")
    if mode not in LOSS_AGG_MODES:
        raise UserError(f"--loss-agg-mode {mode!r} is unknown; use one of "
                        f"{', '.join(LOSS_AGG_MODES)}")
    if algo in KNOB_DEFAULTS["epsilon_high"]:
        high = knob(cfg, "epsilon_high")
        if high < 0:
            raise UserError(f"--epsilon-high {high}: must be >= 0 (the clip's upper range)")
        if algo == "dapo" and high < cfg.epsilon:
            raise UserError(f"--epsilon-high {high}: clip-higher needs --epsilon-high >= "
                            f"--epsilon ({cfg.epsilon})")
    if algo == "dapo":
        buffer = knob(cfg, "overlong_buffer_len")
        if not 1 <= buffer <= cfg.max_new_tokens:
            raise UserError(f"--overlong-buffer-len {buffer}: must be in [1, --max-new-tokens "
                            f"{cfg.max_new_tokens}] (the last tokens of the budget penalised)")
        if knob(cfg, "overlong_penalty") < 0:
            raise UserError(f"--overlong-penalty {cfg.overlong_penalty}: must be >= 0 "
                            "(0: no overlong reward shaping)")
        if knob(cfg, "max_resample_rounds") < 0:
            raise UserError(f"--max-resample-rounds {cfg.max_resample_rounds}: must be >= 0 "
                            "(0: drop uninformative groups without refilling)")


def max_resample_rounds(cfg: Any) -> int | None:
    """Rollouts a dynamic-sampling step may add to refill its batch; None: no dynamic
    sampling (every algorithm but DAPO)."""
    return knob(cfg, "max_resample_rounds") if cfg.algorithm == "dapo" else None


def tunix_config(cfg: Any) -> tuple[Any, type]:
    """Tunix's algorithm config for the run and the learner that wires its loss into the
    actor trainer (its own loop is not used: `grpo_step` is the loop)."""
    from tunix.rl.grpo import dapo_learner, drgrpo_learner, grpo_learner

    shared = dict(num_generations=cfg.num_generations, num_iterations=cfg.num_iterations,
                  epsilon=cfg.epsilon,
                  loss_agg_mode=knob(cfg, "loss_agg_mode"))
    if cfg.algorithm == "dapo":
        penalty = knob(cfg, "overlong_penalty")
        algo = dapo_learner.DAPOConfig(
            **shared, epsilon_high=knob(cfg, "epsilon_high"), dynamic_sampling=True,
            overlong_buffer={"enable": penalty > 0,
                             "overlong_buffer_length": knob(cfg, "overlong_buffer_len"),
                             "overlong_buffer_penalty": penalty,
                             "max_response_length": cfg.max_new_tokens})
        return algo, dapo_learner.DAPOLearner
    if cfg.algorithm == "drgrpo":
        return drgrpo_learner.DrGRPOConfig(**shared, beta=cfg.beta), drgrpo_learner.DrGRPOLearner
    algo = grpo_learner.GRPOConfig(**shared, beta=cfg.beta)
    if cfg.algorithm == "gspo":
        algo.algo_variant = algo.loss_algo = "gspo-token"
        # grpo_loss_fn reads epsilon_high from any config that has it; 0.1.7 declares the
        # field only on DAPOConfig.
        algo.epsilon_high = knob(cfg, "epsilon_high")
    return algo, grpo_learner.GRPOLearner


def advantages(algo: Any, rewards: np.ndarray) -> np.ndarray:
    """The algorithm's advantages [B*G] of the rewards [B*G]: Tunix's registered estimator
    (`grpo`: group-normalised by the std; `drgrpo`: the group mean subtracted only)."""
    from tunix.rl import algo_core, function_registry  # noqa: F401 (algo_core registers them)

    estimator = function_registry.get_advantage_estimator(algo.advantage_estimator)
    return np.asarray(estimator(rewards=rewards, num_generations=algo.num_generations))


def overlong_rewards(algo: Any, completion_tokens: Sequence[Sequence[int]]) -> np.ndarray | None:
    """DAPO's soft overlong punishment per completion, or None when the algorithm has none.

    Tunix's `dapo_learner.reward_shaping` measures `len(completion)`: given the completions'
    token ids (not their text, which would count characters), that is the paper's |y| in
    tokens: 0 up to L_max - L_cache, then falling linearly to -penalty at L_max.
    """
    buffer = getattr(algo, "overlong_buffer", None)
    if not buffer or not buffer.get("enable"):
        return None
    from tunix.rl.grpo import dapo_learner

    return np.asarray(dapo_learner.reward_shaping(
        prompts=[], completions=[list(t) for t in completion_tokens], mode=None,
        overlong_buffer=buffer), np.float32)


# ---------------------------------------------------------------------------------------
# DAPO's dynamic sampling
# ---------------------------------------------------------------------------------------


def informative_groups(rewards: np.ndarray, num_generations: int) -> np.ndarray:
    """[B] bools: True for the groups whose completions did not all get the same reward.
    Equal rewards give every completion advantage 0 (under either estimator): no gradient."""
    groups = np.asarray(rewards).reshape(-1, num_generations)
    return (groups != groups[:, :1]).any(axis=1)


@dataclasses.dataclass
class Selection:
    """The groups a step trains on, as (round, group) pairs in batch order; round 0 is the
    step's own prompts, round r >= 1 the r-th refill."""

    groups: list[tuple[int, int]]
    padding: int  # trailing groups that only keep the batch's shape: their loss mask is zero
    groups_filtered: int  # zero-variance groups dropped, over every round
    resample_rounds: int  # rollouts after the first

    @classmethod
    def everything(cls, num_groups: int) -> Selection:
        """No dynamic sampling: the step's own groups, all trained on."""
        return cls([(0, i) for i in range(num_groups)], 0, 0, 0)

    @property
    def groups_trained(self) -> int:
        return len(self.groups) - self.padding


def dynamic_sampling(rewards: np.ndarray, more: Callable[[int], np.ndarray],
                     num_generations: int, max_rounds: int) -> Selection:
    """DAPO's dynamic sampling (arXiv 2503.14476, Eq. 11: 0 < |{correct}| < G, here on the
    rewards the advantages use): keep the informative groups of `rewards` (the step's own
    rollout), and while fewer than a batch are kept, call `more(r)` (the rewards of a
    rollout of further prompts, r = 1, 2, ...) up to `max_rounds` times.

    The batch keeps its shape (B groups: no recompilation, the same on every process): the
    first B informative groups found, then, if the bound was hit first, zero-variance groups
    as padding whose loss mask the step zeroes, so the step trains on the informative groups
    found and nothing else (every loss aggregation excludes rows with an empty mask).
    """
    batch = len(rewards) // num_generations
    kept: list[tuple[int, int]] = []
    spare: list[tuple[int, int]] = []
    round_ = 0
    while True:
        ok = informative_groups(rewards, num_generations)
        kept += [(round_, int(i)) for i in np.flatnonzero(ok)]
        spare += [(round_, int(i)) for i in np.flatnonzero(~ok)]
        if len(kept) >= batch or round_ == max_rounds:
            break
        round_ += 1
        rewards = more(round_)
    kept = kept[:batch]
    padding = spare[:batch - len(kept)]
    return Selection(kept + padding, len(padding), len(spare), round_)
