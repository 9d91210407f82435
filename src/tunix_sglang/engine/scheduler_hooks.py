"""The engine's own runtime inside sglang-jax's scheduler thread (not fixes to the release).

`InProcessEngine` drives a scheduler that runs as a thread of this process. What it needs
from that thread, sglang-jax does not offer, so `install()` puts it into the scheduler's
module and class unconditionally (whatever the compat checks found), once per process, and
every engine start checks `missing()`: a release that moves these functions fails at start
instead of leaving every generate and sync waiting out its timeout:

* the scheduler thread is ours: `run_scheduler_loop_thread_after_create` /
  `scheduler_loop_after_create` are replaced. Creation errors raise to the engine, loop
  errors are stored on the scheduler's `SchedulerControl` (the engine raises them to its
  caller; the release SIGQUITs the whole process tree), and the loop ends on `stop`;
* `recv_requests` runs calls the engine queued (weight swap, cache flush, seeding: see
  `SchedulerControl.submit`) while the scheduler is idle, and schedules all requests of one
  engine call together (`gather_expected`);
* `run_batch` records, for the requests an engine registered, the sampled tokens' logprobs
  and the raw next-token logits rows (the sync proof's forced scoring). The release's own
  route, `return_logprob=True`, puts per-batch Python lists (prompt lengths) into the static
  part of the jitted programs' arguments and recompiles the forward and the sampler for every
  batch composition (measured ~0.5 s per step on the tiny model).

The logprobs and logits themselves are handed out of the jitted sampler by the compat fix
`sglang_jax.sampler_returns_logprobs` (the engine checks it is active). Also here: the
device choice for a new engine (`engine_devices`) and the sampler's RNG state
(`set_sampler_seed`, `place_replicated`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from tunix_sglang.engine.weight_map import path_names

logger = logging.getLogger(__name__)

EXPECT_WAIT_S = 60.0  # longest wait for the rest of one call's requests
_LOCK = threading.RLock()

# what each hook replaced or wraps: {"Scheduler.recv_requests": function, ...}
WRAPPED: dict[str, Any] = {}


class SchedulerControl:
    """Per-scheduler state of the runtime: wake-up pipe, queued calls, stop, error, captures."""

    def __init__(self):
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = False
        self.error: BaseException | None = None
        self.error_traceback: str = ""
        self.thread: threading.Thread | None = None
        # sampled-token logprobs captured for registered request ids (capture_logprobs_around)
        self.lock = threading.Lock()
        self.logprob_rids: set[str] = set()
        self.logprobs: dict[str, list[float]] = {}
        self.logprobs_failed: set[str] = set()
        # full next-token logits rows of registered requests (the sync proof), first batch
        self.logit_rids: set[str] = set()
        self.logits: dict[str, Any] = {}
        # generate requests an engine call is about to send: once one is in, the scheduler
        # waits for all of them (gather_expected), so a call is scheduled the same way every
        # time (seeded calls reproduce; multi-host lockstep stays in step).
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

    def want_logits(self, rids) -> None:
        with self.lock:
            self.logit_rids.update(rids)

    def take_logits(self, rid: str) -> Any:
        with self.lock:
            self.logit_rids.discard(rid)
            return self.logits.pop(rid, None)

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


def runs_engine_calls(s) -> bool:
    """Whether this scheduler runs queued engine calls: the single node's scheduler."""
    return s.nnodes == 1 and s.node_rank == 0


class SchedulerStopped(SystemExit):
    """Raised inside the scheduler thread to end its loop (SystemExit: not an error)."""


# ---------------------------------------------------------------------------------------
# Captures: sampled-token logprobs and next-token logits rows, per registered request
# ---------------------------------------------------------------------------------------

