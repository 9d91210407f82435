"""Fixes to released sglang-jax (0.0.2) for an in-process engine on CPU.

Each fix is one function that inspects the installed code (source text, attributes or
behaviour), patches it only when the problem is present, keeps the original callable in
`ORIGINALS` (so tests can show the original is broken) and returns True when it patched.
`apply()` runs them all once and records the active ones with `compat.record`.

These are monkeypatches of this process only. The engine runs with
`enable_single_process=True`: scheduler and detokenizer are threads of this process (no
"spawn" children, verified by tests/test_compat_sglang.py), so patching here is enough.

Problems handled (numbers refer to /work/shared/notes/dependencies-on-cpu.md):
  1  NativeAttention registered twice as a pytree             -> native_attention_pytree
  2  `_apply_min_p_filter` gets a 3-tuple, unpacks 2           -> min_p_filter_arity
  3  jitted forward closes over its weights                    -> forward_reads_weights
  5  logprobs: logits not padded / lost inside `lax.cond`      -> logprob_logits_padding,
                                                                  sampler_returns_logprobs
  7  idle scheduler loop never sleeps                          -> idle_scheduler_waits
  8  (engine design: one long-lived asyncio loop thread; see tunix_sglang.engine)
  11 sampler random key never advances between calls          -> sampler_rng_advances
  found here:
     scheduler errors SIGQUIT the whole process (and the watchdog signals the *parent*
     process)                                                  -> scheduler_errors_contained
     process-wide SIGCHLD handler reaps any child of the trainer, SIGQUIT handler kills the
     process tree, multiprocessing resource tracker disabled  -> keep_process_signal_handlers
     importing the engine disables `threading._register_atexit` (thread pools are no longer
     joined at exit: async checkpoint writes can be cut off) -> threading_atexit_restored
     mesh built from all of `jax.devices()`                    -> engine_device_subset
     one call's requests scheduled in timing-dependent pieces  -> engine_call_one_batch
     non-TPU sampler sorts in a host callback (blocks a mesh spanning processes)
                                                               -> sampler_sort_in_graph
     CPU attention (decode and prefill) against every key of the batch
                                                               -> sglang_jax_cpu_forward.py
Problem 6 (page_size > 1 wrong on CPU) is a configuration rule, in tunix_sglang.engine.
Problem 10 (wrong output ids with the engine's tokenizer) is avoided by
`skip_tokenizer_init=True`, also in the engine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from tunix_sglang.compat import record

logger = logging.getLogger(__name__)

# name -> the callable the fix replaced (for tests and for `doctor`).
ORIGINALS: dict[str, Any] = {}
_APPLIED: dict[str, bool] = {}
_LOCK = threading.RLock()


def _src(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _module_file_source(modname: str) -> str:
    """Source text of a module without importing it."""
    spec = importlib.util.find_spec(modname)
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------------
# threading._register_atexit: sgl_jax.srt.entrypoints.engine replaces it at import.
# ---------------------------------------------------------------------------------------

def fix_threading_atexit_restored() -> bool:
    """Import the engine module without losing `threading._register_atexit`.

    engine.py does `threading._register_atexit = lambda *a, **k: None` at import, for the
    whole process: `concurrent.futures` thread pools (Orbax async checkpointing, data
    loaders) are then no longer joined at interpreter exit. We import it once and put the
    original back; the engine never relies on it (we never create threads at exit).
    """
    import sys

    if "sgl_jax.srt.entrypoints.engine" in sys.modules:
        mod_src = _src(sys.modules["sgl_jax.srt.entrypoints.engine"])
    else:
        mod_src = _module_file_source("sgl_jax.srt.entrypoints.engine")
    if "threading._register_atexit" not in mod_src:
        return False
    original = ORIGINALS.setdefault("threading._register_atexit", threading._register_atexit)
    import sgl_jax.srt.entrypoints.engine  # noqa: F401  (the import is the point)

    if threading._register_atexit is original:
        return False
    ORIGINALS["threading._register_atexit.replacement"] = threading._register_atexit
    threading._register_atexit = original
    return True


# ---------------------------------------------------------------------------------------
# 1. NativeAttention pytree registration
# ---------------------------------------------------------------------------------------

_NATIVE_MOD = "sgl_jax.srt.layers.attention.native_backend"


def native_attention_registration_is_duplicate() -> bool:
    """True when native_backend registers an nnx.Module subclass as a pytree again."""
    import jax
    from flax import nnx

    src = _module_file_source(_NATIVE_MOD)
    if "@register_pytree_node_class" not in src:
        return False

    # Behaviour: does flax already register every nnx.Module subclass?
    class _Probe(nnx.Module):
        def tree_flatten(self):
            return (), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls()

    try:
        jax.tree_util.register_pytree_node_class(_Probe)
    except ValueError as e:
        return "Duplicate" in str(e)
    return False


def fix_native_attention_pytree() -> bool:
    """Import native_backend with a registration that tolerates an existing one (notes 1).

    flax 0.12 registers every nnx.Module as a pytree; native_backend.py:13 registers
    NativeAttention again and the import raises "Duplicate custom PyTreeDef type
    registration", which kills the CPU attention backend. flax's own registration already
    flattens the module, so skipping the second one is all that is needed.
    """
    import sys

    import jax.tree_util as jtu

    if _NATIVE_MOD in sys.modules:
        return bool(_APPLIED.get("native_attention_pytree"))
    if not native_attention_registration_is_duplicate():
        return False
    original = jtu.register_pytree_node_class
    ORIGINALS["jax.tree_util.register_pytree_node_class"] = original

    def tolerant(cls):
        try:
            return original(cls)
        except ValueError as e:
            if "Duplicate custom PyTreeDef" not in str(e):
                raise
            return cls

    jtu.register_pytree_node_class = tolerant
    try:
        importlib.import_module(_NATIVE_MOD)
    finally:
        jtu.register_pytree_node_class = original
    return True


# ---------------------------------------------------------------------------------------
# 2. min_p filter arity
# ---------------------------------------------------------------------------------------

def min_p_filter_is_broken(fn: Callable) -> bool:
    """Behaviour: the CPU sampler passes (probs, min_ps, False); does `fn` accept it?"""
    import jax.numpy as jnp

    try:
        fn((jnp.ones((1, 2)), jnp.zeros((1,)), False))
    except ValueError as e:
        return "unpack" in str(e)
    return False


def fix_min_p_filter_arity() -> bool:
    """Let `_apply_min_p_filter` take the 3-tuple the non-TPU sampler passes (notes 2).

    `lax.cond` traces both branches, so every non-TPU sampling call failed with "too many
    values to unpack", whether or not min_p was used.
    """
    from sgl_jax.srt.layers import sampler as sampler_mod

    fn = sampler_mod._apply_min_p_filter
    if getattr(fn, "_tunix_sglang_fix", False) or not min_p_filter_is_broken(fn):
        return False
    ORIGINALS["sampler._apply_min_p_filter"] = fn

    @functools.wraps(fn)
    def _apply_min_p_filter(operands):
        return fn(tuple(operands[:2]))

    _apply_min_p_filter._tunix_sglang_fix = True
    sampler_mod._apply_min_p_filter = _apply_min_p_filter
    return True


# ---------------------------------------------------------------------------------------
# Sampling sorts on the host (a Python callback inside the compiled program)
# ---------------------------------------------------------------------------------------

def sampler_sorts_on_host(fn: Callable) -> bool:
    """True when the non-TPU sampling function sorts with `jax.pure_callback`."""
    return "pure_callback" in _src(fn)


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


# Set (for good) once this process starts an engine whose mesh spans processes; only then
# is the in-graph sort used. XLA's CPU sort is slower than the host callback (measured:
# 25 vs 11 ms for 32 x 1,024 probabilities, 6.8 vs 1.2 s for 32 x 151,936), and on one
# process's devices the callback is safe.
_SORT_IN_GRAPH = threading.Event()


def mesh_spans_processes(devices: Sequence[Any] | None) -> bool:
    """True when an engine on `devices` (None: every device) spans several JAX processes."""
    import jax

    if devices is None:
        return jax.process_count() > 1
    return len({getattr(d, "process_index", 0) for d in devices}) > 1


def fix_sampler_sort_in_graph() -> bool:
    """Sort in-graph, instead of in the host callback, on meshes spanning processes."""
    from sgl_jax.srt.layers import sampler as sampler_mod

    name = "top_k_top_p_min_p_sampling_from_probs_jax_not_tpu_runtime"
    fn = getattr(sampler_mod, name, None)
    if fn is None or getattr(fn, "_tunix_sglang_fix", False) or not sampler_sorts_on_host(fn):
        return False
    ORIGINALS[f"sampler.{name}"] = fn

    @functools.wraps(fn)
    def sampling(args):  # decided when the sampler is traced
        return sample_sorted_in_graph(args) if _SORT_IN_GRAPH.is_set() else fn(args)

    sampling._tunix_sglang_fix = True
    setattr(sampler_mod, name, sampling)
    return True


# ---------------------------------------------------------------------------------------
# 3. The jitted forward must read the weights the sync writes
# ---------------------------------------------------------------------------------------

def forward_closes_over_weights(model_runner_cls) -> bool:
    """True when `initialize_jit` binds the weight leaves into the closure once."""
    src = _src(model_runner_cls.initialize_jit)
    return "model_state_leaves" in src and "self.model_state_leaves" not in src


def place_replicated(x, sharding):
    """`x` replicated on `sharding`, also when the sharding spans several processes.

    `jax.device_put` refuses to move an array committed to one device onto devices of other
    processes ("...represents addressable devices"), and typed PRNG key arrays onto any
    non-addressable sharding. Every process holds the same value here (the engine was
    created from the same seed everywhere), so each places its host copy: numpy for plain
    arrays, the raw key data re-wrapped (same key implementation) for typed keys.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not isinstance(x, jax.Array) or sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=impl)
    return jax.device_put(np.asarray(x), sharding)


