"""Each sglang-jax fix: the original (saved by the fix) is broken, the patched one works.

No engine here (the engine-level effects are in tests/test_engine.py): the fixed functions
are exercised on small inputs; behaviours that signal the process run in a subprocess.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.compat import sglang_jax_fixes as fixes  # noqa: E402

compat.apply_all()
ORIG = fixes.ORIGINALS


def test_all_fixes_active_and_recorded():
    active = fixes.active()
    assert all(active.values()), active
    for name, _, _ in fixes.FIXES:
        assert name in compat.ACTIVE_FIXES
    fixes.apply()  # idempotent
    assert fixes.active() == active


def test_threading_atexit_restored():
    assert ORIG["threading._register_atexit.replacement"] is not ORIG["threading._register_atexit"]
    assert threading._register_atexit is ORIG["threading._register_atexit"]


def test_native_attention_pytree():
    from sgl_jax.srt.layers.attention.native_backend import NativeAttention

    # What native_backend.py:13 does at import: a second registration is refused.
    with pytest.raises(ValueError, match="Duplicate custom PyTreeDef"):
        jax.tree_util.register_pytree_node_class(NativeAttention)
    attn = NativeAttention(4, 2)  # imported (thanks to the fix) and usable as a pytree
    jax.tree_util.tree_flatten(attn)


def test_min_p_filter_arity():
    from sgl_jax.srt.layers import sampler

    operands = (jnp.array([[0.6, 0.3, 0.1]]), jnp.array([0.6]), False)
    with pytest.raises(ValueError, match="unpack"):
        ORIG["sampler._apply_min_p_filter"](operands)
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

    from tunix_sglang.compat import sglang_jax_fixes as fixes

    name = "top_k_top_p_min_p_sampling_from_probs_jax_not_tpu_runtime"
    orig, fixed = ORIG[f"sampler.{name}"], getattr(sampler, name)
    args = _sampling_args(300, 1.0, 0.0, False, 0)
    assert "python_cpu_callback" in jax.jit(orig).lower(args).as_text()
    # On one process's devices the (faster) host sort stays...
    assert not fixes._SORT_IN_GRAPH.is_set()
    assert "python_cpu_callback" in jax.jit(fixed).lower(args).as_text()
    # ...an engine on devices of two processes switches this process to the in-graph sort.
    other = type("D", (), {"process_index": 1})()
    assert not fixes.mesh_spans_processes(jax.devices())
    with fixes.engine_devices(jax.devices()):
        assert not fixes._SORT_IN_GRAPH.is_set()
    try:
        with fixes.engine_devices([*jax.devices(), other]):
            pass
        assert fixes._SORT_IN_GRAPH.is_set()
        _check_in_graph_sort(orig, fixed)
    finally:
        fixes._SORT_IN_GRAPH.clear()


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


class _TinyLM(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((3,)))

    def __call__(self, x, pool, meta):
        return x * self.w.value, pool, meta


def _fake_runner():
    from sgl_jax.srt.layers.sampler import Sampler

    return types.SimpleNamespace(
        model=_TinyLM(), sampler=Sampler(nnx.Rngs(0)), token_to_kv_pool=jnp.zeros((1,))
    )


def test_forward_reads_weights():
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    x = jnp.ones((3,))

    def run(r):  # the KV pool argument is donated: keep the returned one, as the runner does
        out, r.token_to_kv_pool, _ = r.jitted_run_model(x, None)
        return np.asarray(out)

    old = _fake_runner()
    ORIG["ModelRunner.initialize_jit"](old)
    old.model_state_leaves = [jnp.full((3,), 5.0)]  # what a naive sync does
    assert np.allclose(run(old), 1.0)  # ...changes nothing
    new = _fake_runner()
    ModelRunner.initialize_jit(new)
    assert np.allclose(run(new), 1.0)
    new.model_state_leaves = [jnp.full((3,), 5.0)]
    assert np.allclose(run(new), 5.0)


def _sampling_inputs(bs=4, vocab=50, temperature=1.0, greedy=False, logits=None):
    from sgl_jax.srt.layers.logits_processor import LogitsProcessorOutput
    from sgl_jax.srt.sampling.sampling_batch_info import SamplingMetadata

    if logits is None:
        logits = jax.random.normal(jax.random.key(0), (bs, vocab))
    meta = SamplingMetadata(
        return_logprob=True, top_logprobs_nums=None, token_ids_logprobs=None,
        temperatures=jnp.full((bs, 1), temperature), top_ps=jnp.ones((bs,)),
        top_ks=jnp.full((bs,), vocab, jnp.int32), min_ps=jnp.zeros((bs,)),
        sampling_seeds=None, is_all_greedy=greedy, need_min_p_sampling=False,
    )
    return LogitsProcessorOutput(next_token_logits=logits), meta, jnp.zeros((bs,), jnp.int32)


def test_sampler_returns_logprobs():
    from sgl_jax.srt.layers.sampler import Sampler
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    out, meta, pos = _sampling_inputs(temperature=0.5)

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
    runner = _fake_runner()
    ModelRunner.initialize_jit(runner)
    got = ModelRunner.sample(runner, out, meta, pos)
    assert got.shape == (4,) and out.next_token_logprobs.shape == (4,)
    assert runner._tunix_sglang_last_logprobs.shape == (4,)


def test_sampler_rng_advances():
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    out, meta, pos = _sampling_inputs(bs=8, vocab=1000, logits=jnp.zeros((8, 1000)))
    frozen = _fake_runner()
    ModelRunner.initialize_jit(frozen)
    before_rng_fix = ORIG["ModelRunner.sample.rng"]
    a = before_rng_fix(frozen, out, meta, pos)
    b = before_rng_fix(frozen, out, meta, pos)
    assert np.array_equal(a, b)  # uniform over 1000 tokens, yet the same 8 draws twice

    runner = _fake_runner()
    ModelRunner.initialize_jit(runner)
    c = ModelRunner.sample(runner, out, meta, pos)
    d = ModelRunner.sample(runner, out, meta, pos)
    assert not np.array_equal(c, d)
    fixes.set_sampler_seed(runner, 3)
    e = ModelRunner.sample(runner, out, meta, pos)
    fixes.set_sampler_seed(runner, 3)
    f = ModelRunner.sample(runner, out, meta, pos)
    assert np.array_equal(e, f)


def _logits_case():
    from sgl_jax.srt.layers.embeddings import Embed
    from sgl_jax.srt.layers.logits_processor import LogitsMetadata, LogitsProcessor
    from sgl_jax.srt.model_executor.forward_batch_info import ForwardMode

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tensor",))
    head = Embed(50, 8, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    meta = LogitsMetadata(
        forward_mode=ForwardMode.EXTEND, extend_return_logprob=True,
        extend_seq_lens=jnp.array([3, 0, 0, 0]), extend_seq_lens_cpu=[3, 0, 0, 0],
        extend_logprob_start_lens_cpu=[2, 0, 0, 0], extend_logprob_pruned_lens_cpu=[1, 0, 0, 0],
        top_logprobs_nums=[0, 0, 0, 0], token_ids_logprobs=[None] * 4,
        extend_input_logprob_token_ids_device=jnp.array([5]),
    )
    return LogitsProcessor(50, mesh), head, meta, jnp.ones((8, 8))


def test_logprob_logits_padding():
    from sgl_jax.srt.layers.logits_processor import LogitsProcessor

    proc, head, meta, hidden = _logits_case()
    # Original: 1 row of logits for a batch padded to 4 -> sampler's temperatures (4 rows)
    # do not match ("Temperature batch size 4 doesn't match logits batch size 1").
    orig = ORIG["LogitsProcessor.__call__"]
    assert orig(proc, hidden, head, meta).next_token_logits.shape[0] == 1
    assert LogitsProcessor.__call__(proc, hidden, head, meta).next_token_logits.shape == (4, 50)


def test_logprob_capture():
    from sgl_jax.srt.layers.logits_processor import LogitsMetadata
    from sgl_jax.srt.managers.scheduler import Scheduler

    _, _, meta, _ = _logits_case()
    other = LogitsMetadata(**{**meta.__dict__, "extend_seq_lens_cpu": [2, 0, 0, 0]})
    # Why: return_logprob puts prompt lengths into the jit cache key (compile per batch).
    assert jax.tree_util.tree_structure(meta) != jax.tree_util.tree_structure(other)
    assert Scheduler.run_batch is not ORIG["Scheduler.run_batch"]

    ctl = fixes.SchedulerControl()
    runner = types.SimpleNamespace(_tunix_sglang_last_logprobs=jnp.array([-1.0, -2.0, -3.0]))
    sched = types.SimpleNamespace(_tunix_sglang_control=ctl,
                                  tp_worker=types.SimpleNamespace(model_runner=runner))
    batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(rid="a"),
                                        types.SimpleNamespace(rid="b")])
    run_batch = fixes.capture_logprobs_around(lambda self, b: "result")
    ctl.want_logprobs(["b"])
    assert run_batch(sched, batch) == "result"
    assert run_batch(sched, batch) == "result"
    assert ctl.take_logprobs("b") == [-2.0, -2.0]  # one per batch, for registered rids only
    assert ctl.take_logprobs("a") is None
    ctl.close()


def test_lm_head_dtype(tmp_path):
    from sgl_jax.srt.models.qwen3 import Qwen3ForCausalLM
    from transformers import AutoConfig

    from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model

    path = ensure_tiny_model(TinyModelSpec(tie_word_embeddings=False), cache_dir=tmp_path)
    cfg = AutoConfig.from_pretrained(str(path))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "tensor", "expert"))
    with mesh:
        m = types.SimpleNamespace()
        ORIG["Qwen3ForCausalLM.__init__"](m, cfg, jnp.float32, nnx.Rngs(0), mesh)
        assert m.lm_head.embedding.value.dtype == jnp.bfloat16  # original: bf16 head
        fixed = Qwen3ForCausalLM(cfg, jnp.float32, nnx.Rngs(0), mesh)
    assert fixed.lm_head.embedding.value.dtype == jnp.float32


def _fake_scheduler(ctx):
    import zmq

    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://tok")
    rpc = ctx.socket(zmq.DEALER)
    rpc.bind("inproc://rpc")
    return types.SimpleNamespace(
        nnodes=1, node_rank=0, recv_from_tokenizer=pull, recv_from_rpc=rpc, cur_batch=None,
        last_batch=None, waiting_queue=[], chunked_req=None,
        running_batch=types.SimpleNamespace(is_empty=lambda: True),
    )


def test_idle_scheduler_waits(monkeypatch):
    import zmq
    from sgl_jax.srt.managers.scheduler import Scheduler

    # Generous bounds: the point is "waits" vs "returns at once", on a possibly loaded machine.
    monkeypatch.setattr(fixes, "IDLE_WAIT_S", 2.0)
    ctx = zmq.Context()
    sched = _fake_scheduler(ctx)
    try:
        t0 = time.perf_counter()
        for _ in range(200):
            assert ORIG["Scheduler.recv_requests"](sched) == []
        spin = (time.perf_counter() - t0) / 200
        assert spin < 0.05  # the original returns at once: the idle loop spins a core
        t0 = time.perf_counter()
        assert Scheduler.recv_requests(sched) == []
        assert time.perf_counter() - t0 >= 1.5  # the fixed one waits when idle
        ctl = fixes.control(sched)
        done = []
        timer = threading.Timer(0.05, lambda: done.append(ctl.submit(lambda s: 42)))
        timer.start()
        t0 = time.perf_counter()
        Scheduler.recv_requests(sched)
        assert time.perf_counter() - t0 < 1.0  # woken by the engine, ran its call
        timer.join()  # the timer thread appends the future after its submit woke us
        assert done[0].result(1) == 42
        push = ctx.socket(zmq.PUSH)
        push.connect("inproc://tok")
        threading.Timer(0.05, lambda: push.send_pyobj("req")).start()
        t0 = time.perf_counter()
        got = Scheduler.recv_requests(sched)
        assert got == ["req"] and time.perf_counter() - t0 < 1.0  # woken by a request
        ctl.stop = True
        with pytest.raises(SystemExit):
            Scheduler.recv_requests(sched)
        push.close(0)
    finally:
        sched.recv_from_tokenizer.close(0)
        sched.recv_from_rpc.close(0)
        ctx.term()


def test_engine_call_one_batch():
    """All requests of one engine call are received together, however they trickle in.

    The tokenizer manager sends a batched call one request at a time; a scheduler that
    looks while the call is half sent would prefill it in pieces (timing-dependent programs:
    multi-host lockstep drifts apart). Here 1 of 3 requests is queued before the scheduler
    looks and the other 2 arrive 0.2 s later.
    """
    import zmq
    from sgl_jax.srt.managers.io_struct import TokenizedGenerateReqInput
    from sgl_jax.srt.managers.scheduler import Scheduler

    def req(i):
        r = object.__new__(TokenizedGenerateReqInput)
        r.rid = f"r{i}"
        return r

    ctx = zmq.Context()
    sched = _fake_scheduler(ctx)
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://tok")
    ctl = fixes.control(sched)

    def one_call(recv):
        ctl.expect = 3
        push.send_pyobj(req(0))
        time.sleep(0.05)
        t = threading.Timer(0.2, lambda: [push.send_pyobj(req(i)) for i in (1, 2)])
        t.start()
        got = [r.rid for r in recv(sched)]
        t.join()
        time.sleep(0.05)
        while rest := fixes.ORIGINALS["Scheduler.recv_requests"](sched):
            got.append(["later"] + [r.rid for r in rest])
        return got

    try:
        before = fixes.ORIGINALS["Scheduler.recv_requests.one_batch"]  # (idle fix only)
        assert one_call(before) == ["r0", ["later", "r1", "r2"]]  # a 1 + 2 split
        assert one_call(Scheduler.recv_requests) == ["r0", "r1", "r2"]  # one batch
        assert ctl.expect == 0
        ctl.expect = 0  # nothing announced: nothing awaited
        push.send_pyobj(req(9))
        time.sleep(0.05)
        t0 = time.perf_counter()
        assert [r.rid for r in Scheduler.recv_requests(sched)] == ["r9"]
        assert time.perf_counter() - t0 < 1.0
    finally:
        push.close(0)
        sched.recv_from_tokenizer.close(0)
        sched.recv_from_rpc.close(0)
        ctx.term()


_SIGQUIT_SCRIPT = textwrap.dedent("""
    import os, signal, sys, types
    os.environ["JAX_PLATFORMS"] = "cpu"
    # A parent started in the background by a shell without job control ignores SIGQUIT, and
    # children inherit that: restore the default so the original's SIGQUIT can kill.
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    from tunix_sglang.compat import sglang_jax_fixes as fixes
    fixes.apply()
    fn = fixes.ORIGINALS["scheduler.scheduler_loop_after_create"]
    if sys.argv[1] == "patched":
        from sgl_jax.srt.managers import scheduler as m
        fn = m.scheduler_loop_after_create
    def boom():
        raise RuntimeError("bad batch")
    s = types.SimpleNamespace(enable_overlap=False, event_loop_normal=boom)
    args = types.SimpleNamespace(nnodes=1, node_rank=0, log_level="error",
                                 enable_single_process=True)
    fn(args, s)
    print("ALIVE", repr(fixes.control(s).error))
