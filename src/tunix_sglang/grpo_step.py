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

from tunix_sglang import probe
from tunix_sglang.rollout.base import engine_rollout


@dataclasses.dataclass
class StepResult:
    step: int
    loss: float
    reward_mean: float
    reward_std: float
    completion_len_mean: float
    rollout_sec: float
    train_sec: float
    sync_sec: float  # the weight sync and its proof (proof_sec of it)
    step_sec: float
    weight_version: int  # what the rollout engine reports after this step's sync
    rollout_weight_version: int  # the version this step's samples were generated with
    mismatch_kl: float | None  # mean k3 KL(rollout || trainer) over completion tokens
    mismatch_max_abs: float | None  # max |trainer - engine logprob| over completion tokens
    trainer_logps_sec: float
    num_samples: int
    redispatched_groups: int  # remote rollout: prompt groups re-run after a server failed
    rewards_by_fn: dict[str, float]
    proof: probe.Proof

    def row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row.pop("proof")
        row.update(self.proof.metrics())
        row.update({f"reward/{k}": v for k, v in row.pop("rewards_by_fn").items()})
        return row


@dataclasses.dataclass
class StepContext:
    """What every step needs: Tunix's cluster and GRPO config, reward functions, knobs."""

    cluster: rl_cluster_lib.RLCluster
    algo: Any  # tunix GRPOConfig
    reward_fns: list[Callable[..., list[float]]]
    seed: int
    sync_check_threshold: float | None  # None: the calibrated default of the engine dtype


def trainer_version(ctx: StepContext) -> int:
    """The one weight version: optimizer steps the trainer's weights have seen. The sync
    carries it to the engine, which reports it back and stamps every sample with it."""
    return int(ctx.cluster.actor_trainer.train_steps)


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


def trainer_logps_of_rollout(ctx: StepContext, prompt_ids: jax.Array,
                             completion_ids: jax.Array) -> jax.Array:
    """The trainer's per-token logprobs [B, T] of the rollout's completion tokens, under the
    weights the rollout was generated with: the actor before this step's update. The
    off-policy work can use them as the proximal/old policy.

    Tunix's `compute_per_token_logps` on the actor's mesh, at the rollout temperature, as the
    engine's own logprobs are (`log_softmax(logits / T)`, T in (0, 1] left unscaled as
    Tunix does). Not `RLCluster.get_actor_per_token_logps`: the same computation on its
    anchor copy, plus two `gc.collect()` per call (0.4-2.3 s each, measured here).
    """
    from tunix.sft import sharding_utils

    cluster = ctx.cluster
    graphdef, state = nnx.split(cluster.actor_trainer.model)
    axis = cluster.cluster_config.training_config.data_sharding_axis
    with cluster.cluster_config.role_to_mesh[rl_cluster_lib.Role.ACTOR]:
        return common.compute_per_token_logps(
            graphdef, state,
            prompt_tokens=sharding_utils.shard_input(prompt_ids, axis),
            completion_tokens=sharding_utils.shard_input(completion_ids, axis),
            pad_id=cluster.rollout.pad_id(), eos_id=cluster.rollout.eos_id(),
            stop_gradient=True, return_logits=False,
            temperature=rollout_config(ctx).temperature)


