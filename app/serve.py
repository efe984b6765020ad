"""One request's answer, whichever API asked: the prepared generation (prepare.py) run on the card (card_run.py),
its text made into the answer (output.py), and handed to the API's writer, which only frames bytes (OpenAI's
SSE and JSON, Ollama's NDJSON and JSON). Whole or streamed, an answer is made of the same pieces."""
import json
import logging
import time
from dataclasses import dataclass

from flask import Response

from app.card_run import CardRun, ClientGone, Heartbeat, Queued
from app.errors import APIError, error_response
from app.output import Output
from app.prompt_progress import Progress
from app.requestlog import note_fit
from app.runner.driver import GenerationResult
from app.runner.jobs import Done, Text

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's code for "the client closed the request": nobody reads the response


def compact_json(obj):
    """The one JSON encoding of everything the writers stream (SSE data, NDJSON lines)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Outcome:
    """How a generation ended, for the writer's last piece: the runner's result, when the card took the request
    (`waited` seconds after it arrived at `received`), and for a whole answer its content and calls; `called`:
    whether any tool call was made."""
    result: GenerationResult
    received: float
    waited: float
    content: str | None = None
    calls: tuple = ()
    called: bool = False


class Writer:
    """How one API frames one answer. For a stream, serve() calls: opening() once the card took the request (at
    once when the client asked for progress, then queued() while it waits and progress() while the card reads
    the prompt), content(text) and call(ToolCall) for each piece of the answer, heartbeat() after a quiet spell,
    then closing(outcome) at the end or error(APIError) if it failed; each returns the bytes to send. For a
    whole answer it calls whole(outcome), which returns the response."""
    mimetype = "application/json"
    headers = None

    def opening(self):
        return b""

    def queued(self, event):
        return b""

    def progress(self, event):
        return b""

    def heartbeat(self):
        return b""

    def content(self, text):
        raise NotImplementedError

    def call(self, call):
        raise NotImplementedError

    def closing(self, outcome):
        raise NotImplementedError

    def error(self, error):
        raise NotImplementedError

    def whole(self, outcome):
        raise NotImplementedError


def serve(prepared, writer, stream, progress=False):
    """The HTTP response for one prepared request; what the window fit left out goes into its headers (and the
    request's log line and metrics)."""
    note_fit(prepared.fit)
    try:
        if prepared.explanation:
            response = serve_text(writer, prepared.explanation, stream)
        else:
            response = _serve_run(CardRun.for_request(prepared.spec), prepared, writer, stream, progress)
    except APIError as error:
        response = error_response(error)
    if prepared.fit is not None:
        response.headers.extend(prepared.fit.headers())
    return response


def serve_text(writer, text, stream):
    """An answer the service gives itself, without the card (a request it can only explain), framed as a
    generation's: whole, or streamed as one piece."""
    now = time.monotonic()
    outcome = Outcome(GenerationResult(text=text, ids=[], finish_reason="stop", prompt_tokens=0), now, 0.0, text)
    if not stream:
        return writer.whole(outcome)
    pieces = [writer.opening(), writer.content(text), writer.closing(outcome)]
    return Response((piece for piece in pieces if piece), mimetype=writer.mimetype, headers=writer.headers)


def _serve_run(run, prepared, writer, stream, progress):
    """Waits for the card first, so a full or failed card is a plain HTTP error; then the answer is written
    whole, or streamed as the card produces it. A stream that asked for `progress` opens at once instead:
    the wait in line and the card reading the prompt are events of the stream, and so is a card that fails
    meanwhile. The card is freed as soon as the client goes away."""
    output = Output(prepared.tool_names, prepared.json_format)
    try:
        if progress and stream:
            run.submit()
        else:
            run.start()
    except ClientGone:
        return Response(status=CLIENT_CLOSED)
    if not stream:
        return _whole(run, output, prepared, writer)
    # An empty chunk can read as the end of a chunked body to some servers: never send one.
    body = (data for data in _stream(run, output, prepared, writer, progress) if data)
    response = Response(body, mimetype=writer.mimetype, headers=writer.headers)
    # The server closes the response when the stream ends or the client goes, even if the body was never
    # iterated: either way the card is freed at once.
    response.call_on_close(run.close)
    return response


def _whole(run, output, prepared, writer):
    with run:
        try:
            result = run.result()
        except ClientGone:
            return Response(status=CLIENT_CLOSED)
    content, calls = output.whole(result.text, result.finish_reason)
    _warn_if_not_called(prepared, calls)
    return writer.whole(Outcome(result, run.received, run.waited, content, tuple(calls), bool(calls)))


def _stream(run, output, prepared, writer, progress):
    """The bytes of a streamed answer, piece by piece as the card produces them."""
    called = False

    def pieces(events):
        nonlocal called
        for kind, value in events:
            if kind == "content":
                yield writer.content(value)
            else:
                called = True
                yield writer.call(value)

    yield writer.opening()
    try:
        for event in _with_waiting(run) if progress else run.events():
            match event:
                case Text(text):
                    yield from pieces(output.feed(text))
                case Heartbeat():
                    yield writer.heartbeat()
                case Queued():
                    yield writer.queued(event)
                case Progress():
                    yield writer.progress(event)
                case Done(result):
                    yield from pieces(output.finish())
                    output.check(result.finish_reason)  # APIError: the stream ends with an error, not a finish
                    _warn_if_not_called(prepared, [True] if called else [])
                    yield writer.closing(Outcome(result, run.received, run.waited, called=called))
    except APIError as error:
        yield writer.error(error)
    except ClientGone:
        return


def _with_waiting(run):
    yield from run.waiting()
    yield from run.events(progress=True)


def _warn_if_not_called(prepared, calls):
    if prepared.tool_asked and not calls:
        # Nothing can force this runner to call a tool: the answer is returned as the model gave it.
        log.warning("tool_choice asked for a tool call; the model answered without one")