def _initialize_jit_reading_attributes(self) -> None:
    """Replacement for ModelRunner.initialize_jit (0.0.2 semantics, same jitted programs).

    The weight leaves and the sampler state are read from `self.model_state_leaves` /
    `self.sampler_state_leaves` on every call, so assigning new (same shape, dtype and
    sharding) leaves changes what the engine computes without recompiling.
    """
    import jax
    from flax import nnx

    model_def, model_state = nnx.split(self.model)
    leaves, model_state_def = jax.tree_util.tree_flatten(model_state)
    sampler_def, sampler_state = nnx.split(self.sampler)
    s_leaves, sampler_state_def = jax.tree_util.tree_flatten(sampler_state)
    mesh = getattr(self, "mesh", None)
    if mesh is not None:
        # The sampler's RNG state is created on the default device; put it on the engine's
        # mesh (replicated), or an engine on other devices fails with "incompatible devices".
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        s_leaves = [place_replicated(x, replicated) for x in s_leaves]

    self.model_def = model_def
    self.model_state_def = model_state_def
    self.model_state_leaves = leaves
    self.sampler_def = sampler_def
    self.sampler_state_def = sampler_state_def
    self.sampler_state_leaves = s_leaves

    @functools.partial(jax.jit, donate_argnames=["token_to_kv_pool"],
                       static_argnames=["model_state_def"])
    def jitted_run_model(model_def, model_state_def, model_state_leaves, forward_batch,
                         token_to_kv_pool, logits_metadata):
        state = jax.tree_util.tree_unflatten(model_state_def, model_state_leaves)
        model = nnx.merge(model_def, state)
        return model(forward_batch, token_to_kv_pool, logits_metadata)

    @functools.partial(jax.jit, static_argnames=["sampler_state_def"])
    def jitted_sampler(sampler_def, sampler_state_def, sampler_state_leaves, *args):
        state = jax.tree_util.tree_unflatten(sampler_state_def, sampler_state_leaves)
        sampler = nnx.merge(sampler_def, state)
        return sampler(*args)

    def run_model_wrapper(forward_batch, logits_metadata):
        return jitted_run_model(self.model_def, self.model_state_def,
                                self.model_state_leaves, forward_batch,
                                self.token_to_kv_pool, logits_metadata)

    def sampler_wrapper(*args):
        return jitted_sampler(self.sampler_def, self.sampler_state_def,
                              self.sampler_state_leaves, *args)

    self.jitted_run_model = run_model_wrapper
    self.jitted_sampler = sampler_wrapper


