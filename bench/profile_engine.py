"""Where an in-process engine rollout spends its time and memory (a profile, not a test).

For each model and BxN shape: one warm rollout of B prompts x N new tokens (EOS ignored,
temperature 1 or `--temperature`) through `InProcessEngine`, the scheduler's steps timed by
phase:

  prefill forward / decode forward   the jitted model (attention, MLP, logits), blocked on
  sampler                            the jitted sampler (incl. its host-callback sort, also
                                     timed alone: calls = steps that sampled non-greedily)
  batch prep                         ScheduleBatch.get_model_worker_batch (padding, cache_loc)
  result processing                  Scheduler.process_batch_result (+ the logprob capture)
  other                              the rest of the loop (receive, scheduling, Python)

and the compiled programs' own counts (`jax.stages` cost and memory analysis): FLOPs,
bytes accessed, temporary buffer bytes, host callbacks. Writes JSON (`--json`) and prints
one markdown table row per shape.

    JAX_PLATFORMS=cpu python bench/profile_engine.py --models random,qwen3-0.6b \
        --shapes 32x128,128x128 [--json PATH]

Models: `random` (the random tiny model), `warm` (the embedded default), `qwen3-0.6b`
(Qwen3-0.6B's published config.json with 2 layers, random weights).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
from bench_rollout import PROMPT_LEN, parse_shapes, prompts  # noqa: E402


def qwen3_06b_two_layers():
    """Qwen3-0.6B's published config.json (`published/`: width, heads, vocabulary, rope) with
    2 of its 28 layers; random weights."""
    import dataclasses

    from tunix_sglang.hub import published_config
    from tunix_sglang.tiny_model import TinyModelSpec

    c = json.loads(published_config("Qwen/Qwen3-0.6B").read_text())
    return TinyModelSpec(num_hidden_layers=2, **{
        f.name: type(f.default)(c[f.name]) for f in dataclasses.fields(TinyModelSpec)
        if f.name not in ("num_hidden_layers", "seed")})


def model_dir(name: str) -> Path:
    from tunix_sglang.tiny_model import ensure_tiny_model
    from tunix_sglang.warmstart import ensure_warm_model

    if name == "random":
        return ensure_tiny_model()
    if name == "warm":
        return ensure_warm_model(log=print)
    if name == "qwen3-0.6b":
        return ensure_tiny_model(qwen3_06b_two_layers())
    raise SystemExit(f"unknown model {name!r}: random, warm or qwen3-0.6b")


class Timers:
    """Seconds and calls per phase, filled by wrappers around sglang-jax methods; real vs
    padded tokens (prefill) and rows (decode) of the batches the model ran."""

    def __init__(self):
        self.sec = collections.defaultdict(float)
        self.calls = collections.Counter()
        self.padding = collections.Counter()

    def reset(self):
        self.sec.clear()
        self.calls.clear()
        self.padding.clear()


def instrument(timers: Timers) -> None:
    """Wrap the scheduler's step phases with timers (this process only)."""
    from sgl_jax.srt.managers.schedule_batch import ScheduleBatch
    from sgl_jax.srt.managers.scheduler import Scheduler
    from sgl_jax.srt.managers.tp_worker import ModelWorker
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    def timed(cls, name, phase_of, block=False):
        fn = getattr(cls, name)

        @functools.wraps(fn)
        def wrapper(self, *a, **k):
            t0 = time.perf_counter()
            out = fn(self, *a, **k)
            if block:
                jax.block_until_ready(jax.tree_util.tree_leaves(out))
            phase = phase_of(self, *a, **k)
            timers.sec[phase] += time.perf_counter() - t0
            timers.calls[phase] += 1
            return out

        setattr(cls, name, wrapper)

    def fwd_phase(self, forward_batch, *a, **k):
        return "prefill forward" if forward_batch.forward_mode.is_extend() else "decode forward"

    timed(ModelRunner, "_forward", fwd_phase, block=True)
    timed(ModelRunner, "_set_kv_cache_after_forward", lambda *a, **k: "kv write-back")
    timed(ModelWorker, "forward_batch_generation", lambda *a, **k: "worker", block=True)
    timed(ModelRunner, "sample", lambda *a, **k: "sampler", block=True)
    timed(ScheduleBatch, "get_model_worker_batch", lambda *a, **k: "batch prep")
    prep = ScheduleBatch.get_model_worker_batch

    @functools.wraps(prep)
    def count_padding(self, *a, **k):
        b = prep(self, *a, **k)
        kind = "prefill_tokens" if b.forward_mode.is_extend() else "decode_rows"
        real = b.real_input_ids_len if b.forward_mode.is_extend() else b.real_bs
        timers.padding[f"{kind}_real"] += int(real)
        timers.padding[f"{kind}_padded"] += int(len(b.input_ids))
        return b

    ScheduleBatch.get_model_worker_batch = count_padding

    # The non-TPU sampler's host callback (numpy argsort of every row's probabilities): it is
    # looked up when the sampler is traced, so this wrapper must be in place before.
    from sgl_jax.srt.layers import sampler as sampler_mod

    host_sort = sampler_mod._get_sorted_indices_np

    @functools.wraps(host_sort)
    def timed_sort(probs):
        t0 = time.perf_counter()
        out = host_sort(probs)
        timers.sec["of which host sort callback"] += time.perf_counter() - t0
        timers.calls["of which host sort callback"] += 1
        return out

    sampler_mod._get_sorted_indices_np = timed_sort
    timed(Scheduler, "process_batch_result", lambda *a, **k: "result processing")
    timed(Scheduler, "run_batch", lambda *a, **k: "run_batch")


