"""The single controller (RemoteRollout) against real rollout servers on 127.0.0.1.

Two servers launched by the controller for the module (as `--launch-servers 2` does); the
fault tests SIGKILL them for real, or restart one with its engine set to die
(TUNIX_SGLANG_INJECT_FAULT=server_engine_death). The last tests run `tunix-sglang train
--rollout-engine sglang_jax_remote --launch-servers 2`: with one server's engine dying, and
with every server killed mid-run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli_cmd, one_adamw_step, one_device_mesh, perturbed

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from tunix_sglang import faults, probe  # noqa: E402
from tunix_sglang.errors import UserError  # noqa: E402
from tunix_sglang.models import inspect_model_dir, load_model, load_tokenizer  # noqa: E402
from tunix_sglang.probe.scoring import tunix_token_logprobs  # noqa: E402
from tunix_sglang.rollout.launcher import LaunchedServer  # noqa: E402
from tunix_sglang.rollout.remote import (  # noqa: E402
    AllServersDownError,
    RemoteRollout,
    balance,
    group_prompts,
)
from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model  # noqa: E402

PROMPTS = ["Tom has 3 apples", "How many books", "Anna gives away 5 cookies", "What is 12 + 30"]
G = 2




class TrainCfg:  # the TrainConfig fields the controller reads
    batch_size, num_generations, sglang_mem_fraction_static, dtype, seed = 4, G, 0.8, \
        "float32", 0


@pytest.fixture(scope="module")
def md():
    return inspect_model_dir(ensure_tiny_model())


@pytest.fixture(scope="module")
def actor(md):
    return load_model(md, one_device_mesh())


@pytest.fixture(scope="module")
def tok(md):
    from tunix.generate.tokenizer_adapter import TokenizerAdapter

    return TokenizerAdapter(load_tokenizer(md))


def rollout_config(tok, temperature: float = 0.0, seed: int = 3):
    from tunix.rl.rollout import base_rollout

    return base_rollout.RolloutConfig(max_tokens_to_generate=8, max_prompt_length=32,
                                      temperature=temperature, top_p=1.0, top_k=None,
                                      eos_tokens=[tok.eos_id()], seed=seed)


@pytest.fixture(scope="module")
def rollout(md, actor, tok):
    factory = functools.partial(RemoteRollout, model_dir=md, train_config=TrainCfg(),
                                launch_servers=2, request_timeout=60, rollout_timeout=120)
    r = factory(rollout_actor=actor, tokenizer=tok, mesh=one_device_mesh(),
                rollout_config=rollout_config(tok))
    yield r
    r.close()
    assert all(not s.launched.alive() for s in r.servers)


def repeated() -> list[str]:
    return [p for p in PROMPTS for _ in range(G)]


def check_output(out, rollout, tok, model, prompts):
    """Exact count, original order (greedy tokens of each prompt's own model), logprobs."""
    assert len(out.tokens) == len(out.logprobs) == len(out.text) == len(prompts)
    assert out.left_padded_prompt_tokens.shape == (len(prompts), 32) and out.logits is None
    for p, row, t, lp, text in zip(prompts, out.left_padded_prompt_tokens, out.tokens,
                                   out.logprobs, out.text, strict=True):
        ids = tok.encode(p)
        assert row[-len(ids):].tolist() == ids
        assert set(row[:-len(ids)].tolist()) <= {rollout.pad_id()}
        assert text == tok.decode(t.tolist(), skip_special_tokens=True)
        ref = tunix_token_logprobs(model, ids, t, 0.0)
        assert np.max(np.abs(ref - lp)) <= 1e-4
    # Greedy: the G samples of one prompt are identical; distinct prompts keep their place.
    for i in range(0, len(prompts), G):
        assert all(out.tokens[i].tolist() == out.tokens[j].tolist() for j in range(i, i + G))
    assert rollout.last_samples.versions == [rollout.weight_version] * len(prompts)


def test_grouping_and_balance():
    assert group_prompts(["a", "a", "b", "b", "a"]) == [(0, 2), (2, 4), (4, 5)]
    groups = [(0, 4), (4, 6), (6, 8), (8, 12)]
    plan = balance(groups, [0, 1, 2, 3], 2)
    assert sorted(g for p in plan for g in p) == [0, 1, 2, 3]
    assert {sum(groups[g][1] - groups[g][0] for g in p) for p in plan} == {6}


def test_no_reachable_server_is_a_clean_error(actor, tok):
    t0 = time.monotonic()
    with pytest.raises(AllServersDownError, match="all 1 rollout servers are down"):
        RemoteRollout(actor, tok, one_device_mesh(), rollout_config(tok), servers="127.0.0.1:9")
    assert time.monotonic() - t0 < 15


def test_weak_token_refused(tok):
    with pytest.raises(UserError, match="at least 16 printable ASCII"):
        RemoteRollout(None, tok, None, rollout_config(tok), servers="127.0.0.1:9", token="a")


def test_server_faults_reach_one_launch_only():
    env = {faults.ENV: "server_engine_death@2,other@1", "X": "1"}
    assert faults.for_server(env, armed=True) == env
    assert faults.for_server(env, armed=False) == {faults.ENV: "other@1", "X": "1"}
    assert faults.for_server({faults.ENV: "server_engine_death"}, armed=False) == {}


def test_launched_and_synced(rollout, actor):
    from tunix.rl import utils as rl_utils

    assert len(rollout.servers) == 2 and rollout.weight_version == 0
    assert all(s.up and s.version == rollout.weight_version for s in rollout.servers)
    assert all(s.url.startswith("http://127.0.0.1:") for s in rollout.servers)
    assert rollout.model() is not actor
    assert not rl_utils.is_sharing_weights(actor, rollout.model())
    proof = probe.prove(rollout, actor, 0)
    assert sorted(proof.by_engine) == sorted(f"server {s.url}" for s in rollout.servers)
    assert proof.max_logprob_diff <= 1e-4


def test_generate_groups_order_and_versions(rollout, tok, actor):
    prompts = repeated()
    out = rollout.generate(prompts, rollout_config(tok))
    check_output(out, rollout, tok, actor, prompts)
    # All generations of one prompt on one server; both servers got work.
    for i in range(0, len(prompts), G):
        assert len(set(rollout.last_servers[i:i + G])) == 1
    assert set(rollout.last_servers) == {s.url for s in rollout.servers}
    assert rollout.last_rollout_stats["redispatched_groups"] == 0


def test_sampling_differs_per_sample(rollout, tok):
    out = rollout.generate([PROMPTS[0]] * 8, rollout_config(tok, temperature=5.0, seed=5))
    assert len({tuple(t.tolist()) for t in out.tokens}) > 1


def test_push_parity(rollout, tok, actor):
    other = perturbed(actor, scale=0.3)
    v = rollout.weight_version
    with pytest.raises(probe.NotArrivedError, match="did not arrive at the rollout server"):
        probe.prove(rollout, other, v)  # before the push: the servers are not `other`
    params = nnx.state(other, nnx.Param)
    with jax.transfer_guard_device_to_host("disallow_explicit"), \
            jax.transfer_guard_host_to_device("disallow_explicit"):  # as Tunix's sync_weights
        rollout.update_params(params, (nnx.Param,))
    push = rollout.last_push
    assert rollout.weight_version == push.version == v + 1
    assert sorted(push.servers) == sorted(s.url for s in rollout.servers) and not push.failed
    assert push.bytes > 0 and push.seconds > 0
    assert probe.prove(rollout, other, v + 1).max_logprob_diff <= 1e-4
    probe.prove(rollout, rollout.model(), v + 1)  # the private copy follows
    prompts = repeated()
    check_output(rollout.generate(prompts, rollout_config(tok)), rollout, tok, other, prompts)
    rollout.update_params(nnx.state(actor, nnx.Param), (nnx.Param,))
    probe.prove(rollout, actor, v + 2)


def test_sigkill_during_rollout_loses_and_duplicates_nothing(rollout, tok, actor):
    victim = rollout.servers[1]
    old_pid = victim.launched.pid
    killed = []

    def kill_during_rollout(rnd, assignment):
        if rnd == 0 and assignment.get(victim.url):
            victim.launched.kill()  # SIGKILL while its request is in flight
            killed.append(assignment[victim.url])

    rollout._after_dispatch = kill_during_rollout  # noqa: SLF001
    # Frozen first (SIGSTOP), so its request cannot finish before the SIGKILL lands, however
    # loaded the machine is; the kernel still accepts the connection.
    os.kill(old_pid, signal.SIGSTOP)
    try:
        prompts = repeated()
        out = rollout.generate(prompts, rollout_config(tok))
    finally:
        rollout._after_dispatch = None  # noqa: SLF001
    assert killed, "the victim got no work"
    check_output(out, rollout, tok, actor, prompts)
    assert rollout.last_rollout_stats["redispatched_groups"] == len(killed[0])
    assert rollout.last_samples.redispatched_groups == len(killed[0])  # what a step records
    survivor = rollout.servers[0].url
    assert rollout.last_servers == [survivor] * len(prompts)
    assert not victim.up
    # The controller relaunches a dead server it launched (same port), in the background.
    assert victim.launched.pid != old_pid


def test_restart_catches_up_before_work(rollout, tok, actor):
    victim = rollout.servers[1]
    # A push while the victim is still starting: only the survivor gets it.
    rollout.update_params(nnx.state(actor, nnx.Param), (nnx.Param,))
    assert victim.url in rollout.last_push.failed or victim.url not in rollout.last_push.servers
    victim.launched.wait_ready(180)
    prompts = repeated()
    out = rollout.generate(prompts, rollout_config(tok))
    # Brought to the current version by the controller, then given work.
    assert victim.up and victim.version == rollout.weight_version
    assert victim.call("GET", "/version")["weight_version"] == rollout.weight_version
    assert victim.url in rollout.last_servers
    check_output(out, rollout, tok, actor, prompts)
    probe.prove(rollout, actor, rollout.weight_version)  # the caught-up server included


def test_engine_death_is_a_dead_server(rollout, tok, actor):
    """A server whose engine dies mid-rollout answers 503 and exits (status 3): it is
    relaunched at once, and with no other server the rollout waits for it (it ended the run
    before), brings it to the current version and re-runs its groups there."""
    survivor, victim = rollout.servers
    old = victim.launched
    args = list(old.args)
    args[args.index("--port") + 1] = victim.url.rsplit(":", 1)[1]
    old.stop()
    # Started anew with the fault armed: its engine dies on its first generate.
    victim.launched = LaunchedServer(args, {**old.env, faults.ENV: "server_engine_death@1"})
    victim.launched.wait_ready(180)
    dying = victim.launched.proc
    rollout._mark_down(victim, "restarted by the test")  # noqa: SLF001 (seen down once)
    rollout.servers = [victim]  # the only server
    try:
        prompts = repeated()
        out = rollout.generate(prompts, rollout_config(tok))
    finally:
        rollout.servers = [survivor, victim]
    check_output(out, rollout, tok, actor, prompts)
    stats = rollout.last_rollout_stats
    assert stats["redispatched_groups"] == len(PROMPTS) and stats["rounds"] == 2
    assert dying.poll() == 3 and victim.launched.proc is not dying
    assert faults.ENV not in victim.launched.env  # the relaunch runs without the fault
    assert victim.up and victim.version == rollout.weight_version
    assert rollout.last_servers == [victim.url] * len(prompts)
    out = rollout.generate(prompts, rollout_config(tok))  # both servers again
    assert set(rollout.last_servers) == {survivor.url, victim.url}
    check_output(out, rollout, tok, actor, prompts)


def test_all_servers_down_is_clean_and_bounded(rollout, tok):
    rollout.relaunch_dead = False
    for s in rollout.servers:
        s.launched.kill()
    t0 = time.monotonic()
    with pytest.raises(AllServersDownError, match="all 2 rollout servers are down"):
        rollout.generate(repeated(), rollout_config(tok))
    with pytest.raises(AllServersDownError):
        rollout.update_params(nnx.state(rollout.model(), nnx.Param), (nnx.Param,))
    assert time.monotonic() - t0 < 30


def test_train_five_steps_one_server_engine_dies(run_cli, tmp_path):
    """`train --launch-servers 2 --steps 5` while the first server's engine dies on its 1st
    generate (step 1's rollout; the sync proof uses POST /probe): the run completes, every
    step with all its samples, every step's sync proven on every server."""
    out = tmp_path / "run"
    p = run_cli("train", "--rollout-engine", "sglang_jax_remote", "--launch-servers", "2",
                "--steps", "5", "--batch-size", "2", "--num-generations", "2",
                "--max-new-tokens", "16", "--sync-check-threshold", "1e-4", "--eval-limit", "0",
                "--output-dir", str(out), timeout=900,
                env={faults.ENV: "server_engine_death@1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.findall(r"^Train step (\d+) training loss", p.stdout, re.M) == list("12345")
    assert p.stdout.strip().splitlines()[-1].startswith("DONE: steps=5 ")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["num_samples"] for r in rows] == [4] * 5
    assert rows[0]["redispatched_groups"] > 0  # the dead server's groups, run elsewhere
    for r in rows:  # every server proven after every push; versions are the trainer's
        assert r["sync_check"] == "proven" and r["sync_max_logprob_diff"] <= 1e-4, r
        assert (r["weight_version"], r["rollout_weight_version"]) == (r["step"], r["step"] - 1)
        assert 0 <= r["mismatch_kl"] <= 1e-6 and r["mismatch_max_abs"] <= 1e-3, r


def _server_children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"tunix_sglang.server" in cmd:
            out.append(int(d.name))
    return out


def test_train_all_servers_killed_checkpoints_and_exits_one_line(cli_env, tmp_path):
    """Every rollout server SIGKILLed after step 2: the run writes its checkpoint and stops
    with one line (exit 2); the metrics of the finished steps stay."""
    out = tmp_path / "run"
    args = cli_cmd("train", "--rollout-engine", "sglang_jax_remote", "--launch-servers", "2",
                   "--steps", "50", "--batch-size", "2", "--num-generations", "2",
                   "--max-new-tokens", "16", "--eval-limit", "0", "--output-dir", str(out))
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=cli_env, cwd=REPO)
        killed = []
        try:
            for line in proc.stdout:
                if line.startswith("Train step 2 training loss"):
                    killed = _server_children(proc.pid)
                    for pid in killed:
                        os.kill(pid, signal.SIGKILL)
                    break
            proc.stdout.read()
            proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert len(killed) == 2
    stderr = err_path.read_text()
    assert proc.returncode == 2, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: all 2 rollout servers are down"), \
        lines
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] >= 2
    ckpt = max(int(d.name) for d in (out / "checkpoints" / "actor").iterdir()
               if d.name.isdigit())
    # The last trained step is checkpointed (one step past the last metrics row when the
    # servers died during that step's weight sync).
    assert steps[-1] <= ckpt <= steps[-1] + 1


