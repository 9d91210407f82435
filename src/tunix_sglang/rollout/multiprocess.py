"""The in-process rollout when the run spans several JAX processes: what both designs share.

Every process runs the same command. With one engine whose JAX programs span every host's
devices, each host's scheduler would batch *its own* requests (different batches, different
EOS times) and the hosts would enter different collectives: a hang, or on TPU
`FAILED_PRECONDITION: The program continuator has halted unexpectedly`. Two correct designs,
one module each (`--multihost-mode`):

* `host_local` (default): each process runs its own engine on its local devices only and
  generates a share of the batch; the samples are gathered so every process trains on the
  identical global batch.
* `lockstep`: one engine whose mesh spans every process's devices; every process submits the
  identical request list (process 0's), checked before and after every call.

What they share, here: engine start-up and every sync behind barriers, the sync proof's
reports gathered to every process (a host whose engine kept its old weights is named), and
failing safely. Every cross-process step is preceded by a bounded barrier
(`topology.step_barrier`). Waits of unknown length (engine start-up and precompile, lockstep
engine calls) are bounded by liveness instead: every process publishes its CPU seconds
(`topology.start_heartbeat`), and the wait fails once no process has been busy for the
timeout (processes stuck in a collective burn no CPU; a slow compile does). A desync raises
`DesyncError` naming the missing process (or the stuck configuration) and arms a hard-exit
timer, so a process whose scheduler thread is stuck inside an XLA collective still exits and
`tunix-sglang launch` stops the others.

TUNIX_SGLANG_MULTIHOST_TIMEOUT (seconds, default 30) bounds every wait for another process
(for the liveness-bounded waits: how long the whole cluster may be idle). Every process
appends per-call statistics (per-host completion lengths, timings) to the run's output
directory (`run_files.rollout_stats_path`).
"""

from __future__ import annotations

import abc
import json
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from tunix_sglang import run_files, topology
from tunix_sglang.engine import EngineSettings, InProcessEngine
from tunix_sglang.errors import UserError
from tunix_sglang.probe import EngineReport
from tunix_sglang.probe.scoring import ProbeSequence
from tunix_sglang.rollout.base import Samples, Sampling
from tunix_sglang.rollout.inprocess import InProcessRollout

ENV_TIMEOUT = "TUNIX_SGLANG_MULTIHOST_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
# Upper bound on any single wait, however busy the cluster (engine start, one call).
MAX_WAIT_S = 3600.0
# After a desync, how long the process may spend unwinding (checkpoint, shutdown) before it
# is ended: a thread stuck inside a collective never returns.
HARD_EXIT_GRACE_S = 20.0
HARD_EXIT_CODE = 70


def wait_timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT) or ""
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds > 0; unset it or "
                        f"set e.g. {ENV_TIMEOUT}=30")
    return value


_hard_exit_armed = threading.Event()


def arm_hard_exit(message: str, grace_s: float = HARD_EXIT_GRACE_S) -> None:
    """End this process `grace_s` from now unless it has exited by itself.

    After a desync the engine's scheduler thread may be blocked inside a collective that
    never completes, and the trainer's own shutdown (checkpoint) is a collective too; a
    normal exit could then hang. The message is printed first so the cause is on record.
    """
    print(f"tunix-sglang multihost: {message}", file=sys.stderr, flush=True)
    if _hard_exit_armed.is_set():
        return
    _hard_exit_armed.set()

    def _exit():
        time.sleep(grace_s)
        print(f"tunix-sglang multihost: still running {grace_s:g}s after a desync; exiting",
              file=sys.stderr, flush=True)
        os._exit(HARD_EXIT_CODE)  # noqa: SLF001 (threads stuck in XLA never return)

    threading.Thread(target=_exit, name="tunix-sglang-hard-exit", daemon=True).start()


def desync(message: str) -> topology.DesyncError:
    """A DesyncError for `message`, with the hard exit armed (raise it)."""
    arm_hard_exit(message)
    return topology.DesyncError(message)


def live_barrier(name: str, stall_s: float) -> None:
    """`topology.live_barrier` (waits while any process is busy) that arms the hard exit."""
    try:
        topology.live_barrier(name, stall_s, MAX_WAIT_S)
    except topology.DesyncError as e:
        raise desync(str(e)) from None


