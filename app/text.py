"""Small text helpers: held-back markers (the driver's stop strings, the tool-call parser's markup), the end of
a streamed JSON value, and what may go into a log line."""
import traceback


def marker_prefix_at_end(text, markers):
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`.

    Streamed text holds such a tail back: the next piece decides whether it starts a marker (a stop string,
    `<tool_call>`) or is ordinary text.
    """
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def printable(text):
    """`text` with every character that is not printable escaped (a newline becomes `\\n`, ESC `\\x1b`): a
    client-controlled string that goes into a log line stays on that line and cannot forge another."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def traceback_without_message(exc):
    """A traceback for the log with the exception's type but not its message: a message can quote a prompt
    or an answer, and logs carry no one's text (docs/OPERATIONS.md, "Security model")."""
    frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
    return f"Traceback (most recent call last):\n{frames}{type(exc).__qualname__} (message withheld)"


class JsonScanner:
    """Finds the first complete JSON object (or array) in text that arrives piece by piece: feed() each piece,
    and `start`/`end` are then the value's offsets in all the text fed so far (`end` once it is complete).
    Strings and escapes are followed, so braces inside strings do not count."""

    def __init__(self, opener="{"):
        self.opener = opener
        self.closer = {"{": "}", "[": "]"}[opener]
        self.start = None
        self.end = None
        self._seen = 0          # characters fed so far
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text):
        """Returns `end` once the value is complete (and ignores whatever comes after it)."""
        if self.end is not None:
            self._seen += len(text)
            return self.end
        for i, ch in enumerate(text):
            if self.start is None:
                if ch == self.opener:
                    self.start, self._depth = self._seen + i, 1
                continue
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.end = self._seen + i + 1
                    break
        self._seen += len(text)
        return self.end
