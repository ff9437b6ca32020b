"""Stop sequences: cut generated text at the first stop string, holding back what could be the start of one."""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text that is safe to emit now; after a stop string is seen, nothing more."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            text, self.pending = self.pending[: min(hits)], ""
            return text
        # Keep the tail that could still grow into a stop string.
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return text

    def flush(self) -> str:
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text
