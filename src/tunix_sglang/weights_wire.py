"""Weight transport between the controller and rollout servers: chunked and checksummed.

A push is one contiguous buffer holding every tensor back to back (Tunix parameter names,
row-major bytes), described by a manifest (name, dtype, shape, offset, nbytes per tensor),
cut into fixed-size chunks that each carry a CRC32. The server reserves the buffer from the
manifest as anonymous memory the OS backs only when written (so memory follows the chunks
that arrived), reads each chunk into scratch, and copies it into the buffer only once its
length and CRC match (a failed chunk is not received and leaves the buffer as it was). At
commit every chunk's CRC is recomputed over the buffer (the manifest's digest covers them),
then the arrays, views of the buffer, are applied in one engine sync.

Why one flat buffer: on this class of machine every extra memory copy costs about as much as
the loopback transfer itself, so the client sends slices of one buffer without re-encoding
and the server's arrays are views of the buffer it filled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import mmap
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CHUNK_BYTES = 16 << 20
MAX_CHUNK_BYTES = 64 << 20
MAX_INT64 = 2**63 - 1
_MAX_DIM = 1 << 40
_MAX_NDIM = 8
_MAX_NAME = 512
# dtypes a push may carry (numpy names; bfloat16 through ml_dtypes, which JAX ships).
DTYPES = ("float32", "float16", "bfloat16", "float64", "int32", "int64", "int8", "uint8",
          "bool")


class WireError(ValueError):
    """A manifest or chunk that cannot be accepted; the message says why."""


class UnknownUpload(WireError):
    """No upload with that id (never begun, replaced, committed, aborted or expired)."""


class IncompleteUpload(WireError):
    """Commit before every chunk arrived; the upload stays open for the missing ones."""


class UploadTooLarge(WireError):
    """More bytes than the server takes (a whole upload, or one chunk)."""


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


def _int(v: Any, what: str, hi: int = MAX_INT64) -> int:
    # JSON numbers only: no bools, floats or strings coerced into sizes.
    if type(v) is not int or not 0 <= v <= hi:
        raise WireError(f"{what} must be a whole number in 0..{hi}")
    return v


def parse_manifest(obj: Any, max_bytes: int) -> Manifest:
    """Validate a client's manifest; WireError names the first problem."""
    if not isinstance(obj, Mapping):
        raise WireError("manifest must be a JSON object")
    missing = [k for k in ("total_bytes", "chunk_bytes", "chunk_crc32", "tensors")
               if k not in obj]
    if missing:
        raise WireError(f"manifest needs total_bytes, chunk_bytes, chunk_crc32, tensors "
                        f"(missing {missing})")
    total = _int(obj["total_bytes"], "total_bytes")
    chunk = _int(obj["chunk_bytes"], "chunk_bytes")
    if total > max_bytes:
        raise UploadTooLarge(f"upload of {total} bytes exceeds the server's limit of "
                             f"{max_bytes}")
    if not 0 < chunk <= MAX_CHUNK_BYTES:
        raise WireError(f"chunk_bytes {chunk} must be in 1..{MAX_CHUNK_BYTES}")
    n_chunks = math.ceil(total / chunk)
    raw_crcs, raw = obj["chunk_crc32"], obj["tensors"]
    if not isinstance(raw_crcs, list) or len(raw_crcs) != n_chunks:
        raise WireError(f"chunk_crc32 must be a list of {n_chunks} CRC32 values")
    crcs = tuple(_int(c, "a chunk CRC32", 2**32 - 1) for c in raw_crcs)
    if not isinstance(raw, list) or not raw:
        raise WireError("manifest needs a non-empty list of tensors")
    tensors, names, end = [], set(), 0
    for i, t in enumerate(raw):
        if not isinstance(t, Mapping) or not {"name", "dtype", "shape", "offset",
                                              "nbytes"} <= set(t):
            raise WireError(f"tensor entry {i} needs name, dtype, shape, offset, nbytes")
        name, dtype, shape = t["name"], t["dtype"], t["shape"]
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
            raise WireError(f"tensor entry {i}: name must be a string of 1..{_MAX_NAME} chars")
        if name in names:
            raise WireError(f"tensor {name!r} appears twice")
        names.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise WireError(f"tensor {name!r}: dtype must be one of {DTYPES}")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
            raise WireError(f"tensor {name!r}: shape must be a list of at most {_MAX_NDIM} "
                            "dimensions")
        spec = TensorSpec(name, dtype, tuple(_int(d, f"tensor {name!r}: a dimension", _MAX_DIM)
                                             for d in shape),
                          _int(t["offset"], f"tensor {name!r}: offset"),
                          _int(t["nbytes"], f"tensor {name!r}: nbytes"))
        want = math.prod(spec.shape) * np_dtype(spec.dtype).itemsize
        if spec.nbytes != want:
            raise WireError(f"tensor {name!r}: nbytes {spec.nbytes} != {want} for "
                            f"{spec.dtype}{list(spec.shape)}")
        if spec.offset != end:  # packed back to back, in order: no gaps, no overlap
            raise WireError(f"tensor {name!r}: offset {spec.offset}, expected {end}")
        end += spec.nbytes
        if end > total:
            break
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
    """Server side of one upload: verified chunks copied into a lazily backed buffer."""

    def __init__(self, manifest: Manifest, version: int, upload_id: str):
        self.manifest = manifest
        self.version = version
        self.upload_id = upload_id
        # Anonymous memory: the OS backs a page when a chunk is written to it, so a begun
        # upload with no chunks costs nothing, and closing returns it all.
        self.buffer = mmap.mmap(-1, max(manifest.total_bytes, 1))
        self.received: set[int] = set()
        self.touched = time.monotonic()
        self._lock = threading.Lock()
        self._sealed = False
        self._closed = False  # replaced, aborted or expired: chunks still arriving are refused

    def chunk_size(self, index: int) -> int:
        if not 0 <= index < self.manifest.num_chunks:
            raise WireError(f"chunk index {index} outside 0..{self.manifest.num_chunks - 1}")
        a, b = self.manifest.chunk_range(index)
        return b - a

    def reject(self, index: int) -> None:
        """A chunk that failed in transit: not received until it is sent again whole."""
        with self._lock:
            self.received.discard(index)
            self.touched = time.monotonic()

    def put_chunk(self, index: int, data: Any, crc: int | None = None) -> None:
        """Copy chunk `index` into place once its length and CRC32 match, else WireError."""
        size = self.chunk_size(index)
        crc = zlib.crc32(data) if crc is None else crc
        problem = None
        if len(data) != size:
            problem = f"chunk {index}: got {len(data)} bytes, expected {size}"
        elif crc != self.manifest.chunk_crc32[index]:
            problem = f"chunk {index}: CRC32 mismatch (data corrupted in transit); resend"
        if problem:
            self.reject(index)
            raise WireError(problem)
        a, b = self.manifest.chunk_range(index)
        with self._lock:
            if self._closed:
                raise UnknownUpload(f"upload {self.upload_id} was replaced, aborted or expired "
                                    "while this chunk arrived")
            if self._sealed:
                raise UnknownUpload(f"upload {self.upload_id} is already being committed")
            self.buffer[a:b] = data
            self.received.add(index)
            self.touched = time.monotonic()

    def missing(self) -> list[int]:
        return sorted(set(range(self.manifest.num_chunks)) - self.received)

    def seal(self) -> None:
        """No more writes; re-verify every chunk's CRC over the buffer (WireError if off)."""
        with self._lock:
            missing = self.missing()
            if missing:
                raise IncompleteUpload(f"upload incomplete: chunks {missing[:10]} not received")
            self._sealed = True
        view = memoryview(self.buffer)
        for i, want in enumerate(self.manifest.chunk_crc32):
            a, b = self.manifest.chunk_range(i)
            if zlib.crc32(view[a:b]) != want:
                raise WireError(f"chunk {i} changed after it was received (CRC32 at commit); "
                                "push again")
        view.release()

    def arrays(self) -> dict[str, np.ndarray]:
        if not self._sealed:
            raise WireError("upload is not sealed")
        return arrays_from_buffer(self.manifest, self.buffer)

    def release(self) -> None:
        """Return the buffer to the OS now unless arrays still view it (then at their end)."""
        with self._lock:  # not while a chunk is being copied in
            self._closed = True
            with contextlib.suppress(BufferError):
                self.buffer.close()