def fix_forward_reads_weights() -> bool:
    """Make ModelRunner's jitted forward read its weights per call (notes 3)."""
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    if getattr(ModelRunner.initialize_jit, "_tunix_sglang_fix", False):
        return False
    if not forward_closes_over_weights(ModelRunner):
        return False
    ORIGINALS["ModelRunner.initialize_jit"] = ModelRunner.initialize_jit
    _initialize_jit_reading_attributes._tunix_sglang_fix = True
    ModelRunner.initialize_jit = _initialize_jit_reading_attributes
    return True


# ---------------------------------------------------------------------------------------
# 5. Logprobs of sampled tokens
# ---------------------------------------------------------------------------------------

def logits_not_padded_for_logprobs(processor_cls) -> bool:
    """True when the input-logprob branch keeps only real rows of the sampled logits."""
    src = _src(processor_cls.__call__)
    return "logits[sample_indices]" in src and "_tunix_sglang" not in src


def fix_logprob_logits_padding() -> bool:
    """Pad sampled logits back to the padded batch when logprobs are requested (notes 5).

    With `return_logprob=True`, LogitsProcessor keeps one row per *real* request while the
    sampling metadata (temperatures...) has one per *padded* request: "Temperature batch
    size 8 doesn't match logits batch size 1". Zero rows for the padding are discarded by
    the scheduler (it keeps `[:real_bs]`).
    """
    import jax.numpy as jnp
    from sgl_jax.srt.layers.logits_processor import LogitsProcessor

    call = LogitsProcessor.__call__
    if getattr(call, "_tunix_sglang_fix", False) or not logits_not_padded_for_logprobs(
        LogitsProcessor
    ):
        return False
    ORIGINALS["LogitsProcessor.__call__"] = call

    @functools.wraps(call)
    def __call__(self, hidden_states, lm_head, logits_metadata):
        out = call(self, hidden_states, lm_head, logits_metadata)
        seq_lens = logits_metadata.extend_seq_lens
        if (
            logits_metadata.forward_mode.is_extend()
            and logits_metadata.extend_return_logprob
            and seq_lens is not None
        ):
            padded_bs = seq_lens.shape[0]
            rows = out.next_token_logits.shape[0]
            if rows < padded_bs:
                out.next_token_logits = jnp.pad(
                    out.next_token_logits, ((0, padded_bs - rows), (0, 0))
                )
        return out

    __call__._tunix_sglang_fix = True
    LogitsProcessor.__call__ = __call__
    return True


def sampler_loses_logprobs(sampler_cls) -> bool:
    """True when the sampler computes logprobs inside `lax.cond` and returns only ids."""
    src = _src(sampler_cls.__call__)
    return (
        "_process_logprob_results" in src
        and "return batch_next_token_ids\n" in src
        and "lax.cond(" in src
    )


def fix_sampler_returns_logprobs() -> bool:
    """Return the sampled tokens' logprobs out of the jitted sampler (notes 5).

    0.0.2 writes them onto `logits_output` inside a `lax.cond` branch under `jit`, so they
    never leave the compiled function and the scheduler receives None. Here the sampler
    returns `(ids, logprob_of_ids)` and `ModelRunner.sample` stores the logprobs where the
    scheduler reads them (`logits_output.next_token_logprobs`).

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

    if getattr(Sampler.__call__, "_tunix_sglang_fix", False):
        return False
    if not sampler_loses_logprobs(Sampler):
        return False
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

    __call__._tunix_sglang_fix = True

    orig_sample = ModelRunner.sample

    @functools.wraps(orig_sample)
    def sample(self, logits_output, sampling_metadata, positions):
        out = orig_sample(self, logits_output, sampling_metadata, positions)
        if isinstance(out, tuple):
            ids, token_logprobs = out
            self._tunix_sglang_last_logprobs = token_logprobs  # read by the logprob capture
            if sampling_metadata.return_logprob:
                logits_output.next_token_logprobs = token_logprobs
            return ids
        return out

    sample._tunix_sglang_fix = True
    Sampler.__call__ = __call__
    ModelRunner.sample = sample
    return True


# ---------------------------------------------------------------------------------------
# 11. Sampler random key
# ---------------------------------------------------------------------------------------

def sampler_key_is_frozen(model_runner_cls) -> bool:
    """True when nothing writes the sampler's RNG state back after a jitted call."""
    src = _src(model_runner_cls.sample) + _src(ORIGINALS.get("ModelRunner.sample", ""))
    init_src = _src(ORIGINALS.get("ModelRunner.initialize_jit", model_runner_cls.initialize_jit))
    return "sampler_state_leaves" in init_src and "nnx.update(self.sampler" not in src


def path_names(path) -> list[str]:
    """Readable names of a pytree key path, without the trailing Variable `.value`."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    if names and names[-1] == "value":
        names.pop()
    return names


def _sampler_rng_leaves(runner) -> dict[str, list[int]]:
    """Indices of the sampler's RNG keys and counters among `runner.sampler_state_leaves`."""
    import jax
    from flax import nnx

    _, state = nnx.split(runner.sampler)
    out: dict[str, list[int]] = {"key": [], "count": []}
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(state)[0]):
        names = path_names(path)
        if names and names[-1] in out:
            out[names[-1]].append(i)
    return out


