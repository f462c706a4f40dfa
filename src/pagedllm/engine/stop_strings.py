"""Stop strings over streamed text: one matcher for streaming and for the final text.

Generation stops as soon as any stop string appears, so the occurrence that counts is the one
that *ends* first (ties: the one that starts first); the text is cut where it starts and the stop
string itself is never emitted. Text that could still grow into a stop string is held back from
the stream until it cannot, so a stop string that spans chunks (tokens) never leaks out.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._held = ""
        self.stopped_by: str | None = None

    def feed(self, delta: str) -> str:
        """Text that is now safe to emit. After a stop is found, `stopped_by` names it and the
        matcher takes no more text."""
        if self.stopped_by is not None or not self.stops:
            return "" if self.stopped_by is not None else delta
        buffer = self._held + delta
        cut = self._first_stop(buffer)
        if cut is not None:
            start, self.stopped_by = cut
            self._held = ""
            return buffer[:start]
        keep = self._longest_partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation without a stop string: release what was held back."""
        held, self._held = self._held, ""
        return held if self.stopped_by is None else ""

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
