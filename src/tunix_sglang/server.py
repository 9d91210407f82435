"""`tunix-sglang serve`: one sglang-jax rollout engine behind an HTTP API.

sglang-jax 0.0.2's own HTTP server has no weight-update route (and no batched token-id
generate); this server hosts the same `InProcessEngine` (and compat fixes) the in-process
rollout uses, and adds what a single controller needs:

  POST /generate                       token ids in; tokens, logprobs, finish reasons out
  POST /weights/uploads                begin a push (manifest: tensors, chunk CRC32s, version)
  PUT  /weights/uploads/{id}/chunks/{i} raw bytes of chunk i (checked against its CRC32)
  POST /weights/uploads/{id}/commit    apply the complete set atomically -> new version
  DELETE /weights/uploads/{id}         drop an upload
  POST /weights/load                   a Tunix-named .safetensors file or HF model dir under
                                       --weights-root (the route is off without it)
  POST /probe                          the sync proof: fingerprints and next-token logits
  GET  /version, /health (no token), /info; POST /pause, /resume, /flush; GET /openapi.json

Weights start as the model directory's (`--init-weights model`) or random (`dummy`), at
version 0. Versions (0..2**63-1, set by the pusher: the trainer's optimizer steps) strictly
increase: an older one, or the current one with other weights, is refused (409) (the first
push may take the start weights' version); the same weights at the same version (a retried
commit) answer 200 without being applied again. A commit answers with the engine's own
fingerprints of what it now holds (tunix_sglang.probe). Generation and weight application
take one lock, so a batch is computed with one weight version, returned with it;
`expected_version` makes a server on another version refuse the work (409).

Accepted: request fields the engine can take (server_requests) and weights that are exactly
the model's Tunix parameters, shapes and dtype, finite and sane (weights_check); a chunk is
stored only once its CRC32 matches, and commit checks them all again (weights_wire). If the
engine's scheduler thread dies, /health says so (503) and the process exits with status 3 at
once, so whoever launched it restarts it. Who may call, body bounds, one-line JSON errors:
server_guard (loopback bind by default; beyond it a token is required).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.requests import Request

from tunix_sglang import faults
from tunix_sglang import protocol as api
from tunix_sglang.errors import UserError
from tunix_sglang.protocol import ENGINE_DIED_EXIT, READY_PREFIX, TOKEN_ENV
from tunix_sglang.server_guard import (
    Guard,
    check_bind,
    check_token,
    install_error_handlers,
    one_line,
)
from tunix_sglang.server_liveness import EngineLiveness
from tunix_sglang.server_requests import (
    BeginUpload,
    GenerateRequest,
    GenerateResponse,
    Limits,
    LoadRequest,
    ProbeRequest,
    check_generate,
    check_prompts,
    http_error,
)
from tunix_sglang.weights_check import ParamSpec, WeightsRejected, load_weights
from tunix_sglang.weights_wire import (
    MAX_CHUNK_BYTES,
    IncompleteUpload,
    UnknownUpload,
    UploadStore,
    UploadTooLarge,
    WireError,
    parse_manifest,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 8 << 30
DEFAULT_MAX_REQUEST_BYTES = 32 << 20
DEFAULT_UPLOAD_IDLE_SECONDS = 120.0
MAX_CHUNKS_IN_FLIGHT = 4


def _tune_malloc() -> None:
    """glibc: stop returning big buffers to the OS after each request.

    Uploads allocate many large transient buffers (HTTP parsing); with glibc's defaults each
    is a fresh mmap whose pages fault in on first touch, costing about as much as the copy.
    """
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 31)


# ---------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------


class ServerState:
    """The engine, its weight version, the upload in progress, and the engine's liveness."""

    def __init__(
        self,
        engine: Any,
        *,
        spec: ParamSpec,
        model_path: str,
        token: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_prompts_per_request: int | None = None,
        weights_root: str | None = None,
        upload_idle_seconds: float = DEFAULT_UPLOAD_IDLE_SECONDS,
    ):
        self.engine = engine
        self.settings = s = engine.settings
        self.spec = spec
        self.limits = Limits(int(spec.hf_config["vocab_size"]), s.max_prompt_len,
                             s.max_new_tokens, max_prompts_per_request or 16 * s.batch_size)
        self.model_path = model_path
        self.token = token or None
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_request_bytes = int(max_request_bytes)
        self.weights_root = Path(os.path.realpath(weights_root)) if weights_root else None
        self.uploads = UploadStore(upload_idle_seconds)
        self.version = 0
        self.digest: str | None = None  # manifest digest of the weights last pushed
        self.paused = False
        self.liveness = EngineLiveness(engine)
        self.counters = {"generate_requests": 0, "samples": 0, "pushes": 0}
        self.last_apply: dict[str, Any] | None = None
        self._engine_lock = threading.Lock()  # one version per batch; applies between batches
        self._chunk_slots = threading.BoundedSemaphore(MAX_CHUNKS_IN_FLIGHT)

    def _require_engine(self) -> None:
        if self.liveness.dead:
            raise http_error(503, f"the engine died ({self.liveness.dead}); this server is exiting")

    def _engine_failed(self, e: BaseException) -> HTTPException:
        reason = self.liveness.check()
        if reason:
            return http_error(503, f"the engine died ({reason}); this server is exiting")
        logger.error("engine call failed", exc_info=e)
        return http_error(500, f"engine error: {(str(e).strip().splitlines() or [''])[0]}")

    # -- generation -----------------------------------------------------------------------
    def generate(self, req: GenerateRequest) -> dict[str, Any]:
        check_generate(req, self.limits)
        if self.paused:
            raise http_error(503, "server is paused (POST /resume)")
        t0 = time.perf_counter()
        with self._engine_lock:
            self._require_engine()
            self._expect(req.expected_version)
            version = self.version
            self.liveness.before_generate()
            samples = []
            bs = self.settings.batch_size
            try:
                for i in range(0, len(req.prompts), bs):  # at most one engine batch per call
                    samples += self.engine.generate(
                        req.prompts[i:i + bs], max_new_tokens=req.max_new_tokens,
                        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        seed=req.seed if i == 0 else None, stop_token_ids=req.stop_token_ids,
                        ignore_eos=req.ignore_eos,
                    )
            except UserError as e:
                raise http_error(422, str(e)) from None
            except Exception as e:
                raise self._engine_failed(e) from None
        if not all(np.isfinite(x.logprobs).all() for x in samples):
            raise http_error(500, f"the served weights (version {version}) give non-finite "
                        "logprobs; push finite weights of a sane magnitude")
        self.counters["generate_requests"] += 1
        self.counters["samples"] += len(samples)
        return {
            "weight_version": version,
            "seconds": time.perf_counter() - t0,
            "samples": [
                {"tokens": x.tokens.tolist(), "logprobs": x.logprobs.tolist(),
                 "finish_reason": x.finish_reason}
                for x in samples
            ],
        }

    def _expect(self, expected: int | None) -> None:
        if expected is not None and expected != self.version:
            raise http_error(409, f"weight version is {self.version}, request expects {expected}")

    # -- weights --------------------------------------------------------------------------
    def _check_version(self, version: int, digest: str | None = None) -> None:
        if self.last_apply is None and version == self.version:
            return  # the start weights were never pushed: the first push may take their version
        if version < self.version or (version == self.version
                                      and (digest is None or digest != self.digest)):
            raise http_error(409, f"weight version {version} is not newer than the server's "
                        f"{self.version} (versions increase; the same version only with the "
                        "same weights)")

    def begin_upload(self, manifest: Any, version: int) -> dict[str, Any]:
        m = parse_manifest(manifest, self.max_upload_bytes)
        self.spec.check_manifest(m)
        self._check_version(version, m.digest)
        up = self.uploads.begin(m, version, uuid.uuid4().hex)
        return {"upload_id": up.upload_id, "num_chunks": m.num_chunks,
                "chunk_bytes": m.chunk_bytes, "total_bytes": m.total_bytes}

    async def receive_chunk(self, upload_id: str, index: int,
                            stream: AsyncIterator[bytes]) -> dict[str, Any]:
        """Read chunk `index` into scratch; it is stored only if its length and CRC match."""
        up = self.uploads.get(upload_id)
        size = up.chunk_size(index)
        if not self._chunk_slots.acquire(blocking=False):
            raise http_error(429, f"more than {MAX_CHUNKS_IN_FLIGHT} chunks in flight; send fewer "
                        "at once")
        try:
            # Scratch of the chunk's size (heap memory _tune_malloc keeps for the next one).
            scratch = memoryview(bytearray(size))
            n, crc = 0, 0
            async for part in stream:
                if n + len(part) > size:
                    up.reject(index)
                    raise UploadTooLarge(f"chunk {index} is longer than {size} bytes")
                scratch[n:n + len(part)] = part
                crc = zlib.crc32(part, crc)
                n += len(part)
                up.touched = time.monotonic()  # idle means nothing arrives, not a slow chunk
            up.put_chunk(index, scratch[:n], crc)
        finally:
            self._chunk_slots.release()
        return {"index": index, "bytes": n, "remaining": len(up.missing())}

    def commit_upload(self, upload_id: str) -> dict[str, Any]:
        up = self.uploads.take(upload_id)
        up.seal()  # every chunk's CRC again, over the buffer about to be applied
        arrays = up.arrays()
        self.spec.check_values(arrays)
        return self.apply(arrays, up.version, up.manifest.total_bytes, "push",
                          up.manifest.digest)

    def apply(self, arrays: Any, version: int, nbytes: int, source: str,
              digest: str | None = None) -> dict[str, Any]:
        """Apply checked weights as `version` (atomic: all or nothing). The answer carries the
        engine's own fingerprints of what it then holds (the controller checks them)."""
        from tunix_sglang.engine import IncompleteSyncError

        t0 = time.perf_counter()
        with self._engine_lock:
            self._require_engine()
            if version == self.version and digest is not None and digest == self.digest:
                return {**(self.last_apply or {}), "unchanged": True, **self._report()}
            self._check_version(version, digest)
            try:
                if not faults.injected("stale_server", version):
                    self.engine.sync_from_tunix(arrays, version)
            except IncompleteSyncError as e:
                raise http_error(422, f"weights rejected, nothing changed: {e}") from None
            except Exception as e:
                raise self._engine_failed(e) from None
            self.version, self.digest = int(version), digest
            report = self._report()
        self.counters["pushes"] += 1
        self.last_apply = {"weight_version": self.version, "apply_seconds":
                           time.perf_counter() - t0, "bytes": int(nbytes), "source": source}
        return {**self.last_apply, **report}

    def _report(self, prompts: list[list[int]] | None = None) -> dict[str, Any]:
        from tunix_sglang import probe  # the engine's side of the proof; under the engine lock

        try:
            return probe.engine_json(self.engine, prompts)
        except Exception as e:
            raise self._engine_failed(e) from None

    def probe(self, req: ProbeRequest) -> dict[str, Any]:
        """POST /probe: fingerprints of the buffers the forward reads, next-token logits."""
        check_prompts(req.prompts, self.limits)
        with self._engine_lock:
            self._require_engine()
            self._expect(req.expected_version)
            return {"weight_version": self.version, **self._report(req.prompts)}

    def load_path(self, path: str, version: int) -> dict[str, Any]:
        if self.weights_root is None:
            raise http_error(404, "POST /weights/load is off; start the server with "
                        "--weights-root DIR to load weights from files under DIR")
        self._check_version(version)
        flat, size = load_weights(self.weights_root, path, self.spec, self.settings.dtype)
        return self.apply(flat, version, size, "load")

    def flush(self) -> None:
        with self._engine_lock:
            self._require_engine()
            try:
                self.engine.flush()
            except Exception as e:
                raise self._engine_failed(e) from None

    def health(self) -> tuple[bool, dict[str, Any]]:
        reason = self.liveness.check()
        return not reason, {
            "status": f"engine died: {reason}; exiting" if reason else "ok",
            "weight_version": self.version, "paused": self.paused,
            "uploading": self.uploads.active, "pid": os.getpid()}

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model_path": self.model_path, "vocab_size": self.limits.vocab_size,
            "max_prompt_len": s.max_prompt_len, "max_new_tokens": s.max_new_tokens,
            "max_batch": s.batch_size, "dtype": s.dtype, "weight_version": self.version,
            "max_upload_bytes": self.max_upload_bytes,
            "max_request_bytes": self.max_request_bytes,
            "max_prompts_per_request": self.limits.max_prompts,
            "token_required": bool(self.token), "weights_load": self.weights_root is not None,
            "upload_idle_seconds": self.uploads.idle_seconds, "pid": os.getpid(),
            "counters": dict(self.counters), "last_apply": self.last_apply,
        }


# ---------------------------------------------------------------------------------------
# HTTP app
# ---------------------------------------------------------------------------------------


def _status_handler(code: int, prefix: str):
    async def handler(_request, exc: Exception):
        return JSONResponse({"detail": one_line(prefix + str(exc))}, code)

    return handler


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app around one ServerState."""
    app = FastAPI(title="tunix-sglang rollout server", version="1",
                  description=__doc__.split("\n\n")[0])
    install_error_handlers(app)
    for exc_type, code, prefix in (
            (UnknownUpload, 404, ""), (IncompleteUpload, 409, ""), (UploadTooLarge, 413, ""),
            (WireError, 422, ""), (WeightsRejected, 422, "weights rejected, nothing changed: ")):
        app.add_exception_handler(exc_type, _status_handler(code, prefix))

    @app.get(api.HEALTH)
    def health():
        ok, body = state.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get(api.VERSION)
    def version() -> dict[str, int]:
        return {"weight_version": state.version}

    @app.get(api.INFO)
    def info() -> dict[str, Any]:
        return state.info()

    @app.post(api.GENERATE, response_model=GenerateResponse)
    def generate(req: GenerateRequest):
        return state.generate(req)

    @app.post(api.PROBE)
    def probe(req: ProbeRequest) -> dict[str, Any]:
        return state.probe(req)

    @app.post(api.UPLOADS)
    def begin(req: BeginUpload) -> dict[str, Any]:
        return state.begin_upload(req.manifest, req.version)

    @app.put(api.UPLOAD_CHUNK)
    async def put_chunk(upload_id: str, index: int, request: Request) -> dict[str, Any]:
        return await state.receive_chunk(upload_id, index, request.stream())

    @app.post(api.UPLOAD_COMMIT)
    def commit(upload_id: str) -> dict[str, Any]:
        return state.commit_upload(upload_id)

    @app.delete(api.UPLOAD)
    def abort(upload_id: str) -> dict[str, str]:
        state.uploads.abort(upload_id)
        return {"status": "aborted"}

    @app.post(api.WEIGHTS_LOAD)
    def load(req: LoadRequest) -> dict[str, Any]:
        return state.load_path(req.path, req.version)

    @app.post(api.PAUSE)
    def pause() -> dict[str, bool]:
        state.paused = True
        return {"paused": True}

    @app.post(api.RESUME)
    def resume() -> dict[str, bool]:
        state.paused = False
        return {"paused": False}

    @app.post(api.FLUSH)
    def flush() -> dict[str, str]:
        state.flush()
        return {"status": "flushed"}

    app.add_middleware(Guard, token=state.token, max_request_bytes=state.max_request_bytes,
                       max_chunk_bytes=MAX_CHUNK_BYTES)
    return app


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """`tunix-sglang serve` (also `python -m tunix_sglang.server`)."""
    p = sub.add_parser("serve", help="run one sglang-jax rollout server (HTTP, weight pushes)")
    _add_serve_args(p)
    return p


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; others need --token)")
    p.add_argument("--port", type=int, default=0, help="0: a free port (printed on READY)")
    p.add_argument("--local-model-dir", default=None,
                   help="Hugging Face model dir (default: --model, else the embedded tiny Qwen3)")
    p.add_argument("--model", default=None,
                   help="Hugging Face model id (ORG/NAME), fetched into the Hugging Face cache "
                   "when the hub is reachable, the cached copy otherwise")
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=8, help="engine batch size")
    p.add_argument("--sglang-mem-fraction-static", type=float, default=0.8)
    p.add_argument("--token", default=None,
                   help=f"shared token for generate/weights/control (or ${TOKEN_ENV}); at "
                        "least 16 printable ASCII characters")
    p.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES)
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument("--upload-idle-seconds", type=float, default=DEFAULT_UPLOAD_IDLE_SECONDS,
                   help="drop an upload that received nothing for this long")
    p.add_argument("--weights-root", default=None,
                   help="POST /weights/load reads only files and model dirs under this "
                        "directory (default: the route is off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--init-weights", default="model", choices=("model", "dummy"),
                   help="version 0 weights: the model dir's, or random until the first push")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process is gone (set by the controller's launcher)")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"serve: cannot bind {host}:{port} ({e.strerror}); check --host, or pick another "
            "--port"
        ) from None
    # No listen() yet: the port is reserved, but clients get "connection refused" (not a
    # hang) until uvicorn serves it (asyncio's create_server calls listen()).
    return sock


def _watch_parent(pid: int, server) -> None:
    def run():
        while not server.should_exit:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                logger.warning("parent process %d is gone; stopping", pid)
                server.should_exit = True
                return
            except PermissionError:
                pass
            time.sleep(1.0)

    threading.Thread(target=run, name="parent-watch", daemon=True).start()


def serve_main(args: argparse.Namespace) -> int:
    """Start the engine, bind, serve until stopped; prints `READY http://HOST:PORT`."""
    try:
        return _serve(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def _serve(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is not None:
        check_token(token, "serve")
    check_bind(args.host, token)  # before anything heavy
    for name in ("max_prompt_length", "max_new_tokens", "max_batch", "max_upload_bytes",
                 "max_request_bytes", "upload_idle_seconds"):
        if not getattr(args, name) > 0:
            raise UserError(f"serve --{name.replace('_', '-')} must be > 0")
    if not 0 <= args.port <= 65535:  # socket.bind raises OverflowError (a traceback)
        raise UserError(f"serve --port {args.port}: use 0..65535 (0: a free port)")
    if args.weights_root is not None and not Path(args.weights_root).is_dir():
        raise UserError(f"serve --weights-root {args.weights_root}: not a directory")
    faults.active()  # a mistyped TUNIX_SGLANG_INJECT_FAULT fails here, not mid-run
    from tunix_sglang.topology import default_platform

    default_platform()
    from tunix_sglang import hub, models

    md = models.inspect_model_dir(hub.model_dir(args.local_model_dir, args.model))
    sock = _bind(args.host, args.port)  # the port is ours before the slow engine start
    port = sock.getsockname()[1]
    _tune_malloc()
    from tunix_sglang.engine import EngineSettings, InProcessEngine
    from tunix_sglang.tunix_cluster import default_compilation_cache

    default_compilation_cache()  # restarts skip most engine compiles
    settings = EngineSettings(
        model_path=str(md.path), max_prompt_len=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens, batch_size=args.max_batch,
        mem_fraction_static=args.sglang_mem_fraction_static, dtype=args.dtype, seed=args.seed,
        rollout_devices=1,
    )
    from tunix_sglang.weights_check import load_hf_dir, param_spec

    t0 = time.perf_counter()
    engine = InProcessEngine(settings).start()
    try:
        if args.init_weights == "model":
            engine.sync_from_tunix(load_hf_dir(md.path, args.dtype), version=0)
        state = ServerState(engine, spec=param_spec(engine, md, args.dtype),
                            model_path=str(md.path), token=token,
                            max_upload_bytes=args.max_upload_bytes,
                            max_request_bytes=args.max_request_bytes,
                            weights_root=args.weights_root,
                            upload_idle_seconds=args.upload_idle_seconds)
        return _run_uvicorn(state, sock, args, port, time.perf_counter() - t0)
    finally:
        engine.shutdown()


def _run_uvicorn(state: ServerState, sock: socket.socket, args, port: int,
                 start_s: float) -> int:
    import uvicorn

    app = create_app(state)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30,
                            limit_concurrency=256, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    state.liveness.on_death = lambda: setattr(server, "should_exit", True)
    state.liveness.watch(lambda: server.should_exit, also=state.uploads.sweep)
    host = args.host if ":" not in args.host else f"[{args.host}]"

    def announce():
        deadline = time.monotonic() + 60
        while not server.started and not server.should_exit and time.monotonic() < deadline:
            time.sleep(0.02)
        if server.started:
            print(f"{READY_PREFIX}http://{host}:{port} version={state.version} "
                  f"start_sec={start_s:.1f}", flush=True)

    threading.Thread(target=announce, name="ready", daemon=True).start()
    if args.parent_pid:
        _watch_parent(args.parent_pid, server)
    server.run(sockets=[sock])
    return ENGINE_DIED_EXIT if state.liveness.dead else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunix_sglang.server", description=__doc__)
    _add_serve_args(p)
    args = p.parse_args(argv)
    if not os.environ.get("TUNIX_SGLANG_VERBOSE"):
        logging.getLogger().setLevel(logging.WARNING)
        with contextlib.suppress(ImportError):
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.ERROR)
    return serve_main(args)


if __name__ == "__main__":
    sys.exit(main())
