"""Rollout servers launched by the controller: `python -m tunix_sglang.server` subprocesses.

On 127.0.0.1, the controller's process as their parent (`--parent-pid`: they exit when it
is gone), each announcing its URL on a READY line; stopped by PID (SIGTERM, then SIGKILL
after a grace period), never by name. A relaunch keeps the port, so the URL stays; one after
an engine death (the server exits with status 3 to ask for it) is marked `restarting`, so a
controller with no other server waits for it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from tunix_sglang import faults
from tunix_sglang.errors import UserError
from tunix_sglang.protocol import ENGINE_DIED_EXIT, READY_PREFIX, TOKEN_ENV

# A server whose engine died exits after its graceful shutdown (5 s) and the engine's.
ENGINE_EXIT_WAIT = 30.0


class LaunchedServer:
    """A `python -m tunix_sglang.server` subprocess; its READY line gives the URL."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None):
        self.args = list(args)
        self.env = dict(env if env is not None else os.environ)
        self.url: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.restarting = False  # relaunched after an engine death, not READY yet
        self.start()

    def start(self, port: int | None = None) -> None:
        """(Re)start the process; `port` pins it (a relaunch keeps its URL)."""
        args = list(self.args)
        if port is not None:
            i = args.index("--port")
            args[i + 1] = str(port)
        if self.proc is not None:  # a relaunch: injected server faults struck already
            self.env = faults.for_server(self.env, armed=False)
        self._ready.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunix_sglang.server", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=self.env, start_new_session=True,  # a terminal ^C goes to the controller only
        )
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in iter(proc.stdout.readline, ""):
            line = line.rstrip("\n")
            self.tail.append(line[-400:])
            if line.startswith(READY_PREFIX) and proc is self.proc:
                self.url = line.split()[1]
                self._ready.set()

    def relaunch(self, port: int | None, exiting: bool = False) -> bool:
        """Start it again on `port` once its process is gone, waiting up to ENGINE_EXIT_WAIT
        s for one `exiting` on its own (an engine death); False while it still runs."""
        if exiting and self.alive():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(ENGINE_EXIT_WAIT)
        if self.alive():
            return False
        self.restarting = self.proc.returncode == ENGINE_DIED_EXIT
        self.start(port=port)
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.2):
                return self.url
            if not self.alive():
                break
        status = (f"exited with status {self.proc.poll()}" if not self.alive()
                  else f"not ready after {timeout:g}s")
        self.stop()
        tail = "\n".join(list(self.tail)[-15:])
        raise UserError(f"rollout server (pid {self.pid}) {status}:\n{tail}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (JAX may swallow SIGTERM). By PID."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def kill(self) -> None:
        """SIGKILL now (tests, and a controller that must not wait)."""
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)


def server_args(
    *,
    model_dir: Any,
    max_prompt_length: int,
    max_new_tokens: int,
    max_batch: int,
    port: int = 0,
    mem_fraction_static: float = 0.8,
    dtype: str = "float32",
    seed: int = 0,
    init_weights: str = "model",
    extra: Sequence[str] = (),
) -> list[str]:
    """Flags for one `tunix_sglang.server` (127.0.0.1; this process is its parent)."""
    return [
        "--host", "127.0.0.1", "--port", str(port),
        "--local-model-dir", str(getattr(model_dir, "path", model_dir)),
        "--max-prompt-length", str(max_prompt_length), "--max-new-tokens", str(max_new_tokens),
        "--max-batch", str(max_batch), "--sglang-mem-fraction-static", str(mem_fraction_static),
        "--dtype", dtype, "--seed", str(seed), "--init-weights", init_weights,
        "--parent-pid", str(os.getpid()), *extra,
    ]


def await_restarts(servers: Sequence[LaunchedServer | None], timeout: float) -> bool:
    """Wait for the servers relaunched after an engine death to be READY; True if any is
    (one that fails to start is stopped by wait_ready and stays down)."""
    back = False
    for p in servers:
        if p is not None and p.restarting:
            p.restarting = False
            with contextlib.suppress(UserError):
                back = bool(p.wait_ready(timeout)) or back
    return back


def launch_servers(
    k: int, *, token: str | None = None, ready_timeout: float = 300.0, **kw: Any
) -> list[LaunchedServer]:
    """Start K local servers at once and wait until every one printed READY."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    if token:
        env[TOKEN_ENV] = token  # not on the command line (visible in ps)
    seed = int(kw.pop("seed", 0))
    procs = [LaunchedServer(server_args(seed=seed + i, **kw), faults.for_server(env, i == 0))
             for i in range(k)]
    try:
        for p in procs:
            p.wait_ready(ready_timeout)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs
