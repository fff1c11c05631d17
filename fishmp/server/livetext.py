"""Text that arrives in pieces (the WebSocket `/v1/tts/live`), cut into lines at sentence ends.

A line is spoken once it is complete: up to and including a sentence end (`.`, `!`, `?`, `…`, `;` or a line
break, then white space; the CJK full stops at once), closing quotes and brackets kept with it. What follows the
last sentence end waits for more text, a `flush` or the `stop`. Pure logic: no server, no sockets.
"""

from __future__ import annotations

import re

# A sentence end: Latin punctuation (with closing quotes/brackets) followed by white space, or a CJK one, or a break.
_END = re.compile(r"(?:[.!?…;]+[\"'”’)\]]*(?=\s)|[。！？；]+[”’」』）]*|\n)")


class TextBuffer:
    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.pending = ""

    def add(self, text: str) -> list[str]:
        """The lines `text` completes (possibly none). ValueError when the text waiting for a sentence end would
        grow past `max_chars` (FISH_SERVE_MAX_TEXT_CHARS)."""
        self.pending += text
        cut = 0
        for match in _END.finditer(self.pending):
            cut = match.end()
        lines = self._take(cut)
        if len(self.pending) > self.max_chars:
            raise ValueError(f"{len(self.pending)} characters without a sentence end; this server takes at most "
                             f"{self.max_chars} per line (FISH_SERVE_MAX_TEXT_CHARS): send a flush, or end sentences")
        return lines

    def flush(self) -> list[str]:
        """Everything buffered, as lines (a flush or the stop)."""
        return self._take(len(self.pending))

    def _take(self, cut: int) -> list[str]:
        head, self.pending = self.pending[:cut], self.pending[cut:]
        return [line.strip() for line in _split(head) if line.strip()]


def _split(text: str) -> list[str]:
    """Complete text into sentences (each one a line of its own: its audio starts sooner)."""
    lines, start = [], 0
    for match in _END.finditer(text):
        lines.append(text[start:match.end()])
        start = match.end()
    lines.append(text[start:])
    return lines
