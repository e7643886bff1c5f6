"""Stop strings matched on decoded text, across token boundaries.

A stop string can be split over several tokens ("Obs" + "ervation:") and one
token can hold the end of a stop string and more text. `StopMatcher` therefore
works on text: it holds back the longest tail of the text seen so far that could
still grow into a stop string, and releases it once it cannot. Text from the
first stop string on is never released.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Incremental matcher of stop strings over a stream of text segments."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False
        """True once a stop string has been seen; later input is not emitted."""
        self.remainder = ""
        """The text from the first stop string on (kept for callers that use
        the "stop" strings as triggers, e.g. the start of a tool call)."""

    def push(self, text: str) -> str:
        """Feed a decoded segment; return the text that is safe to emit now."""
        if self.stopped:
            self.remainder += text
            return ""
        if not self._stops:
            return text
        buffer = self._pending + text
        cut = min(
            (i for i in (buffer.find(s) for s in self._stops) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            self.remainder = buffer[cut:]
            return buffer[:cut]
        hold = self._held_back(buffer)
        self._pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """Release the held-back text at the end of generation."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _held_back(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that starts a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest
