"""sglang-jax's model runner and worker: the weights its forward reads, the output head's
dtype, the devices of its mesh, the programs it precompiles."""

from __future__ import annotations

import dataclasses
import functools
import importlib

from tunix_sglang.compat.base import ORIGINALS, source_of
from tunix_sglang.engine.scheduler_hooks import DEVICE_CHOICE, place_replicated

# ---------------------------------------------------------------------------------------
# The jitted forward must read the weights the sync writes
# ---------------------------------------------------------------------------------------

def forward_closes_over_weights(model_runner_cls) -> bool:
    """True when `initialize_jit` binds the weight leaves into the closure once."""
    src = source_of(model_runner_cls.initialize_jit)
    return "model_state_leaves" in src and "self.model_state_leaves" not in src


def _initialize_jit_reading_attributes(self) -> None:
    """Replacement for ModelRunner.initialize_jit (0.0.2 semantics, same jitted programs).

    The weight leaves and the sampler state are read from `self.model_state_leaves` /
    `self.sampler_state_leaves` on every call, so assigning new (same shape, dtype and
    sharding) leaves changes what the engine computes without recompiling.
    """
    import jax
    from flax import nnx

    model_def, model_state = nnx.split(self.model)
    leaves, model_state_def = jax.tree_util.tree_flatten(model_state)
    sampler_def, sampler_state = nnx.split(self.sampler)
    s_leaves, sampler_state_def = jax.tree_util.tree_flatten(sampler_state)
    mesh = getattr(self, "mesh", None)
    if mesh is not None:
        # The sampler's RNG state is created on the default device; put it on the engine's
        # mesh (replicated), or an engine on other devices fails with "incompatible devices".
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        s_leaves = [place_replicated(x, replicated) for x in s_leaves]

    self.model_def = model_def
    self.model_state_def = model_state_def
    self.model_state_leaves = leaves
    self.sampler_def = sampler_def
    self.sampler_state_def = sampler_state_def
    self.sampler_state_leaves = s_leaves

    @functools.partial(jax.jit, donate_argnames=["token_to_kv_pool"],
                       static_argnames=["model_state_def"])
    def jitted_run_model(model_def, model_state_def, model_state_leaves, forward_batch,
                         token_to_kv_pool, logits_metadata):
        state = jax.tree_util.tree_unflatten(model_state_def, model_state_leaves)
        model = nnx.merge(model_def, state)
        return model(forward_batch, token_to_kv_pool, logits_metadata)

    @functools.partial(jax.jit, static_argnames=["sampler_state_def"])
    def jitted_sampler(sampler_def, sampler_state_def, sampler_state_leaves, *args):
        state = jax.tree_util.tree_unflatten(sampler_state_def, sampler_state_leaves)
        sampler = nnx.merge(sampler_def, state)
        return sampler(*args)

    def run_model_wrapper(forward_batch, logits_metadata):
        return jitted_run_model(self.model_def, self.model_state_def,
                                self.model_state_leaves, forward_batch,
                                self.token_to_kv_pool, logits_metadata)

    def sampler_wrapper(*args):
        return jitted_sampler(self.sampler_def, self.sampler_state_def,
                              self.sampler_state_leaves, *args)

    self.jitted_run_model = run_model_wrapper
    self.jitted_sampler = sampler_wrapper


def forward_reads_weights_needed() -> bool:
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    return forward_closes_over_weights(ModelRunner)


def fix_forward_reads_weights() -> bool:
    """Make ModelRunner's jitted forward read its weights per call: 0.0.2 closes over the
    leaves once, so assigning new ones (a weight sync) changed nothing it computed."""
    from sgl_jax.srt.model_executor.model_runner import ModelRunner

    ORIGINALS["ModelRunner.initialize_jit"] = ModelRunner.initialize_jit
    ModelRunner.initialize_jit = _initialize_jit_reading_attributes
    return True


# ---------------------------------------------------------------------------------------
# Untied lm_head created in bfloat16 whatever the model dtype
# ---------------------------------------------------------------------------------------

_CAUSAL_LMS = (
    ("sgl_jax.srt.models.qwen3", "Qwen3ForCausalLM"),
    ("sgl_jax.srt.models.qwen2", "Qwen2ForCausalLM"),
    ("sgl_jax.srt.models.llama", "LlamaForCausalLM"),
)


def lm_head_ignores_model_dtype(model_cls) -> bool:
    src = source_of(model_cls.__init__)
    i = src.find("ParallelLMHead(")
    return i >= 0 and "dtype" not in src[i : src.find(")", i)]


def _causal_lms_with_bf16_head() -> list[type]:
    out = []
    for modname, clsname in _CAUSAL_LMS:
        try:
            cls = getattr(importlib.import_module(modname), clsname)
        except (ImportError, AttributeError):
            continue
        if lm_head_ignores_model_dtype(cls):
            out.append(cls)
    return out


