"""The memory plan against what Tunix really allocates on CPU (the embedded tiny model)."""

from __future__ import annotations

import dataclasses
import importlib
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from tunix_sglang import memory_plan as mp
from tunix_sglang import models


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tunix_sglang.tiny_model import ensure_tiny_model

    return ensure_tiny_model(cache_dir=tmp_path_factory.mktemp("models"))


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameter_and_optimizer_bytes_match_tunix(tiny_dir, dtype):
    md = models.inspect_model_dir(tiny_dir)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    model = models.load_model(md, mesh, dtype)
    shape = mp.read_model_shape(tiny_dir)
    plan = mp.plan_memory(shape, mp.PlanInputs(dtype=dtype, beta=0.0), 1 << 34)

    real_params = nbytes(nnx.state(model))
    assert plan.parts["actor parameters"] == real_params
    assert plan.parts["gradients"] == real_params

    optimizer = nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)
    assert plan.parts["optimizer state (AdamW mu, nu)"] == nbytes(nnx.state(optimizer))


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_tunix_modules(tiny_dir, model_type, tied):
    """Other architectures and untied embeddings, counted on the abstract Tunix module."""
    hf = dict(json.loads((tiny_dir / "config.json").read_text()),
              model_type=model_type, tie_word_embeddings=tied)
    cfg = models.tunix_model_config(models.ModelDir(tiny_dir, hf))
    pkg, cls = models.ARCHITECTURES[model_type]
    module = getattr(importlib.import_module(pkg + ".model"), cls)
    abstract = nnx.eval_shape(lambda: module(cfg, rngs=nnx.Rngs(0)))
    real = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(abstract)))
    assert mp.ModelShape.from_hf_config(hf).param_count() == real


def test_reference_and_engine_copies(tiny_dir):
    shape = mp.read_model_shape(tiny_dir)
    w = shape.param_count() * 4
    sgl = mp.plan_memory(shape, mp.PlanInputs(rollout_engine="sglang_jax", beta=0.04), 1 << 34)
    assert sgl.parts["reference parameters (beta != 0)"] == w
    assert sgl.parts["rollout weights (sglang-jax copy)"] == w
    assert sgl.fits and sgl.mem_fraction_max is not None and sgl.max_total_tokens > 0
    vanilla = mp.plan_memory(shape, mp.PlanInputs(rollout_engine="vanilla", beta=0.0), 1 << 34)
    assert not any(k.startswith(("rollout weights", "reference")) for k in vanilla.parts)
    kv = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * 4
    assert sgl.kv_bytes_per_token == kv
    assert vanilla.parts["KV cache (vanilla sampler)"] == kv * 2 * 4 * (128 + 48 + 16)


def test_plan_that_does_not_fit_names_what_to_lower(tiny_dir):
    shape = mp.read_model_shape(tiny_dir)
    inputs = mp.PlanInputs(batch_size=16, num_generations=8, max_new_tokens=512,
                           rollout_engine="sglang_jax")
    memory = 512 << 20
    plan = mp.plan_memory(shape, inputs, memory)
    assert not plan.fits and plan.static_fits and plan.problems
    flags = [a.split()[0] for a in plan.advice]
    assert "--batch-size" in flags and "--max-new-tokens" in flags
    for advice in plan.advice:  # every value advised really fits
        flag, value = advice.split()[:2]
        if flag in ("--batch-size", "--num-generations", "--max-new-tokens",
                    "--max-prompt-length"):
            changed = dataclasses.replace(inputs, **{flag[2:].replace("-", "_"): int(value)})
            assert mp.plan_memory(shape, changed, memory).feasible, advice
    assert "lower:" in plan.format()


def test_wrong_mem_fraction_gets_the_safe_one(tiny_dir):
    shape = mp.read_model_shape(tiny_dir)
    plan = mp.plan_memory(shape, mp.PlanInputs(rollout_engine="sglang_jax",
                                               sglang_mem_fraction_static=0.99), 1 << 30)
    assert plan.feasible and not plan.fits
    assert plan.advice == [f"--sglang-mem-fraction-static {plan.mem_fraction_max:.2f} (now 0.99)"]
