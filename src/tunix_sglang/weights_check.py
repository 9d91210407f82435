"""What a rollout server accepts as weights, and reading them from files under its root.

Exactly its model's Tunix parameters: every name once, each with the Tunix shape the
engine's mapping takes (`InProcessEngine.plan_sync`: q/k/v/o head axes merged, lm_head
transposed; nothing else is reshaped) and the engine's dtype (nothing is cast), every float
finite and within ±MAX_ABS_WEIGHT (a weight set scaled by 1e30 is finite, yet the engine
would serve noise from overflowed activations). A push is checked on its manifest at begin
and on its values at commit; `/weights/load` checks a safetensors header before reading any
data, and a model directory's config.json before loading it. Error text names only the
server's own parameters, never what a file contains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tunix_sglang.errors import UserError
from tunix_sglang.weights_wire import Manifest, is_float, load_tunix_safetensors, np_dtype

# safetensors dtype codes -> numpy names (those a Tunix model can hold)
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16",
                      "BF16": "bfloat16", "I64": "int64", "I32": "int32", "I8": "int8",
                      "U8": "uint8", "BOOL": "bool"}
# config.json fields that fix the parameters' shapes: a model directory loaded into a server
# must agree with the server's own model on all of them.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "tie_word_embeddings")
# Trained checkpoints stay orders of magnitude below this; corrupt or overflowing ones don't.
MAX_ABS_WEIGHT = 1e6


class WeightsRejected(ValueError):
    """Weights the server will not apply; nothing was changed. The message says why."""


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """{Tunix name: (shape, dtype name)} of the served model, and its config.json."""

    params: Mapping[str, tuple[tuple[int, ...], str]]
    hf_config: Mapping[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * np_dtype(d).itemsize for s, d in self.params.values())

    def check_names(self, names: Iterable[str]) -> None:
        names = set(names)
        missing = sorted(set(self.params) - names)
        extra = len(names - set(self.params))
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's parameters missing (first: "
                         f"{missing[0]})")
        if extra:
            parts.append(f"{extra} tensors that are not parameters of this model")
        if parts:
            raise WeightsRejected("; ".join(parts) + " (Tunix parameter names expected)")

    def check_one(self, name: str, shape: Iterable[int], dtype: str) -> None:
        want_shape, want_dtype = self.params[name]
        if tuple(shape) != want_shape or dtype != want_dtype:
            raise WeightsRejected(f"{name}: must be {want_dtype}{list(want_shape)} exactly "
                                  "(no reshape or cast is applied)")

    def check_manifest(self, m: Manifest) -> None:
        self.check_names(t.name for t in m.tensors)
        for t in m.tensors:
            self.check_one(t.name, t.shape, t.dtype)

    def check_arrays(self, flat: Mapping[str, Any]) -> None:
        """Names, shapes, dtypes and values of arrays about to be applied."""
        self.check_names(flat)
        for name, x in flat.items():
            self.check_one(name, x.shape, np.dtype(x.dtype).name)
        self.check_values(flat)

    @staticmethod
    def check_values(flat: Mapping[str, Any]) -> None:
        bad = sorted(name for name, x in flat.items() if not values_ok(x))
        if bad:
            raise WeightsRejected(f"{len(bad)} parameters hold NaN, Inf or values beyond "
                                  f"±{MAX_ABS_WEIGHT:g} (first: {bad[0]})")

    def check_header(self, header: Mapping[str, Any], data_bytes: int) -> None:
        """A safetensors header against the model, before any data is read."""
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.check_names(entries)
        spans = []
        for name, e in entries.items():
            want_shape, want_dtype = self.params[name]
            off = e.get("data_offsets") if isinstance(e, Mapping) else None
            if (not isinstance(e, Mapping) or SAFETENSORS_DTYPES.get(e.get("dtype")) != want_dtype
                    or e.get("shape") != list(want_shape) or not isinstance(off, list)
                    or len(off) != 2 or not all(type(o) is int for o in off)):
                raise WeightsRejected(f"{name}: must be {want_dtype}{list(want_shape)} exactly "
                                      "(no reshape or cast is applied)")
            spans.append((off[0], off[1], math.prod(want_shape) * np_dtype(want_dtype).itemsize))
        end = 0
        for a, b, n in sorted(spans):
            if a != end or b - a != n:
                raise WeightsRejected("the file's tensor offsets are not contiguous")
            end = b
        if end != data_bytes:
            raise WeightsRejected("the file's size does not match its header")

    def check_model_config(self, cfg: Mapping[str, Any]) -> None:
        differ = [k for k in SHAPE_KEYS if cfg.get(k) != self.hf_config.get(k)]
        if differ:
            raise WeightsRejected(f"the directory's config.json is another model ({differ[0]} "
                                  "differs from the served model's)")


def param_spec(engine: Any, md: Any, dtype: str) -> ParamSpec:
    """The spec of `md`'s Tunix model as `engine` takes it (shapes via nnx.eval_shape)."""
    from tunix_sglang import models

    # weight_map.plan: every engine parameter written once, in a shape that fits, or it raises.
    plan, flat, _ = engine.plan_sync(models.abstract_params(md, dtype))
    params = {m.tunix_name: (tuple(flat[m.tunix_name].shape), np.dtype(p.dtype).name)
              for p, m in plan}
    return ParamSpec(params, dict(md.hf_config))


