"""The embedded default learns: warm start (SFT) round-trips exactly, then GRPO raises reward."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tunix_sglang import models, warmstart
from tunix_sglang.config import EMBEDDED_DEFAULTS
from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model

# Margins a seeded run clears comfortably (measured values in the README).
LEARN_REWARD_MARGIN = 1.0
LEARN_ACC_MARGIN = 0.1


def _mesh():
    devs = jax.devices()
    return jax.sharding.Mesh(np.array(devs).reshape(len(devs), 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    out, _ = model(jnp.asarray(tokens), positions, None, mask)
    return np.asarray(out)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_state_dict_inverts_tunix_qwen3_mapping(tmp_path, tied):
    """Loaded through Tunix then written back: the very tensors of the original file."""
    from safetensors.numpy import load_file

    spec = TinyModelSpec(tie_word_embeddings=tied, num_key_value_heads=1)
    md = models.inspect_model_dir(ensure_tiny_model(spec, cache_dir=tmp_path))
    original = load_file(str(md.path / "model.safetensors"))
    with _mesh() as mesh:
        back = warmstart.hf_state_dict(models.load_model(md, mesh))
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_warm_model_dir_reloads_to_the_same_function(tmp_path):
    """SFT a few steps, save, reload with models.load_model: exactly the same logits."""
    import shutil

    base = ensure_tiny_model(cache_dir=tmp_path)
    model, losses = warmstart.warm_start(base, warmstart.WarmStartSpec(steps=3, batch_size=4))
    assert len(losses) == 3 and all(np.isfinite(losses))
    saved = tmp_path / "saved"
    shutil.copytree(base, saved)
    warmstart.save_safetensors(model, saved / "model.safetensors")
    tokens = np.array([[1, 17, 42, 99, 5, 64, 31, 8]], np.int32)
    with _mesh() as mesh:
        reloaded = models.load_model(models.inspect_model_dir(saved), mesh)
        base_model = models.load_model(models.inspect_model_dir(base), mesh)
        trained, again, orig = _logits(model, tokens), _logits(reloaded, tokens), \
            _logits(base_model, tokens)
    np.testing.assert_array_equal(again, trained)
    assert np.abs(trained - orig).max() > 1e-3  # the warm start did change the model


def test_ensure_warm_model_is_cached(tmp_path, monkeypatch):
    calls = []
    real = warmstart.warm_start

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(warmstart, "warm_start", counting)
    ws = warmstart.WarmStartSpec(steps=2, batch_size=4)
    first = warmstart.ensure_warm_model(cache_dir=tmp_path, warm=ws)
    second = warmstart.ensure_warm_model(cache_dir=tmp_path, warm=ws)
    assert first == second and len(calls) == 1
    assert json.loads((first / "warm_start.json").read_text())["steps"] == 2
    assert (first / "tokenizer.json").is_file() and (first / "config.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))
    models.inspect_model_dir(first)


def test_warm_start_shows_the_format_only_sometimes(tmp_path):
    """The warm start's examples mix the answer format and plain answers, as configured."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_tiny_model(cache_dir=tmp_path))
    answer_tag = tok.convert_tokens_to_ids("<answer>")
    for fraction in (0.0, 0.5, 1.0):
        tokens, mask = warmstart.sft_examples(tok, 192, seed=0, formatted_fraction=fraction)
        rows = zip(tokens, mask, strict=True)
        shown = np.mean([(t[m == 1] == answer_tag).any() for t, m in rows])
        assert abs(shown - fraction) < 0.02, (fraction, shown)


def test_default_run_learns(run_cli, cli_env, tmp_path):
    """The README's main job: `tunix-sglang train` with no flags (warm start, then GRPO through
    the sglang-jax engine). Seeded; reward and held-out accuracy rise by a clear margin."""
    out = tmp_path / "run"
    env = {"TUNIX_SGLANG_EMBEDDED_MODEL": "warm"}
    r = run_cli("train", "--output-dir", str(out), timeout=3000, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print("\n".join(line for line in r.stdout.splitlines() if "Train step" not in line))

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == EMBEDDED_DEFAULTS["steps"]
    k = len(rows) // 4
    first = float(np.mean([r["reward_mean"] for r in rows[:k]]))
    last = float(np.mean([r["reward_mean"] for r in rows[-k:]]))
    assert last > first + LEARN_REWARD_MARGIN, (first, last)

    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, len(rows))
    assert after["reward_mean"] > before["reward_mean"] + LEARN_REWARD_MARGIN, (before, after)
    assert after["strict_acc"] > before["strict_acc"] + LEARN_ACC_MARGIN, (before, after)
    assert "ACCURACY: strict" in r.stdout and "REPORT:" in r.stdout

    # The run's report has every plot; TensorBoard events sit beside metrics.jsonl.
    html = (out / "report.html").read_text()
    assert html.count('<img class="plot"') == 8 and "TensorBoard event files" in html
    events = list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert events and any(e.stat().st_size > 0 for e in events)


def test_default_run_learns_in_bfloat16(run_cli, tmp_path):
    """`tunix-sglang train --dtype bfloat16` (trainer and engine in bfloat16, as on TPU): all
    20 steps pass the sync proof at its bfloat16 default and the training reward rises as in
    float32. No held-out evaluation (the rise of the reward is the claim; it halves the cost)."""
    out = tmp_path / "run"
    env = {"TUNIX_SGLANG_EMBEDDED_MODEL": "warm"}
    r = run_cli("train", "--dtype", "bfloat16", "--eval-limit", "0", "--output-dir", str(out),
                timeout=3000, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == EMBEDDED_DEFAULTS["steps"]
    for row in rows:  # proven every step; bfloat16 disagreement measured, not assumed away
        assert row["sync_check"] == "proven" and 0 < row["sync_max_logprob_diff"] < 1.5, row
        assert 0 < row["mismatch_kl"] < 1e-2 and row["mismatch_max_abs"] < 2.0, row
    k = len(rows) // 4
    first = float(np.mean([r["reward_mean"] for r in rows[:k]]))
    last = float(np.mean([r["reward_mean"] for r in rows[-k:]]))
    assert last > first + LEARN_REWARD_MARGIN, (first, last)
