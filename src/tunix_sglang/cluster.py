"""Process topology: single process, a `jax.distributed` cluster, or Pathways.

One place decides how this process joins the JAX cluster and which process it is; the rest of
the code asks `process_index()` / `is_primary()`.
"""

from __future__ import annotations

import dataclasses
import os

from tunix_sglang.errors import UserError

# Set by `tunix-sglang launch` for each process it starts (and usable by hand).
ENV_COORDINATOR = "TUNIX_SGLANG_COORDINATOR"
ENV_NUM_PROCESSES = "TUNIX_SGLANG_NUM_PROCESSES"
ENV_PROCESS_ID = "TUNIX_SGLANG_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Topology:
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    @classmethod
    def from_env(cls, coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> Topology:
        """Flags win over the launcher's environment variables."""
        coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
        n = num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES)
        pid = process_id if process_id is not None else os.environ.get(ENV_PROCESS_ID)
        if coordinator is None and n is None and pid is None:
            return cls()
        if coordinator is None or n is None or pid is None:
            raise UserError(
                "--coordinator-address, --num-processes and --process-id go together; "
                "pass all three (or none, for one process or TPU auto-detection)"
            )
        n, pid = int(n), int(pid)
        if not 0 <= pid < n:
            raise UserError(f"--process-id {pid} must be in [0, {n})")
        return cls(coordinator, n, pid)


def tpu_present() -> bool:
    """TPU VMs expose /dev/accel* (v2-v4) or /dev/vfio/N (v5+)."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def default_platform() -> None:
    """Without a TPU, pin JAX to CPU: libtpu's probe otherwise prints a screen of errors."""
    if "JAX_PLATFORMS" not in os.environ and not tpu_present():
        os.environ["JAX_PLATFORMS"] = "cpu"


def pathways_requested() -> bool:
    return "proxy" in os.environ.get("JAX_PLATFORMS", "")


def initialize(topo: Topology) -> None:
    """Join the JAX cluster if this run spans several processes (before any JAX computation)."""
    if not topo.distributed:
        return
    import jax

    # Bind the coordinator to the address given (loopback in tests), not all interfaces.
    jax.distributed.initialize(
        coordinator_address=topo.coordinator_address,
        num_processes=topo.num_processes,
        process_id=topo.process_id,
        coordinator_bind_address=topo.coordinator_address if topo.process_id == 0 else None,
        initialization_timeout=120,
    )


def process_index() -> int:
    import jax

    return jax.process_index()


def is_primary() -> bool:
    return process_index() == 0


class DesyncError(RuntimeError):
    """Processes of one JAX cluster stopped running the same steps."""


BARRIER_TIMEOUT_S = 30.0


def step_barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Every process must reach `name` within `timeout_s`, or all fail naming the missing ones.

    Processes that run different global programs hang silently inside XLA collectives; a
    bounded barrier before each step turns that into an error within the timeout.
    """
    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None or jax.process_count() == 1:
        return
    me = jax.process_index()
    client.key_value_set(f"tunix_sglang/arrived/{name}/{me}", "1")
    try:
        client.wait_at_barrier(f"tunix_sglang/{name}", int(timeout_s * 1000))
    except Exception as e:  # XlaRuntimeError: DEADLINE_EXCEEDED and friends
        try:
            arrived = {int(k.rsplit("/", 1)[-1])
                       for k, _ in client.key_value_dir_get(f"tunix_sglang/arrived/{name}/")}
        except Exception:  # the coordinator itself may be gone
            arrived = {me}
        missing = sorted(set(range(jax.process_count())) - arrived)
        raise DesyncError(
            f"process {me}: barrier {name!r} timed out after {timeout_s:g}s; "
            f"missing process(es) {missing or 'unknown'} ({str(e).splitlines()[0][:200]})"
        ) from None
