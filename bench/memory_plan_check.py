"""Check the memory plan against Tunix and sglang-jax for a Qwen3-0.6B-shaped model.

Too slow for CI tests, so it lives here. Nothing is downloaded: the published config.json of
Qwen/Qwen3-0.6B that tunix-sglang ships (src/tunix_sglang/published/) is copied to a temporary
directory.
- parameter and AdamW bytes: the abstract Tunix model (nnx.eval_shape, nothing allocated);
- KV cache: sglang-jax 0.0.2's own `ModelRunner.profile_max_num_token` formula (`cell_size`)
  read from its `ModelConfig`, and a real `MHATokenToKVPool` allocated on CPU for the tokens
  one step needs;
- training activations (an estimate in the plan): XLA's own buffer assignment for the
  gradient of Tunix's `compute_per_token_logps` at Qwen3-4B-Instruct-2507's widths (shipped
  config.json) with 1, 2 and 4 layers, float32, 2 sequences of 256 + 512 tokens (a trainer
  chip's share in the v4-8 recipe), compiled for CPU: temporaries per layer and for the rest.
Writes bench/results/memory_plan.json.

    JAX_PLATFORMS=cpu .venv/bin/python bench/memory_plan_check.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from tunix_sglang import memory_plan as mp  # noqa: E402
from tunix_sglang import models  # noqa: E402
from tunix_sglang.hub import published_config  # noqa: E402

# The published config.json of Qwen/Qwen3-0.6B, as shipped for the recipes' plans.
QWEN3_0_6B = json.loads(published_config("Qwen/Qwen3-0.6B").read_text())
QWEN3_4B = json.loads(published_config("Qwen/Qwen3-4B-Instruct-2507").read_text())
OUT = Path(__file__).resolve().parent / "results" / "memory_plan.json"


def abstract_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def tunix_bytes(hf: dict, dtype: str) -> dict[str, int]:
    """Parameter and optimizer-state bytes of the abstract Tunix Qwen3 (no allocation)."""
    from tunix.models.qwen3.model import Qwen3

    cfg = models.tunix_model_config(models.ModelDir(Path("."), hf), dtype)

    def build():
        model = Qwen3(cfg, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)

    model, optimizer = nnx.eval_shape(build)
    return {"params": abstract_bytes(nnx.state(model)),
            "optimizer": abstract_bytes(nnx.state(optimizer))}


def sglang_kv(model_dir: str, tokens: int, dtype: str) -> dict[str, int]:
    """sglang-jax's KV numbers: tokens its sizing gives a budget, and a real pool."""
    import jax.numpy as jnp
    import numpy as np
    from sgl_jax.srt.configs.model_config import ModelConfig
    from sgl_jax.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    cfg = ModelConfig(model_dir, dtype=dtype)
    kv_dtype = getattr(jnp, dtype)
    budget = 10 * 2**30
    # Run sglang-jax's own sizing function on a known budget (a namespace stands in for the
    # runner: it only reads these attributes). mem_fraction 1.0: the whole budget is KV.
    runner = types.SimpleNamespace(
        model_config=cfg, tp_size=1, mem_fraction_static=1.0, kv_cache_dtype=kv_dtype,
        get_available_device_memory=lambda: budget,
    )
    max_tokens = ModelRunner.profile_max_num_token(runner, budget)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    t0 = time.perf_counter()
    pool = MHATokenToKVPool(size=tokens, page_size=1, dtype=kv_dtype,
                            head_num=cfg.get_total_num_kv_heads_with_replication(1),
                            head_dim=cfg.head_dim, layer_num=cfg.num_hidden_layers, mesh=mesh)
    allocated = sum(b.nbytes for b in pool.kv_buffer)
    alloc_sec = time.perf_counter() - t0
    del pool
    return {"budget": budget,
            "profiled_max_tokens": max_tokens, "pool_bytes_allocated": allocated,
            "pool_alloc_sec": round(alloc_sec, 2)}


