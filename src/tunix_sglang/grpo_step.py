"""One GRPO step, in one place:

    sample: prompts -> rollout -> rewards          (inline, or on tunix_sglang.pipeline's thread)
    run_step: [DAPO refills] -> advantages, old policy and IS weights (tunix_sglang.importance)
              -> update x num_iterations (Tunix) -> weight sync + proof

Tunix owns the algorithm pieces (the rollout seam, reference log-probs, the loss and
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
from tunix.rl import common
from tunix.rl import rl_cluster as rl_cluster_lib

from tunix_sglang import algorithms, importance, probe, topology
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
    is_clipped_frac: float | None  # completion tokens the IS cap truncated (tis) or dropped (mis)
    staleness_max: int  # steps between the samples' weights and the trainer's
    staleness_mean: float
    stale_dropped: int  # samples more than --max-staleness behind, never trained on
    trainer_logps_sec: float
    num_samples: int
    redispatched_groups: int  # remote rollout: prompt groups re-run after a server failed
    # DAPO's dynamic sampling (0, 0, batch size without it): zero-variance groups dropped,
    # rollouts added to refill, informative groups trained on (fewer: the bound was hit).
    groups_filtered: int
    resample_rounds: int
    groups_trained: int
    rewards_by_fn: dict[str, float]
    proof: probe.Proof
    timeline: dict[str, list[float]]  # phase -> [start, end], seconds since StepContext.t0

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
    num_iterations: int = 1  # optimizer steps per rollout batch (GRPO's mu)
    importance_correction: str = "none"  # tunix_sglang.importance
    is_cap: float = 2.0
    max_staleness: int = 0  # K; > 0: the rollouts come from tunix_sglang.pipeline
    t0: float = dataclasses.field(default_factory=time.perf_counter)  # the timeline's origin
    last_end: float = 0.0  # perf_counter when the previous step finished
    # DAPO's dynamic sampling: None: off; else rollouts a step may add, of the prompts that
    # refill(step, round) draws.
    max_resample_rounds: int | None = None
    refill: Callable[[int, int], dict[str, np.ndarray]] | None = None


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


@dataclasses.dataclass
class StepRollout:
    """One rollout of G completions for each prompt of a batch, scored; rows are samples.
    Made by `sample`: inline, or on the async pipeline's thread."""

    step: int
    prompt_ids: np.ndarray  # [N, P] left-padded
    completion_ids: np.ndarray  # [N, T] right-padded with the pad id
    engine_logps: np.ndarray | None  # [N, T] the engine's logprobs of the sampled tokens
    rewards: np.ndarray  # [N] what the advantages are computed from
    rewards_by_fn: dict[str, float]  # each reward function's mean
    versions: np.ndarray  # [N] the weight version each sample was generated with
    redispatched_groups: int  # remote rollout: prompt groups re-run after a server failed
    start: float  # perf_counter at the rollout's start and end
    end: float


