"""Memory plan for a GRPO run: what each device must hold, before the run meets an OOM.

Reads only the model directory's config.json. Byte counts for parameters and the AdamW state
are exact for Tunix's Qwen3 / Qwen2 / Llama3 modules (tests compare them with a real model);
activations are an estimate and are labelled so.

How the pieces are placed (Tunix 0.1.7 `RLCluster`, sglang-jax 0.0.2 `ModelRunner`):
- actor and reference weights are on the training devices *before* the rollout starts;
- sglang-jax measures `A0` = free memory (min over all local devices) before loading its own
  weight copy, then gives its KV pool `mem_fraction * A0 - engine_weights`, capped at the
  `max_total_tokens` the run passes (`EngineSettings`); whatever is left,
  `(1 - mem_fraction) * A0`, must hold the optimizer state (created after the engine),
  gradients and activations;
- the engine shards its weights and KV heads over its tensor axis only (`tp_size`); with
  tp_size 1 every engine device holds a whole copy (the data axis splits no dense layer);
- the vanilla rollout shares the actor's buffers when it runs on the same mesh and allocates
  a KV cache of `batch x kv_cache_size` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# optax.adamw keeps mu and nu in the parameter dtype (mu_dtype=None), plus an int32 `count`;
# nnx.Optimizer adds a uint32 `step`. Checked against a real nnx.Optimizer in the tests.
ADAM_MOMENTS = 2
OPTIMIZER_SCALAR_BYTES = 4 + 4
# Extra tokens Tunix's vanilla sampler adds to the cache (runner: prompt + new + 16).
VANILLA_KV_SLACK = 16
# Parts that live on the rollout's devices (the rest on the trainer's).
ROLLOUT_PARTS = ("rollout weights", "KV cache")
# Never advise a fraction above this: the engine also needs room for its sampler and buffers.
MAX_SAFE_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The numbers of config.json that decide memory."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> ModelShape:
        heads = int(c["num_attention_heads"])
        return cls(
            model_type=str(c.get("model_type", "qwen3")),
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    def param_count(self) -> int:
        """Parameters of the Tunix module built from this config (not the HF one)."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = h * q + 2 * h * kv + q * h
        if self.model_type == "qwen3":
            attn += 2 * hd  # q_norm, k_norm
        elif self.model_type == "qwen2":
            attn += q + 2 * kv  # q/k/v biases
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h  # input and post-attention RMSNorm
        embed = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * layer + embed + h  # + final norm

    def kv_bytes_per_token(self, dtype_bytes: int, kv_heads: int | None = None) -> int:
        """K and V of every layer for one token (sglang-jax's `cell_size`)."""
        heads = self.num_kv_heads if kv_heads is None else kv_heads
        return self.num_layers * 2 * heads * self.head_dim * dtype_bytes


