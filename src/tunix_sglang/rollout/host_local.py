"""Multi-host `host_local` (the default): one engine per process, on its local devices only.

No engine program spans hosts, so hosts that finish their completions at different times can
never run different collectives. Each process generates a contiguous share of the global
batch (its own sampling seed: GRPO needs G different samples of a prompt, wherever they run),
and the padded tokens, logprobs and lengths are all-gathered, so every process returns the
identical full batch. A sync gathers the globally sharded trainer weights to host memory
(`process_allgather(tiled=True)`: `jax.device_put` cannot reach a host-local mesh from a
global array) and writes them into the local engine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunix_sglang import engine as engine_lib
from tunix_sglang import faults, topology
from tunix_sglang.engine import EngineError, EngineSettings, InProcessEngine, SyncReport, weight_map
from tunix_sglang.rollout.base import Samples, Sampling
from tunix_sglang.rollout.multiprocess import MultiProcessRollout, allgather, live_barrier


def share_bounds(n: int, num_processes: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) share of n items per process; sizes differ by at most one."""
    return [(i * n // num_processes, (i + 1) * n // num_processes)
            for i in range(num_processes)]


def host_seed(seed: int | None, process_index: int) -> int | None:
    """Distinct sampling streams per host: the same prompt repeated on two hosts must not
    get the same completions (GRPO needs G different samples)."""
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + 7919 * process_index) & 0x7FFFFFFF


def host_local_device_ids(mesh: Any, rollout_devices: int = 0) -> tuple[int, ...]:
    """This process's engine devices: the first N local devices, N = the rollout mesh's
    per-process share (--rollout-devices counts global devices)."""
    import jax

    local = jax.local_devices()
    total = int(np.asarray(mesh.devices).size) if mesh is not None else len(jax.devices())
    n = engine_lib.host_local_device_count(rollout_devices, total, jax.process_count(),
                                           len(local))
    return tuple(int(d.id) for d in local[:n])


def pad_samples(tokens: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], rows: int,
                width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-shape [rows, width] arrays (every process must gather the same shapes)."""
    tok = np.full((rows, width), -1, np.int32)
    lp = np.zeros((rows, width), np.float32)
    lengths = np.full((rows,), -1, np.int32)  # -1: a padding row
    for i, (t, p) in enumerate(zip(tokens, logprobs, strict=True)):
        if len(t) > width:
            raise EngineError(f"completion of {len(t)} tokens exceeds max_new_tokens {width}")
        tok[i, : len(t)] = t
        lp[i, : len(p)] = p
        lengths[i] = len(t)
    return tok, lp, lengths


def unpad_samples(tok: np.ndarray, lp: np.ndarray, lengths: np.ndarray,
                  bounds: Sequence[tuple[int, int]]) -> tuple[list, list, list[list[int]]]:
    """Gathered [P, rows, width] arrays -> the full batch in global order (+ lengths per host)."""
    tokens, logprobs, per_host = [], [], []
    for h, (lo, hi) in enumerate(bounds):
        lens = [int(x) for x in lengths[h, : hi - lo]]
        if any(n < 0 for n in lens):
            raise topology.DesyncError(f"process {h} returned fewer samples than its share")
        per_host.append(lens)
        for r, n in enumerate(lens):
            tokens.append(np.asarray(tok[h, r, :n], np.int32))
            logprobs.append(np.asarray(lp[h, r, :n], np.float32))
    return tokens, logprobs, per_host


def params_on_host(src: Any) -> dict[str, np.ndarray]:
    """Trainer params as numpy arrays by Tunix name, gathered from every process
    (`process_allgather(tiled=True)`; fully addressable arrays are simply copied to host)."""
    import jax
    from jax.experimental import multihost_utils

    flat, _ = weight_map.flatten_tunix_params(src)
    out = {}
    with jax.transfer_guard("allow"):  # Tunix disallows explicit transfers around syncs
        for n in sorted(flat):
            x = flat[n]
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                out[n] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
            else:
                out[n] = np.asarray(jax.device_get(x))
    return out


class HostLocalEngine(InProcessEngine):
    """An engine on this process's devices whose sync accepts globally sharded params."""

    def sync_from_tunix(self, src: Any, version: int | None = None) -> SyncReport:
        return super().sync_from_tunix(params_on_host(src), version)

    def skipped_by_faults(self, new: dict[str, Any], version: int) -> set[str]:
        import jax

        if faults.injected("host_skip", version) and (
                jax.process_index() == jax.process_count() - 1):
            return set(new)  # the last host keeps its old weights; the others write
        return super().skipped_by_faults(new, version)


class HostLocalRollout(MultiProcessRollout):
    """One engine per process on its local devices; each generates its share of the batch."""

    MODE, LABEL = "host_local", "host"
    engine_class = HostLocalEngine

    def _place(self, settings: EngineSettings, given: bool) -> EngineSettings:
        ids = host_local_device_ids(self.mesh, int(getattr(self.train_config,
                                                           "rollout_devices", 0) or 0))
        # Each engine runs only its share of the batch.
        share = settings.batch_size if given else engine_lib.host_local_share(
            settings.batch_size, self.process_count)
        return dataclasses.replace(settings, device_ids=ids, rollout_devices=None,
                                   batch_size=share)

    def _generate_across(self, call: int, ids: list[list[int]], sampling: Sampling,
                         seed: int | None) -> tuple[Samples, list[list[int]], list[float]]:
        t0 = time.perf_counter()
        bounds = share_bounds(len(ids), self.process_count)
        lo, hi = bounds[self.process_index]
        mine = self._generate_here(ids[lo:hi], sampling, host_seed(seed, self.process_index),
                                   f"host_local generate #{call}")
        t1 = time.perf_counter()
        rows = max(h - lo_ for lo_, h in bounds)
        tok, lp, lengths = pad_samples([s.tokens for s in mine], [s.logprobs for s in mine],
                                       rows, sampling.max_new_tokens)
        # Hosts finish their shares at different times (EOS, load): wait for as long as some
        # host is still busy, then gather.
        live_barrier(f"multihost/gather{call}", self.timeout_s)
        g_tok, g_lp, g_len, g_sec = allgather((tok, lp, lengths, np.array([t1 - t0],
                                                                            np.float64)))
        tokens, logprobs, per_host = unpad_samples(g_tok, g_lp, g_len, bounds)
        samples = Samples(ids, tokens, logprobs, [self.weight_version] * len(tokens))
        return samples, per_host, [float(x) for x in g_sec[:, 0]]
