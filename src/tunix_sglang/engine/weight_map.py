"""Tunix parameter names and layouts -> sglang-jax engine names and layouts: the one mapping.

Both sides of a weight sync use it: the engine to write what the trainer sends
(`InProcessEngine.sync_from_tunix`), and the proof to compute, on the trainer's side, the
fingerprint each engine parameter must have (`probe.fingerprint`) — also on a controller that
has no engine at all (remote servers), from a Tunix name, its shape and the engine's dtype.

Tunix names (Qwen3, Qwen2, Llama3 share them) map to engine names relative to the backbone
("transformer" in sglang-jax 0.0.2, "model" upstream; detected from the engine's names).
Layouts:
  copy          same shape
  merge_last2   q/k/v projections [D,H,hd] -> [D,H*hd] (row-major order kept)
  merge_first2  o projection [H,hd,D] -> [H*hd,D]
  flatten       biases [H,hd] -> [H*hd]
  transpose     Tunix lm_head [D,V] -> engine lm_head.embedding [V,D] (untied head)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any


class IncompleteSyncError(RuntimeError):
    """Tunix parameters that cannot be laid out as the engine's: a sync would leave engine
    parameters unwritten, source parameters unused, or shapes that do not fit."""


_RULES: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"embedder\.input_embedding"), "{B}.embed_tokens.embedding", "copy"),
    (re.compile(r"final_norm\.w"), "{B}.norm.scale", "copy"),
    (re.compile(r"lm_head\.w"), "lm_head.embedding", "transpose"),
    (re.compile(r"layers\.(\d+)\.attn\.([qkv])_proj\.w"),
     r"{B}.layers.\1.self_attn.\2_proj.weight", "merge_last2"),
    (re.compile(r"layers\.(\d+)\.attn\.o_proj\.w"),
     r"{B}.layers.\1.self_attn.o_proj.weight", "merge_first2"),
    (re.compile(r"layers\.(\d+)\.attn\.([qkvo])_bias"),
     r"{B}.layers.\1.self_attn.\2_proj.bias", "flatten"),
    (re.compile(r"layers\.(\d+)\.attn\.([qk])_norm\.w"),
     r"{B}.layers.\1.self_attn.\2_norm.scale", "copy"),
    (re.compile(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.kernel"),
     r"{B}.layers.\1.mlp.\2_proj.weight", "copy"),
    (re.compile(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.w"),
     r"{B}.layers.\1.\2.scale", "copy"),
]


def path_names(path) -> list[str]:
    """Readable names of a pytree key path, without the trailing Variable `.value`."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    if names and names[-1] == "value":
        names.pop()
    return names


def _engine_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if layout == "copy":
        return shape
    if layout == "transpose":
        return shape[::-1] if len(shape) == 2 else None
    if layout == "merge_last2":
        return (*shape[:-2], shape[-2] * shape[-1]) if len(shape) >= 2 else None
    if layout == "merge_first2":
        return (shape[0] * shape[1], *shape[2:]) if len(shape) >= 2 else None
    return (math.prod(shape),)  # flatten


@dataclasses.dataclass(frozen=True)
class Mapped:
    """Where one Tunix parameter goes in the engine, and in which shape."""

    tunix_name: str
    engine_name: str
    layout: str
    engine_shape: tuple[int, ...]


def map_param(tunix_name: str, shape: tuple[int, ...], backbone: str) -> Mapped | None:
    """The engine name and shape of a Tunix parameter; None when no rule matches."""
    for pat, template, layout in _RULES:
        m = pat.fullmatch(tunix_name)
        if m:
            eshape = _engine_shape(layout, tuple(int(d) for d in shape))
            if eshape is None:
                raise IncompleteSyncError(
                    f"{tunix_name}: a {len(shape)}-d array cannot be laid out as {layout}")
            return Mapped(tunix_name, m.expand(template.replace("{B}", backbone)), layout,
                          eshape)
    return None


def backbone_of(engine_names: Any) -> str:
    """The engine's backbone prefix (the first name component of its layer parameters)."""
    found = {n.split(".")[0] for n in engine_names if ".layers." in n}
    if len(found) != 1:
        raise IncompleteSyncError(
            f"cannot find the engine's backbone prefix among {sorted(found)}")
    return found.pop()


def transform(x: Any, m: Mapped, dtype: Any) -> Any:
    """A Tunix array in the engine's layout and dtype (jnp ops: traceable, any device)."""
    import jax.numpy as jnp

    if m.layout == "transpose":
        x = jnp.transpose(x)
    elif tuple(x.shape) != m.engine_shape:
        x = jnp.reshape(x, m.engine_shape)
    return x if x.dtype == dtype else x.astype(dtype)


def flatten_tunix_params(src: Any) -> tuple[dict[str, Any], list[str]]:
    """{dotted name: array} of the Params in a Tunix model / nnx.State / nested dict.

    Returns (params, ignored non-Param variable names).
    """
    import jax
    from flax import nnx

    if isinstance(src, nnx.Module):
        src = nnx.state(src, nnx.Param)
    out: dict[str, Any] = {}
    ignored: list[str] = []
    if isinstance(src, nnx.State):
        for path, v in src.flat_state():
            name = ".".join(str(p) for p in path)
            if isinstance(v, nnx.Variable):
                if not isinstance(v, nnx.Param):
                    ignored.append(name)
                    continue
                v = v.value
            out[name] = v
        return out, ignored
    for path, leaf in jax.tree_util.tree_flatten_with_path(src)[0]:
        out[".".join(path_names(path))] = leaf
    return out, ignored


def plan(flat: dict[str, Any], engine_shapes: dict[str, tuple[int, ...]]) -> list[Mapped]:
    """Every engine parameter written by exactly one Tunix parameter, in the engine's shape.

    `flat`: {Tunix name: array}; `engine_shapes`: {engine name: shape}. Raises
    IncompleteSyncError naming what is not 1:1 (nothing has been changed when it raises).
    """
    if any(".lora" in n or "lora_" in n for n in flat):
        raise IncompleteSyncError(
            "LoRA parameters cannot be synced into this engine (merge them first)")
    backbone = backbone_of(engine_shapes)
    out, unmapped, seen, wrong = [], [], {}, []
    for tname in sorted(flat):
        m = map_param(tname, tuple(flat[tname].shape), backbone)
        if m is None or m.engine_name not in engine_shapes:
            unmapped.append(tname if m is None else f"{tname} -> {m.engine_name}")
            continue
        if m.engine_name in seen:
            raise IncompleteSyncError(
                f"{tname} and {seen[m.engine_name]} both map to {m.engine_name}")
        seen[m.engine_name] = tname
        if tuple(engine_shapes[m.engine_name]) != m.engine_shape:
            wrong.append(f"{tname} {tuple(flat[tname].shape)} -> {m.engine_name} "
                         f"{m.engine_shape}, engine has {tuple(engine_shapes[m.engine_name])}")
        out.append(m)
    missing = sorted(set(engine_shapes) - set(seen))
    parts = []
    if missing:
        parts.append(f"engine parameters not written: {missing}")
    if unmapped:
        parts.append(f"source parameters with no engine counterpart: {unmapped}")
    if wrong:
        parts.append(f"shapes that do not match the engine's: {wrong}")
    if parts:
        raise IncompleteSyncError(
            "incomplete weight sync, nothing was changed; " + "; ".join(parts))
    return out
