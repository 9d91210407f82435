"""One GRPO step, in one place:

    prompts -> rollout -> rewards -> advantages -> update (Tunix) -> weight sync + proof

Tunix owns the algorithm pieces (the rollout seam, reference log-probs, the GRPO loss and
optimizer step, checkpoints); this module only calls them in order and measures each phase.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.generate import utils as gen_utils
from tunix.rl import common, function_registry
from tunix.rl import rl_cluster as rl_cluster_lib

from tunix_sglang.probe import model_logprob_diff


class SyncCheckError(RuntimeError):
    """The rollout engine does not compute what the trainer computes after a sync."""


@dataclasses.dataclass
class StepResult:
    step: int
    loss: float
    reward_mean: float
    reward_std: float
    completion_len_mean: float
    rollout_sec: float
    train_sec: float
    sync_sec: float
    step_sec: float
    weight_version: int
    sync_max_logprob_diff: float
    num_samples: int
    redispatched_groups: int  # remote rollout: prompt groups re-run after a server failed
    rewards_by_fn: dict[str, float]

    def row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row.update({f"reward/{k}": v for k, v in row.pop("rewards_by_fn").items()})
        return row


@dataclasses.dataclass
class StepContext:
    """What every step needs: Tunix's cluster and GRPO config, reward functions, knobs."""

    cluster: rl_cluster_lib.RLCluster
    algo: Any  # tunix GRPOConfig
    reward_fns: list[Callable[..., list[float]]]
    seed: int
    sync_check_threshold: float
    vocab_size: int
    weight_version: int = 0


def rollout_config(ctx: StepContext):
    return ctx.cluster.get_rollout_config(rl_cluster_lib.Mode.TRAIN)


