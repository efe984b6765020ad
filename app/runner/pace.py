"""How fast the card reads a prompt, measured: the runner prints nothing while it reads, so a request's progress
through its prompt can only be estimated from this pace (app/prompt_progress.py)."""
import math

from app.runner import protocol


class PromptPace:
    """Seconds the card takes per prompt token, measured: each generation's time to its first text over its
    prompt (plus the steps before the first chunk prints), smoothed; the runner's own "avg ... token/s" notice
    when a generation ended before any text. Until the first measurement, `prior`."""
    WEIGHT = 0.3      # of the newest measurement
    MIN_TOKENS = 8    # shorter prompts say more about overheads than about the pace

    def __init__(self, prior):
        self.seconds_per_token = prior
        self._measured = False

    def observe(self, result):
        if result.completion_tokens and result.prompt_tokens >= self.MIN_TOKENS:
            measured = result.prompt_seconds / (result.prompt_tokens + protocol.STEPS_BEFORE_FIRST_TEXT)
        elif result.runner_tokens_per_second:
            measured = 1.0 / result.runner_tokens_per_second
        else:
            return
        if not math.isfinite(measured) or measured <= 0:
            return
        weight = self.WEIGHT if self._measured else 1.0
        self.seconds_per_token += weight * (measured - self.seconds_per_token)
        self._measured = True
