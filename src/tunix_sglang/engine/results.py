"""What the engine hands back: samples, sync reports, its errors."""

from __future__ import annotations

import dataclasses

import numpy as np


class EngineError(RuntimeError):
    """The engine failed or returned something inconsistent."""


@dataclasses.dataclass
class Sample:
    """One completion: exactly the sampled token ids and the logprob of each."""

    tokens: np.ndarray  # int32 [n]
    logprobs: np.ndarray  # float32 [n]
    finish_reason: str  # "stop" (EOS / stop token, included in tokens) or "length"
    prompt_len: int = 0
    cache_miss_count: int | None = None


@dataclasses.dataclass
class SyncReport:
    version: int
    seconds: float
    transfer_seconds: float
    swap_seconds: float
    num_params: int
    num_bytes: int
    ignored: tuple[str, ...] = ()

    def as_metrics(self) -> dict[str, float]:
        return {
            "sync_seconds": self.seconds,
            "sync_transfer_seconds": self.transfer_seconds,
            "sync_swap_seconds": self.swap_seconds,
            "sync_bytes": float(self.num_bytes),
            "weight_version": float(self.version),
        }
