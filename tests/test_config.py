"""Configuration layering: defaults (the embedded default's own), YAML, flags."""

from __future__ import annotations

import pytest

from tunix_sglang.config import EMBEDDED_DEFAULTS, TrainConfig, build_config
from tunix_sglang.errors import UserError


def test_embedded_default_gets_its_own_knobs(monkeypatch):
    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "warm")
    cfg = build_config(None, {})
    for k, v in EMBEDDED_DEFAULTS.items():
        assert getattr(cfg, k) == v, k
    # A flag still wins over the embedded default's value.
    assert build_config(None, {"steps": 3}).steps == 3


def test_own_model_keeps_the_plain_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "warm")
    cfg = build_config(None, {"local_model_dir": str(tmp_path)})
    plain = TrainConfig()
    for k in EMBEDDED_DEFAULTS:
        assert getattr(cfg, k) == getattr(plain, k), k
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"local_model_dir: {tmp_path}\n")
    assert build_config(str(yaml), {}).learning_rate == plain.learning_rate


def test_random_embedded_model_keeps_the_plain_defaults(monkeypatch):
    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "random")
    assert build_config(None, {}).batch_size == TrainConfig().batch_size


def test_unknown_embedded_model_choice_is_one_line(monkeypatch):
    from tunix_sglang.warmstart import embedded_model_dir

    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "big")
    with pytest.raises(UserError, match="TUNIX_SGLANG_EMBEDDED_MODEL='big' is unknown"):
        embedded_model_dir()
    with pytest.raises(UserError, match="TUNIX_SGLANG_EMBEDDED_MODEL='big' is unknown"):
        build_config(None, {})


def test_prompt_length_default_fits_the_data(monkeypatch):
    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "random")
    assert build_config(None, {}).max_prompt_length == 128  # the embedded default's shapes
    assert build_config(None, {"data": "gsm8k"}).max_prompt_length == 256
    assert build_config(None, {"data": "gsm8k", "max_prompt_length": 300}).max_prompt_length \
        == 300


def test_a_later_layer_replaces_one_choice(tmp_path, monkeypatch):
    """A flag naming the model (or the rollout servers) replaces what the YAML chose."""
    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "random")
    yaml = tmp_path / "r.yaml"
    yaml.write_text("model: Qwen/Qwen3-0.6B\nrollout_engine: sglang_jax_remote\n"
                    "rollout_servers: http://rollout-0:8000\n")
    cfg = build_config(str(yaml), {"local_model_dir": str(tmp_path), "launch_servers": 2})
    assert (cfg.local_model_dir, cfg.model) == (str(tmp_path), None)
    assert (cfg.launch_servers, cfg.rollout_servers) == (2, None)
    assert build_config(str(yaml), {}).model == "Qwen/Qwen3-0.6B"
    with pytest.raises(UserError, match="both name the model"):
        build_config(None, {"local_model_dir": str(tmp_path), "model": "Qwen/Qwen3-0.6B"})


def test_target_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "random")
    assert build_config(None, {"target": "tpu-v4-8"}).target == "tpu-v4-8"
    yaml = tmp_path / "r.yaml"
    yaml.write_text("target: tpu-v4-9\n")
    with pytest.raises(UserError, match="target 'tpu-v4-9' is unknown; use one of tpu-v4-8"):
        build_config(str(yaml), {})


@pytest.mark.parametrize("text, match", [
    ("model: [Qwen/Qwen3-0.6B]\n", "model: .* must be a single value"),  # was a TypeError
    ("data: [gsm8k]\n", "data: .* must be a single value"),  # unhashable in a dict lookup
    ("1: 2\n", r"unknown keys \['1'\]"),  # was an AttributeError on the key
])
def test_yaml_of_the_wrong_shape_is_one_line(text, match, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "random")
    yaml = tmp_path / "r.yaml"
    yaml.write_text(text)
    with pytest.raises(UserError, match=match):
        build_config(str(yaml), {})


def test_yaml_list_of_rollout_servers(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNIX_SGLANG_EMBEDDED_MODEL", "random")
    yaml = tmp_path / "r.yaml"
    yaml.write_text("rollout_engine: sglang_jax_remote\nrollout_servers: [http://a:1, "
                    "http://b:2]\ndata_path: 2024\n")
    cfg = build_config(str(yaml), {})
    assert (cfg.rollout_servers, cfg.data_path) == ("http://a:1,http://b:2", "2024")
