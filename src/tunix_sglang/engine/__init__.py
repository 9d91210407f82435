"""The in-process sglang-jax rollout engine.

settings.py     what an engine is built from (shapes from the rollout) and its devices
weight_map.py   Tunix names and layouts -> the engine's, and the sync plan: the one mapping
                the in-process sync, the rollout server and the remote controller use
driver.py       `InProcessEngine`: lifecycle, generate, weight sync, cache flush, its side
                of the sync proof
scheduler_hooks.py  the engine's runtime inside sglang-jax's scheduler thread
loop_thread.py  the asyncio loop the engine's calls run on
results.py      samples, sync reports, errors
"""

from tunix_sglang.engine.driver import InProcessEngine
from tunix_sglang.engine.results import EngineError, Sample, SyncReport
from tunix_sglang.engine.settings import (
    EngineSettings,
    host_local_device_count,
    host_local_share,
    select_devices,
)
from tunix_sglang.engine.weight_map import IncompleteSyncError

__all__ = [
    "EngineError",
    "EngineSettings",
    "InProcessEngine",
    "IncompleteSyncError",
    "Sample",
    "SyncReport",
    "host_local_device_count",
    "host_local_share",
    "select_devices",
]
