"""sglang-jax's sampler: min_p on non-TPU, the sort's placement, its logprobs, its RNG key."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tunix_sglang.compat.base import ORIGINALS, source_of
from tunix_sglang.engine.scheduler_hooks import SPANNING_ENGINE, sampler_rng_leaves

# ---------------------------------------------------------------------------------------
# min_p filter arity
# ---------------------------------------------------------------------------------------

def min_p_filter_is_broken(fn: Callable) -> bool:
    """Behaviour: the CPU sampler passes (probs, min_ps, False); does `fn` accept it?"""
    import jax.numpy as jnp

    try:
        fn((jnp.ones((1, 2)), jnp.zeros((1,)), False))
    except ValueError as e:
        return "unpack" in str(e)
    return False


def min_p_filter_arity_needed() -> bool:
    from sgl_jax.srt.layers import sampler as sampler_mod

    return min_p_filter_is_broken(sampler_mod._apply_min_p_filter)


def fix_min_p_filter_arity() -> bool:
    """Let `_apply_min_p_filter` take the 3-tuple the non-TPU sampler passes.

    `lax.cond` traces both branches, so every non-TPU sampling call failed with "too many
    values to unpack", whether or not min_p was used.
    """
    from sgl_jax.srt.layers import sampler as sampler_mod

    fn = sampler_mod._apply_min_p_filter
    ORIGINALS["sampler._apply_min_p_filter"] = fn

    @functools.wraps(fn)
    def _apply_min_p_filter(operands):
        return fn(tuple(operands[:2]))

    sampler_mod._apply_min_p_filter = _apply_min_p_filter
    return True


# ---------------------------------------------------------------------------------------
# Sampling sorts on the host (a Python callback inside the compiled program)
# ---------------------------------------------------------------------------------------

_NOT_TPU_SAMPLING = "top_k_top_p_min_p_sampling_from_probs_jax_not_tpu_runtime"


def sampler_sorts_on_host(fn: Callable) -> bool:
    """True when the non-TPU sampling function sorts with `jax.pure_callback`."""
    return "pure_callback" in source_of(fn)


def sample_sorted_in_graph(args: tuple) -> Any:
    """Top-k / top-p / min-p sampling with the descending sort inside the program.

    Same contract as sglang-jax 0.0.2's non-TPU sampling function (its argument tuple, its
    masks and its `multinomial*` choice), but the probabilities are ordered with
    `jnp.argsort` instead of a host callback. The callback runs on one device of a mesh
    (XLA places it maximally); with a mesh spanning several JAX processes it blocked:
    process 0's callback thread waited forever for its own operand while process 1 waited
    in the collective (measured: lockstep engine hung in precompile or in the first sampled
    call). In-graph, every device runs the same sort. Ties are ordered by index.
    """
    import jax.numpy as jnp
    from jax import lax
    from sgl_jax.srt.layers import sampler as sampler_mod

    (_, probs, top_ks, top_ps, min_ps, positions, _, seeds, need_min_p, rng) = args
    order = jnp.argsort(jnp.nan_to_num(probs, nan=-jnp.inf), axis=-1, descending=True,
                        stable=True).astype(jnp.int32)
    clean = jnp.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
    ranked = jnp.take_along_axis(clean, order, axis=-1)
    cumulative = jnp.cumsum(ranked, axis=-1)  # top-p: the mass before each rank, unmasked
    ranked = jnp.where(jnp.arange(probs.shape[-1])[None, :] >= top_ks[:, None], 0.0, ranked)
    ranked = jnp.where(cumulative - ranked > top_ps[:, None], 0.0, ranked)
    ranked = lax.cond(need_min_p, lambda ops: sampler_mod._apply_min_p_filter(ops),
                      lambda ops: ops[0], (ranked, min_ps))
    choose = sampler_mod.multinomial if seeds is None else sampler_mod.multinomial_with_seed
    picked = choose((ranked, seeds, positions, rng))
    return jnp.take_along_axis(order, picked, axis=1).flatten()


def sampler_sort_in_graph_needed() -> bool:
    from sgl_jax.srt.layers import sampler as sampler_mod

    fn = getattr(sampler_mod, _NOT_TPU_SAMPLING, None)
    return fn is not None and sampler_sorts_on_host(fn)


def fix_sampler_sort_in_graph() -> bool:
    """Sort in-graph, instead of in the host callback, once this process has started an
    engine whose mesh spans processes (`scheduler_hooks.engine_devices`). Only then: XLA's
    CPU sort is slower than the host callback (measured: 25 vs 11 ms for 32 x 1,024
    probabilities, 6.8 vs 1.2 s for 32 x 151,936), and on one process's devices the callback
    is safe."""
    from sgl_jax.srt.layers import sampler as sampler_mod

    fn = getattr(sampler_mod, _NOT_TPU_SAMPLING)
    ORIGINALS[f"sampler.{_NOT_TPU_SAMPLING}"] = fn

    @functools.wraps(fn)
    def sampling(args):  # decided when the sampler is traced
        if SPANNING_ENGINE.is_set():
            return sample_sorted_in_graph(args)
        return fn(args)

    setattr(sampler_mod, _NOT_TPU_SAMPLING, sampling)
    return True


# ---------------------------------------------------------------------------------------
# Logprobs of sampled tokens
# ---------------------------------------------------------------------------------------

def sampler_loses_logprobs(sampler_cls) -> bool:
    """True when the sampler computes logprobs inside `lax.cond` and returns only ids."""
    src = source_of(sampler_cls.__call__)
    return (
        "_process_logprob_results" in src
        and "return batch_next_token_ids\n" in src
        and "lax.cond(" in src
    )


def sampler_returns_logprobs_needed() -> bool:
    from sgl_jax.srt.layers.sampler import Sampler

    return sampler_loses_logprobs(Sampler)


def fix_sampler_returns_logprobs() -> bool:
    """Return the sampled tokens' logprobs out of the jitted sampler.

    0.0.2 writes them onto `logits_output` inside a `lax.cond` branch under `jit`, so they
    never leave the compiled function and the scheduler receives None. Here the sampler
    returns `(ids, logprob_of_ids)` and `ModelRunner.sample` stores the logprobs where the
    scheduler reads them (`logits_output.next_token_logprobs`), and for the engine's capture
    (`scheduler_hooks.capture_logprobs_around`) the last logprobs, and the logits rows when
    the capture asks for them, on the runner.

    Which logprobs: those of the distribution the token was drawn from before top-k/top-p
    truncation, i.e. `log_softmax(logits / temperature)`; for greedy requests
    `log_softmax(logits)`. This is what Tunix's `compute_per_token_logps(temperature=T)`
    computes (it also leaves T=0 unscaled).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax
    from sgl_jax.srt.layers.sampler import Sampler
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    ORIGINALS["Sampler.__call__"] = Sampler.__call__
    ORIGINALS["ModelRunner.sample"] = ModelRunner.sample

    def __call__(self, logits_output, sampling_metadata, positions):
        logits = jnp.reshape(
            logits_output.next_token_logits,
            (-1, logits_output.next_token_logits.shape[-1]),
        )
        logits = self.apply_penalties(logits, sampling_metadata)
        _, rng = jax.random.split(self.rngs.params())
        ids, logprobs = lax.cond(
            sampling_metadata.is_all_greedy,
            self._greedy_sampling,
            self._regular_sampling,
            (logits, sampling_metadata, positions, rng),
        )
        ids = ids.astype(jnp.int32)
        token_logprobs = jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]
        return ids, token_logprobs

    orig_sample = ModelRunner.sample

    @functools.wraps(orig_sample)
    def sample(self, logits_output, sampling_metadata, positions):
        out = orig_sample(self, logits_output, sampling_metadata, positions)
        if isinstance(out, tuple):
            ids, token_logprobs = out
            self._tunix_sglang_last_logprobs = token_logprobs  # read by the logprob capture
            if getattr(self, "_tunix_sglang_keep_logits", False):  # only for a sync proof
                self._tunix_sglang_last_logits = logits_output.next_token_logits
            if sampling_metadata.return_logprob:
                logits_output.next_token_logprobs = token_logprobs
            return ids
        return out

    Sampler.__call__ = __call__
    ModelRunner.sample = sample
    return True