def set_sampler_seed(runner, seed: int) -> None:
    """Restart the engine's sampling stream at key(seed), counters 0 (reproducible runs).

    Must run where the sampler is not in use (the scheduler thread while idle).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    idx = _sampler_rng_leaves(runner)
    leaves = list(runner.sampler_state_leaves)
    for i in idx["key"]:
        cur = leaves[i]
        typed = jnp.issubdtype(cur.dtype, jax.dtypes.prng_key)
        new = jax.random.key(seed) if typed else jax.random.PRNGKey(seed)
        leaves[i] = place_replicated(new, cur.sharding)
    for i in idx["count"]:
        cur = leaves[i]
        leaves[i] = place_replicated(np.zeros(cur.shape, cur.dtype), cur.sharding)
    runner.sampler_state_leaves = leaves


def fix_sampler_rng_advances() -> bool:
    """Advance the sampler's RNG counter after every sampling call (notes 11).

    `Sampler.__call__` draws `self.rngs.params()` inside `jit` on a merged *copy* of its
    state; the advanced counter is never written back, so every call used the same key and
    two identical calls sampled identical tokens. We bump the counter leaf that the
    (fixed) initialize_jit reads on every call.
    """
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    if getattr(ModelRunner.sample, "_tunix_sglang_rng_fix", False):
        return False
    if not sampler_key_is_frozen(ModelRunner):
        return False
    ORIGINALS.setdefault("ModelRunner.sample.rng", ModelRunner.sample)
    inner = ModelRunner.sample

    @functools.wraps(inner)
    def sample(self, logits_output, sampling_metadata, positions):
        out = inner(self, logits_output, sampling_metadata, positions)
        leaves = getattr(self, "sampler_state_leaves", None)
        if leaves is not None:
            idx = getattr(self, "_tunix_sglang_rng_counts", None)
            if idx is None:
                idx = self._tunix_sglang_rng_counts = _sampler_rng_leaves(self)["count"]
            if idx:
                leaves = list(leaves)
                for i in idx:
                    leaves[i] = leaves[i] + 1
                self.sampler_state_leaves = leaves
        return out

    sample._tunix_sglang_rng_fix = True
    sample._tunix_sglang_fix = True
    ModelRunner.sample = sample
    return True


# ---------------------------------------------------------------------------------------
# Sampled-token logprobs without return_logprob (which recompiles per batch)
# ---------------------------------------------------------------------------------------

def logprob_metadata_is_static(logits_metadata_cls) -> bool:
    """True when return_logprob puts per-batch Python lists (prompt lengths) in the jit key."""
    src = _src(logits_metadata_cls.tree_flatten)
    return "extend_seq_lens_cpu" in src and "aux_data" in src


def capture_logprobs_around(run_batch_fn):
    """`Scheduler.run_batch` that also records the sampled tokens' logprobs per request."""
    import numpy as np

    @functools.wraps(run_batch_fn)
    def run_batch(self, batch):
        result = run_batch_fn(self, batch)
        ctl = control(self)
        if not ctl.logprob_rids:
            return result
        runner = self.tp_worker.model_runner
        lps = getattr(runner, "_tunix_sglang_last_logprobs", None)
        reqs = batch.reqs or []
        with ctl.lock:
            wanted = [(i, r.rid) for i, r in enumerate(reqs) if r.rid in ctl.logprob_rids]
            if not wanted:
                return result
            if lps is None:
                ctl.logprobs_failed.update(rid for _, rid in wanted)
                return result
            host = np.asarray(lps)
            for i, rid in wanted:
                ctl.logprobs.setdefault(rid, []).append(float(host[i]))
        return result

    return run_batch


def fix_logprob_capture() -> bool:
    """Record each sampled token's logprob per request, without `return_logprob`.

    With `return_logprob=True`, LogitsMetadata/SamplingMetadata carry the batch's prompt
    lengths and per-request lists as *static* pytree aux data: every new batch composition
    compiles a new forward and sampler (measured: every call recompiled, ~0.5 s per step on
    the tiny model). Instead the sampler (see fix_sampler_returns_logprobs) always returns
    the sampled tokens' logprobs and `Scheduler.run_batch` appends them, for the requests
    an engine registered with `control(s).want_logprobs(rid)`, to a list the engine reads
    when the request finishes. One token per request per batch (chunked prefill off).
    """
    from sgl_jax.srt.layers.logits_processor import LogitsMetadata
    from sgl_jax.srt.managers.scheduler import Scheduler

    if getattr(Scheduler.run_batch, "_tunix_sglang_fix", False):
        return False
    if not logprob_metadata_is_static(LogitsMetadata):
        return False
    ORIGINALS["Scheduler.run_batch"] = Scheduler.run_batch
    run_batch = capture_logprobs_around(Scheduler.run_batch)
    run_batch._tunix_sglang_fix = True
    Scheduler.run_batch = run_batch
    return True


# ---------------------------------------------------------------------------------------
# Untied lm_head created in bfloat16 whatever the model dtype
# ---------------------------------------------------------------------------------------

_CAUSAL_LMS = (
    ("sgl_jax.srt.models.qwen3", "Qwen3ForCausalLM"),
    ("sgl_jax.srt.models.qwen2", "Qwen2ForCausalLM"),
    ("sgl_jax.srt.models.llama", "LlamaForCausalLM"),
)


def lm_head_ignores_model_dtype(model_cls) -> bool:
    src = _src(model_cls.__init__)
    i = src.find("ParallelLMHead(")
    return i >= 0 and "dtype" not in src[i : src.find(")", i)]


def fix_lm_head_dtype() -> bool:
    """Give the untied output head the model's dtype.

    Qwen3/Qwen2/Llama create `ParallelLMHead(vocab, hidden)` without a dtype, so the head is
    bfloat16 even for a float32 model: an untied float32 checkpoint loses precision in the
    logits (measured: logprob errors ~0.017 vs Tunix on the tiny untied model).
    """
    import jax.numpy as jnp

    patched = False
    for modname, clsname in _CAUSAL_LMS:
        try:
            cls = getattr(importlib.import_module(modname), clsname)
        except (ImportError, AttributeError):
            continue
        init = cls.__init__
        if getattr(init, "_tunix_sglang_fix", False) or not lm_head_ignores_model_dtype(cls):
            continue
        ORIGINALS[f"{clsname}.__init__"] = init

        def make(init):
            @functools.wraps(init)
            def __init__(self, *args, **kwargs):
                init(self, *args, **kwargs)
                head = self.__dict__.get("lm_head")
                dtype = getattr(self, "dtype", None)
                if head is not None and dtype is not None:
                    emb = head.embedding
                    if emb.value.dtype != jnp.dtype(dtype):
                        emb.value = emb.value.astype(dtype)
                        head.dtype = jnp.dtype(dtype)

            __init__._tunix_sglang_fix = True
            return __init__

        cls.__init__ = make(init)
        patched = True
    return patched


# ---------------------------------------------------------------------------------------
# 7. Idle scheduler: wait instead of spinning; run engine calls on the scheduler thread
# ---------------------------------------------------------------------------------------

IDLE_WAIT_S = 1.0  # longest wait before re-checking (new work wakes it at once)


