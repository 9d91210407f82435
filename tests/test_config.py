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
