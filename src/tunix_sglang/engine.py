"""In-process sglang-jax rollout engine with proven in-memory weight sync from Tunix.

One `InProcessEngine` wraps a sglang-jax `Engine` running in this process
(`enable_single_process=True`: scheduler and detokenizer are threads, no child process):

* `EngineSettings` derives every engine shape from the rollout (prompt length, new tokens,
  prompts x generations), never from sglang-jax defaults, and passes only the ServerArgs
  fields the installed sglang-jax has.
* `generate()` sends token ids and gets token ids back (the engine tokenizer is off:
  notes item 10) with the logprob of every sampled token; it runs on one long-lived asyncio
  loop thread (notes item 8).
* `sync_from_tunix()` maps Tunix parameter names/layouts onto the engine's (`weight_map`),
  reshards them onto the engine's devices, swaps them into what the jitted forward reads
  (see compat.sglang_jax_fixes.fix_forward_reads_weights), flushes the KV/radix caches and
  sets `weight_version` (the trainer's optimizer steps, carried by the sync). Every engine
  parameter must be written or it raises.
* `evidence()` is the engine's side of the sync proof (`tunix_sglang.probe`): fingerprints of
  the buffers its forward reads and the logits it computes for the probe's prefixes.

Logprobs are those of the distribution each token was sampled from, before top-k/top-p
truncation: `log_softmax(logits / temperature)`, and `log_softmax(logits)` for greedy
(temperature 0). This is what Tunix's `compute_per_token_logps(temperature=T)` computes.
"""

from __future__ import annotations

import asyncio
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

