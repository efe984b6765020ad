"""One request's generation on the card, from the request's side: submitted, waited for in line (with its place
and heartbeats), its events read within the wall-clock limit, given up the moment its client goes away. Any API
serves a CardRun the same way (serve.py)."""
import time
from dataclasses import dataclass

from flask import request

from app.backend import current_backend
from app.client_socket import client_probe
from app.errors import APIError
from app.prompt_progress import PromptEstimate
from app.requestlog import current_record
from app.runner.errors import CardUnavailable, QueueFull
from app.runner.jobs import Done, Failed, Requeued, Started, Text

POLL_SECONDS = 0.25  # how often a waiting request looks for its client having left


class ClientGone(Exception):
    """The client closed its connection; its job has been cancelled."""


@dataclass(frozen=True)
class Heartbeat:
    """Nothing happened for generation.heartbeat_seconds."""


@dataclass(frozen=True)
class Queued:
    """Where the request waits: `position` jobs go before it (0: next), `waiting` counts by class."""
    position: int
    request_class: str
    waiting: dict


def card_failure(exc):
    """The APIError (503) for a failure of the card: QueueFull, CardUnavailable or a RunnerError."""
    if isinstance(exc, QueueFull):
        return APIError(503, f"The server is busy: {exc.reason}. Retry later.", type="server_busy",
                        code="queue_full", headers={"Retry-After": str(exc.retry_after or 5)})
    if isinstance(exc, CardUnavailable):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        return APIError(503, f"The NPU card is unavailable: {exc.reason}", type="service_unavailable",
                        code="card_unavailable", headers=headers)
    return APIError(503, f"The generation failed: {exc}", type="service_unavailable", code=exc.kind,
                    headers={"Retry-After": "1"})


