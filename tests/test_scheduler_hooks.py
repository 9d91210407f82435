"""The engine's runtime in sglang-jax's scheduler thread (engine/scheduler_hooks.py): queued
engine calls, stop, whole engine calls, logprob/logits capture, the scheduler thread's
errors; installed whatever the compat fixes decided, and checked at engine start."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types

import jax
import jax.numpy as jnp
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sglang_parts import close_scheduler, idle_scheduler, logits_case  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.engine import driver  # noqa: E402
from tunix_sglang.engine import scheduler_hooks as hooks  # noqa: E402
from tunix_sglang.engine.results import EngineError  # noqa: E402

compat.apply_all()  # the order of an engine start: fixes first, then the runtime around them
hooks.install()


def _release_recv():
    from sgl_jax.srt.managers.scheduler import Scheduler

    return inspect.unwrap(Scheduler.recv_requests)


def test_installed_and_checked_at_engine_start(monkeypatch):
    from sgl_jax.srt.managers.scheduler import Scheduler

    assert hooks.missing() == []
    driver._check_runtime()
    hooks.install()  # once per process
    assert hooks.missing() == []
    monkeypatch.setattr(Scheduler, "recv_requests", _release_recv())  # a release moved on
    assert hooks.missing() == ["Scheduler.recv_requests"]
    with pytest.raises(EngineError, match=r"hooks are not installed: \['Scheduler.recv_"):
        driver._check_runtime()
    monkeypatch.undo()
    monkeypatch.delitem(compat.ACTIVE_FIXES, "sglang_jax.sampler_returns_logprobs")
    with pytest.raises(EngineError, match="sampler_returns_logprobs.*logprobs"):
        driver._check_runtime()


def test_engine_calls_run_without_the_idle_fix():
    """Around the release's own (spinning) receive, i.e. a release whose idle loop the
    compat check would leave alone: queued engine calls still run, stop still stops."""
    import zmq

    recv = hooks.receiving_engine_calls(_release_recv())
    ctx = zmq.Context()
    sched = idle_scheduler(ctx)
    try:
        ctl = hooks.control(sched)
        fut = ctl.submit(lambda s: s is sched)
        assert recv(sched) == [] and fut.result(1) is True
        sched.waiting_queue = ["busy"]  # not idle: calls wait
        fut = ctl.submit(lambda s: 7)
        recv(sched)
        assert not fut.done()
        sched.waiting_queue = []
        recv(sched)
        assert fut.result(1) == 7
        ctl.stop = True
        with pytest.raises(SystemExit):
            recv(sched)
        assert ctl.submit(lambda s: 0).exception(1) is not None  # refused once stopped
    finally:
        close_scheduler(ctx, sched)


def test_stop_wakes_the_idle_wait():
    """Composed with the compat idle wait (as in an engine): a stop ends a wait at once."""
    import zmq
    from sgl_jax.srt.managers.scheduler import Scheduler

    ctx = zmq.Context()
    sched = idle_scheduler(ctx)
    try:
        ctl = hooks.control(sched)

        def stop():
            ctl.stop = True
            ctl.wake()

        threading.Timer(0.1, stop).start()
        t0 = time.perf_counter()
        with pytest.raises(SystemExit):
            Scheduler.recv_requests(sched)
        assert time.perf_counter() - t0 < 0.9  # the idle wait is 1 s
    finally:
        close_scheduler(ctx, sched)


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
    sched = idle_scheduler(ctx)
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://tok")
    ctl = hooks.control(sched)

    def one_call(recv):
        ctl.expect = 3
        push.send_pyobj(req(0))
        time.sleep(0.05)
        t = threading.Timer(0.2, lambda: [push.send_pyobj(req(i)) for i in (1, 2)])
        t.start()
        got = [r.rid for r in recv(sched)]
        t.join()
        time.sleep(0.05)
        while rest := _release_recv()(sched):
            got.append(["later"] + [r.rid for r in rest])
        return got

    try:
        before = hooks.WRAPPED["Scheduler.recv_requests"]  # (the compat idle wait only)
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
        close_scheduler(ctx, sched, push)


def test_logprob_capture():
    from sgl_jax.srt.layers.logits_processor import LogitsMetadata
    from sgl_jax.srt.managers.scheduler import Scheduler

    _, _, meta, _ = logits_case()
    other = LogitsMetadata(**{**meta.__dict__, "extend_seq_lens_cpu": [2, 0, 0, 0]})
    # Why not the release's return_logprob: it puts prompt lengths into the jit cache key
    # (a compile per batch composition).
    assert jax.tree_util.tree_structure(meta) != jax.tree_util.tree_structure(other)
    assert Scheduler.run_batch.__wrapped__ is hooks.WRAPPED["Scheduler.run_batch"]

    ctl = hooks.SchedulerControl()
    runner = types.SimpleNamespace(_tunix_sglang_last_logprobs=jnp.array([-1.0, -2.0, -3.0]),
                                   _tunix_sglang_last_logits=jnp.array([[1.0, 2.0]] * 3))
    sched = types.SimpleNamespace(_tunix_sglang_control=ctl,
                                  tp_worker=types.SimpleNamespace(model_runner=runner))
    batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(rid="a"),
                                        types.SimpleNamespace(rid="b")])
    kept = []
    run_batch = hooks.capture_logprobs_around(
        lambda self, b: kept.append(runner._tunix_sglang_keep_logits) or "result")
    ctl.want_logprobs(["b"])
    ctl.want_logits(["a"])
    assert run_batch(sched, batch) == "result"
    assert run_batch(sched, batch) == "result"
    assert ctl.take_logprobs("b") == [-2.0, -2.0]  # one per batch, for registered rids only
    assert ctl.take_logprobs("a") is None
    assert kept == [True, False]  # logits rows asked of the sampler for the first batch only
    assert ctl.take_logits("a").tolist() == [1.0, 2.0] and ctl.take_logits("b") is None
    ctl.close()


_SIGQUIT_SCRIPT = textwrap.dedent("""
    import os, signal, sys, types
    os.environ["JAX_PLATFORMS"] = "cpu"
    # A parent started in the background by a shell without job control ignores SIGQUIT, and
    # children inherit that: restore the default so the original's SIGQUIT can kill.
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    from tunix_sglang.engine import scheduler_hooks as hooks
    hooks.install()
    fn = hooks.WRAPPED["scheduler.scheduler_loop_after_create"]
    if sys.argv[1] == "runtime":
        from sgl_jax.srt.managers import scheduler as m
        fn = m.scheduler_loop_after_create
    def boom():
        raise RuntimeError("bad batch")
    s = types.SimpleNamespace(enable_overlap=False, event_loop_normal=boom)
    args = types.SimpleNamespace(nnodes=1, node_rank=0, log_level="error",
                                 enable_single_process=True)
    fn(args, s)
    print("ALIVE", repr(hooks.control(s).error))
""")


@pytest.mark.parametrize("which", ["release", "runtime"])
def test_scheduler_errors_contained(which):
    """A scheduler error: the release's loop SIGQUITs the whole process tree; the runtime's
    stores it where the engine raises it to its caller."""
    r = subprocess.run([sys.executable, "-c", _SIGQUIT_SCRIPT, which], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if which == "release":
        assert r.returncode == -signal.SIGQUIT, (r.returncode, r.stderr[-2000:])
    else:
        assert r.returncode == 0 and "ALIVE RuntimeError('bad batch')" in r.stdout, r.stderr