def rollout_mismatch(trainer_logps: np.ndarray, engine_logps: np.ndarray, mask: np.ndarray
                     ) -> tuple[float, float]:
    """Train-inference mismatch on the rollout's own tokens: (mean k3 estimate of
    KL(engine || trainer) over completion tokens, max |trainer - engine logprob|).

    k3 = exp(r) - 1 - r with r = log p_trainer - log p_engine on tokens sampled by the
    engine: unbiased, always >= 0 (Schulman, "Approximating KL divergence", 2020).
    """
    r = (np.asarray(trainer_logps, np.float64) - np.asarray(engine_logps, np.float64))[mask]
    if not r.size:
        return 0.0, 0.0
    return float(np.mean(np.expm1(r) - r)), float(np.max(np.abs(r)))


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
    # Tunix's own sampler (vanilla) is the trainer's model: its samples are of the trainer's
    # version. The engine rollouts say which version each sample came from.
    engine = engine_rollout(cluster)
    versions, redispatched = {trainer_version(ctx)}, 0
    if engine is not None:
        versions = set(engine.last_samples.versions)
        redispatched = engine.last_samples.redispatched_groups
    if len(versions) != 1:
        raise probe.SyncCheckError(f"step {step}: one rollout mixed weight versions "
                                   f"{sorted(versions)}")

    width = cfg.max_tokens_to_generate
    pad, eos = cluster.rollout.pad_id(), cluster.rollout.eos_id()
    completion_ids = np.array([
        gen_utils.pad_to_length(np.asarray(t), width, pad, left=False) for t in out.tokens
    ])
    prompt_ids = jnp.asarray(out.left_padded_prompt_tokens)
    completion_mask = completion_ids != pad

    ref_logps = None
    if ctx.algo.beta != 0.0:
        ref_logps = cluster.get_ref_per_token_logps(
            prompt_tokens=prompt_ids, completion_tokens=jnp.asarray(completion_ids),
            pad_id=pad, eos_id=eos,
        )
    mismatch, logps_sec = (None, None), 0.0
    if out.logprobs is not None and engine is not None:
        t1 = time.perf_counter()
        trainer = np.asarray(_process_local(trainer_logps_of_rollout(
            ctx, prompt_ids, jnp.asarray(completion_ids))))
        engine = np.zeros_like(trainer)
        for i, lp in enumerate(out.logprobs):
            engine[i, :len(lp)] = lp[:width]
        mismatch = rollout_mismatch(trainer, engine, completion_mask)
        logps_sec = time.perf_counter() - t1

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
        rollout_weight_version=versions.pop(),
        mismatch_kl=mismatch[0],
        mismatch_max_abs=mismatch[1],
        trainer_logps_sec=logps_sec,
        num_samples=len(out.tokens),
        redispatched_groups=redispatched,
        rewards_by_fn=by_fn,
    )
    return example, stats


def _process_local(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch Tunix made global from every process's local rows
    (`shard_input`: `make_array_from_process_local_data`), i.e. the inverse."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    with jax.transfer_guard("allow"):
        local = multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh,
                                                                 x.sharding.spec)
        return np.asarray(local)


def update(ctx: StepContext, example) -> float:
    """One optimizer step through Tunix's actor trainer; returns this step's loss."""
    trainer = ctx.cluster.actor_trainer
    ctx.cluster.update_actor([example], None, skip_jit=False)
    # Tunix logs a step's loss one step late (to overlap I/O); after `train` returns, the
    # buffer of the step that just ran is the "previous" one. Reading it here makes the
    # line appear as the step finishes instead of in bursts.
    buf = trainer._prev_buffered_train_metrics  # noqa: SLF001 (Tunix 0.1.7 has no accessor)
    return float(buf.loss)


def sync_and_prove(ctx: StepContext) -> probe.Proof:
    """Push the trainer's weights to the rollout (Tunix's sync: one version per optimizer
    step), then prove they arrived and are what the engine computes with."""
    cluster = ctx.cluster
    if engine_rollout(cluster) is None:
        cluster.global_steps += 1  # Tunix does this in place of a sync
        return probe.Proof("shared", trainer_version(ctx))
    cluster.sync_weights()
    return check_sync(ctx)


def check_sync(ctx: StepContext) -> probe.Proof:
    """The proof (tunix_sglang.probe.prove) for the trainer's current version; raises
    NotArrivedError / ComputesDifferentlyError."""
    return probe.prove(ctx.cluster.rollout, ctx.cluster.actor_trainer.model, trainer_version(ctx),
                       ctx.sync_check_threshold)


def initial_sync(ctx: StepContext) -> probe.Proof:
    """Give the rollout the trainer's current (possibly restored) weights before step 1."""
    cluster = ctx.cluster
    engine = engine_rollout(cluster)
    if engine is None:
        return probe.Proof("shared", trainer_version(ctx))
    params = nnx.state(cluster.actor_trainer.model, nnx.Param)
    engine.update_params(params, (nnx.Param,), version=trainer_version(ctx))
    return check_sync(ctx)


def run_step(ctx: StepContext, batch: dict[str, np.ndarray], step: int) -> StepResult:
    """The whole step: rollout, rewards, advantages, update, weight sync and its proof."""
    t0 = time.perf_counter()
    example, stats = make_train_example(ctx, batch, step)
    t1 = time.perf_counter()
    loss = update(ctx, example)
    t2 = time.perf_counter()
    proof = sync_and_prove(ctx)
    t3 = time.perf_counter()
    return StepResult(
        step=step,
        loss=loss,
        train_sec=t2 - t1,
        sync_sec=t3 - t2,
        step_sec=t3 - t0,
        weight_version=proof.version,
        proof=proof,
        **stats,
    )
