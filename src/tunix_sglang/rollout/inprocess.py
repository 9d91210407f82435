"""The in-process sglang-jax engine (tunix_sglang.engine) as a rollout, synced in memory.

Built by Tunix's RLCluster for a custom engine:
    ClusterConfig(rollout_engine=functools.partial(InProcessRollout, model_dir=..., ...))
RLCluster then calls `InProcessRollout(rollout_actor=, tokenizer=, mesh=, rollout_config=)`.

Engine shapes come from `engine_settings`, or are derived from `rollout_config` and the run's
TrainConfig (`base.derive_settings`); the engine runs on the devices of the rollout `mesh`
Tunix passes (the project's --rollout-devices). The multi-process topologies (host_local,
lockstep) are this rollout with their own engine placement, start-up and calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tunix.rl.rollout import base_rollout

from tunix_sglang.engine import EngineSettings, InProcessEngine, Sample, SyncReport
from tunix_sglang.probe import EngineReport
from tunix_sglang.probe.scoring import ProbeSequence
from tunix_sglang.rollout.base import Rollout, Samples, Sampling, derive_settings


class InProcessRollout(Rollout):
    """Rollouts from an sglang-jax engine in this process."""

    engine_class: type[InProcessEngine] = InProcessEngine

    def __init__(self, rollout_actor: Any, tokenizer: Any, mesh: Any,
                 rollout_config: base_rollout.RolloutConfig, *,
                 engine_settings: EngineSettings | None = None, model_dir: Any = None,
                 train_config: Any = None, keep_model_copy: bool = True, **extra: Any):
        """Tunix calls it with the first four (the rest come from `rollout.engine_for`);
        `extra`: EngineSettings fields that override the derived ones."""
        super().__init__(rollout_actor, tokenizer, mesh, rollout_config,
                         keep_model_copy=keep_model_copy)
        self.train_config = train_config
        settings = engine_settings or derive_settings(rollout_actor, mesh, rollout_config,
                                                      model_dir, train_config, **extra)
        self.settings = self._place(settings, given=engine_settings is not None)
        self.engine = self._start(self.settings)
        # The engine starts with dummy weights: give it the actor's right away (version 0
        # until the trainer's first sync says which version they are).
        self.last_sync: SyncReport = self._engine_call(
            lambda: self.engine.sync_from_tunix(rollout_actor, version=0),
            "initial weight sync")
        self.check_vocab(int(self.engine._scheduler.model_config.vocab_size),  # noqa: SLF001
                         "the model's")

    # -- what the multi-process topologies change ---------------------------------------------
    def _place(self, settings: EngineSettings, given: bool) -> EngineSettings:
        """The settings of this process's engine (`given`: passed in, not derived)."""
        return settings

    def _start(self, settings: EngineSettings) -> InProcessEngine:
        return self.engine_class(settings).start()

    def _engine_call(self, fn: Callable[[], Any], what: str) -> Any:
        """Every engine call of the rollout goes through here (lockstep watches them)."""
        return fn()

    # -- Rollout ------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def generate_ids(self, ids: list[list[int]], sampling: Sampling, seed: int | None
                     ) -> Samples:
        samples = self._generate_here(ids, sampling, seed, "generate")
        return Samples(ids, [s.tokens for s in samples], [s.logprobs for s in samples],
                       [self.engine.weight_version] * len(samples))

    def _generate_here(self, ids: list[list[int]], sampling: Sampling, seed: int | None,
                       what: str) -> list[Sample]:
        """This process's engine on `ids` (none: no call)."""
        if not ids:
            return []
        return self._engine_call(
            lambda: self.engine.generate(ids, seed=seed, **dataclasses.asdict(sampling)), what)

    def _sync(self, params: Any, version: int | None) -> None:
        """In memory: the engine's weights at `version`, its caches flushed."""
        self.last_sync = self._engine_call(
            lambda: self.engine.sync_from_tunix(params, version), "weight sync")

    def sync_evidence(self, seq: ProbeSequence) -> list[EngineReport]:
        return [self._engine_call(lambda: self.engine.evidence(seq.prefixes()), "sync proof")]

    def close(self) -> None:
        self.engine.shutdown()
