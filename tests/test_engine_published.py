"""Engine/trainer parity for configs shaped like published checkpoints (scaled down in width
and depth, every other config.json field as shipped): the engine reads config.json, the
trainer reads it through `models.tunix_model_config`; both must compute the same function."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from conftest import EngineAsRollout  # noqa: E402

from tunix_sglang import probe  # noqa: E402
from tunix_sglang.engine import EngineSettings, InProcessEngine  # noqa: E402
from tunix_sglang.hub import published_config  # noqa: E402
from tunix_sglang.models import inspect_model_dir, load_model  # noqa: E402
from tunix_sglang.probe.scoring import tunix_greedy, tunix_token_logprobs  # noqa: E402
from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model  # noqa: E402


def _like(name: str, seed: int) -> TinyModelSpec:
    """The embedded model's size with the published config.json's rope_theta and tying
    (shipped for the recipes: Qwen3-0.6B 1e6, Qwen3-4B-Instruct-2507 5e6; both tied)."""
    c = json.loads(published_config(name).read_text())
    return TinyModelSpec(rope_theta=float(c["rope_theta"]),
                         tie_word_embeddings=bool(c["tie_word_embeddings"]), seed=seed)


PUBLISHED = {
    "qwen3-0.6b-like": _like("Qwen/Qwen3-0.6B", seed=11),
    "qwen3-4b-instruct-2507-like": _like("Qwen/Qwen3-4B-Instruct-2507", seed=12),
}
# Long prompts: positional encodings with a different rope_theta part ways after a few tokens.
PROMPTS = [list(range(40, 88)), [(7 * i + 3) % 700 for i in range(60)]]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_engine_matches_trainer_on_published_config(name, tmp_path):
    d = ensure_tiny_model(PUBLISHED[name], cache_dir=tmp_path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    trainer = load_model(inspect_model_dir(d), mesh)
    eng = InProcessEngine(EngineSettings.for_rollout(
        d, max_prompt_len=64, max_new_tokens=8, num_prompts=2)).start()
    try:
        eng.sync_from_tunix(trainer)
        samples = eng.generate(PROMPTS, max_new_tokens=8, temperature=0.0, ignore_eos=True)
        for prompt, s in zip(PROMPTS, samples, strict=True):
            assert s.tokens.tolist() == tunix_greedy(trainer, prompt, 8)
            ref = tunix_token_logprobs(trainer, prompt, s.tokens, 0.0)
            assert np.max(np.abs(ref - s.logprobs)) <= 1e-4
        assert probe.prove(EngineAsRollout(eng), trainer, eng.weight_version).check == "proven"
    finally:
        eng.shutdown()
