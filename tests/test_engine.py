"""The in-process sglang-jax engine against the Tunix trainer model: real engine, CPU, no fakes.

One engine per module (start ~10 s): an untied tiny Qwen3 (flat output distributions, so
sampling is really random, and the untied lm_head is exercised). The rollout test builds a
second one the way Tunix's RLCluster does, from the tied default tiny model.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EngineAsRollout, one_device_mesh, perturbed, probe_diff

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tunix_sglang import probe  # noqa: E402
from tunix_sglang.engine import EngineSettings, IncompleteSyncError, InProcessEngine  # noqa: E402
from tunix_sglang.errors import UserError  # noqa: E402
from tunix_sglang.models import inspect_model_dir, load_model, load_tokenizer  # noqa: E402
from tunix_sglang.probe.scoring import tunix_greedy, tunix_token_logprobs  # noqa: E402
from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model  # noqa: E402

MAX_PROMPT, MAX_NEW, BATCH = 32, 16, 8
PROMPTS = [[11, 23, 42, 7, 99], [5, 64, 31, 17, 3, 58, 12], [300, 301]]



def trainer_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from the Tunix model: n full forward passes, no KV cache."""
    return tunix_greedy(model, prompt, n)



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    return ensure_tiny_model(TinyModelSpec(tie_word_embeddings=False), cache_dir=root)


@pytest.fixture(scope="module")
def trainer(model_dir):
    return load_model(inspect_model_dir(model_dir), one_device_mesh())


@pytest.fixture(scope="module")
def engine(model_dir, trainer):
    settings = EngineSettings.for_rollout(
        model_dir, max_prompt_len=MAX_PROMPT, max_new_tokens=MAX_NEW, num_prompts=2,
        num_generations=4,
    )
    eng = InProcessEngine(settings).start()
    eng.sync_from_tunix(trainer)
    yield eng
    eng.shutdown()


@pytest.fixture
def synced(engine, trainer):
    """The engine holding the trainer's weights (tests may leave other weights behind)."""
    engine.sync_from_tunix(trainer)
    return engine


# -- settings -----------------------------------------------------------------------------


def test_settings_come_from_rollout_shapes():
    s = EngineSettings.for_rollout("/m", max_prompt_len=100, max_new_tokens=28, num_prompts=2,
                                   num_generations=4)
    kw = s.server_args_values("cpu")
    assert kw["context_length"] == 136  # 100 + 28 + slack
    assert kw["max_running_requests"] == 8
    assert kw["max_total_tokens"] == 8 * 136
    assert kw["max_prefill_tokens"] == 800
    assert kw["precompile_bs_paddings"] == [2, 8]
    assert kw["precompile_token_paddings"] == [64, 200, 800]  # 64: the sync proof's prefill
    assert kw["page_size"] == 1 and kw["attention_backend"] == "native"
    assert kw["skip_tokenizer_init"] and kw["enable_single_process"]
    assert kw["load_format"] == "dummy" and kw["device"] == "cpu"


def test_settings_pass_only_fields_the_installed_serverargs_has():
    import dataclasses

    @dataclasses.dataclass
    class OldServerArgs:
        model_path: str
        context_length: int | None = None

    s = EngineSettings("/m", max_prompt_len=8, max_new_tokens=8, batch_size=2)
    kwargs, dropped = s.server_args_kwargs(OldServerArgs, backend="cpu")
    assert set(kwargs) == {"model_path", "context_length"}
    assert "page_size" in dropped and "enable_single_process" in dropped


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2])
def test_mem_fraction_validated(bad):
    with pytest.raises(UserError, match="--sglang-mem-fraction-static"):
        EngineSettings("/m", max_prompt_len=8, max_new_tokens=8, batch_size=2,
                       mem_fraction_static=bad)


