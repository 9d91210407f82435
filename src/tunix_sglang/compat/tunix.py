"""Fixes to released Tunix (0.1.7): rope_theta in attention, pinned-host snapshots on a
multi-process CPU. Same contract as the sglang-jax fixes (`<name>_needed`, `fix_<name>`)."""

from __future__ import annotations

import contextvars
import functools
import inspect
from types import ModuleType

from tunix_sglang.compat.base import ORIGINALS, source_of

# ---------------------------------------------------------------------------------------
# rope_theta
# ---------------------------------------------------------------------------------------

# rope_theta of the model whose attention is being traced right now.
_ROPE_THETA: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "tunix_sglang_rope_theta", default=None
)


def rope_theta_is_ignored(model_module: ModuleType) -> bool:
    """True when the module's attention calls `apply_rope` without the config's rope_theta."""
    src = inspect.getsource(model_module.Attention.block)
    return "apply_rope(" in src and "rope_theta" not in src


def _model_module(family: str) -> ModuleType:
    from tunix.models.llama3 import model as llama3_model
    from tunix.models.qwen3 import model as qwen3_model

    return {"qwen3": qwen3_model, "llama3": llama3_model}[family]


def rope_theta_needed(family: str) -> bool:
    return rope_theta_is_ignored(_model_module(family))


def fix_rope_theta(family: str) -> bool:
    """Make Attention honour `config.rope_theta` (Tunix 0.1.7 always uses its default).

    Real checkpoints ship other values (Qwen3-4B-2507: 5e6, Llama 3: 5e5); without this the
    trainer computes a different function than the checkpoint and than any engine reading
    config.json. The fix is trace-time only: the compiled program is the same shape.
    """
    model_module = _model_module(family)
    orig_apply_rope = model_module.apply_rope
    orig_block = model_module.Attention.block
    ORIGINALS[f"tunix.{family}.apply_rope"] = orig_apply_rope
    ORIGINALS[f"tunix.{family}.Attention.block"] = orig_block

    @functools.wraps(orig_apply_rope)
    def apply_rope(inputs, positions, head_dim, rope_theta=None):
        theta = rope_theta if rope_theta is not None else _ROPE_THETA.get()
        if theta is None:
            return orig_apply_rope(inputs, positions, head_dim=head_dim)
        return orig_apply_rope(inputs, positions, head_dim=head_dim, rope_theta=theta)

    @functools.wraps(orig_block)
    def block(self, *args, **kwargs):
        token = _ROPE_THETA.set(self.config.rope_theta)
        try:
            return orig_block(self, *args, **kwargs)
        finally:
            _ROPE_THETA.reset(token)

    model_module.apply_rope = apply_rope
    model_module.Attention.block = block
    return True


# ---------------------------------------------------------------------------------------
# pinned_host placement on a multi-process CPU
# ---------------------------------------------------------------------------------------

def places_on_memory_kind_everywhere(fn) -> bool:
    """True when `put_params_on_memory_kind` moves params to the requested memory kind with
    `jax.device_put` whatever the backend and process count."""
    src = source_of(fn)
    return "device_put" in src and "memory_kind" in src and "process_count" not in src


def pinned_host_on_multiprocess_cpu_needed() -> bool:
    from tunix.rl import utils as rl_utils

    return places_on_memory_kind_everywhere(rl_utils.put_params_on_memory_kind)


def fix_pinned_host_on_multiprocess_cpu() -> bool:
    """Keep parameters where they are when Tunix asks for `pinned_host` on a multi-process CPU.

    RLCluster snapshots the actor to pinned host memory after init and every sync. On CPU that
    memory is the same RAM, and across several processes XLA cannot replicate the placement
    op ("UNIMPLEMENTED: Side-effect ops cannot be replicated"), so simulated multi-host runs
    die at start-up. The check is made per call: TPU and single-process runs are untouched.
    """
    from tunix.rl import utils as rl_utils

    orig = rl_utils.put_params_on_memory_kind
    ORIGINALS["tunix.rl.utils.put_params_on_memory_kind"] = orig

    @functools.wraps(orig)
    def put_params_on_memory_kind(params, memory_kind):
        import jax

        if memory_kind == "pinned_host" and jax.default_backend() == "cpu" and (
            jax.process_count() > 1
        ):
            return params
        return orig(params, memory_kind)

    rl_utils.put_params_on_memory_kind = put_params_on_memory_kind
    return True
