"""One request's answer from the card, as both APIs serve it: waiting in line, heartbeats, the wall-clock
limit, clients that go away. Each API only says how to write an answer (an `Answer`); `serve()` is the one
path every answer takes, whole or streamed."""
import ipaddress
import json
import socket
import time
from dataclasses import dataclass

from flask import Response, request

from app.backend import current_backend
from app.errors import APIError
from app.requestlog import current_record
from app.runner.card import INTERACTIVE, Done, Failed, Requeued, Started, Text
from app.runner.driver import GenerationResult
from app.runner.errors import CardUnavailable, QueueFull
from app.sockets import caller_socket

POLL_SECONDS = 0.25  # how often a waiting request looks for its client having left
CLIENT_CLOSED = 499  # nginx's code for "the client closed the request": nobody reads the response


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


@dataclass(frozen=True)
class Progress:
    """How far the card has read the prompt. The runner prints nothing meanwhile, so `processed` is an
    estimate from the card's measured pace until the first text arrives (then it is exact: `estimated`
    False, processed == total)."""
    total: int
    processed: int
    elapsed: float
    remaining: float
    estimated: bool


def compact_json(obj):
    """The one JSON encoding of everything we stream (SSE data, NDJSON lines)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def client_probe(environ):
    """A callable telling whether the client closed its connection (gunicorn gives us the socket).

    Peeking consumes nothing, and a client that pipelines its next request just looks present. A reset is a
    disconnect. End of input is ambiguous: a client that closed its connection, and one that only shut down
    its sending side after the request (shutdown(SHUT_WR), as some clients and proxies do) both look like
    that, and only the first is gone. On loopback (nginx in front, or a local client) the kernel tells them
    apart: a closed socket has no owner left (sockets.py). A remote peer cannot be asked: its end of input
    counts as gone, as it always did.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone():
        try:
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return False
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not half_closed(sock)
    return gone


