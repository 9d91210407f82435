"""In-process sglang-jax rollout engine with proven in-memory weight sync from Tunix.

One `InProcessEngine` wraps a sglang-jax `Engine` running in this process
(`enable_single_process=True`: scheduler and detokenizer are threads, no child process):

* `EngineSettings` derives every engine shape from the rollout (prompt length, new tokens,
  prompts x generations), never from sglang-jax defaults, and passes only the ServerArgs
  fields the installed sglang-jax has.
* `generate()` sends token ids and gets token ids back (the engine tokenizer is off:
  notes item 10) with the logprob of every sampled token; it runs on one long-lived asyncio
  loop thread (notes item 8).
* `sync_from_tunix()` maps Tunix parameter names/layouts onto the engine's, reshards them
  onto the engine's devices, swaps them into what the jitted forward reads (see
  compat.sglang_jax_fixes.fix_forward_reads_weights), flushes the KV/radix caches and bumps
  `weight_version`. Every engine parameter must be written or it raises.
* `probe_logprob_diff()` proves a sync: greedy tokens of a fixed probe scored by the engine
  and by the Tunix model; returns max |delta logprob|.

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
import functools
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunix_sglang.errors import UserError

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed or returned something inconsistent."""


class IncompleteSyncError(EngineError):
    """A weight sync would leave engine parameters unwritten (or source params unused)."""


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

    def derived_token_paddings(self) -> list[int]:
        top = self.max_prefill_tokens
        if self.token_paddings:
            return sorted({int(t) for t in self.token_paddings if self.batch_size <= t <= top}
                          | {top})
        return sorted({t for t in (top // 4, top) if t >= self.batch_size})

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
            precompile_token_paddings=self.derived_token_paddings(),
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


# ---------------------------------------------------------------------------------------
# Parameter mapping Tunix -> sglang-jax
# ---------------------------------------------------------------------------------------

# Tunix names (Qwen3, Qwen2, Llama3 share them) -> engine names relative to the backbone
# ("transformer" in 0.0.2, "model" upstream; detected from the engine). Layouts:
#   copy      same shape
#   reshape   same row-major order, merged head axes: q/k/v [D,H,hd]->[D,H*hd],
#             o [H,hd,D]->[H*hd,D], biases [H,hd]->[H*hd]
#   transpose Tunix lm_head [D,V] -> engine lm_head.embedding [V,D] (untied head, notes 12)
_RULES: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"embedder\.input_embedding"), "{B}.embed_tokens.embedding", "copy"),
    (re.compile(r"final_norm\.w"), "{B}.norm.scale", "copy"),
    (re.compile(r"lm_head\.w"), "lm_head.embedding", "transpose"),
    (re.compile(r"layers\.(\d+)\.attn\.([qkvo])_proj\.w"),
     r"{B}.layers.\1.self_attn.\2_proj.weight", "reshape"),
    (re.compile(r"layers\.(\d+)\.attn\.([qkvo])_bias"),
     r"{B}.layers.\1.self_attn.\2_proj.bias", "reshape"),
    (re.compile(r"layers\.(\d+)\.attn\.([qk])_norm\.w"),
     r"{B}.layers.\1.self_attn.\2_norm.scale", "copy"),
    (re.compile(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.kernel"),
     r"{B}.layers.\1.mlp.\2_proj.weight", "copy"),
    (re.compile(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.w"),
     r"{B}.layers.\1.\2.scale", "copy"),
]


def engine_name_for(tunix_name: str, backbone: str) -> tuple[str, str] | None:
    for pat, template, op in _RULES:
        m = pat.fullmatch(tunix_name)
        if m:
            return m.expand(template.replace("{B}", backbone)), op
    return None


def _path_names(path) -> list[str]:
    from tunix_sglang.compat.sglang_jax_fixes import path_names

    return path_names(path)


def flatten_tunix_params(src: Any) -> tuple[dict[str, Any], list[str]]:
    """{dotted name: array} of the Params in a Tunix model / nnx.State / nested dict.

    Returns (params, ignored non-Param variable names).
    """
    import jax
    from flax import nnx

    if isinstance(src, nnx.Module):
        src = nnx.state(src, nnx.Param)
    out: dict[str, Any] = {}
    ignored: list[str] = []
    if isinstance(src, nnx.State):
        for path, v in src.flat_state():
            name = ".".join(str(p) for p in path)
            if isinstance(v, nnx.Variable):
                if not isinstance(v, nnx.Param):
                    ignored.append(name)
                    continue
                v = v.value
            out[name] = v
        return out, ignored
    for path, leaf in jax.tree_util.tree_flatten_with_path(src)[0]:
        out[".".join(_path_names(path))] = leaf
    return out, ignored


@dataclasses.dataclass(frozen=True)
class _EngineParam:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: Any
    sharding: Any


def _transform(x, op: str, shape: tuple[int, ...], dtype):
    import jax.numpy as jnp

    if op == "transpose":
        if x.ndim != 2:
            raise IncompleteSyncError(f"cannot transpose a {x.ndim}-d array")
        x = jnp.transpose(x)
    if tuple(x.shape) != tuple(shape):
        if op == "copy" or math.prod(x.shape) != math.prod(shape):
            raise IncompleteSyncError(f"shape {tuple(x.shape)} cannot become {tuple(shape)}")
        x = jnp.reshape(x, shape)
    if x.dtype != dtype:
        x = x.astype(dtype)
    return x


# ---------------------------------------------------------------------------------------
# Tunix-side scoring (the reference the engine is checked against)
# ---------------------------------------------------------------------------------------


def _model_mesh(model):
    import jax
    from flax import nnx

    for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None and getattr(mesh, "axis_names", None):
            return mesh
    return None


def _bucket(n: int, step: int = 16) -> int:
    return max(step, -(-n // step) * step)


@functools.lru_cache(maxsize=1)
def _jitted_tunix_forward():
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def forward(model, tokens, positions, mask):
        logits, _ = model(tokens, positions, None, mask)
        return jnp.asarray(logits, jnp.float32)

    return forward


def tunix_logits(model, seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """Float32 logits [len(seqs), L, vocab] of a Tunix model (one jitted full forward).

    Sequences are right-padded to a multiple of 16 (causal attention: padding after a
    position cannot change it) and the batch to a multiple of the model's mesh size, so
    repeated calls reuse a few compiled shapes. Inputs must be the same on every process when
    the model spans processes; the output is then gathered to every host.
    """
    import jax
    import jax.numpy as jnp

    n = len(seqs)
    length = _bucket(max(len(x) for x in seqs))
    mesh = _model_mesh(model)
    per = int(mesh.devices.size) if mesh is not None else 1
    rows = -(-n // per) * per
    tokens = np.zeros((rows, length), np.int32)
    for i in range(rows):
        src = seqs[min(i, n - 1)]
        tokens[i, : len(src)] = src
    positions = np.tile(np.arange(length, dtype=np.int32)[None], (rows, 1))
    mask = np.tile(np.tril(np.ones((length, length), bool))[None], (rows, 1, 1))
    ctx = mesh if mesh is not None else contextlib.nullcontext()
    with ctx, jax.transfer_guard("allow"):
        out = _jitted_tunix_forward()(
            model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)
        )
        if not out.is_fully_addressable:  # params spanning processes: every host gets all
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(out, tiled=True))[:n]
        return np.asarray(jax.device_get(out))[:n]


def tunix_token_logprobs(
    model,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    temperature: float = 0.0,
) -> np.ndarray:
    """Logprobs the Tunix model gives `completion_ids` after `prompt_ids` (full forward).

    temperature 0 or 1: log_softmax(logits); otherwise log_softmax(logits / temperature),
    as Tunix's compute_per_token_logps.
    """
    seq = [int(t) for t in prompt_ids] + [int(t) for t in completion_ids]
    n_prompt = len(prompt_ids)
    logits = tunix_logits(model, [seq])[0, n_prompt - 1 : len(seq) - 1].astype(np.float64)
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logits = logits - logits.max(axis=-1, keepdims=True)
    lp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    idx = np.asarray(completion_ids, np.int64)
    return lp[np.arange(len(idx)), idx].astype(np.float32)


def tunix_greedy(model, prompt_ids: Sequence[int], num_tokens: int) -> list[int]:
    """Greedy continuation by the Tunix model: `num_tokens` full forward passes, no KV cache."""
    seq = [int(t) for t in prompt_ids]
    for _ in range(num_tokens):
        seq.append(int(np.argmax(tunix_logits(model, [seq])[0, len(seq) - 1])))
    return seq[len(prompt_ids):]


# ---------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------


class InProcessEngine:
    """A sglang-jax Engine in this process, synced in memory from a Tunix model."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.weight_version = 0
        self.last_sync: SyncReport | None = None
        self.last_probe: dict[str, Any] | None = None
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
        self._backbone = ""
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
        s = self.settings
        if max_new_tokens > s.max_new_tokens:
            raise UserError(
                f"max_new_tokens {max_new_tokens} > engine's {s.max_new_tokens}; "
                "rebuild the engine with a larger max_new_tokens"
            )
        too_long = [len(p) for p in prompts if len(p) > s.max_prompt_len or not p]
        if too_long:
            raise UserError(
                f"prompt lengths {too_long[:5]} outside 1..{s.max_prompt_len} (engine max)"
            )
        params: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "top_p": float(top_p if top_p is not None else 1.0),
            "top_k": int(top_k) if top_k not in (None, 0) else -1,
            "ignore_eos": bool(ignore_eos),
        }
        if stop_token_ids:
            params["stop_token_ids"] = [int(t) for t in stop_token_ids]
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
            self._ctl.expect = len(prompts)  # scheduled as one batch when it fits
            try:
                # Engine.async_generate takes no rid: build the request ourselves.
                coro = self._with_rids(rids, prompts, params)
                fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
                outs = self._wait(fut, timeout, "generate")
            finally:
                self._ctl.expect = 0
                lps = {rid: self._ctl.take_logprobs(rid) for rid in rids}
        if isinstance(outs, dict):
            outs = [outs]
        return [
            self._to_sample(o, len(p), lps.get(o["meta_info"]["id"]))
            for o, p in zip(outs, prompts, strict=True)
        ]

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
            names = _path_names(path)
            if tuple(names) not in param_paths:
                continue
            leaf = leaves[i]
            name = ".".join(names)
            params[name] = _EngineParam(i, name, tuple(leaf.shape), leaf.dtype, leaf.sharding)
        backbones = {n.split(".")[0] for n in params if ".layers." in n}
        if len(backbones) != 1:
            raise EngineError(f"cannot find the engine's backbone prefix among {backbones}")
        self._backbone = backbones.pop()
        self._params = params

    def engine_param_names(self) -> list[str]:
        return sorted(self._params)

    @property
    def mesh(self):
        return getattr(self._runner, "mesh", None)

    def plan_sync(self, src: Any) -> tuple[list[tuple[_EngineParam, str, str]], dict, list]:
        """Match source params to engine params; raise IncompleteSyncError if not 1:1."""
        flat, ignored = flatten_tunix_params(src)
        plan, unmapped, seen = [], [], {}
        for tname in sorted(flat):
            m = engine_name_for(tname, self._backbone)
            if m is None or m[0] not in self._params:
                unmapped.append(tname if m is None else f"{tname} -> {m[0]}")
                continue
            ename, op = m
            if ename in seen:
                raise IncompleteSyncError(f"{tname} and {seen[ename]} both map to {ename}")
            seen[ename] = tname
            plan.append((self._params[ename], tname, op))
        missing = sorted(set(self._params) - set(seen))
        if any(".lora" in n or "lora_" in n for n in flat):
            raise IncompleteSyncError(
                "LoRA parameters cannot be synced into this engine (merge them first)"
            )
        if missing or unmapped:
            parts = []
            if missing:
                parts.append(f"engine parameters not written: {missing}")
            if unmapped:
                parts.append(f"source parameters with no engine counterpart: {unmapped}")
            raise IncompleteSyncError(
                "incomplete weight sync, nothing was changed; " + "; ".join(parts)
            )
        return plan, flat, ignored

    def _move(self, plan, flat) -> list:
        """Transform and place every parameter onto the engine's shardings.

        When the sources already live on the engine's devices, one compiled program does all
        of it (one dispatch instead of one per parameter, and always fresh buffers, never an
        alias of the trainer's); otherwise per-array transforms then `device_put`.
        """
        import jax

        srcs = [flat[t] for _, t, _ in plan]
        engine_devices = set(self.devices)
        fusable = all(isinstance(x, jax.Array) and x.sharding.device_set <= engine_devices
                      for x in srcs)
        if not fusable:
            arrays = [_transform(x, op, p.shape, p.dtype) for x, (p, _, op) in zip(
                srcs, plan, strict=True)]
            return jax.device_put(arrays, [p.sharding for p, _, _ in plan])
        key = tuple((p.index, op, tuple(x.shape), str(x.dtype), x.sharding)
                    for x, (p, _, op) in zip(srcs, plan, strict=True))
        fn = self._move_cache.get(key)
        if fn is None:
            ops = [(op, p.shape, p.dtype) for p, _, op in plan]
            fn = jax.jit(
                lambda xs: [_transform(x, op, sh, dt) for x, (op, sh, dt) in zip(
                    xs, ops, strict=True)],
                out_shardings=[p.sharding for p, _, _ in plan],
            )
            self._move_cache[key] = fn
        return fn(srcs)

    def sync_from_tunix(self, src: Any) -> SyncReport:
        """Write a Tunix model's (or nnx.State's) parameters into the engine.

        Every engine parameter must be written by exactly one source parameter and every
        source parameter must be used, else IncompleteSyncError (and nothing changes).
        Transfers are device-to-device (allowed under Tunix's transfer guards).
        """
        import jax
        from flax import nnx

        with self._lock:
            self._check_alive()
            t0 = time.perf_counter()
            with jax.transfer_guard("allow"):
                plan, flat, ignored = self.plan_sync(src)
                try:
                    moved = self._move(plan, flat)
                except IncompleteSyncError as e:
                    raise IncompleteSyncError(f"weight sync failed: {e}") from None
                jax.block_until_ready(moved)
            t1 = time.perf_counter()
            runner = self._runner

            def swap(sched):
                leaves = list(runner.model_state_leaves)
                for (p, _, _), a in zip(plan, moved, strict=True):
                    leaves[p.index] = a
                runner.model_state_leaves = leaves
                # Keep the nnx model coherent (and drop its references to the old arrays).
                nnx.update(
                    runner.model, jax.tree_util.tree_unflatten(runner.model_state_def, leaves)
                )
                self._flush_on_scheduler(sched)

            self.on_scheduler(swap)
            t2 = time.perf_counter()
            self.weight_version += 1
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
    def probe_prompt(self, length: int = 8) -> list[int]:
        vocab = int(self._scheduler.model_config.vocab_size)
        return [(131 * i + 17) % vocab for i in range(min(length, self.settings.max_prompt_len))]

    def probe_logprob_diff(
        self,
        trainer_model,
        prompt_ids: Sequence[int] | None = None,
        num_tokens: int = 4,
        temperature: float = 0.0,
        seed: int = 1234,
    ) -> float:
        """Max |engine logprob - Tunix logprob| over a short fixed probe.

        The engine generates `num_tokens` tokens (greedy by default, EOS ignored) with their
        logprobs; the Tunix model scores the same tokens at the same temperature.
        """
        prompt = list(prompt_ids) if prompt_ids is not None else self.probe_prompt()
        n = min(num_tokens, self.settings.max_new_tokens)
        (sample,) = self.generate(
            [prompt], max_new_tokens=n, temperature=temperature, seed=seed, ignore_eos=True
        )
        ref = tunix_token_logprobs(trainer_model, prompt, sample.tokens, temperature)
        diff = float(np.max(np.abs(ref - sample.logprobs))) if len(ref) else 0.0
        self.last_probe = {
            "prompt": prompt,
            "tokens": sample.tokens.tolist(),
            "engine_logprobs": sample.logprobs.tolist(),
            "trainer_logprobs": ref.tolist(),
            "max_abs_diff": diff,
            "weight_version": self.weight_version,
        }
        return diff
