"""What sglang-jax does to the process it runs in: meant to own a process, it shares the
trainer's here (signals, logging, thread-pool joins at exit, a spinning idle loop, a
detokenizer thread nobody needs, a watchdog that signals the parent process)."""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
import threading
import time

from tunix_sglang.compat.base import ORIGINALS, module_file_source, source_of
from tunix_sglang.engine.scheduler_hooks import control, runs_engine_calls, scheduler_is_idle

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# threading._register_atexit: sgl_jax.srt.entrypoints.engine replaces it at import
# ---------------------------------------------------------------------------------------

_ENGINE_MOD = "sgl_jax.srt.entrypoints.engine"


def threading_atexit_restored_needed() -> bool:
    if _ENGINE_MOD in sys.modules:
        mod_src = source_of(sys.modules[_ENGINE_MOD])
    else:
        mod_src = module_file_source(_ENGINE_MOD)
    return "threading._register_atexit" in mod_src


def fix_threading_atexit_restored() -> bool:
    """Import the engine module without losing `threading._register_atexit`.

    engine.py does `threading._register_atexit = lambda *a, **k: None` at import, for the
    whole process: `concurrent.futures` thread pools (Orbax async checkpointing, data
    loaders) are then no longer joined at interpreter exit. We import it once and put the
    original back; the engine never relies on it (we never create threads at exit).
    """
    original = ORIGINALS.setdefault("threading._register_atexit", threading._register_atexit)
    importlib.import_module(_ENGINE_MOD)  # the import is the point
    if threading._register_atexit is original:
        return False
    ORIGINALS["threading._register_atexit.replacement"] = threading._register_atexit
    threading._register_atexit = original
    return True


# ---------------------------------------------------------------------------------------
# Idle scheduler: wait instead of spinning
# ---------------------------------------------------------------------------------------

IDLE_WAIT_S = 1.0  # longest wait before re-checking (new work wakes it at once)


def idle_loop_spins(scheduler_cls) -> bool:
    """True when the event loop polls its sockets without ever blocking or sleeping."""
    loop_src = (source_of(scheduler_cls.event_loop_normal)
                + source_of(inspect.unwrap(scheduler_cls.recv_requests)))
    return (
        "while True" in loop_src
        and "zmq.NOBLOCK" in loop_src
        and "sleep" not in loop_src
        and "poll(" not in loop_src.lower()
    )


def idle_scheduler_waits_needed() -> bool:
    from sgl_jax.srt.managers.scheduler import Scheduler

    return idle_loop_spins(Scheduler)


def fix_idle_scheduler_waits() -> bool:
    """Block the idle scheduler on its sockets instead of spinning.

    The 0.0.2 loop polls with NOBLOCK forever: in single-process mode it takes a core from
    the trainer (Tunix train() 2.3x slower). When the scheduler has nothing queued or
    running and nothing arrived, `recv_requests` now waits on a zmq poller (tokenizer
    socket, rpc socket and the engine's wake-up pipe, `SchedulerControl.wake`) for at most
    IDLE_WAIT_S, then receives again.
    """
    import zmq
    from sgl_jax.srt.managers.scheduler import Scheduler

    orig = Scheduler.recv_requests
    ORIGINALS["Scheduler.recv_requests"] = orig

    @functools.wraps(orig)
    def recv_requests(self):
        reqs = orig(self)
        if reqs or not (runs_engine_calls(self) and scheduler_is_idle(self)):
            return reqs
        ctl = control(self)
        poller = zmq.Poller()
        poller.register(self.recv_from_tokenizer, zmq.POLLIN)
        poller.register(self.recv_from_rpc, zmq.POLLIN)
        poller.register(ctl.rfd, zmq.POLLIN)
        poller.poll(int(IDLE_WAIT_S * 1000))
        ctl.drain()
        return orig(self)

    Scheduler.recv_requests = recv_requests
    return True


# ---------------------------------------------------------------------------------------
# The scheduler watchdog signals the parent process
# ---------------------------------------------------------------------------------------

def watchdog_signals_parent(scheduler_cls) -> bool:
    src = source_of(scheduler_cls.watchdog_thread)
    return "parent_process.send_signal" in src


def scheduler_watchdog_contained_needed() -> bool:
    from sgl_jax.srt.managers.scheduler import Scheduler

    return watchdog_signals_parent(Scheduler)


