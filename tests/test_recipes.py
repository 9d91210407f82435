"""The recipes in recipes/: each is a valid config, its plan for the TPU slice it names (pinned:
no TPU here, so this is the check that the TPU path is configured as intended), and its
embedded-size variant runs one step here through the same loading code."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, cli_cmd, hf_cache_with

from tunix_sglang import plan as plan_lib
from tunix_sglang.config import build_config
from tunix_sglang.tpu_targets import TARGETS, get_target

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
NAMES = [r.name for r in RECIPES]
# What each recipe's plan must say on its target: the device split and the engine's
# ServerArgs (None: no in-process engine).
ENGINE_4B = dict(device="tpu", attention_backend="fa", page_size=128, tp_size=1,
                 dtype="bfloat16", context_length=776)
PINNED = {
    "qwen3-4b-gsm8k-v4-8.yaml": dict(
        target="tpu-v4-8", trainer=[2, 3], rollout=[0, 1],
        engine=dict(ENGINE_4B, max_running_requests=4, max_total_tokens=3104,
                    max_prefill_tokens=1024, precompile_bs_paddings=[1, 4],
                    precompile_token_paddings=[256, 1024], mem_fraction_static=0.8)),
    "qwen3-4b-gsm8k-v4-16.yaml": dict(
        target="tpu-v4-16", trainer=list(range(8)), rollout=list(range(8)),
        engines=2, devices_per_engine=4,  # host-local: each worker's engine on its 4 chips
        engine=dict(ENGINE_4B, max_running_requests=8, max_total_tokens=6208,
                    max_prefill_tokens=2048, precompile_bs_paddings=[2, 8],
                    precompile_token_paddings=[512, 2048], mem_fraction_static=0.5)),
    "qwen3-4b-gsm8k-v4-16-vanilla.yaml": dict(
        target="tpu-v4-16", trainer=list(range(8)), rollout=list(range(8)), engine=None),
    "qwen3-4b-gsm8k-remote.yaml": dict(
        target="tpu-v4-8", trainer=[0, 1, 2, 3], rollout="remote servers", engine=None),
    "qwen3-0.6b-gsm8k-v5e-8.yaml": dict(
        target="tpu-v5e-8", trainer=list(range(8)), rollout=list(range(8)),
        engine=dict(ENGINE_4B, max_running_requests=32, max_total_tokens=24832,
                    max_prefill_tokens=8192, precompile_bs_paddings=[2, 8, 32],
                    precompile_token_paddings=[2048, 8192], mem_fraction_static=0.4)),
}


def offline_env(hf_home: Path) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def test_every_recipe_is_pinned_and_names_its_hardware():
    assert NAMES and set(NAMES) == set(PINNED)
    for recipe in RECIPES:
        cfg = build_config(str(recipe), {})
        assert cfg.target == PINNED[recipe.name]["target"] and cfg.target in TARGETS
        assert cfg.model and cfg.data == "gsm8k" and cfg.max_prompt_length == 256
        first_line = recipe.read_text().split("\n", 1)[0]
        assert first_line.startswith("#") and cfg.target.removeprefix("tpu-") in first_line


@pytest.mark.parametrize("name", NAMES)
def test_plan_of_each_recipe_on_its_target(name, cli_env, tmp_path):
    """`doctor --plan --config R --json` answers on this CPU machine, offline."""
    env = {**cli_env, **offline_env(tmp_path / "hf")}
    proc = subprocess.run(cli_cmd("doctor", "--plan", "--config", f"recipes/{name}", "--json"),
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    pin = PINNED[name]
    assert out["verdict"] == "fits" and out["fits"] and out["problems"] == []
    assert out["target"]["name"] == pin["target"]
    assert out["model"]["config_source"].startswith("shipped")
    assert out["devices"]["trainer"] == pin["trainer"]
    assert out["devices"]["rollout"] == pin["rollout"]
    for key in ("engines", "devices_per_engine"):
        assert out["devices"].get(key) == pin.get(key)
    assert out["engine"] == pin["engine"]
    cfg = build_config(str(REPO / "recipes" / name), {})
    assert out["largest_fitting"]["batch_size"] >= cfg.batch_size
    assert out["largest_fitting"]["max_new_tokens"] >= cfg.max_new_tokens


def test_largest_fitting_is_the_edge():
    cfg = build_config(str(REPO / "recipes" / "qwen3-4b-gsm8k-v4-16.yaml"), {})
    facts = plan_lib.target_facts(get_target(cfg.target))
    largest = plan_lib.largest_fitting(plan_lib.plan_run(cfg, facts))

    def feasible(**change) -> bool:
        return plan_lib.plan_run(dataclasses.replace(cfg, **change), facts).memory.feasible

    b, n = largest["batch_size"], largest["max_new_tokens"]
    assert feasible(batch_size=b) and not feasible(batch_size=b + 1)  # 8 trainers: b*4 splits
    assert feasible(max_new_tokens=n) and not feasible(max_new_tokens=n + 1)
    # The 0.6B recipe is for a v5e-8 host; the v6e-8 has the same layout and more HBM.
    small = build_config(str(REPO / "recipes" / "qwen3-0.6b-gsm8k-v5e-8.yaml"), {})
    assert plan_lib.plan_run(small, plan_lib.target_facts(get_target("tpu-v6e-8"))).fits


def test_a_recipe_on_a_slice_too_small_does_not_fit(run_cli, tmp_path):
    p = run_cli("doctor", "--plan", "--config", "recipes/qwen3-4b-gsm8k-v4-16.yaml",
                "--target", "tpu-v5e-4", "--json", env=offline_env(tmp_path / "hf"))
    assert p.returncode == 1, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["verdict"] == "does not fit" and not out["memory"]["static_fits"]
    assert out["largest_fitting"]["batch_size"] is None
    assert any("exceed the device memory" in x for x in out["problems"])
    bad = run_cli("doctor", "--plan", "--config", "recipes/qwen3-4b-gsm8k-v4-8.yaml",
                  "--target", "tpu-v9-8", timeout=60)
    err = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(err) == 1 and "tpu-v4-8" in err[0], bad.stderr


def test_plan_engine_settings_are_the_rollouts(tmp_path):
    """The plan's engine settings are what the in-process rollout derives from the run's
    rollout config for the same run."""
    from tunix_sglang.rollout.base import derive_settings
    from tunix_sglang.tunix_cluster import train_rollout_config

    for recipe in RECIPES:
        cfg = build_config(str(recipe), {})
        if cfg.rollout_engine != "sglang_jax":
            continue
        path = plan_lib.model_config(cfg)[0].parent
        derived = derive_settings(None, None, train_rollout_config(cfg, [0]), path, cfg)
        assert plan_lib.engine_settings(cfg, path) == derived, recipe.name


def test_shipped_configs_are_tunix_presets():
    from tunix.models.qwen3.model import ModelConfig

    from tunix_sglang import hub, models

    presets = {"Qwen/Qwen3-0.6B": ModelConfig.qwen3_0p6b(),
               "Qwen/Qwen3-4B-Instruct-2507": ModelConfig.qwen3_4b_instruct_2507()}
    fields = ("num_layers", "vocab_size", "embed_dim", "hidden_dim", "num_heads", "head_dim",
              "num_kv_heads", "rope_theta", "norm_eps", "use_tied_embedding")
    for name, preset in presets.items():
        path = hub.published_config(name)
        md = models.ModelDir(path.parent, json.loads(path.read_text()))
        ours = models.tunix_model_config(md)
        assert {f: getattr(ours, f) for f in fields} == {f: getattr(preset, f) for f in fields}
    recipe_models = {build_config(str(r), {}).model for r in RECIPES}
    assert recipe_models == set(presets)


# ---------------------------------------------------------------------------------------------
# Each recipe at the embedded model's size: one step here, offline, the model by name from a
# Hugging Face cache, with the recipe's engine, device split, multi-host mode, dtype and sync
# threshold; batch and lengths shrunk (their plan on the TPU is pinned above).
SHRUNK = ["--batch-size", "2", "--num-generations", "2", "--max-prompt-length", "128",
          "--max-new-tokens", "16", "--steps", "1", "--eval-limit", "0"]


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory) -> Path:
    from tunix_sglang.tiny_model import ensure_tiny_model

    hf_home = tmp_path_factory.mktemp("hf")
    hf_cache_with(ensure_tiny_model(cache_dir=tmp_path_factory.mktemp("m")), hf_home,
                  "tiny-org/tiny-qwen3")
    return hf_home


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory) -> Path:
    """GSM8K-format train/test files: synthetic problems (prompts of at most 102 tokens for
    the tiny model), every second test question made longer than 128 tokens."""
    from tunix_sglang import data

    d = tmp_path_factory.mktemp("gsm8k")
    train, test = data.synthetic_split(n_train=64, n_test=8, seed=0)
    test = [dataclasses.replace(p, question=p.question + " Tom has 3 apples." * 30 * (i % 2))
            for i, p in enumerate(test)]
    for split, probs in (("train", train), ("test", test)):
        (d / f"{split}.jsonl").write_text("".join(
            json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in probs))
    return d


# (launch processes or 0, devices per process) each variant runs on: the target's layout,
# scaled down where the CPU would only repeat work (a replicated engine on 8 devices).
LAYOUT = {"qwen3-4b-gsm8k-v4-8.yaml": (0, 4), "qwen3-4b-gsm8k-v4-16.yaml": (2, 2),
          "qwen3-4b-gsm8k-v4-16-vanilla.yaml": (2, 2), "qwen3-4b-gsm8k-remote.yaml": (0, 2),
          "qwen3-0.6b-gsm8k-v5e-8.yaml": (0, 2)}
SMALLEST = "qwen3-0.6b-gsm8k-v5e-8.yaml"  # the quickest variant: one process, its checkpoint


@pytest.fixture(scope="module")
def variant_run(cli_env, tiny_hub, gsm8k_dir, tmp_path_factory):
    """`variant_run(name)`: the embedded-size variant of recipe `name` trained one step (once
    per module: the eval test reuses a run's checkpoint); (process, output dir)."""
    runs: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def run(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        if name in runs:
            return runs[name]
        recipe = build_config(str(REPO / "recipes" / name), {})
        out = tmp_path_factory.mktemp("run") / "run"
        args = ["train", "--config", f"recipes/{name}", "--model", "tiny-org/tiny-qwen3",
                *SHRUNK, "--data-path", str(gsm8k_dir), "--output-dir", str(out)]
        if recipe.rollout_engine == "sglang_jax_remote":
            args += ["--launch-servers", "1"]  # replaces the recipe's server URLs
        procs, per = LAYOUT[name]
        env = {**cli_env, **offline_env(tiny_hub),
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={per}"}
        if procs:
            args = ["launch", "--num-processes", str(procs), "--devices-per-process", str(per),
                    "--", *args]
        runs[name] = subprocess.run(cli_cmd(*args), capture_output=True, text=True,
                                    timeout=900, env=env, cwd=REPO), out
        return runs[name]

    return run


@pytest.mark.parametrize("name", NAMES)
def test_embedded_size_variant_runs_one_step(name, variant_run):
    recipe = build_config(str(REPO / "recipes" / name), {})
    p, out = variant_run(name)
    procs, _ = LAYOUT[name]
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    saved = json.loads((out / "config.json").read_text())
    for key in ("rollout_engine", "rollout_devices", "dtype", "multihost_mode", "target",
                "sglang_mem_fraction_static", "learning_rate", "sync_check_threshold", "data"):
        assert saved[key] == getattr(recipe, key), key
    assert saved["model"] == "tiny-org/tiny-qwen3" and saved["local_model_dir"] is None
    for metrics in [out / "metrics.jsonl", *out.glob("metrics.process*.jsonl")]:
        (row,) = [json.loads(x) for x in metrics.read_text().splitlines()]
        assert row["step"] == 1
        if recipe.rollout_engine == "vanilla":  # Tunix's sampler is the trainer's model
            assert row["sync_check"] == "shared"
        else:  # proven at the recipe's dtype's default threshold
            assert row["sync_check"] == "proven", row
            assert row["sync_max_logprob_diff"] <= row["sync_threshold"], row
    assert len(list(out.glob("metrics.process*.jsonl"))) == max(0, procs - 1)


def test_relative_run_dir_in_eval(run_cli, variant_run, tiny_hub, gsm8k_dir):
    """`eval --run-dir runs/...` (relative, as train prints it) works: Orbax gets it absolute.
    The run is a recipe variant's (trained once for both tests)."""
    p, out = variant_run(SMALLEST)
    assert p.returncode == 0, p.stderr[-3000:]
    env = offline_env(tiny_hub)
    rel = os.path.relpath(out, REPO)
    assert not Path(rel).is_absolute()
    p = run_cli("eval", "--run-dir", rel, "--data", "gsm8k", "--data-path", str(gsm8k_dir),
                "--rollout-engine", "vanilla", "--max-new-tokens", "8",
                "--max-prompt-length", "128", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"eval [{rel} step 1]" in p.stdout and p.stdout.rstrip().endswith("n=4")
    # Prompts over --max-prompt-length are skipped, counted, with the flag that keeps them.
    skipped = [line for line in p.stdout.splitlines() if line.startswith("skipped ")]
    assert skipped == [skipped[0]] and skipped[0].startswith(
        "skipped 4 of 8 held-out prompts longer than --max-prompt-length 128 tokens"), p.stdout
    p = run_cli("eval", "--run-dir", rel, "--data", "gsm8k", "--data-path", str(gsm8k_dir),
                "--limit", "4", "--max-prompt-length", "10", env=env)
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(err) == 1 and "raise --max-prompt-length" in err[0], err

