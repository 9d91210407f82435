"""compat/sglang_jax/model_runner.py: the weights the forward reads, the output head's
dtype, the mesh's devices, the programs precompiled."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from sglang_parts import runner_parts  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.compat.base import ORIGINALS as ORIG  # noqa: E402
from tunix_sglang.compat.sglang_jax import model_runner  # noqa: E402
from tunix_sglang.engine import scheduler_hooks as hooks  # noqa: E402

compat.apply_all()


def test_forward_reads_weights():
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    x = jnp.ones((3,))

    def run(r):  # the KV pool argument is donated: keep the returned one, as the runner does
        out, r.token_to_kv_pool, _ = r.jitted_run_model(x, None)
        return np.asarray(out)

    old = runner_parts()
    ORIG["ModelRunner.initialize_jit"](old)
    old.model_state_leaves = [jnp.full((3,), 5.0)]  # what a naive sync does
    assert np.allclose(run(old), 1.0)  # ...changes nothing
    new = runner_parts()
    ModelRunner.initialize_jit(new)
    assert np.allclose(run(new), 1.0)
    new.model_state_leaves = [jnp.full((3,), 5.0)]
    assert np.allclose(run(new), 5.0)


def test_lm_head_dtype(tmp_path):
    from sgl_jax.srt.models.qwen3 import Qwen3ForCausalLM
    from transformers import AutoConfig

    from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model

    path = ensure_tiny_model(TinyModelSpec(tie_word_embeddings=False), cache_dir=tmp_path)
    cfg = AutoConfig.from_pretrained(str(path))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "tensor", "expert"))
    with mesh:
        m = types.SimpleNamespace()
        ORIG["Qwen3ForCausalLM.__init__"](m, cfg, jnp.float32, nnx.Rngs(0), mesh)
        assert m.lm_head.embedding.value.dtype == jnp.bfloat16  # original: bf16 head
        fixed = Qwen3ForCausalLM(cfg, jnp.float32, nnx.Rngs(0), mesh)
    assert fixed.lm_head.embedding.value.dtype == jnp.float32


def test_engine_device_subset_in_process():
    from sgl_jax.srt.managers import scheduler as sched_mod

    assert model_runner.mesh_uses_all_devices(sched_mod)
    dev = jax.devices()[-1:]
    with hooks.engine_devices(dev):
        mesh = sched_mod.create_device_mesh([-1, 1, 1], [1, 1, 1])
    assert list(mesh.devices.flat) == dev
    # the multi-device case (original takes all 4, fixed takes 2) is in test_engine.py


def test_penalty_precompile_optional():
    """The release precompiles the penalty programs whatever the engine is for (no server
    argument turns them off; ~3 s each on this CPU); inside `engine_devices(...,
    skip_penalty_precompile=True)` they are skipped, outside the original runs."""
    from sgl_jax.srt.managers.tp_worker import ModelWorker
    from sgl_jax.srt.server_args import ServerArgs

    assert model_runner.penalties_always_precompiled(ModelWorker, ServerArgs)
    ran = []
    worker = types.SimpleNamespace(  # precompilation with its three parts recorded
        precompile_extend=lambda *a: ran.append("extend"),
        precompile_decode=lambda *a: ran.append("decode"),
        precompile_penalties=lambda *a: ran.append("penalties"))
    ModelWorker.run_precompile(worker)
    assert ran == ["extend", "decode", "penalties"]

    bare = types.SimpleNamespace()  # no precompile state at all
    with hooks.engine_devices(None, skip_penalty_precompile=True):
        assert ModelWorker.precompile_penalties(bare) is None  # skipped
    with pytest.raises(AttributeError):  # outside the block the original runs
        ModelWorker.precompile_penalties(bare)
    with pytest.raises(AttributeError):
        ORIG["ModelWorker.precompile_penalties"](bare)
