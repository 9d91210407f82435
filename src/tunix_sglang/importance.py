"""Off-policy corrections on the rollout engine's logprobs: which log-probabilities are the
"old" policy of the GRPO loss, the importance weights, and how stale a sample is.

Three policies meet in a step (decoupled PPO, Hilton et al. 2022, "Batch size-invariance
for policy optimization"; as used for asynchronous RL by AReaL, Fu et al. 2025):

* behaviour  pi_behav: what the engine sampled from; its logprobs come with every sample;
* proximal   pi_prox:  the trainer's recomputation of the same tokens with its weights when
                       the step starts (`grpo_step.trainer_logps_of_rollout`, which the step
                       runs anyway to measure the train-inference mismatch);
* current    pi_theta: the weights being optimized.

Tunix's GRPO loss clips the ratio pi_theta / old and multiplies every token's loss by
`TrainExample.sampler_is_weights` before aggregating. With a correction, old = pi_prox and
the weight is the behaviour-to-proximal ratio r = pi_prox / pi_behav per token:

* ``tis``: truncated importance sampling, w = min(r, C) (Yao et al. 2025, "Your efficient
  RL framework secretly brings you off-policy RL training"; Ionides 2008 for the estimator);
* ``mis``: masked importance sampling, w = 1 where 1/C <= r <= C, else 0 (the token is
  dropped), as in verl's and slime's rollout-correction "mask" mode.

Without a correction and off-policy (mu > 1 or stale samples), old = pi_behav, the engine's
logprobs: PPO against the behaviour policy, with no trainer forward for it.
"""

from __future__ import annotations

import numpy as np


def is_weights(proximal: np.ndarray, behaviour: np.ndarray, mask: np.ndarray, mode: str,
               cap: float) -> tuple[np.ndarray, float]:
    """Per-token weights [B, T] (float32, 0 on padding) and the fraction of completion tokens
    the cap changed: truncated (``tis``, r > C) or dropped (``mis``, r outside [1/C, C])."""
    mask = np.asarray(mask, bool)
    log_r = np.asarray(proximal, np.float64) - np.asarray(behaviour, np.float64)
    r = np.exp(np.clip(log_r, -20.0, 20.0))  # the same bound Tunix puts on its log-ratio
    if mode == "tis":
        clipped = r > cap
        w = np.minimum(r, cap)
    elif mode == "mis":
        clipped = (r > cap) | (r < 1.0 / cap)
        w = np.where(clipped, 0.0, 1.0)
    else:
        raise ValueError(f"importance correction {mode!r}: use tis or mis")
    n = int(mask.sum())
    frac = float((clipped & mask).sum() / n) if n else 0.0
    return np.where(mask, w, 0.0).astype(np.float32), frac


def staleness(trainer_version: int, sample_versions: list[int], num_iterations: int
              ) -> np.ndarray:
    """Steps (of `num_iterations` optimizer steps each) between each sample's weights and
    the trainer's when it trains on it."""
    return (trainer_version - np.asarray(sample_versions, np.int64)) // num_iterations


def stale_groups(stale: np.ndarray, group_size: int, max_staleness: int) -> np.ndarray:
    """[num_samples] bool: samples of a group (the GRPO advantage's unit) holding any sample
    more than `max_staleness` steps old. The step keeps them in the batch (no new shapes to
    compile) with a zero completion mask and advantage: never trained on."""
    too_old = (np.asarray(stale) > max_staleness).reshape(-1, group_size).any(axis=1)
    return np.repeat(too_old, group_size)
