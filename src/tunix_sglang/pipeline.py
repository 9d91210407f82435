"""Asynchronous rollouts (`--max-staleness K`): a producer thread generates the batches of
later steps while the trainer trains, on weights at most K steps behind.

Admission, not filtering, bounds the staleness: the rollout of step s starts only once the
engine holds the weights the trainer had K steps before it will train on s (version
`(s - 1 - K) * mu`, mu = optimizer steps per step), so every sample it returns is at most K
steps old when trained on (the step still checks each sample's version and masks any that
is older, counted as `stale_dropped`).

Weight syncs, their proofs and evaluations run through `exclusive`: the producer finishes
the batch in flight, starts no other until the call returns, then goes on with the new
weights. No in-flight work is cut, lost or generated twice; no batch mixes two syncs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class RolloutPipeline:
    """Runs `produce(step)` for `steps` in order on one thread; `get(step)` hands them out.

    `synced(version)` tells the producer which weight version the engine holds (after each
    sync and its proof); `first_version` is the one it holds at the start."""

    def __init__(self, produce: Callable[[int], Any], steps: Iterable[int], max_staleness: int,
                 num_iterations: int, first_version: int):
        self._produce = produce
        self._steps = list(steps)
        self._k, self._mu = max_staleness, num_iterations
        self._version = first_version
        self._cond = threading.Condition()
        self._pending = 0  # exclusive calls waiting or running
        self._busy = False  # a produce() call in flight
        self._stop = False
        self._out: queue.Queue[tuple[int, Any, BaseException | None]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def needed_version(self, step: int) -> int:
        """The oldest weights step `step` may be generated with."""
        return (step - 1 - self._k) * self._mu

    def _run(self) -> None:
        for step in self._steps:
            with self._cond:
                self._cond.wait_for(lambda s=step: self._stop or (
                    not self._pending and self._version >= self.needed_version(s)))
                if self._stop:
                    return
                self._busy = True
            try:
                item, err = self._produce(step), None
            except BaseException as e:  # handed to the consumer, which raises it
                item, err = None, e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            self._out.put((step, item, err))
            if err is not None:
                return

    def get(self, step: int) -> Any:
        """The rollout of `step` (steps are handed out in order); the producer's error, if
        it failed."""
        got, item, err = self._out.get()
        if err is not None:
            raise err
        if got != step:
            raise RuntimeError(f"rollout pipeline handed out step {got}, wanted {step}")
        return item

    def exclusive(self, fn: Callable[[], T]) -> T:
        """`fn()` between engine batches: no rollout runs while it does."""
        with self._cond:
            self._pending += 1
            self._cond.wait_for(lambda: not self._busy)
        try:
            return fn()
        finally:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def synced(self, version: int) -> None:
        """The engine now holds `version` (synced and proven)."""
        with self._cond:
            self._version = version
            self._cond.notify_all()

    def close(self, timeout: float = 600.0) -> None:
        """Stop after the batch in flight (if any) and wait for the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
