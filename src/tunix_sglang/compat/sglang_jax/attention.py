"""sglang-jax's native (CPU) attention backend: its import, and decode attention per sequence."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

from tunix_sglang.compat.base import ORIGINALS, module_file_source, source_of

# ---------------------------------------------------------------------------------------
# NativeAttention pytree registration
# ---------------------------------------------------------------------------------------

_NATIVE_MOD = "sgl_jax.srt.layers.attention.native_backend"


def native_attention_registration_is_duplicate() -> bool:
    """True when native_backend registers an nnx.Module subclass as a pytree again."""
    import jax
    from flax import nnx

    src = module_file_source(_NATIVE_MOD)
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


def native_attention_pytree_needed() -> bool:
    # Imported already: its registration went through, there is nothing left to fix.
    return _NATIVE_MOD not in sys.modules and native_attention_registration_is_duplicate()


def fix_native_attention_pytree() -> bool:
    """Import native_backend with a registration that tolerates an existing one.

    flax 0.12 registers every nnx.Module as a pytree; native_backend.py:13 registers
    NativeAttention again and the import raises "Duplicate custom PyTreeDef type
    registration", which kills the CPU attention backend. flax's own registration already
    flattens the module, so skipping the second one is all that is needed.
    """
    import jax.tree_util as jtu

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
# CPU decode attention: every query against every key of the batch
# ---------------------------------------------------------------------------------------

def decode_attends_whole_batch(fn: Callable) -> bool:
    """True when the native backend's decode attention scores each sequence's query against
    all keys of the padded batch and masks the others out (`_apply_decode_mask`)."""
    return "_apply_decode_mask" in source_of(fn)


def decode_attention_per_sequence(q: Any, k_cache: Any, v_cache: Any, seq_lengths: Any,
                                  loc: Any, num_heads: int, num_kv_heads: int,
                                  scale: Any = None) -> Any:
    """Decode attention over each sequence's own keys only.

    Same inputs and result as the native backend's decode path: `loc` lists the KV slots
    of the sequences one after another (`seq_lengths` each, slot 0 = padding), in a buffer
    of rows x max_req_len slots, so no sequence has more than len(loc) // rows keys. The
    keys are gathered per sequence ([rows, len(loc) // rows, kv_heads, head_dim]) and the
    query heads are grouped onto their KV head instead of repeating the KV heads. Work and
    memory: O(rows x max_req_len) instead of O(rows^2 x max_req_len).
    """
    import jax
    import jax.numpy as jnp

    rows, total = q.shape[0], loc.shape[0]
    width = total // rows
    head_dim = q.shape[-1] // num_heads if q.ndim == 2 else q.shape[-1]
    group = num_heads // num_kv_heads
    qh = q.reshape(rows, num_kv_heads, group, head_dim)
    starts = jnp.cumsum(seq_lengths) - seq_lengths
    offs = jnp.arange(width)[None, :]
    pos = starts[:, None] + offs
    slot = loc[jnp.clip(pos, 0, total - 1)]
    valid = (offs < seq_lengths[:, None]) & (slot > 0)  # within the sequence: pos < total
    safe = jnp.where(valid, slot, k_cache.shape[0])  # out of range: filled with zeros
    k = jnp.take(k_cache, safe, axis=0, mode="fill", fill_value=0)
    v = jnp.take(v_cache, safe, axis=0, mode="fill", fill_value=0)
    if scale is None:
        scale = 1.0 / jnp.sqrt(head_dim)
    logits = jnp.einsum("bgqd,blgd->bgql", qh, k) * scale
    logits = jnp.where(valid[:, None, None, :], logits,
                       jnp.asarray(jnp.finfo(logits.dtype).min, logits.dtype))
    out = jnp.einsum("bgql,blgd->bgqd", jax.nn.softmax(logits, axis=-1), v)
    return out.reshape(rows, num_heads * head_dim)


def native_decode_attention_needed() -> bool:
    from sgl_jax.srt.layers.attention import native_backend

    return decode_attends_whole_batch(native_backend.forward_attention)


def fix_native_decode_attention() -> bool:
    """Decode on the native (CPU) attention backend attends per sequence.

    0.0.2's native backend computes a [heads, rows, rows x max_req_len] score matrix for a
    decode step and masks all but each sequence's own keys: cost and memory grow with the
    square of the batch (25x the FLOPs of the per-sequence gather at batch 32; measured
    2.3-3.6x the decode throughput, bench/README.md). The per-sequence gather gives the same
    outputs. Prefill (EXTEND) keeps the original block-diagonal path, which still runs out
    of host memory at batch 128 x 552-token contexts.
    """
    from sgl_jax.srt.layers.attention import native_backend
    from sgl_jax.srt.model_executor.forward_batch_info import ForwardMode

    fn = native_backend.forward_attention
    ORIGINALS["native_backend.forward_attention"] = fn

    @functools.wraps(fn)
    def forward_attention(q, k_cache, v_cache, seq_lengths, loc, extend_prefix_lens,
                          extend_seq_lens, num_heads, num_kv_heads, scale=None,
                          is_causal=True, mode=ForwardMode.DECODE):
        rows = q.shape[0]
        if (mode == ForwardMode.DECODE and rows == seq_lengths.shape[0] and rows > 0
                and loc.shape[0] % rows == 0 and num_heads % num_kv_heads == 0):
            return decode_attention_per_sequence(q, k_cache, v_cache, seq_lengths, loc,
                                                 num_heads, num_kv_heads, scale)
        return fn(q, k_cache, v_cache, seq_lengths, loc, extend_prefix_lens, extend_seq_lens,
                  num_heads, num_kv_heads, scale, is_causal, mode)

    native_backend.forward_attention = forward_attention
    return True
