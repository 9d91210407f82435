"""Async rollouts benchmark (not a test): --max-staleness K = 0, 1, 2, with the engine on its
own device (2 host devices, --rollout-devices 1) and with 2 remote rollout servers.

Same model (the embedded default), data, seed and step count for every run, all in one
script run (so the machine's load is shared alike). From each run's metrics.jsonl, over
the steps after the first WARMUP (compilation):
  samples/s        samples trained / wall time of those steps,
  step_sec         wall time per step,
  engine_busy      share of that wall time the engine (or servers) spent generating, syncing
                   and proving,
  trainer_busy     share spent on the trainer's logprobs, rewards and update,
  overlap_bound    what perfect overlap would give on separate hardware: 1 / max(busy),
                   i.e. step time = the busier side's, as samples/s of K=0 x that bound.
Writes bench/results/offpolicy.json and prints a markdown table.

    JAX_PLATFORMS=cpu .venv/bin/python bench/bench_offpolicy.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "offpolicy.json"
WARMUP = 2
ENGINE_PHASES = ("rollout", "sync", "proof")
TRAINER_PHASES = ("prepare", "train")


def run(name: str, extra: list[str], steps: int, tmp: Path) -> dict:
    out = tmp / name
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "tunix_sglang.cli", "train", "--steps", str(steps),
           "--eval-limit", "0", "--output-dir", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summarize(name, rows)


def _busy(rows: list[dict], phases: tuple[str, ...], lo: float, hi: float) -> float:
    total = 0.0
    for r in rows:
        for ph in phases:
            span = r["timeline"].get(ph)
            if span:
                total += max(0.0, min(span[1], hi) - max(span[0], lo))
    return total


def summarize(name: str, rows: list[dict]) -> dict:
    def end(r):
        return max(s[1] for s in r["timeline"].values())

    measured = rows[WARMUP:]
    lo, hi = end(rows[WARMUP - 1]), end(rows[-1])
    wall = hi - lo
    return {
        "run": name,
        "steps_measured": len(measured),
        "samples_per_sec": sum(r["num_samples"] for r in measured) / wall,
        "step_sec": wall / len(measured),
        "engine_busy": _busy(rows, ENGINE_PHASES, lo, hi) / wall,
        "trainer_busy": _busy(rows, TRAINER_PHASES, lo, hi) / wall,
        "staleness_max": max(r["staleness_max"] for r in rows),
        "rollout_sec_mean": sum(r["rollout_sec"] for r in measured) / len(measured),
        "train_sec_mean": sum(r["train_sec"] for r in measured) / len(measured),
        "losses": [r["loss"] for r in rows],
    }


SETUPS = {"split": ["--rollout-devices", "1"],
          "remote2": ["--rollout-engine", "sglang_jax_remote", "--launch-servers", "2"]}


def compare(results: list[dict]) -> None:
    """Each run against its setup's K=0: measured speed-up and the perfect-overlap bound."""
    for setup in SETUPS:
        base = next((r for r in results if r["run"] == f"{setup}-K0"), None)
        if base is None:
            continue
        bound = 1.0 / max(base["engine_busy"], base["trainer_busy"])
        for r in results:
            if r["run"].startswith(setup + "-"):
                r["speedup_vs_K0"] = r["samples_per_sec"] / base["samples_per_sec"]
                r["overlap_bound_vs_K0"] = bound


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", default="split-K0,split-K1,split-K2,remote2-K0,remote2-K1,"
                    "remote2-K2", help="which of SETUP-K<k> to run, in order")
    args = ap.parse_args()
    names = args.runs.split(",")
    # Rows of runs not repeated here stay (a setup measured in an earlier session).
    kept = json.loads(OUT.read_text())["results"] if OUT.exists() else []
    kept = [r for r in kept if r["run"] not in names]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            setup, k = name.rsplit("-K", 1)
            res = run(name, [*SETUPS[setup], "--max-staleness", k], args.steps, Path(d))
            res["steps"] = args.steps
            print(json.dumps({x: y for x, y in res.items() if x != "losses"}), flush=True)
            results.append(res)
            compare(results)
            OUT.parent.mkdir(parents=True, exist_ok=True)  # kept after every run
            OUT.write_text(json.dumps({"warmup_steps": WARMUP,
                                       "machine": "2 CPU cores shared, XLA host devices = 2",
                                       "results": kept + results}, indent=2) + "\n")
    print("| run | samples/s | step s | engine busy | trainer busy | staleness max | "
          "vs K=0 | perfect-overlap bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['samples_per_sec']:.2f} | {r['step_sec']:.2f} | "
              f"{r['engine_busy']:.2f} | {r['trainer_busy']:.2f} | {r['staleness_max']} | "
              f"{r.get('speedup_vs_K0', float('nan')):.2f}x | "
              f"{r.get('overlap_bound_vs_K0', float('nan')):.2f}x |")


if __name__ == "__main__":
    main()
