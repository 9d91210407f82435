"""In-process sglang-jax rollout engine with proven in-memory weight sync from Tunix.

One `InProcessEngine` wraps a sglang-jax `Engine` running in this process
(`enable_single_process=True`: scheduler and detokenizer are threads, no child process),
built from `EngineSettings` (settings.py) with the engine's runtime in its scheduler thread
(scheduler_hooks.py):

* `generate()` sends token ids and gets token ids back (the engine's tokenizer is off) with
  the logprob of every sampled token, on one long-lived asyncio loop thread (loop_thread.py).
* `sync_from_tunix()` maps Tunix parameter names/layouts onto the engine's (`weight_map`),
  reshards them onto the engine's devices, swaps them into what the jitted forward reads
  (compat fix `sglang_jax.forward_reads_weights`), flushes the KV/radix caches and sets
  `weight_version` (the trainer's optimizer steps, carried by the sync). Every engine
  parameter must be written or it raises.
* `evidence()` is the engine's side of the sync proof (`tunix_sglang.probe`): fingerprints of
  the buffers its forward reads and the logits it computes for the probe's prefixes.

Logprobs are those of the distribution each token was sampled from, before top-k/top-p
truncation: `log_softmax(logits / temperature)`, and `log_softmax(logits)` for greedy
(temperature 0). This is what Tunix's `compute_per_token_logps(temperature=T)` computes.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunix_sglang import compat, faults
from tunix_sglang.engine import scheduler_hooks, weight_map
from tunix_sglang.engine.loop_thread import LoopThread
from tunix_sglang.engine.results import EngineError, Sample, SyncReport
from tunix_sglang.engine.settings import EngineSettings, select_devices
from tunix_sglang.errors import UserError

logger = logging.getLogger(__name__)

# Compat fixes the engine cannot work without (their checks could find a future release
# changed): what each makes possible.
REQUIRED_FIXES = {
    "sglang_jax.forward_reads_weights": "a weight sync that changes what the engine computes",
    "sglang_jax.sampler_returns_logprobs": "the sampled tokens' logprobs",
}


@dataclasses.dataclass(frozen=True)
class _EngineParam:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: Any
    sharding: Any


# ---------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------


class InProcessEngine:
    """A sglang-jax Engine in this process, synced in memory from a Tunix model."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.weight_version = 0
        self.last_sync: SyncReport | None = None
        self.start_seconds: float | None = None
        self._move_cache: dict = {}  # compiled transform+placement programs, by source layout
        self.devices: list = []
        self._lock = threading.RLock()
        self._engine = None
        self._loop: LoopThread | None = None
        self._scheduler = None
        self._runner = None
        self._ctl = None
        self._params: dict[str, _EngineParam] = {}
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._engine is not None and not self._closed

    def start(self) -> InProcessEngine:
        with self._lock:
            if self.started:
                return self
            if self._closed:
                raise EngineError("engine was shut down; create a new one")
            self._start()
            return self

    def _start(self) -> None:
        compat.apply_all()
        scheduler_hooks.install()
        _check_runtime()
        from sgl_jax.srt.entrypoints.engine import Engine
        from sgl_jax.srt.server_args import ServerArgs

        t0 = time.perf_counter()
        kwargs, dropped = self.settings.server_args_kwargs(ServerArgs)
        if dropped:
            logger.info("sglang-jax ServerArgs has no %s; not passed", dropped)
        if kwargs.get("device") == "cpu" and os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
            # ServerArgs asserts device == JAX_PLATFORMS when the variable is set.
            kwargs["device"] = os.environ["JAX_PLATFORMS"]
        self.devices = select_devices(self.settings)
        self._loop = LoopThread()
        try:
            with scheduler_hooks.engine_devices(self.devices, skip_penalty_precompile=True):
                engine = Engine(server_args=ServerArgs(**kwargs))
        except BaseException:
            self._stop_loop()
            raise
        # Engine.shutdown kills *every* child process of this process (the trainer's
        # too) and is registered at exit: we never call it.
        atexit.unregister(engine.shutdown)
        self._engine = engine
        self._scheduler = engine.scheduler_info["scheduler"]
        self._runner = self._scheduler.tp_worker.model_runner
        self._ctl = scheduler_hooks.control(self._scheduler)
        if not hasattr(self._runner, "model_state_leaves"):
            raise EngineError(
                "sglang-jax ModelRunner exposes no model_state_leaves: weight sync impossible"
            )
        self._index_params()
        atexit.register(self.shutdown)
        self.start_seconds = time.perf_counter() - t0

    def _stop_loop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def shutdown(self) -> None:
        """Stop the scheduler thread and the loop; free the engine. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):
                atexit.unregister(self.shutdown)
            if self._ctl is not None:
                self._ctl.stop = True
                self._ctl.wake()
                if self._ctl.thread is not None:
                    self._ctl.thread.join(10)
            self._stop_loop()
            eng = self._engine
            if eng is not None:
                # Close every zmq socket/context the engine opened (linger 0): an open one
                # makes interpreter exit block in zmq_ctx_term.
                socks = [eng.send_to_rpc]
                tm = eng.tokenizer_manager
                socks += [getattr(tm, "recv_from_detokenizer", None),
                          getattr(tm, "send_to_scheduler", None)]
                sched = self._scheduler
                socks += [getattr(sched, n, None) for n in (
                    "recv_from_tokenizer", "send_to_tokenizer", "send_to_detokenizer",
                    "recv_from_rpc")]
                contexts = []
                for sock in socks:
                    if sock is None or not hasattr(sock, "close"):
                        continue
                    ctx = getattr(sock, "context", None)
                    with contextlib.suppress(Exception):
                        sock.close(linger=0)
                    if ctx is not None and all(ctx is not c for c in contexts):
                        contexts.append(ctx)
                for ctx in contexts:
                    with contextlib.suppress(Exception):
                        ctx.destroy(linger=0)
                if self._ctl is not None:
                    self._ctl.close()
                for name in ("tokenizer_ipc_name", "scheduler_input_ipc_name",
                             "detokenizer_ipc_name", "rpc_ipc_name", "metrics_ipc_name"):
                    addr = str(getattr(eng.port_args, name, "") or "")
                    if addr.startswith("ipc://"):
                        with contextlib.suppress(OSError):
                            os.unlink(addr[len("ipc://"):])
            self._engine = self._scheduler = self._runner = None
            self._params = {}

    close = shutdown

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()
        return False

    # -- scheduler-thread calls -----------------------------------------------------------
    def _check_alive(self) -> None:
        if not self.started:
            raise EngineError("engine is not running (call start())")
        ctl = self._ctl
        if ctl.error is not None:
            raise EngineError(f"sglang-jax scheduler failed:\n{ctl.error_traceback}")
        if ctl.thread is not None and not ctl.thread.is_alive():
            raise EngineError("sglang-jax scheduler thread is not running")

    def _wait(self, fut: concurrent.futures.Future, timeout: float | None, what: str):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                pass
            try:
                self._check_alive()
            except EngineError:
                fut.cancel()
                raise
            if deadline is not None and time.monotonic() > deadline:
                fut.cancel()
                raise EngineError(f"{what} did not finish in {timeout} s")

    def on_scheduler(self, fn, timeout: float | None = 600.0):
        """Run `fn(scheduler)` on the scheduler thread while it is idle; return its result."""
        self._check_alive()
        return self._wait(self._ctl.submit(fn), timeout, "scheduler call")

    # -- generation -----------------------------------------------------------------------
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        timeout: float | None = None,
    ) -> list[Sample]:
        """Generate one completion per prompt (repeat a prompt to get several samples).

        seed: restart the engine's sampling stream at `seed` first (reproducible calls);
        None continues the stream, so repeated calls differ.
        """
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        if not prompts:
            return []
        params: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p if top_p is not None else 1.0),
            "top_k": int(top_k) if top_k not in (None, 0) else -1,
            "ignore_eos": bool(ignore_eos),
        }
        if stop_token_ids:
            params["stop_token_ids"] = [int(t) for t in stop_token_ids]
        outs, lps, _ = self._run(prompts, params, seed, timeout)
        return [
            self._to_sample(o, len(p), lps.get(o["meta_info"]["id"]))
            for o, p in zip(outs, prompts, strict=True)
        ]

    def _run(self, prompts: list[list[int]], params: dict[str, Any], seed: int | None,
             timeout: float | None, logits: bool = False) -> tuple[list, dict, list]:
        """One engine call: (outputs, {rid: sampled-token logprobs}, logits rows or Nones)."""
        s = self.settings
        if params["max_new_tokens"] > s.max_new_tokens:
            raise UserError(
                f"max_new_tokens {params['max_new_tokens']} > engine's {s.max_new_tokens}; "
                "rebuild the engine with a larger max_new_tokens"
            )
        too_long = [len(p) for p in prompts if len(p) > s.max_prompt_len or not p]
        if too_long:
            raise UserError(
                f"prompt lengths {too_long[:5]} outside 1..{s.max_prompt_len} (engine max)"
            )
        with self._lock:
            self._check_alive()
            # Runs on the scheduler thread once it is idle: every call starts from the same
            # scheduler state (idle resets included), whatever the thread timing.
            if seed is not None:
                runner = self._runner
                self.on_scheduler(lambda _s: scheduler_hooks.set_sampler_seed(runner, int(seed)))
            else:
                self.on_scheduler(lambda _s: None)
            # Logprobs come from the sampler through the scheduler (scheduler_hooks' capture),
            # not from `return_logprob`, which recompiles the model for every batch composition.
            rids = [f"tsg-{uuid.uuid4().hex}" for _ in prompts]
            self._ctl.want_logprobs(rids)
            if logits:
                self._ctl.want_logits(rids)
            self._ctl.expect = len(prompts)  # scheduled as one batch when it fits
            try:
                # Engine.async_generate takes no rid: build the request ourselves.
                coro = self._with_rids(rids, prompts, params)
                fut = self._loop.submit(coro)
                outs = self._wait(fut, timeout, "generate")
            finally:
                self._ctl.expect = 0
                lps = {rid: self._ctl.take_logprobs(rid) for rid in rids}
                rows = [self._ctl.take_logits(rid) if logits else None for rid in rids]
        return ([outs] if isinstance(outs, dict) else outs), lps, rows

    async def _with_rids(self, rids, prompts, params):
        from sgl_jax.srt.managers.io_struct import GenerateReqInput

        obj = GenerateReqInput(
            rid=list(rids),
            input_ids=prompts,
            sampling_params=[dict(params) for _ in prompts],
            return_logprob=False,
        )
        gen = self._engine.tokenizer_manager.generate_request(obj, None)
        return await gen.__anext__()

    @staticmethod
    def _to_sample(out: dict, prompt_len: int, logprobs: list[float] | None) -> Sample:
        meta = out["meta_info"]
        ids = [int(t) for t in out["output_ids"]]
        n = int(meta.get("completion_tokens", len(ids)))
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type", "") if isinstance(fr, dict) else str(fr)
        if kind == "abort":
            raise EngineError(f"request aborted: {fr.get('message')}")
        if logprobs is None or len(ids) != n or len(logprobs) != n:
            raise EngineError(
                f"inconsistent engine output: {len(ids)} ids, completion_tokens={n}, "
                f"{None if logprobs is None else len(logprobs)} logprobs"
            )
        return Sample(
            tokens=np.asarray(ids, np.int32),
            logprobs=np.asarray(logprobs, np.float32),
            finish_reason=kind,
            prompt_len=prompt_len,
            cache_miss_count=meta.get("cache_miss_count"),
        )

    # -- caches ---------------------------------------------------------------------------
    @staticmethod
    def _flush_on_scheduler(sched) -> None:
        if not scheduler_hooks.scheduler_is_idle(sched):
            raise EngineError("cannot flush caches while requests are running")
        sched.tree_cache.reset()
        sched.req_to_token_pool.clear()
        sched.token_to_kv_pool_allocator.clear()

    def flush(self) -> None:
        """Drop the KV cache contents and the radix (prefix) cache.

        sglang-jax 0.0.2's own flush_cache cannot work in-process (FlushCacheReqInput needs a
        request_id it is not given, and the scheduler has no handler for it).
        """
        with self._lock:
            self.on_scheduler(self._flush_on_scheduler)

    # -- weights --------------------------------------------------------------------------
    def _index_params(self) -> None:
        import jax
        from flax import nnx

        runner = self._runner
        _, state = nnx.split(runner.model)
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        leaves = runner.model_state_leaves
        if len(flat) != len(leaves):
            raise EngineError("engine state and its jitted leaves disagree")
        param_paths = {
            tuple(str(p) for p in path)
            for path, _ in nnx.state(runner.model, nnx.Param).flat_state()
        }
        params = {}
        for i, (path, _) in enumerate(flat):
            names = weight_map.path_names(path)
            if tuple(names) not in param_paths:
                continue
            leaf = leaves[i]
            name = ".".join(names)
            params[name] = _EngineParam(i, name, tuple(leaf.shape), leaf.dtype, leaf.sharding)
        weight_map.backbone_of(params)  # raises when the engine's names are not understood
        self._params = params

    def engine_param_names(self) -> list[str]:
        return sorted(self._params)

    @property
    def mesh(self):
        return getattr(self._runner, "mesh", None)

    def plan_sync(self, src: Any) -> tuple[list[tuple[_EngineParam, weight_map.Mapped]], dict,
                                           list]:
        """Match source params to engine params (weight_map.plan); raises
        IncompleteSyncError unless every engine parameter is written exactly once."""
        flat, ignored = weight_map.flatten_tunix_params(src)
        plan = weight_map.plan(flat, {n: p.shape for n, p in self._params.items()})
        return [(self._params[m.engine_name], m) for m in plan], flat, ignored

    def _move(self, plan, flat) -> list:
        """Transform and place every parameter onto the engine's shardings.

        When the sources already live on the engine's devices, one compiled program does all
        of it (one dispatch instead of one per parameter, and always fresh buffers, never an
        alias of the trainer's); otherwise per-array transforms then `device_put`.
        """
        import jax

        srcs = [flat[m.tunix_name] for _, m in plan]
        engine_devices = set(self.devices)
        fusable = all(isinstance(x, jax.Array) and x.sharding.device_set <= engine_devices
                      for x in srcs)
        if not fusable:
            arrays = [weight_map.transform(x, m, p.dtype) for x, (p, m) in zip(
                srcs, plan, strict=True)]
            return jax.device_put(arrays, [p.sharding for p, _ in plan])
        key = tuple((p.index, m, str(x.dtype), x.sharding)
                    for x, (p, m) in zip(srcs, plan, strict=True))
        fn = self._move_cache.get(key)
        if fn is None:
            maps = [(m, p.dtype) for p, m in plan]
            fn = jax.jit(
                lambda xs: [weight_map.transform(x, m, dt) for x, (m, dt) in zip(
                    xs, maps, strict=True)],
                out_shardings=[p.sharding for p, _ in plan],
            )
            self._move_cache[key] = fn
        return fn(srcs)

    def skipped_by_faults(self, new: dict[str, Any], version: int) -> set[str]:
        """Engine parameters a sync to `version` leaves unwritten under an injected fault
        (`new`: {engine name: the array the sync would write})."""
        if faults.injected("skip_sync", version):
            return set(new)
        if faults.injected("partial_sync", version):
            # The largest tensor this sync changes (in bfloat16 a tiny step changes only some).
            leaves = self._runner.model_state_leaves
            changed = [n for n, a in new.items()
                       if bool((a != leaves[self._params[n].index]).any())] or list(new)
            return {max(changed, key=lambda n: (math.prod(self._params[n].shape), n))}
        return set()

    def sync_from_tunix(self, src: Any, version: int | None = None) -> SyncReport:
        """Write a Tunix model's (or nnx.State's) parameters into the engine.

        Every engine parameter must be written by exactly one source parameter and every
        source parameter must be used, else IncompleteSyncError (and nothing changes).
        Transfers are device-to-device (allowed under Tunix's transfer guards). `version`:
        the weight version the engine reports afterwards (the trainer's optimizer steps);
        None: one more than now.
        """
        import jax
        from flax import nnx

        with self._lock:
            self._check_alive()
            version = self.weight_version + 1 if version is None else int(version)
            t0 = time.perf_counter()
            with jax.transfer_guard("allow"):
                plan, flat, ignored = self.plan_sync(src)
                moved = self._move(plan, flat)
                jax.block_until_ready(moved)
            t1 = time.perf_counter()
            runner = self._runner
            skip = self.skipped_by_faults(
                {p.name: a for (p, _), a in zip(plan, moved, strict=True)}, version)
            stale_forward = faults.injected("stale_forward", version)

            def swap(sched):
                old = runner.model_state_leaves
                leaves = list(old)
                for (p, _), a in zip(plan, moved, strict=True):
                    if p.name not in skip:
                        leaves[p.index] = a
                runner.model_state_leaves = leaves
                # Keep the nnx model coherent (and drop its references to the old arrays).
                nnx.update(
                    runner.model, jax.tree_util.tree_unflatten(runner.model_state_def, leaves)
                )
                if stale_forward:
                    _forward_reads(runner, old)
                self._flush_on_scheduler(sched)

            self.on_scheduler(swap)
            t2 = time.perf_counter()
            self.weight_version = version
            self.last_sync = SyncReport(
                version=self.weight_version,
                seconds=t2 - t0,
                transfer_seconds=t1 - t0,
                swap_seconds=t2 - t1,
                num_params=len(plan),
                num_bytes=int(sum(a.size * a.dtype.itemsize for a in moved)),
                ignored=tuple(ignored),
            )
            return self.last_sync

    def engine_params(self) -> dict[str, Any]:
        """The engine's current parameter arrays by name (what its forward reads)."""
        leaves = self._runner.model_state_leaves
        return {n: leaves[p.index] for n, p in self._params.items()}

    # -- proof ----------------------------------------------------------------------------
    def fingerprints(self) -> dict[str, tuple[int, tuple[int, ...], str]]:
        """{engine name: (fingerprint, shape, dtype)} of the buffers the forward reads.

        Computed on the scheduler thread, between batches, on the engine's devices.
        """
        from tunix_sglang.probe import fingerprint

        names = sorted(self._params)
        runner = self._runner

        def run(_sched):
            leaves = runner.model_state_leaves
            return fingerprint.of_arrays([leaves[self._params[n].index] for n in names])

        with self._lock:
            values = self.on_scheduler(run)
        return {n: (v, self._params[n].shape, str(np.dtype(self._params[n].dtype)))
                for n, v in zip(names, values, strict=True)}

    def next_token_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """The raw next-token logits row after each prompt: float32 [len(prompts), vocab].

        One prefill of the batch (one new token each, greedy), the rows captured between the
        jitted forward and the sampler for these requests only.
        """
        params = {"max_new_tokens": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                  "ignore_eos": True}
        _, _, rows = self._run([[int(t) for t in p] for p in prompts], params, seed=None,
                               timeout=None, logits=True)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            raise EngineError(f"the engine returned no logits for probe prompts {missing}")
        return np.stack(rows)

    def evidence(self, prefixes: Sequence[Sequence[int]], where: str = "engine"):
        """This engine's side of the sync proof (probe.EngineReport)."""
        from tunix_sglang.probe import EngineReport

        return EngineReport(where=where, version=self.weight_version,
                            params=self.fingerprints(), logits=self.next_token_logits(prefixes))


def _check_runtime() -> None:
    """EngineError unless the scheduler runtime and the fixes the engine relies on are in."""
    gone = scheduler_hooks.missing()
    if gone:
        raise EngineError(f"the engine's scheduler hooks are not installed: {gone} (the "
                          "installed sglang-jax calls other functions than this project hooks)")
    absent = [f"{name} ({what})" for name, what in REQUIRED_FIXES.items()
              if name not in compat.ACTIVE_FIXES]
    if absent:
        raise EngineError(f"compat fixes the engine needs did not apply: {absent}; their "
                          "capability checks found the installed sglang-jax changed")


def _forward_reads(runner, leaves) -> None:
    """Injected fault `stale_forward`: the jitted forward reads `leaves` from now on, while
    the buffers (`model_state_leaves`) hold the new weights (the bug the compat fix
    `sglang_jax.forward_reads_weights` repairs)."""
    forward = runner.jitted_run_model

    def stale(*args, **kwargs):
        current = runner.model_state_leaves
        runner.model_state_leaves = leaves
        try:
            return forward(*args, **kwargs)
        finally:
            runner.model_state_leaves = current

    runner.jitted_run_model = stale
