"""Fair admission to a runner: at most `capacity` requests run at once, the rest wait their turn.

When a place frees, it goes to the waiting user who has the fewest requests running, then to whoever
has waited longest, so one user's twenty parallel requests cannot starve another user's one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque


class FairQueue:
    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.running: dict[str, int] = {}
        self._waiting: dict[str, deque[tuple[int, asyncio.Future]]] = {}
        self._order = itertools.count()

    @property
    def running_total(self) -> int:
        return sum(self.running.values())

    @property
    def waiting_total(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def acquire(self, user: str) -> None:
        """Wait for a place; cancelling the wait gives up the turn (or the place, if it just came)."""
        if self.running_total < self.capacity and not self._waiting:
            self.running[user] = self.running.get(user, 0) + 1
            return
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (next(self._order), future)
        self._waiting.setdefault(user, deque()).append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(user)  # the place arrived as the caller gave up: pass it on
            else:
                waiting = self._waiting.get(user)
                if waiting is not None and entry in waiting:
                    waiting.remove(entry)
                    if not waiting:
                        del self._waiting[user]
            raise

    def release(self, user: str) -> None:
        count = self.running.get(user, 0) - 1
        if count > 0:
            self.running[user] = count
        else:
            self.running.pop(user, None)
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self.running_total < self.capacity:
            user = min(self._waiting, key=lambda u: (self.running.get(u, 0), self._waiting[u][0][0]))
            waiting = self._waiting[user]
            _, future = waiting.popleft()
            if not waiting:
                del self._waiting[user]
            if future.done():  # cancelled while waiting
                continue
            self.running[user] = self.running.get(user, 0) + 1
            future.set_result(None)
