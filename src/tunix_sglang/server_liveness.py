"""A rollout server's engine liveness: a dead scheduler thread is noticed at once, once.

sglang-jax's scheduler runs in a thread of the server process; when it dies (an engine bug,
or the `server_engine_death` fault) the engine can never compute again. Rather than live on
as a zombie answering 503, the server reports the death on /health and every route, prints
one line and exits with ENGINE_DIED_EXIT, so whoever launched it (the controller) restarts
it and brings it up to date.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tunix_sglang import faults
from tunix_sglang.protocol import ENGINE_DIED_EXIT
from tunix_sglang.server_guard import one_line

FAULT = "server_engine_death"


class EngineLiveness:
    """Watches one InProcessEngine; `dead` is why it died (None while alive)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.dead: str | None = None
        self.on_death: Callable[[], None] | None = None  # stops the HTTP server
        self._lock = threading.Lock()
        self._generates = 0

    def failure(self) -> str | None:
        """Why the engine cannot run (one line), or None while it is alive."""
        if self.dead:
            return self.dead
        try:
            self.engine._check_alive()  # noqa: SLF001 (the engine's own liveness check)
            return None
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            # The scheduler's own exception (its traceback text may not be written yet).
            err = getattr(getattr(self.engine, "_ctl", None), "error", None)
            return one_line(f"{first} {type(err).__name__}: {err}" if err is not None else first)

    def check(self) -> str | None:
        """failure(), and on the first one: one line on stderr, then stop the server."""
        reason = self.failure()
        if reason is None:
            return None
        with self._lock:
            first, self.dead = self.dead is None, reason
        if first:
            print(f"error: the rollout engine died ({reason}); exiting with status "
                  f"{ENGINE_DIED_EXIT} so it can be restarted", file=sys.stderr, flush=True)
            if self.on_death is not None:
                self.on_death()
        return reason

    def watch(self, should_stop: Callable[[], bool], also: Callable[[], None],
              period: float = 0.5) -> None:
        """Background thread: check() every `period` s (and run `also`) until stopped."""
        def run():
            while not should_stop() and self.check() is None:
                also()
                time.sleep(period)

        threading.Thread(target=run, name="engine-watch", daemon=True).start()

    def before_generate(self) -> None:
        """Counts generate calls; the `server_engine_death@N` fault strikes at the N-th."""
        self._generates += 1
        if faults.injected(FAULT, self._generates):
            def boom():
                raise RuntimeError(f"injected fault {FAULT}")

            # The scheduler loop's next step raises, as an engine bug would.
            self.engine.on_scheduler(lambda sched: setattr(sched, "recv_requests", boom))
