"""What preflight checks return (`Check`) and the device facts they read (`DeviceFacts`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Status = Literal["OK", "WARN", "FAIL"]


@dataclasses.dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""
    blocking: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What JAX reports about this process's devices."""

    backend: str | None  # jax.default_backend(); None when JAX could not start
    device_kind: str | None  # devices()[0].device_kind, e.g. "cpu", "TPU v4", "TPU v5 lite"
    device_count: int
    local_device_count: int
    process_count: int
    process_index: int
    memory_bytes: int | None  # per device: TPU bytes_limit, CPU MemAvailable (shared)
    memory_source: str
    error: str | None = None
