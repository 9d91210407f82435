"""TPU slices a run can be planned for: chips, hosts and HBM per chip.

Facts from the Cloud TPU system-architecture pages (v4: 32 GiB HBM per chip, 4 chips per
host; v5e and v6e: 16 and 32 GiB per chip, up to 8 chips on one host, 4 per host in larger
slices). A slice name counts TensorCores on v4 (2 per chip: a v4-8 has 4 chips) and chips on
v5e/v6e. `device_kind` is what JAX reports for the chip. HBM is nominal: XLA keeps a little for
itself, which the memory plan's safety margin covers.
"""

from __future__ import annotations

import dataclasses

from tunix_sglang.errors import UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    name: str
    device_kind: str
    chips: int
    hosts: int
    hbm_gib: int

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_gib * GIB


TARGETS: dict[str, TpuTarget] = {t.name: t for t in (
    TpuTarget("tpu-v4-8", "TPU v4", 4, 1, 32),
    TpuTarget("tpu-v4-16", "TPU v4", 8, 2, 32),
    TpuTarget("tpu-v4-32", "TPU v4", 16, 4, 32),
    TpuTarget("tpu-v5e-1", "TPU v5 lite", 1, 1, 16),
    TpuTarget("tpu-v5e-4", "TPU v5 lite", 4, 1, 16),
    TpuTarget("tpu-v5e-8", "TPU v5 lite", 8, 1, 16),
    TpuTarget("tpu-v5e-16", "TPU v5 lite", 16, 4, 16),
    TpuTarget("tpu-v6e-1", "TPU v6 lite", 1, 1, 32),
    TpuTarget("tpu-v6e-4", "TPU v6 lite", 4, 1, 32),
    TpuTarget("tpu-v6e-8", "TPU v6 lite", 8, 1, 32),
    TpuTarget("tpu-v6e-16", "TPU v6 lite", 16, 4, 32),
)}


def get_target(name: str) -> TpuTarget:
    """The target called `name`; a one-line UserError listing the known ones otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"target {name!r} is unknown; use one of {', '.join(TARGETS)}") from None
