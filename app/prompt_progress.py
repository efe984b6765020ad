"""How far the card has read a prompt. The runner prints nothing while it reads, one token per step, so until
the first text this is an estimate from the card's measured pace (app/runner/pace.py)."""
from dataclasses import dataclass

from app.runner import protocol


@dataclass(frozen=True)
class Progress:
    """`processed` of `total` prompt tokens after `elapsed` seconds, `remaining` to go; an estimate until the
    first text arrives (then exact: `estimated` False, processed == total)."""
    total: int
    processed: int
    elapsed: float
    remaining: float
    estimated: bool


class PromptEstimate:
    """Progress through a prompt, monotonic, never reaching the total before the first text is really there."""
    EVERY = 0.5  # seconds between two Progress events

    def __init__(self, total, seconds_per_token):
        self.total = total
        self.pace = seconds_per_token
        self.processed = 0
        self.next_at = 0.0

    def due(self, elapsed):
        return elapsed >= self.next_at

    def at(self, elapsed):
        self.next_at = elapsed + self.EVERY
        self.processed = max(self.processed, min(self.total - 1, int(elapsed / self.pace)))
        # The first text comes a few steps after the last prompt token (the runner prints ids in chunks).
        remaining = max(0.0, (self.total + protocol.STEPS_BEFORE_FIRST_TEXT) * self.pace - elapsed)
        return Progress(self.total, self.processed, elapsed, remaining, estimated=True)

    def done(self, elapsed):
        return Progress(self.total, self.total, elapsed, 0.0, estimated=False)
