"""A model directory's config.json is honoured by the trainer: checked against a plain numpy
implementation of the Hugging Face Qwen3 forward pass on the same safetensors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from tunix_sglang import models
from tunix_sglang.errors import UserError
from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):  # x: [T, H, D], HF rotate-half convention
    t, _, d = x.shape
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def reference_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    """Qwen3ForCausalLM forward in float64 numpy, written from the HF model definition."""
    c = json.loads((model_dir / "config.json").read_text())
    raw = load_file(str(model_dir / "model.safetensors"))
    w = {k: v.astype(np.float64) for k, v in raw.items()}
    h, kv, hd, eps = (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                      c["rms_norm_eps"])
    x = w["model.embed_tokens.weight"][ids]
    t = len(ids)
    causal = np.tril(np.ones((t, t), bool))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = (a @ w[p + "self_attn.q_proj.weight"].T).reshape(t, h, hd)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv, hd)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv, hd)
        q = _rope(_rms(q, w[p + "self_attn.q_norm.weight"], eps), c["rope_theta"])
        k = _rope(_rms(k, w[p + "self_attn.k_norm.weight"], eps), c["rope_theta"])
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(causal[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(t, h * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        m = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        g = m @ w[p + "mlp.gate_proj.weight"].T
        u = m @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def tunix_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    md = models.inspect_model_dir(model_dir)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = models.load_model(md, mesh)
    t = len(ids)
    logits, _ = model(jnp.asarray(ids)[None], jnp.arange(t)[None], None,
                      jnp.tril(jnp.ones((1, t, t), bool)))
    return np.asarray(logits[0], np.float64)


# Shapes scaled down; every other field as the published checkpoints ship them.
PUBLISHED = {
    "qwen3-0.6b-like": TinyModelSpec(rope_theta=1_000_000.0, tie_word_embeddings=True, seed=1),
    "qwen3-4b-instruct-2507-like": TinyModelSpec(rope_theta=5_000_000.0,
                                                 tie_word_embeddings=True, seed=2),
    "qwen3-8b-like-untied": TinyModelSpec(rope_theta=1_000_000.0, tie_word_embeddings=False,
                                          seed=3),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_trainer_computes_the_checkpoint_function(name, tmp_path):
    d = ensure_tiny_model(PUBLISHED[name], cache_dir=tmp_path)
    ids = np.arange(3, 3 + 40) * 7 % 700  # 40 positions: rope differences show up
    ref = reference_logits(d, ids)
    got = tunix_logits(d, ids)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)


def test_rope_theta_fix_changes_the_function(tmp_path):
    """Without the compat fix Tunix 0.1.7 ignores rope_theta: both models would agree."""
    base = TinyModelSpec(seed=5)
    ids = np.arange(40) * 5 % 700
    a = tunix_logits(ensure_tiny_model(base, cache_dir=tmp_path), ids)
    b = tunix_logits(ensure_tiny_model(dataclasses.replace(base, rope_theta=5e6),
                                       cache_dir=tmp_path), ids)
    assert np.max(np.abs(a - b)) > 1e-3
    from tunix.models.qwen3 import model as qwen3_model

    from tunix_sglang.compat import ACTIVE_FIXES
    from tunix_sglang.compat import tunix as tunix_fixes

    assert "tunix.qwen3.rope_theta" in ACTIVE_FIXES
    # The gate: the released Attention.block never passes rope_theta to apply_rope.
    assert tunix_fixes.rope_theta_is_ignored(qwen3_model)


def test_inspect_model_dir_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        models.inspect_model_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="not supported"):
        models.inspect_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        models.inspect_model_dir(tmp_path)
