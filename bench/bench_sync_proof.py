"""What the weight sync and its proof cost, separately, against a steady step.

1. `tunix-sglang train --steps N` on the embedded default (in-process engine, float32, no
   eval): per step `sync_sec - proof_sec` (Tunix's sync_weights: the engine write, the
   rollout's private copy, Tunix's anchor snapshot), `proof_sec`, `step_sec`, and the
   trainer's logprobs of the rollout tokens (`trainer_logps_sec`, the mismatch figures).
2. The proof's parts, timed alone on the same model and engine shapes (medians of 10):
   engine fingerprints, trainer fingerprints, the engine's forced scoring (one prefill of
   the probe's 8 prefixes), the trainer's forward of the probe sequence.
Writes results/sync_proof.json.

    JAX_PLATFORMS=cpu .venv/bin/python bench/bench_sync_proof.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")


def run_train(steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        subprocess.run([sys.executable, "-m", "tunix_sglang.cli", "train", "--steps", str(steps),
                        "--eval-limit", "0", "--output-dir", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def median_sec(fn, reps: int = 10) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parts() -> dict:
    import jax
    import numpy as np

    from tunix_sglang.config import EMBEDDED_DEFAULTS, TrainConfig
    from tunix_sglang.engine import EngineSettings, InProcessEngine
    from tunix_sglang.engine.weight_map import flatten_tunix_params
    from tunix_sglang.models import inspect_model_dir, load_model
    from tunix_sglang.probe import fingerprint, scoring
    from tunix_sglang.warmstart import ensure_warm_model

    cfg = TrainConfig(**EMBEDDED_DEFAULTS)
    md = inspect_model_dir(ensure_warm_model())
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    trainer = load_model(md, mesh)
    eng = InProcessEngine(EngineSettings.for_rollout(
        md.path, max_prompt_len=cfg.max_prompt_length, max_new_tokens=cfg.max_new_tokens,
        num_prompts=cfg.batch_size, num_generations=cfg.num_generations)).start()
    try:
        eng.sync_from_tunix(trainer, version=0)
        seq = scoring.probe_sequence(md.hf_config["vocab_size"], cfg.max_prompt_length)
        layout = {n: (s, d) for n, (_, s, d) in eng.fingerprints().items()}
        return {
            "engine_fingerprints_sec": median_sec(eng.fingerprints),
            "trainer_fingerprints_sec": median_sec(
                lambda: fingerprint.expected(flatten_tunix_params(trainer)[0], layout)),
            "engine_forced_scoring_sec": median_sec(
                lambda: eng.next_token_logits(seq.prefixes())),
            "trainer_probe_forward_sec": median_sec(lambda: scoring.trainer_rows(trainer, seq)),
            "engine_sync_sec": median_sec(lambda: eng.sync_from_tunix(trainer, version=0)),
        }
    finally:
        eng.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    rows = run_train(args.steps)
    steady = rows[1:]  # step 1 compiles
    per_step = [{"step": r["step"], "step_sec": r["step_sec"],
                 "sync_sec": r["sync_sec"] - r["proof_sec"], "proof_sec": r["proof_sec"],
                 "sync_and_proof_share": r["sync_sec"] / r["step_sec"],
                 "trainer_logps_sec": r["trainer_logps_sec"]} for r in rows]
    med = {k: statistics.median(x[k] for x in per_step[1:]) for k in per_step[0] if k != "step"}
    result = {"command": f"tunix-sglang train --steps {args.steps} --eval-limit 0",
              "machine": "2 CPU cores shared with other jobs; JAX CPU",
              "per_step": per_step, "median_steps_2_on": med,
              "max_share_steps_2_on": max(x["sync_and_proof_share"] for x in per_step[1:]),
              "proof_parts": parts(), "steady_steps": len(steady)}
    out = Path(__file__).parent / "results" / "sync_proof.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