class SchedulerControl:
    """Per-scheduler state added by the fixes: wake-up pipe, queued calls, stop, error."""

    def __init__(self):
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = False
        self.error: BaseException | None = None
        self.error_traceback: str = ""
        self.thread: threading.Thread | None = None
        self.idle_waits = 0
        # sampled-token logprobs captured for registered request ids (fix_logprob_capture)
        self.lock = threading.Lock()
        self.logprob_rids: set[str] = set()
        self.logprobs: dict[str, list[float]] = {}
        self.logprobs_failed: set[str] = set()
        # generate requests an engine call is about to send: once one is in, the scheduler
        # waits for all of them (fix_engine_call_one_batch), so a call is scheduled the same
        # way every time (seeded calls reproduce; multi-host lockstep stays in step).
        self.expect = 0

    def want_logprobs(self, rids) -> None:
        with self.lock:
            self.logprob_rids.update(rids)

    def take_logprobs(self, rid: str) -> list[float] | None:
        with self.lock:
            self.logprob_rids.discard(rid)
            failed = rid in self.logprobs_failed
            self.logprobs_failed.discard(rid)
            lps = self.logprobs.pop(rid, None)
        return None if failed else lps

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wfd, b"x")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.rfd, 4096):
                pass

    def submit(self, fn: Callable[[Any], Any]) -> Future:
        """Run `fn(scheduler)` on the scheduler thread the next time it is idle."""
        fut: Future = Future()
        if self.error is not None or self.stop:
            fut.set_exception(RuntimeError("sglang-jax scheduler is not running"))
            return fut
        self.calls.put((fn, fut))
        self.wake()
        return fut

    def run_calls(self, scheduler) -> None:
        while True:
            try:
                fn, fut = self.calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(scheduler))
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

    def fail_pending(self, exc: BaseException) -> None:
        while True:
            try:
                _, fut = self.calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            with contextlib.suppress(OSError):
                os.close(fd)


def control(scheduler) -> SchedulerControl:
    ctl = scheduler.__dict__.get("_tunix_sglang_control")
    if ctl is None:
        with _LOCK:
            ctl = scheduler.__dict__.get("_tunix_sglang_control")
            if ctl is None:
                ctl = SchedulerControl()
                scheduler._tunix_sglang_control = ctl
    return ctl


def scheduler_is_idle(s) -> bool:
    return (
        s.cur_batch is None
        and s.last_batch is None
        and not s.waiting_queue
        and s.running_batch.is_empty()
        and s.chunked_req is None
    )


def idle_loop_spins(scheduler_cls) -> bool:
    """True when the event loop polls its sockets without ever blocking or sleeping."""
    loop_src = _src(scheduler_cls.event_loop_normal) + _src(scheduler_cls.recv_requests)
    return (
        "while True" in loop_src
        and "zmq.NOBLOCK" in loop_src
        and "sleep" not in loop_src
        and "poll(" not in loop_src.lower()
    )


class SchedulerStopped(SystemExit):
    """Raised inside the scheduler thread to end its loop (SystemExit: not an error)."""


def fix_idle_scheduler_waits() -> bool:
    """Block the idle scheduler on its sockets instead of spinning (notes 7).

    The 0.0.2 loop polls with NOBLOCK forever: in single-process mode it takes a core from
    the trainer (Tunix train() 2.3x slower). When the scheduler has nothing queued or
    running, `recv_requests` now waits on a zmq poller (tokenizer socket, rpc socket and a
    wake-up pipe) for at most IDLE_WAIT_S. The same hook runs calls queued by the engine
    (weight swap, cache flush) on the scheduler thread while it is idle, and ends the loop
    on `stop`.
    """
    import zmq
    from sgl_jax.srt.managers.scheduler import Scheduler

    if "Scheduler.recv_requests" in ORIGINALS:
        return False
    if not idle_loop_spins(Scheduler):
        return False
    orig = Scheduler.recv_requests
    ORIGINALS["Scheduler.recv_requests"] = orig

    @functools.wraps(orig)
    def recv_requests(self):
        ctl = control(self)
        if ctl.stop:
            raise SchedulerStopped()
        idle = scheduler_is_idle(self) and self.nnodes == 1 and self.node_rank == 0
        if idle:
            ctl.run_calls(self)
        reqs = orig(self)
        if reqs or not idle:
            return reqs
        poller = zmq.Poller()
        poller.register(self.recv_from_tokenizer, zmq.POLLIN)
        poller.register(self.recv_from_rpc, zmq.POLLIN)
        poller.register(ctl.rfd, zmq.POLLIN)
        poller.poll(int(IDLE_WAIT_S * 1000))
        ctl.idle_waits += 1
        ctl.drain()
        if ctl.stop:
            raise SchedulerStopped()
        ctl.run_calls(self)
        return orig(self)

    recv_requests._tunix_sglang_fix = True
    Scheduler.recv_requests = recv_requests
    return True


# ---------------------------------------------------------------------------------------
# One engine call = one scheduling decision (multi-host lockstep)
# ---------------------------------------------------------------------------------------

EXPECT_WAIT_S = 60.0  # longest wait for the rest of one call's requests


def batch_requests_arrive_separately(tokenizer_manager_cls, scheduler_cls) -> bool:
    """True when a batched generate is sent to the scheduler one request at a time (with
    awaits in between) and the scheduler takes whatever has arrived (non-blocking)."""
    send = _src(tokenizer_manager_cls._handle_batch_request)
    recv = _src(ORIGINALS.get("Scheduler.recv_requests", scheduler_cls.recv_requests))
    return ("for i in range(batch_size)" in send and "_send_one_request" in send
            and "zmq.NOBLOCK" in recv)


