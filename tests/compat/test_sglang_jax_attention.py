"""compat/sglang_jax/attention.py: the native backend's import, decode attention per sequence."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.compat.base import ORIGINALS as ORIG  # noqa: E402
from tunix_sglang.compat.sglang_jax import attention  # noqa: E402

compat.apply_all()


def test_native_attention_pytree():
    from sgl_jax.srt.layers.attention.native_backend import NativeAttention

    # What native_backend.py:13 does at import: a second registration is refused.
    with pytest.raises(ValueError, match="Duplicate custom PyTreeDef"):
        jax.tree_util.register_pytree_node_class(NativeAttention)
    attn = NativeAttention(4, 2)  # imported (thanks to the fix) and usable as a pytree
    jax.tree_util.tree_flatten(attn)


def _decode_batch(rows, real, max_len, heads=4, kv_heads=2, head_dim=16, seed=0):
    """A padded decode batch as sglang-jax lays it out: `loc` lists each sequence's KV
    slots one after another in rows x max_len entries (0 = padding)."""
    rng = np.random.default_rng(seed)
    lens = np.zeros(rows, np.int32)
    lens[:real] = rng.integers(1, max_len + 1, real)
    pool = rows * max_len + 1
    loc = np.zeros(rows * max_len, np.int32)
    loc[: lens.sum()] = rng.permutation(np.arange(1, pool))[: lens.sum()]
    q = rng.standard_normal((rows, heads * head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((pool, kv_heads, head_dim)).astype(np.float32)
            for _ in range(2))
    return [jnp.asarray(x) for x in (q, k, v, lens, loc)], heads, kv_heads


def test_native_decode_attention_per_sequence():
    """CPU decode attention: the same outputs as the original (GQA, padded rows, sequences
    of different lengths), for a fraction of its work (the original scores every query
    against every key of the batch)."""
    from sgl_jax.srt.layers.attention import native_backend
    from sgl_jax.srt.model_executor.forward_batch_info import ForwardMode

    orig, fixed = ORIG["native_backend.forward_attention"], native_backend.forward_attention
    assert attention.decode_attends_whole_batch(orig)

    def run(fn, args, heads, kv_heads):
        return jax.jit(lambda *a: fn(*a, None, None, heads, kv_heads, None, False,
                                     ForwardMode.DECODE))(*args)

    for seed in range(3):
        args, h, kv = _decode_batch(8, 6, 24, seed=seed)
        want, got = run(orig, args, h, kv), run(fixed, args, h, kv)
        assert np.allclose(np.asarray(want)[:6], np.asarray(got)[:6], atol=1e-5)

    def flops(fn):
        args, h, kv = _decode_batch(32, 32, 64)
        f = jax.jit(lambda *a: fn(*a, None, None, h, kv, None, False, ForwardMode.DECODE))
        return f.lower(*args).compile().cost_analysis()["flops"]

    assert flops(fixed) < flops(orig) / 8
