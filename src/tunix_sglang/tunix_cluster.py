"""Tunix's RLCluster for a run, as `train`, `eval` and the step loop use it.

The meshes (trainer on its devices, rollout on the first --rollout-devices), the rollout
configs (training samples, evaluation greedy), the actor and reference models, the GRPO loss
wired into the actor trainer, the rollout engine (`rollout.engine_for`); and the persistent
JAX compilation cache every entry point (train, eval, serve) turns on.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from tunix_sglang.config import TrainConfig


def compilation_cache_dir() -> str:
    """Where `default_compilation_cache` puts JAX's persistent cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "tunix-sglang", "jax")


def default_compilation_cache() -> None:
    """A persistent JAX compilation cache unless the user chose one (restarts skip compiles)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())


def build_meshes(cfg: TrainConfig):
    """Actor/reference on the training devices, rollout on the first N (or all, shared)."""
    import jax

    devices = jax.devices()
    cfg.validate_devices(len(devices))
    train_devs, roll_devs = cfg.split_devices(devices)
    axis = (jax.sharding.AxisType.Auto,) * 2

    def mesh(devs):
        return jax.sharding.Mesh(np.array(devs).reshape(len(devs), 1), ("fsdp", "tp"),
                                 axis_types=axis)

    train_mesh = mesh(train_devs)
    return train_mesh, (train_mesh if roll_devs == train_devs else mesh(roll_devs))


def train_rollout_config(cfg: TrainConfig, eos_tokens: list[int]):
    """Tunix's RolloutConfig for training: the rollout's shapes and sampling."""
    from tunix.rl.rollout import base_rollout

    return base_rollout.RolloutConfig(
        max_tokens_to_generate=cfg.max_new_tokens,
        max_prompt_length=cfg.max_prompt_length,
        kv_cache_size=cfg.max_prompt_length + cfg.max_new_tokens + 16,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=None,
        eos_tokens=eos_tokens,
        rollout_sglang_jax_mem_fraction_static=cfg.sglang_mem_fraction_static,
    )


def eval_rollout_config(train_cfg: Any) -> Any:
    """Greedy decoding, for every engine, from one RolloutConfig: Tunix's vanilla sampler
    picks greedy (argmax) for `top_p=None` without beams; sglang-jax (and generic engines)
    read temperature 0 as greedy, and `top_k=1` says the same to engines that only look at
    top_k. Everything else (lengths, cache, eos, engine knobs) as in training."""
    return dataclasses.replace(train_cfg, temperature=0.0, top_p=None, top_k=1, seed=None)


def rollout_configs(train_cfg: Any) -> dict[Any, Any]:
    """The `rollout_config` value for Tunix's ClusterConfig: train sampling, eval greedy."""
    from tunix.rl.rl_cluster import Mode

    return {Mode.TRAIN: train_cfg, Mode.EVAL: eval_rollout_config(train_cfg)}


def build_cluster(cfg: TrainConfig, md, tokenizer):
    """Tunix RLCluster + GRPO config for this run (restores the last checkpoint if resuming)."""
    import optax
    import orbax.checkpoint as ocp
    from tunix.rl import rl_cluster as rl
    from tunix.rl.grpo.grpo_learner import GRPOConfig, GRPOLearner
    from tunix.sft import metrics_logger

    from tunix_sglang import models, rewards, rollout

    train_mesh, rollout_mesh = build_meshes(cfg)
    actor = models.load_model(md, train_mesh, cfg.dtype)
    reference = models.load_model(md, train_mesh, cfg.dtype) if cfg.beta else None
    out = cfg.output_path
    training_config = rl.RLTrainingConfig(
        actor_optimizer=optax.adamw(cfg.learning_rate, b1=0.9, b2=0.99, weight_decay=0.1),
        eval_every_n_steps=10**9,
        max_steps=None,  # the step loop is ours; Tunix's own bar would duplicate the console
        checkpoint_root_directory=str(out / "checkpoints"),
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_interval_steps=cfg.checkpoint_every, max_to_keep=3
        ),
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(
            log_dir=str(out / "tensorboard"), flush_every_n_steps=1
        ),
    )
    rollout_config = train_rollout_config(cfg, [tokenizer.eos_token_id])
    cluster_config = rl.ClusterConfig(
        role_to_mesh={rl.Role.ACTOR: train_mesh, rl.Role.REFERENCE: train_mesh,
                      rl.Role.ROLLOUT: rollout_mesh},
        rollout_engine=rollout.engine_for(cfg, md),
        training_config=training_config,
        rollout_config=rollout_configs(rollout_config),  # TRAIN samples, EVAL greedy
    )
    cluster = rl.RLCluster(actor=actor, reference=reference, tokenizer=tokenizer,
                           cluster_config=cluster_config)
    algo = GRPOConfig(num_generations=cfg.num_generations, num_iterations=1, beta=cfg.beta,
                      epsilon=cfg.epsilon)
    # The learner wires Tunix's GRPO loss into the actor trainer; its loop is not used.
    GRPOLearner(rl_cluster=cluster, algo_config=algo, reward_fns=rewards.DEFAULT_REWARD_FNS)
    return cluster, algo
