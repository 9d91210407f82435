"""compat/tunix.py: rope_theta in Tunix's attention; pinned-host snapshots on a multi-process
CPU (two JAX processes on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tunix_sglang import compat  # noqa: E402
from tunix_sglang.compat import tunix as tunix_fixes  # noqa: E402
from tunix_sglang.compat.base import ORIGINALS as ORIG  # noqa: E402
from tunix_sglang.launch import free_port  # noqa: E402

compat.apply_all()


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_rope_theta(family):
    """One attention layer, rope_theta 5e5 vs the module's default 1e6: the released block
    computes the same output for both (it never passes rope_theta on); fixed, the 1e6 layer
    still computes exactly what the release computes and the 5e5 layer differs."""
    module = tunix_fixes._model_module(family)
    assert tunix_fixes.rope_theta_is_ignored(module)
    base = dict(num_layers=1, vocab_size=32, embed_dim=16, hidden_dim=32, num_heads=2,
                head_dim=8, num_kv_heads=1, norm_eps=1e-6)
    # Scaled so that the attention is not uniform (as rope-independent as it gets) at init.
    x = 30 * jax.random.normal(jax.random.key(0), (1, 12, 16))
    pos = jnp.arange(12)[None]
    mask = jnp.tril(jnp.ones((12, 12), bool))[None]

    layers = {theta: module.Attention(module.ModelConfig(**base, rope_theta=theta),
                                      rngs=nnx.Rngs(0)) for theta in (500_000, 1_000_000)}

    def out(block, theta):
        return np.asarray(block(layers[theta], x, pos, None, mask)[1])

    released, fixed = ORIG[f"tunix.{family}.Attention.block"], module.Attention.block
    default = out(released, 1_000_000)
    assert np.array_equal(out(released, 500_000), default)
    assert np.array_equal(out(fixed, 1_000_000), default)
    moved = out(fixed, 500_000) - default
    assert np.abs(moved).max() > 2e-3 * np.abs(default).max()


_PINNED_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.distributed.initialize("127.0.0.1:" + sys.argv[2], num_processes=2,
                               process_id=int(sys.argv[1]))
    from tunix.rl import utils as rl_utils
    from tunix_sglang.compat import tunix as tunix_fixes
    from tunix_sglang.compat.base import ORIGINALS
    assert tunix_fixes.pinned_host_on_multiprocess_cpu_needed()
    tunix_fixes.fix_pinned_host_on_multiprocess_cpu()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    params = {"w": jax.make_array_from_callback(
        (4, 4), sharding, lambda i: np.ones((4, 4), np.float32)[i])}
    try:
        ORIGINALS["tunix.rl.utils.put_params_on_memory_kind"](params, "pinned_host")
        print("ORIGINAL PLACED")
    except Exception as e:
        print("ORIGINAL FAILED", str(e)[:200])
    assert rl_utils.put_params_on_memory_kind(params, "pinned_host") is params
    print("FIXED KEPT")
""")


def test_pinned_host_on_multiprocess_cpu(tmp_path):
    """RLCluster's pinned-host snapshot: across two CPU processes the release's placement
    fails ("Side-effect ops cannot be replicated"), so a simulated multi-host run died at
    start; fixed, the params stay where they are. In one process the fix hands on."""
    port = str(free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", _PINNED_SCRIPT, str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "ORIGINAL FAILED Side-effect ops cannot be replicated" in out.replace(
            "UNIMPLEMENTED: ", ""), out[-3000:]
        assert "FIXED KEPT" in out

    from tunix.rl import utils as rl_utils

    one = {"w": jax.device_put(jnp.ones((4, 4)), jax.devices()[0])}
    placed = rl_utils.put_params_on_memory_kind(one, "pinned_host")
    assert placed["w"].sharding.memory_kind == "pinned_host"
