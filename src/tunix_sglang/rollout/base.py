"""The rollout seam: what the step loop, the sync proof and the runner use of a rollout.

Tunix's RLCluster builds the rollout from `ClusterConfig.rollout_engine` and drives it through
`BaseRollout` (generate, update_params, model, pad/eos ids, get_per_token_logps). An engine
rollout of this project adds what Tunix has no word for, declared by `Rollout`:

* `generate_ids`: token ids in; tokens, logprobs and the weight version of every sample out
  (`generate`, Tunix's string API, is built on it and keeps them as `last_samples`);
* `update_params(params, filter_types, version=)`: a versioned sync (Tunix passes no version:
  one per optimizer step) and `weight_version`, what the engines report holding;
* `sync_evidence(seq)`: every engine's side of the sync proof (`tunix_sglang.probe.prove`);
* `close()`: stop engines, servers, threads.

One module per topology implements it: `inprocess` (the engine in this process), `host_local`
and `lockstep` (several JAX processes, over `multiprocess`), `remote` (rollout servers).
Tunix's own sampler (`--rollout-engine vanilla`) stays Tunix's: it generates with the actor
itself, which `engine_rollout` says once for every caller.

`model()` must not return the trainer's actor: for custom engines Tunix passes the actor
itself as `rollout_actor`, and `is_sharing_weights(actor, rollout.model())` would then be
true, so nothing would ever be synced. It returns a private copy that every sync keeps equal
to the engines' weights (it also scores tokens for `get_per_token_logps`); with
`keep_model_copy=False` there is none (less memory; `get_per_token_logps` unavailable).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any

import numpy as np
from tunix.rl.rollout import base_rollout

from tunix_sglang.engine import EngineSettings
from tunix_sglang.errors import UserError
from tunix_sglang.probe import EngineReport
from tunix_sglang.probe.scoring import ProbeSequence

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample, as every engine takes it (the fields of a server's /generate too)."""

    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: off
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @classmethod
    def of(cls, rc: base_rollout.RolloutConfig) -> Sampling:
        return cls(
            max_new_tokens=int(rc.max_tokens_to_generate),
            temperature=float(rc.temperature or 0.0),
            top_p=1.0 if rc.top_p is None else float(rc.top_p),
            top_k=None if rc.top_k in (None, 0) else int(rc.top_k),
            stop_token_ids=[int(t) for t in (rc.eos_tokens or [])] or None,
        )


@dataclasses.dataclass
class Samples:
    """What the engines returned for token-id prompts, in prompt order."""

    prompts: list[list[int]]  # the prompts the engines got (lockstep: process 0's)
    tokens: list[np.ndarray]  # exactly the sampled ids
    logprobs: list[np.ndarray]  # of each sampled token, under the distribution it came from
    versions: list[int]  # the weight version each sample was generated with
    redispatched_groups: int = 0  # prompt groups re-run after an engine failed (remote)