def capture_logprobs_around(run_batch_fn):
    """`Scheduler.run_batch` that also records the sampled tokens' logprobs per request, and
    the raw next-token logits rows of requests registered for them (the sync proof's
    forced scoring; nothing is kept for other batches)."""
    import numpy as np

    @functools.wraps(run_batch_fn)
    def run_batch(self, batch):
        ctl = control(self)
        runner = self.tp_worker.model_runner
        logit_rows = []
        if ctl.logit_rids:
            with ctl.lock:
                logit_rows = [(i, r.rid) for i, r in enumerate(batch.reqs or [])
                              if r.rid in ctl.logit_rids and r.rid not in ctl.logits]
        runner._tunix_sglang_keep_logits = bool(logit_rows)
        result = run_batch_fn(self, batch)
        if logit_rows:
            runner._tunix_sglang_keep_logits = False
            rows = getattr(runner, "_tunix_sglang_last_logits", None)
            runner._tunix_sglang_last_logits = None
            if rows is not None:
                idx = np.array([i for i, _ in logit_rows])
                if rows.is_fully_addressable:
                    host = np.asarray(rows[idx]).astype(np.float32)
                else:  # an engine mesh spanning processes: this process's replica
                    host = np.asarray(rows.addressable_shards[0].data)[idx].astype(np.float32)
                with ctl.lock:
                    for (_, rid), row in zip(logit_rows, host, strict=True):
                        ctl.logits[rid] = row
        if not ctl.logprob_rids:
            return result
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


# ---------------------------------------------------------------------------------------
# Receiving: queued engine calls, stop, one engine call = one scheduling decision
# ---------------------------------------------------------------------------------------

def gather_expected(sched, ctl: SchedulerControl, reqs: list, receive) -> list:
    """Keep receiving until all `ctl.expect` generate requests of one engine call are in.

    sglang-jax 0.0.2's tokenizer manager sends a batched generate one request at a time,
    awaiting between sends, while the scheduler takes whatever has arrived: a call of 8 may be
    prefilled as 4 + 4 or as 8 depending on thread timing, and with it the programs run and
    the random draws (seeded calls did not reproduce; in multi-host lockstep one process
    prefilled a call as 4 + 4, the other as 8, and they drifted apart). So once at least one
    of the call's requests has arrived (else the loop simply comes back), the rest are
    awaited, for at most EXPECT_WAIT_S; the engine resets `ctl.expect` when its call fails or
    ends. `receive(sched)` is one non-blocking receive.
    """
    if ctl.expect <= 0 or not reqs:
        return reqs
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


def receiving_engine_calls(inner: Callable) -> Callable:
    """`Scheduler.recv_requests` around `inner` (the installed one, possibly waiting when
    idle: compat `sglang_jax.idle_scheduler_waits`): stop, queued calls, whole engine calls.
    Further receives while gathering use the release's own non-blocking receive."""
    receive = inspect.unwrap(inner)

    @functools.wraps(inner)
    def recv_requests(self):
        ctl = control(self)
        if ctl.stop:
            raise SchedulerStopped()
        primary = runs_engine_calls(self)
        if primary and scheduler_is_idle(self):
            ctl.run_calls(self)
        reqs = inner(self)
        if ctl.stop:  # woken for it while waiting
            raise SchedulerStopped()
        if not primary:
            return reqs
        return gather_expected(self, ctl, reqs, receive)

    return recv_requests


# ---------------------------------------------------------------------------------------
# The scheduler thread
# ---------------------------------------------------------------------------------------

def scheduler_loop_after_create(server_args, scheduler) -> None:
    """The scheduler's event loop on this thread; its failure is stored, never signalled."""
    from sgl_jax.utils import get_exception_traceback

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


def run_scheduler_loop_thread_after_create(server_args, port_args) -> dict[str, Any]:
    """Create the scheduler (errors raise to the caller) and start its loop thread."""
    from sgl_jax.srt.managers import scheduler as scheduler_mod

    scheduler = scheduler_mod.Scheduler(server_args, port_args)
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


# ---------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------

