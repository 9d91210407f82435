"""Several JAX processes on 127.0.0.1 as one cluster: launcher, lockstep training, desync."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

from conftest import REPO

from tunix_sglang.launch import free_port


def _run_two_processes(script: str, env: dict, timeout: float):
    """Run `python -c script PROCESS_ID PORT` as processes 0 and 1 of one cluster; both are
    killed if still running after `timeout`. Returns (processes, outputs)."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, 9)
            p.wait()
    return procs, outs


def _losses(path):
    return [json.loads(x)["loss"] for x in path.read_text().splitlines()]


def test_launch_two_processes_vanilla_identical_losses(run_cli, tmp_path):
    out = tmp_path / "run"
    p = run_cli("launch", "--num-processes", "2", "--devices-per-process", "2", "--",
                "train", "--rollout-engine", "vanilla", "--steps", "3",
                "--output-dir", str(out), timeout=900)
    assert p.returncode == 0, p.stdout[-4000:]
    for i in (0, 1):
        assert re.search(rf"^\[p{i}\] DONE: steps=3 ", p.stdout, re.M), p.stdout[-3000:]
        steps = re.findall(rf"^\[p{i}\] Train step (\d+) training loss", p.stdout, re.M)
        assert steps == ["1", "2", "3"]
    assert _losses(out / "metrics.jsonl") == _losses(out / "metrics.process1.jsonl")


def test_launch_stops_every_process_on_timeout(run_cli, tmp_path):
    t0 = time.monotonic()
    p = run_cli("launch", "--num-processes", "2", "--timeout", "8", "--",
                "train", "--rollout-engine", "vanilla", "--steps", "100000",
                "--output-dir", str(tmp_path / "run"), timeout=300)
    assert p.returncode == 124
    assert "stopping all" in p.stderr
    assert time.monotonic() - t0 < 120
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "run") not in ps


DESYNC = textwrap.dedent("""
    import os, sys, time
    from tunix_sglang.topology import Topology, initialize, step_barrier, DesyncError
    pid = int(sys.argv[1])
    initialize(Topology("127.0.0.1:" + sys.argv[2], 2, pid))
    step_barrier("step1", timeout_s=5)
    if pid == 1:
        time.sleep(30)   # process 1 stops taking part: a desync
        sys.exit(0)
    try:
        step_barrier("step2", timeout_s=5)
    except DesyncError as e:
        print("DESYNC:", e, flush=True)
        os._exit(3)  # as the rollout does (hard exit): not jax's shutdown barrier
""")


def test_desync_is_reported_not_hung(cli_env):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", DESYNC, str(i), port], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO) for i in (0, 1)]
    t0 = time.monotonic()
    try:
        out0, _ = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, 9)
            p.wait()
    assert procs[0].returncode == 3, out0[-2000:]
    assert "DESYNC: process 0: barrier 'step2' timed out" in out0
    assert "missing process(es) [1]" in out0
    assert time.monotonic() - t0 < 45


LIVENESS = textwrap.dedent("""
    import os, sys, time
    from tunix_sglang.topology import (Topology, initialize, live_barrier, stall_guard,
                                      DesyncError)
    pid = int(sys.argv[1])
    initialize(Topology("127.0.0.1:" + sys.argv[2], 2, pid))
    # 1. Slow but busy: process 1 computes for 12 s (stall bound 5 s) before arriving.
    if pid == 1:
        t = time.process_time()
        while time.process_time() - t < 12:
            pass
    t0 = time.monotonic()
    live_barrier("slow", stall_s=5)
    print(f"SLOW OK after {time.monotonic() - t0:.0f}s", flush=True)
    # 2. Stuck: process 1 blocks without burning CPU (as inside a collective that never
    #    completes); process 0 waits for it at a barrier.
    if pid == 1:
        def on_stall(msg):
            print("STALL:", msg, flush=True)
            os._exit(4)
        with stall_guard("the stuck operation", on_stall, stall_s=5):
            time.sleep(120)
    try:
        live_barrier("after", stall_s=5)
    except DesyncError as e:
        print("DESYNC:", e, flush=True)
        os._exit(3)  # as the rollout does: the peer will never join jax's shutdown
""")


