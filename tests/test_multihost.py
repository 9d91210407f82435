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
    import sys, time
    from tunix_sglang.cluster import Topology, initialize, step_barrier, DesyncError
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
        sys.exit(3)
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


PLACE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from tunix_sglang.cluster import Topology, initialize
    initialize(Topology("127.0.0.1:" + sys.argv[2], 2, int(sys.argv[1])))
    from tunix_sglang.compat.sglang_jax_fixes import place_replicated
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
    port = str(free_port())
    env = {**cli_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-c", PLACE, str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, 9)
            p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert out.count("PLAIN DEVICE_PUT REFUSED") == 2, out[-3000:]
        assert "PLACED" in out and "GLOBAL DEVICES OK" in out, out[-3000:]