def lm_head_dtype_needed() -> bool:
    return bool(_causal_lms_with_bf16_head())


def fix_lm_head_dtype() -> bool:
    """Give the untied output head the model's dtype.

    Qwen3/Qwen2/Llama create `ParallelLMHead(vocab, hidden)` without a dtype, so the head is
    bfloat16 even for a float32 model: an untied float32 checkpoint loses precision in the
    logits (measured: logprob errors ~0.017 vs Tunix on the tiny untied model).
    """
    import jax.numpy as jnp

    def make(init):
        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            head = self.__dict__.get("lm_head")
            dtype = getattr(self, "dtype", None)
            if head is not None and dtype is not None:
                emb = head.embedding
                if emb.value.dtype != jnp.dtype(dtype):
                    emb.value = emb.value.astype(dtype)
                    head.dtype = jnp.dtype(dtype)

        return __init__

    for cls in _causal_lms_with_bf16_head():
        ORIGINALS[f"{cls.__name__}.__init__"] = cls.__init__
        cls.__init__ = make(cls.__init__)
    return True


# ---------------------------------------------------------------------------------------
# Engine on a chosen subset of devices
# ---------------------------------------------------------------------------------------

def mesh_uses_all_devices(scheduler_mod) -> bool:
    """True when the scheduler builds its mesh without passing devices (all jax.devices())."""
    src = source_of(scheduler_mod.Scheduler.__init__)
    call = src[src.find("create_device_mesh(") :][:200] if "create_device_mesh(" in src else ""
    return bool(call) and "devices=" not in call


def engine_device_subset_needed() -> bool:
    from sgl_jax.srt.managers import scheduler as scheduler_mod

    return mesh_uses_all_devices(scheduler_mod)


def fix_engine_device_subset() -> bool:
    """Let the engine's mesh be built from a chosen device list.

    0.0.2 always builds its mesh from `jax.devices()` (scheduler.py -> mesh_utils.py), i.e.
    every device of every process: the rollout engine cannot be given a subset (e.g.
    `--rollout-devices N`), and per-host engines in a multi-process run become one slow
    global program. Inside `scheduler_hooks.engine_devices(devs)` the scheduler's
    `create_device_mesh` gets `devices=devs`; outside, behaviour is unchanged.
    """
    from sgl_jax.srt.managers import scheduler as scheduler_mod

    fn = scheduler_mod.create_device_mesh
    ORIGINALS["scheduler.create_device_mesh"] = fn

    @functools.wraps(fn)
    def create_device_mesh(ici_parallelism, dcn_parallelism, devices=None, **kw):
        if devices is None and DEVICE_CHOICE.devices is not None:
            devices = DEVICE_CHOICE.devices
        return fn(list(ici_parallelism), list(dcn_parallelism), devices=devices, **kw)

    scheduler_mod.create_device_mesh = create_device_mesh
    return True


# ---------------------------------------------------------------------------------------
# Penalty programs precompiled although no rollout uses penalties
# ---------------------------------------------------------------------------------------

def penalties_always_precompiled(worker_cls, server_args_cls) -> bool:
    """True when the worker's precompilation always includes the penalty programs: its
    `run_precompile` calls `precompile_penalties` and no server argument can turn it off."""
    calls = "self.precompile_penalties(" in source_of(worker_cls.run_precompile)
    switch = any("penalt" in f.name for f in dataclasses.fields(server_args_cls))
    return calls and not switch


def penalty_precompile_optional_needed() -> bool:
    from sgl_jax.srt.managers.tp_worker import ModelWorker
    from sgl_jax.srt.server_args import ServerArgs

    return penalties_always_precompiled(ModelWorker, ServerArgs)


def fix_penalty_precompile_optional() -> bool:
    """Let an engine that never uses penalties skip their precompilation.

    `run_precompile` compiles one penalty program per batch-size padding (~3 s each on a
    2-core CPU for the tiny model) although RL rollouts send no frequency/presence/
    repetition penalties. Inside `scheduler_hooks.engine_devices(...,
    skip_penalty_precompile=True)` they are skipped (a request with penalties would still
    work, compiling on first use).
    """
    from sgl_jax.srt.managers.tp_worker import ModelWorker

    fn = ModelWorker.precompile_penalties
    ORIGINALS["ModelWorker.precompile_penalties"] = fn

    @functools.wraps(fn)
    def precompile_penalties(self, *args, **kwargs):
        if DEVICE_CHOICE.skip_penalty_precompile:
            return None
        return fn(self, *args, **kwargs)

    ModelWorker.precompile_penalties = precompile_penalties
    return True
