"""The sync proof (tunix_sglang.probe) against real in-process engines: exact fingerprints,
faults caught after a real optimizer step at learning rate 1e-7, and "did not arrive" told
apart from "arrived but computes differently".

One engine at a time (module-scoped, parametrized): the tied tiny model and an untied one in
float32, and the tied one in bfloat16.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from conftest import one_adamw_step, one_device_mesh

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tunix_sglang import faults, probe  # noqa: E402
from tunix_sglang.engine import weight_map  # noqa: E402
from tunix_sglang.models import inspect_model_dir, load_model, load_tokenizer  # noqa: E402
from tunix_sglang.probe import fingerprint, scoring  # noqa: E402
from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model  # noqa: E402

# -- the fingerprint itself -----------------------------------------------------------------


def reference_fingerprint(x: np.ndarray) -> int:
    """The fingerprint's definition, in numpy with Python integers (no JAX)."""
    width = x.dtype.itemsize
    bits = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[width]).astype(np.uint64)
    idx = np.arange(x.size, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)

    def fmix(h):
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x85EBCA6B)) & mask
        h ^= h >> np.uint64(13)
        h = (h * np.uint64(0xC2B2AE35)) & mask
        return h ^ (h >> np.uint64(16))

    lanes = []
    for seed in fingerprint.SEEDS:
        mult = fmix(idx ^ np.uint64(seed)) | np.uint64(1)
        lanes.append(int(np.sum((bits * mult) & mask, dtype=np.uint64) & mask))
    return lanes[1] << 32 | lanes[0]


def test_fingerprint_is_exact_and_catches_every_kind_of_change():
    import ml_dtypes

    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 48)).astype(np.float32)
    b = rng.normal(size=(4, 8, 16)).astype(ml_dtypes.bfloat16)
    got = fingerprint.of_arrays([jnp.asarray(a), jnp.asarray(b)])
    assert got == [reference_fingerprint(a), reference_fingerprint(b)]

    one = a.copy()
    one[17, 5] = np.nextafter(one[17, 5], np.float32(np.inf))  # one bit of one element
    swapped = a.copy()
    swapped[[3, 9]] = swapped[[9, 3]]
    square = a[:48, :48]
    variants = [one, swapped, a * 1.0000001, np.zeros_like(a)]
    fps = fingerprint.of_arrays([jnp.asarray(v) for v in variants])
    assert len(set(fps + got[:1])) == len(variants) + 1
    # A transpose of a square matrix has the same shape and values, other positions.
    assert fingerprint.of_arrays([jnp.asarray(square.T)]) != fingerprint.of_arrays(
        [jnp.asarray(square)])


# -- against a real engine ------------------------------------------------------------------

MODELS = {
    "tied-float32": (TinyModelSpec(), "float32"),
    "untied-float32": (TinyModelSpec(tie_word_embeddings=False), "float32"),
    "tied-bfloat16": (TinyModelSpec(), "bfloat16"),
}


class TrainCfg:  # the TrainConfig fields the rollout reads
    batch_size, num_generations, sglang_mem_fraction_static, seed = 2, 2, 0.8, 0

    def __init__(self, dtype):
        self.dtype = dtype


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request, tmp_path_factory):
    """(rollout, trainer model, dtype): the in-process rollout as Tunix builds it."""
    from tunix.generate.tokenizer_adapter import TokenizerAdapter
    from tunix.rl.rollout import base_rollout

    from tunix_sglang.rollout.inprocess import InProcessRollout

    spec, dtype = MODELS[request.param]
    md = inspect_model_dir(ensure_tiny_model(spec, cache_dir=tmp_path_factory.mktemp("m")))
    trainer = load_model(md, one_device_mesh(), dtype)
    tok = TokenizerAdapter(load_tokenizer(md))
    rc = base_rollout.RolloutConfig(max_tokens_to_generate=8, max_prompt_length=32,
                                    temperature=1.0, eos_tokens=[tok.eos_id()])
    rollout = functools.partial(InProcessRollout, model_dir=md, train_config=TrainCfg(dtype))(
        rollout_actor=trainer, tokenizer=tok, mesh=one_device_mesh(), rollout_config=rc)
    yield rollout, trainer, dtype
    rollout.close()


def sync(rollout, model, version: int, monkeypatch, fault: str = "") -> None:
    """Tunix's sync path (an nnx.State of Params) with a fault switched on or not."""
    monkeypatch.setenv(faults.ENV, fault)
    try:
        rollout.update_params(nnx.state(model, nnx.Param), (nnx.Param,), version=version)
    finally:
        monkeypatch.delenv(faults.ENV)


def test_clean_sync_passes_the_default_threshold(setup, monkeypatch):
    rollout, trainer, dtype = setup
    sync(rollout, trainer, 0, monkeypatch)
    p = probe.prove(rollout, trainer, 0)
    assert p.check == "proven" and p.max_logprob_diff <= p.threshold
    if dtype == "float32":
        assert p.threshold == probe.FLOAT32_THRESHOLD
    if dtype == "float32":
        assert p.max_logprob_diff <= 1e-4  # the margin: 100x under the threshold


def test_engine_fingerprints_equal_the_trainers(setup, monkeypatch):
    """Both sides computed independently, on their own devices and layouts."""
    rollout, trainer, _ = setup
    sync(rollout, trainer, 0, monkeypatch)
    got = rollout.engine.fingerprints()
    flat, _ = weight_map.flatten_tunix_params(trainer)
    want = fingerprint.expected(flat, {n: (s, d) for n, (_, s, d) in got.items()})
    assert want == {n: fp for n, (fp, _, _) in got.items()}


