"""Incremental detokenization: UTF-8-safe text deltas and stop strings across token boundaries.

Tokens are turned into bytes and fed to an incremental UTF-8 decoder, which holds back a
character split across tokens until it is complete. Text that might be the start of a stop string
is held back too, so a stop string never leaks out, even in pieces; the deltas concatenate to
exactly the final text.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    def __init__(self, token_bytes: list[bytes], stop: tuple[str, ...]) -> None:
        self.token_bytes = token_bytes
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0

    def add(self, token_id: int) -> str | None:
        """Append a token; return the stop string it completed, if any (the text is cut before it)."""
        start = len(self.text)
        self.text += self._decoder.decode(self.token_bytes[token_id])
        return self._find_stop(start) if self.stop else None

    def finish(self) -> None:
        """End of output: flush an incomplete trailing character (as U+FFFD, like a full decode)."""
        self.text += self._decoder.decode(b"", final=True)

    def _find_stop(self, new_from: int) -> str | None:
        search_from = max(0, new_from - self.max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        text = self.text
        for k in range(min(self.max_stop - 1, len(text) - self.emitted), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def delta(self, final: bool) -> str:
        """Text not yet handed out that is safe to hand out now (all of it when `final`)."""
        end = len(self.text) if final or not self.stop else len(self.text) - self._held_back()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