def values_ok(x: Any) -> bool:
    """Every float finite and within ±MAX_ABS_WEIGHT: min and max (no temporaries), which
    NaN propagates into and then fails the comparison."""
    if not is_float(x.dtype) or x.size == 0:
        return True
    with np.errstate(invalid="ignore"):
        lo, hi = float(x.min()), float(x.max())
    return -MAX_ABS_WEIGHT <= lo and hi <= MAX_ABS_WEIGHT


# -- files under --weights-root ------------------------------------------------------------


def resolve_under(root: Path, path: str | Path) -> Path:
    """`path` (absolute, or relative to root), symlinks resolved; it must stay inside root."""
    try:
        real = Path(os.path.realpath(os.path.join(root, path)))
    except (ValueError, OSError):
        raise WeightsRejected("the path is not a usable file name") from None
    if real != root and root not in real.parents:
        raise WeightsRejected("the path is outside --weights-root (symlinks resolved)")
    return real


def read_header(path: Path, spec: ParamSpec) -> int:
    """Check a safetensors file's header against the model; returns the file's size."""
    # The header of this model's tensors: names (< 512 chars) and a few numbers each.
    limit = (64 << 10) + 1024 * len(spec.params)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(limit, size - 8):
            raise WeightsRejected("not a safetensors file of this model (bad header size)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise WeightsRejected("not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise WeightsRejected("not a safetensors file (unreadable header)")
    spec.check_header(header, size - 8 - n)
    return size


def load_weights(root: Path, path: str, spec: ParamSpec, dtype: str) -> tuple[dict, int]:
    """Checked Tunix-named arrays from a .safetensors file or a model directory under root.

    Returns (flat arrays, bytes read). WeightsRejected for anything the server won't apply.
    """
    p = resolve_under(root, path)
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except OSError:
        is_dir = is_file = False
    if is_file and p.suffix == ".safetensors":
        size = read_header(p, spec)  # before any data
        try:
            flat = load_tunix_safetensors(p)
        except Exception:  # safetensors raises several types for bad files
            raise WeightsRejected("the file's data could not be read") from None
    elif is_dir:
        flat, size = _load_dir(root, p, spec, dtype)
    else:
        raise WeightsRejected("not a .safetensors file (Tunix names) or a model directory")
    spec.check_arrays(flat)
    return flat, size


def _load_dir(root: Path, p: Path, spec: ParamSpec, dtype: str) -> tuple[dict, int]:
    from tunix_sglang import models
    from tunix_sglang.engine.weight_map import flatten_tunix_params

    files = sorted(p.glob("*.safetensors"))
    for f in [p / "config.json", *files]:
        resolve_under(root, f)  # no symlink out of the root
    try:
        md = models.inspect_model_dir(p)
    except UserError:
        raise WeightsRejected("not a model directory (config.json, *.safetensors)") from None
    spec.check_model_config(md.hf_config)
    size = sum(f.stat().st_size for f in files)
    if size > 2 * spec.total_bytes + (1 << 20):  # float32 files for a bfloat16 server at most
        raise WeightsRejected("the directory's weights are larger than twice the model's")
    try:
        model = load_hf_dir(p, dtype)
    except Exception:  # Tunix's loader raises many types for bad files
        raise WeightsRejected("the directory's weights could not be loaded") from None
    return flatten_tunix_params(model)[0], size


def load_hf_dir(path: Path, dtype: str) -> Any:
    """A Hugging Face model directory as a Tunix model on one local device."""
    import jax

    from tunix_sglang import models

    md = models.inspect_model_dir(path)
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return models.load_model(md, mesh, dtype)
