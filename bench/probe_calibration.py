"""Calibrate the sync proof's numerics threshold: noise vs one optimizer step, per dtype.

For each model and dtype, a real in-process engine holds the trainer's weights and the probe
(`tunix_sglang.probe.scoring`: max |Δ logprob| over the trainer's top-16 tokens at 8
positions of a fixed sequence) is measured:
  clean    engine and trainer hold the same weights (the noise floor of the two programs);
  step@lr  the trainer takes one real AdamW step (the runner's optimizer: b1 0.9, b2 0.99,
           weight decay 0.1) at learning rate lr, the engine keeps the old weights (what a
           skipped sync looks like to the numerics alone).
The fingerprint result for the same skipped sync is recorded too (it must differ at any lr).
Writes results/probe_calibration.json.

    JAX_PLATFORMS=cpu .venv/bin/python bench/probe_calibration.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from tunix_sglang import probe  # noqa: E402
from tunix_sglang.engine import EngineSettings, InProcessEngine  # noqa: E402
from tunix_sglang.engine.weight_map import flatten_tunix_params  # noqa: E402
from tunix_sglang.models import inspect_model_dir, load_model  # noqa: E402
from tunix_sglang.probe import fingerprint, scoring  # noqa: E402
from tunix_sglang.rollout.base import copy_params  # noqa: E402
from tunix_sglang.tiny_model import TinyModelSpec, ensure_tiny_model  # noqa: E402

LRS = (2e-4, 3e-5, 1e-6, 1e-7)
MAX_PROMPT = 64


def mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def one_adamw_step(model, lr: float, seed: int = 0):
    """A copy of `model` after one AdamW step on next-token cross-entropy of random tokens."""
    model = copy_params(model)
    vocab = int(flatten_tunix_params(model)[0]["embedder.input_embedding"].shape[0])
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (8, 33)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(32), (8, 32))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((32, 32), bool)), (8, 32, 32))

    def loss_fn(m):
        logits, _ = m(tokens[:, :-1], positions, None, mask)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

    opt = nnx.Optimizer(model, optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=0.1), wrt=nnx.Param)
    grads = nnx.grad(loss_fn)(model)
    opt.update(model, grads)
    return model


def measure(name: str, path: Path, dtype: str) -> dict:
    md = inspect_model_dir(path)
    trainer = load_model(md, mesh(), dtype)
    eng = InProcessEngine(EngineSettings.for_rollout(
        path, max_prompt_len=MAX_PROMPT, max_new_tokens=8, num_prompts=8, dtype=dtype)).start()
    try:
        eng.sync_from_tunix(trainer, version=0)
        vocab = int(md.hf_config["vocab_size"])
        seq = scoring.probe_sequence(vocab, MAX_PROMPT)
        report = eng.evidence(seq.prefixes())
        t0 = time.perf_counter()
        report = eng.evidence(seq.prefixes())
        engine_sec = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = scoring.trainer_rows(trainer, seq)
        trainer_sec = time.perf_counter() - t0
        clean, clean_kl = scoring.compare(rows, report.logits)
        out = {"model": name, "dtype": dtype, "clean": clean, "clean_kl": clean_kl,
               "engine_evidence_sec": engine_sec, "trainer_rows_sec": trainer_sec,
               "threshold": probe.threshold_for(dtype, rows),
               "max_top16_logit": float(np.abs(np.sort(rows, -1)[:, -16:]).max()), "steps": {}}
        layout = report.layout()
        for lr in LRS:
            stepped = one_adamw_step(trainer, lr)
            moved, moved_kl = scoring.compare(scoring.trainer_rows(stepped, seq), report.logits)
            exp = fingerprint.expected(flatten_tunix_params(stepped)[0], layout)
            same = sum(exp[n] == report.params[n][0] for n in exp)
            out["steps"][f"{lr:g}"] = {"skipped_sync_diff": moved, "skipped_sync_kl": moved_kl,
                                       "fingerprints_unchanged": same,
                                       "num_params": len(exp)}
        return out
    finally:
        eng.shutdown()


def main() -> None:
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "tunix-sglang-probe-calibration"
    models = [("tiny tied (random)", ensure_tiny_model(cache_dir=root)),
              ("tiny untied (random)",
               ensure_tiny_model(TinyModelSpec(tie_word_embeddings=False), cache_dir=root))]
    if "--no-warm" not in sys.argv:
        from tunix_sglang.warmstart import ensure_warm_model

        models.append(("embedded default (warm, tied)", ensure_warm_model()))
    results = []
    for name, path in models:
        for dtype in ("float32", "bfloat16"):
            r = measure(name, path, dtype)
            print(json.dumps(r), flush=True)
            results.append(r)
    out = Path(__file__).parent / "results" / "probe_calibration.json"
    out.write_text(json.dumps({"machine": "2 CPU cores, JAX CPU", "lrs": LRS,
                               "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
