"""Stop strings: find the first match in streamed text without ever emitting part of one.

Text that could still turn into a stop string (a suffix that is a prefix of one) is held
back until the next piece of text decides; the output excludes the stop string itself
(OpenAI semantics).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas; get the text safe to emit and whether a stop string matched."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to emit now, matched). After a match, everything else is dropped."""
        if self.matched is not None:
            return "", True
        if not self.stop:
            return text, False
        buf = self._held + text
        first = -1
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (first < 0 or i < first):
                first, self.matched = i, s
        if first >= 0:
            self._held = ""
            return buf[:first], True
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """At the natural end of the output: release the held-back text."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out
