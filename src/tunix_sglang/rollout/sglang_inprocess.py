"""Tunix `BaseRollout` around the in-process sglang-jax engine (tunix_sglang.engine).

Built by Tunix's RLCluster for a custom engine:
    ClusterConfig(rollout_engine=functools.partial(SglangJaxRollout, engine_settings=...), ...)
RLCluster then calls `SglangJaxRollout(rollout_actor=, tokenizer=, mesh=, rollout_config=)`.

Engine shapes come from `engine_settings`, or are derived from `rollout_config`
(max_prompt_length, max_tokens_to_generate) plus `train_config` (batch_size x
num_generations, --sglang-mem-fraction-static, dtype, seed) and `model_dir`; the engine runs on
the devices of the rollout `mesh` Tunix passes (the project's --rollout-devices).

`model()` returns a private copy of the Tunix model that every `update_params` keeps equal
to what the engine holds. Not the rollout actor itself: for custom engines Tunix makes the
rollout actor *the trainer's actor*, so returning it would make `is_sharing_weights(actor,
rollout.model())` true and Tunix (and this project's step loop) would never sync the engine.
With `keep_model_copy=False` it returns None (still "not sharing"; no second copy in memory,
but `get_per_token_logps` is then unavailable).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from tunix.rl.rollout import base_rollout

from tunix_sglang.engine import EngineSettings, InProcessEngine, SyncReport
from tunix_sglang.errors import UserError
from tunix_sglang.probe import EngineReport
from tunix_sglang.probe.scoring import ProbeSequence
from tunix_sglang.rollout.common import (
    CopyBackedRollout,
    copy_params,
    hf_tokenizer,
    seed_to_int,
)

logger = logging.getLogger(__name__)


def _param_dtype_name(model) -> str:
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return str(leaves[0].dtype) if leaves else "float32"


class SglangJaxRollout(CopyBackedRollout):
    """Rollouts from an in-process sglang-jax engine, synced in memory from Tunix."""

    def __init__(
        self,
        rollout_actor: Any,
        tokenizer: Any,
        mesh: Any,
        rollout_config: base_rollout.RolloutConfig,
        *,
        engine_settings: EngineSettings | None = None,
        model_dir: Any = None,
        train_config: Any = None,
        keep_model_copy: bool = True,
        **extra: Any,
    ):
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rollout_config = rollout_config
        self.last_sync: SyncReport | None = None
        self._last_temperature = float(getattr(rollout_config, "temperature", 1.0) or 0.0)
        settings = engine_settings or self._derive_settings(
            rollout_actor, mesh, rollout_config, model_dir, train_config, extra
        )
        self.settings = settings
        self._model = copy_params(rollout_actor) if keep_model_copy else None
        self.engine = InProcessEngine(settings).start()
        # The engine starts with dummy weights: give it the actor's right away (version 0
        # until the trainer's first sync says which version they are).
        self.last_sync = self.engine.sync_from_tunix(rollout_actor, version=0)
        self._check_sizes()

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def _derive_settings(actor, mesh, rc, model_dir, train_config, extra) -> EngineSettings:
        path = extra.pop("model_path", None)
        if path is None and model_dir is not None:
            path = getattr(model_dir, "path", model_dir)
        if path is None:
            raise UserError(
                "SglangJaxRollout needs the model directory (model_dir=... or model_path=...) "
                "for the engine's config.json"
            )
        batch = extra.pop("batch_size", None)
        if batch is None and train_config is not None:
            batch = int(train_config.batch_size) * int(train_config.num_generations)
        if batch is None:
            batch = getattr(rc, "rollout_sglang_jax_max_running_requests", None) or 8
        mem = getattr(train_config, "sglang_mem_fraction_static", None)
        if mem is None:
            mem = getattr(rc, "rollout_sglang_jax_mem_fraction_static", 0.8)
        device_ids = None
        if mesh is not None:
            device_ids = tuple(int(d.id) for d in np.asarray(mesh.devices).ravel())
        kw = dict(
            mem_fraction_static=float(mem),
            dtype=str(getattr(train_config, "dtype", None) or _param_dtype_name(actor)),
            seed=int(getattr(train_config, "seed", 0) or 0),
            device_ids=device_ids,
        )
        kw.update(extra)
        return EngineSettings(
            model_path=str(path),
            max_prompt_len=int(rc.max_prompt_length),
            max_new_tokens=int(rc.max_tokens_to_generate),
            batch_size=int(batch),
            **kw,
        )

    def _check_sizes(self) -> None:
        vocab = int(self.engine._scheduler.model_config.vocab_size)  # noqa: SLF001
        n_tok = len(hf_tokenizer(self.tokenizer))
        if n_tok > vocab:
            raise UserError(f"tokenizer has {n_tok} ids but the model's vocab_size is {vocab}")

    # -- BaseRollout ----------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def generate(
        self,
        prompts: list[str],
        rollout_config: base_rollout.RolloutConfig,
        **kwargs: Any,
    ) -> base_rollout.RolloutOutput:
        max_len = int(rollout_config.max_prompt_length)
        ids = self.encode_prompts(prompts, max_len)
        temperature = float(rollout_config.temperature or 0.0)
        self._last_temperature = temperature
        samples = self.engine.generate(
            ids,
            max_new_tokens=int(rollout_config.max_tokens_to_generate),
            temperature=temperature,
            top_p=1.0 if rollout_config.top_p is None else float(rollout_config.top_p),
            top_k=rollout_config.top_k,
            seed=seed_to_int(rollout_config.seed),
            stop_token_ids=rollout_config.eos_tokens,
        )
        return self.rollout_output(ids, [s.tokens for s in samples],
                                   [s.logprobs for s in samples], max_len,
                                   [self.engine.weight_version] * len(samples))

    def update_params(self, params: Any, filter_types: Any = None,
                      version: int | None = None) -> None:
        """In-memory sync: engine weights at `version` (None: the next), caches flushed, and
        the private copy. Tunix's `sync_weights` passes no version: one per optimizer step."""
        types = tuple(filter_types) if isinstance(filter_types, (tuple, list)) else (
            (filter_types,) if filter_types is not None else ()
        )
        if any(getattr(t, "__name__", "") == "LoRAParam" for t in types):
            raise NotImplementedError(
                "LoRA weight sync into sglang-jax is not supported: merge LoRA into the base "
                "weights or use full fine-tuning"
            )
        self.last_sync = self.engine.sync_from_tunix(params, version)
        t0 = time.perf_counter()
        self.update_copy(params)
        logger.debug("rollout model copy updated in %.3fs", time.perf_counter() - t0)

    def sync_evidence(self, seq: ProbeSequence) -> list[EngineReport]:
        """The engine's side of the sync proof (tunix_sglang.probe.prove)."""
        return [self.engine.evidence(seq.prefixes())]

    def close(self) -> None:
        self.engine.shutdown()
