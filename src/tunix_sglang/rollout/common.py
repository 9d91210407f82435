"""What every engine-backed rollout shares: a private Tunix copy of the weights it serves.

`model()` must not return the trainer's actor (for custom engines Tunix passes the actor
itself as `rollout_actor`, and `is_sharing_weights(actor, rollout.model())` would then be
true, so nothing would ever be synced); it returns a copy that each `update_params` keeps
equal to the engine's weights, which also scores tokens for `get_per_token_logps`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tunix.rl.rollout import base_rollout

logger = logging.getLogger(__name__)


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
    out = np.full((len(ids), max_len), pad, dtype=np.int32)
    for i, t in enumerate(ids):
        if t:
            out[i, max_len - len(t):] = t[-max_len:]
    return out


class CopyBackedRollout(base_rollout.BaseRollout):
    """Shared tail of the engine rollouts: ids, the private copy, scoring with it."""

    tokenizer: Any
    _model: Any = None
    _last_temperature: float = 1.0
    # The weight version each sample of the last `generate` was produced with (the engine's
    # own version: the trainer's optimizer steps at the sync that produced its weights).
    last_versions: list[int]

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

    def rollout_output(self, ids: list[list[int]], tokens: list[np.ndarray],
                       logprobs: list[np.ndarray], max_len: int,
                       versions: list[int]) -> base_rollout.RolloutOutput:
        """Tunix's RolloutOutput: exactly the sampled ids, their text, logprobs, padded prompts
        (and `last_versions`: the weight version of each sample)."""
        self.last_versions = [int(v) for v in versions]
        texts = [self.tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in tokens]
        return base_rollout.RolloutOutput(
            text=texts, logits=None, tokens=tokens, logprobs=logprobs,
            left_padded_prompt_tokens=left_pad(ids, max_len, self.pad_id()),
        )

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

    def get_per_token_logps(self, prompt_tokens: Any, completion_tokens: Any) -> Any:
        """Logps under the current rollout policy (Tunix calls it when num_iterations > 1),
        at the temperature of the last rollout, as the engine's own logprobs are."""
        if self._model is None:
            raise NotImplementedError(
                f"{type(self).__name__}(keep_model_copy=False) keeps no Tunix model to score "
                "tokens; use num_iterations=1 or keep_model_copy=True"
            )
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
