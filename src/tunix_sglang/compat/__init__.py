"""Every fix to the released Tunix / sglang-jax behaviour, in one registry.

Each entry of `FIXES` names a capability check of the installed code (`needed`: is the
problem there? never a version number alone) and the fix (`patch`: it keeps the replaced
callable in `base.ORIGINALS` and returns True when it patched). `apply_all()` decides and
applies each once per process, in this order (later fixes read what earlier ones kept), and
records the active ones in `ACTIVE_FIXES`; `doctor` lists this registry. Each fix has a test
under tests/compat/ that runs the released original and shows it wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import threading
from collections.abc import Callable

from tunix_sglang.compat import tunix as tunix_fixes
from tunix_sglang.compat.sglang_jax import (
    attention,
    cpu_forward,
    logprobs,
    model_runner,
    process,
    sampler,
)


@dataclasses.dataclass(frozen=True)
class Fix:
    name: str
    package: str  # the import name of the package it fixes: skipped when not installed
    needed: Callable[[], bool]
    patch: Callable[[], bool]
    why: str


def _sglang(name: str, module, why: str) -> Fix:
    return Fix(f"sglang_jax.{name}", "sgl_jax", getattr(module, f"{name}_needed"),
               getattr(module, f"fix_{name}"), why)


def _rope(family: str) -> Fix:
    return Fix(f"tunix.{family}.rope_theta", "tunix",
               functools.partial(tunix_fixes.rope_theta_needed, family),
               functools.partial(tunix_fixes.fix_rope_theta, family),
               "Attention ignored config.rope_theta (always 1e6)")


FIXES: tuple[Fix, ...] = (
    _rope("qwen3"),
    _rope("llama3"),
    Fix("tunix.rl.pinned_host_on_multiprocess_cpu", "tunix",
        tunix_fixes.pinned_host_on_multiprocess_cpu_needed,
        tunix_fixes.fix_pinned_host_on_multiprocess_cpu,
        "pinned_host placement cannot be replicated across CPU processes"),
    _sglang("threading_atexit_restored", process,
            "importing sgl_jax engine disabled threading._register_atexit process-wide"),
    _sglang("native_attention_pytree", attention,
            "NativeAttention registered twice as a pytree (flax 0.12 registers nnx Modules)"),
    _sglang("min_p_filter_arity", sampler,
            "non-TPU sampler passed a 3-tuple to _apply_min_p_filter (unpacks 2)"),
    _sglang("sampler_sort_in_graph", sampler,
            "non-TPU sampler sorted in a host callback (hangs a mesh spanning processes)"),
    _sglang("native_decode_attention", cpu_forward,
            "CPU decode attention scored every query against every key of the batch"),
    _sglang("native_prefill_attention", cpu_forward,
            "CPU prefill attention scored every new token against every key slot of the batch"),
    _sglang("forward_reads_weights", model_runner,
            "jitted forward closed over its weight leaves; sync could not change outputs"),
    _sglang("logprob_logits_padding", logprobs,
            "return_logprob: sampled logits had real rows, sampling metadata padded rows"),
    _sglang("sampler_returns_logprobs", sampler,
            "sampled-token logprobs were computed inside lax.cond under jit and lost"),
    _sglang("sampler_rng_advances", sampler,
            "sampler RNG state never advanced between calls (identical samples)"),
    _sglang("lm_head_dtype", model_runner,
            "untied lm_head was bfloat16 whatever the model dtype"),
    _sglang("idle_scheduler_waits", process,
            "idle scheduler loop spun without sleeping, stealing the trainer's CPU"),
    _sglang("scheduler_watchdog_contained", process,
            "the scheduler watchdog SIGQUIT the parent process after a slow forward"),
    _sglang("keep_process_signal_handlers", process,
            "engine start replaced SIGCHLD/SIGQUIT handlers, disabled the resource tracker"),
    _sglang("logging_config_kept", process,
            "engine start ran logging.basicConfig(force=True): trainer log handlers removed"),
    _sglang("engine_device_subset", model_runner,
            "engine mesh always spanned all jax.devices()"),
    _sglang("no_detokenizer_without_tokenizer", process,
            "an idle detokenizer thread SIGQUITs the process when its socket is closed"),
    _sglang("penalty_precompile_optional", model_runner,
            "penalty programs precompiled for every batch padding though rollouts use none"),
    # Wraps load_model / initialize_jit as the fixes above left them (forward_reads_weights).
    _sglang("cpu_lm_head_layout", cpu_forward,
            "CPU logits re-packed the whole [vocab, hidden] head on every call"),
)

ACTIVE_FIXES: dict[str, str] = {}  # name -> why, for the fixes this process applied
_DECIDED: dict[str, bool] = {}
_LOCK = threading.RLock()


def apply_all() -> dict[str, str]:
    """Apply every fix the installed packages need, once per process; the active ones."""
    with _LOCK:
        for fix in FIXES:
            if fix.name not in _DECIDED:
                _DECIDED[fix.name] = bool(importlib.util.find_spec(fix.package) is not None
                                          and fix.needed() and fix.patch())
            if _DECIDED[fix.name]:
                ACTIVE_FIXES[fix.name] = fix.why
    return dict(ACTIVE_FIXES)


def status() -> list[tuple[Fix, bool]]:
    """Every registered fix and whether this process applied it (after `apply_all`)."""
    apply_all()
    return [(fix, _DECIDED[fix.name]) for fix in FIXES]
