"""The in-process sglang-jax rollout over several JAX processes (rollout/multihost.py).

Real engines, real `jax.distributed` clusters on 127.0.0.1 (2 processes x 2 CPU devices).
Until `rollout.engine_for` selects the multihost rollout itself, each process runs a small
driver (written to tmp) that swaps `tunix_sglang.rollout.engine_for` in that process only;
the mode comes from TUNIX_SGLANG_MULTIHOST_MODE.

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

from tunix_sglang.errors import UserError
from tunix_sglang.launch import free_port, process_env
from tunix_sglang.rollout import multihost
from tunix_sglang.tiny_model import ensure_tiny_model

EOS_SCALE = 10.0  # lm_head EOS row x10: ~20% of positions end a completion

DRIVER = textwrap.dedent("""
    import json, sys
    import tunix_sglang.rollout as rollout_pkg
    from tunix_sglang.rollout import multihost

    _orig = rollout_pkg.engine_for

    def engine_for(cfg, model_dir):
        import jax
        if cfg.rollout_engine == "sglang_jax" and jax.process_count() > 1:
            return multihost.engine_for(cfg, model_dir)
        return _orig(cfg, model_dir)

    rollout_pkg.engine_for = engine_for
    from tunix_sglang.cluster import Topology
    from tunix_sglang.config import TrainConfig
    from tunix_sglang.runner import train

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    cfg.validate()
    import os
    if os.environ.get(multihost.ENV_MODE):  # after validate: naive_unsafe is test-only
        cfg.multihost_mode = os.environ[multihost.ENV_MODE]
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
                timeout: float = 400, extra_env: dict | None = None):
    """Start n driver processes (one JAX cluster); wait (bounded) until all exit or one fails.

    Returns (exit codes, outputs, seconds). Survivors are SIGKILLed by PID.
    """
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    port = free_port()
    procs, logs = [], []
    for i in range(n):
        log = tmp_path / f"out{i}.log"
        logs.append(log)
        penv = process_env({**env, multihost.ENV_MODE: mode, **(extra_env or {})}, i, n, k,
                           port)
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
    from tunix_sglang import faults, grpo_step, probe, rewards, runner
    from tunix_sglang.cluster import Topology
    from tunix_sglang.config import TrainConfig

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    cfg.validate()
    inputs = runner.prepare(cfg, Topology.from_env())
    cluster, algo = runner.build_cluster(cfg, inputs.md, inputs.tokenizer)
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
    assert multihost.share_bounds(4, 2) == [(0, 2), (2, 4)]
    assert multihost.share_bounds(6, 4) == [(0, 1), (1, 3), (3, 4), (4, 6)]
    for n, p in ((8, 3), (1, 2), (16, 4)):
        b = multihost.share_bounds(n, p)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(b[i][1] == b[i + 1][0] for i in range(p - 1))


def test_uneven_shares_for_the_naive_configuration():
    assert multihost.uneven_share_bounds(4, 2) == [(0, 1), (1, 4)]
    for n, p in ((8, 3), (16, 4), (6, 2)):
        b = multihost.uneven_share_bounds(n, p)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(b[i][1] == b[i + 1][0] for i in range(p - 1))
        sizes = [hi - lo for lo, hi in b]
        assert len(set(sizes)) == p and min(sizes) >= 1  # every host a different size


def test_host_seeds_differ_per_host_and_are_reproducible():
    assert multihost.host_seed(None, 1) is None
    seeds = [multihost.host_seed(1234, i) for i in range(4)]
    assert len(set(seeds)) == 4
    assert seeds == [multihost.host_seed(1234, i) for i in range(4)]


def test_pad_unpad_round_trip_keeps_global_order():
    toks = [np.array([1, 2, 3], np.int32), np.array([4], np.int32), np.array([5, 6], np.int32)]
    lps = [np.full(len(t), -0.5, np.float32) for t in toks]
    bounds = multihost.share_bounds(3, 2)  # host 0: 1 sample, host 1: 2 samples
    padded = [multihost.pad_samples(toks[lo:hi], lps[lo:hi], 2, 4) for lo, hi in bounds]
    stacked = [np.stack([p[j] for p in padded]) for j in range(3)]
    out_t, out_lp, per_host = multihost.unpad_samples(*stacked, bounds)
    assert [t.tolist() for t in out_t] == [t.tolist() for t in toks]
    assert per_host == [[3], [1, 2]]
    assert all(len(a) == len(b) for a, b in zip(out_lp, lps, strict=True))


