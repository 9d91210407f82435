"""Use, sensitively: the engine and the trainer score the same fixed tokens, whole distributions.

The probe is a fixed pseudo-random token sequence (not what either model would generate,
so no position is a near-certain greedy token whose logprob stays at 0 whatever the
weights). The engine gets its prefixes as prompts with one new token each and returns the
full next-token logits row of each (captured between its jitted forward and its sampler);
the trainer runs one forward of the whole sequence. Per position both rows become
log-softmax distributions over the vocabulary and are compared on the trainer's top-k tokens
(max |Δ logprob|) and as KL(trainer || engine).

This module is also the trainer-side reference scoring the tests check the engine against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

TOP_K = 16
NUM_POSITIONS = 8
MAX_PROBE_LEN = 11
# The probe's prefill: prefixes of lengths 4..11 (60 tokens) fit a 64-token padding, which the
# engine precompiles for it (on CPU a prefill costs in proportion to its padding; padded to a
# rollout's it cost 1.5-2 s per step here).
PROBE_TOKEN_PADDING = 64
_SEED = 20251013


@dataclasses.dataclass(frozen=True)
class ProbeSequence:
    """Fixed tokens; the engine scores the next token after each prefix length."""

    tokens: tuple[int, ...]
    lengths: tuple[int, ...]

    def prefixes(self) -> list[list[int]]:
        return [list(self.tokens[:n]) for n in self.lengths]


def probe_sequence(vocab_size: int, max_prompt_len: int) -> ProbeSequence:
    """The same sequence on every process and every run for a given vocab and length."""
    length = max(1, min(MAX_PROBE_LEN, int(max_prompt_len)))
    tokens = np.random.default_rng(_SEED).integers(0, int(vocab_size), length)
    lengths = range(max(1, length - NUM_POSITIONS + 1), length + 1)
    return ProbeSequence(tuple(int(t) for t in tokens), tuple(lengths))


def log_softmax(rows: np.ndarray) -> np.ndarray:
    x = np.asarray(rows, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(trainer_rows: np.ndarray, engine_rows: np.ndarray, k: int = TOP_K
            ) -> tuple[float, float]:
    """(max |Δ logprob| over the trainer's top-k tokens, max KL(trainer || engine)) over the
    positions; rows are raw logits [P, V]."""
    if trainer_rows.shape != engine_rows.shape:
        raise ValueError(f"logits of shape {engine_rows.shape} from the engine, "
                         f"{trainer_rows.shape} from the trainer")
    lt, le = log_softmax(trainer_rows), log_softmax(engine_rows)
    top = np.argsort(lt, axis=-1)[:, -k:]
    diff = np.abs(np.take_along_axis(lt, top, -1) - np.take_along_axis(le, top, -1))
    kl = np.sum(np.exp(lt) * (lt - le), axis=-1)
    return float(diff.max()), float(max(kl.max(), 0.0))


# ---------------------------------------------------------------------------------------
# The trainer's side: full forwards of a Tunix model
# ---------------------------------------------------------------------------------------


def _model_mesh(model):
    import jax
    from flax import nnx

    for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None and getattr(mesh, "axis_names", None):
            return mesh
    return None


def _bucket(n: int, step: int = 16) -> int:
    return max(step, -(-n // step) * step)


@functools.lru_cache(maxsize=1)
def _jitted_tunix_forward():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @jax.jit
    def forward(graphdef, state, tokens, positions, mask):
        logits, _ = nnx.merge(graphdef, state)(tokens, positions, None, mask)
        return jnp.asarray(logits, jnp.float32)

    return forward


def tunix_logits(model, seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """Float32 logits [len(seqs), L, vocab] of a Tunix model (one jitted full forward).

    Sequences are right-padded to a multiple of 16 (causal attention: padding after a
    position cannot change it) and the batch to a multiple of the model's mesh size, so
    repeated calls reuse a few compiled shapes. Inputs must be the same on every process when
    the model spans processes; the output is then gathered to every host.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    n = len(seqs)
    length = _bucket(max(len(x) for x in seqs))
    mesh = _model_mesh(model)
    per = int(mesh.devices.size) if mesh is not None else 1
    rows = -(-n // per) * per
    tokens = np.zeros((rows, length), np.int32)
    for i in range(rows):
        src = seqs[min(i, n - 1)]
        tokens[i, : len(src)] = src
    positions = np.tile(np.arange(length, dtype=np.int32)[None], (rows, 1))
    mask = np.tile(np.tril(np.ones((length, length), bool))[None], (rows, 1, 1))
    graphdef, state = nnx.split(model)
    ctx = mesh if mesh is not None else contextlib.nullcontext()
    with ctx, jax.transfer_guard("allow"):
        out = _jitted_tunix_forward()(
            graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)
        )
        if not out.is_fully_addressable:  # params spanning processes: every host gets all
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(out, tiled=True))[:n]
        return np.asarray(jax.device_get(out))[:n]


def trainer_rows(model: Any, seq: ProbeSequence) -> np.ndarray:
    """The trainer's next-token logits after each prefix of the probe: [P, vocab]."""
    logits = tunix_logits(model, [seq.tokens])[0]
    return logits[np.asarray(seq.lengths) - 1]


def tunix_token_logprobs(
    model,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    temperature: float = 0.0,
) -> np.ndarray:
    """Logprobs the Tunix model gives `completion_ids` after `prompt_ids` (full forward).

    temperature 0 or 1: log_softmax(logits); otherwise log_softmax(logits / temperature),
    as Tunix's compute_per_token_logps.
    """
    seq = [int(t) for t in prompt_ids] + [int(t) for t in completion_ids]
    n_prompt = len(prompt_ids)
    logits = tunix_logits(model, [seq])[0, n_prompt - 1 : len(seq) - 1].astype(np.float64)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    lp = log_softmax(logits)
    idx = np.asarray(completion_ids, np.int64)
    return lp[np.arange(len(idx)), idx].astype(np.float32)


def tunix_greedy(model, prompt_ids: Sequence[int], num_tokens: int) -> list[int]:
    """Greedy continuation by the Tunix model: `num_tokens` full forward passes, no KV cache."""
    seq = [int(t) for t in prompt_ids]
    for _ in range(num_tokens):
        seq.append(int(np.argmax(tunix_logits(model, [seq])[0, len(seq) - 1])))
    return seq[len(prompt_ids):]
