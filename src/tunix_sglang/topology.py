"""Process topology: one process, or several processes as one `jax.distributed` cluster.

How this process joins the cluster (`initialize`: from `launch`'s flags or environment, or
by JAX's own detection on a multi-worker TPU slice; never under Pathways, whose one controller
drives every device), the bounded step barriers that turn a desync into an error, and the
liveness (CPU heartbeat) that bounds waits of unknown length.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from tunix_sglang.errors import UserError

# Set by `tunix-sglang launch` for each process it starts (and usable by hand).
ENV_COORDINATOR = "TUNIX_SGLANG_COORDINATOR"
ENV_NUM_PROCESSES = "TUNIX_SGLANG_NUM_PROCESSES"
ENV_PROCESS_ID = "TUNIX_SGLANG_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Topology:
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    @classmethod
    def from_env(cls, coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> Topology:
        """Flags win over the launcher's environment variables."""
        coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
        n = num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES)
        pid = process_id if process_id is not None else os.environ.get(ENV_PROCESS_ID)
        if coordinator is None and n is None and pid is None:
            return cls()
        if coordinator is None or n is None or pid is None:
            raise UserError(
                "--coordinator-address, --num-processes and --process-id go together; "
                "pass all three (or none, for one process or TPU auto-detection)"
            )
        n, pid = int(n), int(pid)
        if not 0 <= pid < n:
            raise UserError(f"--process-id {pid} must be in [0, {n})")
        return cls(coordinator, n, pid)


def tpu_present() -> bool:
    """TPU VMs expose /dev/accel* (v2-v4) or /dev/vfio/N (v5+)."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def default_platform() -> None:
    """Without a TPU, pin JAX to CPU: libtpu's probe otherwise prints a screen of errors."""
    if "JAX_PLATFORMS" not in os.environ and not tpu_present():
        os.environ["JAX_PLATFORMS"] = "cpu"


def tpu_slice_workers(env: Mapping[str, str] | None = None, tpu: bool | None = None) -> int:
    """Workers of the TPU slice this host belongs to, when JAX must join them itself: a TPU
    VM whose TPU_WORKER_HOSTNAMES lists several hosts, not under Pathways (one controller).
    0 otherwise."""
    env = dict(os.environ) if env is None else env
    if "proxy" in env.get("JAX_PLATFORMS", "") or not (tpu_present() if tpu is None else tpu):
        return 0
    n = len(tpu_worker_hosts(env))
    return n if n > 1 else 0


def tpu_worker_hosts(env: Mapping[str, str]) -> list[str]:
    """The slice's workers as the TPU VM lists them (TPU_WORKER_HOSTNAMES)."""
    return [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]


def initialize(topo: Topology) -> None:
    """Join the JAX cluster if this run spans several processes (before any JAX computation):
    from the explicit topology (`launch`, flags), or on a multi-worker TPU slice by JAX's own
    detection of coordinator, process count and id."""
    if not topo.distributed:
        if tpu_slice_workers() and _client() is None:
            import jax

            jax.distributed.initialize()
            start_heartbeat()
        return
    import jax

    # Bind the coordinator to the address given (loopback in tests), not all interfaces.
    jax.distributed.initialize(
        coordinator_address=topo.coordinator_address,
        num_processes=topo.num_processes,
        process_id=topo.process_id,
        coordinator_bind_address=topo.coordinator_address if topo.process_id == 0 else None,
        initialization_timeout=120,
    )
    start_heartbeat()


class DesyncError(RuntimeError):
    """Processes of one JAX cluster stopped running the same steps."""


BARRIER_TIMEOUT_S = 30.0


def step_barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Every process must reach `name` within `timeout_s`, or all fail naming the missing ones.

    Processes that run different global programs hang silently inside XLA collectives; a
    bounded barrier before each step turns that into an error within the timeout.
    """
    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None or jax.process_count() == 1:
        return
    me = jax.process_index()
    client.key_value_set(f"tunix_sglang/arrived/{name}/{me}", "1")
    try:
        client.wait_at_barrier(f"tunix_sglang/{name}", int(timeout_s * 1000))
    except Exception as e:  # XlaRuntimeError: DEADLINE_EXCEEDED and friends
        try:
            arrived = {int(k.rsplit("/", 1)[-1])
                       for k, _ in client.key_value_dir_get(f"tunix_sglang/arrived/{name}/")}
        except Exception:  # the coordinator itself may be gone
            arrived = {me}
        missing = sorted(set(range(jax.process_count())) - arrived)
        raise DesyncError(
            f"process {me}: barrier {name!r} timed out after {timeout_s:g}s; "
            f"missing process(es) {missing or 'unknown'} ({str(e).splitlines()[0][:200]})"
        ) from None


# ---------------------------------------------------------------------------------------
# Liveness: tell "another process is slow" from "the cluster is stuck"
# ---------------------------------------------------------------------------------------
# A process that compiles or computes burns CPU; processes blocked in a collective that
# never completes (or waiting for a dead peer) burn almost none (measured: two processes
# deadlocked in an engine program, load average 0.13). Every process publishes its CPU
# seconds to the coordinator's key-value store; a long wait fails once *no* process has
# been busy for `stall_s` seconds, however long the legitimate work before it took.

HEARTBEAT_S = 2.0
# Busy: more than this fraction of one core since the previous heartbeat.
BUSY_CPU_FRACTION = 0.1
_HEARTBEAT_KEY = "tunix_sglang/heartbeat/"
_heartbeat_started = threading.Event()


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def start_heartbeat(interval_s: float = HEARTBEAT_S) -> bool:
    """Publish this process's CPU seconds every `interval_s` (once per process; daemon)."""
    import jax

    client = _client()
    if client is None or jax.process_count() == 1 or _heartbeat_started.is_set():
        return False
    _heartbeat_started.set()
    key = f"{_HEARTBEAT_KEY}{jax.process_index()}"
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            try:
                client.key_value_set(key, f"{time.process_time():.3f}", allow_overwrite=True)
            except Exception:  # the coordinator is gone: nothing left to report to
                return
            stop.wait(interval_s)

    t = threading.Thread(target=beat, name="tunix-sglang-heartbeat", daemon=True)
    t.start()

    def stop_beating():  # registered after jax's shutdown, so it runs before it
        stop.set()
        t.join(timeout=5)

    atexit.register(stop_beating)
    return True