def _hooks() -> list[tuple[Any, str, str, Callable[[Any], Any]]]:
    """(object, attribute, WRAPPED key, hook from what is there) of every function set."""
    from sgl_jax.srt.entrypoints import engine as engine_mod
    from sgl_jax.srt.managers import scheduler as scheduler_mod

    def thread(_):
        return run_scheduler_loop_thread_after_create

    return [
        (scheduler_mod.Scheduler, "recv_requests", "Scheduler.recv_requests",
         receiving_engine_calls),
        (scheduler_mod.Scheduler, "run_batch", "Scheduler.run_batch", capture_logprobs_around),
        (scheduler_mod, "scheduler_loop_after_create", "scheduler.scheduler_loop_after_create",
         lambda _: scheduler_loop_after_create),
        (scheduler_mod, "run_scheduler_loop_thread_after_create",
         "scheduler.run_scheduler_loop_thread_after_create", thread),
        (engine_mod, "run_scheduler_loop_thread_after_create",
         "engine.run_scheduler_loop_thread_after_create", thread),
    ]


_INSTALLED: dict[str, Any] = {}  # WRAPPED key -> the function the runtime set


def install() -> None:
    """Put the runtime into sglang-jax's scheduler, whatever the version; once per process."""
    with _LOCK:
        if _INSTALLED:
            return
        for obj, attr, key, hook in _hooks():
            WRAPPED[key] = getattr(obj, attr)
            _INSTALLED[key] = hook(WRAPPED[key])
            setattr(obj, attr, _INSTALLED[key])


def _reaches(fn: Any, target: Any) -> bool:
    """Whether `fn` is `target` or wraps it (a compat fix may wrap a hook: functools.wraps)."""
    while fn is not None:
        if fn is target:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def missing() -> list[str]:
    """The runtime's functions that are not (or no longer) where sglang-jax calls them."""
    return [key for obj, attr, key, _ in _hooks()
            if key not in _INSTALLED or not _reaches(getattr(obj, attr), _INSTALLED[key])]


# ---------------------------------------------------------------------------------------
# Devices of a new engine
# ---------------------------------------------------------------------------------------

class _DeviceChoice(threading.local):
    devices: Sequence[Any] | None = None
    skip_penalty_precompile: bool = False


DEVICE_CHOICE = _DeviceChoice()

# Set (for good) once this process starts an engine whose mesh spans processes (the compat
# fix `sglang_jax.sampler_sort_in_graph` then sorts inside the sampler's program).
SPANNING_ENGINE = threading.Event()


def mesh_spans_processes(devices: Sequence[Any] | None) -> bool:
    """True when an engine on `devices` (None: every device) spans several JAX processes."""
    import jax

    if devices is None:
        return jax.process_count() > 1
    return len({getattr(d, "process_index", 0) for d in devices}) > 1


@contextlib.contextmanager
def engine_devices(devices: Sequence[Any] | None, skip_penalty_precompile: bool = False):
    """Within this block, sglang-jax schedulers created by this thread use `devices`
    (and, if asked, do not precompile the penalty programs); compat fixes
    `sglang_jax.engine_device_subset` and `sglang_jax.penalty_precompile_optional`."""
    if mesh_spans_processes(devices):
        SPANNING_ENGINE.set()
    prev = (DEVICE_CHOICE.devices, DEVICE_CHOICE.skip_penalty_precompile)
    DEVICE_CHOICE.devices = list(devices) if devices is not None else None
    DEVICE_CHOICE.skip_penalty_precompile = skip_penalty_precompile
    try:
        yield
    finally:
        DEVICE_CHOICE.devices, DEVICE_CHOICE.skip_penalty_precompile = prev


# ---------------------------------------------------------------------------------------
# The sampler's state
# ---------------------------------------------------------------------------------------

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


def sampler_rng_leaves(runner) -> dict[str, list[int]]:
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

    idx = sampler_rng_leaves(runner)
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