def read_model_shape(model_dir: str | Path) -> ModelShape:
    return ModelShape.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """Run settings that decide memory (the names are TrainConfig's)."""

    batch_size: int = 2
    num_generations: int = 4
    max_prompt_length: int = 128
    max_new_tokens: int = 48
    rollout_engine: str = "vanilla"
    sglang_mem_fraction_static: float = 0.8
    dtype: str = "float32"
    beta: float = 0.04
    rollout_devices: int = 0
    # The in-process engine as EngineSettings builds it (plan.py fills these in):
    engine_tp_size: int = 1
    engine_page_size: int = 1  # its pool is aligned to pages and padded by one
    engine_max_total_tokens: int | None = None  # its KV cap; None: this step's tokens

    @classmethod
    def from_config(cls, cfg: Any, **engine: Any) -> PlanInputs:
        names = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("engine_")]
        return cls(**{n: getattr(cfg, n) for n in names}, **engine)

    @property
    def sequences(self) -> int:
        return self.batch_size * self.num_generations

    @property
    def seq_len(self) -> int:
        return self.max_prompt_length + self.max_new_tokens


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of each part, the verdict and the advice."""

    device_memory: int  # bytes one device may use (TPU bytes_limit; CPU MemAvailable)
    memory_source: str
    train_devices: int
    rollout_devices: int
    parts: dict[str, int]  # name -> bytes per device
    estimates: tuple[str, ...]  # names in `parts` that are estimates, not exact
    required_tokens: int  # KV tokens all sequences of one step need at once
    kv_bytes_per_token: int
    static_fits: bool  # weights, gradients, optimizer state alone fit
    feasible: bool  # fits with the right --sglang-mem-fraction-static
    fits: bool  # fits with the settings as given
    mem_fraction_min: float | None  # sglang_jax: smallest fraction whose KV holds the step
    mem_fraction_max: float | None  # sglang_jax: largest fraction that leaves the trainer room
    max_total_tokens: int | None  # sglang_jax: KV tokens at mem_fraction_max
    problems: list[str]
    advice: list[str]
    inputs: PlanInputs
    pooled: bool = True  # trainer and rollout share each device's memory

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def side_totals(self) -> tuple[int, int]:
        """(training device, rollout device) bytes when they are different devices."""
        roll = sum(b for n, b in self.parts.items() if n.startswith(ROLLOUT_PARTS))
        return self.total - roll, roll

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["estimates"] = list(self.estimates)
        d["total"] = self.total
        if not self.pooled:
            d["training_device_total"], d["rollout_device_total"] = self.side_totals()
        return d

    def format(self) -> str:
        lines = [
            f"memory plan per device ({self.memory_source}: {gib(self.device_memory)}; "
            f"{self.train_devices} training / {self.rollout_devices} rollout device(s))"
        ]
        for name, b in self.parts.items():
            mark = " (estimate)" if name in self.estimates else ""
            lines.append(f"  {name:<34} {gib(b):>12}{mark}")
        if self.pooled:
            lines.append(f"  {'total':<34} {gib(self.total):>12}")
        else:
            train, roll = self.side_totals()
            lines.append(f"  {'total on a training device':<34} {gib(train):>12}")
            lines.append(f"  {'total on a rollout device':<34} {gib(roll):>12}")
        lines.append(
            f"  KV tokens needed per step: {self.required_tokens} "
            f"({self.kv_bytes_per_token} bytes/token)"
        )
        if self.mem_fraction_max is not None:
            lines.append(
                f"  --sglang-mem-fraction-static: needs >= {self.mem_fraction_min:.2f}, "
                f"safe <= {self.mem_fraction_max:.2f}; max_total_tokens at that fraction: "
                f"{self.max_total_tokens}"
            )
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  lower: {a}" for a in self.advice]
        return "\n".join(lines)


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if abs(n) >= 2**26 else f"{n / 2**20:.2f} MiB"


def _split_devices(inputs: PlanInputs, num_devices: int) -> tuple[int, int, bool]:
    """(training devices, rollout devices, shared) as tunix_cluster.build_meshes places them."""
    n_roll = inputs.rollout_devices
    if n_roll in (0, num_devices):
        return num_devices, num_devices, True
    return num_devices - n_roll, n_roll, False


def _evaluate(
    shape: ModelShape, inputs: PlanInputs, device_memory: int, num_devices: int,
    shared_memory: bool, memory_source: str,
) -> MemoryPlan:
    dbytes = DTYPE_BYTES[inputs.dtype]
    n_train, n_roll, shared = _split_devices(inputs, num_devices)
    if shared_memory:
        # CPU "devices" share host RAM: sharding saves nothing, so count whole arrays.
        n_train = n_roll = 1
    weights = shape.param_count() * dbytes
    tokens = inputs.sequences * inputs.seq_len
    engine = inputs.rollout_engine
    sglang = engine.startswith("sglang_jax")
    remote = engine == "sglang_jax_remote"

    # sglang-jax shards KV heads over its tensor axis, replicating them when tp > kv heads.
    tp = inputs.engine_tp_size
    kv_heads_dev = max(1, math.ceil(shape.num_kv_heads / tp)) if sglang else shape.num_kv_heads
    kv_tok = shape.kv_bytes_per_token(dbytes, kv_heads_dev)
    if not sglang:
        kv_tok = math.ceil(kv_tok / n_roll)

    parts: dict[str, int] = {}
    parts["actor parameters"] = math.ceil(weights / n_train)
    if inputs.beta:
        parts["reference parameters (beta != 0)"] = math.ceil(weights / n_train)
    resident = sum(parts.values())  # on device when the rollout starts
    engine_w = 0
    if sglang and not remote:
        engine_w = math.ceil(weights / tp)
        parts["rollout weights (sglang-jax copy)"] = engine_w
    elif engine == "vanilla" and not shared:
        engine_w = math.ceil(weights / n_roll)
        parts["rollout weights (vanilla, own mesh)"] = engine_w
    grads = math.ceil(weights / n_train)
    opt = math.ceil(ADAM_MOMENTS * weights / n_train) + OPTIMIZER_SCALAR_BYTES
    parts["gradients"] = grads
    parts["optimizer state (AdamW mu, nu)"] = opt
    # Training forward/backward without remat: saved per-layer activations, attention
    # probabilities (float32) and float32 logits with their gradient. An estimate, and not a
    # generous one: XLA's CPU buffer assignment for this gradient at Qwen3-4B's widths
    # (float32, 2 x 768 tokens; bench/memory_plan_check.py) takes 0.62 GiB per layer where
    # this gives 0.40, and 1.84 GiB for the logits where this gives 1.74. No TPU measurement.
    per_dev_tokens = math.ceil(tokens / n_train)
    act = per_dev_tokens * shape.num_layers * (
        6 * shape.hidden_size + 3 * shape.intermediate_size) * dbytes
    act += (math.ceil(inputs.sequences / n_train) * shape.num_heads * inputs.seq_len**2 * dbytes
            * shape.num_layers)
    act += 2 * per_dev_tokens * shape.vocab_size * 4
    parts["activations + logits (training)"] = act
    after_engine = grads + opt + act
    # Pooled: trainer and engine share each device's memory (same mesh, or host RAM on CPU).
    pooled = shared or shared_memory
    train_static = resident + grads + opt
    static_fits = (train_static + engine_w <= device_memory if pooled
                   else max(train_static, engine_w) <= device_memory)

    problems: list[str] = []
    if not static_fits:
        problems.append("weights, gradients and optimizer state alone exceed the device memory")
    f_min = f_max = None
    max_tokens = None
    fraction_problem = None
    if sglang and not remote:
        page = inputs.engine_page_size
        cap = inputs.engine_max_total_tokens or tokens
        kv_need = (cap // page * page + page) * kv_tok  # the pool the engine will allocate
        parts["KV cache (sglang-jax pool, needed)"] = kv_need
        a0 = device_memory - resident  # what sglang-jax measures before loading its weights
        if a0 > 0:
            f_min = (engine_w + kv_need) / a0
            if pooled:
                f_max = min(MAX_SAFE_FRACTION, 1 - after_engine / a0)
            else:
                # The engine's devices hold no trainer state; sglang-jax still sizes its pool
                # from the fullest local device, so `a0` is the training devices' free memory.
                f_max = MAX_SAFE_FRACTION
                if train_static + act > device_memory:
                    problems.append("training devices cannot hold gradients, optimizer state "
                                    "and activations")
            f_max = max(0.0, math.floor(f_max * 100) / 100)
            max_tokens = max(0, int((f_max * a0 - engine_w) // kv_tok) - page)
            frac = inputs.sglang_mem_fraction_static
            if f_min > f_max:
                problems.append(
                    f"KV cache for {tokens} tokens needs --sglang-mem-fraction-static >= "
                    f"{f_min:.2f} but the trainer needs it <= {f_max:.2f}")
            elif not f_min <= frac <= f_max:
                fraction_problem = (
                    f"--sglang-mem-fraction-static {frac} is outside the safe range "
                    f"[{math.ceil(f_min * 100) / 100:.2f}, {f_max:.2f}]")
    else:
        roll_side = engine_w
        if engine == "vanilla":
            kv_tokens = inputs.sequences * (inputs.seq_len + VANILLA_KV_SLACK)
            parts["KV cache (vanilla sampler)"] = kv_tokens * kv_tok
            roll_side += kv_tokens * kv_tok
        train_side = train_static + act
        need = train_side + roll_side if pooled else max(train_side, roll_side)
        if static_fits and need > device_memory:
            problems.append(f"needs {gib(need)} per device, {gib(device_memory)} available")
    feasible = not problems  # some --sglang-mem-fraction-static works
    if fraction_problem:
        problems.append(fraction_problem)
    fits = not problems
    estimates = ("activations + logits (training)",)
    return MemoryPlan(
        device_memory=device_memory, memory_source=memory_source, train_devices=n_train,
        rollout_devices=n_roll, parts=parts, estimates=estimates, required_tokens=tokens,
        kv_bytes_per_token=kv_tok, static_fits=static_fits, feasible=feasible, fits=fits,
        mem_fraction_min=None if f_min is None else round(f_min, 4), mem_fraction_max=f_max,
        max_total_tokens=max_tokens, problems=problems, advice=[], inputs=inputs,
        pooled=pooled or remote,
    )


def _largest_fitting(fits, current: int, lowest: int) -> int | None:
    """Largest value in [lowest, current) for which `fits(value)` holds (monotone)."""
    lo, hi, best = lowest, current - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def plan_memory(
    shape: ModelShape, inputs: PlanInputs, device_memory: int, num_devices: int = 1,
    shared_memory: bool = False, memory_source: str = "device memory",
) -> MemoryPlan:
    """The plan for `inputs`; when it does not fit, advice names each setting that would."""
    args = (device_memory, num_devices, shared_memory, memory_source)
    plan = _evaluate(shape, inputs, *args)
    if plan.fits:
        return plan

    if plan.feasible:
        plan.advice = [f"--sglang-mem-fraction-static {plan.mem_fraction_max:.2f} (now "
                       f"{inputs.sglang_mem_fraction_static})"]
        return plan

    def fits_with(**change: Any) -> bool:
        return _evaluate(shape, dataclasses.replace(inputs, **change), *args).feasible

    advice = []
    for name, lowest in (("batch_size", 1), ("num_generations", 2), ("max_new_tokens", 1),
                         ("max_prompt_length", 1)):
        best = _largest_fitting(lambda v, n=name: fits_with(**{n: v}),
                                getattr(inputs, name), lowest)
        flag = "--" + name.replace("_", "-")
        if best is not None:
            advice.append(f"{flag} {best} (now {getattr(inputs, name)})")
    if inputs.dtype == "float32" and fits_with(dtype="bfloat16"):
        advice.append("--dtype bfloat16 (halves weights, optimizer state and KV cache)")
    if inputs.beta and fits_with(beta=0.0):
        advice.append("--beta 0 (no reference model copy)")
    if not shared_memory and num_devices > 1:
        for n in range(1, num_devices):
            if fits_with(rollout_devices=n):
                advice.append(f"--rollout-devices {n} (engine on its own devices)")
                break
    if not advice:
        advice.append("nothing in these settings fits: use more devices, a larger TPU or a "
                      "smaller model")
    plan.advice = advice
    return plan
