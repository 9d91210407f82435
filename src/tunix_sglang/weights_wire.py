"""Weight transport between the controller and rollout servers: chunked and checksummed.

A push is one contiguous buffer holding every tensor back to back (Tunix parameter names,
row-major bytes), described by a manifest (name, dtype, shape, offset, nbytes per tensor),
cut into fixed-size chunks that each carry a CRC32. The server preallocates the buffer from
the manifest (bounded by --max-upload-bytes), writes each chunk at its offset as it streams
in, rejects a chunk whose CRC does not match (the client resends it), and only builds arrays
once every chunk arrived; the whole set is then applied in one engine sync.

Why one flat buffer: on this class of machine every extra memory copy costs about as much as
the loopback transfer itself, so the client sends slices of one buffer without re-encoding
and the server writes straight into the buffer its arrays are views of.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CHUNK_BYTES = 16 << 20
MAX_CHUNK_BYTES = 64 << 20
# dtypes a push may carry (numpy names; bfloat16 through ml_dtypes, which JAX ships).
DTYPES = ("float32", "float16", "bfloat16", "float64", "int32", "int64", "int8", "uint8",
          "bool")


class WireError(ValueError):
    """A manifest or chunk that cannot be accepted; the message says why."""


def np_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise WireError(f"dtype {name!r} is not supported; use one of {DTYPES}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset, "nbytes": self.nbytes}


@dataclasses.dataclass(frozen=True)
class Manifest:
    tensors: tuple[TensorSpec, ...]
    total_bytes: int
    chunk_bytes: int
    chunk_crc32: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_crc32)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.total_bytes)

    @property
    def digest(self) -> str:
        """Names, layouts and every chunk CRC: identifies a weight set cheaply."""
        blob = json.dumps([t.as_json() for t in self.tensors], sort_keys=True)
        blob += ",".join(map(str, self.chunk_crc32))
        return hashlib.sha256(blob.encode()).hexdigest()

    def as_json(self) -> dict[str, Any]:
        return {
            "tensors": [t.as_json() for t in self.tensors],
            "total_bytes": self.total_bytes,
            "chunk_bytes": self.chunk_bytes,
            "chunk_crc32": list(self.chunk_crc32),
            "digest": self.digest,
        }


def parse_manifest(obj: Any, max_bytes: int) -> Manifest:
    """Validate a client's manifest; WireError names the first problem."""
    if not isinstance(obj, Mapping):
        raise WireError("manifest must be a JSON object")
    try:
        total = int(obj["total_bytes"])
        chunk = int(obj["chunk_bytes"])
        crcs = tuple(int(c) for c in obj["chunk_crc32"])
        raw = list(obj["tensors"])
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(
            f"manifest needs total_bytes, chunk_bytes, chunk_crc32, tensors ({e})"
        ) from None
    if total < 0 or total > max_bytes:
        raise WireError(f"upload of {total} bytes exceeds the server's limit of {max_bytes}")
    if not 0 < chunk <= MAX_CHUNK_BYTES:
        raise WireError(f"chunk_bytes {chunk} must be in 1..{MAX_CHUNK_BYTES}")
    if len(crcs) != math.ceil(total / chunk) or any(not 0 <= c < 2**32 for c in crcs):
        raise WireError(f"chunk_crc32 must hold {math.ceil(total / chunk)} CRC32 values")
    if not raw:
        raise WireError("manifest has no tensors")
    tensors, names, end = [], set(), 0
    for t in raw:
        try:
            spec = TensorSpec(str(t["name"]), str(t["dtype"]), tuple(int(d) for d in t["shape"]),
                              int(t["offset"]), int(t["nbytes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise WireError(f"tensor entry {t!r:.80} is malformed ({e})") from None
        if spec.name in names:
            raise WireError(f"tensor {spec.name!r} appears twice")
        names.add(spec.name)
        if any(d < 0 for d in spec.shape):
            raise WireError(f"tensor {spec.name!r}: negative dimension in {spec.shape}")
        want = math.prod(spec.shape) * np_dtype(spec.dtype).itemsize
        if spec.nbytes != want:
            raise WireError(f"tensor {spec.name!r}: nbytes {spec.nbytes} != {want} for "
                            f"{spec.dtype}{list(spec.shape)}")
        if spec.offset != end:  # packed back to back, in order: no gaps, no overlap
            raise WireError(f"tensor {spec.name!r}: offset {spec.offset}, expected {end}")
        end += spec.nbytes
        tensors.append(spec)
    if end != total:
        raise WireError(f"tensors cover {end} bytes but total_bytes is {total}")
    m = Manifest(tuple(tensors), total, chunk, crcs)
    if "digest" in obj and obj["digest"] != m.digest:
        raise WireError("manifest digest does not match its contents")
    return m


@dataclasses.dataclass
class Payload:
    """A packed weight set ready to send (kept by the controller for catch-up pushes)."""

    manifest: Manifest
    buffer: bytearray

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    def chunk(self, index: int) -> memoryview:
        a, b = self.manifest.chunk_range(index)
        return memoryview(self.buffer)[a:b]

    def arrays(self) -> dict[str, np.ndarray]:
        return arrays_from_buffer(self.manifest, self.buffer)


def _dtype_name(dt: np.dtype) -> str:
    name = np.dtype(dt).name
    np_dtype(name)  # raises for unsupported dtypes
    return name


def pack(flat: Mapping[str, Any], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Payload:
    """{name: array} -> one contiguous buffer + manifest with per-chunk CRC32."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise WireError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
    arrays = {k: np.asarray(v) for k, v in sorted(flat.items())}
    specs, off = [], 0
    for name, a in arrays.items():
        specs.append(TensorSpec(name, _dtype_name(a.dtype), tuple(a.shape), off, a.nbytes))
        off += a.nbytes
    buf = bytearray(off)
    view = np.frombuffer(buf, np.uint8) if off else np.zeros(0, np.uint8)
    for s, a in zip(specs, arrays.values(), strict=True):
        view[s.offset:s.offset + s.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    mv = memoryview(buf)
    crcs = tuple(zlib.crc32(mv[i:i + chunk_bytes]) for i in range(0, off, chunk_bytes))
    return Payload(Manifest(tuple(specs), off, chunk_bytes, crcs), buf)


def arrays_from_buffer(m: Manifest, buf: bytearray) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of each tensor in a filled buffer."""
    out = {}
    for t in m.tensors:
        a = np.frombuffer(buf, np_dtype(t.dtype), count=math.prod(t.shape), offset=t.offset)
        out[t.name] = a.reshape(t.shape)
    return out


class Receiver:
    """Server side of one upload: fills a preallocated buffer chunk by chunk."""

    def __init__(self, manifest: Manifest, version: int, upload_id: str):
        self.manifest = manifest
        self.version = version
        self.upload_id = upload_id
        self.buffer = bytearray(manifest.total_bytes)
        self.received: set[int] = set()

    def chunk_view(self, index: int) -> memoryview:
        if not 0 <= index < self.manifest.num_chunks:
            raise WireError(f"chunk index {index} outside 0..{self.manifest.num_chunks - 1}")
        a, b = self.manifest.chunk_range(index)
        return memoryview(self.buffer)[a:b]

    def finish_chunk(self, index: int, nbytes: int, crc: int) -> None:
        a, b = self.manifest.chunk_range(index)
        if nbytes != b - a:
            raise WireError(f"chunk {index}: got {nbytes} bytes, expected {b - a}")
        if crc != self.manifest.chunk_crc32[index]:
            raise WireError(f"chunk {index}: CRC32 mismatch (data corrupted in transit); resend")
        self.received.add(index)

    def missing(self) -> list[int]:
        return sorted(set(range(self.manifest.num_chunks)) - self.received)

    def arrays(self) -> dict[str, np.ndarray]:
        missing = self.missing()
        if missing:
            raise WireError(f"upload incomplete: chunks {missing[:10]} not received")
        return arrays_from_buffer(self.manifest, self.buffer)


# -- sources of a weight set --------------------------------------------------------------


def flat_numpy_params(params: Any) -> dict[str, np.ndarray]:
    """{Tunix param name: host numpy array} of a Tunix model / nnx.State / flat dict.

    Names are those `InProcessEngine.sync_from_tunix` maps (weight_map.flatten_tunix_params).
    Runs under an explicit "allow" transfer guard: Tunix syncs under "disallow_explicit".
    """
    import jax

    from tunix_sglang.weight_map import flatten_tunix_params

    flat, _ = flatten_tunix_params(params)
    with jax.transfer_guard("allow"):
        host = jax.device_get(flat)
    return {k: np.asarray(v) for k, v in host.items()}


def save_tunix_safetensors(flat: Mapping[str, Any], path: str | Path) -> Path:
    """Write a weight set in Tunix names (for pushes through a path both sides can read)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}, str(tmp))
    tmp.replace(path)  # readers never see a half-written file
    return path


def load_tunix_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
