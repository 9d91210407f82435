"""`tunix-sglang launch`: a simulated multi-host cluster on this machine.

Starts N processes on 127.0.0.1 that form one JAX cluster (`jax.distributed`, CPU
collectives, K devices each), prefixes each one's output with `[pI]`, and when one fails
stops the others by PID with SIGKILL (JAX ignores SIGTERM) and returns non-zero.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tunix_sglang.errors import UserError
from tunix_sglang.topology import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def add_launch_parser(sub) -> None:
    p = sub.add_parser("launch", help="run a command on N local processes forming one JAX cluster")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=float, default=0, help="kill all after SEC (0: no limit)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- tunix-sglang subcommand and flags")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()


def process_env(base: dict[str, str], i: int, n: int, k: int, port: int) -> dict[str, str]:
    env = dict(base)
    env.setdefault("JAX_PLATFORMS", "cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={k}"])
    env[ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[ENV_NUM_PROCESSES] = str(n)
    env[ENV_PROCESS_ID] = str(i)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def prebuild_embedded_model(rest: list[str]) -> None:
    """Build the embedded model's warm start once, before the cluster starts.

    Every process would otherwise find the cache empty and run the same warm start at once.
    Skipped when the command names its own model (or a config file that may).
    """
    if rest[0] not in ("train", "eval", "serve") or any(
        a.startswith(("--local-model-dir", "--model", "--config")) for a in rest
    ):
        return
    code = "from tunix_sglang.warmstart import embedded_model_dir; embedded_model_dir()"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if subprocess.run([sys.executable, "-c", code], env=env).returncode:
        raise UserError("launch: building the embedded model failed (see above); "
                        "or pass --local-model-dir")


def launch(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise UserError("launch: give the command after --, e.g. launch ... -- train --steps 5")
    if args.num_processes < 1 or args.devices_per_process < 1:
        raise UserError("launch: --num-processes and --devices-per-process must be >= 1")
    prebuild_embedded_model(rest)
    port = args.port or free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps = []
    for i in range(args.num_processes):
        p = subprocess.Popen(
            [sys.executable, "-m", "tunix_sglang.cli", *rest],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=process_env(dict(os.environ), i, args.num_processes,
                            args.devices_per_process, port),
        )
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", lock), daemon=True)
        t.start()
        pumps.append(t)

    deadline = time.monotonic() + args.timeout if args.timeout else None
    code = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(f"launch: process {i} exited with {code}; stopping the others",
                      file=sys.stderr, flush=True)
                break
            if all(c == 0 for c in codes):
                break
            if deadline and time.monotonic() > deadline:
                print(f"launch: --timeout {args.timeout:g}s reached; stopping all",
                      file=sys.stderr, flush=True)
                code = 124
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    return code
