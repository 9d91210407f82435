"""`tunix-sglang serve`: one sglang-jax rollout engine behind an HTTP API.

sglang-jax 0.0.2's own HTTP server has no weight-update route (and no batched token-id
generate); this server hosts the same `InProcessEngine` (and compat fixes) the in-process
rollout uses, and adds what a single controller needs:

  POST /generate                       token ids in; tokens, logprobs, finish reasons out
  POST /weights/uploads                begin a push (manifest: tensors, chunk CRC32s, version)
  PUT  /weights/uploads/{id}/chunks/{i} raw bytes of chunk i (checked against its CRC32)
  POST /weights/uploads/{id}/commit    apply the complete set atomically -> new version
  DELETE /weights/uploads/{id}         drop an upload
  POST /weights/load                   apply a Tunix-named .safetensors file or an HF model dir
  GET  /version, /health, /info        state (no token needed)
  POST /pause, /resume, /flush         control
  GET  /openapi.json, /docs            the schema

Weights start as the model directory's (`--init-weights model`, the default) or random
(`--init-weights dummy`), at version 0. Versions are set by the pusher (the controller's
step count); a push older than the current version is refused (409).

Generation and weight application take one lock, so a batch is computed entirely with one
weight version, which is returned with it. `expected_version` in a generate request makes a
server on another version refuse the work (409) instead of producing off-policy samples.

Security: binds 127.0.0.1 by default; a non-loopback --host needs --token (or
TUNIX_SGLANG_SERVER_TOKEN). With a token set, every route that computes or changes state
(generate, weights, pause/resume/flush) needs `Authorization: Bearer TOKEN`. Request bodies
are bounded (chunks by the chunk size, uploads by --max-upload-bytes, others by 32 MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tunix_sglang.errors import UserError
from tunix_sglang.weights_wire import WireError

logger = logging.getLogger(__name__)

TOKEN_ENV = "TUNIX_SGLANG_SERVER_TOKEN"
DEFAULT_MAX_UPLOAD_BYTES = 8 << 30
DEFAULT_MAX_REQUEST_BYTES = 32 << 20
READY_PREFIX = "READY "


# ---------------------------------------------------------------------------------------
# Pure checks (no engine)
# ---------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: assume it may resolve beyond loopback


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a shared token (UserError)."""
    if not is_loopback(host) and not token:
        raise UserError(
            f"serve --host {host}: listening beyond loopback needs a shared token; pass "
            f"--token or set {TOKEN_ENV} (or use --host 127.0.0.1)"
        )


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
    """The engine, its weight version and the upload in progress."""

    def __init__(
        self,
        engine: Any,
        *,
        vocab_size: int,
        model_path: str,
        token: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_prompts_per_request: int | None = None,
    ):
        self.engine = engine
        self.settings = engine.settings
        self.vocab_size = int(vocab_size)
        self.model_path = model_path
        self.token = token or None
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_request_bytes = int(max_request_bytes)
        self.max_prompts = max_prompts_per_request or 16 * self.settings.batch_size
        self.version = 0
        self.paused = False
        self.started_at = time.time()
        self.counters = {"generate_requests": 0, "samples": 0, "pushes": 0}
        self.last_apply: dict[str, Any] | None = None
        self._engine_lock = threading.Lock()  # one version per batch; applies between batches
        self._upload_lock = threading.Lock()
        self._upload = None  # weights_wire.Receiver

    # -- generation -----------------------------------------------------------------------
    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        from tunix_sglang.engine import EngineError

        s = self.settings
        prompts = req["prompts"]
        if len(prompts) > self.max_prompts:
            raise _http(413, f"{len(prompts)} prompts in one request; at most {self.max_prompts}")
        if req["max_new_tokens"] > s.max_new_tokens:
            raise _http(422, f"max_new_tokens {req['max_new_tokens']} > this server's "
                        f"--max-new-tokens {s.max_new_tokens}")
        for i, p in enumerate(prompts):
            if not 1 <= len(p) <= s.max_prompt_len:
                raise _http(422, f"prompt {i} has {len(p)} tokens; allowed 1..{s.max_prompt_len}"
                            " (--max-prompt-length)")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise _http(422, f"prompt {i} has token ids outside 0..{self.vocab_size - 1}")
        stop = req.get("stop_token_ids") or None
        if stop and (min(stop) < 0 or max(stop) >= self.vocab_size):
            raise _http(422, f"stop_token_ids outside 0..{self.vocab_size - 1}")
        if self.paused:
            raise _http(503, "server is paused (POST /resume)")
        expected = req.get("expected_version")
        t0 = time.perf_counter()
        with self._engine_lock:
            if expected is not None and expected != self.version:
                raise _http(409, f"weight version is {self.version}, request expects {expected}")
            version = self.version
            samples = []
            seed = req.get("seed")
            bs = s.batch_size
            try:
                for i in range(0, len(prompts), bs):  # at most one engine batch per call
                    samples += self.engine.generate(
                        prompts[i:i + bs], max_new_tokens=req["max_new_tokens"],
                        temperature=req["temperature"], top_p=req["top_p"], top_k=req["top_k"],
                        seed=seed if i == 0 else None, stop_token_ids=stop,
                        ignore_eos=req["ignore_eos"],
                    )
            except UserError as e:
                raise _http(422, str(e)) from None
            except EngineError as e:
                raise _http(500, f"engine error: {e}") from None
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

    # -- weights --------------------------------------------------------------------------
    def _check_version(self, version: int) -> None:
        if version < self.version:
            raise _http(409, f"push of version {version} is older than the current "
                        f"{self.version}")

    def begin_upload(self, manifest: Any, version: int) -> dict[str, Any]:
        from tunix_sglang.weights_wire import Receiver, WireError, parse_manifest

        self._check_version(version)
        try:
            m = parse_manifest(manifest, self.max_upload_bytes)
        except WireError as e:
            code = 413 if "exceeds" in str(e) else 422
            raise _http(code, f"bad manifest: {e}") from None
        with self._upload_lock:
            # One upload at a time; a new one replaces a stale one (a retried push after a
            # controller crash must not be blocked by its own abandoned upload).
            self._upload = Receiver(m, version, uuid.uuid4().hex)
            up = self._upload
        return {"upload_id": up.upload_id, "num_chunks": m.num_chunks,
                "chunk_bytes": m.chunk_bytes, "total_bytes": m.total_bytes}

    def upload(self, upload_id: str):
        up = self._upload
        if up is None or up.upload_id != upload_id:
            raise _http(404, f"no upload {upload_id!r} in progress (replaced or committed?)")
        return up

    def abort_upload(self, upload_id: str) -> None:
        with self._upload_lock:
            self.upload(upload_id)
            self._upload = None

    def commit_upload(self, upload_id: str) -> dict[str, Any]:
        from tunix_sglang.weights_wire import WireError

        with self._upload_lock:
            up = self.upload(upload_id)
            try:
                arrays = up.arrays()
            except WireError as e:
                raise _http(409, str(e)) from None
            self._upload = None
        return self.apply(arrays, up.version, up.manifest.total_bytes, "push")

    def apply(self, arrays: Any, version: int, nbytes: int, source: str) -> dict[str, Any]:
        from tunix_sglang.engine import IncompleteSyncError

        t0 = time.perf_counter()
        with self._engine_lock:
            self._check_version(version)
            try:
                self.engine.sync_from_tunix(arrays)
            except IncompleteSyncError as e:
                raise _http(422, f"weights rejected, nothing changed: {e}") from None
            self.version = int(version)
        self.counters["pushes"] += 1
        self.last_apply = {"weight_version": self.version, "apply_seconds":
                           time.perf_counter() - t0, "bytes": int(nbytes), "source": source}
        return self.last_apply

    def load_path(self, path: str, version: int) -> dict[str, Any]:
        p = Path(path)
        if p.is_dir():
            try:
                model = _load_hf_dir(p, self.settings.dtype)
            except UserError as e:
                raise _http(422, str(e)) from None
            return self.apply(model, version, 0, f"dir:{p}")
        if p.is_file() and p.suffix == ".safetensors":
            from tunix_sglang.weights_wire import load_tunix_safetensors

            if p.stat().st_size > self.max_upload_bytes:
                raise _http(413, f"{p} is larger than --max-upload-bytes")
            try:
                arrays = load_tunix_safetensors(p)
            except Exception as e:  # safetensors raises several types for bad files
                raise _http(422, f"cannot read {p}: {e}") from None
            return self.apply(arrays, version, p.stat().st_size, f"file:{p}")
        raise _http(422, f"{path}: not a .safetensors file (Tunix names) or a model directory")

    def flush(self) -> None:
        with self._engine_lock:
            self.engine.flush()

    def health(self) -> tuple[bool, dict[str, Any]]:
        ok, detail = True, "ok"
        try:
            self.engine._check_alive()  # noqa: SLF001 (the engine's own liveness check)
        except Exception as e:
            ok, detail = False, str(e).splitlines()[0]
        return ok, {"status": detail, "weight_version": self.version, "paused": self.paused,
                    "uploading": self._upload is not None, "pid": os.getpid()}

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "model_path": self.model_path, "vocab_size": self.vocab_size,
            "max_prompt_len": s.max_prompt_len, "max_new_tokens": s.max_new_tokens,
            "max_batch": s.batch_size, "dtype": s.dtype, "weight_version": self.version,
            "max_upload_bytes": self.max_upload_bytes,
            "max_request_bytes": self.max_request_bytes,
            "max_prompts_per_request": self.max_prompts, "token_required": bool(self.token),
            "pid": os.getpid(), "counters": dict(self.counters), "last_apply": self.last_apply,
        }