def bounded_barrier(name: str, timeout_s: float) -> None:
    """`topology.step_barrier` that also arms the hard exit when it fails."""
    try:
        topology.step_barrier(name, timeout_s)
    except topology.DesyncError as e:
        raise desync(str(e)) from None


def allgather(arrays: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """Every process's `arrays`, stacked on a new leading axis (same shapes everywhere)."""
    import jax
    from jax.experimental import multihost_utils

    with jax.transfer_guard("allow"):
        return [np.asarray(a) for a in multihost_utils.process_allgather(arrays)]


class MultiProcessRollout(InProcessRollout):
    """An in-process rollout on every process of a JAX cluster; see the module docstring."""

    MODE = ""  # --multihost-mode
    LABEL = "process"  # how the proof names each process's engine

    def __init__(self, *args: Any, timeout_s: float | None = None, **kwargs: Any):
        import jax

        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.timeout_s = float(timeout_s or wait_timeout_s())
        self._calls = 0
        self._syncs = 0  # barrier names: versions may repeat (a re-sync at the same version)
        super().__init__(*args, **kwargs)
        out = getattr(self.train_config, "output_dir", None)
        self._stats_path = (run_files.rollout_stats_path(self.train_config.output_path,
                                                         self.process_index)
                            if out else None)

    @abc.abstractmethod
    def _generate_across(self, call: int, ids: list[list[int]], sampling: Sampling,
                         seed: int | None) -> tuple[Samples, list[list[int]], list[float]]:
        """The global batch on every process: (samples, completion lengths per host, engine
        seconds per host)."""

    def _start(self, settings: EngineSettings) -> InProcessEngine:
        # Start-up (load, precompile) takes minutes and differs between hosts; with a global
        # mesh the precompile programs are collectives. These waits fail once no process has
        # made progress for `timeout_s`, not after a fixed bound.
        live_barrier("multihost/engine_start", self.timeout_s)
        with topology.stall_guard("engine start (load and precompile)", arm_hard_exit,
                                  self.timeout_s):
            engine = super()._start(settings)
        live_barrier("multihost/engine_ready", self.timeout_s)
        return engine

    def generate_ids(self, ids: list[list[int]], sampling: Sampling, seed: int | None
                     ) -> Samples:
        self._calls += 1
        call = self._calls
        bounded_barrier(f"multihost/generate{call}", self.timeout_s)
        t0 = time.perf_counter()
        samples, per_host, gen_sec = self._generate_across(call, ids, sampling, seed)
        if self._stats_path is not None:
            row = {"call": call, "mode": self.MODE, "process": self.process_index,
                   "num_prompts": len(samples.prompts), "host_completion_lengths": per_host,
                   "host_generate_sec": gen_sec, "rollout_sec": time.perf_counter() - t0,
                   "weight_version": self.weight_version}
            with open(self._stats_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return samples

    def _sync(self, params: Any, version: int | None) -> None:
        self._syncs += 1
        bounded_barrier(f"multihost/sync{self._syncs}", self.timeout_s)
        super()._sync(params, version)

    def sync_evidence(self, seq: ProbeSequence) -> list[EngineReport]:
        """Every process's engine report, gathered to every process (tunix_sglang.probe):
        each host's own engine, or each process's view of the one engine spanning them (its
        own replicas: a process that did not write shows up by name)."""
        self._syncs += 1
        bounded_barrier(f"multihost/probe{self._syncs}", self.timeout_s)
        (mine,) = super().sync_evidence(seq)
        names = sorted(mine.params)
        fps = np.array([[mine.params[n][0] & 0xFFFFFFFF, mine.params[n][0] >> 32]
                        for n in names], np.uint32)
        g_fp, g_logits, g_version = allgather(
            (fps, np.asarray(mine.logits, np.float32), np.array([mine.version], np.int32)))
        return [EngineReport(
            where=f"{self.LABEL} {h}", version=int(g_version[h, 0]),
            params={n: (int(g_fp[h, i, 1]) << 32 | int(g_fp[h, i, 0]), *mine.params[n][1:])
                    for i, n in enumerate(names)},
            logits=g_logits[h]) for h in range(len(g_version))]
