"""Models by name (`--model ORG/NAME`) without the network: a model laid out in a temporary
Hugging Face cache is used as it is; one that is neither cached nor reachable is one line.
"Unreachable" is real: HF_ENDPOINT points at a closed port on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, hf_cache_with

from tunix_sglang.config import check_model_name
from tunix_sglang.errors import UserError
from tunix_sglang.models import inspect_model_dir

NAME = "tiny-org/tiny-qwen3"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tunix_sglang.tiny_model import ensure_tiny_model

    return ensure_tiny_model(cache_dir=tmp_path_factory.mktemp("m"))


def no_hub(hf_home) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9"}


def test_cached_model_is_used_when_the_hub_is_unreachable(tiny_dir, tmp_path, cli_env):
    snapshot = hf_cache_with(tiny_dir, tmp_path / "hf", NAME)
    env = {**cli_env, **no_hub(tmp_path / "hf")}
    code = f"from tunix_sglang.hub import fetch; print(fetch({NAME!r}))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == str(snapshot)
    # The plan reads the cached config.json (what the run would load), not a shipped one.
    p = subprocess.run([sys.executable, "-m", "tunix_sglang.cli", "doctor", "--plan", "--model",
                        NAME, "--target", "tpu-v5e-1", "--json"], capture_output=True,
                       text=True, env=env, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["model"]["config_source"] == "Hugging Face cache"
    assert out["model"]["config_json"] == str(snapshot / "config.json")


@pytest.mark.parametrize("command", [
    ["train", "--steps", "1"],
    ["eval", "--limit", "1"],
    ["serve"],
    ["doctor", "--plan", "--target", "tpu-v4-8"],
])
def test_neither_cached_nor_reachable_is_one_line(command, run_cli, tmp_path):
    p = run_cli(*command, "--model", "missing-org/missing-model", timeout=180,
                env=no_hub(tmp_path / "hf"))
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.stdout[-1000:], p.stderr[-2000:])
    assert len(err) == 1 and "Traceback" not in p.stderr, err
    assert "--model missing-org/missing-model" in err[0]
    assert "huggingface-cli download" in err[0] and "--local-model-dir" in err[0], err[0]


def shard_in_two(model_dir: Path) -> Path:
    """Split the weights into two shards with an index, as large checkpoints ship; returns
    the second shard."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:]), 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, str(model_dir / shard))
        weight_map |= dict.fromkeys(part, shard)
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return model_dir / shard


def test_incomplete_cached_copy_is_one_line(tiny_dir, tmp_path, run_cli):
    """An interrupted download, offline: one shard of two (was a ValueError traceback from
    Tunix's loader, about a ShapeDtypeStruct, after the model had started loading)."""
    snapshot = hf_cache_with(tiny_dir, tmp_path / "hf", NAME)
    shard_in_two(snapshot).unlink()
    p = run_cli("eval", "--model", NAME, "--limit", "1", timeout=180,
                env=no_hub(tmp_path / "hf"))
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(err) == 1 and "incomplete" in err[0], p.stderr[-2000:]


def test_local_model_dir_missing_a_shard(tiny_dir, tmp_path):
    local = Path(shutil.copytree(tiny_dir, tmp_path / "m"))
    second = shard_in_two(local)
    inspect_model_dir(local)  # complete: fine
    second.unlink()
    with pytest.raises(UserError, match="1 weight files its model.safetensors.index.json "
                                        "lists are missing"):
        inspect_model_dir(local)


def test_model_names_are_checked(tmp_path):
    check_model_name("Qwen/Qwen3-0.6B")
    for bad in ("qwen3", "Qwen/Qwen3/extra", "https://huggingface.co/Qwen/Qwen3-0.6B"):
        with pytest.raises(UserError, match="ORG/NAME"):
            check_model_name(bad)
    local = tmp_path / "org" / "model"
    local.mkdir(parents=True)
    with pytest.raises(UserError, match="--local-model-dir"):
        check_model_name(str(local))