def jitted(fn_wrapper, depth: int = 3):
    """The jax.jit function a ModelRunner wrapper closes over (through other wrappers)."""
    for cell in fn_wrapper.__closure__ or ():
        obj = cell.cell_contents
        if hasattr(obj, "lower"):
            return obj
    for cell in fn_wrapper.__closure__ or () if depth else ():
        if callable(cell.cell_contents) and getattr(cell.cell_contents, "__closure__", None):
            found = jitted(cell.cell_contents, depth - 1)
            if found is not None:
                return found
    return None


def capture_forward_args(runner, store: dict, timers: Timers) -> None:
    """Record one set of forward arguments per mode, to lower the programs afterwards; time
    the jitted forward alone (blocked on its outputs)."""
    inner = jitted(runner.jitted_run_model)
    orig = runner.jitted_run_model

    def wrapper(forward_batch, logits_metadata):
        mode = "prefill" if forward_batch.forward_mode.is_extend() else "decode"
        store.setdefault(mode, (runner.model_def, runner.model_state_def,
                                runner.model_state_leaves, forward_batch,
                                runner.token_to_kv_pool, logits_metadata))
        t0 = time.perf_counter()
        out = jax.block_until_ready(orig(forward_batch, logits_metadata))
        timers.sec[f"{mode} jit"] += time.perf_counter() - t0
        timers.calls[f"{mode} jit"] += 1
        return out

    runner.jitted_run_model = wrapper
    store["_inner"] = inner
    sample_inner = jitted(runner.jitted_sampler)
    orig_sample = runner.jitted_sampler

    def sample_wrapper(*a):
        store.setdefault("_sampler_args", (runner.sampler_def, runner.sampler_state_def,
                                           runner.sampler_state_leaves, *a))
        return orig_sample(*a)

    runner.jitted_sampler = sample_wrapper
    store["_sampler"] = sample_inner


def program_counts(fn, args) -> dict:
    lowered = fn.lower(*args)
    text = lowered.as_text()
    compiled = lowered.compile()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0]
    mem = compiled.memory_analysis()
    return {
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0),
        "host_callbacks": text.count("callback"),
    }