class UploadStore:
    """The server's one upload in progress; one idle for `idle_seconds` is dropped.

    A new upload replaces an unfinished one (a controller retrying after a crash must not be
    blocked by its own abandoned upload).
    """

    def __init__(self, idle_seconds: float):
        self.idle_seconds = float(idle_seconds)
        # Re-entrant: take() and abort() hold it while get() sweeps an upload gone idle.
        self._lock = threading.RLock()
        self._up: Receiver | None = None

    @property
    def active(self) -> bool:
        self.sweep()
        return self._up is not None

    def begin(self, manifest: Manifest, version: int, upload_id: str) -> Receiver:
        with self._lock:
            self._drop()
            self._up = Receiver(manifest, version, upload_id)
            return self._up

    def get(self, upload_id: str) -> Receiver:
        self.sweep()
        up = self._up
        if up is None or up.upload_id != upload_id:
            raise UnknownUpload(f"no upload {upload_id[:64]!r} in progress (replaced, "
                                f"committed, aborted, or idle over {self.idle_seconds:g}s)")
        up.touched = time.monotonic()
        return up

    def take(self, upload_id: str) -> Receiver:
        """Remove a complete upload for commit (IncompleteUpload keeps it open)."""
        with self._lock:
            up = self.get(upload_id)
            if up.missing():
                raise IncompleteUpload(f"upload incomplete: chunks {up.missing()[:10]} not "
                                       "received")
            self._up = None
            return up

    def abort(self, upload_id: str) -> None:
        with self._lock:
            self.get(upload_id)
            self._drop()

    def sweep(self) -> None:
        up = self._up
        if up is not None and time.monotonic() - up.touched > self.idle_seconds:
            with self._lock:
                if self._up is up:
                    self._drop()

    def _drop(self) -> None:
        if self._up is not None:
            self._up.release()
            self._up = None