def test_too_many_rollout_devices_is_a_user_error():
    from tunix_sglang.engine import select_devices

    s = EngineSettings("/m", max_prompt_len=8, max_new_tokens=8, batch_size=2,
                       rollout_devices=len(jax.local_devices()) + 1)
    with pytest.raises(UserError, match="--rollout-devices"):
        select_devices(s)


# -- weight sync --------------------------------------------------------------------------


def test_start_time_and_no_child_process(engine):
    import psutil

    assert engine.start_seconds is not None and engine.start_seconds < 120
    assert psutil.Process().children(recursive=True) == []  # enable_single_process: threads


def test_greedy_identical_to_trainer_after_sync(synced, trainer):
    samples = synced.generate(PROMPTS, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    for prompt, s in zip(PROMPTS, samples, strict=True):
        assert s.tokens.tolist() == trainer_greedy(trainer, prompt, 8)
    assert probe.prove(EngineAsRollout(synced), trainer, synced.weight_version).check == "proven"


def test_sync_changes_what_the_engine_computes(synced, trainer):
    other = perturbed(trainer)
    v0 = synced.weight_version
    # Before syncing `other`, the engine still computes `trainer`: far from `other`.
    before = probe_diff(EngineAsRollout(synced), other)
    engine_greedy = [s.tokens.tolist() for s in synced.generate(
        PROMPTS, max_new_tokens=8, temperature=0.0, ignore_eos=True)]
    other_greedy = [trainer_greedy(other, p, 8) for p in PROMPTS]
    assert before > 1e-2
    assert engine_greedy != other_greedy

    report = synced.sync_from_tunix(other)
    assert synced.weight_version == v0 + 1 == report.version
    assert report.num_params == len(synced.engine_param_names())
    after = probe.prove(EngineAsRollout(synced), other, v0 + 1).max_logprob_diff
    samples = synced.generate(PROMPTS, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert [s.tokens.tolist() for s in samples] == other_greedy
    assert after <= 1e-4
    # New weights, same shapes and shardings: nothing was recompiled.
    assert all(s.cache_miss_count == 0 for s in samples)


def test_incomplete_sync_is_caught_and_changes_nothing(synced, trainer):
    flat = {".".join(map(str, k)): v.value
            for k, v in nnx.state(trainer, nnx.Param).flat_state()}
    version = synced.weight_version
    dropped = dict(flat)
    del dropped["layers.1.mlp.up_proj.kernel"]
    with pytest.raises(IncompleteSyncError, match=r"transformer\.layers\.1\.mlp\.up_proj\.weight"):
        synced.sync_from_tunix(dropped)
    extra = dict(flat, **{"layers.9.mlp.up_proj.kernel": flat["layers.1.mlp.up_proj.kernel"]})
    with pytest.raises(IncompleteSyncError, match="no engine counterpart"):
        synced.sync_from_tunix(extra)
    wrong = dict(flat, **{"final_norm.w": jnp.ones((3,))})
    with pytest.raises(IncompleteSyncError, match="shape"):
        synced.sync_from_tunix(wrong)
    assert synced.weight_version == version
    probe.prove(EngineAsRollout(synced), trainer, version)


def test_sync_time_is_measured(synced):
    r = synced.last_sync
    assert r is not None and 0 < r.seconds < 30 and r.num_bytes > 0
    assert r.as_metrics()["weight_version"] == synced.weight_version


# -- sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_trainer(synced, trainer, temperature):
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    samples = synced.generate(prompts, max_new_tokens=MAX_NEW, temperature=temperature)
    worst = 0.0
    for p, s in zip(prompts, samples, strict=True):
        ref = tunix_token_logprobs(trainer, p, s.tokens, temperature)
        worst = max(worst, float(np.max(np.abs(ref - s.logprobs))))
    assert worst <= 1e-4


def test_tokens_are_exactly_the_sampled_tokens(synced):
    stop = list(range(0, 1024, 3))  # a third of the vocabulary stops: early and varied ends
    samples = synced.generate([PROMPTS[0]] * 8, max_new_tokens=MAX_NEW, temperature=1.0,
                              stop_token_ids=stop)
    stopset = set(stop)
    assert any(s.finish_reason == "stop" for s in samples)
    for s in samples:
        assert len(s.tokens) == len(s.logprobs) >= 1
        assert not stopset & set(s.tokens[:-1].tolist())  # nothing after a stop token
        if s.finish_reason == "stop":
            assert int(s.tokens[-1]) in stopset
        else:
            assert s.finish_reason == "length" and len(s.tokens) == MAX_NEW
        assert np.all(s.logprobs <= 0) and np.all(np.isfinite(s.logprobs))


def test_generations_differ_across_samples_and_calls(synced):
    prompt = [PROMPTS[0]] * 8
    a = [s.tokens.tolist() for s in synced.generate(prompt, max_new_tokens=8, temperature=1.0)]
    b = [s.tokens.tolist() for s in synced.generate(prompt, max_new_tokens=8, temperature=1.0)]
    assert len({tuple(x) for x in a}) == 8  # 8 samples of one prompt: all different
    assert all(x != y for x, y in zip(a, b, strict=True))  # and different on the next call
    c = [s.tokens.tolist() for s in synced.generate(prompt, max_new_tokens=8, seed=7)]
    d = [s.tokens.tolist() for s in synced.generate(prompt, max_new_tokens=8, seed=7)]
    assert c == d  # an explicit seed reproduces


def test_flush_and_idle_engine_sleeps(synced, trainer):
    synced.flush()
    probe.prove(EngineAsRollout(synced), trainer, synced.weight_version)
    t0, c0 = time.perf_counter(), time.process_time()
    time.sleep(1.5)
    cpu = (time.process_time() - c0) / (time.perf_counter() - t0)
    assert cpu < 0.1, f"idle engine used {cpu:.0%} of a core"


def test_generate_throughput(synced):
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    synced.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, ignore_eos=True)
    t0 = time.perf_counter()
    out = synced.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, ignore_eos=True)
    dt = time.perf_counter() - t0
    tok_s = sum(len(s.tokens) for s in out) / dt
    print(f"engine throughput: {tok_s:.0f} tok/s (batch 8 x {MAX_NEW} tokens, {dt:.3f}s)")
    assert tok_s > 50  # catches recompiling every step (was ~20 tok/s with return_logprob)


