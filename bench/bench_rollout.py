"""In-process rollout benchmark (not a test): sglang_jax vs vanilla, sync cost, engine start.

On the same model and prompts, in one run:
1. rollout throughput (generated tokens/s, EOS ignored) of the in-process sglang-jax engine
   and of Tunix's vanilla sampler at batch 8, 32, 128 and 128 / 512 new tokens;
2. weight-sync time into the engine vs a plain `jax.device_put` of the same arrays onto the
   same shardings;
3. engine start time, first and second start in fresh processes sharing a persistent JAX
   compilation cache (`JAX_COMPILATION_CACHE_DIR`).
Writes bench/results/rollout.json and prints a markdown table.

    JAX_PLATFORMS=cpu .venv/bin/python bench/bench_rollout.py [--quick]
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

import jax  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LEN = 40


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"32x128,128x512" -> [(32, 128), (128, 512)] (batch x new tokens)."""
    out = []
    for part in text.split(","):
        b, _, n = part.strip().lower().partition("x")
        if not (b.isdigit() and n.isdigit()) or int(b) <= 0 or int(n) <= 0:
            raise SystemExit(f"--shapes: {part!r} is not BATCHxNEW_TOKENS (e.g. 32x128)")
        out.append((int(b), int(n)))
    return out


def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly PROMPT_LEN tokens (same for both engines)."""
    from tunix_sglang import data

    out = []
    for p in data.synthetic_problems(n, seed):
        ids = tokenizer.encode(p.question + " " + p.question + " " + p.question)
        out.append((ids * 4)[:PROMPT_LEN])
    return out


def vanilla_tok_s(model, tokenizer, ids: list[list[int]], new: int) -> float:
    from tunix.generate import sampler as sampler_lib

    cfg = model.config
    s = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(
        cache_size=PROMPT_LEN * 2 + new + 8, num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    texts = [tokenizer.decode(i) for i in ids]

    def run(seed: int) -> int:
        out = s(input_strings=texts, max_generation_steps=new, max_prompt_length=PROMPT_LEN * 2,
                temperature=1.0, top_p=1.0, seed=seed, echo=False, pad_output=False,
                eos_tokens=[-1])  # never matches: EOS ignored, as for the engine
        return sum(len(t) for t in out.tokens)

    run(0)  # compile
    t0 = time.perf_counter()
    n = run(1)
    return n / (time.perf_counter() - t0)


def engine_tok_s(model_dir: Path, ids: list[list[int]], new: int, model) -> dict:
    from tunix_sglang.engine import EngineSettings, InProcessEngine

    settings = EngineSettings.for_rollout(str(model_dir), max_prompt_len=PROMPT_LEN * 2,
                                          max_new_tokens=new, num_prompts=len(ids))
    eng = InProcessEngine(settings).start()
    try:
        eng.sync_from_tunix(model)
        eng.generate(ids[:2], max_new_tokens=4, ignore_eos=True)  # warm the decode path
        t0 = time.perf_counter()
        out = eng.generate(ids, max_new_tokens=new, temperature=1.0, ignore_eos=True)
        dt = time.perf_counter() - t0
        n = sum(len(s.tokens) for s in out)
        syncs, puts = sync_vs_put(eng, model)
        return {"tok_s": n / dt, "tokens": n, "start_sec": eng.start_seconds,
                "sync_sec": syncs, "device_put_sec": puts,
                "sync_bytes": eng.last_sync.num_bytes}
    finally:
        eng.shutdown()


def sync_vs_put(eng, model, reps: int = 5) -> tuple[list[float], list[float]]:
    """Full sync into the engine vs `jax.device_put` of the same arrays, same shardings.

    The source is an `nnx.State` of the Params, which is what Tunix's `sync_weights` passes.
    """
    from flax import nnx

    from tunix_sglang.engine import _transform

    state = nnx.state(model, nnx.Param)
    syncs, puts = [], []
    for _ in range(reps):
        syncs.append(eng.sync_from_tunix(state).seconds)
        plan, flat, _ = eng.plan_sync(state)
        arrays = [_transform(flat[t], op, p.shape, p.dtype) for p, t, op in plan]
        jax.block_until_ready(arrays)
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(arrays, [p.sharding for p, _, _ in plan]))
        puts.append(time.perf_counter() - t0)
    return syncs, puts


START_SNIPPET = """
import json, sys, time
from tunix_sglang.engine import EngineSettings, InProcessEngine
s = EngineSettings.for_rollout(sys.argv[1], max_prompt_len=80, max_new_tokens=128, num_prompts=8)
e = InProcessEngine(s).start()
print(json.dumps({"start_sec": e.start_seconds}))
e.shutdown()
"""


def start_times(model_dir: Path) -> dict:
    """Engine start in two fresh processes sharing one new persistent compilation cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PLATFORMS": "cpu"}
        runs = []
        for _ in range(2):
            p = subprocess.run([sys.executable, "-c", START_SNIPPET, str(model_dir)],
                               capture_output=True, text=True, env=env, timeout=600)
            line = [x for x in p.stdout.splitlines() if x.startswith("{")]
            runs.append(json.loads(line[-1])["start_sec"] if line else None)
        return {"first_sec": runs[0], "second_sec": runs[1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="batch 8 and 32, 128 tokens only")
    args = ap.parse_args()

    from tunix_sglang import compat, models
    from tunix_sglang.tiny_model import ensure_tiny_model

    compat.apply_all()
    md = models.inspect_model_dir(ensure_tiny_model())
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = models.load_model(md, mesh)
    tok = models.load_tokenizer(md)
    batches = [8, 32] if args.quick else [8, 32, 128]
    news = [128] if args.quick else [128, 512]
    rows = []
    for new in news:
        for b in batches:
            ids = prompts(tok, b)
            v = vanilla_tok_s(model, tok, ids, new)
            try:
                e = engine_tok_s(md.path, ids, new, model)
            except Exception as err:  # e.g. host OOM in the CPU fallback attention: record it
                msg = str(err).strip().splitlines()[-1][:300]
                rows.append({"batch": b, "new_tokens": new, "vanilla_tok_s": v,
                             "sglang_jax_tok_s": None, "ratio": None, "error": msg})
                print(f"batch {b} new {new}: vanilla {v:.0f} tok/s, engine failed: {msg}",
                      flush=True)
                continue
            rows.append({"batch": b, "new_tokens": new, "vanilla_tok_s": v,
                         "sglang_jax_tok_s": e["tok_s"], "ratio": e["tok_s"] / v, **{
                             k: e[k] for k in ("start_sec", "sync_sec", "device_put_sec",
                                               "sync_bytes")}})
            print(f"batch {b} new {new}: vanilla {v:.0f} tok/s, engine {e['tok_s']:.0f} tok/s",
                  flush=True)
    starts = start_times(md.path)
    sync = [s for r in rows for s in r.get("sync_sec", [])]
    put = [s for r in rows for s in r.get("device_put_sec", [])]
    result = {
        "model": {"dir": md.path.name, "hidden": md.hf_config["hidden_size"],
                  "layers": md.hf_config["num_hidden_layers"], "bytes": rows[0].get("sync_bytes")},
        "machine": {"cpus": os.cpu_count(), "backend": jax.default_backend()},
        "prompt_len": PROMPT_LEN, "throughput": rows,
        "sync_median_sec": statistics.median(sync), "device_put_median_sec": statistics.median(put),
        "sync_over_put": statistics.median(sync) / statistics.median(put),
        "engine_start": starts,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollout.json").write_text(json.dumps(result, indent=2))
    print("\n| batch | new tokens | vanilla tok/s | sglang_jax tok/s | engine/vanilla |")
    print("|---|---|---|---|---|")
    for r in rows:
        eng = f"{r['sglang_jax_tok_s']:.0f}" if r["sglang_jax_tok_s"] else "failed (see JSON)"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        print(f"| {r['batch']} | {r['new_tokens']} | {r['vanilla_tok_s']:.0f} | {eng} | {ratio} |")
    print(f"\nsync median {result['sync_median_sec'] * 1e3:.1f} ms vs device_put "
          f"{result['device_put_median_sec'] * 1e3:.2f} ms ({result['sync_over_put']:.1f}x); "
          f"engine start {starts['first_sec']:.1f} s first, {starts['second_sec']:.1f} s second")


if __name__ == "__main__":
    main()