def fix_scheduler_watchdog_contained() -> bool:
    """In single-process mode the watchdog only logs a forward stuck > watchdog_timeout.

    0.0.2's watchdog then SIGQUITs `parent_process`: with the scheduler a thread of the
    trainer, that is the trainer's parent (the shell or the launcher). It ends with the
    engine (`stop`) or its scheduler's failure.
    """
    from sgl_jax.srt.managers.scheduler import Scheduler

    orig_watchdog = Scheduler.watchdog_thread
    ORIGINALS["Scheduler.watchdog_thread"] = orig_watchdog

    @functools.wraps(orig_watchdog)
    def watchdog_thread(self):
        if not self.server_args.enable_single_process:
            return orig_watchdog(self)
        ctl = control(self)
        last_ct, last_t, warned = 0, time.perf_counter(), False
        while not ctl.stop and ctl.error is None:
            now = time.perf_counter()
            if self.cur_batch is not None and last_ct == self.forward_ct:
                if not warned and now > last_t + self.watchdog_timeout:
                    logger.error("sglang-jax forward stuck > %ss", self.watchdog_timeout)
                    warned = True
            else:
                last_ct, last_t, warned = self.forward_ct, now, False
            time.sleep(min(5.0, max(self.watchdog_timeout / 2, 0.5)))

    Scheduler.watchdog_thread = watchdog_thread
    return True


# ---------------------------------------------------------------------------------------
# Process-wide signal handlers installed at engine start
# ---------------------------------------------------------------------------------------

def engine_installs_signal_handlers(engine_mod) -> bool:
    src = source_of(engine_mod._set_envs_and_config)
    return "signal.SIGCHLD" in src or "resource_tracker" in src


def keep_process_signal_handlers_needed() -> bool:
    from sgl_jax.srt.entrypoints import engine as engine_mod

    return engine_installs_signal_handlers(engine_mod)


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
    ORIGINALS["engine._set_envs_and_config"] = fn
    set_ulimit = getattr(engine_mod, "set_ulimit", None)

    @functools.wraps(fn)
    def _set_envs_and_config(server_args):
        if not server_args.enable_single_process:
            return fn(server_args)
        if set_ulimit is not None:
            set_ulimit()

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
    src = source_of(fn)
    return "basicConfig" in src and "force=True" in src


def logging_config_kept_needed() -> bool:
    from sgl_jax.srt.utils import common_utils

    return configure_logger_resets_root(common_utils.configure_logger)


def fix_logging_config_kept() -> bool:
    """Do not reset the host process's logging when the engine starts.

    `configure_logger` runs `logging.basicConfig(force=True, level=<engine log level>)` at
    engine start and again in the scheduler/detokenizer threads: it removes the trainer's
    root handlers (absl's included) and sets the root level to e.g. ERROR, so Tunix's
    "Train step N training loss" lines vanish. In single-process mode we only set the level
    of the `sgl_jax` logger and leave the root logger alone.
    """
    from sgl_jax.srt.utils import common_utils

    fn = common_utils.configure_logger
    ORIGINALS["common_utils.configure_logger"] = fn

    @functools.wraps(fn)
    def configure_logger(server_args, prefix: str = ""):
        if not getattr(server_args, "enable_single_process", False):
            return fn(server_args, prefix=prefix)
        level = getattr(logging, str(server_args.log_level).upper(), logging.ERROR)
        logging.getLogger("sgl_jax").setLevel(level)

    for modname in _LOGGER_USERS:
        mod = importlib.import_module(modname)
        if getattr(mod, "configure_logger", None) is fn:
            mod.configure_logger = configure_logger
    return True


# ---------------------------------------------------------------------------------------
# A detokenizer thread for an engine without a tokenizer
# ---------------------------------------------------------------------------------------

def detokenizer_started_without_need(engine_mod) -> bool:
    src = source_of(engine_mod._launch_threads)
    return "run_detokenizer_thread" in src and "skip_tokenizer_init" not in src


def no_detokenizer_without_tokenizer_needed() -> bool:
    from sgl_jax.srt.entrypoints import engine as engine_mod

    return detokenizer_started_without_need(engine_mod)


def fix_no_detokenizer_without_tokenizer() -> bool:
    """Do not start the detokenizer thread when the engine has no tokenizer.

    With `skip_tokenizer_init=True` the scheduler sends its outputs straight to the
    tokenizer manager; the detokenizer thread only blocks on a socket nobody writes to. It
    also makes a clean shutdown impossible: closing its zmq context makes its `recv` raise,
    and it answers any exception with SIGQUIT to the whole process.
    """
    from sgl_jax.srt.entrypoints import engine as engine_mod

    fn = engine_mod.run_detokenizer_thread
    ORIGINALS["engine.run_detokenizer_thread"] = fn

    @functools.wraps(fn)
    def run_detokenizer_thread(server_args, port_args):
        if server_args.skip_tokenizer_init and server_args.enable_single_process:
            return None
        return fn(server_args, port_args)

    engine_mod.run_detokenizer_thread = run_detokenizer_thread
    return True