@pytest.mark.parametrize("fault", ["skip_sync", "partial_sync"])
def test_fault_after_a_real_step_at_lr_1e7_did_not_arrive(setup, monkeypatch, fault):
    rollout, trainer, _ = setup
    sync(rollout, trainer, 0, monkeypatch)
    stepped = one_adamw_step(trainer, 1e-7)
    sync(rollout, stepped, 1, monkeypatch, f"{fault}@1")
    with pytest.raises(probe.NotArrivedError) as e:
        probe.prove(rollout, stepped, 1)
    msg = str(e.value)
    assert msg.startswith("weight sync v1 did not arrive at the rollout engine: engine "
                          "parameter "), msg
    if fault == "partial_sync":  # exactly the parameter left unwritten, named
        got = rollout.engine.fingerprints()
        want = fingerprint.expected(weight_map.flatten_tunix_params(stepped)[0],
                                    {n: (s, d) for n, (_, s, d) in got.items()})
        (stale,) = [n for n in want if want[n] != got[n][0]]
        assert f"parameter {stale} is not" in msg and "1 of " in msg
    sync(rollout, stepped, 2, monkeypatch)  # a clean sync afterwards is proven again
    assert probe.prove(rollout, stepped, 2).check == "proven"


def test_stale_forward_arrived_but_computes_differently(setup, monkeypatch):
    """The buffers hold the new weights, the forward reads the old ones: the fingerprints
    match, the forced scoring does not (one real step at the embedded default's lr)."""
    rollout, trainer, dtype = setup
    if dtype != "float32":
        pytest.skip("one step is below bfloat16 resolution (bench/README.md, Sync proof)")
    sync(rollout, trainer, 0, monkeypatch)
    stepped = one_adamw_step(trainer, 2e-4)
    runner = rollout.engine._runner  # noqa: SLF001 (the fault replaces its forward)
    forward = runner.jitted_run_model
    try:
        sync(rollout, stepped, 1, monkeypatch, "stale_forward@1")
        with pytest.raises(probe.ComputesDifferentlyError,
                           match=r"weight sync v1 arrived at the rollout engine \(every "
                                 r"parameter's fingerprint matches the trainer's\) but the "
                                 r"engine computes differently: max \|Δ logprob\|"):
            probe.prove(rollout, stepped, 1)
    finally:
        runner.jitted_run_model = forward


def test_version_is_the_trainers_and_is_checked(setup, monkeypatch):
    rollout, trainer, _ = setup
    sync(rollout, trainer, 7, monkeypatch)
    assert rollout.weight_version == 7
    rollout.update_params(nnx.state(trainer, nnx.Param), (nnx.Param,))  # Tunix: no version
    assert rollout.weight_version == 8
    with pytest.raises(probe.NotArrivedError, match="it reports weight version 8"):
        probe.prove(rollout, trainer, 9)


def test_probe_scores_whole_distributions_on_fixed_tokens():
    seq = scoring.probe_sequence(1024, 32)
    assert seq == scoring.probe_sequence(1024, 32) and len(seq.lengths) == scoring.NUM_POSITIONS
    assert all(len(p) == n for p, n in zip(seq.prefixes(), seq.lengths, strict=True))
    rows = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
    assert scoring.compare(rows, rows) == (0.0, 0.0)
    shifted = rows + 5.0  # the same distributions
    assert scoring.compare(rows, shifted)[0] < 1e-5
    other = rows.copy()
    other[1, int(np.argmax(rows[1]))] -= 0.5
    diff, kl = scoring.compare(rows, other)
    assert 0.2 < diff <= 0.5 and kl > 0


def test_rollout_mismatch_is_k3_over_completion_tokens():
    from tunix_sglang.grpo_step import rollout_mismatch

    trainer = np.log(np.array([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    engine = np.log(np.array([[0.4, 0.25, 0.1], [0.1, 0.3, 0.3]]))
    mask = np.array([[True, True, False], [True, True, True]])
    kl, worst = rollout_mismatch(trainer, engine, mask)
    r = (trainer - engine)[mask]
    assert kl == pytest.approx(np.mean(np.exp(r) - 1 - r)) and kl > 0
    assert worst == pytest.approx(np.log(0.3 / 0.2))  # the masked-out 0.9 vs 0.1 is ignored
    assert rollout_mismatch(trainer, trainer, mask) == (0.0, 0.0)


def test_transforms_are_what_the_sync_writes():
    """The layouts the trainer side fingerprints are the engine's (merged heads, transpose)."""
    m = weight_map.map_param("layers.3.attn.o_proj.w", (4, 16, 64), "transformer")
    assert (m.engine_name, m.engine_shape) == ("transformer.layers.3.self_attn.o_proj.weight",
                                               (64, 64))
    x = jnp.arange(4 * 16 * 64, dtype=jnp.float32).reshape(4, 16, 64)
    np.testing.assert_array_equal(weight_map.transform(x, m, jnp.bfloat16),
                                  np.asarray(x).reshape(64, 64).astype(jnp.bfloat16))
    head = weight_map.map_param("lm_head.w", (64, 1024), "model")
    assert head.engine_shape == (1024, 64) and head.engine_name == "lm_head.embedding"
    with pytest.raises(weight_map.IncompleteSyncError, match="engine has"):
        weight_map.plan({"lm_head.w": jnp.zeros((64, 1024)), "layers.0.mlp.up_proj.kernel":
                         jnp.zeros((64, 128))},
                        {"lm_head.embedding": (64, 1024),
                         "model.layers.0.mlp.up_proj.weight": (64, 128)})
