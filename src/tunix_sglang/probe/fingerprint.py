"""Arrival, exactly: a 64-bit fingerprint of every parameter, computed on device.

For an array x of n elements, each lane is

    sum_i  bits(x_i) * m_i   (mod 2**32),   m_i = fmix32(i XOR seed) | 1

where bits() reinterprets the value as an unsigned integer of its own width, i is the
row-major position and fmix32 is MurmurHash3's finalizer. Two lanes with different seeds
give 64 bits. Integer addition wraps and is associative, so the value does not depend on
sharding, device count or reduction order: the engine's buffers and the trainer's arrays,
laid out as the engine's (`weight_map.transform`), give the same value exactly when they
hold the same bits at the same positions. One changed element always changes it (m_i is
odd, so invertible mod 2**32); a transpose, permutation, partial write or stale tensor
changes it except with probability ~2**-64.

Both sides compute it with one jitted program for all their parameters: the engine on the
buffers its jitted forward reads (`runner.model_state_leaves`), the trainer on its own
parameters after the same name/layout transform the sync applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import tunix_sglang.engine.weight_map as weight_map

SEEDS = (0x9E3779B9, 0x7F4A7C15)
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def fingerprint(x: jax.Array) -> jax.Array:
    """uint32[2] of one array (traceable)."""
    width = jnp.dtype(x.dtype).itemsize
    if width not in _UINT:
        raise TypeError(f"cannot fingerprint {x.dtype} values ({width}-byte elements)")
    bits = jax.lax.bitcast_convert_type(x, _UINT[width]).astype(jnp.uint32)
    idx = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
    lanes = []
    for seed in SEEDS:
        mult = _fmix32(idx ^ jnp.uint32(seed)) | jnp.uint32(1)
        lanes.append(jnp.sum(bits * mult, dtype=jnp.uint32))
    return jnp.stack(lanes)


def _replicated_on(arrays: Sequence[Any]):
    """A replicated sharding on the arrays' mesh (so every process can read the result)."""
    for a in arrays:
        mesh = getattr(getattr(a, "sharding", None), "mesh", None)
        if mesh is not None and getattr(mesh, "axis_names", None):
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return None


def _local(x: jax.Array) -> np.ndarray:
    """This process's copy of a (replicated) result, also when it spans processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_shards[0].data)


def _as_ints(lanes: np.ndarray) -> list[int]:
    lanes = lanes.astype(np.uint64)
    return [int(hi) << 32 | int(lo) for lo, hi in lanes]


_ENGINE_FN: dict[Any, Any] = {}


def of_arrays(arrays: Sequence[jax.Array]) -> list[int]:
    """64-bit fingerprints of arrays as they are (the engine's live buffers); one program."""
    if not arrays:
        return []
    out = _replicated_on(arrays)
    fn = _ENGINE_FN.get(out)
    if fn is None:
        fn = _ENGINE_FN[out] = jax.jit(lambda xs: jnp.stack([fingerprint(x) for x in xs]),
                                       out_shardings=out)
    with jax.transfer_guard("allow"):
        return _as_ints(_local(fn(list(arrays))))


_TRAINER_FN: dict[Any, Any] = {}


def expected(flat: dict[str, Any], engine_layout: dict[str, tuple[tuple[int, ...], str]]
             ) -> dict[str, int]:
    """What each engine parameter's fingerprint must be, computed from the trainer's arrays.

    flat: {Tunix name: array} (device arrays, possibly spanning processes, or numpy);
    engine_layout: {engine name: (shape, dtype name)} as the engine reports it. The arrays are
    laid out by the same `weight_map` code the sync uses, then fingerprinted in one program.
    Raises weight_map.IncompleteSyncError when the two sides cannot be matched 1:1.
    """
    plan = weight_map.plan(flat, {n: s for n, (s, _) in engine_layout.items()})
    dtypes = tuple(engine_layout[m.engine_name][1] for m in plan)
    arrays = [flat[m.tunix_name] for m in plan]
    out = _replicated_on(arrays)
    key = (tuple(plan), dtypes, out)
    fn = _TRAINER_FN.get(key)
    if fn is None:
        def run(xs):
            return jnp.stack([fingerprint(weight_map.transform(x, m, jnp.dtype(dt)))
                              for x, m, dt in zip(xs, plan, dtypes, strict=True)])

        fn = _TRAINER_FN[key] = jax.jit(run, out_shardings=out)
    with jax.transfer_guard("allow"):
        values = _as_ints(_local(fn(arrays)))
    return {m.engine_name: v for m, v in zip(plan, values, strict=True)}


def hex64(value: int) -> str:
    return f"{value:016x}"
