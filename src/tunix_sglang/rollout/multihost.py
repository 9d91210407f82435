"""The in-process sglang-jax rollout when the run spans several JAX processes (multi-host).

Every process runs the same command. With one engine whose JAX programs span every host's
devices, each host's scheduler would batch *its own* requests (different batches, different
EOS times) and the hosts would enter different collectives: a hang, or on TPU
`FAILED_PRECONDITION: The program continuator has halted unexpectedly`. Two correct designs:

* ``host_local`` (default): each process runs its own engine on its *local* devices only (no
  cross-host program inside the engine), generates a contiguous share of the global batch,
  and the padded tokens / logprobs / lengths are gathered with `process_allgather`, so every
  process returns the identical full `RolloutOutput`. Weight sync gathers the globally
  sharded trainer weights to host memory (`process_allgather(tiled=True)`) and writes them
  into the host-local engine; under Pathways (`JAX_PLATFORMS` contains `proxy` and
  `pathwaysutils` imports) its experimental reshard moves them device to device instead.
* ``lockstep``: one engine whose mesh spans every process's devices
  (`EngineSettings.global_devices`); process 0 broadcasts the prompt token ids and the
  sampling seed, every process submits the identical request list, and the compat fix
  `engine_call_one_batch` makes the scheduler take all requests of one engine call
  together (the tokenizer manager sends them one by one; without it a call of 8 was
  prefilled as 4 + 4 on one process and as 8 on the other, depending on thread timing,
  and the processes ran different programs: the measured drift). Every process then runs
  the same programs with the same shapes and the same random draws. Before every call the
  processes compare (allgather) digests of their requests and seed, after it the number
  of engine programs run and the completions; any difference is a DesyncError.
  sglang-jax's own multi-node mode (`nnodes`, `node_rank`, `dist_init_addr`) is not used:
  in 0.0.2 it calls `jax.distributed.initialize` itself (the trainer already did), and
  relays requests over zmq pub/sub with a 5 s receive timeout on every scheduler
  iteration.
  On CPU the compat fix `sampler_sort_in_graph` is needed too: 0.0.2's non-TPU sampler
  sorts in a host callback, which XLA runs on one device of the mesh; with the mesh
  spanning processes it blocked (process 0's callback waiting, the others in the
  collective), intermittently, in precompile or in the first sampled call.
  Status with 0.0.2 on CPU: lockstep stays in step with temperature-1 sampling and random
  EOS times (identical losses on every process). It is opt-in; host_local is the default
  (on CPU each lockstep engine program runs redundantly on every process's devices).

Failing safely: every cross-process step is preceded by a bounded barrier
(`cluster.step_barrier`). Waits of unknown length (engine start-up and precompile, lockstep
engine calls) are bounded by liveness instead: every process publishes its CPU seconds
(`cluster.start_heartbeat`), and the wait fails once no process has been busy for the
timeout (processes stuck in a collective burn no CPU; a slow compile does).
A desync raises `DesyncError` naming the missing process (or the stuck configuration) and
arms a hard-exit timer, so a process whose scheduler thread is stuck inside an XLA
collective still exits and `tunix-sglang launch` stops the others.

Selection: `engine_for(cfg, model_dir)` here; the mode comes from `cfg.multihost_mode` when
TrainConfig has it, else from the environment variable TUNIX_SGLANG_MULTIHOST_MODE
(`host_local` | `lockstep`; `naive_unsafe` is the broken configuration, for tests: a
global engine to which each process would submit its own, differently sized share; the
pre-call check refuses it on the first call, where running it aborts every process inside
gloo ("collective mismatch") on CPU or hangs on TPU).
TUNIX_SGLANG_MULTIHOST_TIMEOUT (seconds, default 30) bounds every wait for another process
(for the liveness-bounded waits: how long the whole cluster may be idle).
TUNIX_SGLANG_MULTIHOST_STATS=DIR makes every process append per-call rollout statistics
(per-host completion lengths, timings) to DIR/multihost_rollout.process{i}.jsonl; by default
they go to the run's output directory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tunix.rl.rollout import base_rollout

from tunix_sglang import cluster as cluster_lib
from tunix_sglang import engine as engine_lib
from tunix_sglang.engine import EngineError, EngineSettings, InProcessEngine, SyncReport
from tunix_sglang.errors import UserError
from tunix_sglang.rollout.sglang_inprocess import SglangJaxRollout, _seed_to_int

logger = logging.getLogger(__name__)

MODES = ("host_local", "lockstep")
NAIVE_MODE = "naive_unsafe"  # the broken configuration, kept only to prove it is detected
ENV_MODE = "TUNIX_SGLANG_MULTIHOST_MODE"
ENV_TIMEOUT = "TUNIX_SGLANG_MULTIHOST_TIMEOUT"
ENV_STATS = "TUNIX_SGLANG_MULTIHOST_STATS"
DEFAULT_TIMEOUT_S = 30.0
# Upper bound on any single wait, however busy the cluster (engine start, one call).
MAX_WAIT_S = 3600.0
# After a desync, how long the process may spend unwinding (checkpoint, shutdown) before it
# is ended: a thread stuck inside a collective never returns.
HARD_EXIT_GRACE_S = 20.0
HARD_EXIT_CODE = 70


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


def multihost_mode(cfg: Any = None) -> str:
    """`cfg.multihost_mode` if the config has it, else $TUNIX_SGLANG_MULTIHOST_MODE, else
    host_local."""
    mode = getattr(cfg, "multihost_mode", None) or os.environ.get(ENV_MODE) or "host_local"
    if mode not in (*MODES, NAIVE_MODE):
        raise UserError(f"multihost mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    return mode


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


def engine_for(cfg: Any, model_dir: Any) -> Any:
    """The `ClusterConfig.rollout_engine` value for `--rollout-engine sglang_jax` when
    `jax.process_count() > 1`."""
    return functools.partial(MultihostSglangRollout, model_dir=model_dir, train_config=cfg,
                             mode=multihost_mode(cfg), keep_model_copy=False)


# ---------------------------------------------------------------------------------------
# Pure helpers (unit-tested in one process)
# ---------------------------------------------------------------------------------------


def share_bounds(n: int, num_processes: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) share of n items per process; sizes differ by at most one."""
    return [(i * n // num_processes, (i + 1) * n // num_processes)
            for i in range(num_processes)]


def uneven_share_bounds(n: int, num_processes: int) -> list[tuple[int, int]]:
    """Contiguous shares of sizes proportional to 1, 2, ..., P (the naive configuration:
    hosts that schedule their own batches have different batch sizes, as on a real slice)."""
    total = num_processes * (num_processes + 1) // 2
    cut = [n * (i * (i + 1) // 2) // total for i in range(num_processes + 1)]
    return [(cut[i], cut[i + 1]) for i in range(num_processes)]


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
    n = max(1, (rollout_devices or total) // jax.process_count())
    return tuple(int(d.id) for d in local[: min(n, len(local))])


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
            raise cluster_lib.DesyncError(f"process {h} returned fewer samples than its share")
        per_host.append(lens)
        for r, n in enumerate(lens):
            tokens.append(np.asarray(tok[h, r, :n], np.int32))
            logprobs.append(np.asarray(lp[h, r, :n], np.float32))
    return tokens, logprobs, per_host


def _crc(seqs: Sequence[Sequence[int]]) -> int:
    """A digest of int sequences (order and boundaries included) that fits int32."""
    import zlib

    data = b"".join(np.asarray(t, np.int32).tobytes() + b"|" for t in seqs)
    return zlib.crc32(data) & 0x7FFFFFFF


def left_pad_prompts(ids: Sequence[Sequence[int]], max_len: int, pad: int) -> np.ndarray:
    left = np.full((len(ids), max_len), pad, dtype=np.int32)
    for i, t in enumerate(ids):
        if t:
            left[i, max_len - len(t):] = t
    return left


# ---------------------------------------------------------------------------------------
# Failing safely
# ---------------------------------------------------------------------------------------

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


def live_barrier(name: str, stall_s: float | None = None) -> None:
    """`cluster.live_barrier` (waits while any process is busy) that arms the hard exit."""
    try:
        cluster_lib.live_barrier(name, stall_s or wait_timeout_s(), MAX_WAIT_S)
    except cluster_lib.DesyncError as e:
        arm_hard_exit(str(e))
        raise


def bounded_barrier(name: str, timeout_s: float | None = None) -> None:
    """`cluster.step_barrier` that also arms the hard exit when it fails."""
    try:
        cluster_lib.step_barrier(name, timeout_s or wait_timeout_s())
    except cluster_lib.DesyncError as e:
        arm_hard_exit(str(e))
        raise


# ---------------------------------------------------------------------------------------
# Weights: globally sharded trainer params -> host-local engine
# ---------------------------------------------------------------------------------------


def pathways_reshard_fn(platforms: str | None = None) -> Callable[..., Any] | None:
    """pathwaysutils' experimental reshard when running on Pathways, else None.

    Mirrors Tunix 0.1.7's rl/reshard.py: Pathways is on when JAX_PLATFORMS contains `proxy`
    and `pathwaysutils.experimental.reshard` imports. Never required.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "") if platforms is None else platforms
    if "proxy" not in platforms:
        return None
    try:
        from pathwaysutils.experimental import reshard as experimental_reshard
    except ImportError:
        logger.info("JAX_PLATFORMS has proxy but pathwaysutils does not import: host gather")
        return None
    return functools.partial(experimental_reshard.reshard, donate=False, may_alias=None,
                             cache_resharding_plans=True)


def _flat_params(src: Any) -> dict[str, Any]:
    flat, _ = engine_lib.flatten_tunix_params(src)
    return flat


def params_for_engine(src: Any, engine_mesh: Any = None, platforms: str | None = None
                      ) -> tuple[dict[str, Any], str]:
    """Trainer params as something a host-local engine can take: ({name: array}, method).

    method "pathways": resharded device to device onto the engine mesh (replicated; the
    engine then lays each out itself). method "host_gather": numpy arrays gathered from
    every process (`process_allgather(tiled=True)`; fully addressable arrays are simply
    copied to host).
    """
    import jax
    from jax.experimental import multihost_utils

    flat = _flat_params(src)
    names = sorted(flat)
    reshard = pathways_reshard_fn(platforms)
    with jax.transfer_guard("allow"):  # Tunix disallows explicit transfers around syncs
        if reshard is not None and engine_mesh is not None:
            rep = jax.sharding.NamedSharding(engine_mesh, jax.sharding.PartitionSpec())
            moved = reshard([flat[n] for n in names], [rep] * len(names))
            return dict(zip(names, moved, strict=True)), "pathways"
        out = {}
        for n in names:
            x = flat[n]
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                out[n] = np.asarray(multihost_utils.process_allgather(x, tiled=True))
            else:
                out[n] = np.asarray(jax.device_get(x))
        return out, "host_gather"


class HostLocalEngine(InProcessEngine):
    """An engine on this process's devices whose sync accepts globally sharded params."""

    last_gather_seconds: float = 0.0
    last_transfer_method: str = ""

    def sync_from_tunix(self, src: Any) -> SyncReport:
        t0 = time.perf_counter()
        params, method = params_for_engine(src, self.mesh)
        self.last_gather_seconds = time.perf_counter() - t0
        self.last_transfer_method = method
        return super().sync_from_tunix(params)


class GlobalMeshEngine(InProcessEngine):
    """An engine whose mesh spans every process's devices (lockstep / naive).

    Only the settings differ (`global_devices=True`); the sampler's RNG state is placed on
    the multi-process mesh by the compat fix (`sglang_jax_fixes.place_replicated`).
    """

    def __init__(self, settings: EngineSettings):
        import dataclasses

        super().__init__(dataclasses.replace(settings, global_devices=True))


# ---------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------


class MultihostSglangRollout(SglangJaxRollout):
    """`SglangJaxRollout` for runs over several JAX processes; see the module docstring."""

    def __init__(
        self,
        rollout_actor: Any,
        tokenizer: Any,
        mesh: Any,
        rollout_config: base_rollout.RolloutConfig,
        *,
        mode: str = "host_local",
        engine_settings: EngineSettings | None = None,
        model_dir: Any = None,
        train_config: Any = None,
        keep_model_copy: bool = True,
        timeout_s: float | None = None,
        stats_dir: str | os.PathLike | None = None,
        **extra: Any,
    ):
        import dataclasses

        import jax

        from tunix_sglang.rollout.sglang_inprocess import _copy_params

        if mode not in (*MODES, NAIVE_MODE):
            raise UserError(f"multihost mode {mode!r} is unknown; use one of {MODES}")
        self.mode = mode
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rollout_config = rollout_config
        self.verify_on_update = False
        self.verify_threshold = 1e-4
        self.last_sync: SyncReport | None = None
        self.last_sync_diff: float | None = None
        self.last_stats: dict[str, Any] = {}
        self.timeout_s = float(timeout_s or wait_timeout_s())
        self._calls = 0
        self._last_temperature = float(getattr(rollout_config, "temperature", 1.0) or 0.0)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        settings = engine_settings or self._derive_settings(
            rollout_actor, mesh, rollout_config, model_dir, train_config, extra
        )
        if mode == "host_local":
            ids = host_local_device_ids(mesh, int(getattr(train_config, "rollout_devices", 0)
                                                  or 0))
            # Each engine runs only its share of the batch.
            share = max(1, -(-settings.batch_size // self.process_count))
            if engine_settings is not None:
                share = settings.batch_size
            settings = dataclasses.replace(settings, device_ids=ids, rollout_devices=None,
                                           batch_size=share)
            engine_cls: type[InProcessEngine] = HostLocalEngine
        else:
            settings = dataclasses.replace(settings, device_ids=None, rollout_devices=None,
                                           global_devices=True)
            engine_cls = GlobalMeshEngine
        self.settings = settings
        self._stats_path = self._stats_file(stats_dir, train_config)
        self._model = _copy_params(rollout_actor) if keep_model_copy else None
        # Start-up (load, precompile) takes minutes and differs between hosts; with a
        # global mesh the precompile programs are collectives. These waits fail once no
        # process has made progress for `timeout_s`, not after a fixed bound.
        live_barrier("multihost/engine_start", self.timeout_s)
        with cluster_lib.stall_guard("engine start (load and precompile)", arm_hard_exit,
                                     self.timeout_s):
            self.engine = engine_cls(settings).start()
        live_barrier("multihost/engine_ready", self.timeout_s)
        # The engine starts with dummy weights: give it the actor's right away.
        self.last_sync = self._engine_call(lambda: self.engine.sync_from_tunix(rollout_actor),
                                           "initial weight sync")
        self._check_sizes()

    def _stats_file(self, stats_dir, train_config) -> Path | None:
        d = stats_dir or os.environ.get(ENV_STATS)
        if d is None and train_config is not None and getattr(train_config, "output_dir", None):
            d = train_config.output_path
        if d is None:
            return None
        p = Path(d)
        p.mkdir(parents=True, exist_ok=True)
        return p / f"multihost_rollout.process{self.process_index}.jsonl"

    # -- guarded engine calls ---------------------------------------------------------------
    def _engine_call(self, fn: Callable[[], Any], what: str) -> Any:
        """Run an engine call; in the global-mesh modes, under a controller-side watchdog.

        A global-mesh engine blocked in a collective that another process never joins would
        block this thread forever: the call runs on a helper thread and is abandoned after
        the timeout with an error naming the configuration.
        """
        if self.mode == "host_local":
            return fn()
        box: dict[str, Any] = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller
                box["error"] = e

        t = threading.Thread(target=run, name="tunix-sglang-engine-call", daemon=True)
        t.start()
        watch, t0 = cluster_lib.StallWatch(), time.monotonic()
        while t.is_alive():
            t.join(0.5)
            idle, waited = watch.observe(), time.monotonic() - t0
            if t.is_alive() and (idle >= self.timeout_s or waited >= MAX_WAIT_S):
                why = (f"no process has made progress for {idle:.0f}s"
                       if idle >= self.timeout_s else f"still running after {waited:.0f}s")
                msg = (
                    f"process {self.process_index}: {what} is stuck ({why}) on the engine "
                    f"whose mesh spans all {self.process_count} processes (multihost mode "
                    f"{self.mode!r}); the processes are no longer running the same engine "
                    "programs (desync). Use multihost mode 'host_local', or 'lockstep' with "
                    "identical requests on every process."
                )
                arm_hard_exit(msg)
                raise cluster_lib.DesyncError(msg)
        if "error" in box:
            e = box["error"]
            if isinstance(e, (UserError, cluster_lib.DesyncError)):
                raise e
            msg = (f"process {self.process_index}: {what} failed on the engine whose mesh spans "
                   f"all {self.process_count} processes (multihost mode {self.mode!r}): "
                   f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            arm_hard_exit(msg)
            raise EngineError(msg) from e
        return box["value"]

    # -- generate ---------------------------------------------------------------------------
    def _sample(self, ids: list[list[int]], rc: base_rollout.RolloutConfig, seed: int | None,
                what: str) -> list[engine_lib.Sample]:
        if not ids:
            return []
        temperature = float(rc.temperature or 0.0)
        self._last_temperature = temperature
        return self._engine_call(lambda: self.engine.generate(
            ids,
            max_new_tokens=int(rc.max_tokens_to_generate),
            temperature=temperature,
            top_p=1.0 if rc.top_p is None else float(rc.top_p),
            top_k=rc.top_k,
            seed=seed,
            stop_token_ids=rc.eos_tokens,
        ), what)

    def _sample_counted(self, ids: list[list[int]], rc: base_rollout.RolloutConfig,
                        seed: int | None, what: str) -> tuple[list[engine_lib.Sample], int]:
        """`_sample` and the number of engine programs (forward passes) it ran."""
        sched = getattr(self.engine, "_scheduler", None)
        before = int(getattr(sched, "forward_ct", 0))
        samples = self._sample(ids, rc, seed, what)
        return samples, int(getattr(sched, "forward_ct", 0)) - before

    def generate(self, prompts: list[str], rollout_config: base_rollout.RolloutConfig,
                 **kwargs: Any) -> base_rollout.RolloutOutput:
        self._calls += 1
        call = self._calls
        max_len = int(rollout_config.max_prompt_length)
        width = int(rollout_config.max_tokens_to_generate)
        ids = self.encode_prompts(prompts, max_len)
        seed = _seed_to_int(rollout_config.seed)
        bounded_barrier(f"multihost/generate{call}", self.timeout_s)
        t0 = time.perf_counter()
        if self.mode == "lockstep":
            ids, seed = self._broadcast_inputs(ids, seed, max_len)
            self._check_same_inputs(call, ids, seed)
            samples, programs = self._sample_counted(ids, rollout_config, seed,
                                                     f"lockstep generate #{call}")
            t1 = time.perf_counter()
            tokens = [s.tokens for s in samples]
            logprobs = [s.logprobs for s in samples]
            self._check_same_outputs(call, tokens, programs)
            per_host = [[len(t) for t in tokens]]
            gen_sec = [t1 - t0]
        else:
            naive = self.mode == NAIVE_MODE
            # naive_unsafe: each host schedules its own (differently sized) share on the
            # global engine, with one seed everywhere: the reported broken configuration.
            bounds = (uneven_share_bounds if naive else share_bounds)(len(ids),
                                                                      self.process_count)
            lo, hi = bounds[self.process_index]
            local_seed = seed if naive else host_seed(seed, self.process_index)
            if naive:  # refused here: running it aborts (gloo) or hangs (TPU)
                self._check_same_inputs(call, ids[lo:hi], local_seed)
            samples, _ = self._sample_counted(ids[lo:hi], rollout_config, local_seed,
                                              f"{self.mode} generate #{call}")
            t1 = time.perf_counter()
            rows = max(h - lo_ for lo_, h in bounds)
            tok, lp, lengths = pad_samples([s.tokens for s in samples],
                                           [s.logprobs for s in samples], rows, width)
            # Hosts finish their shares at different times (EOS, load): wait for as long as
            # some host is still busy, then gather.
            live_barrier(f"multihost/gather{call}", self.timeout_s)
            g_tok, g_lp, g_len, g_sec = self._allgather(
                (tok, lp, lengths, np.array([t1 - t0], np.float64)))
            tokens, logprobs, per_host = unpad_samples(g_tok, g_lp, g_len, bounds)
            gen_sec = [float(x) for x in g_sec[:, 0]]
        texts = [self.tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in tokens]
        self.last_stats = {
            "call": call,
            "mode": self.mode,
            "process": self.process_index,
            "num_prompts": len(ids),
            "host_completion_lengths": per_host,
            "host_generate_sec": gen_sec,
            "rollout_sec": time.perf_counter() - t0,
            "weight_version": self.weight_version,
        }
        self._write_stats(self.last_stats)
        return base_rollout.RolloutOutput(
            text=texts,
            logits=None,
            tokens=tokens,
            left_padded_prompt_tokens=left_pad_prompts(ids, max_len, self.pad_id()),
            logprobs=logprobs,
        )

    def _check_same_inputs(self, call: int, ids: Sequence[Sequence[int]],
                           seed: int | None) -> None:
        """Before a call on the engine whose mesh spans every process: every process must
        submit the same requests with the same seed, or the processes would run different
        engine programs (measured on CPU: gloo aborts the process with "Received data size
        doesn't match expected size ... collective mismatch"; on TPU a hang)."""
        self._compare(call, "before", {"requests": _crc(ids), "request counts": len(ids),
                                       "seeds": -1 if seed is None else seed & 0x7FFFFFFF})

    def _check_same_outputs(self, call: int, tokens: Sequence[np.ndarray],
                            programs: int) -> None:
        """After the call: the same number of engine programs run, the same completions."""
        self._compare(call, "after", {"numbers of engine programs": programs,
                                      "completions": _crc(tokens)})

    def _compare(self, call: int, stage: str, fields: dict[str, int]) -> None:
        """Allgather `fields` (small ints); any process that differs from process 0 is a
        desync: DesyncError on every process (the next collective could hang or mix data)."""
        mine = np.array(list(fields.values()), np.int32)  # int32: JAX without x64
        bounded_barrier(f"multihost/{stage}{call}", self.timeout_s)
        (every,) = self._allgather((mine,))
        bad = {name: [h for h in range(len(every)) if every[h, j] != every[0, j]]
               for j, name in enumerate(fields)}
        bad = {k: v for k, v in bad.items() if v}
        if not bad:
            return
        procs = sorted({h for v in bad.values() for h in v})
        table = "; ".join(f"{k}: {every[:, j].tolist()}" for j, k in enumerate(fields)
                          if k in bad)
        msg = (f"process {self.process_index}: {self.mode} generate #{call}: process(es) "
               f"{procs} had different {', '.join(bad)} than process 0 {stage} the call on "
               f"the engine whose mesh spans all {self.process_count} processes (multihost "
               f"mode {self.mode!r}; per process: {table}): the engines are out of lockstep")
        arm_hard_exit(msg)
        raise cluster_lib.DesyncError(msg)

    def _allgather(self, arrays: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        import jax
        from jax.experimental import multihost_utils

        with jax.transfer_guard("allow"):
            return [np.asarray(a) for a in multihost_utils.process_allgather(arrays)]

    def _broadcast_inputs(self, ids: list[list[int]], seed: int | None, max_len: int
                          ) -> tuple[list[list[int]], int | None]:
        """Process 0's prompt ids and seed on every process (identical engine inputs)."""
        import jax
        from jax.experimental import multihost_utils

        arr = np.full((len(ids), max_len + 1), -1, np.int32)
        for i, t in enumerate(ids):
            arr[i, 0] = len(t)
            arr[i, 1: 1 + len(t)] = t
        meta = np.array([-1 if seed is None else seed], np.int64)
        with jax.transfer_guard("allow"):
            arr, meta = multihost_utils.broadcast_one_to_all((arr, meta))
        arr, meta = np.asarray(arr), np.asarray(meta)
        out = [[int(x) for x in row[1: 1 + int(row[0])]] for row in arr]
        return out, None if int(meta[0]) < 0 else int(meta[0])

    def _write_stats(self, row: dict[str, Any]) -> None:
        if self._stats_path is None:
            return
        with open(self._stats_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- weights ------------------------------------------------------------------------------
    def update_params(self, params: Any, filter_types: Any = None) -> None:
        bounded_barrier(f"multihost/sync{self.weight_version + 1}", self.timeout_s)
        if self.mode == "host_local":
            super().update_params(params, filter_types)
        else:
            self._engine_call(lambda: super(MultihostSglangRollout, self).update_params(
                params, filter_types), "weight sync")
        if isinstance(self.engine, HostLocalEngine):
            self.last_stats = {**self.last_stats,
                               "sync_gather_sec": self.engine.last_gather_seconds,
                               "sync_method": self.engine.last_transfer_method}

    def verify_sync(self, trainer_model: Any) -> float:
        """Max |Δ logprob| between the engines and `trainer_model` on the fixed probe.

        Every engine generates the greedy probe; the probes of all processes are gathered
        and scored by the trainer in one global program (identical inputs everywhere), so
        every process returns the same value: the max over all hosts' engines.
        """
        eng = self.engine
        prompt = eng.probe_prompt()
        n = min(4, self.settings.max_new_tokens)
        bounded_barrier(f"multihost/probe{self.weight_version}", self.timeout_s)
        (sample,) = self._engine_call(lambda: eng.generate(
            [prompt], max_new_tokens=n, temperature=0.0, seed=1234, ignore_eos=True),
            "sync probe")
        tok, lp, lengths = pad_samples([sample.tokens], [sample.logprobs], 1, n)
        g_tok, g_lp, _ = self._allgather((tok, lp, lengths))
        seqs = [list(prompt) + [int(t) for t in g_tok[h, 0]] for h in range(len(g_tok))]
        logits = global_logits(trainer_model, seqs)
        diffs = []
        for h in range(len(g_tok)):
            row = logits[h, len(prompt) - 1: len(prompt) - 1 + n].astype(np.float64)
            row = row - row.max(axis=-1, keepdims=True)
            ref = row - np.log(np.exp(row).sum(axis=-1, keepdims=True))
            ref = ref[np.arange(n), g_tok[h, 0]]
            diffs.append(float(np.max(np.abs(ref - g_lp[h, 0]))))
        diff = max(diffs)
        self.last_sync_diff = diff
        eng.last_probe = {"prompt": prompt, "host_tokens": g_tok[:, 0].tolist(),
                          "host_max_abs_diff": diffs, "max_abs_diff": diff,
                          "weight_version": self.weight_version}
        self.last_stats = {**self.last_stats, "probe_host_max_abs_diff": diffs}
        return diff

    def close(self) -> None:
        self.engine.shutdown()


def global_logits(model: Any, seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits of a Tunix model whose params may span processes (gathered to every host)."""
    return engine_lib.tunix_logits(model, seqs)