# -- the sync proof over servers: every fault caught, whatever the learning rate -----------

FAULTS = "skip_sync@3,partial_sync@5,stale_server@7"


@pytest.fixture(scope="module", params=["tied", "untied"])
def faulty(request, tok, tmp_path_factory):
    """Two launched servers whose engines skip the sync to version 3 and leave one tensor
    unwritten at version 5, and of which the first acknowledges version 7 without applying
    it (`faults.for_server`); the controller is told nothing."""
    spec = TinyModelSpec(tie_word_embeddings=request.param == "tied")
    md = inspect_model_dir(ensure_tiny_model(spec, cache_dir=tmp_path_factory.mktemp("m")))
    actor = load_model(md, one_device_mesh())
    old = os.environ.get(faults.ENV)
    os.environ[faults.ENV] = FAULTS  # inherited by the servers, acted on there
    try:
        r = RemoteRollout(actor, tok, one_device_mesh(), rollout_config(tok), model_dir=md,
                          train_config=TrainCfg(), launch_servers=2, request_timeout=60)
    finally:
        if old is None:
            del os.environ[faults.ENV]
        else:
            os.environ[faults.ENV] = old
    yield r, actor
    r.close()


def test_every_server_fault_caught_after_a_step_at_lr_1e7(faulty):
    rollout, actor = faulty
    model = actor
    rollout.update_params(nnx.state(model, nnx.Param), (nnx.Param,), version=1)
    probe.prove(rollout, model, 1)
    urls = sorted(s.url for s in rollout.servers)
    for version, fault in ((3, "skip_sync"), (5, "partial_sync"), (7, "stale_server")):
        model = one_adamw_step(model, 1e-7, seed=version)
        rollout.update_params(nnx.state(model, nnx.Param), (nnx.Param,), version=version)
        assert all(s.version == version for s in rollout.servers)  # every server says so
        with pytest.raises(probe.NotArrivedError) as e:
            probe.prove(rollout, model, version)
        msg = str(e.value)
        # The stale server is the first launched; the others fail together, first URL named.
        where = rollout.servers[0].url if fault == "stale_server" else urls[0]
        assert msg.startswith(f"weight sync v{version} did not arrive at the rollout server "
                              f"{where}: engine parameter "), (fault, msg)
        if fault == "partial_sync":
            assert " 1 of " in msg
        # The next (clean) push is proven on every server again.
        rollout.update_params(nnx.state(model, nnx.Param), (nnx.Param,), version=version + 1)
        assert len(probe.prove(rollout, model, version + 1).by_engine) == 2
