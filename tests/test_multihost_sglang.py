"""The in-process sglang-jax rollout over several JAX processes (rollout/host_local.py,
rollout/lockstep.py over rollout/multiprocess.py).

Real engines, real `jax.distributed` clusters on 127.0.0.1 (2 processes x 2 CPU devices), each
process running `runner.train` with the run's --multihost-mode.

The model is the embedded tiny Qwen3, untied, with its EOS row of lm_head scaled up so that
temperature-1 completions end at random lengths: different hosts' shares finish at
different times, which is what breaks a naive multi-host engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from tunix_sglang.config import TrainConfig
from tunix_sglang.errors import UserError
from tunix_sglang.launch import free_port, process_env
from tunix_sglang.rollout import host_local, multiprocess
from tunix_sglang.tiny_model import ensure_tiny_model

EOS_SCALE = 10.0  # lm_head EOS row x10: ~20% of positions end a completion

DRIVER = textwrap.dedent("""
    import json, sys
    from tunix_sglang.config import TrainConfig
    from tunix_sglang.runner import train
    from tunix_sglang.topology import Topology

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    cfg.validate()
    train(cfg, Topology.from_env())
""")

# The naive configuration: one engine mesh over both processes (lockstep's), to which each
# process submits its own, differently sized share of the prompts with one seed everywhere,
# as hosts that schedule their own batches do. Only this driver builds it: each process's
# share replaces lockstep's broadcast of process 0's inputs.
NAIVE_DRIVER = textwrap.dedent("""
    import functools, json, sys
    import jax
    import tunix_sglang.rollout as rollout_pkg
    from tunix_sglang.config import TrainConfig
    from tunix_sglang.rollout.lockstep import LockstepRollout
    from tunix_sglang.runner import train
    from tunix_sglang.topology import Topology

    class Naive(LockstepRollout):
        def _agree_inputs(self, ids, seed):
            n, p = len(ids), self.process_count  # shares of sizes 1 : 2 : ... : p
            cut = [n * (i * (i + 1) // 2) // (p * (p + 1) // 2) for i in range(p + 1)]
            return ids[cut[self.process_index]:cut[self.process_index + 1]], seed

    rollout_pkg.engine_for = lambda cfg, md: functools.partial(Naive, model_dir=md,
                                                               train_config=cfg)
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    cfg.validate()
    train(cfg, Topology.from_env())
""")


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory, cli_env) -> Path:
    """Tiny untied Qwen3 whose completions end at random lengths (built in a subprocess:
    this test process must not start JAX)."""
    dst = tmp_path_factory.mktemp("eos-model") / "model"
    code = textwrap.dedent(f"""
        import shutil
        from pathlib import Path
        from safetensors.numpy import load_file, save_file
        from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model
        src = ensure_tiny_model(TinyModelSpec(tie_word_embeddings=False))
        dst = Path({str(dst)!r})
        shutil.copytree(src, dst)
        w = load_file(str(dst / "model.safetensors"))
        eos = 2  # <|im_end|>
        w["lm_head.weight"][eos] *= {EOS_SCALE}
        save_file(w, str(dst / "model.safetensors"))
    """)
    subprocess.run([sys.executable, "-c", code], env=cli_env, check=True, timeout=300,
                   cwd=REPO)
    return dst


def run_cluster(tmp_path: Path, env: dict, cfg: dict, mode: str, n: int = 2, k: int = 2,
                timeout: float = 400, extra_env: dict | None = None, driver_code: str = DRIVER):
    """Start n driver processes (one JAX cluster); wait (bounded) until all exit or one fails.

    Returns (exit codes, outputs, seconds). Survivors are SIGKILLed by PID.
    """
    driver = tmp_path / "driver.py"
    driver.write_text(driver_code)
    cfg = {**cfg, "multihost_mode": mode}
    port = free_port()
    procs, logs = [], []
    for i in range(n):
        log = tmp_path / f"out{i}.log"
        logs.append(log)
        penv = process_env({**env, **(extra_env or {})}, i, n, k, port)
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(driver), json.dumps(cfg)],
                                          env=penv, stdout=f, stderr=subprocess.STDOUT,
                                          cwd=REPO))
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                # as `tunix-sglang launch`: one failed; the rest get a bounded grace period
                deadline = min(deadline, time.monotonic() + 45)
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    return [p.returncode for p in procs], [x.read_text() for x in logs], time.monotonic() - t0


FAULT_DRIVER = textwrap.dedent("""
    import json, os, sys
    import jax
    from tunix_sglang import faults, grpo_step, probe, rewards, runner, tunix_cluster
    from tunix_sglang.config import TrainConfig
    from tunix_sglang.topology import Topology

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    cfg.validate()
    inputs = runner.prepare(cfg, Topology.from_env())
    cluster, algo = tunix_cluster.build_cluster(cfg, inputs.md, inputs.tokenizer)
    ctx = grpo_step.StepContext(cluster, algo, list(rewards.DEFAULT_REWARD_FNS), cfg.seed, None)
    grpo_step.initial_sync(ctx)
    results = []
    for step, fault in enumerate(json.loads(sys.argv[2]), start=1):
        os.environ[faults.ENV] = fault  # the sync at the end of this real step
        try:
            row = grpo_step.run_step(ctx, inputs.batches.batch(step), step).row()
            results.append([fault, "proven", row["sync_max_logprob_diff"]])
        except probe.SyncCheckError as e:
            results.append([fault, type(e).__name__, str(e)])
        finally:
            del os.environ[faults.ENV]
        grpo_step.initial_sync(ctx)  # a clean sync, proven, before the next step
    cluster.close()
    cluster.rollout.close()
    with open(os.path.join(cfg.output_dir, f"faults.process{jax.process_index()}.json"),
              "w") as f:
        json.dump(results, f)
""")


def train_cfg(out: Path, model: Path, steps: int) -> dict:
    return dict(rollout_engine="sglang_jax", steps=steps, batch_size=2, num_generations=2,
                max_new_tokens=16, max_prompt_length=128, eval_limit=0, output_dir=str(out),
                local_model_dir=str(model), checkpoint_every=1000)


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# Pure pieces, in this process
# ---------------------------------------------------------------------------------------


def test_share_bounds_cover_the_batch_contiguously():
    assert host_local.share_bounds(4, 2) == [(0, 2), (2, 4)]
    assert host_local.share_bounds(6, 4) == [(0, 1), (1, 3), (3, 4), (4, 6)]
    for n, p in ((8, 3), (1, 2), (16, 4)):
        b = host_local.share_bounds(n, p)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(b[i][1] == b[i + 1][0] for i in range(p - 1))


def test_host_seeds_differ_per_host_and_are_reproducible():
    assert host_local.host_seed(None, 1) is None
    seeds = [host_local.host_seed(1234, i) for i in range(4)]
    assert len(set(seeds)) == 4
    assert seeds == [host_local.host_seed(1234, i) for i in range(4)]


def test_pad_unpad_round_trip_keeps_global_order():
    toks = [np.array([1, 2, 3], np.int32), np.array([4], np.int32), np.array([5, 6], np.int32)]
    lps = [np.full(len(t), -0.5, np.float32) for t in toks]
    bounds = host_local.share_bounds(3, 2)  # host 0: 1 sample, host 1: 2 samples
    padded = [host_local.pad_samples(toks[lo:hi], lps[lo:hi], 2, 4) for lo, hi in bounds]
    stacked = [np.stack([p[j] for p in padded]) for j in range(3)]
    out_t, out_lp, per_host = host_local.unpad_samples(*stacked, bounds)
    assert [t.tolist() for t in out_t] == [t.tolist() for t in toks]
    assert per_host == [[3], [1, 2]]
    assert all(len(a) == len(b) for a, b in zip(out_lp, lps, strict=True))


def test_bad_timeout_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(multiprocess.ENV_TIMEOUT, "soon")
    with pytest.raises(UserError, match="TUNIX_SGLANG_MULTIHOST_TIMEOUT='soon' is not a number"):
        multiprocess.wait_timeout_s()
    monkeypatch.setenv(multiprocess.ENV_TIMEOUT, "45")
    assert multiprocess.wait_timeout_s() == 45.0


def test_unknown_multihost_mode_is_refused():
    with pytest.raises(UserError, match="--multihost-mode 'naive' is unknown"):
        TrainConfig(multihost_mode="naive").validate()


# ---------------------------------------------------------------------------------------
# Real clusters
# ---------------------------------------------------------------------------------------


def _assert_same_run(out: Path, steps: int) -> tuple[list[dict], list[dict]]:
    m0, m1 = rows(out / "metrics.jsonl"), rows(out / "metrics.process1.jsonl")
    assert [r["step"] for r in m0] == list(range(1, steps + 1))
    assert [r["loss"] for r in m0] == [r["loss"] for r in m1]
    for r in m0 + m1:
        assert r["sync_check"] == "proven" and r["sync_max_logprob_diff"] <= 1e-4, r
        assert (r["weight_version"], r["rollout_weight_version"]) == (r["step"], r["step"] - 1)
        assert r["mismatch_max_abs"] <= 1e-3, r
    return m0, m1


def test_host_local_two_processes_identical_losses(tmp_path, cli_env, eos_model):
    out = tmp_path / "run"
    codes, logs, _ = run_cluster(tmp_path, cli_env, train_cfg(out, eos_model, 3), "host_local")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert "DONE: steps=3" in log
    _assert_same_run(out, 3)
    s0 = rows(out / "multihost_rollout.process0.jsonl")
    s1 = rows(out / "multihost_rollout.process1.jsonl")
    # Every process returned the same full batch (the gather), made of both hosts' shares...
    assert [r["host_completion_lengths"] for r in s0] == [r["host_completion_lengths"]
                                                           for r in s1]
    assert all(r["mode"] == "host_local" and len(r["host_completion_lengths"]) == 2 for r in s0)
    # ...which ended at different lengths on different hosts in at least one step.
    assert any(sorted(r["host_completion_lengths"][0]) != sorted(r["host_completion_lengths"][1])
               for r in s0), s0


def test_lockstep_with_sampling_trains_in_step(tmp_path, cli_env, eos_model):
    """Lockstep: one engine over both processes, process 0's inputs broadcast, one seed.

    Temperature-1 sampling with random EOS times (completions of many lengths): both
    processes must finish with identical losses, every call having passed the check that
    both submitted the same requests, ran the same number of engine programs and got the
    same completions.
    """
    out = tmp_path / "run"
    codes, logs, secs = run_cluster(tmp_path, cli_env, train_cfg(out, eos_model, 3),
                                    "lockstep", timeout=500)
    both = logs[0] + logs[1]
    assert codes == [0, 0], (codes, both[-4000:])
    assert "tunix-sglang multihost:" not in both, both[-4000:]
    for log in logs:
        assert "DONE: steps=3" in log
    _assert_same_run(out, 3)
    s0 = rows(out / "multihost_rollout.process0.jsonl")
    s1 = rows(out / "multihost_rollout.process1.jsonl")
    assert all(r["mode"] == "lockstep" for r in s0)
    assert [r["host_completion_lengths"] for r in s0] == [r["host_completion_lengths"]
                                                           for r in s1]
    lengths = {n for r in s0 for h in r["host_completion_lengths"] for n in h}
    assert len(lengths) >= 3, lengths  # EOS at varied times, not all max_new_tokens


def test_naive_global_engine_is_detected_not_hung(tmp_path, cli_env, eos_model):
    """One engine mesh over both processes, each submitting its own, differently sized share
    (the reported configuration; NAIVE_DRIVER). Run as is, it aborts both processes inside
    gloo on the first call ("Received data size doesn't match expected size ... collective
    mismatch": measured) or hangs (TPU). Lockstep's pre-call check must instead report it on
    the first call, naming what differs, and every process must exit."""
    out = tmp_path / "run"
    codes, logs, secs = run_cluster(
        tmp_path, cli_env, train_cfg(out, eos_model, 4), "lockstep", timeout=300,
        extra_env={multiprocess.ENV_TIMEOUT: "15"}, driver_code=NAIVE_DRIVER)
    both = logs[0] + logs[1]
    assert secs < 280 and None not in codes, (codes, both[-4000:])  # nothing hung
    assert all(c != 0 for c in codes), (codes, both[-4000:])
    assert "DONE:" not in both
    for log in logs:  # every process reports it itself
        assert re.search(r"tunix-sglang multihost: process \d: lockstep generate #1: "
                         r"process\(es\) \[1\] had different requests, request counts "
                         r"than process 0 before the call", log), log[-4000:]
    assert "collective mismatch" not in both


@pytest.mark.parametrize("model", ["tied", "untied"])
@pytest.mark.parametrize("mode,faulted", [
    ("host_local", ["skip_sync", "partial_sync", "host_skip"]),
    ("lockstep", ["skip_sync", "partial_sync"]),
])
def test_every_fault_caught_on_every_host_at_lr_1e7(tmp_path, cli_env, eos_model, mode, faulted,
                                                    model):
    """Real GRPO steps at learning rate 1e-7 over 2 processes: a clean step is proven, and
    each step whose sync is faulted stops at its proof, on every process, naming the engine
    (host or process) that did not get the weights."""
    out = tmp_path / "run"
    out.mkdir()
    driver = tmp_path / "faults.py"
    driver.write_text(FAULT_DRIVER)
    path = ensure_tiny_model() if model == "tied" else eos_model
    cfg = dict(train_cfg(out, path, 1 + len(faulted)), learning_rate=1e-7, multihost_mode=mode)
    plan = ["", *faulted]
    port = free_port()
    procs = []
    for i in range(2):
        penv = process_env(cli_env, i, 2, 2, port)
        with open(tmp_path / f"out{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(driver), json.dumps(cfg),
                                           json.dumps(plan)], env=penv, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=REPO))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
    logs = "".join((tmp_path / f"out{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    label = "host" if mode == "host_local" else "process"
    for i in range(2):
        got = json.loads((out / f"faults.process{i}.json").read_text())
        assert [f for f, *_ in got] == plan
        for fault, verdict, detail in got:
            if not fault:
                assert verdict == "proven" and detail <= 1e-4, detail
                continue
            assert verdict == "NotArrivedError", (fault, verdict, detail)
            # host_skip: only the last host kept its old weights; otherwise every engine did
            # and the first one is named.
            where = f"{label} 1" if fault == "host_skip" else f"{label} 0"
            assert f"did not arrive at the rollout {where}: engine parameter " in detail, detail