def gather_expected(sched, ctl: SchedulerControl, reqs: list, receive) -> list:
    """Keep receiving until all `ctl.expect` generate requests of one engine call are in.

    Only once at least one of them has arrived (else the loop simply comes back), for at
    most EXPECT_WAIT_S; the engine resets `ctl.expect` when its call fails or ends.
    """
    if ctl.expect <= 0 or not reqs:
        return reqs
    import time

    import zmq
    from sgl_jax.srt.managers.io_struct import TokenizedGenerateReqInput

    def count(rs):
        return sum(isinstance(r, TokenizedGenerateReqInput) for r in rs)

    got = count(reqs)
    if got == 0:
        return reqs
    poller = zmq.Poller()
    poller.register(sched.recv_from_tokenizer, zmq.POLLIN)
    deadline = time.monotonic() + EXPECT_WAIT_S
    while got < ctl.expect and time.monotonic() < deadline and not ctl.stop:
        poller.poll(50)
        more = receive(sched)
        reqs.extend(more)
        got += count(more)
    if got < ctl.expect and ctl.expect > 0:
        logger.warning("engine call: %d of %d requests arrived in %ss; scheduling them",
                       got, ctl.expect, EXPECT_WAIT_S)
    ctl.expect = max(0, ctl.expect - got)
    return reqs


def fix_engine_call_one_batch() -> bool:
    """Schedule all requests of one engine call together, whatever the thread timing.

    The tokenizer manager sends a batched generate one request at a time, awaiting between
    sends, while the scheduler thread takes whatever has arrived: a call of 8 prompts may
    be prefilled as 4 + 4 or as 8 depending on when the scheduler thread looks. The number
    of forward and sampling programs, their shapes and the random draws then depend on
    timing: seeded calls do not reproduce, and in multi-host lockstep (one engine mesh over
    several processes, identical requests everywhere) the processes run different programs
    and drift apart (measured: one process prefilled a call of 8 as 4 + 4, the other as
    8; the second finished the call while the first, one program behind, never did). The
    engine announces how many requests a call sends
    (`control(s).expect`); once the first has arrived, the scheduler waits (bounded) for the
    rest before scheduling any of them.
    """
    from sgl_jax.srt.managers.scheduler import Scheduler
    from sgl_jax.srt.managers.tokenizer_manager import TokenizerManager

    inner = Scheduler.recv_requests
    if getattr(inner, "_tunix_sglang_one_batch", False):
        return False
    if not batch_requests_arrive_separately(TokenizerManager, Scheduler):
        return False
    receive = ORIGINALS.get("Scheduler.recv_requests", inner)  # one non-blocking receive
    ORIGINALS["Scheduler.recv_requests.one_batch"] = inner

    @functools.wraps(inner)
    def recv_requests(self):
        reqs = inner(self)
        if self.nnodes != 1 or self.node_rank != 0:
            return reqs
        return gather_expected(self, control(self), reqs, receive)

    recv_requests._tunix_sglang_fix = True
    recv_requests._tunix_sglang_one_batch = True
    Scheduler.recv_requests = recv_requests
    return True


# ---------------------------------------------------------------------------------------
# Scheduler failures must not signal the process (or its parent)
# ---------------------------------------------------------------------------------------

def scheduler_errors_signal_process(scheduler_mod) -> bool:
    src = _src(scheduler_mod.scheduler_loop_after_create) + _src(
        scheduler_mod.run_scheduler_loop_thread_after_create
    )
    return "SIGQUIT" in src


def fix_scheduler_errors_contained() -> bool:
    """Report scheduler failures to the engine instead of SIGQUIT-ing the process.

    In single-process mode 0.0.2 answers any scheduler exception (at creation or in the
    loop) with SIGQUIT to this process, whose handler kills the whole process tree: one bad
    request ends the training run. Its watchdog (forward stuck > watchdog_timeout) even
    signals the *parent* process. Here creation errors raise to the caller, loop errors are
    stored on the scheduler's control object (the engine raises them to its caller), and
    the watchdog only logs.
    """
    from sgl_jax.srt.entrypoints import engine as engine_mod
    from sgl_jax.srt.managers import scheduler as scheduler_mod
    from sgl_jax.utils import get_exception_traceback

    if getattr(scheduler_mod.scheduler_loop_after_create, "_tunix_sglang_fix", False):
        return False
    if not scheduler_errors_signal_process(scheduler_mod):
        return False
    Scheduler = scheduler_mod.Scheduler
    ORIGINALS["scheduler.scheduler_loop_after_create"] = scheduler_mod.scheduler_loop_after_create
    ORIGINALS["scheduler.run_scheduler_loop_thread_after_create"] = (
        scheduler_mod.run_scheduler_loop_thread_after_create
    )
    ORIGINALS["Scheduler.watchdog_thread"] = Scheduler.watchdog_thread

    def scheduler_loop_after_create(server_args, scheduler):
        ctl = control(scheduler)
        ctl.thread = threading.current_thread()
        ctl.thread.name = "sglang::scheduler"
        try:
            if scheduler.enable_overlap:
                scheduler.event_loop_overlap()
            else:
                scheduler.event_loop_normal()
        except SchedulerStopped:
            ctl.fail_pending(RuntimeError("sglang-jax scheduler stopped"))
        except BaseException as e:
            ctl.error = e
            ctl.error_traceback = get_exception_traceback()
            logger.error("sglang-jax scheduler failed: %s", ctl.error_traceback)
            ctl.fail_pending(RuntimeError(f"sglang-jax scheduler failed: {e!r}"))

    def run_scheduler_loop_thread_after_create(server_args, port_args):
        scheduler = Scheduler(server_args, port_args)  # errors raise to the caller
        ctl = control(scheduler)
        t = threading.Thread(
            target=scheduler_mod.scheduler_loop_after_create,
            args=(server_args, scheduler),
            daemon=True,
            name="sglang::scheduler",
        )
        ctl.thread = t
        t.start()
        return {
            "status": "ready",
            "max_total_num_tokens": scheduler.max_total_num_tokens,
            "max_req_input_len": scheduler.max_req_input_len,
            "scheduler": scheduler,
        }

    orig_watchdog = Scheduler.watchdog_thread

    def watchdog_thread(self):
        import time

        if not self.server_args.enable_single_process:
            return orig_watchdog(self)
        last_ct, last_t, warned = 0, time.perf_counter(), False
        while not control(self).stop and control(self).error is None:
            now = time.perf_counter()
            if self.cur_batch is not None and last_ct == self.forward_ct:
                if not warned and now > last_t + self.watchdog_timeout:
                    logger.error("sglang-jax forward stuck > %ss", self.watchdog_timeout)
                    warned = True
            else:
                last_ct, last_t, warned = self.forward_ct, now, False
            time.sleep(min(5.0, max(self.watchdog_timeout / 2, 0.5)))

    scheduler_loop_after_create._tunix_sglang_fix = True
    scheduler_mod.scheduler_loop_after_create = scheduler_loop_after_create
    scheduler_mod.run_scheduler_loop_thread_after_create = run_scheduler_loop_thread_after_create
    engine_mod.run_scheduler_loop_thread_after_create = run_scheduler_loop_thread_after_create
    Scheduler.watchdog_thread = watchdog_thread
    return True


