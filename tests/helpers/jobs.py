"""Card jobs as tests drive them directly: a spec for one user turn, and a job's result."""
import time

from app.runner.jobs import Done, Failed, GenerationSpec


def spec_for(tokenizer, text, **fields):
    """A GenerationSpec for one user turn (`fields`: request_class, streamed, max_tokens...)."""
    return GenerationSpec(tuple(tokenizer.chat_ids([{"role": "user", "content": text}])), **fields)


def result_of(job, timeout=None):
    """Wait for the end of a job; its GenerationResult, or the error it failed with raised."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        event = job.next_event(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if event is None:
            raise TimeoutError("the generation did not finish in time")
        if isinstance(event, Done):
            return event.result
        if isinstance(event, Failed):
            raise event.error