# ---------------------------------------------------------------------------------------
# Sampler random key
# ---------------------------------------------------------------------------------------

def sampler_key_is_frozen(model_runner_cls) -> bool:
    """True when nothing writes the sampler's RNG state back after a jitted call."""
    src = source_of(model_runner_cls.sample) + source_of(ORIGINALS.get("ModelRunner.sample", ""))
    init_src = source_of(ORIGINALS.get("ModelRunner.initialize_jit",
                                       model_runner_cls.initialize_jit))
    return "sampler_state_leaves" in init_src and "nnx.update(self.sampler" not in src


def sampler_rng_advances_needed() -> bool:
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    return sampler_key_is_frozen(ModelRunner)


def fix_sampler_rng_advances() -> bool:
    """Advance the sampler's RNG counter after every sampling call.

    `Sampler.__call__` draws `self.rngs.params()` inside `jit` on a merged *copy* of its
    state; the advanced counter is never written back, so every call used the same key and
    two identical calls sampled identical tokens. We bump the counter leaf that the
    (fixed) initialize_jit reads on every call.
    """
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    ORIGINALS["ModelRunner.sample.rng"] = inner = ModelRunner.sample

    @functools.wraps(inner)
    def sample(self, logits_output, sampling_metadata, positions):
        out = inner(self, logits_output, sampling_metadata, positions)
        leaves = getattr(self, "sampler_state_leaves", None)
        if leaves is not None:
            idx = getattr(self, "_tunix_sglang_rng_counts", None)
            if idx is None:
                idx = self._tunix_sglang_rng_counts = sampler_rng_leaves(self)["count"]
            if idx:
                leaves = list(leaves)
                for i in idx:
                    leaves[i] = leaves[i] + 1
                self.sampler_state_leaves = leaves
        return out

    ModelRunner.sample = sample
    return True