# ---------------------------------------------------------------------------------------
# Process-wide signal handlers installed at engine start
# ---------------------------------------------------------------------------------------

def engine_installs_signal_handlers(engine_mod) -> bool:
    src = _src(engine_mod._set_envs_and_config)
    return "signal.SIGCHLD" in src or "resource_tracker" in src


def fix_keep_process_signal_handlers() -> bool:
    """In single-process mode, do not touch process-wide signal handlers or the tracker.

    `_set_envs_and_config` installs a SIGCHLD handler that `waitpid(0)`s any child (the
    trainer's own `subprocess.run` can then see its child reaped and report a wrong return
    code), a SIGQUIT handler that kills the process tree, and disables multiprocessing's
    resource tracker; `signal.signal` also makes the engine impossible to start from a
    non-main thread. None of it is needed without child processes: only the ulimit is kept.
    """
    from sgl_jax.srt.entrypoints import engine as engine_mod

    fn = engine_mod._set_envs_and_config
    if getattr(fn, "_tunix_sglang_fix", False) or not engine_installs_signal_handlers(engine_mod):
        return False
    ORIGINALS["engine._set_envs_and_config"] = fn
    set_ulimit = getattr(engine_mod, "set_ulimit", None)

    @functools.wraps(fn)
    def _set_envs_and_config(server_args):
        if not server_args.enable_single_process:
            return fn(server_args)
        if set_ulimit is not None:
            set_ulimit()

    _set_envs_and_config._tunix_sglang_fix = True
    engine_mod._set_envs_and_config = _set_envs_and_config
    return True


# ---------------------------------------------------------------------------------------
# Logging configuration of the host process
# ---------------------------------------------------------------------------------------

_LOGGER_USERS = (
    "sgl_jax.srt.utils",
    "sgl_jax.srt.utils.common_utils",
    "sgl_jax.srt.entrypoints.engine",
    "sgl_jax.srt.managers.scheduler",
    "sgl_jax.srt.managers.detokenizer_manager",
)


def configure_logger_resets_root(fn) -> bool:
    src = _src(fn)
    return "basicConfig" in src and "force=True" in src


def fix_logging_config_kept() -> bool:
    """Do not reset the host process's logging when the engine starts.

    `configure_logger` runs `logging.basicConfig(force=True, level=<engine log level>)` at
    engine start and again in the scheduler/detokenizer threads: it removes the trainer's
    root handlers (absl's included) and sets the root level to e.g. ERROR, so Tunix's
    "Train step N training loss" lines vanish. In single-process mode we only set the level
    of the `sgl_jax` logger and leave the root logger alone.
    """
    import logging as logging_mod
    import sys

    from sgl_jax.srt.utils import common_utils

    fn = common_utils.configure_logger
    if getattr(fn, "_tunix_sglang_fix", False) or not configure_logger_resets_root(fn):
        return False
    ORIGINALS["common_utils.configure_logger"] = fn

    @functools.wraps(fn)
    def configure_logger(server_args, prefix: str = ""):
        if not getattr(server_args, "enable_single_process", False):
            return fn(server_args, prefix=prefix)
        level = getattr(logging_mod, str(server_args.log_level).upper(), logging_mod.ERROR)
        logging_mod.getLogger("sgl_jax").setLevel(level)

    configure_logger._tunix_sglang_fix = True
    for modname in _LOGGER_USERS:
        importlib.import_module(modname)
        mod = sys.modules[modname]
        if getattr(mod, "configure_logger", None) is fn:
            mod.configure_logger = configure_logger
    return True


# ---------------------------------------------------------------------------------------
# Engine on a chosen subset of devices
# ---------------------------------------------------------------------------------------

class _DeviceChoice(threading.local):
    devices: Sequence[Any] | None = None
    skip_penalty_precompile: bool = False


_DEVICE_CHOICE = _DeviceChoice()


@contextlib.contextmanager
def engine_devices(devices: Sequence[Any] | None, skip_penalty_precompile: bool = False):
    """Within this block, sglang-jax schedulers created by this thread use `devices`
    (and, if asked, do not precompile the penalty programs)."""
    if mesh_spans_processes(devices):
        _SORT_IN_GRAPH.set()
    prev = (_DEVICE_CHOICE.devices, _DEVICE_CHOICE.skip_penalty_precompile)
    _DEVICE_CHOICE.devices = list(devices) if devices is not None else None
    _DEVICE_CHOICE.skip_penalty_precompile = skip_penalty_precompile
    try:
        yield
    finally:
        _DEVICE_CHOICE.devices, _DEVICE_CHOICE.skip_penalty_precompile = prev


def mesh_uses_all_devices(scheduler_mod) -> bool:
    """True when the scheduler builds its mesh without passing devices (all jax.devices())."""
    src = _src(scheduler_mod.Scheduler.__init__)
    call = src[src.find("create_device_mesh(") :][:200] if "create_device_mesh(" in src else ""
    return bool(call) and "devices=" not in call


def fix_engine_device_subset() -> bool:
    """Let the engine's mesh be built from a chosen device list.

    0.0.2 always builds its mesh from `jax.devices()` (scheduler.py -> mesh_utils.py), i.e.
    every device of every process: the rollout engine cannot be given a subset (e.g.
    `--rollout-devices N`), and per-host engines in a multi-process run become one slow
    global program. Inside `engine_devices(devs)` the scheduler's `create_device_mesh`
    gets `devices=devs`; outside, behaviour is unchanged.
    """
    from sgl_jax.srt.managers import scheduler as scheduler_mod

    fn = scheduler_mod.create_device_mesh
    if getattr(fn, "_tunix_sglang_fix", False) or not mesh_uses_all_devices(scheduler_mod):
        return False
    ORIGINALS["scheduler.create_device_mesh"] = fn

    @functools.wraps(fn)
    def create_device_mesh(ici_parallelism, dcn_parallelism, devices=None, **kw):
        if devices is None and _DEVICE_CHOICE.devices is not None:
            devices = _DEVICE_CHOICE.devices
        return fn(list(ici_parallelism), list(dcn_parallelism), devices=devices, **kw)

    create_device_mesh._tunix_sglang_fix = True
    scheduler_mod.create_device_mesh = create_device_mesh
    return True


