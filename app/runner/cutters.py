"""Where an answer ends before the model ends it. The driver gives a cutter all the answer's text so far, each
time it grows; the first cut any cutter finds ends the answer there (the text before it, and the ids up to the
one that completed the match), and the runner is interrupted. Stop strings are one kind (here); a JSON answer's
end is another (app/structured.py): the runner only knows cutters.
"""
from dataclasses import dataclass

from app.text import marker_prefix_at_end


@dataclass(frozen=True)
class Cut:
    at: int                   # the answer's text ends here...
    end: int                  # ...and the match that cut it ends here (the ids up to it count)
    stop_sequence: str | None = None  # the stop string, as the API reports it


class StopStrings:
    """Cuts before the first of the stop strings; holds back a tail that could be the beginning of one, so that
    nothing is sent and then taken back."""

    def __init__(self, strings):
        self.strings = [s for s in strings if s]
        self._longest = max(map(len, self.strings), default=0)

    def scan(self, text, emitted):
        """The first cut in `text`; a match can only end in the text added since `emitted` characters."""
        start = max(0, emitted - self._longest)
        found = min(((at, s) for s in self.strings if (at := text.find(s, start)) >= 0), default=None)
        return Cut(found[0], found[0] + len(found[1]), found[1]) if found else None

    def hold(self, text):
        return marker_prefix_at_end(text, self.strings)