def test_liveness_waits_for_busy_processes_and_fails_on_stuck_ones(cli_env):
    """Waits of unknown length (engine start-up, precompile, lockstep engine calls) last as
    long as some process is busy, and fail within the stall bound, naming the missing
    process, once every process is idle: stuck in a collective or dead."""
    procs, outs = _run_two_processes(LIVENESS, cli_env, timeout=120)
    # Process 0 waited the full 12 s of process 1's work, more than the 5 s stall bound.
    waited = re.search(r"SLOW OK after (\d+)s", outs[0])
    assert waited and int(waited.group(1)) >= 9, outs[0][-2000:]
    assert "SLOW OK" in outs[1], outs[1][-2000:]
    assert procs[0].returncode == 3, outs[0][-2000:]
    assert "barrier 'after': process(es) [1] missing; no process has made progress" in outs[0]
    assert procs[1].returncode == 4, outs[1][-2000:]
    assert "STALL: process 1: the stuck operation: no process has made progress" in outs[1]


def test_stall_watch_counts_idle_time_across_processes():
    from tunix_sglang.topology import HEARTBEAT_S, StallWatch

    now, cpu = [0.0], {0: 0.0, 1: 0.0}
    watch = StallWatch(read=lambda: dict(cpu), clock=lambda: now[0])
    for _ in range(5):  # process 1 busy (a compile), process 0 idle: progress
        now[0] += HEARTBEAT_S
        cpu[1] += HEARTBEAT_S * 0.9
        assert watch.observe() == 0.0 and watch.busy_processes == {1}
    for i in range(1, 6):  # both idle but for background noise below the threshold
        now[0] += HEARTBEAT_S
        cpu[0] += HEARTBEAT_S * 0.02
        assert watch.observe() == i * HEARTBEAT_S and not watch.busy_processes
    now[0] += HEARTBEAT_S
    cpu[0] += HEARTBEAT_S * 0.5  # progress again resets the clock
    assert watch.observe() == 0.0


PLACE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from tunix_sglang.topology import Topology, initialize
    initialize(Topology("127.0.0.1:" + sys.argv[2], 2, int(sys.argv[1])))
    from tunix_sglang.engine.scheduler_hooks import place_replicated
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    local = jax.local_devices()[0]
    key = jax.device_put(jax.random.key(7), local)  # as the sampler's: committed, typed
    count = jax.device_put(np.uint32(3), local)
    for x in (key, count):
        try:
            jax.device_put(x, rep)
            print("PLAIN DEVICE_PUT OK")
        except Exception as e:
            print("PLAIN DEVICE_PUT REFUSED", type(e).__name__)
    k, c = place_replicated(key, rep), place_replicated(count, rep)
    assert k.sharding == rep and c.sharding == rep and not k.is_fully_addressable
    assert jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(k).addressable_shards[0].data)
    assert (data == np.asarray(jax.random.key_data(jax.random.key(7)))).all()
    assert int(c.addressable_shards[0].data) == 3
    print("PLACED")
    from tunix_sglang.engine import EngineSettings, select_devices
    from tunix_sglang.errors import UserError
    base = dict(max_prompt_len=8, max_new_tokens=8, batch_size=2)
    devs = select_devices(EngineSettings("/m", global_devices=True, **base))
    assert devs == jax.devices() and {d.process_index for d in devs} == {0, 1}
    other = [d.id for d in jax.devices() if d.process_index != jax.process_index()]
    assert [d.id for d in select_devices(
        EngineSettings("/m", global_devices=True, device_ids=tuple(other), **base))] == other
    try:
        select_devices(EngineSettings("/m", device_ids=tuple(other), **base))
    except UserError as e:
        assert "not local devices" in str(e)
        print("GLOBAL DEVICES OK")
""")


def test_engine_state_and_devices_on_a_mesh_spanning_processes(cli_env):
    """What a lockstep engine needs from a 2-process cluster: its sampler RNG state
    (committed to one local device) placed on a mesh over both processes (`jax.device_put`
    refuses it, `place_replicated` places it), and `select_devices` choosing among every
    process's devices only with `global_devices`."""
    env = {**cli_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs, outs = _run_two_processes(PLACE, env, timeout=240)
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert out.count("PLAIN DEVICE_PUT REFUSED") == 2, out[-3000:]
        assert "PLACED" in out and "GLOBAL DEVICES OK" in out, out[-3000:]


def test_tpu_slice_workers_joins_only_multi_worker_slices():
    """On a TPU slice launched without flags `train` joins the other workers itself (JAX
    detects coordinator and ids); not on one host, not without a TPU, not under Pathways."""
    from tunix_sglang.topology import tpu_slice_workers

    two = {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}
    assert tpu_slice_workers(two, tpu=True) == 2
    assert tpu_slice_workers({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, tpu=True) == 0
    assert tpu_slice_workers({}, tpu=True) == 0
    assert tpu_slice_workers(two, tpu=False) == 0
    assert tpu_slice_workers({**two, "JAX_PLATFORMS": "proxy"}, tpu=True) == 0
