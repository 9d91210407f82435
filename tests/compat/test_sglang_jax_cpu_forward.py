"""compat/sglang_jax/cpu_forward.py: the same outputs as sglang-jax 0.0.2 (kept in
ORIGINALS), for a fraction of its work and memory.

Attention: the original attends the whole padded batch at once (every query of the batch
against every KV slot of the batch, masked block-diagonally); the fixes gather each
sequence's own keys.
Inputs are laid out as the scheduler lays them out: `loc` lists each sequence's KV slots one
after another in rows x max_len entries (0 = padding), prefill tokens are packed. Output
head: logits from a [hidden, vocab] copy of the head.
"""

from __future__ import annotations

import functools
import os
import types

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.compat.base import ORIGINALS  # noqa: E402
from tunix_sglang.compat.sglang_jax import cpu_forward  # noqa: E402

compat.apply_all()


def _mode():
    from sgl_jax.srt.model_executor.forward_batch_info import ForwardMode

    return ForwardMode


@functools.cache
def _original():
    """The release's whole-batch attention, called as its NativeAttention.__call__ calls it:
    with strided K and V views of the fused KV buffer."""
    from sgl_jax.srt.layers.attention import native_backend

    fn = native_backend.forward_attention

    def original(q, fused, *rest):
        return fn(q, fused[:, ::2], fused[:, 1::2], *rest)

    return original


def _slots(rng, rows, max_len, lens):
    pool = rows * max_len + 1
    loc = np.zeros(rows * max_len, np.int32)
    loc[: lens.sum()] = rng.permutation(np.arange(1, pool))[: lens.sum()]
    return pool, loc