PINNED = Path(__file__).resolve().parent / "data" / "pinned_rollout.json"
# Prompts of different lengths (one prefill of several sequences, then decode at batch 8).
PIN_PROMPTS = [[(37 * i + 11 * j + 5) % 1000 + 1 for j in range(n)]
               for i, n in enumerate([3, 32, 17, 9, 25, 5, 30, 12])]
# Sampled; greedy (a prefix-cache hit on the same prompts); truncated (top-k / top-p).
PIN_CALLS = {"sampled": dict(temperature=1.0), "greedy": dict(temperature=0.0),
             "truncated": dict(temperature=0.7, top_k=50, top_p=0.9)}


def pinned_rollout(engine) -> dict:
    """Tokens and logprobs of fixed calls on a freshly flushed engine, fixed seed."""
    engine.flush()
    out = {}
    for name, kw in PIN_CALLS.items():
        samples = engine.generate(PIN_PROMPTS, max_new_tokens=MAX_NEW, seed=1234,
                                  ignore_eos=True, **kw)
        out[name] = {"tokens": [s.tokens.tolist() for s in samples],
                     "logprobs": [s.logprobs.tolist() for s in samples]}
    return out


def test_tokens_and_logprobs_pinned(synced):
    """The engine's tokens and logprobs on a fixed batch and seed are the ones recorded
    before the CPU performance fixes (issue 17): the same tokens, logprobs within float32
    rounding of a different summation order."""
    want = json.loads(PINNED.read_text())
    got = pinned_rollout(synced)
    for name in PIN_CALLS:
        assert got[name]["tokens"] == want[name]["tokens"], name
        diff = max(float(np.max(np.abs(np.subtract(g, w)))) for g, w in zip(
            got[name]["logprobs"], want[name]["logprobs"], strict=True))
        assert diff <= 1e-5, (name, diff)


