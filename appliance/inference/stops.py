"""Stop strings in a token stream: emit text as soon as it cannot be the start of a stop string."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit now, whether a stop string was hit)."""
        self._pending += text
        if not self.stops:
            out, self._pending = self._pending, ""
            return out, False
        hits = [(self._pending.find(s), s) for s in self.stops if s in self._pending]
        if hits:
            index = min(hit[0] for hit in hits)
            out, self._pending = self._pending[:index], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:length]):
                    hold = max(hold, length)
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
