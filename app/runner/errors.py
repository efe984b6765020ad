"""Typed failures of the runner and the card, each with one clear message for logs, /health and clients.

Messages carry what happened and counts, never the text of a prompt or an answer: they reach /health, the
log and other clients' 503s.
"""


class RunnerError(Exception):
    """The runner cannot be used; the supervisor restarts it."""
    kind = "runner_error"


class RunnerStartError(RunnerError):
    """The runner did not reach its prompt: missing binary, bad model folder, [E] lines, device permissions."""
    kind = "start_failed"


class RunnerDied(RunnerError):
    """The runner exited while we needed it."""
    kind = "runner_exited"


class CardDead(RunnerError):
    """The runner reported the card dead (`device N is dead`)."""
    kind = "card_dead"


class RunnerStalled(RunnerError):
    """The runner went silent past the stall timeout."""
    kind = "stalled"


class CardBusy(RunnerStartError):
    """Another process holds the card's lock file."""
    kind = "card_busy"


class CardUnavailable(Exception):
    """The card cannot take work now (start failure, dead card, repeated crashes, shutting down)."""

    def __init__(self, reason, retry_after=None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class QueueFull(CardUnavailable):
    """Too many requests already wait for the card."""
