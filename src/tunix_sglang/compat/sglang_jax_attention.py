"""Fixes to sglang-jax 0.0.2's native (CPU) attention backend: attention per sequence.

The native backend (`native_backend.forward_attention`) attends the whole padded batch at
once: every query of the batch against every key slot of the batch (rows x max_req_len),
masking out the pairs of different sequences. Cost and memory grow with batch x total
length: decode with the square of the batch, and prefill (EXTEND) with prompt tokens x
(rows x max_req_len), which asked for 25.5 GB at batch 128 x 552-token contexts. Both fixes
below compute exactly the same attention over each sequence's own keys, so that work and
memory grow with the sum of the sequence lengths. Same contract as the rest of compat:
each fix checks the installed code, keeps the original in `ORIGINALS` and has a test of
equal outputs and of the cost it removes (tests/test_compat_sglang.py).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

from tunix_sglang.compat import record
from tunix_sglang.compat.sglang_jax_fixes import _LOCK, ORIGINALS, _src

_APPLIED: dict[str, bool] = {}

# Static per-sequence widths tried, from max_req_len down by halves (one branch each).
ATTENTION_WIDTHS = 5
MIN_ATTENTION_WIDTH = 16
# Prefill: the largest score block one step of the per-sequence loop may hold (bytes).
PREFILL_BLOCK_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------
# Decode: each sequence's one query against its own keys
# ---------------------------------------------------------------------------------------

def decode_attends_whole_batch(fn: Callable) -> bool:
    """True when the native backend's decode attention scores each sequence's query against
    all keys of the padded batch and masks the others out (`_apply_decode_mask`)."""
    return "_apply_decode_mask" in _src(fn)


def attention_widths(width: int) -> list[int]:
    """Static per-sequence key widths (ascending): max_req_len, then halves (>= 16), at most
    ATTENTION_WIDTHS of them. Each is one compiled branch; a batch runs the smallest that
    holds its longest sequence, so early steps of long rollouts do not pay for the longest
    context the engine allows."""
    out = [width]
    while len(out) < ATTENTION_WIDTHS and -(-out[-1] // 2) >= MIN_ATTENTION_WIDTH:
        out.append(-(-out[-1] // 2))
    return sorted(out)


def branch_for(widths: list[int], seq_lengths: Any) -> Any:
    """Index of the smallest width that holds every sequence (traced)."""
    import jax.numpy as jnp

    longest = jnp.max(seq_lengths)
    return jnp.minimum(jnp.searchsorted(jnp.asarray(widths), longest), len(widths) - 1)


def decode_attention_per_sequence(q: Any, k_cache: Any, v_cache: Any, seq_lengths: Any,
                                  loc: Any, num_heads: int, num_kv_heads: int,
                                  scale: Any = None) -> Any:
    """Decode attention over each sequence's own keys only.

    Same inputs and result as the native backend's decode path: `loc` lists the KV slots
    of the sequences one after another (`seq_lengths` each, slot 0 = padding), in a buffer
    of rows x max_req_len slots, so no sequence has more than len(loc) // rows keys. The
    keys are gathered per sequence ([rows, width, kv_heads, head_dim], `width` the smallest
    of `attention_widths` that holds the longest sequence) and the query heads are grouped
    onto their KV head instead of repeating the KV heads. Work and memory: O(rows x width)
    instead of O(rows^2 x max_req_len).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    rows, total = q.shape[0], loc.shape[0]
    head_dim = q.shape[-1] // num_heads if q.ndim == 2 else q.shape[-1]
    group = num_heads // num_kv_heads
    qh = q.reshape(rows, num_kv_heads, group, head_dim)
    starts = jnp.cumsum(seq_lengths) - seq_lengths
    if scale is None:
        scale = 1.0 / jnp.sqrt(head_dim)

    def attend(width):
        offs = jnp.arange(width)[None, :]
        slot = loc[jnp.clip(starts[:, None] + offs, 0, total - 1)]
        valid = (offs < seq_lengths[:, None]) & (slot > 0)  # within the sequence: < total
        safe = jnp.where(valid, slot, k_cache.shape[0])  # out of range: filled with zeros
        k = jnp.take(k_cache, safe, axis=0, mode="fill", fill_value=0)
        v = jnp.take(v_cache, safe, axis=0, mode="fill", fill_value=0)
        logits = jnp.einsum("bgqd,blgd->bgql", qh, k) * scale
        logits = jnp.where(valid[:, None, None, :], logits,
                           jnp.asarray(jnp.finfo(logits.dtype).min, logits.dtype))
        out = jnp.einsum("bgql,blgd->bgqd", jax.nn.softmax(logits, axis=-1), v)
        return out.reshape(rows, num_heads * head_dim)

    widths = attention_widths(total // rows)
    return lax.switch(branch_for(widths, seq_lengths),
                      [functools.partial(attend, w) for w in widths])


# ---------------------------------------------------------------------------------------
# Prefill (EXTEND): each sequence's new tokens against its own keys
# ---------------------------------------------------------------------------------------

def extend_attends_whole_batch(fn: Callable) -> bool:
    """True when the native backend's EXTEND attention scores every query token of the
    batch against every key slot of the batch (`_apply_extend_mask`'s block diagonal)."""
    return "_apply_extend_mask" in _src(fn)


def rows_per_block(rows: int, width: int, num_heads: int) -> int:
    """The most sequences (a divisor of `rows`) whose [heads, width, width] float32 scores
    fit in PREFILL_BLOCK_BYTES (at least one)."""
    fit = max(1, PREFILL_BLOCK_BYTES // (num_heads * width * width * 4))
    return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= fit)


def prefill_attention_per_sequence(q: Any, k_cache: Any, v_cache: Any, seq_lengths: Any,
                                   loc: Any, extend_prefix_lens: Any, extend_seq_lens: Any,
                                   num_heads: int, num_kv_heads: int, scale: Any = None,
                                   is_causal: bool = True) -> Any:
    """Prefill (EXTEND) attention of each sequence's new tokens over its own keys.

    Same inputs and result as the native backend's EXTEND path: the new tokens of the
    sequences are packed one after another in `q` (`extend_seq_lens` each, then padding),
    their KV slots listed one sequence after another in `loc` (`seq_lengths` each: prefix
    then new tokens; slot 0 = padding), in a buffer of rows x max_req_len slots. New token
    i of sequence b sits at position extend_prefix_lens[b] + i and (causal) sees keys 0 to
    that position. Each sequence's queries and keys are gathered into a [width] block, with
    width the smallest of `attention_widths` that holds the longest sequence of the batch,
    and the blocks are attended a few sequences at a time (at most PREFILL_BLOCK_BYTES of
    scores), the results written back to the packed token order. Work: rows x width^2
    instead of tokens x rows x max_req_len; memory: a few blocks instead of the whole
    [heads, tokens, rows x max_req_len] score matrix. Padding tokens get zeros (the
    original gives them the mean of all values; nothing reads them: their KV slot is
    dropped and no logits are taken).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    rows, total, tokens = seq_lengths.shape[0], loc.shape[0], q.shape[0]
    head_dim = q.shape[-1] if q.ndim == 3 else q.shape[-1] // num_heads
    group = num_heads // num_kv_heads
    qg = q.reshape(tokens, num_kv_heads, group, head_dim)
    k_starts = jnp.cumsum(seq_lengths) - seq_lengths
    q_starts = jnp.cumsum(extend_seq_lens) - extend_seq_lens
    if scale is None:
        scale = 1.0 / jnp.sqrt(head_dim)
    neg = jnp.asarray(jnp.finfo(q.dtype).min, q.dtype)

    def block(width, b):
        """Outputs [len(b), width, kv_heads, group, head_dim] of the sequences `b`."""
        offs = jnp.arange(width)[None, :]
        slot = loc[jnp.clip(k_starts[b][:, None] + offs, 0, total - 1)]
        k_ok = (offs < seq_lengths[b][:, None]) & (slot > 0)
        safe = jnp.where(k_ok, slot, k_cache.shape[0])  # out of range: filled with zeros
        k = jnp.take(k_cache, safe, axis=0, mode="fill", fill_value=0)
        v = jnp.take(v_cache, safe, axis=0, mode="fill", fill_value=0)
        q_idx = jnp.where(offs < extend_seq_lens[b][:, None], q_starts[b][:, None] + offs,
                          tokens)
        qb = jnp.take(qg, q_idx, axis=0, mode="fill", fill_value=0)
        logits = jnp.einsum("bqkgd,bwkd->bkgqw", qb, k) * scale
        ok = k_ok[:, None, None, None, :]
        if is_causal:
            q_pos = extend_prefix_lens[b][:, None] + offs  # [b, q]
            ok = ok & (offs[:, None, :] <= q_pos[:, :, None])[:, None, None]
        logits = jnp.where(ok, logits, neg)
        return jnp.einsum("bkgqw,bwkd->bqkgd", jax.nn.softmax(logits, axis=-1), v)

    def attend(width):
        per = rows_per_block(rows, width, num_heads)
        if per == rows:
            out = block(width, jnp.arange(rows))
        else:  # a few sequences at a time: [chunks, per, width, ...]
            out = lax.map(functools.partial(block, width),
                          jnp.arange(rows).reshape(rows // per, per))
        return out.reshape(rows * width, num_heads * head_dim)

    widths = attention_widths(total // rows)
    # Back to the packed token order: token t is new token t - q_starts[b] of sequence b.
    t = jnp.arange(tokens)
    b = jnp.searchsorted(q_starts + extend_seq_lens, t, side="right")
    real = t < jnp.sum(extend_seq_lens)
    bc = jnp.clip(b, 0, rows - 1)

    def packed(width):
        flat = jnp.where(real, bc * width + t - q_starts[bc], rows * width)
        return jnp.take(attend(width), flat, axis=0, mode="fill", fill_value=0)

    return lax.switch(branch_for(widths, seq_lengths),
                      [functools.partial(packed, w) for w in widths])


def fix_native_decode_attention() -> bool:
    """Decode on the native (CPU) attention backend attends per sequence.

    0.0.2's native backend computes a [heads, rows, rows x max_req_len] score matrix for a
    decode step and masks all but each sequence's own keys: cost and memory grow with the
    square of the batch (25x the FLOPs of the per-sequence gather at batch 32; measured
    2.3-3.6x the decode throughput, bench/README.md). The per-sequence gather gives the same
    outputs.
    """
    from sgl_jax.srt.layers.attention import native_backend
    from sgl_jax.srt.model_executor.forward_batch_info import ForwardMode

    fn = native_backend.forward_attention
    if getattr(fn, "_tunix_sglang_decode_fix", False) or not decode_attends_whole_batch(fn):
        return False
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

    forward_attention._tunix_sglang_fix = True
    forward_attention._tunix_sglang_decode_fix = True
    native_backend.forward_attention = forward_attention
    return True


def fix_native_prefill_attention() -> bool:
    """Prefill (EXTEND) on the native (CPU) attention backend attends per sequence.

    0.0.2 scores every new token of the batch against every key slot of the batch,
    [heads, tokens, rows x max_req_len], and masks it block-diagonally: at batch 128 with
    40-token prompts and 512 new tokens (5,120 tokens x 76,672 slots) one layer asked for a
    25.5 GB buffer and the run died. `prefill_attention_per_sequence` gives the same
    outputs for the real tokens with work and memory in the sum of the sequence lengths.
    Wraps whatever `forward_attention` is current (the decode fix's, normally).
    """
    from sgl_jax.srt.layers.attention import native_backend
    from sgl_jax.srt.model_executor.forward_batch_info import ForwardMode

    fn = native_backend.forward_attention
    if getattr(fn, "_tunix_sglang_prefill_fix", False):
        return False
    release = ORIGINALS.get("native_backend.forward_attention", fn)
    if not extend_attends_whole_batch(release):
        return False
    ORIGINALS["native_backend.forward_attention.prefill"] = fn

    @functools.wraps(fn)
    def forward_attention(q, k_cache, v_cache, seq_lengths, loc, extend_prefix_lens,
                          extend_seq_lens, num_heads, num_kv_heads, scale=None,
                          is_causal=True, mode=ForwardMode.DECODE):
        rows = seq_lengths.shape[0]
        if (mode == ForwardMode.EXTEND and rows > 0 and loc.shape[0] % rows == 0
                and extend_seq_lens is not None and extend_prefix_lens is not None
                and num_heads % num_kv_heads == 0):
            return prefill_attention_per_sequence(
                q, k_cache, v_cache, seq_lengths, loc, extend_prefix_lens, extend_seq_lens,
                num_heads, num_kv_heads, scale, is_causal)
        return fn(q, k_cache, v_cache, seq_lengths, loc, extend_prefix_lens, extend_seq_lens,
                  num_heads, num_kv_heads, scale, is_causal, mode)

    forward_attention._tunix_sglang_fix = True
    forward_attention._tunix_sglang_decode_fix = getattr(fn, "_tunix_sglang_decode_fix", False)
    forward_attention._tunix_sglang_prefill_fix = True
    native_backend.forward_attention = forward_attention
    return True


FIXES: list[tuple[str, Callable[[], bool], str]] = [
    ("sglang_jax.native_decode_attention", fix_native_decode_attention,
     "CPU decode attention scored every query against every key of the batch"),
    ("sglang_jax.native_prefill_attention", fix_native_prefill_attention,
     "CPU prefill attention scored every new token against every key slot of the batch"),
]


def apply() -> None:
    """Apply the attention fixes this installation needs; idempotent. No-op without sgl_jax."""
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