def detokenizer_started_without_need(engine_mod) -> bool:
    src = _src(engine_mod._launch_threads)
    return "run_detokenizer_thread" in src and "skip_tokenizer_init" not in src


def fix_no_detokenizer_without_tokenizer() -> bool:
    """Do not start the detokenizer thread when the engine has no tokenizer.

    With `skip_tokenizer_init=True` the scheduler sends its outputs straight to the
    tokenizer manager; the detokenizer thread only blocks on a socket nobody writes to. It
    also makes a clean shutdown impossible: closing its zmq context makes its `recv` raise,
    and it answers any exception with SIGQUIT to the whole process.
    """
    from sgl_jax.srt.entrypoints import engine as engine_mod

    fn = engine_mod.run_detokenizer_thread
    if getattr(fn, "_tunix_sglang_fix", False) or not detokenizer_started_without_need(
        engine_mod
    ):
        return False
    ORIGINALS["engine.run_detokenizer_thread"] = fn

    @functools.wraps(fn)
    def run_detokenizer_thread(server_args, port_args):
        if server_args.skip_tokenizer_init and server_args.enable_single_process:
            return None
        return fn(server_args, port_args)

    run_detokenizer_thread._tunix_sglang_fix = True
    engine_mod.run_detokenizer_thread = run_detokenizer_thread
    return True


def fix_penalty_precompile_optional() -> bool:
    """Let an engine that never uses penalties skip their precompilation.

    `run_precompile` compiles one penalty program per batch-size padding (~3 s each on a
    2-core CPU for the tiny model) although RL rollouts send no frequency/presence/
    repetition penalties. Inside `engine_devices(..., skip_penalty_precompile=True)` they
    are skipped (a request with penalties would still work, compiling on first use).
    """
    from sgl_jax.srt.managers.tp_worker import ModelWorker

    fn = getattr(ModelWorker, "precompile_penalties", None)
    if fn is None or getattr(fn, "_tunix_sglang_fix", False):
        return False
    ORIGINALS["ModelWorker.precompile_penalties"] = fn

    @functools.wraps(fn)
    def precompile_penalties(self, *args, **kwargs):
        if _DEVICE_CHOICE.skip_penalty_precompile:
            return None
        return fn(self, *args, **kwargs)

    precompile_penalties._tunix_sglang_fix = True
    ModelWorker.precompile_penalties = precompile_penalties
    return True


# ---------------------------------------------------------------------------------------

FIXES: list[tuple[str, Callable[[], bool], str]] = [
    ("sglang_jax.threading_atexit_restored", fix_threading_atexit_restored,
     "importing sgl_jax engine disabled threading._register_atexit process-wide"),
    ("sglang_jax.native_attention_pytree", fix_native_attention_pytree,
     "NativeAttention registered twice as a pytree (flax 0.12 registers nnx Modules)"),
    ("sglang_jax.min_p_filter_arity", fix_min_p_filter_arity,
     "non-TPU sampler passed a 3-tuple to _apply_min_p_filter (unpacks 2)"),
    ("sglang_jax.sampler_sort_in_graph", fix_sampler_sort_in_graph,
     "non-TPU sampler sorted in a host callback (hangs a mesh spanning processes)"),
    ("sglang_jax.forward_reads_weights", fix_forward_reads_weights,
     "jitted forward closed over its weight leaves; sync could not change outputs"),
    ("sglang_jax.logprob_logits_padding", fix_logprob_logits_padding,
     "return_logprob: sampled logits had real rows, sampling metadata padded rows"),
    ("sglang_jax.sampler_returns_logprobs", fix_sampler_returns_logprobs,
     "sampled-token logprobs were computed inside lax.cond under jit and lost"),
    ("sglang_jax.sampler_rng_advances", fix_sampler_rng_advances,
     "sampler RNG state never advanced between calls (identical samples)"),
    ("sglang_jax.logprob_capture", fix_logprob_capture,
     "return_logprob recompiled forward+sampler for every batch composition"),
    ("sglang_jax.lm_head_dtype", fix_lm_head_dtype,
     "untied lm_head was bfloat16 whatever the model dtype"),
    ("sglang_jax.idle_scheduler_waits", fix_idle_scheduler_waits,
     "idle scheduler loop spun without sleeping, stealing the trainer's CPU"),
    ("sglang_jax.engine_call_one_batch", fix_engine_call_one_batch,
     "one call's requests were scheduled in timing-dependent pieces (lockstep drift)"),
    ("sglang_jax.scheduler_errors_contained", fix_scheduler_errors_contained,
     "scheduler errors SIGQUIT the process tree; watchdog signalled the parent process"),
    ("sglang_jax.keep_process_signal_handlers", fix_keep_process_signal_handlers,
     "engine start replaced SIGCHLD/SIGQUIT handlers, disabled the resource tracker"),
    ("sglang_jax.logging_config_kept", fix_logging_config_kept,
     "engine start ran logging.basicConfig(force=True): trainer log handlers removed"),
    ("sglang_jax.engine_device_subset", fix_engine_device_subset,
     "engine mesh always spanned all jax.devices()"),
    ("sglang_jax.no_detokenizer_without_tokenizer", fix_no_detokenizer_without_tokenizer,
     "an idle detokenizer thread SIGQUITs the process when its socket is closed"),
    ("sglang_jax.penalty_precompile_optional", fix_penalty_precompile_optional,
     "penalty programs precompiled for every batch padding though rollouts use none"),
]


def apply() -> None:
    """Apply every sglang-jax fix this installation needs; idempotent. No-op without sgl_jax."""
    if importlib.util.find_spec("sgl_jax") is None:
        return
    with _LOCK:
        for name, fn, why in FIXES:
            if name not in _APPLIED:
                _APPLIED[name] = bool(fn())
            if _APPLIED[name]:
                record(name, why)


def active() -> dict[str, bool]:
    return dict(_APPLIED)