class Rollout(base_rollout.BaseRollout):
    """An engine-backed rollout: Tunix's `BaseRollout` plus versions, the proof, `close`."""

    def __init__(self, rollout_actor: Any, tokenizer: Any, mesh: Any,
                 rollout_config: base_rollout.RolloutConfig, *, keep_model_copy: bool = True):
        self.tokenizer = tokenizer
        self.mesh = mesh  # Tunix reads it (RLCluster.r2m)
        self.rollout_config = rollout_config  # the proof reads its max_prompt_length
        self.last_samples: Samples | None = None
        self._last_temperature = float(rollout_config.temperature or 0.0)
        self._model = (copy_params(rollout_actor) if keep_model_copy and rollout_actor is not None
                       else None)

    # -- what each topology implements --------------------------------------------------------
    @abc.abstractmethod
    def generate_ids(self, ids: list[list[int]], sampling: Sampling, seed: int | None
                     ) -> Samples:
        """One completion per token-id prompt (repeat a prompt for several samples)."""

    @abc.abstractmethod
    def _sync(self, params: Any, version: int | None) -> None:
        """Give every engine `params` as `version` (None: one more than now)."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """The weight version the engines hold (the trainer's optimizer steps at the sync)."""

    @abc.abstractmethod
    def sync_evidence(self, seq: ProbeSequence) -> list[EngineReport]:
        """Every engine's side of the sync proof, as it reports it itself."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engines (servers, threads) this rollout started."""

    # -- BaseRollout ------------------------------------------------------------------------
    def generate(self, prompts: list[str], rollout_config: base_rollout.RolloutConfig,
                 **kwargs: Any) -> base_rollout.RolloutOutput:
        """Tunix's generate: exactly the sampled ids, their text and logprobs, left-padded
        prompts. The samples' versions stay in `last_samples` (RLCluster.generate re-wraps
        every output in its own RolloutOutput, which has no field for them)."""
        max_len = int(rollout_config.max_prompt_length)
        sampling = Sampling.of(rollout_config)
        self._last_temperature = sampling.temperature
        s = self.generate_ids(self.encode_prompts(prompts, max_len), sampling,
                              seed_to_int(rollout_config.seed))
        self.last_samples = s
        texts = [self.tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in s.tokens]
        return base_rollout.RolloutOutput(
            text=texts, logits=None, tokens=s.tokens, logprobs=s.logprobs,
            left_padded_prompt_tokens=left_pad(s.prompts, max_len, self.pad_id()),
        )

    def update_params(self, params: Any, filter_types: Any = None,
                      version: int | None = None) -> None:
        """Every engine at `version` (None: the next; Tunix's `sync_weights` passes none: one
        per optimizer step), then the private copy."""
        types = filter_types if isinstance(filter_types, (tuple, list)) else (filter_types,)
        if any(getattr(t, "__name__", "") == "LoRAParam" for t in types):
            raise NotImplementedError(
                "LoRA weight sync into sglang-jax is not supported: merge LoRA into the base "
                "weights or use full fine-tuning")
        self._sync(params, version)
        self.update_copy(params)

    def get_per_token_logps(self, prompt_tokens: Any, completion_tokens: Any) -> Any:
        """Logps under the current rollout policy (Tunix calls it when num_iterations > 1),
        at the temperature of the last rollout, as the engine's own logprobs are."""
        if self._model is None:
            raise NotImplementedError(
                f"{type(self).__name__}(keep_model_copy=False) keeps no Tunix model to score "
                "tokens; use num_iterations=1 or keep_model_copy=True")
        from flax import nnx
        from tunix.rl import common

        graphdef, state = nnx.split(self._model)
        return common.compute_per_token_logps(
            graphdef, state, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            pad_id=self.pad_id(), eos_id=self.eos_id(), stop_gradient=True,
            return_logits=False, temperature=self._last_temperature,
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

    # -- shared by the topologies -----------------------------------------------------------
    def encode_prompts(self, prompts: list[str], max_len: int) -> list[list[int]]:
        """Token ids of each prompt; longer prompts keep their last `max_len` tokens."""
        ids = []
        for p in prompts:
            t = [int(x) for x in self.tokenizer.encode(str(p))]
            if len(t) > max_len:
                logger.warning("prompt of %d tokens truncated to the last %d", len(t), max_len)
                t = t[-max_len:]
            ids.append(t)
        return ids

    def check_vocab(self, vocab: int, whose: str) -> None:
        """Every tokenizer id must be a row of the engines' embedding."""
        n_tok = len(hf_tokenizer(self.tokenizer))
        if n_tok > vocab:
            raise UserError(f"tokenizer has {n_tok} ids but {whose} vocab_size is {vocab}")

    def update_copy(self, params: Any) -> None:
        """Make the private copy equal to `params` (fresh buffers on the copy's shardings)."""
        if self._model is None:
            return
        import jax
        import jax.numpy as jnp
        from flax import nnx

        with jax.transfer_guard("allow"):
            dst = nnx.state(self._model, nnx.Param)
            src = nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params
            new = jax.tree.map(
                lambda d, s: jax.device_put(jnp.copy(s), d.sharding).astype(d.dtype), dst, src
            )
            nnx.update(self._model, new)


def engine_rollout(cluster: Any) -> Rollout | None:
    """The cluster's engine rollout, or None when its rollout is Tunix's own sampler
    (`--rollout-engine vanilla`), which shares the actor: it generates with the trainer's own
    weights, so there is nothing to sync or prove and every sample is of the trainer's
    version. The one place the step loop, the evaluation and the runner tell them apart."""
    rollout = cluster.rollout
    if isinstance(rollout, Rollout):
        return rollout
    from tunix.rl import utils as rl_utils

    if not rl_utils.is_sharing_weights(cluster.actor_trainer.model, rollout.model()):
        raise TypeError(f"{type(rollout).__name__} is neither a tunix_sglang rollout nor "
                        "Tunix's sampler on the actor's weights")
    return None


def derive_settings(actor: Any, mesh: Any, rc: base_rollout.RolloutConfig, model_dir: Any,
                    train_config: Any, **extra: Any) -> EngineSettings:
    """The engine shapes of a rollout: prompt and completion lengths from `rc`, batch
    (prompts x generations), memory fraction, dtype and seed from the run's TrainConfig; the
    devices of the rollout `mesh` Tunix passes (the project's --rollout-devices)."""
    path = extra.pop("model_path", None)
    if path is None and model_dir is not None:
        path = getattr(model_dir, "path", model_dir)
    if path is None:
        raise UserError("the sglang-jax rollout needs the model directory (model_dir=... or "
                        "model_path=...) for the engine's config.json")
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
    return EngineSettings(model_path=str(path), max_prompt_len=int(rc.max_prompt_length),
                          max_new_tokens=int(rc.max_tokens_to_generate), batch_size=int(batch),
                          **kw)


def _param_dtype_name(model: Any) -> str:
    if model is None:
        return "float32"
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    return str(leaves[0].dtype) if leaves else "float32"


def seed_to_int(seed: Any) -> int | None:
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


def hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer behind Tunix's TokenizerAdapter (or the tokenizer itself)."""
    from tunix.generate.tokenizer_adapter import TokenizerAdapter

    return tokenizer.tokenizer if isinstance(tokenizer, TokenizerAdapter) else tokenizer


def copy_params(model: Any) -> Any:
    """A Tunix model with the same graph and freshly copied parameter arrays."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    with jax.transfer_guard("allow"):
        copied = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, state)
    return nnx.merge(graphdef, copied)


def left_pad(ids: list[list[int]], max_len: int, pad: int) -> np.ndarray:
    """[len(ids), max_len] int32, each row's last tokens at the right, `pad` before them."""
    out = np.full((len(ids), max_len), pad, dtype=np.int32)
    for i, t in enumerate(ids):
        if t:
            out[i, max_len - len(t):] = t[-max_len:]
    return out
