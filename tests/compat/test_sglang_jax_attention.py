"""compat/sglang_jax/attention.py: the native backend's import."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from tunix_sglang import compat  # noqa: E402

compat.apply_all()


def test_native_attention_pytree():
    from sgl_jax.srt.layers.attention.native_backend import NativeAttention

    # What native_backend.py:13 does at import: a second registration is refused.
    with pytest.raises(ValueError, match="Duplicate custom PyTreeDef"):
        jax.tree_util.register_pytree_node_class(NativeAttention)
    attn = NativeAttention(4, 2)  # imported (thanks to the fix) and usable as a pytree
    jax.tree_util.tree_flatten(attn)
