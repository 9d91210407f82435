"""compat/sglang_jax/process.py: what the release does to the process it shares with the
trainer. Behaviours that signal a process run in a child process."""

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

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sglang_parts import close_scheduler, idle_scheduler  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.compat.base import ORIGINALS as ORIG  # noqa: E402
from tunix_sglang.compat.sglang_jax import process  # noqa: E402
from tunix_sglang.engine import scheduler_hooks as hooks  # noqa: E402

compat.apply_all()

# A shell without job control starts background jobs with SIGQUIT ignored, and children
# inherit that: a child that must be killable by SIGQUIT restores the default first.
_QUIT_DFL = "import signal; signal.signal(signal.SIGQUIT, signal.SIG_DFL)\n"


def test_threading_atexit_restored():
    """What importing the engine module put in place drops every registration (thread pools
    register their join at exit through it); the restored original keeps them."""
    registered = threading._threading_atexits
    n = len(registered)
    ORIG["threading._register_atexit.replacement"](print)
    assert len(registered) == n
    assert threading._register_atexit is ORIG["threading._register_atexit"]
    threading._register_atexit(print)
    assert registered[-1].func is print
    registered.pop()


def _idle_fixed():
    """The idle-waiting receive the fix installed (the engine's runtime may wrap it)."""
    from sgl_jax.srt.managers.scheduler import Scheduler

    fn = Scheduler.recv_requests
    while fn.__wrapped__ is not ORIG["Scheduler.recv_requests"]:
        fn = fn.__wrapped__
    return fn


def test_idle_scheduler_waits(monkeypatch):
    import zmq
    from sgl_jax.srt.managers.scheduler import Scheduler

    assert process.idle_loop_spins(Scheduler)
    fixed = _idle_fixed()
    # Generous bounds: the point is "waits" vs "returns at once", on a possibly loaded machine.
    monkeypatch.setattr(process, "IDLE_WAIT_S", 2.0)
    ctx = zmq.Context()
    sched = idle_scheduler(ctx)
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://tok")
    try:
        t0 = time.perf_counter()
        for _ in range(200):
            assert ORIG["Scheduler.recv_requests"](sched) == []
        spin = (time.perf_counter() - t0) / 200
        assert spin < 0.05  # the original returns at once: the idle loop spins a core
        t0 = time.perf_counter()
        assert fixed(sched) == []
        assert time.perf_counter() - t0 >= 1.5  # the fixed one waits when idle
        ctl = hooks.control(sched)
        threading.Timer(0.05, ctl.wake).start()
        t0 = time.perf_counter()
        assert fixed(sched) == []
        assert time.perf_counter() - t0 < 1.0  # woken by the engine (a call to run)
        threading.Timer(0.05, lambda: push.send_pyobj("req")).start()
        t0 = time.perf_counter()
        got = fixed(sched)
        assert got == ["req"] and time.perf_counter() - t0 < 1.0  # woken by a request
        sched.waiting_queue = ["busy"]
        t0 = time.perf_counter()
        assert fixed(sched) == [] and time.perf_counter() - t0 < 1.0  # busy: never waits
    finally:
        close_scheduler(ctx, sched, push)


def test_scheduler_watchdog_contained(monkeypatch, caplog):
    """A forward stuck past watchdog_timeout: the original SIGQUITs `parent_process` (the
    trainer's parent when the scheduler is a thread of the trainer); fixed, it logs and keeps
    watching until the engine stops."""
    from sgl_jax.srt.managers import scheduler as sched_mod

    assert process.watchdog_signals_parent(sched_mod.Scheduler)
    # Its 5 s grace sleep and py-spy dump skipped: the stuck forward is the fault injected.
    monkeypatch.setattr(sched_mod, "time", types.SimpleNamespace(
        perf_counter=time.perf_counter, sleep=lambda s: None))
    monkeypatch.setattr(sched_mod, "pyspy_dump_schedulers", lambda: None)
    parent = subprocess.Popen([sys.executable, "-c", _QUIT_DFL + "import time; time.sleep(60)"])
    try:
        import psutil

        stuck = types.SimpleNamespace(
            cur_batch=object(), forward_ct=0, watchdog_timeout=0.2,
            parent_process=psutil.Process(parent.pid),
            server_args=types.SimpleNamespace(enable_single_process=True))
        with caplog.at_level(logging.ERROR):
            fixed = threading.Thread(target=sched_mod.Scheduler.watchdog_thread, args=(stuck,),
                                     daemon=True)
            fixed.start()
            deadline = time.monotonic() + 10
            while "stuck" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "forward stuck" in caplog.text and parent.poll() is None
        hooks.control(stuck).stop = True
        fixed.join(5)
        assert not fixed.is_alive() and parent.poll() is None
        ORIG["Scheduler.watchdog_thread"](stuck)  # returns once it has signalled
        assert parent.wait(10) == -signal.SIGQUIT
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


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


_DETOKENIZER_SCRIPT = _QUIT_DFL + textwrap.dedent("""
    import gc, threading, time
    from sgl_jax.srt.entrypoints import engine as engine_mod  # the release, unpatched
    from sgl_jax.srt.managers.detokenizer_manager import DetokenizerManager
    from sgl_jax.srt.server_args import PortArgs, ServerArgs
    args = ServerArgs(model_path="unused", skip_tokenizer_init=True,
                      enable_single_process=True, device="cpu")
    t = threading.Thread(target=engine_mod.run_detokenizer_thread,
                         args=(args, PortArgs.init_new(args)), daemon=True)
    t.start()
    t.join(2)
    print("DETOKENIZER WAITING" if t.is_alive() else "NO DETOKENIZER", flush=True)
    # An engine shutdown closes the zmq contexts it opened: the waiting receive then fails.
    mgr = next(o for o in gc.get_objects() if isinstance(o, DetokenizerManager))
    threading.Thread(target=mgr.recv_from_scheduler.context.term, daemon=True).start()
    time.sleep(5)
    print("ALIVE")
""")


def test_no_detokenizer_without_tokenizer(tmp_path):
    """With `skip_tokenizer_init` the original still starts a detokenizer thread, which
    waits on a socket nobody writes to and SIGQUITs the process when its context is closed;
    fixed, nothing is started."""
    import gc

    from sgl_jax.srt.entrypoints import engine as engine_mod
    from sgl_jax.srt.managers.detokenizer_manager import DetokenizerManager
    from sgl_jax.srt.server_args import PortArgs, ServerArgs

    assert process.detokenizer_started_without_need(engine_mod)
    r = subprocess.run([sys.executable, "-c", _DETOKENIZER_SCRIPT], capture_output=True,
                       text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path)))
    assert "DETOKENIZER WAITING" in r.stdout, r.stderr[-2000:]
    assert r.returncode == -signal.SIGQUIT, (r.returncode, r.stderr[-2000:])

    args = ServerArgs(model_path="unused", skip_tokenizer_init=True, enable_single_process=True,
                      device="cpu")
    threads = threading.active_count()
    assert engine_mod.run_detokenizer_thread(args, PortArgs.init_new(args)) is None
    assert threading.active_count() == threads
    assert not [o for o in gc.get_objects() if isinstance(o, DetokenizerManager)]
