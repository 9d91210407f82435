"""Shared test set-up: CPU JAX, a per-session cache dir, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Plumbing tests run the random tiny model (no warm start: smaller, faster); the tests of the
# embedded default itself (test_learning.py) ask for the warm-started one explicitly.
os.environ.setdefault("TUNIX_SGLANG_EMBEDDED_MODEL", "random")

REPO = Path(__file__).resolve().parents[1]
# 128 GSM8K problems (MIT) in the repository, train and test splits: tests/data/gsm8k/README.md
GSM8K_DIR = REPO / "tests" / "data" / "gsm8k"
GSM8K_TRAIN = GSM8K_DIR / "train.jsonl"


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory) -> Path:
    """XDG cache for subprocesses: the tiny model and JAX compile cache, built once per run."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(scope="session")
def cli_env(cache_home) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(cache_home), PYTHONUNBUFFERED="1")
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunix_sglang.cli", *args]


@pytest.fixture(scope="session")
def run_cli(cli_env):
    """Run `tunix-sglang ARGS` to completion; returns the CompletedProcess."""

    def run(*args: str, timeout: float = 600, env: dict | None = None):
        return subprocess.run(
            cli_cmd(*args), capture_output=True, text=True, timeout=timeout,
            env={**cli_env, **(env or {})}, cwd=REPO,
        )

    return run


def one_device_mesh():
    """The ("fsdp", "tp") mesh Tunix models are loaded on in tests: the first device."""
    import jax
    import numpy as np

    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A new Tunix model: every float parameter plus Gaussian noise (the original untouched).

    The noise comes from numpy: jax.random compiled a sampler per parameter shape (seconds).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    rng = np.random.default_rng(seed)
    noisy = [jax.device_put((np.asarray(x, np.float32) + scale * rng.standard_normal(
        x.shape, np.float32)).astype(x.dtype), x.sharding)
             if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, noisy))


class EngineAsRollout:
    """A bare InProcessEngine as the sync proof sees a rollout (`probe.prove`)."""

    def __init__(self, engine):
        import types

        self.engine = engine
        self.rollout_config = types.SimpleNamespace(
            max_prompt_length=engine.settings.max_prompt_len)

    def sync_evidence(self, seq):
        return [self.engine.evidence(seq.prefixes())]


def probe_diff(rollout, model) -> float:
    """The proof's numerics alone: max |Δ logprob| over the probe's top-16 tokens between
    every engine of `rollout` and the Tunix `model` (whatever their fingerprints)."""
    from tunix_sglang.probe import scoring

    seq = scoring.probe_sequence(int(model.embedder.input_embedding.value.shape[0]),
                                 rollout.rollout_config.max_prompt_length)
    rows = scoring.trainer_rows(model, seq)
    return max(scoring.compare(rows, r.logits)[0] for r in rollout.sync_evidence(seq))


def one_adamw_step(model, lr: float, seed: int = 0):
    """A copy of a Tunix `model` after one real AdamW step (the runner's optimizer) at `lr`,
    on next-token cross-entropy of random tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from tunix_sglang.rollout.base import copy_params

    model = copy_params(model)
    vocab = int(model.embedder.input_embedding.value.shape[0])
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (4, 17)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (4, 16))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((16, 16), bool)), (4, 16, 16))

    def loss_fn(m):
        logits, _ = m(tokens[:, :-1], positions, None, mask)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

    opt = nnx.Optimizer(model, optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=0.1), wrt=nnx.Param)
    opt.update(model, nnx.grad(loss_fn)(model))
    return model


def hf_cache_with(model_dir: Path, hf_home: Path, name: str, rev: str = "0" * 40) -> Path:
    """`name` laid out as huggingface_hub caches it: models--ORG--NAME/snapshots/REV, refs/main."""
    repo = hf_home / "hub" / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    return snapshot