from tunix_sglang import faults, weight_map
from tunix_sglang.errors import UserError

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed or returned something inconsistent."""


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

# Tokens reserved on top of prompt + new tokens: sglang-jax's scheduler keeps
# max_req_len = context_len - 1, prompts <= max_req_len - 5, new <= max_req_len - prompt - 1,
# and its tokenizer manager requires prompt + new < context_len.
_CONTEXT_SLACK = 8


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Everything the engine is built from; shapes come from the rollout.

    model_path: Hugging Face model directory (config.json is read by the engine; weights are
      not: the engine starts with dummy weights and is synced from the trainer).
    max_prompt_len / max_new_tokens: the rollout's longest prompt and completion.
    batch_size: sequences generated together (prompts x generations per step).
    mem_fraction_static: `--sglang-mem-fraction-static`, fraction of host RAM (CPU) or
      device memory the engine may plan for; the KV cache is further capped to what the
      rollout needs (`max_total_tokens`), so a large fraction is safe (notes item 9).
    rollout_devices: `--rollout-devices N`: the engine runs on the first N local devices
      (None: the first `tp_size`).
    device_ids: explicit device ids instead (overrides rollout_devices).
    global_devices: choose among every process's devices (`jax.devices()`), not only this
      process's: one engine mesh spanning several processes (multi-host lockstep). Every
      process must then start the engine with the same settings.
    """

    model_path: str
    max_prompt_len: int
    max_new_tokens: int
    batch_size: int
    mem_fraction_static: float = 0.8
    rollout_devices: int | None = None
    device_ids: tuple[int, ...] | None = None
    global_devices: bool = False
    tp_size: int = 1
    dtype: str = "float32"
    seed: int = 0
    disable_radix_cache: bool = False
    token_paddings: tuple[int, ...] | None = None
    bs_paddings: tuple[int, ...] | None = None
    precompile: bool = True
    log_level: str = "error"
    extra_server_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        for name in ("max_prompt_len", "max_new_tokens", "batch_size", "tp_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"engine setting {name}={v!r} must be a positive integer")
        f = self.mem_fraction_static
        if not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise UserError(
                f"--sglang-mem-fraction-static {f!r}: must be a number strictly between 0 and 1"
            )
        if self.rollout_devices is not None and (
            not isinstance(self.rollout_devices, int) or self.rollout_devices <= 0
        ):
            raise UserError(f"--rollout-devices {self.rollout_devices!r}: must be a positive int")

    @classmethod
    def for_rollout(
        cls,
        model_path: str,
        *,
        max_prompt_len: int,
        max_new_tokens: int,
        num_prompts: int,
        num_generations: int = 1,
        **kw: Any,
    ) -> EngineSettings:
        return cls(
            model_path=str(model_path),
            max_prompt_len=int(max_prompt_len),
            max_new_tokens=int(max_new_tokens),
            batch_size=int(num_prompts) * int(num_generations),
            **kw,
        )

    # -- derived values -------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.max_prompt_len + self.max_new_tokens + _CONTEXT_SLACK

    @property
    def max_prefill_tokens(self) -> int:
        return max(self.batch_size * self.max_prompt_len, self.batch_size)

    def derived_bs_paddings(self) -> list[int]:
        if self.bs_paddings:
            return sorted({min(int(b), self.batch_size) for b in self.bs_paddings})
        # Decode batches shrink as sequences finish: bs, bs/4, bs/16 (each is one compile).
        out, b = [], self.batch_size
        while b >= 1 and len(out) < 3:
            out.append(b)
            b //= 4
        return sorted(set(out))

    def derived_token_paddings(self, native: bool = False) -> list[int]:
        top = self.max_prefill_tokens
        if self.token_paddings:
            return sorted({int(t) for t in self.token_paddings if self.batch_size <= t <= top}
                          | {top})
        sizes = {top // 4, top}
        if native:  # CPU: a prefill costs its padding x the whole KV window; the sync proof's
            from tunix_sglang.probe.scoring import PROBE_TOKEN_PADDING  # gets its own size

            sizes.add(PROBE_TOKEN_PADDING)
        return sorted(t for t in sizes if self.batch_size <= t <= top)

    def server_args_values(self, backend: str) -> dict[str, Any]:
        """All ServerArgs values this engine wants (before filtering by the installed version)."""
        native = backend == "cpu"
        v: dict[str, Any] = dict(
            model_path=str(self.model_path),
            skip_tokenizer_init=True,  # token ids in/out (notes item 10)
            load_format="dummy",  # weights come from the trainer right after start
            dtype=self.dtype,
            context_length=self.context_length,
            mem_fraction_static=float(self.mem_fraction_static),
            max_running_requests=self.batch_size,
            max_total_tokens=self.batch_size * self.context_length,
            max_prefill_tokens=self.max_prefill_tokens,
            chunked_prefill_size=-1,
            # page_size 1 on CPU: the native attention backend assumes packed keys while
            # page_size > 1 page-aligns KV slots -> wrong attention for every sequence after
            # the first in a batch (notes item 6, logprob errors up to 0.76).
            page_size=1 if native else 128,
            attention_backend="native" if native else "fa",
            device=backend,
            tp_size=self.tp_size,
            random_seed=self.seed,
            enable_single_process=True,
            disable_overlap_schedule=True,
            disable_radix_cache=self.disable_radix_cache,
            precompile_bs_paddings=self.derived_bs_paddings(),
            precompile_token_paddings=self.derived_token_paddings(native),
            disable_jax_precompile=not self.precompile,
            log_level=self.log_level,
            max_seq_len=self.context_length,
        )
        v.update(dict(self.extra_server_args))
        return v

    def server_args_kwargs(self, server_args_cls=None, backend: str | None = None):
        """(kwargs the installed ServerArgs accepts, names it does not have)."""
        if server_args_cls is None:
            from sgl_jax.srt.server_args import ServerArgs as server_args_cls
        if backend is None:
            import jax

            backend = jax.default_backend()
        fields = {f.name for f in dataclasses.fields(server_args_cls)}
        wanted = self.server_args_values(backend)
        kwargs = {k: val for k, val in wanted.items() if k in fields}
        dropped = sorted(k for k in wanted if k not in fields)
        return kwargs, dropped


def host_local_share(batch_size: int, num_processes: int) -> int:
    """Sequences a host-local engine is built for: its host's share of the batch, rounded up."""
    return max(1, -(-batch_size // num_processes))


def host_local_device_count(rollout_devices: int, mesh_size: int, num_processes: int,
                            num_local: int) -> int:
    """Local devices a host-local engine uses: the rollout mesh's share per process
    (--rollout-devices counts global devices; 0 means the whole mesh)."""
    return min(max(1, (rollout_devices or mesh_size) // num_processes), num_local)


def select_devices(settings: EngineSettings) -> list:
    """The devices the engine runs on: explicit ids, else the first N devices; among this
    process's devices, or every process's with `settings.global_devices`."""
    import jax

    pool = jax.devices() if settings.global_devices else jax.local_devices()
    kind = "devices" if settings.global_devices else "local devices"
    if settings.device_ids is not None:
        by_id = {d.id: d for d in pool}
        missing = [i for i in settings.device_ids if i not in by_id]
        if missing:
            raise UserError(f"rollout device ids {missing} are not {kind} {sorted(by_id)}")
        devs = [by_id[i] for i in settings.device_ids]
    elif settings.global_devices and settings.rollout_devices is None:
        devs = list(pool)  # a global engine spans every device unless told otherwise
    else:
        n = settings.rollout_devices or settings.tp_size
        if n > len(pool):
            hint = ""
            if jax.default_backend() == "cpu" and not settings.global_devices:
                hint = f"; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
            raise UserError(f"--rollout-devices {n}: only {len(pool)} {kind}{hint}")
        devs = list(pool[:n])
    if len(devs) % settings.tp_size:
        raise UserError(
            f"--rollout-devices {len(devs)} is not a multiple of the engine tp size "
            f"{settings.tp_size}"
        )
    return devs


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One completion: exactly the sampled token ids and the logprob of each."""

    tokens: np.ndarray  # int32 [n]
    logprobs: np.ndarray  # float32 [n]
    finish_reason: str  # "stop" (EOS / stop token, included in tokens) or "length"
    prompt_len: int = 0
    cache_miss_count: int | None = None


@dataclasses.dataclass
class SyncReport:
    version: int
    seconds: float
    transfer_seconds: float
    swap_seconds: float
    num_params: int
    num_bytes: int
    ignored: tuple[str, ...] = ()

    def as_metrics(self) -> dict[str, float]:
        return {
            "sync_seconds": self.seconds,
            "sync_transfer_seconds": self.transfer_seconds,
            "sync_swap_seconds": self.swap_seconds,
            "sync_bytes": float(self.num_bytes),
            "weight_version": float(self.version),
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
        self.dropped_server_args: list[str] = []
        self.devices: list = []
        self._lock = threading.RLock()
        self._engine = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
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
        from tunix_sglang import compat
        from tunix_sglang.compat import sglang_jax_fixes as fixes

        compat.apply_all()
        fixes.apply()  # also when compat.apply_all() does not call it
        from sgl_jax.srt.entrypoints.engine import Engine
        from sgl_jax.srt.server_args import ServerArgs

        t0 = time.perf_counter()
        kwargs, dropped = self.settings.server_args_kwargs(ServerArgs)
        self.dropped_server_args = dropped
        if dropped:
            logger.info("sglang-jax ServerArgs has no %s; not passed", dropped)
        if kwargs.get("device") == "cpu" and os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
            # ServerArgs asserts device == JAX_PLATFORMS when the variable is set.
            kwargs["device"] = os.environ["JAX_PLATFORMS"]
        self.devices = select_devices(self.settings)
        self._start_loop()
        try:
            with fixes.engine_devices(self.devices, skip_penalty_precompile=True):
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
        self._ctl = fixes.control(self._scheduler)
        if not hasattr(self._runner, "model_state_leaves"):
            raise EngineError(
                "sglang-jax ModelRunner exposes no model_state_leaves: weight sync impossible"
            )
        self._index_params()
        atexit.register(self.shutdown)
        self.start_seconds = time.perf_counter() - t0

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        t = threading.Thread(target=run, name="tunix-sglang-asyncio", daemon=True)
        t.start()
        ready.wait(10)
        self._loop, self._loop_thread = loop, t

    def _stop_loop(self) -> None:
        loop, t = self._loop, self._loop_thread
        if loop is None:
            return

        async def _cancel_all():
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if t is not None:
            t.join(10)
        if not loop.is_running():
            with contextlib.suppress(Exception):
                loop.close()
        self._loop = self._loop_thread = None

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
        None continues the stream, so repeated calls differ (notes item 11).
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
                from tunix_sglang.compat.sglang_jax_fixes import set_sampler_seed

                runner = self._runner
                self.on_scheduler(lambda _s: set_sampler_seed(runner, int(seed)))
            else:
                self.on_scheduler(lambda _s: None)
            # Logprobs come from the sampler through the scheduler (fix_logprob_capture), not
            # from `return_logprob`, which recompiles the model for every batch composition.
            rids = [f"tsg-{uuid.uuid4().hex}" for _ in prompts]
            self._ctl.want_logprobs(rids)
            if logits:
                self._ctl.want_logits(rids)
            self._ctl.expect = len(prompts)  # scheduled as one batch when it fits
            try:
                # Engine.async_generate takes no rid: build the request ourselves.
                coro = self._with_rids(rids, prompts, params)
                fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
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
        from tunix_sglang.compat.sglang_jax_fixes import scheduler_is_idle

        if not scheduler_is_idle(sched):
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


def _forward_reads(runner, leaves) -> None:
    """Injected fault `stale_forward`: the jitted forward reads `leaves` from now on, while
    the buffers (`model_state_leaves`) hold the new weights (the bug fix_forward_reads_weights
    repairs)."""
    forward = runner.jitted_run_model

    def stale(*args, **kwargs):
        current = runner.model_state_leaves
        runner.model_state_leaves = leaves
        try:
            return forward(*args, **kwargs)
        finally:
            runner.model_state_leaves = current

    runner.jitted_run_model = stale
