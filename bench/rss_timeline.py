"""Resident memory of a command over time, marked with its console lines (not a test).

Runs the command, samples the RSS of its process tree every 0.25 s, and prints each console
line with the RSS at that moment and the peak since the previous line, so a run's memory can
be attributed to its phases (model load, engine start, eval, rollout, train step).

    JAX_PLATFORMS=cpu python bench/rss_timeline.py --json /tmp/rss.json -- \
        python -m tunix_sglang.cli train --local-model-dir DIR --steps 1 ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.perf_counter() - t0, tree_rss(ps)))
            time.sleep(0.25)

    threading.Thread(target=sample, daemon=True).start()
    lines, last = [], 0
    gb = 2**30
    for line in proc.stdout:
        now = time.perf_counter() - t0
        window = [r for t, r in samples[last:]] or [0]
        last = len(samples)
        rss = samples[-1][1] if samples else 0
        lines.append({"t": now, "rss": rss, "peak_since_prev": max(window),
                      "line": line.rstrip()[:200]})
        print(f"{now:7.1f}s rss {rss / gb:5.2f} GB peak {max(window) / gb:5.2f} GB | "
              f"{line.rstrip()[:150]}", flush=True)
    proc.wait()
    done.set()
    peak = max((r for _, r in samples), default=0)
    print(f"exit {proc.returncode}; peak RSS {peak / gb:.2f} GB; {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"cmd": cmd, "returncode": proc.returncode,
                                         "peak_rss": peak, "lines": lines,
                                         "samples": samples}, indent=1))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
