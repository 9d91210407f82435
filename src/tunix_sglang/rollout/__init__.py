"""Rollout engines behind one seam (`base.Rollout`): what `--rollout-engine NAME` builds.

Tunix's `ClusterConfig.rollout_engine` takes its own engine name or a `BaseRollout`
subclass (or a `functools.partial` of one); `engine_for` returns that value:

    vanilla             Tunix's own sampler, on the actor's weights
    sglang_jax          one process: inprocess.InProcessRollout; several (--multihost-mode):
                        host_local.HostLocalRollout or lockstep.LockstepRollout
    sglang_jax_remote   remote.RemoteRollout, the controller of rollout servers

The engine rollouts keep no copy of the model (`keep_model_copy=False`): the step builds the
loss's old policy itself (the engine's logprobs, or the trainer's recomputation: `grpo_step`),
so Tunix never asks a rollout to score tokens, and the copy would hold one more model's worth
of memory (0.75 GB for a Qwen3-0.6B shape).
"""

from __future__ import annotations

import functools
from typing import Any

from tunix_sglang.config import TrainConfig
from tunix_sglang.errors import UserError


def engine_for(cfg: TrainConfig, model_dir: Any) -> Any:
    """The `rollout_engine` value for Tunix's ClusterConfig."""
    if cfg.rollout_engine == "vanilla":
        return "vanilla"  # Tunix's own sampler: the reference and the fallback
    if cfg.rollout_engine == "sglang_jax":
        import jax

        try:
            if jax.process_count() == 1:
                from tunix_sglang.rollout.inprocess import InProcessRollout as cls
            elif cfg.multihost_mode == "lockstep":
                from tunix_sglang.rollout.lockstep import LockstepRollout as cls
            else:
                from tunix_sglang.rollout.host_local import HostLocalRollout as cls
        except ImportError as e:
            raise UserError(
                f"--rollout-engine sglang_jax is not available ({e}); use --rollout-engine vanilla"
            ) from None
        return functools.partial(cls, model_dir=model_dir, train_config=cfg,
                                 keep_model_copy=False)
    if cfg.rollout_engine == "sglang_jax_remote":
        from tunix_sglang.rollout.remote import RemoteRollout

        return functools.partial(RemoteRollout, model_dir=model_dir, train_config=cfg,
                                 servers=cfg.rollout_servers, launch_servers=cfg.launch_servers,
                                 keep_model_copy=False)
    raise UserError(f"--rollout-engine {cfg.rollout_engine!r} is unknown")
