"""Multi-host rollout figures on one machine: host-local engines (2 processes x 2 CPU devices)
vs one process with the same 4 devices vs one lockstep engine over both processes;
weight-sync time into the host-local engines.

    .venv/bin/python bench/bench_multihost.py [--steps 6]   -> bench/results/multihost.json

Uses the same driver as tests/test_multihost_sglang.py (`runner.train` in each process, with
the run's --multihost-mode). Figures are medians over steps 3..N (steps 1-2
compile). CPU numbers say nothing about TPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_multihost_sglang import rows, run_cluster, train_cfg  # noqa: E402


def summarize(out: Path, skip: int = 2) -> dict[str, float]:
    m = rows(out / "metrics.jsonl")[skip:]
    res = {k: statistics.median(r[k] for r in m)
           for k in ("step_sec", "rollout_sec", "sync_sec", "train_sec")}
    stats = out / "multihost_rollout.process0.jsonl"
    if stats.exists():
        s = rows(stats)[skip:]
        res["generate_sec_per_host"] = statistics.median(max(r["host_generate_sec"]) for r in s)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    import os

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    model = None
    results: dict[str, object] = {"steps": args.steps, "shape": "batch 2 x 4 generations, "
                                  "16 new tokens, tiny Qwen3 (tied, default)"}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for name, n, k, mode in (("single_process_4_devices", 1, 4, "host_local"),
                                 ("host_local_2x2", 2, 2, "host_local"),
                                 ("lockstep_2x2", 2, 2, "lockstep")):
            d = t / name
            d.mkdir()
            cfg = train_cfg(d / "run", model or "", args.steps)
            cfg.pop("local_model_dir")
            cfg["num_generations"] = 4
            codes, logs, secs = run_cluster(d, env, cfg, mode, n=n, k=k, timeout=900)
            if any(codes):
                print(logs[0][-3000:], file=sys.stderr)
                return 1
            results[name] = {**summarize(d / "run"), "wall_sec": secs}
            print(name, results[name], flush=True)
    out = REPO / "bench" / "results" / "multihost.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
