"""The one asyncio loop the engine's calls run on, on its own thread for the engine's life.

sglang-jax 0.0.2's tokenizer manager binds its response handler to the first asyncio loop it
sees: closing that loop and using a new one per call (as Tunix's sampler does) hangs the
second call. One long-lived loop works.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any


class LoopThread:
    """An asyncio loop running forever on a daemon thread until `stop()`."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="tunix-sglang-asyncio", daemon=True)
        self.thread.start()
        ready.wait(10)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it and join its thread."""
        loop = self.loop

        async def _cancel_all():
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            self.submit(_cancel_all()).result(5)
        loop.call_soon_threadsafe(loop.stop)
        self.thread.join(10)
        if not loop.is_running():
            with contextlib.suppress(Exception):
                loop.close()