def sample(ctx: StepContext, batch: dict[str, np.ndarray], step: int, round_: int = 0
           ) -> StepRollout:
    """prompts -> rollout -> rewards, for the step's batch (round 0) or a refill (round r):
    every prompt `num_generations` times."""
    g = ctx.algo.num_generations
    cluster = ctx.cluster
    cfg = rollout_config(ctx)
    # Fresh samples every step and refill round, reproducible per run.
    cfg.seed = ctx.seed * 1_000_003 + step + round_ * 100_003
    repeated = {k: np.repeat(v, g, axis=0) for k, v in batch.items()}  # [B] -> [B*G]
    prompts = [str(p) for p in repeated.pop("prompts")]

    t0 = time.perf_counter()
    out = cluster.generate(prompts=prompts, mode=rl_cluster_lib.Mode.TRAIN)
    t1 = time.perf_counter()
    # Tunix's own sampler (vanilla) is the trainer's model: its samples are of the trainer's
    # version. The engine rollouts say which version each sample came from.
    engine = engine_rollout(cluster)
    versions, redispatched = [trainer_version(ctx)] * len(out.tokens), 0
    if engine is not None:
        versions = list(engine.last_samples.versions)
        redispatched = engine.last_samples.redispatched_groups

    width, pad = cfg.max_tokens_to_generate, cluster.rollout.pad_id()
    completion_ids = np.array([
        gen_utils.pad_to_length(np.asarray(t), width, pad, left=False) for t in out.tokens
    ])
    engine_logps = None  # only an engine's: Tunix's sampler is the trainer itself
    if out.logprobs is not None and engine is not None:
        engine_logps = np.zeros(completion_ids.shape, np.float32)
        for i, lp in enumerate(out.logprobs):
            engine_logps[i, :len(lp)] = lp[:width]

    rewards, by_fn = score(ctx, prompts, list(out.text), repeated)
    overlong = algorithms.overlong_rewards(ctx.algo, out.tokens)  # DAPO's, in tokens
    if overlong is not None:
        rewards = rewards + overlong
        by_fn["overlong_penalty"] = float(np.mean(overlong))
    return StepRollout(
        step=step, prompt_ids=np.asarray(out.left_padded_prompt_tokens),
        completion_ids=completion_ids, engine_logps=engine_logps, rewards=rewards,
        rewards_by_fn=by_fn, versions=np.asarray(versions, np.int64),
        redispatched_groups=redispatched, start=t0, end=t1)


def gather_groups(rounds: list[StepRollout], selection: algorithms.Selection, g: int, pad: int
                  ) -> tuple[StepRollout, np.ndarray]:
    """The selected groups of the rounds as one batch, and its completion mask (zero on
    the selection's padding groups, which then weigh nothing in the loss)."""
    rows = [(r, i * g + k) for r, i in selection.groups for k in range(g)]
    width = max(x.prompt_ids.shape[1] for x in rounds)

    def take(field: str, left_pad_to: int | None = None) -> np.ndarray:
        out = []
        for r, j in rows:
            row = getattr(rounds[r], field)[j]
            if left_pad_to is not None:
                row = np.pad(row, (left_pad_to - len(row), 0), constant_values=pad)
            out.append(row)
        return np.stack(out)

    batch = StepRollout(
        step=rounds[0].step, prompt_ids=take("prompt_ids", width),
        completion_ids=take("completion_ids"),
        engine_logps=None if rounds[0].engine_logps is None else take("engine_logps"),
        rewards=take("rewards"), rewards_by_fn={}, versions=take("versions"),
        redispatched_groups=0, start=rounds[0].start, end=rounds[-1].end)
    mask = batch.completion_ids != pad
    mask[len(rows) - selection.padding * g:] = False
    return batch, mask


