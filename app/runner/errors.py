"""Typed failures of the runner and the card, each with one clear message for logs, /health and clients."""


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
