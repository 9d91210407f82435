"""In-process rollout benchmark (not a test): sglang_jax vs vanilla, sync cost, engine start.

On the same model and prompts, in one run:
1. rollout throughput (generated tokens/s, EOS ignored) of the in-process sglang-jax engine
   and of Tunix's vanilla sampler at batch 8, 32, 128 and 128 / 512 new tokens (or the
   `--shapes` given), the two called alternately `--repeats` times (medians);
2. weight-sync time into the engine vs a plain `jax.device_put` of the same arrays onto the
   same shardings;
3. engine start time, first and second start in fresh processes sharing a persistent JAX
   compilation cache (`JAX_COMPILATION_CACHE_DIR`).
Writes bench/results/rollout.json (or `--json PATH`): {"shapes": [{"batch", "new_tokens",
"vanilla_tok_s", "engine_tok_s", "error", ...}], ...} and prints a markdown table. With
`--shapes` only the throughput is measured.

    JAX_PLATFORMS=cpu .venv/bin/python bench/bench_rollout.py [--quick]
    JAX_PLATFORMS=cpu .venv/bin/python bench/bench_rollout.py --shapes 32x128,128x512 \
        --json /tmp/rollout.json --repeats 3
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


def vanilla_runner(model, tokenizer, ids: list[list[int]], new: int):
    """A warm Tunix sampler call on `ids`: () -> generated token count."""
    from tunix.generate import sampler as sampler_lib

    cfg = model.config
    s = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(
        cache_size=PROMPT_LEN * 2 + new + 8, num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    texts = [tokenizer.decode(i) for i in ids]
    seeds = iter(range(1 << 30))

    def run() -> int:
        out = s(input_strings=texts, max_generation_steps=new, max_prompt_length=PROMPT_LEN * 2,
                temperature=1.0, top_p=1.0, seed=next(seeds), echo=False, pad_output=False,
                eos_tokens=[-1])  # never matches: EOS ignored, as for the engine
        return sum(len(t) for t in out.tokens)

    run()  # compile
    return run


def engine_runner(eng, ids: list[list[int]], new: int):
    """A warm engine call on `ids`: () -> generated token count."""

    def run() -> int:
        out = eng.generate(ids, max_new_tokens=new, temperature=1.0, ignore_eos=True)
        return sum(len(s.tokens) for s in out)

    eng.generate(ids[:2], max_new_tokens=4, ignore_eos=True)  # warm the decode path
    return run


def timed_tok_s(run) -> float:
    t0 = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - t0)


def error_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[-1][:300]


def measure_shape(md, model, tok, batch: int, new: int, repeats: int,
                  with_sync: bool) -> dict:
    """Vanilla and engine tok/s on the same prompts, alternating `repeats` times (medians)."""
    from tunix_sglang.engine import EngineSettings, InProcessEngine

    ids = prompts(tok, batch)
    row: dict = {"batch": batch, "new_tokens": new, "vanilla_tok_s": None,
                 "engine_tok_s": None, "error": None}
    try:
        vanilla = vanilla_runner(model, tok, ids, new)
    except Exception as err:  # recorded, the engine is still measured
        row["error"] = f"vanilla: {error_line(err)}"
        vanilla = None
    eng = None
    try:
        settings = EngineSettings.for_rollout(str(md.path), max_prompt_len=PROMPT_LEN * 2,
                                              max_new_tokens=new, num_prompts=batch)
        eng = InProcessEngine(settings).start()
        eng.sync_from_tunix(model)
        engine = engine_runner(eng, ids, new)
        row["start_sec"] = eng.start_seconds
        v_runs, e_runs = [], []
        for _ in range(repeats):
            if vanilla is not None:
                v_runs.append(timed_tok_s(vanilla))
            e_runs.append(timed_tok_s(engine))
        row["engine_tok_s"], row["engine_runs"] = statistics.median(e_runs), e_runs
        if v_runs:
            row["vanilla_tok_s"], row["vanilla_runs"] = statistics.median(v_runs), v_runs
        if with_sync:
            row["sync_sec"], row["device_put_sec"] = sync_vs_put(eng, model)
            row["sync_bytes"] = eng.last_sync.num_bytes
    except Exception as err:  # e.g. host OOM in the CPU fallback attention: record it
        row["error"] = "; ".join(filter(None, [row["error"], f"engine: {error_line(err)}"]))
        if vanilla is not None and row["vanilla_tok_s"] is None:
            row["vanilla_tok_s"] = timed_tok_s(vanilla)
    finally:
        if eng is not None:
            eng.shutdown()
    if row["vanilla_tok_s"] and row["engine_tok_s"]:
        row["ratio"] = row["engine_tok_s"] / row["vanilla_tok_s"]
    return row


def sync_vs_put(eng, model, reps: int = 5) -> tuple[list[float], list[float]]:
    """Full sync into the engine vs `jax.device_put` of the same arrays, same shardings.

    The source is an `nnx.State` of the Params, which is what Tunix's `sync_weights` passes.
    """
    from flax import nnx

    from tunix_sglang.engine.weight_map import transform

    state = nnx.state(model, nnx.Param)
    syncs, puts = [], []
    for _ in range(reps):
        syncs.append(eng.sync_from_tunix(state).seconds)
        plan, flat, _ = eng.plan_sync(state)
        arrays = [transform(flat[m.tunix_name], m, p.dtype) for p, m in plan]
        jax.block_until_ready(arrays)
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(arrays, [p.sharding for p, _ in plan]))
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


DEFAULT_SHAPES = "8x128,32x128,128x128,8x512,32x512,128x512"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shapes 8x128,32x128 only")
    ap.add_argument("--shapes", default=None,
                    help=f"BATCHxNEW_TOKENS list (default {DEFAULT_SHAPES}); throughput only")
    ap.add_argument("--json", type=Path, default=RESULTS / "rollout.json", help="output file")
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternate vanilla and engine calls this many times (medians)")
    args = ap.parse_args()
    full = args.shapes is None and not args.quick
    shapes = parse_shapes(args.shapes or ("8x128,32x128" if args.quick else DEFAULT_SHAPES))

    from tunix_sglang import compat, models
    from tunix_sglang.tiny_model import ensure_tiny_model

    compat.apply_all()
    md = models.inspect_model_dir(ensure_tiny_model())
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = models.load_model(md, mesh)
    tok = models.load_tokenizer(md)
    rows = []
    for batch, new in shapes:
        r = measure_shape(md, model, tok, batch, new, args.repeats, with_sync=full)
        rows.append(r)
        fmt = lambda v: f"{v:.0f}" if v else "-"  # noqa: E731
        print(f"batch {batch} new {new}: vanilla {fmt(r['vanilla_tok_s'])} tok/s, engine "
              f"{fmt(r['engine_tok_s'])} tok/s{'; ' + r['error'] if r['error'] else ''}",
              flush=True)
    result = {
        "model": {"dir": md.path.name, "hidden": md.hf_config["hidden_size"],
                  "layers": md.hf_config["num_hidden_layers"]},
        "machine": {"cpus": os.cpu_count(), "backend": jax.default_backend(),
                    "loadavg_1m": os.getloadavg()[0]},
        "prompt_len": PROMPT_LEN, "repeats": args.repeats, "shapes": rows,
    }
    if full:
        sync = [s for r in rows for s in r.get("sync_sec", [])]
        put = [s for r in rows for s in r.get("device_put_sec", [])]
        result.update(sync_median_sec=statistics.median(sync),
                      device_put_median_sec=statistics.median(put),
                      sync_over_put=statistics.median(sync) / statistics.median(put),
                      engine_start=start_times(md.path))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print("\n| batch | new tokens | vanilla tok/s | sglang_jax tok/s | engine/vanilla |")
    print("|---|---|---|---|---|")
    for r in rows:
        eng = f"{r['engine_tok_s']:.0f}" if r["engine_tok_s"] else "failed (see JSON)"
        van = f"{r['vanilla_tok_s']:.0f}" if r["vanilla_tok_s"] else "failed (see JSON)"
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
        print(f"| {r['batch']} | {r['new_tokens']} | {van} | {eng} | {ratio} |")
    if full:
        starts = result["engine_start"]
        print(f"\nsync median {result['sync_median_sec'] * 1e3:.1f} ms vs device_put "
              f"{result['device_put_median_sec'] * 1e3:.2f} ms ({result['sync_over_put']:.1f}x); "
              f"engine start {starts['first_sec']:.1f} s first, {starts['second_sec']:.1f} s "
              "second")


if __name__ == "__main__":
    main()