def _decode_batch(rows, real, max_len, longest, heads=4, kv_heads=2, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    lens = np.zeros(rows, np.int32)
    lens[:real] = rng.integers(1, longest + 1, real)
    pool, loc = _slots(rng, rows, max_len, lens)
    q = rng.standard_normal((rows, heads * head_dim)).astype(np.float32)
    fused = rng.standard_normal((pool, 2 * kv_heads, head_dim)).astype(np.float32)
    return [jnp.asarray(x) for x in (q, fused, lens, loc)], heads, kv_heads


def _extend_batch(rows, real, max_len, tokens, prefix, heads=4, kv_heads=2, head_dim=16,
                  seed=0, new_len=None):
    """`real` sequences with `new_len` (default: 1..max_len/2) new tokens each (and a cached
    prefix if asked), packed into `tokens` query rows (the rest padding)."""
    rng = np.random.default_rng(seed)
    new, pre = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    for b in range(real):
        new[b] = new_len or rng.integers(1, max_len // 2 + 1)
        pre[b] = rng.integers(0, max_len - new[b] + 1) if prefix else 0
    assert new.sum() <= tokens
    pool, loc = _slots(rng, rows, max_len, new + pre)
    q = rng.standard_normal((tokens, heads, head_dim)).astype(np.float32)
    fused = rng.standard_normal((pool, 2 * kv_heads, head_dim)).astype(np.float32)
    args = [jnp.asarray(x) for x in (q, fused, new + pre, loc, pre, new)]
    return args, heads, kv_heads, int(new.sum())


@functools.cache  # one compiled program per function and shape (jit caches per callable)
def _decode(fn, heads, kv_heads):
    if fn is cpu_forward.decode_attention_per_sequence:
        return jax.jit(lambda *a: fn(*a, heads, kv_heads))
    return jax.jit(lambda *a: fn(*a, None, None, heads, kv_heads, None, False,
                                 _mode().DECODE))


@functools.cache
def _extend(fn, heads, kv_heads, causal=True):
    if fn is cpu_forward.prefill_attention_per_sequence:
        return jax.jit(lambda *a: fn(*a, heads, kv_heads, None, causal))
    return jax.jit(lambda *a: fn(*a, heads, kv_heads, None, causal, _mode().EXTEND))


def test_native_decode_attention_and_prefill_wrap_the_release_once():
    """Both attention fixes wrap the release's NativeAttention.__call__ once (prefill's
    wrapper around decode's around the original), and apply_all does not wrap again."""
    from sgl_jax.srt.layers.attention.native_backend import NativeAttention

    compat.apply_all()
    call = NativeAttention.__call__
    assert call.__wrapped__ is ORIGINALS["NativeAttention.__call__.prefill"]
    assert call.__wrapped__.__wrapped__ is ORIGINALS["NativeAttention.__call__"]
    assert cpu_forward.native_decode_attention_needed()  # the released backend, kept


def test_attention_widths_and_branch():
    assert cpu_forward.attention_widths(599) == [75, 150, 300, 599]
    assert cpu_forward.attention_widths(40) == [20, 40]
    assert cpu_forward.attention_widths(10) == [10]
    widths = cpu_forward.attention_widths(215)
    for lens, want in [([1, 27, 0], 27), ([28, 3], 54), ([108], 108), ([109, 1], 215),
                       ([215], 215)]:
        got = widths[int(cpu_forward.branch_for(widths, jnp.asarray(lens)))]
        assert got == want, (lens, got)


def test_native_decode_attention_per_sequence():
    """Decode: the original's outputs (GQA, padded rows, sequences of different lengths in
    three of the four width branches), for a fraction of its work (the original scores
    every query against every key of the batch)."""
    orig, fixed = _original(), cpu_forward.decode_attention_per_sequence
    for seed, longest in enumerate([5, 30, 64, 64]):
        args, h, kv = _decode_batch(8, 6, 64, longest, seed=seed)
        want, got = _decode(orig, h, kv)(*args), _decode(fixed, h, kv)(*args)
        np.testing.assert_allclose(np.asarray(got)[:6], np.asarray(want)[:6], atol=1e-5)

    def flops(fn):
        args, h, kv = _decode_batch(32, 32, 64, 64)
        return _decode(fn, h, kv).lower(*args).compile().cost_analysis()["flops"]

    assert flops(fixed) < flops(orig) / 8


@pytest.mark.parametrize("causal", [True, False])
def test_native_prefill_attention_per_sequence(causal):
    """Prefill (EXTEND, with and without cached prefixes): the original's outputs for every
    real token; padding tokens get zeros (nothing reads them)."""
    orig, fixed = _original(), cpu_forward.prefill_attention_per_sequence
    for seed, (real, prefix) in enumerate([(8, False), (5, True), (1, False), (8, True)]):
        args, h, kv, n = _extend_batch(8, real, 24, 112, prefix, seed=seed)
        want = np.asarray(_extend(orig, h, kv, causal)(*args))
        got = np.asarray(_extend(fixed, h, kv, causal)(*args))
        np.testing.assert_allclose(got[:n], want[:n], atol=1e-5)
        assert not got[n:].any()


def test_native_prefill_attention_memory_grows_with_tokens_not_batch_squared():
    """What ran the 128 x 512 rollout out of memory: the original's temporary buffers hold
    [heads, tokens, rows x max_len] scores (batch x total length); the fix's hold a few
    [heads, width, width] blocks."""
    orig, fixed = _original(), cpu_forward.prefill_attention_per_sequence

    def temp_bytes(fn, rows):
        args, h, kv, _ = _extend_batch(rows, rows, 64, rows * 16, False, new_len=16)
        return _extend(fn, h, kv).lower(*args).compile().memory_analysis().temp_size_in_bytes

    small_orig, small_fixed = temp_bytes(orig, 16), temp_bytes(fixed, 16)
    big_orig, big_fixed = temp_bytes(orig, 64), temp_bytes(fixed, 64)
    assert big_orig > 12 * small_orig  # 4x the batch: ~16x the original's memory
    assert big_fixed < 5 * small_fixed  # ... at most ~4x the fix's
    assert big_fixed < big_orig / 10


# -- output head ----------------------------------------------------------------------------


class _TiedLM(nnx.Module):
    """The part of a sglang-jax causal LM the head fix looks at: a tied embedding."""

    def __init__(self, vocab, hidden):
        from sgl_jax.srt.layers.embeddings import Embed

        self.config = types.SimpleNamespace(tie_word_embeddings=True)
        self.transformer = nnx.Module()
        self.transformer.embed_tokens = Embed(vocab, hidden, param_dtype=jnp.float32,
                                              rngs=nnx.Rngs(0))


def _head(vocab=1000, hidden=64):
    model = _TiedLM(vocab, hidden)
    head = cpu_forward.logits_head(model)
    assert head is model.transformer.embed_tokens
    head.logits_weight = cpu_forward.logits_weight_class()(jnp.transpose(head.embedding.value))
    return model, head


def test_cpu_lm_head_layout_same_logits():
    """Logits from the [hidden, vocab] copy are the original's, bit for bit; the original
    contracts the [vocab, hidden] weight on its minor dimension (what XLA's CPU dot re-packs
    on every call), the fix on its major one."""
    _, head = _head()
    proc = types.SimpleNamespace(vocab_size=1000)
    hidden = jax.random.normal(jax.random.key(1), (16, 64))
    orig = ORIGINALS["LogitsProcessor._get_logits"]
    from sgl_jax.srt.layers.logits_processor import LogitsProcessor

    def program(fn):  # the head's arrays as arguments (a stand-in module per trace)
        def logits(h, e, w):
            box = types.SimpleNamespace(embedding=types.SimpleNamespace(value=e),
                                        logits_weight=types.SimpleNamespace(value=w),
                                        promote_dtype=head.promote_dtype, dtype=head.dtype)
            return fn(proc, h, box)

        return jax.jit(logits).lower(hidden, head.embedding.value,
                                     head.logits_weight.value).compile()

    want = np.asarray(jax.jit(lambda h: orig(proc, h, head))(hidden))
    got = np.asarray(jax.jit(lambda h: LogitsProcessor._get_logits(proc, h, head))(hidden))
    assert np.array_equal(want, got)
    assert "rhs_contracting_dims={1}" in program(orig).as_text()
    assert "rhs_contracting_dims={0}" in program(LogitsProcessor._get_logits).as_text()


def test_cpu_lm_head_copy_follows_new_weights():
    """After a sync writes a new head weight leaf, the next forward's refresh derives the
    copy from it (and the model holds only the new copy)."""
    model, head = _head()
    _, state = nnx.split(model)
    runner = types.SimpleNamespace(model=model,
                                   model_state_leaves=jax.tree_util.tree_leaves(state))
    refresh = cpu_forward.HeadRefresh(runner, head)
    before = list(runner.model_state_leaves)
    refresh(runner)
    assert runner.model_state_leaves == before  # same weights: nothing to do
    new = jax.random.normal(jax.random.key(2), head.embedding.value.shape)
    runner.model_state_leaves[refresh.src] = new
    refresh(runner)
    derived = runner.model_state_leaves[refresh.dst]
    assert np.array_equal(np.asarray(derived), np.asarray(new).T)
    assert head.logits_weight.value is derived