def test_prompt_longer_than_engine_max_is_user_error(synced):
    with pytest.raises(UserError, match="prompt lengths"):
        synced.generate([[1] * (MAX_PROMPT + 1)], max_new_tokens=4)


# -- the Tunix rollout --------------------------------------------------------------------


def test_rollout_as_rlcluster_builds_it(tmp_path_factory):
    from tunix.generate.tokenizer_adapter import TokenizerAdapter
    from tunix.rl import utils as rl_utils
    from tunix.rl.rollout import base_rollout

    from tunix_sglang.rollout.inprocess import InProcessRollout

    md = inspect_model_dir(ensure_tiny_model(cache_dir=tmp_path_factory.mktemp("tied")))
    actor = load_model(md, one_device_mesh())
    tok = TokenizerAdapter(load_tokenizer(md))

    class TrainCfg:  # the fields the rollout reads from the project's TrainConfig
        batch_size, num_generations, sglang_mem_fraction_static, dtype, seed = 2, 2, 0.8, \
            "float32", 0

    rc = base_rollout.RolloutConfig(max_tokens_to_generate=8, max_prompt_length=24,
                                    temperature=1.0, top_p=1.0, top_k=None,
                                    eos_tokens=[tok.eos_id()], seed=3)
    factory = functools.partial(InProcessRollout, model_dir=md, train_config=TrainCfg())
    rollout = factory(rollout_actor=actor, tokenizer=tok, mesh=one_device_mesh(), rollout_config=rc)
    try:
        assert rollout.weight_version == 0 and rollout.last_sync.num_params > 0
        assert rollout.model() is not actor
        assert not rl_utils.is_sharing_weights(actor, rollout.model())
        prompts = ["Tom has 3 apples", "How many books", "Tom has 3 apples", "How many books"]
        out = rollout.generate(prompts, rc)
        assert out.left_padded_prompt_tokens.shape == (4, 24)
        assert out.logits is None and len(out.tokens) == len(out.logprobs) == len(out.text) == 4
        for p, row, t, lp, text in zip(prompts, out.left_padded_prompt_tokens, out.tokens,
                                       out.logprobs, out.text, strict=True):
            ids = tok.encode(p)
            assert row[-len(ids):].tolist() == ids
            assert set(row[:-len(ids)].tolist()) <= {rollout.pad_id()}
            assert 1 <= len(t) <= 8 and len(lp) == len(t)
            assert text == tok.decode(t.tolist(), skip_special_tokens=True)
            ref = tunix_token_logprobs(actor, ids, t, 1.0)
            assert np.max(np.abs(ref - lp)) <= 1e-4
        assert rollout.last_samples.versions == [0] * 4
        # Tunix's sync path: nnx.State of Params, under its transfer guards.
        other = perturbed(actor, 0.3)
        with pytest.raises(probe.NotArrivedError, match="did not arrive at the rollout engine"):
            probe.prove(rollout, other, 0)
        params = nnx.state(other, nnx.Param)
        with jax.transfer_guard_device_to_host("disallow_explicit"), \
                jax.transfer_guard_host_to_device("disallow_explicit"):
            rollout.update_params(params, (nnx.Param,))
        assert rollout.weight_version == 1
        assert probe.prove(rollout, other, 1).max_logprob_diff <= 1e-4
        probe.prove(rollout, rollout.model(), 1)  # the copy follows the engine
        # num_iterations > 1 path: logps of the current rollout policy.
        prompt_ids = jnp.asarray(out.left_padded_prompt_tokens)
        comp = np.full((4, 8), rollout.pad_id(), np.int32)
        for i, t in enumerate(out.tokens):
            comp[i, :len(t)] = t
        logps = np.asarray(rollout.get_per_token_logps(prompt_ids, jnp.asarray(comp)))
        assert logps.shape == (4, 8)
        # ...under the synced weights (`other`), at the last rollout's temperature (1).
        for p, t, row in zip(prompts, out.tokens, logps, strict=True):
            ref = tunix_token_logprobs(other, tok.encode(p), t, 1.0)
            assert np.max(np.abs(row[:len(t)] - ref)) <= 1e-4
    finally:
        rollout.close()


