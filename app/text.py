"""Small text helpers shared by the driver (stop strings) and the tool-call parser (markup)."""


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