def activation_check(sequences: int = 2, prompt: int = 256, completion: int = 512,
                     layers: tuple[int, ...] = (1, 2, 4)) -> dict:
    """XLA's temporaries for the policy-gradient pass vs the plan's activation estimate."""
    import jax.numpy as jnp
    from tunix.models.qwen3.model import Qwen3
    from tunix.rl.common import compute_per_token_logps

    xla, plan = {}, {}
    for n in layers:
        hf = dict(QWEN3_4B, num_hidden_layers=n)
        cfg = models.tunix_model_config(models.ModelDir(Path("."), hf), "float32")
        graphdef, state = nnx.split(nnx.eval_shape(lambda c=cfg: Qwen3(c, rngs=nnx.Rngs(0))))

        def loss(state, prompt_ids, completion_ids, g=graphdef):
            return compute_per_token_logps(g, state, prompt_ids, completion_ids, pad_id=0,
                                           eos_id=1, stop_gradient=False).mean()

        ids = [jax.ShapeDtypeStruct((sequences, k), jnp.int32) for k in (prompt, completion)]
        compiled = jax.jit(jax.grad(loss)).lower(state, *ids).compile()
        xla[n] = compiled.memory_analysis().temp_size_in_bytes
        inputs = mp.PlanInputs(batch_size=1, num_generations=sequences,
                               max_prompt_length=prompt, max_new_tokens=completion)
        plan[n] = mp.plan_memory(mp.ModelShape.from_hf_config(hf), inputs, 2**50).parts[
            "activations + logits (training)"]
    lo, hi = min(layers), max(layers)

    def split(b: dict) -> dict:
        per_layer = (b[hi] - b[lo]) / (hi - lo)
        return {"per_layer_gib": round(per_layer / 2**30, 3),
                "rest_gib": round((b[lo] - lo * per_layer) / 2**30, 3)}

    return {"sequences": sequences, "tokens": prompt + completion, "dtype": "float32",
            "xla_cpu_temp_bytes": xla, "plan_bytes": plan, "xla_cpu": split(xla),
            "plan": split(plan)}


def main() -> int:
    results: dict = {"model": "Qwen3-0.6B-shaped (random weights, config numbers only)"}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(QWEN3_0_6B))
        shape = mp.read_model_shape(tmp)
        results["param_count_plan"] = shape.param_count()
        for dtype in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            real = tunix_bytes(QWEN3_0_6B, dtype)
            inputs = mp.PlanInputs(dtype=dtype, rollout_engine="sglang_jax")
            plan = mp.plan_memory(shape, inputs, 16 * 2**30, num_devices=1,
                                  memory_source="TPU v5e-like 16 GiB")
            kv = sglang_kv(tmp, inputs.sequences * inputs.seq_len, dtype)
            row = {
                "params_plan": plan.parts["actor parameters"], "params_tunix": real["params"],
                "optimizer_plan": plan.parts["optimizer state (AdamW mu, nu)"],
                "optimizer_tunix": real["optimizer"],
                "kv_bytes_per_token_plan": plan.kv_bytes_per_token,
                "kv_pool_plan": plan.parts["KV cache (sglang-jax pool, needed)"],
                "kv_pool_sglang_allocated": kv["pool_bytes_allocated"],
                "sglang_profiled_max_tokens_10GiB": kv["profiled_max_tokens"],
                "plan_max_tokens_10GiB": int(kv["budget"] // plan.kv_bytes_per_token),
                "plan_16GiB_default_settings": {
                    "fits": plan.fits, "mem_fraction_min": plan.mem_fraction_min,
                    "mem_fraction_max": plan.mem_fraction_max,
                    "max_total_tokens": plan.max_total_tokens, "parts": plan.parts,
                    "advice": plan.advice,
                },
                "sec": round(time.perf_counter() - t0, 1),
            }
            row["exact"] = (row["params_plan"] == row["params_tunix"]
                            and row["optimizer_plan"] == row["optimizer_tunix"]
                            and row["kv_pool_plan"] == row["kv_pool_sglang_allocated"]
                            and row["plan_max_tokens_10GiB"]
                            == row["sglang_profiled_max_tokens_10GiB"])
            ok &= row["exact"]
            results[dtype] = row
            print(json.dumps({dtype: {k: v for k, v in row.items()
                                      if k != "plan_16GiB_default_settings"}}), flush=True)
    results["activations_qwen3_4b"] = act = activation_check()
    print(json.dumps({"activations_qwen3_4b": {k: act[k] for k in ("xla_cpu", "plan")}}),
          flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}; all exact: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