def score(ctx: StepContext, prompts: list[str], completions: list[str],
          columns: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
    """Sum of the reward functions per completion, plus each function's mean for metrics."""
    per_fn = []
    for fn in ctx.reward_fns:
        r = np.asarray(fn(prompts=prompts, completions=completions, **columns), np.float32)
        per_fn.append(r)
    rewards = np.sum(per_fn, axis=0)
    means = {fn.__name__: float(np.mean(r)) for fn, r in zip(ctx.reward_fns, per_fn, strict=True)}
    return rewards, means


def make_train_example(ctx: StepContext, batch: dict[str, np.ndarray], step: int):
    """prompts -> rollout -> rewards -> advantages: a Tunix TrainExample and step stats."""
    g = ctx.algo.num_generations
    cluster = ctx.cluster
    cfg = rollout_config(ctx)
    cfg.seed = ctx.seed * 1_000_003 + step  # fresh samples every step, reproducible per run
    repeated = {k: np.repeat(v, g, axis=0) for k, v in batch.items()}  # [B] -> [B*G]
    prompts = [str(p) for p in repeated["prompts"]]

    t0 = time.perf_counter()
    out = cluster.generate(prompts=prompts, mode=rl_cluster_lib.Mode.TRAIN)
    rollout_sec = time.perf_counter() - t0

    pad, eos = cluster.rollout.pad_id(), cluster.rollout.eos_id()
    completion_ids = np.array([
        gen_utils.pad_to_length(np.asarray(t), cfg.max_tokens_to_generate, pad, left=False)
        for t in out.tokens
    ])
    prompt_ids = jnp.asarray(out.left_padded_prompt_tokens)
    completion_mask = completion_ids != pad

    ref_logps = None
    if ctx.algo.beta != 0.0:
        ref_logps = cluster.get_ref_per_token_logps(
            prompt_tokens=prompt_ids, completion_tokens=jnp.asarray(completion_ids),
            pad_id=pad, eos_id=eos,
        )

    columns = {k: v for k, v in repeated.items() if k != "prompts"}
    rewards, by_fn = score(ctx, prompts, list(out.text), columns)
    advantages = function_registry.get_advantage_estimator(ctx.algo.advantage_estimator)(
        rewards=rewards, num_generations=g
    )
    example = common.TrainExample(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_ids != pad,
        completion_ids=jnp.asarray(completion_ids),
        completion_mask=jnp.asarray(completion_mask),
        ref_per_token_logps=ref_logps,
        advantages=jax.device_put(advantages),
        old_per_token_logps=None,  # on-policy (num_iterations == 1): ratio is exactly 1
    )
    stats = dict(
        reward_mean=float(np.mean(rewards)),
        reward_std=float(np.std(rewards)),
        completion_len_mean=float(np.mean(completion_mask.sum(axis=-1))),
        rollout_sec=rollout_sec,
        num_samples=len(out.tokens),
        redispatched_groups=int(getattr(cluster.rollout, "last_rollout_stats", {}).get(
            "redispatched_groups", 0)),
        rewards_by_fn=by_fn,
    )
    return example, stats


def update(ctx: StepContext, example) -> float:
    """One optimizer step through Tunix's actor trainer; returns this step's loss."""
    trainer = ctx.cluster.actor_trainer
    ctx.cluster.update_actor([example], None, skip_jit=False)
    # Tunix logs a step's loss one step late (to overlap I/O); after `train` returns, the
    # buffer of the step that just ran is the "previous" one. Reading it here makes the
    # line appear as the step finishes instead of in bursts.
    buf = trainer._prev_buffered_train_metrics  # noqa: SLF001 (Tunix 0.1.7 has no accessor)
    return float(buf.loss)


def sync_and_prove(ctx: StepContext) -> float:
    """Push the trainer's weights to the rollout, then prove they arrived."""
    cluster = ctx.cluster
    if _rollout_shares_actor(cluster):
        cluster.global_steps += 1  # Tunix does this in place of a sync
    else:
        cluster.sync_weights()
    ctx.weight_version += 1
    diff = check_sync(ctx)
    return diff


def check_sync(ctx: StepContext) -> float:
    """Max |Δ logprob| between rollout and trainer on a fixed probe; raises over threshold."""
    rollout = ctx.cluster.rollout
    actor = ctx.cluster.actor_trainer.model
    if hasattr(rollout, "verify_sync"):
        diff = float(rollout.verify_sync(actor))
    else:
        diff = model_logprob_diff(rollout.model(), actor, ctx.vocab_size)
    if not diff <= ctx.sync_check_threshold:
        raise SyncCheckError(
            f"weight sync v{ctx.weight_version} did not reach the rollout engine: max |Δ logprob| "
            f"{diff:.3g} > {ctx.sync_check_threshold:g} (--sync-check-threshold)"
        )
    return diff


def initial_sync(ctx: StepContext) -> float:
    """Give the rollout the trainer's current (possibly restored) weights before step 1."""
    cluster = ctx.cluster
    if not _rollout_shares_actor(cluster):
        params = nnx.state(cluster.actor_trainer.model, nnx.Param)
        cluster.rollout.update_params(params, (nnx.Param,))
    return check_sync(ctx)


def _rollout_shares_actor(cluster: rl_cluster_lib.RLCluster) -> bool:
    from tunix.rl import utils as rl_utils

    return rl_utils.is_sharing_weights(cluster.actor_trainer.model, cluster.rollout.model())


def run_step(ctx: StepContext, batch: dict[str, np.ndarray], step: int) -> StepResult:
    """The whole step: rollout, rewards, advantages, update, weight sync and its proof."""
    t0 = time.perf_counter()
    example, stats = make_train_example(ctx, batch, step)
    t1 = time.perf_counter()
    loss = update(ctx, example)
    t2 = time.perf_counter()
    diff = sync_and_prove(ctx)
    t3 = time.perf_counter()
    return StepResult(
        step=step,
        loss=loss,
        train_sec=t2 - t1,
        sync_sec=t3 - t2,
        step_sec=t3 - t0,
        weight_version=ctx.weight_version,
        sync_max_logprob_diff=diff,
        **stats,
    )
