"""A short supervised warm start of the embedded tiny model, so the default GRPO run can learn.

A randomly initialised model never emits the answer format, so every completion earns the same
reward and GRPO's group-relative advantages are all zero: nothing to learn from. Supervised
fine-tuning on the synthetic training problems (Tunix's `PeftTrainer`, loss on the completion
tokens only) teaches copying the question's numbers and some of the arithmetic. Only part of
its examples use the answer format, so the warm model mostly answers in plain text: GRPO's
format and answer rewards then raise reward and strict accuracy within minutes of CPU.

The result is an ordinary Hugging Face model directory (the tiny model's config and tokenizer,
new `model.safetensors` in Hugging Face names and layouts), built once and cached atomically;
`embedded_model_dir()` is what runs without `--local-model-dir` use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tunix_sglang.config import embedded_is_warm
from tunix_sglang.tiny_model import TinyModelSpec, default_cache_dir, ensure_tiny_model

# Problems the warm start sees: the synthetic *training* split runs use for seed 0
# (`data.train_problems`), so the held-out split stays unseen.

# The default tiny model (64 wide, 2 layers) is too small to learn to copy numbers from the
# question in a few minutes of CPU; this one does (0.92M parameters).
WARM_MODEL_SPEC = TinyModelSpec(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, head_dim=32
)

@dataclasses.dataclass(frozen=True)
class WarmStartSpec:
    """Supervised warm-start knobs; part of the cache key."""

    steps: int = 600
    # Share of examples that show the answer format; the rest answer in plain text ("... The
    # answer is 8."), so the warm model uses the format only part of the time: what GRPO's
    # format and answer rewards then teach, as in GSM8K runs on real instruct models.
    formatted_fraction: float = 0.3
    batch_size: int = 16
    learning_rate: float = 5e-3
    warmup_steps: int = 20
    max_len: int = 192
    data_seed: int = 0
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(
            json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        ).hexdigest()[:10]


def ensure_warm_model(
    spec: TinyModelSpec | None = None,
    cache_dir: Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    warm: WarmStartSpec | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Path:
    """The cached warm-started tiny model directory, built once (atomically) if missing."""
    warm = warm or WarmStartSpec()
    if steps is not None:
        warm = dataclasses.replace(warm, steps=steps)
    warm = dataclasses.replace(warm, seed=seed)
    base = ensure_tiny_model(spec or WARM_MODEL_SPEC, cache_dir)
    root = cache_dir or default_cache_dir()
    final = root / f"{base.name}-warm-{warm.fingerprint()}-{_data_fingerprint(warm.data_seed)}"
    if (final / "model.safetensors").exists():
        return final
    log(f"Warm start: {warm.steps} supervised steps on the embedded tiny model (once; cached "
        f"in {root})")
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("model.safetensors"))
    t0 = time.perf_counter()
    model, losses = warm_start(base, warm)
    log(f"Warm start done in {time.perf_counter() - t0:.0f}s (SFT loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f})")
    save_safetensors(model, tmp / "model.safetensors")
    (tmp / "warm_start.json").write_text(json.dumps(dataclasses.asdict(warm), indent=2))
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race; its copy is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def embedded_model_dir(log: Callable[[str], None] = print) -> Path:
    """The model of runs without --local-model-dir: the warm-started tiny Qwen3.

    `TUNIX_SGLANG_EMBEDDED_MODEL=random` gives the random tiny model instead: no warm start,
    smaller and faster, for checking plumbing (it earns no reward, so it learns nothing).
    """
    return ensure_warm_model(log=log) if embedded_is_warm() else ensure_tiny_model()


def embedded_shape_dir() -> Path:
    """A model directory with the embedded model's config (shapes), without a warm start."""
    return ensure_tiny_model(WARM_MODEL_SPEC if embedded_is_warm() else None)


def _data_fingerprint(seed: int) -> str:
    # The warm start's data is part of what it learned: a change to the synthetic problems
    # must not reuse a model trained on the old ones.
    from tunix_sglang import data

    train = data.train_problems("synthetic", None, seed)
    blob = "".join(p.question + p.answer for p in train[:200])
    return hashlib.sha256(blob.encode()).hexdigest()[:6]


# ----------------------------------------------------------------------------- data


