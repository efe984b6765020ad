"""One request's generation on the card, as both APIs see it: waiting in line, heartbeats, the wall-clock
limit, and clients that go away. The OpenAI and Ollama views differ only in how they write the events."""
import socket
import time

from flask import Response

from app.errors import APIError
from app.runner.card import CardUnavailable, QueueFull
from app.runner.errors import RunnerError

POLL_SECONDS = 0.25  # how often a waiting request looks for its client having left
CLIENT_CLOSED = 499  # nginx's code for "the client closed the request": nobody reads the response


class ClientGone(Exception):
    """The client closed its connection; its job has been cancelled."""


def client_probe(environ):
    """A callable telling whether the client closed its connection (gunicorn gives us the socket).

    A peer that closed shows as a readable socket with nothing to read. Peeking consumes nothing, and a
    client that pipelines its next request just looks present.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone():
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
    return gone


def card_error(exc):
    """Failures of the card as HTTP errors, shaped by the caller's API."""
    if isinstance(exc, QueueFull):
        return APIError(503, f"The server is busy: {exc.reason}. Retry later.", type="server_busy",
                        code="queue_full", headers={"Retry-After": str(exc.retry_after or 5)})
    if isinstance(exc, CardUnavailable):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        return APIError(503, f"The NPU card is unavailable: {exc.reason}", type="service_unavailable",
                        code="card_unavailable", headers=headers)
    if isinstance(exc, RunnerError):
        return APIError(503, f"The generation failed: {exc}", type="service_unavailable", code=exc.kind,
                        headers={"Retry-After": "1"})
    raise exc


class CardRun:
    """Submit, wait for the card, then read events. Use as a context manager: leaving it cancels the job."""

    def __init__(self, backend, prompt_ids, max_tokens, stop, client_gone=lambda: False, record=None):
        settings = backend.settings
        self.backend = backend
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens or settings["generation"]["max_tokens"]
        self.stop = stop
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.job is not None:
            self.job.cancel()  # no effect once it is done; frees the card at once otherwise

    def start(self):
        """Queue the job and wait until the card takes it. Raises APIError (503) or ClientGone."""
        try:
            self.job = self.backend.card.submit(self.prompt_ids, self.max_tokens, self.stop)
        except CardUnavailable as exc:
            raise card_error(exc) from None
        deadline = time.monotonic() + self.queue_timeout
        while True:
            event = self.job.next_event(POLL_SECONDS)
            if event is not None:
                kind, value = event
                if kind == "started":
                    self.started_at = time.monotonic()
                    if self.record is not None:
                        self.record.queue_wait = self.started_at - self.record.received
                    return self
                if kind == "error":
                    raise card_error(value)
            if self.client_gone():
                self.job.cancel()
                raise ClientGone()
            if time.monotonic() > deadline:
                self.job.cancel()
                raise APIError(503, f"The request waited {self.queue_timeout:g} s for the card and was dropped; "
                               "retry later.", type="server_busy", code="queue_timeout",
                               headers={"Retry-After": "5"})

    def events(self):
        """After start(): ("text", str) as it comes, ("heartbeat", None) after a quiet spell, and finally
        ("done", GenerationResult). A card failure raises APIError; a vanished client raises ClientGone."""
        started = time.monotonic()
        last_event = started
        next_probe = started + POLL_SECONDS
        while True:
            event = self.job.next_event(POLL_SECONDS)
            now = time.monotonic()
            if event is not None:
                kind, value = event
                if kind == "error":
                    raise card_error(value)
                if kind == "done" and value.finish_reason == "cancelled":
                    if not self.timed_out:  # we did not cancel it: the service is stopping
                        raise APIError(503, "The service is shutting down; retry shortly.",
                                       type="service_unavailable", code="shutting_down",
                                       headers={"Retry-After": "5"})
                    value.finish_reason = "length"  # the wall-clock limit ends a generation like max_tokens
                self._note(kind, value, now)
                last_event = now
                yield kind, value
                if kind == "done":
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
                yield "heartbeat", None

    def _note(self, kind, value, now):
        record = self.record
        if record is None:
            return
        if kind == "text" and record.ttft is None:
            record.ttft = now - record.received
        elif kind == "done":
            record.completion_tokens = value.completion_tokens
            record.finish_reason = value.finish_reason
            record.tokens_per_second = value.tokens_per_second

    def result(self):
        """Run to the end and return the GenerationResult (non-streamed requests)."""
        for kind, value in self.events():
            if kind == "done":
                return value


def serve(run, stream, whole, write, mimetype, headers=None):
    """The HTTP response for one request's run, for either API.

    Waits for the card first, so a full or failed card is a plain HTTP error. Then `whole(result)` makes a
    plain answer, or the stream is `write(kind, value)` for each event: "open" first, then "text",
    "heartbeat" and "done", an "error" (an APIError) if the card fails mid-stream, and "end" last.
    """
    try:
        run.start()
    except ClientGone:
        return Response(status=CLIENT_CLOSED)
    if not stream:
        with run:
            try:
                result = run.result()
            except ClientGone:
                return Response(status=CLIENT_CLOSED)
        return whole(result)

    def events():
        yield "open", None
        try:
            yield from run.events()
        except APIError as error:
            yield "error", error
        except ClientGone:
            return
        yield "end", None

    def body():
        # An empty chunk can read as the end of a chunked body to some servers: never send one.
        return (data for data in (write(kind, value) for kind, value in events()) if data)

    response = Response(body(), mimetype=mimetype, headers=headers)
    # The server closes the response when the stream ends or the client goes, even if the body was never
    # iterated: either way the card is freed at once.
    response.call_on_close(lambda: run.__exit__(None, None, None))
    return response