def half_closed(sock):
    """After end of input: whether the client's socket is still open (it only stopped sending)."""
    try:
        peer, ours = sock.getpeername()[:2], sock.getsockname()[:2]
        if not ipaddress.ip_address(peer[0]).is_loopback:
            return False
        return caller_socket(peer, ours) is not None
    except (OSError, ValueError):
        return False


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

    def __init__(self, backend, prompt_ids, max_tokens, stop, klass=INTERACTIVE, streamed=False, json_value=None,
                 client_gone=lambda: False, record=None):
        settings = backend.settings
        self.backend = backend
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens or settings["generation"]["max_tokens"]
        self.stop = stop
        self.klass = klass          # INTERACTIVE or BACKGROUND (scheduling.py)
        self.streamed = streamed
        self.json_value = json_value  # "{" or "[": the card stops after the first complete JSON value
        self.client_gone = client_gone
        self.queue_timeout = settings["server"]["queue_timeout"]
        self.wall_timeout = settings["generation"]["timeout"]
        self.heartbeat = settings["generation"]["heartbeat_seconds"]
        self.job = None
        self.started_at = None  # when the card took the job
        self.timed_out = False
        self.record = record  # the request's RequestRecord (requestlog.py), filled in as things happen
        if record is not None:
            record.prompt_tokens = len(prompt_ids)
            record.request_class = klass

    @classmethod
    def for_request(cls, prompt_ids, max_tokens, stop, klass=INTERACTIVE, streamed=False, json_value=None):
        """The run for the request being handled (as flaskr's get_db()): its backend, its client's socket and
        its log record."""
        return cls(current_backend(), prompt_ids, max_tokens, stop, klass, streamed, json_value,
                   client_probe(request.environ), current_record())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.job is not None:
            self.job.cancel()  # no effect once it is done; frees the card at once otherwise

    def start(self):
        """Queue the job and wait until the card takes it. Raises APIError (503) or ClientGone."""
        self.submit()
        for _ in self.waiting():
            pass
        return self

    def submit(self):
        """Queue the job; a full queue or an unavailable card is an APIError (503) at once."""
        try:
            self.job = self.backend.card.submit(self.prompt_ids, self.max_tokens, self.stop, self.klass, self.streamed,
                                                self.json_value)
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
                yield Queued(position, self.klass, dict(place[1]))
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
        gives way to a person (Requeued) waits again and starts again (Started): its client sees only a
        longer wait."""
        started = time.monotonic()
        last_event = started
        next_probe = started + POLL_SECONDS
        reading = progress  # the card is (as far as we know) reading the prompt, and progress is wanted
        estimate = PromptEstimate(len(self.prompt_ids), self.backend.card.seconds_per_prompt_token())
        while True:
            event = self.job.next_event(POLL_SECONDS)
            now = time.monotonic()
            if isinstance(event, Failed):
                raise card_failure(event.error)
            if isinstance(event, Requeued):
                if self.record is not None:
                    self.record.ttft = None  # the text of the interrupted run was never the client's
                # In line again, as long as any request may wait (server.queue_timeout); then from the start:
                # the wall-clock limit and the prompt's progress count the new run.
                yield from self.waiting(report=progress)
                started = last_event = time.monotonic()
                reading = progress
                estimate = PromptEstimate(len(self.prompt_ids), self.backend.card.seconds_per_prompt_token())
                continue
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
                    return
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


class PromptEstimate:
    """Progress through a prompt the runner reads silently, one token per step: an estimate from the card's
    measured pace, monotonic, never reaching the total before the first text is really there."""
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
        # The first text comes two steps after the last prompt token (the runner prints ids three at a time).
        self.processed = max(self.processed, min(self.total - 1, int(elapsed / self.pace)))
        remaining = max(0.0, (self.total + 2) * self.pace - elapsed)
        return Progress(self.total, self.processed, elapsed, remaining, estimated=True)

    def done(self, elapsed):
        return Progress(self.total, self.total, elapsed, 0.0, estimated=False)


class Answer:
    """How one API writes one answer. `serve()` calls, for a stream: opening() once the card took the
    request (at once when the client asked for progress, then queued() while it waits and progress() while
    the card reads the prompt), text(piece) for each piece of the answer, heartbeat() after a quiet spell,
    then closing(result) at the end or error(APIError) if the card failed; each returns the bytes to send.
    For a plain answer it calls whole(result), which returns the response."""
    mimetype = "application/json"
    headers = None

    def opening(self):
        return b""

    def queued(self, event):
        """A Queued event (only when the client asked for progress)."""
        return b""

    def progress(self, event):
        """A Progress event (only when the client asked for progress)."""
        return b""

    def text(self, text):
        raise NotImplementedError

    def heartbeat(self):
        return b""

    def closing(self, result):
        raise NotImplementedError

    def error(self, error):
        raise NotImplementedError

    def whole(self, result):
        raise NotImplementedError


def serve_text(answer, text, stream):
    """An answer the service gives itself, without the card (a request it can only explain), framed as a
    generation's: whole, or streamed as one piece."""
    result = GenerationResult(text=text, ids=[], finish_reason="stop", prompt_tokens=0)
    if not stream:
        return answer.whole(result)
    pieces = [answer.opening(), answer.text(text), answer.closing(result)]
    return Response((piece for piece in pieces if piece), mimetype=answer.mimetype, headers=answer.headers)


def serve(run, answer, stream, progress=False):
    """The HTTP response for one request's run, for either API.

    Waits for the card first, so a full or failed card is a plain HTTP error; then the answer is written
    whole, or streamed as the card produces it. A stream that asked for `progress` opens at once instead:
    the wait in line and the card reading the prompt are events of the stream, and so is a card that fails
    meanwhile. The card is freed as soon as the client goes away.
    """
    try:
        if progress and stream:
            run.submit()
        else:
            run.start()
    except ClientGone:
        return Response(status=CLIENT_CLOSED)
    if not stream:
        with run:
            try:
                result = run.result()
            except ClientGone:
                return Response(status=CLIENT_CLOSED)
        return answer.whole(result)

    def events():
        if progress:
            yield from run.waiting()
        yield from run.events(progress)

    def body():
        yield answer.opening()
        try:
            for event in events():
                match event:
                    case Text(text):
                        yield answer.text(text)
                    case Heartbeat():
                        yield answer.heartbeat()
                    case Queued():
                        yield answer.queued(event)
                    case Progress():
                        yield answer.progress(event)
                    case Done(result):
                        yield answer.closing(result)
        except APIError as error:
            yield answer.error(error)
        except ClientGone:
            return

    # An empty chunk can read as the end of a chunked body to some servers: never send one.
    response = Response((data for data in body() if data), mimetype=answer.mimetype, headers=answer.headers)
    # The server closes the response when the stream ends or the client goes, even if the body was never
    # iterated: either way the card is freed at once.
    response.call_on_close(lambda: run.__exit__(None, None, None))
    return response