def test_train_engine_rollouts_keep_no_model_copy():
    """Training is on-policy (GRPO num_iterations=1: Tunix never asks a rollout to score),
    so the engine rollouts `train` builds keep no copy of the model (one model's memory)."""
    from tunix_sglang import rollout as rollout_pkg
    from tunix_sglang.config import TrainConfig

    for engine in ("sglang_jax", "sglang_jax_remote"):
        made = rollout_pkg.engine_for(TrainConfig(rollout_engine=engine), "model-dir")
        assert made.keywords["keep_model_copy"] is False, engine


# -- --rollout-devices --------------------------------------------------------------------

_DEVICES_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    from pathlib import Path
    import jax, numpy as np
    sys.path.insert(0, sys.argv[2])
    assert len(jax.devices()) == 4
    from tunix_sglang import compat
    from tunix_sglang.compat.base import ORIGINALS
    from tunix_sglang.engine import EngineSettings, InProcessEngine
    from tunix_sglang.engine.scheduler_hooks import engine_devices
    from tunix_sglang.models import inspect_model_dir, load_model
    from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model

    compat.apply_all()
    # The unpatched mesh builder always takes every device; the fix honours the choice.
    orig = ORIGINALS["scheduler.create_device_mesh"]
    from sgl_jax.srt.managers import scheduler as sched
    assert orig([-1, 1, 1], [1, 1, 1]).devices.size == 4
    with engine_devices(jax.devices()[2:]):
        mesh = sched.create_device_mesh([-1, 1, 1], [1, 1, 1])
    assert sorted(d.id for d in mesh.devices.flat) == [2, 3]

    path = ensure_tiny_model(TinyModelSpec(tie_word_embeddings=False), cache_dir=Path(sys.argv[1]))
    md = inspect_model_dir(path)
    train_mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("fsdp", "tp"),
                                   axis_types=(jax.sharding.AxisType.Auto,) * 2)
    trainer = load_model(md, train_mesh)
    s = EngineSettings(str(path), max_prompt_len=16, max_new_tokens=8, batch_size=4,
                       device_ids=(2, 3))
    eng = InProcessEngine(s).start()
    eng.sync_from_tunix(trainer)
    used = set()
    for a in eng.engine_params().values():
        used |= {d.id for d in a.sharding.device_set}
    assert used == {2, 3}, used
    from conftest import EngineAsRollout
    from tunix_sglang import probe
    # trainer on devices 0-1, engine on 2-3: the fingerprints do not depend on the sharding
    diff = probe.prove(EngineAsRollout(eng), trainer, eng.weight_version).max_logprob_diff
    assert diff <= 1e-4, diff
    out = eng.generate([[1, 2, 3]] * 4, max_new_tokens=8, temperature=1.0)
    assert len(out) == 4
    eng.shutdown()
    s2 = EngineSettings(str(path), max_prompt_len=16, max_new_tokens=8, batch_size=4,
                        rollout_devices=1)
    eng = InProcessEngine(s2).start()
    assert [d.id for d in eng.devices] == [0]
    eng.sync_from_tunix(trainer)
    probe.prove(EngineAsRollout(eng), trainer, eng.weight_version)
    eng.shutdown()
    print("OK", diff)
""")


def test_rollout_devices_subset(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, str(tmp_path),
                        str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "OK" in r.stdout