def sft_examples(
    tokenizer: Any, max_len: int, seed: int, formatted_fraction: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [N, max_len] tokens and a mask that is 1 only on completion tokens.

    The completion ends with the tokenizer's EOS (`<|im_end|>`) so the model learns to stop.
    The first `formatted_fraction` of examples (by a seeded shuffle) use the answer format,
    the others `plain_completion`.
    """
    from tunix_sglang import data

    train = data.train_problems("synthetic", None, seed)
    formatted = np.random.default_rng(seed).permutation(len(train)) < formatted_fraction * len(
        train
    )
    pad = tokenizer.pad_token_id
    tokens = np.full((len(train), max_len), pad, np.int32)
    mask = np.zeros((len(train), max_len), np.int32)
    kept = 0
    for p, fmt in zip(train, formatted, strict=True):
        prompt = tokenizer.encode(data.render_prompt(p.question, tokenizer))
        text = data.sft_completion(p) if fmt else plain_completion(p)
        completion = tokenizer.encode(text + tokenizer.eos_token)
        if len(prompt) + len(completion) > max_len:
            continue
        n = len(prompt) + len(completion)
        tokens[kept, :n] = prompt + completion
        mask[kept, len(prompt) : n] = 1
        kept += 1
    if kept == 0:
        raise ValueError(f"no synthetic example fits in {max_len} tokens")
    return tokens[:kept], mask[:kept]


def plain_completion(problem: Any) -> str:
    """The worked solution without the answer format: reasoning, then "The answer is N."."""
    from tunix_sglang import data

    return f"{data.worked_solution(problem)}\nThe answer is {problem.gold}."


def _batches(tokens: np.ndarray, mask: np.ndarray, batch_size: int, seed: int) -> Iterator[Any]:
    from tunix.sft.peft_trainer import TrainingInput

    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(tokens))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            yield TrainingInput(input_tokens=tokens[idx], input_mask=mask[idx])


# ---------------------------------------------------------------------------- train


def warm_start(model_dir: Path, warm: WarmStartSpec):
    """Supervised fine-tuning of `model_dir` with Tunix's PeftTrainer; returns (model, losses)."""
    import jax
    import optax
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    from tunix_sglang import models

    md = models.inspect_model_dir(model_dir)
    tokenizer = models.load_tokenizer(md)
    # One local device: the same warm model whatever the device count, and no collective
    # with other processes (each process of a multi-host run may build its own copy).
    mesh = jax.sharding.Mesh(
        np.array(jax.local_devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    tokens, mask = sft_examples(tokenizer, warm.max_len, warm.data_seed, warm.formatted_fraction)
    # Trim the padding every example shares: shorter sequences, faster steps.
    width = int(np.max(np.nonzero(tokens != tokenizer.pad_token_id)[1])) + 1
    tokens, mask = tokens[:, :width], mask[:, :width]
    pad = tokenizer.pad_token_id

    def model_input(x: peft_trainer.TrainingInput) -> dict[str, Any]:
        # The loss mask (completion only) is not the attention mask (every real token).
        real = x.input_tokens != pad
        return {
            "input_tokens": x.input_tokens,
            "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(real),
            "attention_mask": sft_utils.make_causal_attn_mask(real),
        }

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, warm.learning_rate, warm.warmup_steps, max(warm.steps, warm.warmup_steps + 1),
        end_value=warm.learning_rate * 0.1,
    )
    with mesh:
        model = models.load_model(md, mesh)
        config = peft_trainer.TrainingConfig(
            eval_every_n_steps=10**9, max_steps=warm.steps, pbar_description=None
        )
        trainer = peft_trainer.PeftTrainer(
            model, optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.0), config
        ).with_gen_model_input_fn(model_input)
        trainer.train(_batches(tokens, mask, warm.batch_size, warm.seed))
        logger = trainer.metrics_logger
        losses = [float(v) for v in logger.get_metric_history("", "loss", "train")]
    return model, losses


# ------------------------------------------------------------------------ safetensors


def hf_state_dict(model: Any) -> dict[str, np.ndarray]:
    """A Tunix Qwen3 model's parameters under Hugging Face names and layouts.

    The inverse of Tunix's `qwen3.params._get_key_and_transform_mapping`: projections are
    stored [out, in] by Hugging Face and [in, ...] (heads split out) by Tunix.
    """
    from flax import nnx

    flat: dict[str, np.ndarray] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = np.asarray(node, np.float32)

    walk("", nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out: dict[str, np.ndarray] = {}
    for key, w in flat.items():
        parts = key.split(".")
        if key == "embedder.input_embedding":
            out["model.embed_tokens.weight"] = w
        elif key == "final_norm.w":
            out["model.norm.weight"] = w
        elif key == "lm_head.w":
            out["lm_head.weight"] = w.T
        elif parts[0] == "layers":
            out[_layer_key(parts[1], parts[2:], key)] = _layer_weight(parts[2:], w)
        else:
            raise ValueError(f"no Hugging Face name for parameter {key}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _layer_key(i: str, rest: list[str], key: str) -> str:
    p = f"model.layers.{i}."
    if rest[0] == "attn":
        return f"{p}self_attn.{rest[1]}.weight"  # q/k/v/o_proj and q/k_norm
    if rest[0] == "mlp" and rest[-1] == "kernel":
        return f"{p}mlp.{rest[1]}.weight"
    if rest[0] in ("input_layernorm", "post_attention_layernorm"):
        return f"{p}{rest[0]}.weight"
    raise ValueError(f"no Hugging Face name for parameter {key}")


def _layer_weight(rest: list[str], w: np.ndarray) -> np.ndarray:
    if rest[0] == "attn" and rest[1] == "o_proj":
        return w.reshape(-1, w.shape[-1]).T  # [H, hd, D] -> [D, H*hd]
    if rest[0] == "attn" and rest[1] in ("q_proj", "k_proj", "v_proj"):
        return w.reshape(w.shape[0], -1).T  # [D, H, hd] -> [H*hd, D]
    if rest[0] == "mlp":
        return w.T  # [in, out] -> [out, in]
    return w  # norms


def save_safetensors(model: Any, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(hf_state_dict(model), str(path))
