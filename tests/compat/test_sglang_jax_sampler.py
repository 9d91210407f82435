"""compat/sglang_jax/sampler.py: each released original is wrong, the fixed one is not."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from sglang_parts import runner_parts, sampling_inputs  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.compat.base import ORIGINALS as ORIG  # noqa: E402
from tunix_sglang.compat.sglang_jax import sampler as fixes  # noqa: E402
from tunix_sglang.engine import scheduler_hooks as hooks  # noqa: E402

compat.apply_all()


def test_min_p_filter_arity():
    from sgl_jax.srt.layers import sampler

    operands = (jnp.array([[0.6, 0.3, 0.1]]), jnp.array([0.6]), False)
    assert fixes.min_p_filter_is_broken(ORIG["sampler._apply_min_p_filter"])  # "unpack"
    assert not fixes.min_p_filter_is_broken(sampler._apply_min_p_filter)
    out = sampler._apply_min_p_filter(operands)
    assert np.allclose(np.asarray(out), [[0.6, 0.0, 0.0]])


def _sampling_args(top_k, top_p, min_p, need_min_p, key, bs=6, vocab=300):
    logits = jax.random.normal(jax.random.key(1), (bs, vocab)) * 3
    return (logits, jax.nn.softmax(logits, -1), jnp.full((bs,), top_k, jnp.int32),
            jnp.full((bs,), top_p), jnp.full((bs,), min_p), jnp.zeros((bs,), jnp.int32),
            jnp.ones((bs, 1)), None, need_min_p, jax.random.key(key))


def test_sampler_sort_in_graph():
    """On a mesh spanning processes the non-TPU sampler's sort runs inside the program (the
    original compiles a Python host callback, which blocked a lockstep engine whose mesh
    spans processes), sampling exactly the tokens the original samples for the same key."""
    from sgl_jax.srt.layers import sampler

    name = "top_k_top_p_min_p_sampling_from_probs_jax_not_tpu_runtime"
    orig, fixed = ORIG[f"sampler.{name}"], getattr(sampler, name)
    args = _sampling_args(300, 1.0, 0.0, False, 0)
    assert "python_cpu_callback" in jax.jit(orig).lower(args).as_text()
    # On one process's devices the (faster) host sort stays...
    assert not hooks.SPANNING_ENGINE.is_set()
    assert "python_cpu_callback" in jax.jit(fixed).lower(args).as_text()
    # ...an engine on devices of two processes switches this process to the in-graph sort.
    other = type("D", (), {"process_index": 1})()
    assert not hooks.mesh_spans_processes(jax.devices())
    with hooks.engine_devices(jax.devices()):
        assert not hooks.SPANNING_ENGINE.is_set()
    try:
        with hooks.engine_devices([*jax.devices(), other]):
            pass
        assert hooks.SPANNING_ENGINE.is_set()
        _check_in_graph_sort(orig, fixed)
    finally:
        hooks.SPANNING_ENGINE.clear()


def _check_in_graph_sort(orig, fixed):
    args = _sampling_args(300, 1.0, 0.0, False, 0)
    # A new function for jit: traces are cached per function, and the flag is read when
    # tracing (as in the engine, whose sampler is traced after the flag is set).
    assert "callback" not in jax.jit(lambda a: fixed(a)).lower(args).as_text()
    for top_k, top_p, min_p, need in [(300, 1.0, 0.0, False), (5, 1.0, 0.0, False),
                                      (300, 0.5, 0.0, False), (300, 1.0, 0.3, True)]:
        for key in range(4):
            a = _sampling_args(top_k, top_p, min_p, need, key)
            assert np.array_equal(np.asarray(jax.jit(orig)(a)),
                                  np.asarray(jax.jit(lambda x: fixed(x))(a)))
    # top_k=1 must pick each row's most likely token.
    a = _sampling_args(1, 1.0, 0.0, False, 3)
    assert np.array_equal(np.asarray(fixed(a)), np.asarray(jnp.argmax(a[1], -1)))


def test_sampler_returns_logprobs():
    from sgl_jax.srt.layers.sampler import Sampler
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    out, meta, pos = sampling_inputs(temperature=0.5)

    def jitted(call):
        graphdef, state = nnx.split(Sampler(nnx.Rngs(0)))
        return jax.jit(lambda st, o, m, p: call(nnx.merge(graphdef, st), o, m, p))(
            state, out, meta, pos)

    # Original: only ids come out of jit; the logprobs computed inside are lost.
    ids = jitted(ORIG["Sampler.__call__"])
    assert not isinstance(ids, tuple) and out.next_token_logprobs is None
    ids, lps = jitted(Sampler.__call__)
    expected = jax.nn.log_softmax(out.next_token_logits / 0.5)[jnp.arange(4), ids]
    assert np.allclose(lps, expected, atol=1e-5)
    # ModelRunner.sample hands the ids on and stores the logprobs where the scheduler reads.
    runner = runner_parts()
    ModelRunner.initialize_jit(runner)
    got = ModelRunner.sample(runner, out, meta, pos)
    assert got.shape == (4,) and out.next_token_logprobs.shape == (4,)
    assert runner._tunix_sglang_last_logprobs.shape == (4,)
    # ...and the logits rows only when the engine's capture asks for them (a sync proof).
    assert getattr(runner, "_tunix_sglang_last_logits", None) is None
    runner._tunix_sglang_keep_logits = True
    ModelRunner.sample(runner, out, meta, pos)
    assert runner._tunix_sglang_last_logits is out.next_token_logits


def test_sampler_rng_advances():
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    out, meta, pos = sampling_inputs(bs=8, vocab=1000, logits=jnp.zeros((8, 1000)))
    frozen = runner_parts()
    ModelRunner.initialize_jit(frozen)
    before_rng_fix = ORIG["ModelRunner.sample.rng"]
    a = before_rng_fix(frozen, out, meta, pos)
    b = before_rng_fix(frozen, out, meta, pos)
    assert np.array_equal(a, b)  # uniform over 1000 tokens, yet the same 8 draws twice

    runner = runner_parts()
    ModelRunner.initialize_jit(runner)
    c = ModelRunner.sample(runner, out, meta, pos)
    d = ModelRunner.sample(runner, out, meta, pos)
    assert not np.array_equal(c, d)
    hooks.set_sampler_seed(runner, 3)
    e = ModelRunner.sample(runner, out, meta, pos)
    hooks.set_sampler_seed(runner, 3)
    f = ModelRunner.sample(runner, out, meta, pos)
    assert np.array_equal(e, f)