def _http(code: int, detail: str) -> HTTPException:
    return HTTPException(status_code=code, detail=detail)


def _load_hf_dir(path: Path, dtype: str):
    """A Hugging Face model directory as a Tunix model on one local device."""
    import jax
    import numpy as np

    from tunix_sglang import models

    md = models.inspect_model_dir(path)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return models.load_model(md, mesh, dtype)


# ---------------------------------------------------------------------------------------
# HTTP app
# ---------------------------------------------------------------------------------------


class _BodyLimit:
    """ASGI middleware: refuse bodies over the route's limit before anything reads them."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            from tunix_sglang.weights_wire import MAX_CHUNK_BYTES

            headers = dict(scope["headers"])
            limit = (MAX_CHUNK_BYTES if scope["path"].startswith("/weights/uploads/")
                     and "/chunks/" in scope["path"] else self.state.max_request_bytes)
            length = headers.get(b"content-length")
            error = None
            if length is None:
                if headers.get(b"transfer-encoding"):
                    error = (411, "Content-Length is required")
            elif not length.isdigit():
                error = (400, "bad Content-Length")
            elif int(length) > limit:
                error = (413, f"request body of {int(length)} bytes exceeds the limit of {limit}")
            if error:
                body = json.dumps({"detail": error[1]}).encode()
                await send({"type": "http.response.start", "status": error[0],
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[list[int]] = Field(min_length=1, description="token ids, one list each")
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0.0, le=1e4, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**31, description="restart sampling stream")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    expected_version: int | None = Field(None, description="409 unless the server has it")

class SampleOut(BaseModel):
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str

class GenerateResponse(BaseModel):
    weight_version: int
    seconds: float
    samples: list[SampleOut]

class BeginUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0)
    manifest: dict[str, Any]

class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    version: int = Field(ge=0)



def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app around one ServerState."""
    def require_token(request: Request) -> None:
        if not state.token:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ")
                and hmac.compare_digest(got[7:].encode(), state.token.encode())):
            raise HTTPException(401, "missing or wrong token (Authorization: Bearer TOKEN)")

    auth = [Depends(require_token)]
    app = FastAPI(title="tunix-sglang rollout server", version="1",
                  description=__doc__.split("\n\n")[0])

    @app.exception_handler(WireError)
    async def _wire_error(_request, exc: WireError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/health")
    def health():
        ok, body = state.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/version")
    def version() -> dict[str, int]:
        return {"weight_version": state.version}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return state.info()

    @app.post("/generate", dependencies=auth, response_model=GenerateResponse)
    def generate(req: GenerateRequest):
        return state.generate(req.model_dump())

    @app.post("/weights/uploads", dependencies=auth)
    def begin(req: BeginUpload) -> dict[str, Any]:
        return state.begin_upload(req.manifest, req.version)

    @app.put("/weights/uploads/{upload_id}/chunks/{index}", dependencies=auth)
    async def put_chunk(upload_id: str, index: int, request: Request) -> dict[str, Any]:
        up = state.upload(upload_id)
        view = up.chunk_view(index)
        n, crc, cap = 0, 0, len(view)
        async for part in request.stream():
            k = len(part)
            if n + k > cap:
                raise HTTPException(413, f"chunk {index} is longer than {cap} bytes")
            view[n:n + k] = part
            crc = zlib.crc32(part, crc)
            n += k
        try:
            up.finish_chunk(index, n, crc)
        except WireError as e:
            raise HTTPException(422, str(e)) from None
        return {"index": index, "bytes": n, "remaining": len(up.missing())}

    @app.post("/weights/uploads/{upload_id}/commit", dependencies=auth)
    def commit(upload_id: str) -> dict[str, Any]:
        return state.commit_upload(upload_id)

    @app.delete("/weights/uploads/{upload_id}", dependencies=auth)
    def abort(upload_id: str) -> dict[str, str]:
        state.abort_upload(upload_id)
        return {"status": "aborted"}

    @app.post("/weights/load", dependencies=auth)
    def load(req: LoadRequest) -> dict[str, Any]:
        return state.load_path(req.path, req.version)

    @app.post("/pause", dependencies=auth)
    def pause() -> dict[str, bool]:
        state.paused = True
        return {"paused": True}

    @app.post("/resume", dependencies=auth)
    def resume() -> dict[str, bool]:
        state.paused = False
        return {"paused": False}

    @app.post("/flush", dependencies=auth)
    def flush() -> dict[str, str]:
        state.flush()
        return {"status": "flushed"}

    app.add_middleware(_BodyLimit, state=state)
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
                   help=f"shared token for generate/weights/control (or ${TOKEN_ENV})")
    p.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES)
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
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
            f"serve: cannot bind {host}:{port} ({e.strerror}); pick another --port"
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
    check_bind(args.host, token)  # before anything heavy
    for name in ("max_prompt_length", "max_new_tokens", "max_batch", "max_upload_bytes",
                 "max_request_bytes"):
        if getattr(args, name) < 1:
            raise UserError(f"serve --{name.replace('_', '-')} must be >= 1")
    from tunix_sglang.cluster import default_platform

    default_platform()
    from tunix_sglang import hub, models

    md = models.inspect_model_dir(hub.model_dir(args.local_model_dir, args.model))
    sock = _bind(args.host, args.port)  # the port is ours before the slow engine start
    port = sock.getsockname()[1]
    _tune_malloc()
    from tunix_sglang.engine import EngineSettings, InProcessEngine
    from tunix_sglang.runner import default_compilation_cache

    default_compilation_cache()  # restarts skip most engine compiles
    settings = EngineSettings(
        model_path=str(md.path), max_prompt_len=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens, batch_size=args.max_batch,
        mem_fraction_static=args.sglang_mem_fraction_static, dtype=args.dtype, seed=args.seed,
        rollout_devices=1,
    )
    t0 = time.perf_counter()
    engine = InProcessEngine(settings).start()
    try:
        if args.init_weights == "model":
            engine.sync_from_tunix(_load_hf_dir(md.path, args.dtype))
        state = ServerState(engine, vocab_size=int(md.hf_config["vocab_size"]),
                            model_path=str(md.path), token=token,
                            max_upload_bytes=args.max_upload_bytes,
                            max_request_bytes=args.max_request_bytes)
        return _run_uvicorn(state, sock, args, port, time.perf_counter() - t0)
    finally:
        engine.shutdown()


def _run_uvicorn(state: ServerState, sock: socket.socket, args, port: int, start_s: float):
    import uvicorn

    app = create_app(state)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30,
                            limit_concurrency=256)
    server = uvicorn.Server(config)
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
    return 0


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