class CardRun:
    """Submit, wait for the card, then read events. Use as a context manager: leaving it cancels the job."""

    def __init__(self, backend, spec, client_gone=lambda: False, record=None):
        settings = backend.settings
        self.backend = backend
        self.spec = spec
        self.client_gone = client_gone
        self.queue_timeout = settings["server"]["queue_timeout"]
        self.wall_timeout = settings["generation"]["timeout"]
        self.heartbeat = settings["generation"]["heartbeat_seconds"]
        self.job = None
        self.started_at = None  # when the card took the job
        self.timed_out = False
        self.received = record.received if record is not None else time.monotonic()
        self.record = record  # the request's RequestRecord (requestlog.py), filled in as things happen
        if record is not None:
            record.prompt_tokens = len(spec.prompt_ids)
            record.request_class = spec.request_class

    @classmethod
    def for_request(cls, spec):
        """The run for the request being handled (as flaskr's get_db()): its backend, its client's socket and
        its log record."""
        return cls(current_backend(), spec, client_probe(request.environ), current_record())

    def close(self):
        """Give up the job: no effect once it is done; frees the card at once otherwise."""
        if self.job is not None:
            self.job.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def waited(self):
        """Seconds from the request's arrival until the card took it (in line, or the runner loading)."""
        return (self.started_at or time.monotonic()) - self.received

    def start(self):
        """Queue the job and wait until the card takes it. Raises APIError (503) or ClientGone."""
        self.submit()
        for _ in self.waiting():
            pass
        return self

    def submit(self):
        """Queue the job; a full queue or an unavailable card is an APIError (503) at once."""
        try:
            self.job = self.backend.card.submit(self.spec)
        except CardUnavailable as exc:
            raise card_failure(exc) from None

    def waiting(self, report=True):
        """After submit() (or a preemption), until the card takes the job: Queued whenever its place in line
        changes (if `report`), Heartbeat after a quiet spell. Raises APIError (a failed card, the queue
        timeout) or ClientGone."""
        card = self.backend.card
        deadline = time.monotonic() + self.queue_timeout
        last_place, last_event = None, time.monotonic()
        while True:
            event = self.job.next_event(POLL_SECONDS)
            now = time.monotonic()
            if isinstance(event, Started):
                self._started()
                return
            if isinstance(event, Failed):
                raise card_failure(event.error)
            position = card.position(self.job) if report else None
            place = (position, tuple(card.queue_depths().items()) if report else ())
            if position is not None and place != last_place:
                last_place, last_event = place, now
                yield Queued(position, self.spec.request_class, dict(place[1]))
            elif now - last_event >= self.heartbeat:
                last_event = now
                yield Heartbeat()
            if self.client_gone():
                self.job.cancel()
                raise ClientGone()
            if now > deadline:
                self.job.cancel()
                raise APIError(503, f"The request waited {self.queue_timeout:g} s for the card and was dropped; "
                               "retry later.", type="server_busy", code="queue_timeout",
                               headers={"Retry-After": "5"})

    def _started(self):
        """The card took the job (again, after a preemption)."""
        self.started_at = time.monotonic()
        if self.record is not None:
            self.record.queue_wait = self.started_at - self.record.received

    def events(self, progress=False):
        """After the card took the job: Text as it comes, Heartbeat after a quiet spell, and finally Done; with
        `progress`, Progress while the card reads the prompt (its last one, exact, comes just before the first
        Text). A card failure raises APIError; a vanished client raises ClientGone. A background job that
        gives way to a person, or whose runner failed under it (Requeued), waits again and starts again
        (Started): its client sees only a longer wait. In line again as long as any request may wait
        (server.queue_timeout); then from the start: the wall-clock limit and the prompt's progress count the
        new run."""
        while (yield from self._run(progress)):
            yield from self.waiting(report=progress)

    def _run(self, progress):
        """The events of one run of the job; returns True when it must run again."""
        started = last_event = time.monotonic()
        next_probe = started + POLL_SECONDS
        reading = progress  # the card is (as far as we know) reading the prompt, and progress is wanted
        estimate = PromptEstimate(len(self.spec.prompt_ids), self.backend.card.seconds_per_prompt_token())
        while True:
            event = self.job.next_event(POLL_SECONDS)
            now = time.monotonic()
            if isinstance(event, Failed):
                raise card_failure(event.error)
            if isinstance(event, Requeued):
                if self.record is not None:
                    self.record.ttft = None  # the text of the interrupted run was never the client's
                return True
            if reading and isinstance(event, (Text, Done)):
                reading = False
                yield estimate.done(now - started)
            elif reading and estimate.due(now - started):
                yield estimate.at(now - started)
            if isinstance(event, Done) and event.result.finish_reason == "cancelled":
                if not self.timed_out:  # we did not cancel it: the service is stopping
                    raise APIError(503, "The service is shutting down; retry shortly.",
                                   type="service_unavailable", code="shutting_down",
                                   headers={"Retry-After": "5"})
                event.result.finish_reason = "length"  # the wall-clock limit ends a generation like max_tokens
            if event is not None:
                self._note(event, now)
                last_event = now
                yield event
                if isinstance(event, Done):
                    return False
            # On a clock, not only when idle: text flowing to a closed socket must stop too.
            if now >= next_probe:
                next_probe = now + POLL_SECONDS
                if self.client_gone():
                    self.job.cancel()
                    raise ClientGone()
            if not self.timed_out and now - started > self.wall_timeout:
                self.timed_out = True
                self.job.cancel()
            if now - last_event >= self.heartbeat:
                last_event = now
                yield Heartbeat()

    def _note(self, event, now):
        record = self.record
        if record is None:
            return
        if isinstance(event, Text) and record.ttft is None:
            record.ttft = now - record.received
        elif isinstance(event, Done):
            record.completion_tokens = event.result.completion_tokens
            record.finish_reason = event.result.finish_reason
            record.tokens_per_second = event.result.tokens_per_second

    def result(self):
        """Run to the end and return the GenerationResult (non-streamed requests)."""
        for event in self.events():
            if isinstance(event, Done):
                return event.result