# -- sources of a weight set --------------------------------------------------------------


def flat_numpy_params(params: Any, float_dtype: str | None = None) -> dict[str, np.ndarray]:
    """{Tunix param name: host numpy array} of a Tunix model / nnx.State / flat dict.

    Names are those `InProcessEngine.sync_from_tunix` maps (weight_map.flatten_tunix_params).
    `float_dtype` casts floating-point params (servers refuse a dtype other than theirs, so
    a controller converts explicitly). Runs under an explicit "allow" transfer guard: Tunix
    syncs under "disallow_explicit".
    """
    import jax

    from tunix_sglang.engine.weight_map import flatten_tunix_params

    flat, _ = flatten_tunix_params(params)
    with jax.transfer_guard("allow"):
        host = jax.device_get(flat)
    out = {k: np.asarray(v) for k, v in host.items()}
    if float_dtype is not None:
        want = np_dtype(float_dtype)
        out = {k: v.astype(want) if is_float(v.dtype) and v.dtype != want else v
               for k, v in out.items()}
    return out


def is_float(dt: Any) -> bool:
    """Floating point, bfloat16 included (numpy does not count ml_dtypes' as floating)."""
    dt = np.dtype(dt)
    return bool(np.issubdtype(dt, np.floating)) or dt.name == "bfloat16"


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
