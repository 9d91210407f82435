"""Proof that a weight sync reached the rollout: score fixed tokens on both sides."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

# A fixed, model-independent probe: a few ordinary token ids.
PROBE_PROMPT = (11, 23, 42, 7, 99, 5, 64, 31)
PROBE_COMPLETION = (17, 3, 58, 12)


def token_logprobs(model: nnx.Module, prompt: np.ndarray, completion: np.ndarray,
                   temperature: float = 1.0) -> np.ndarray:
    """Per-token log-probabilities of `completion` after `prompt` ([B, T] each), unpadded."""
    tokens = jnp.concatenate([jnp.asarray(prompt), jnp.asarray(completion)], axis=1)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    logits, _ = model(tokens, positions, None, mask)
    logp = jax_log_softmax(logits[:, prompt.shape[1] - 1 : -1] / temperature)
    picked = jnp.take_along_axis(logp, jnp.asarray(completion)[..., None], axis=-1)[..., 0]
    return np.asarray(picked)


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)


def model_logprob_diff(a: nnx.Module, b: nnx.Module, vocab_size: int) -> float:
    """Max |Δ logprob| of two Tunix models on the fixed probe (0.0 when they are one model)."""
    if a is b:
        return 0.0
    p = np.array([PROBE_PROMPT], np.int32) % vocab_size
    c = np.array([PROBE_COMPLETION], np.int32) % vocab_size
    return float(np.max(np.abs(token_logprobs(a, p, c) - token_logprobs(b, p, c))))