def test_bad_timeout_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(multihost.ENV_TIMEOUT, "soon")
    with pytest.raises(UserError, match="TUNIX_SGLANG_MULTIHOST_TIMEOUT='soon' is not a number"):
        multihost.wait_timeout_s()
    monkeypatch.setenv(multihost.ENV_TIMEOUT, "45")
    assert multihost.wait_timeout_s() == 45.0


def test_mode_selection(monkeypatch):
    monkeypatch.delenv(multihost.ENV_MODE, raising=False)
    assert multihost.multihost_mode(None) == "host_local"
    monkeypatch.setenv(multihost.ENV_MODE, "lockstep")
    assert multihost.multihost_mode(None) == "lockstep"

    class Cfg:
        multihost_mode = "host_local"

    assert multihost.multihost_mode(Cfg()) == "host_local"  # the config field wins
    monkeypatch.setenv(multihost.ENV_MODE, "bogus")
    with pytest.raises(Exception, match="unknown"):
        multihost.multihost_mode(None)


FAKE_PATHWAYS = textwrap.dedent("""
    CALLS = []

    def reshard(x, sharding, *, donate, may_alias, cache_resharding_plans):
        import jax
        CALLS.append(dict(n=len(x), donate=donate, cache=cache_resharding_plans))
        return jax.device_put(x, sharding)
""")


def test_pathways_reshard_is_used_when_available_else_host_gather(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    params = {"layers.0.attn.q_proj.w": jnp.ones((2, 3)), "final_norm.w": jnp.arange(3.0)}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    # Not on Pathways (JAX_PLATFORMS without proxy): the open-source path.
    out, how = multihost.params_for_engine(params, mesh, platforms="cpu")
    assert how == "host_gather" and isinstance(out["final_norm.w"], np.ndarray)
    # proxy requested but pathwaysutils does not import: fall back, never fail.
    monkeypatch.setitem(sys.modules, "pathwaysutils", None)
    assert multihost.pathways_reshard_fn("proxy") is None
    assert multihost.params_for_engine(params, mesh, platforms="proxy")[1] == "host_gather"
    # A (fake) pathwaysutils with the experimental reshard API: used device to device.
    monkeypatch.delitem(sys.modules, "pathwaysutils")
    pkg = tmp_path / "pathwaysutils" / "experimental"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "reshard.py").write_text(FAKE_PATHWAYS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out, how = multihost.params_for_engine(params, mesh, platforms="proxy")
    from pathwaysutils.experimental import reshard as fake

    assert how == "pathways"
    assert fake.CALLS == [dict(n=2, donate=False, cache=True)]
    assert isinstance(out["final_norm.w"], jax.Array)
    np.testing.assert_array_equal(np.asarray(out["final_norm.w"]), [0.0, 1.0, 2.0])
    for name in list(sys.modules):
        if name.startswith("pathwaysutils"):
            monkeypatch.delitem(sys.modules, name)


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
    (the reported configuration). Run as is, it aborts both processes inside gloo on the
    first call ("Received data size doesn't match expected size ... collective mismatch":
    measured) or hangs (TPU). It must instead be reported on the first call by the pre-call
    check, naming the configuration and what differs, and every process must exit."""
    out = tmp_path / "run"
    codes, logs, secs = run_cluster(
        tmp_path, cli_env, train_cfg(out, eos_model, 4), multihost.NAIVE_MODE, timeout=300,
        extra_env={multihost.ENV_TIMEOUT: "15"})
    both = logs[0] + logs[1]
    assert secs < 280 and None not in codes, (codes, both[-4000:])  # nothing hung
    assert all(c != 0 for c in codes), (codes, both[-4000:])
    assert "DONE:" not in both
    for log in logs:  # every process reports it itself
        assert re.search(r"tunix-sglang multihost: process \d: naive_unsafe generate #1: "
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
        penv = process_env({**cli_env, multihost.ENV_MODE: mode}, i, 2, 2, port)
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
