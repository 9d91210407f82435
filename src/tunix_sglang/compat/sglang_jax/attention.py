"""sglang-jax's native (CPU) attention backend: its import (its attention per sequence:
`cpu_forward`)."""

from __future__ import annotations

import importlib
import sys

from tunix_sglang.compat.base import ORIGINALS, module_file_source

# ---------------------------------------------------------------------------------------
# NativeAttention pytree registration
# ---------------------------------------------------------------------------------------

_NATIVE_MOD = "sgl_jax.srt.layers.attention.native_backend"


def native_attention_registration_is_duplicate() -> bool:
    """True when native_backend registers an nnx.Module subclass as a pytree again."""
    import jax
    from flax import nnx

    src = module_file_source(_NATIVE_MOD)
    if "@register_pytree_node_class" not in src:
        return False

    # Behaviour: does flax already register every nnx.Module subclass?
    class _Probe(nnx.Module):
        def tree_flatten(self):
            return (), None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls()

    try:
        jax.tree_util.register_pytree_node_class(_Probe)
    except ValueError as e:
        return "Duplicate" in str(e)
    return False


def native_attention_pytree_needed() -> bool:
    # Imported already: its registration went through, there is nothing left to fix.
    return _NATIVE_MOD not in sys.modules and native_attention_registration_is_duplicate()


def fix_native_attention_pytree() -> bool:
    """Import native_backend with a registration that tolerates an existing one.

    flax 0.12 registers every nnx.Module as a pytree; native_backend.py:13 registers
    NativeAttention again and the import raises "Duplicate custom PyTreeDef type
    registration", which kills the CPU attention backend. flax's own registration already
    flattens the module, so skipping the second one is all that is needed.
    """
    import jax.tree_util as jtu

    original = jtu.register_pytree_node_class
    ORIGINALS["jax.tree_util.register_pytree_node_class"] = original

    def tolerant(cls):
        try:
            return original(cls)
        except ValueError as e:
            if "Duplicate custom PyTreeDef" not in str(e):
                raise
            return cls

    jtu.register_pytree_node_class = tolerant
    try:
        importlib.import_module(_NATIVE_MOD)
    finally:
        jtu.register_pytree_node_class = original
    return True
