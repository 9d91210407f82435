"""`tunix-sglang train` end to end with the real Tunix on CPU: lines, metrics, resume, errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import GSM8K_DIR, REPO, cli_cmd

from tunix_sglang.run_files import REQUIRED_KEYS

STEP_RE = re.compile(r"^Train step (\d+) training loss: (-?[\d.]+(?:e-?\d+)?)$", re.M)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_three_steps_vanilla(run_cli, tmp_path):
    out = tmp_path / "run"
    p = run_cli("train", "--rollout-engine", "vanilla", "--steps", "3", "--output-dir", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [int(m.group(1)) for m in STEP_RE.finditer(p.stdout)]
    assert steps == [1, 2, 3]
    assert re.search(r"^DONE: steps=3 elapsed_sec=\d+(\.\d+)?$", p.stdout, re.M)
    assert p.stdout.strip().splitlines()[-1].startswith("DONE:")
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2, 3]
    for x in r:
        assert set(REQUIRED_KEYS) <= set(x)
        # Tunix's own sampler is the trainer's model: nothing to sync, nothing to prove.
        assert x["sync_check"] == "shared" and x["sync_max_logprob_diff"] is None
    assert [x["weight_version"] for x in r] == [1, 2, 3]
    assert [x["rollout_weight_version"] for x in r] == [0, 1, 2]
    assert (out / "checkpoints" / "actor").is_dir()
    assert list((out / "tensorboard").rglob("*tfevents*"))


def test_resume_after_sigkill(cli_env, run_cli, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--rollout-engine", "vanilla", "--checkpoint-every", "2",
            "--output-dir", str(out)]
    proc = subprocess.Popen(cli_cmd(*args, "--steps", "200"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=cli_env, cwd=REPO)
    seen = []
    deadline = time.time() + 300
    try:
        for line in proc.stdout:
            m = STEP_RE.match(line.strip())
            if m:
                seen.append(int(m.group(1)))
            if len(seen) >= 5 or time.time() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(seen) >= 5, seen
    killed_at = seen[-1]
    ckpts = sorted(int(p.name) for p in (out / "checkpoints" / "actor").iterdir()
                   if p.name.isdigit())
    assert ckpts and ckpts[-1] >= 2
    last_ckpt = ckpts[-1]
    assert killed_at - last_ckpt <= 2  # loses at most the steps since the last checkpoint

    target = killed_at + 2
    p = run_cli(*args, "--steps", str(target), "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"Resumed from checkpoint at step {last_ckpt}" in p.stdout
    resumed = [int(m.group(1)) for m in STEP_RE.finditer(p.stdout)]
    assert resumed == list(range(last_ckpt + 1, target + 1))
    r = rows(out)
    assert [x["step"] for x in r] == list(range(1, target + 1))  # each step once, in order
    assert r[-1]["weight_version"] == target
    # Rows of re-run steps were moved aside, not lost.
    if killed_at > last_ckpt:
        assert (out / "metrics.jsonl.rerun").exists()


def test_injected_fault_stops_the_run_at_its_proof(run_cli, tmp_path):
    """In-process engine, learning rate 1e-7: step 1 is proven (its row has the proof's and
    the mismatch's figures), step 2's sync writes nothing and the run stops at its proof:
    exit 1, one line naming what did not arrive where, step 1's row intact."""
    out = tmp_path / "run"
    p = run_cli("train", "--steps", "4", "--learning-rate", "1e-7", "--eval-limit", "0",
                "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "16",
                "--output-dir", str(out), env={"TUNIX_SGLANG_INJECT_FAULT": "skip_sync@2"})
    assert p.returncode == 1, p.stderr[-3000:]
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(
        "error: weight sync v2 did not arrive at the rollout engine: engine parameter "), err
    assert err[0].endswith("[TUNIX_SGLANG_INJECT_FAULT=skip_sync@2 is set]")
    assert [int(m.group(1)) for m in STEP_RE.finditer(p.stdout)] == [1]
    (row,) = rows(out)
    assert row["step"] == 1 and set(REQUIRED_KEYS) <= set(row)
    assert row["sync_check"] == "proven" and row["sync_max_logprob_diff"] <= 1e-4
    assert (row["weight_version"], row["rollout_weight_version"]) == (1, 0)
    assert 0 <= row["mismatch_kl"] <= 1e-6 and row["mismatch_max_abs"] <= 1e-3
    assert (out / "config.json").is_file()


def test_unknown_fault_is_a_one_line_error(run_cli, tmp_path):
    p = run_cli("train", "--steps", "1", "--output-dir", str(tmp_path / "run"), timeout=120,
                env={"TUNIX_SGLANG_INJECT_FAULT": "skip_snyc"})
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        p.stderr.strip().splitlines()[0]]
    assert "unknown fault 'skip_snyc'" in p.stderr and "skip_sync" in p.stderr


BAD_INPUTS = [
    (["--local-model-dir", "/nonexistent/model"], "--local-model-dir"),
    (["--local-model-dir", str(REPO / "src")], "config.json"),
    (["--rollout-engine", "vllm"], "--rollout-engine"),
    (["--rollout-devices", "5"], "--rollout-devices"),
    (["--sglang-mem-fraction-static", "1.5"], "--sglang-mem-fraction-static"),
    (["--sglang-mem-fraction-static", "0"], "--sglang-mem-fraction-static"),
    (["--data", "gsm8k", "--data-path", "/nonexistent/gsm8k.jsonl"], "gsm8k.jsonl"),
    (["--batch-size", "1", "--num-generations", "3"], "--batch-size"),
    (["--num-generations", "1"], "--num-generations"),
    (["--rollout-engine", "sglang_jax_remote"], "sglang_jax_remote"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUTS, ids=[b[1] + str(i) for i, b in
                                                           enumerate(BAD_INPUTS)])
def test_bad_input_one_clear_line(run_cli, tmp_path, extra, needle):
    out = tmp_path / "run"
    # Two CPU devices so a 1x3 batch cannot be split over the trainer's devices.
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    p = run_cli("train", "--steps", "1", "--output-dir", str(out), *extra, env=env, timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr[-2000:])
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and needle in err[0], err[0]
    assert "Traceback" not in p.stderr
    assert not (out / "metrics.jsonl").exists()


def test_existing_run_is_not_overwritten(run_cli, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "actor" / "4"
    ckpt.mkdir(parents=True)
    p = run_cli("train", "--steps", "1", "--output-dir", str(out), timeout=120)
    assert p.returncode == 2 and "--resume" in p.stderr
    assert ckpt.is_dir()


def test_yaml_config_and_unknown_key(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    p = run_cli("train", "--config", str(bad), timeout=60)
    assert p.returncode == 2 and "stepz" in p.stderr


def test_train_on_gsm8k_files(run_cli, tmp_path):
    """GSM8K in its Hugging Face layout (the repository's sample): trains on train.jsonl and
    evaluates before and after on test.jsonl."""
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data: gsm8k\ndata_path: {GSM8K_DIR}\nsteps: 1\nmax_prompt_length: 512\n"
        f"max_new_tokens: 16\nrollout_engine: vanilla\noutput_dir: {out}\neval_limit: 4\n"
    )
    p = run_cli("train", "--config", str(cfg))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Train step 1 training loss" in p.stdout
    assert rows(out)[0]["step"] == 1
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [(e["step"], e["n"]) for e in evals] == [(0, 4), (1, 4)]