""")


@pytest.mark.parametrize("which", ["original", "patched"])
def test_scheduler_errors_contained(which):
    r = subprocess.run([sys.executable, "-c", _SIGQUIT_SCRIPT, which], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if which == "original":
        assert r.returncode == -signal.SIGQUIT, (r.returncode, r.stderr[-2000:])
    else:
        assert r.returncode == 0 and "ALIVE RuntimeError('bad batch')" in r.stdout, r.stderr


def test_keep_process_signal_handlers():
    from multiprocessing import resource_tracker

    from sgl_jax.srt.entrypoints import engine as engine_mod

    args = types.SimpleNamespace(enable_single_process=True)
    saved = {s: signal.getsignal(s) for s in (signal.SIGCHLD, signal.SIGQUIT)}
    fd = resource_tracker._resource_tracker._fd
    try:
        engine_mod._set_envs_and_config(args)
        assert {s: signal.getsignal(s) for s in saved} == saved
        assert resource_tracker._resource_tracker._fd == fd
        ORIG["engine._set_envs_and_config"](args)
        assert signal.getsignal(signal.SIGCHLD) != saved[signal.SIGCHLD]  # reaps any child
        assert resource_tracker._resource_tracker._fd == -1
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        resource_tracker._resource_tracker._fd = fd


def test_logging_config_kept():
    from sgl_jax.srt.managers import scheduler as sched_mod

    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    level = root.level
    args = types.SimpleNamespace(log_level="error", enable_single_process=True)
    try:
        sched_mod.configure_logger(args)
        assert handler in root.handlers and root.level == level
        assert logging.getLogger("sgl_jax").level == logging.ERROR
        ORIG["common_utils.configure_logger"](args)
        assert handler not in root.handlers  # the original drops the host's handlers
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        root.setLevel(level)
        logging.getLogger("sgl_jax").setLevel(logging.NOTSET)


def test_engine_device_subset_in_process():
    from sgl_jax.srt.managers import scheduler as sched_mod

    dev = jax.devices()[-1:]
    with fixes.engine_devices(dev):
        mesh = sched_mod.create_device_mesh([-1, 1, 1], [1, 1, 1])
    assert list(mesh.devices.flat) == dev
    # the multi-device case (original takes all 4, fixed takes 2) is in test_engine.py


def test_penalty_precompile_optional():
    from sgl_jax.srt.managers.tp_worker import ModelWorker

    worker = types.SimpleNamespace()  # no precompile state at all
    with fixes.engine_devices(None, skip_penalty_precompile=True):
        assert ModelWorker.precompile_penalties(worker) is None  # skipped
    with pytest.raises(AttributeError):  # outside the block the original runs
        ModelWorker.precompile_penalties(worker)
    with pytest.raises(AttributeError):
        ORIG["ModelWorker.precompile_penalties"](worker)
