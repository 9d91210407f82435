"""Shared test set-up: CPU JAX, a per-session cache dir, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


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