def make_train_example(ctx: StepContext, first: StepRollout):
    """rollout (-> dynamic sampling) -> advantages, old policy and IS weights: a Tunix
    TrainExample and step stats."""
    g = ctx.algo.num_generations
    cluster, step = ctx.cluster, first.step
    pad, eos = cluster.rollout.pad_id(), cluster.rollout.eos_id()

    rounds = [first]
    if ctx.max_resample_rounds is None:
        selection = algorithms.Selection.everything(len(first.rewards) // g)
    else:
        # DAPO's dynamic sampling: a group whose completions all got the same reward has
        # advantage 0 everywhere (no gradient); drop it and refill the batch with groups of
        # further prompts, drawn per (seed, step, round) so a resumed run draws the same.
        def more(round_: int) -> np.ndarray:
            topology.step_barrier(f"step{step}/resample{round_}")  # all processes agree
            rounds.append(sample(ctx, ctx.refill(step, round_), step, round_))
            return rounds[-1].rewards

        selection = algorithms.dynamic_sampling(first.rewards, more, g,
                                                ctx.max_resample_rounds)
    versions = np.concatenate([r.versions for r in rounds])
    if ctx.max_staleness == 0 and len(set(versions.tolist())) != 1:
        raise probe.SyncCheckError(f"step {step}: one step's rollouts mixed weight versions "
                                   f"{sorted(set(versions.tolist()))}")
    trained, completion_mask = gather_groups(rounds, selection, g, pad)
    prompt_ids = jnp.asarray(trained.prompt_ids)
    completion_ids = jnp.asarray(trained.completion_ids)
    off_policy = ctx.num_iterations > 1 or ctx.max_staleness > 0
    # Samples more than K steps behind the trainer are never trained on (their groups
    # are masked out); the pipeline's admission makes this the exception.
    stale = importance.staleness(trainer_version(ctx), trained.versions, ctx.num_iterations)
    dropped = importance.stale_groups(stale, g, ctx.max_staleness)
    completion_mask &= ~dropped[:, None]

    ref_logps = None
    if ctx.algo.beta:  # DAPO's config has None: no KL term
        ref_logps = cluster.get_ref_per_token_logps(
            prompt_tokens=prompt_ids, completion_tokens=completion_ids, pad_id=pad, eos_id=eos,
        )
    mismatch, logps_sec = (None, None), 0.0
    trainer, behaviour = None, trained.engine_logps
    if behaviour is not None or off_policy:
        t1 = time.perf_counter()
        trainer = np.asarray(_process_local(trainer_logps_of_rollout(
            ctx, prompt_ids, completion_ids)))
        if behaviour is not None:
            mismatch = rollout_mismatch(trainer, behaviour, completion_mask)
        logps_sec = time.perf_counter() - t1

    old_logps, is_w, clipped = None, None, None
    if ctx.importance_correction != "none":
        old_logps = trainer  # proximal: the trainer's weights as the step starts
        is_w, clipped = importance.is_weights(trainer, behaviour, completion_mask,
                                              ctx.importance_correction, ctx.is_cap)
    elif off_policy:  # PPO against the behaviour policy: the engine's own logprobs
        old_logps = behaviour if behaviour is not None else trainer

    advantages = algorithms.advantages(ctx.algo, trained.rewards)
    advantages = np.where(dropped, 0.0, advantages).astype(np.float32)
    example = common.TrainExample(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_ids != pad,
        completion_ids=completion_ids,
        completion_mask=jnp.asarray(completion_mask),
        ref_per_token_logps=ref_logps,
        advantages=jax.device_put(advantages),
        # None: on-policy (one iteration, fresh samples), Tunix's ratio is exactly 1
        old_per_token_logps=None if old_logps is None else jnp.asarray(old_logps, jnp.float32),
        sampler_is_weights=None if is_w is None else jnp.asarray(is_w),
    )
    # The rollout's figures cover every sample generated this step (refills included).
    rewards = np.concatenate([r.rewards for r in rounds])
    lengths = np.concatenate([(r.completion_ids != pad).sum(axis=-1) for r in rounds])
    stats = dict(
        reward_mean=float(np.mean(rewards)),
        reward_std=float(np.std(rewards)),
        completion_len_mean=float(np.mean(lengths)),
        rollout_sec=sum(r.end - r.start for r in rounds),
        rollout_weight_version=int(versions.min()),
        mismatch_kl=mismatch[0],
        mismatch_max_abs=mismatch[1],
        is_clipped_frac=clipped,
        staleness_max=int(stale.max()),
        staleness_mean=float(stale.mean()),
        stale_dropped=int(dropped.sum()),
        trainer_logps_sec=logps_sec,
        num_samples=len(rewards),
        redispatched_groups=sum(r.redispatched_groups for r in rounds),
        groups_filtered=selection.groups_filtered,
        resample_rounds=selection.resample_rounds,
        groups_trained=selection.groups_trained,
        rewards_by_fn={k: float(np.mean([r.rewards_by_fn[k] for r in rounds]))
                       for k in rounds[0].rewards_by_fn},
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
    """`num_iterations` optimizer steps on the example through Tunix's actor trainer; returns
    their mean loss."""
    trainer = ctx.cluster.actor_trainer
    losses = []
    for _ in range(ctx.num_iterations):
        ctx.cluster.update_actor([example], None, skip_jit=False)
        # Tunix logs a step's loss one step late (to overlap I/O); after `train` returns, the
        # buffer of the step that just ran is the "previous" one. Reading it here makes the
        # line appear as the step finishes instead of in bursts.
        buf = trainer._prev_buffered_train_metrics  # noqa: SLF001 (Tunix 0.1.7: no accessor)
        losses.append(float(buf.loss))
    return float(np.mean(losses))


def sync_and_prove(ctx: StepContext, marks: dict[str, list[float]] | None = None
                   ) -> probe.Proof:
    """Push the trainer's weights to the rollout (Tunix's sync: one version per optimizer
    step), then prove they arrived and are what the engine computes with. `marks` gets the
    sync's and the proof's [start, end]."""
    cluster = ctx.cluster
    marks = {} if marks is None else marks
    t0 = time.perf_counter()
    if engine_rollout(cluster) is None:
        cluster.global_steps += 1  # Tunix does this in place of a sync
        return probe.Proof("shared", trainer_version(ctx))
    if ctx.num_iterations == 1:
        cluster.sync_weights()
    else:  # Tunix's sync counts one version per call; mu optimizer steps happened
        push_weights(ctx)
        cluster.global_steps += 1
    t1 = time.perf_counter()
    proof = check_sync(ctx)
    t2 = time.perf_counter()
    marks["sync"], marks["proof"] = [t0 - ctx.t0, t1 - ctx.t0], [t1 - ctx.t0, t2 - ctx.t0]
    return proof


def check_sync(ctx: StepContext) -> probe.Proof:
    """The proof (tunix_sglang.probe.prove) for the trainer's current version; raises
    NotArrivedError / ComputesDifferentlyError."""
    return probe.prove(ctx.cluster.rollout, ctx.cluster.actor_trainer.model, trainer_version(ctx),
                       ctx.sync_check_threshold)


def initial_sync(ctx: StepContext) -> probe.Proof:
    """Give the rollout the trainer's current (possibly restored) weights before step 1."""
    cluster = ctx.cluster
    if engine_rollout(cluster) is None:
        return probe.Proof("shared", trainer_version(ctx))
    push_weights(ctx)
    return check_sync(ctx)


def push_weights(ctx: StepContext) -> None:
    """The trainer's weights to the engine rollout, stamped with the trainer's version."""
    params = nnx.state(ctx.cluster.actor_trainer.model, nnx.Param)
    engine_rollout(ctx.cluster).update_params(params, (nnx.Param,), version=trainer_version(ctx))


def run_step(ctx: StepContext, sampled: StepRollout,
             exclusive: Callable[[Callable[[], probe.Proof]], probe.Proof] | None = None
             ) -> StepResult:
    """The step after its rollout (`sample`): rewards, advantages, update, weight sync and
    its proof (through `exclusive`: the async pipeline runs it between engine batches)."""
    t0 = time.perf_counter()
    example, stats = make_train_example(ctx, sampled)
    t1 = time.perf_counter()
    loss = update(ctx, example)
    t2 = time.perf_counter()
    marks: dict[str, list[float]] = {}
    proof = (exclusive or (lambda f: f()))(lambda: sync_and_prove(ctx, marks))
    t3 = time.perf_counter()
    # Wall time the step added: from its rollout's start, or, when that rollout overlapped
    # the previous step (async), from the previous step's end.
    step_sec, ctx.last_end = t3 - max(sampled.start, ctx.last_end), t3
    timeline = {"rollout": [sampled.start - ctx.t0, sampled.end - ctx.t0],
                "prepare": [t0 - ctx.t0, t1 - ctx.t0], "train": [t1 - ctx.t0, t2 - ctx.t0],
                **marks}
    return StepResult(
        step=sampled.step,
        loss=loss,
        train_sec=t2 - t1,
        sync_sec=t3 - t2,
        step_sec=step_sec,
        weight_version=proof.version,
        proof=proof,
        timeline=timeline,
        **stats,
    )