def profile_shape(md, model, tok, batch: int, new: int, timers: Timers,
                  temperature: float) -> dict:
    from tunix_sglang.engine import EngineSettings, InProcessEngine

    ids = prompts(tok, batch)
    settings = EngineSettings.for_rollout(str(md.path), max_prompt_len=PROMPT_LEN * 2,
                                          max_new_tokens=new, num_prompts=batch)
    eng = InProcessEngine(settings).start()
    store: dict = {}
    try:
        eng.sync_from_tunix(model)
        eng.generate(ids[:2], max_new_tokens=4, ignore_eos=True)
        capture_forward_args(eng._runner, store, timers)
        timers.reset()
        t0 = time.perf_counter()
        out = eng.generate(ids, max_new_tokens=new, temperature=temperature, ignore_eos=True)
        wall = time.perf_counter() - t0
        phases = dict(timers.sec)
        calls = dict(timers.calls)
        run_batch = phases.pop("run_batch", 0.0)
        worker = phases.pop("worker", 0.0)
        model = sum(phases.get(k, 0.0) for k in ("prefill forward", "decode forward",
                                                 "sampler"))
        phases["batch arrays to device"] = worker - model
        phases["run_batch other (logprob capture, id copy)"] = (
            run_batch - worker - phases.get("batch prep", 0.0))
        phases["other (scheduling, loop, I/O)"] = wall - run_batch - phases.get(
            "result processing", 0.0)
        n = sum(len(s.tokens) for s in out)
        programs = {}
        inner_fn, sampler_fn = store.pop("_inner"), store.pop("_sampler")
        sampler_args = store.pop("_sampler_args", None)
        with jax.set_mesh(eng.mesh):
            for mode, args in store.items():
                programs[f"{mode} forward"] = program_counts(inner_fn, args)
            if sampler_args is not None:
                programs["sampler"] = program_counts(sampler_fn, sampler_args)
        return {"batch": batch, "new_tokens": new, "temperature": temperature, "tokens": n,
                "wall_sec": wall,
                "tok_s": n / wall, "phases_sec": phases, "calls": calls,
                "padding": dict(timers.padding),
                "programs": programs,
                "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    finally:
        eng.shutdown()


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="random,qwen3-0.6b")
    ap.add_argument("--shapes", default="32x128,128x128")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from tunix_sglang import compat, models

    compat.apply_all()
    timers = Timers()
    instrument(timers)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    results = []
    for name in args.models.split(","):
        md = models.inspect_model_dir(model_dir(name))
        model = models.load_model(md, mesh)
        tok = models.load_tokenizer(md)
        for batch, new in parse_shapes(args.shapes):
            r = {"model": name, **profile_shape(md, model, tok, batch, new, timers,
                                                 args.temperature)}
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"profiles": results}, indent=2))
    print("\n| model | BxN | tok/s | prefill s | decode forward ms/step | sampler ms/step | "
          "host ms/step | prefill tokens real/padded |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(markdown_row(r))


def markdown_row(r: dict) -> str:
    ph, steps = r["phases_sec"], max(1, r["calls"].get("sampler", 1))
    host = sum(v for k, v in ph.items() if k not in (
        "prefill forward", "decode forward", "sampler", "prefill jit", "decode jit",
        "kv write-back"))
    pad = r.get("padding", {})
    return (f"| {r['model']} | {r['batch']}x{r['new_tokens']} | {r['tok_s']:.0f} | "
            f"{ph.get('prefill forward', 0):.2f} | "
            f"{1e3 * ph.get('decode forward', 0) / max(1, steps - 1):.1f} | "
            f"{1e3 * ph.get('sampler', 0) / steps:.1f} | {1e3 * host / steps:.1f} | "
            f"{pad.get('prefill_tokens_real', 0)}/{pad.get('prefill_tokens_padded', 0)} |")


if __name__ == "__main__":
    main()
