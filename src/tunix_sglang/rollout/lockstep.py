"""Multi-host `lockstep` (opt-in): one engine whose mesh spans every process's devices.

Process 0 broadcasts the prompt token ids and the sampling seed, every process submits the
identical request list, and the compat fix `engine_call_one_batch` makes the scheduler take
all requests of one engine call together (the tokenizer manager sends them one by one;
without it a call of 8 was prefilled as 4 + 4 on one process and as 8 on the other,
depending on thread timing, and the processes ran different programs: the measured drift).
Every process then runs the same programs with the same shapes and the same random draws.
Before every call the processes compare (allgather) digests of their requests and seed,
after it the number of engine programs run and the completions; any difference is a
DesyncError. Every engine call runs under a watchdog: one blocked in a collective that another
process never joins is abandoned once the cluster has been idle for the timeout.

sglang-jax's own multi-node mode (`nnodes`, `node_rank`, `dist_init_addr`) is not used: in
0.0.2 it calls `jax.distributed.initialize` itself (the trainer already did), and relays
requests over zmq pub/sub with a 5 s receive timeout on every scheduler iteration. On CPU the
compat fix `sampler_sort_in_graph` is needed too: 0.0.2's non-TPU sampler sorts in a host
callback, which XLA runs on one device of the mesh; with the mesh spanning processes it
blocked (process 0's callback waiting, the others in the collective), intermittently, in
precompile or in the first sampled call. Status with 0.0.2 on CPU: lockstep stays in step with
temperature-1 sampling and random EOS times (identical losses on every process); each engine
program runs redundantly on every process's devices, so host_local stays the default.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tunix_sglang import topology
from tunix_sglang.engine import EngineError, EngineSettings
from tunix_sglang.errors import UserError
from tunix_sglang.rollout.base import Samples, Sampling
from tunix_sglang.rollout.multiprocess import (
    MAX_WAIT_S,
    MultiProcessRollout,
    allgather,
    arm_hard_exit,
    bounded_barrier,
    desync,
)


def digest(seqs: Sequence[Sequence[int]]) -> int:
    """A digest of int sequences (order and boundaries included) that fits int32."""
    data = b"".join(np.asarray(t, np.int32).tobytes() + b"|" for t in seqs)
    return zlib.crc32(data) & 0x7FFFFFFF


class LockstepRollout(MultiProcessRollout):
    """One engine over every process's devices, identical requests on every process."""

    MODE = "lockstep"

    def _place(self, settings: EngineSettings, given: bool) -> EngineSettings:
        # The sampler's RNG state is placed on the multi-process mesh by the compat fix
        # (`place_replicated`).
        return dataclasses.replace(settings, device_ids=None, rollout_devices=None,
                                   global_devices=True)

    def _engine_call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run an engine call under a controller-side watchdog: an engine blocked in a
        collective that another process never joins would block this thread forever, so the
        call runs on a helper thread and is abandoned after the timeout with an error naming
        the configuration."""
        box: dict[str, Any] = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller
                box["error"] = e

        t = threading.Thread(target=run, name="tunix-sglang-engine-call", daemon=True)
        t.start()
        watch, t0 = topology.StallWatch(), time.monotonic()
        while t.is_alive():
            t.join(0.5)
            idle, waited = watch.observe(), time.monotonic() - t0
            if t.is_alive() and (idle >= self.timeout_s or waited >= MAX_WAIT_S):
                why = (f"no process has made progress for {idle:.0f}s"
                       if idle >= self.timeout_s else f"still running after {waited:.0f}s")
                raise desync(
                    f"process {self.process_index}: {what} is stuck ({why}) on the engine "
                    f"whose mesh spans all {self.process_count} processes (multihost mode "
                    f"{self.MODE!r}); the processes are no longer running the same engine "
                    "programs (desync). Use multihost mode 'host_local', or 'lockstep' with "
                    "identical requests on every process.")
        if "error" in box:
            e = box["error"]
            if isinstance(e, (UserError, topology.DesyncError)):
                raise e
            detail = str(e).splitlines()[0][:300] if str(e) else ""
            msg = (f"process {self.process_index}: {what} failed on the engine whose mesh spans "
                   f"all {self.process_count} processes (multihost mode {self.MODE!r}): "
                   f"{type(e).__name__}: {detail}")
            arm_hard_exit(msg)
            raise EngineError(msg) from e
        return box["value"]

    def _generate_across(self, call: int, ids: list[list[int]], sampling: Sampling,
                         seed: int | None) -> tuple[Samples, list[list[int]], list[float]]:
        t0 = time.perf_counter()
        ids, seed = self._agree_inputs(ids, seed)
        self._compare(call, "before", {"requests": digest(ids), "request counts": len(ids),
                                       "seeds": -1 if seed is None else seed & 0x7FFFFFFF})
        sched = self.engine._scheduler  # noqa: SLF001 (its count of engine programs run)
        before = int(sched.forward_ct)
        got = self._generate_here(ids, sampling, seed, f"lockstep generate #{call}")
        programs = int(sched.forward_ct) - before
        t1 = time.perf_counter()
        tokens = [s.tokens for s in got]
        self._compare(call, "after", {"numbers of engine programs": programs,
                                      "completions": digest(tokens)})
        samples = Samples(ids, tokens, [s.logprobs for s in got],
                          [self.weight_version] * len(got))
        return samples, [[len(t) for t in tokens]], [t1 - t0]

    def _agree_inputs(self, ids: list[list[int]], seed: int | None
                      ) -> tuple[list[list[int]], int | None]:
        """Process 0's prompt ids and seed on every process (identical engine inputs)."""
        import jax
        from jax.experimental import multihost_utils

        width = 1 + int(self.rollout_config.max_prompt_length)
        arr = np.full((len(ids), width), -1, np.int32)
        for i, t in enumerate(ids):
            arr[i, 0] = len(t)
            arr[i, 1: 1 + len(t)] = t
        meta = np.array([-1 if seed is None else seed], np.int64)
        with jax.transfer_guard("allow"):
            arr, meta = multihost_utils.broadcast_one_to_all((arr, meta))
        arr, meta = np.asarray(arr), np.asarray(meta)
        out = [[int(x) for x in row[1: 1 + int(row[0])]] for row in arr]
        return out, None if int(meta[0]) < 0 else int(meta[0])

    def _compare(self, call: int, stage: str, fields: dict[str, int]) -> None:
        """Allgather `fields` (small ints); any process that differs from process 0 is a
        desync: DesyncError on every process (the next collective could hang or mix data).
        Before the call, different requests or seeds would make the processes run different
        engine programs (measured on CPU: gloo aborts the process with "Received data size
        doesn't match expected size ... collective mismatch"; on TPU a hang); after it, the
        same number of programs must have run, with the same completions."""
        mine = np.array(list(fields.values()), np.int32)  # int32: JAX without x64
        bounded_barrier(f"multihost/{stage}{call}", self.timeout_s)
        (every,) = allgather((mine,))
        bad = {name: [h for h in range(len(every)) if every[h, j] != every[0, j]]
               for j, name in enumerate(fields)}
        bad = {k: v for k, v in bad.items() if v}
        if not bad:
            return
        procs = sorted({h for v in bad.values() for h in v})
        table = "; ".join(f"{k}: {every[:, j].tolist()}" for j, k in enumerate(fields)
                          if k in bad)
        raise desync(
            f"process {self.process_index}: lockstep generate #{call}: process(es) {procs} "
            f"had different {', '.join(bad)} than process 0 {stage} the call on the engine "
            f"whose mesh spans all {self.process_count} processes (multihost mode "
            f"{self.MODE!r}; per process: {table}): the engines are out of lockstep")