def cluster_cpu_seconds() -> dict[int, float]:
    """{process: CPU seconds it last published} (empty on one process)."""
    client = _client()
    if client is None:
        return {}
    out = {}
    for k, v in client.key_value_dir_get(_HEARTBEAT_KEY):
        with contextlib.suppress(ValueError):
            out[int(k.rsplit("/", 1)[-1])] = float(v)
    return out


class StallWatch:
    """How long the whole cluster has made no progress (no process busy).

    `observe()` samples the published CPU seconds; a process is busy between two samples
    when its CPU time grew by more than `busy_fraction` of the wall time between them.
    """

    def __init__(self, read: Callable[[], dict[int, float]] = cluster_cpu_seconds,
                 clock: Callable[[], float] = time.monotonic,
                 busy_fraction: float = BUSY_CPU_FRACTION):
        self._read, self._clock, self._busy_fraction = read, clock, busy_fraction
        self._last_busy = self._sample_t = clock()
        self._sample = read()
        self.busy_processes: set[int] = set()

    def observe(self) -> float:
        """Seconds since some process was last seen busy."""
        now = self._clock()
        if now - self._sample_t >= HEARTBEAT_S:
            cur = self._read()
            dt = now - self._sample_t
            self.busy_processes = {p for p, cpu in cur.items()
                                   if cpu - self._sample.get(p, cpu) > self._busy_fraction * dt}
            if self.busy_processes:
                self._last_busy = now
            self._sample, self._sample_t = cur, now
        return now - self._last_busy


def live_barrier(name: str, stall_s: float = BARRIER_TIMEOUT_S,
                 max_s: float = 3600.0, poll_s: float = 0.5) -> None:
    """A barrier for waits of unknown length (engine start-up, precompile): it waits as
    long as some process is busy, and fails naming the missing processes once the whole
    cluster has been idle for `stall_s` (stuck or dead), or after `max_s` in any case."""
    import jax

    client = _client()
    if client is None or jax.process_count() == 1:
        return
    me, n = jax.process_index(), jax.process_count()
    prefix = f"tunix_sglang/live/{name}/"
    client.key_value_set(f"{prefix}{me}", "1")
    watch, t0 = StallWatch(), time.monotonic()
    missing = [p for p in range(n) if p != me]
    while True:
        with contextlib.suppress(Exception):  # DEADLINE_EXCEEDED: not there yet
            # Returns as soon as the first missing process arrives.
            client.blocking_key_value_get(f"{prefix}{missing[0]}", int(poll_s * 1000))
        arrived = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(prefix)}
        missing = sorted(set(range(n)) - arrived)
        if not missing:
            return
        idle = watch.observe()
        waited = time.monotonic() - t0
        if idle >= stall_s or waited >= max_s:
            why = (f"no process has made progress for {idle:.0f}s (stuck in a collective, "
                   "or dead)" if idle >= stall_s else f"still not there after {max_s:g}s")
            raise DesyncError(f"process {me}: barrier {name!r}: process(es) {missing} "
                              f"missing; {why}")


@contextlib.contextmanager
def stall_guard(what: str, on_stall: Callable[[str], None], stall_s: float = BARRIER_TIMEOUT_S,
                poll_s: float = 1.0) -> Iterator[None]:
    """Run the body (which may block inside XLA, where nothing can interrupt it) while a
    monitor thread calls `on_stall(message)` once the whole cluster has been idle for
    `stall_s`. `on_stall` must end the process (a thread stuck in a collective never
    returns)."""
    import jax

    if _client() is None or jax.process_count() == 1:
        yield
        return
    done = threading.Event()

    def monitor():
        watch = StallWatch()
        while not done.wait(poll_s):
            idle = watch.observe()
            if idle >= stall_s:
                on_stall(f"process {jax.process_index()}: {what}: no process has made "
                         f"progress for {idle:.0f}s (the processes are stuck in collectives "
                         "that never complete: a desync, or a dead process)")
                return

    t = threading.Thread(target=monitor, name="tunix-sglang-stall-guard", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
