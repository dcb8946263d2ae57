"""Per-replica admission control for generation requests.

A replica runs at most `ongoing` generation requests at once and lets at most `queued`
more wait for a slot; one more is refused at once with `Overloaded`, which the HTTP
layer turns into a 503 with a JSON body. Serve's own `max_queued_requests` would refuse
with a plain-text body from the proxy, and the ingress replica also answers /health,
/v1/models and the chat page, which must never queue behind generation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ift.serve.protocol import RequestError


class Overloaded(RequestError):
    def __init__(self, ongoing: int, queued: int):
        super().__init__(f"server overloaded: {ongoing} requests running and {queued} "
                         "waiting on this replica; retry later", None, 503)


class Admission:
    """At most `ongoing` holders of a slot, `queued` waiters (-1: no bound)."""

    def __init__(self, ongoing: int, queued: int):
        if ongoing < 1:
            raise ValueError(f"ongoing={ongoing}: must be >= 1")
        self.ongoing = int(ongoing)
        self.queued = int(queued)
        self.running = 0
        self.waiting = 0
        self._free = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the body; raise Overloaded when the queue is full."""
        if self.running >= self.ongoing or self.waiting:
            if 0 <= self.queued <= self.waiting:
                raise Overloaded(self.running, self.waiting)
            self.waiting += 1
            try:
                async with self._free:
                    await self._free.wait_for(lambda: self.running < self.ongoing)
                    self.running += 1
            finally:
                self.waiting -= 1
        else:
            self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            # Every waiter re-checks: a waiter cancelled just after a notify would
            # otherwise swallow the wake-up (asyncio.Condition on Python 3.11).
            async with self._free:
                self._free.notify_all()
