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

logger = logging.getLogger(__name__)


def _seed_to_int(seed: Any) -> int | None:
    """RolloutConfig.seed may be an int, a numpy/jax scalar or a PRNG key array."""
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)):
        return int(seed) & 0x7FFFFFFF
    import jax

    arr = seed
    if hasattr(arr, "dtype") and jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        arr = jax.random.key_data(arr)
    flat = np.asarray(jax.device_get(arr)).astype(np.uint64).ravel()
    h = np.uint64(1469598103934665603)
    for v in flat:  # FNV-style fold of the key words into one int
        h = (h ^ v) * np.uint64(1099511628211)
    return int(h & np.uint64(0x7FFFFFFF))


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer behind Tunix's TokenizerAdapter (or the tokenizer itself)."""
    from tunix.generate.tokenizer_adapter import TokenizerAdapter

    return tokenizer.tokenizer if isinstance(tokenizer, TokenizerAdapter) else tokenizer


def _param_dtype_name(model) -> str:
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return str(leaves[0].dtype) if leaves else "float32"


def _copy_params(model):
    """A Tunix model with the same graph and freshly copied parameter arrays."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    with jax.transfer_guard("allow"):
        copied = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, state)
    return nnx.merge(graphdef, copied)


class SglangJaxRollout(base_rollout.BaseRollout):
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
        verify_on_update: bool = False,
        verify_threshold: float = 1e-4,
        **extra: Any,
    ):
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rollout_config = rollout_config
        self.verify_on_update = verify_on_update
        self.verify_threshold = verify_threshold
        self.last_sync: SyncReport | None = None
        self.last_sync_diff: float | None = None
        self._last_temperature = float(getattr(rollout_config, "temperature", 1.0) or 0.0)
        settings = engine_settings or self._derive_settings(
            rollout_actor, mesh, rollout_config, model_dir, train_config, extra
        )
        self.settings = settings
        self._model = _copy_params(rollout_actor) if keep_model_copy else None
        self.engine = InProcessEngine(settings).start()
        # The engine starts with dummy weights: give it the actor's right away.
        self.last_sync = self.engine.sync_from_tunix(rollout_actor)
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
        n_tok = len(_hf_tokenizer(self.tokenizer))
        if n_tok > vocab:
            raise UserError(f"tokenizer has {n_tok} ids but the model's vocab_size is {vocab}")

    # -- BaseRollout ----------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate(
        self,
        prompts: list[str],
        rollout_config: base_rollout.RolloutConfig,
        **kwargs: Any,
    ) -> base_rollout.RolloutOutput:
        max_len = int(rollout_config.max_prompt_length)
        pad = self.pad_id()
        ids = []
        for p in prompts:
            t = self._encode(str(p))
            if len(t) > max_len:
                logger.warning("prompt of %d tokens truncated to the last %d", len(t), max_len)
                t = t[-max_len:]
            ids.append(t)
        temperature = float(rollout_config.temperature or 0.0)
        self._last_temperature = temperature
        samples = self.engine.generate(
            ids,
            max_new_tokens=int(rollout_config.max_tokens_to_generate),
            temperature=temperature,
            top_p=1.0 if rollout_config.top_p is None else float(rollout_config.top_p),
            top_k=rollout_config.top_k,
            seed=_seed_to_int(rollout_config.seed),
            stop_token_ids=rollout_config.eos_tokens,
        )
        left = np.full((len(ids), max_len), pad, dtype=np.int32)
        for i, t in enumerate(ids):
            if t:
                left[i, max_len - len(t) :] = t
        tokens = [s.tokens for s in samples]
        texts = [self.tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in tokens]
        return base_rollout.RolloutOutput(
            text=texts,
            logits=None,
            tokens=tokens,
            left_padded_prompt_tokens=left,
            logprobs=[s.logprobs for s in samples],
        )

    def update_params(self, params: Any, filter_types: Any = None) -> None:
        """In-memory sync: engine weights, caches flushed, version bumped (+ copy, proof)."""
        from flax import nnx

        types = tuple(filter_types) if isinstance(filter_types, (tuple, list)) else (
            (filter_types,) if filter_types is not None else ()
        )
        if any(getattr(t, "__name__", "") == "LoRAParam" for t in types):
            raise NotImplementedError(
                "LoRA weight sync into sglang-jax is not supported: merge LoRA into the base "
                "weights or use full fine-tuning"
            )
        self.last_sync = self.engine.sync_from_tunix(params)
        if self._model is not None:
            import jax
            import jax.numpy as jnp

            t0 = time.perf_counter()
            with jax.transfer_guard("allow"):
                dst = nnx.state(self._model, nnx.Param)
                src = params if not isinstance(params, nnx.Module) else nnx.state(
                    params, nnx.Param
                )
                new = jax.tree.map(
                    lambda d, s: jax.device_put(jnp.copy(s), d.sharding).astype(d.dtype),
                    dst, src,
                )
                nnx.update(self._model, new)
            logger.debug("rollout model copy updated in %.3fs", time.perf_counter() - t0)
        if self.verify_on_update and self._model is not None:
            diff = self.verify_sync(self._model)
            if not diff <= self.verify_threshold:
                raise RuntimeError(
                    f"weight sync v{self.weight_version} not proven: max |Δ logprob| {diff:.3g}"
                    f" > {self.verify_threshold:g}"
                )

    def verify_sync(self, trainer_model: Any) -> float:
        """Max |Δ logprob| between the engine and `trainer_model` on the fixed probe."""
        diff = self.engine.probe_logprob_diff(trainer_model)
        self.last_sync_diff = diff
        return diff

    def get_per_token_logps(self, prompt_tokens, completion_tokens):
        """Logps of the current rollout policy (Tunix calls it only when num_iterations > 1).

        Computed with the private Tunix copy of the engine's weights, at the temperature of
        the last rollout (as the engine's own logprobs are).
        """
        if self._model is None:
            raise NotImplementedError(
                "SglangJaxRollout(keep_model_copy=False) keeps no Tunix model to score tokens; "
                "use num_iterations=1 or keep_model_copy=True"
            )
        from flax import nnx
        from tunix.rl import common

        graphdef, state = nnx.split(self._model)
        return common.compute_per_token_logps(
            graphdef,
            state,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            pad_id=self.pad_id(),
            eos_id=self.eos_id(),
            stop_gradient=True,
            return_logits=False,
            temperature=self._last_temperature,
        )

    def pad_id(self) -> int:
        tok = self.tokenizer
        if hasattr(tok, "pad_id"):
            return int(tok.pad_id())
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def eos_id(self) -> int:
        tok = self.tokenizer
        if hasattr(tok, "eos_id"):
            return int(tok.eos_id())
        return int(tok.eos_token_id)

    def model(self) -> Any:
        return self._model

    def close(self) -> None:
        self.engine.shutdown()
