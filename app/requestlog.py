"""One log line per request, written when the response has been sent (streams included), with a request id
echoed in X-Request-Id (nginx's, or ours). Prompt text is never logged unless server.log_prompts says so."""
import logging
import re
import time
import uuid

from flask import current_app, g, request

from app.text import printable

log = logging.getLogger("qwen_chat.requests")
OBSERVERS = "qwen_request_observers"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestRecord:
    """What one request did; the views and CardRun fill it in, observers read it when the response closes."""

    def __init__(self, request_id, method, path, endpoint):
        self.id = request_id
        self.method = method
        self.path = path
        self.endpoint = endpoint
        self.received = time.monotonic()
        self.status = None
        self.prompt_tokens = None
        self.completion_tokens = None
        self.queue_wait = None        # seconds until the card took the request
        self.ttft = None              # seconds from arrival to the first text
        self.finish_reason = None
        self.tokens_per_second = None
        self.prompt_text = None
        self.ignored_fields = None    # names of request fields we do not use
        self.request_class = None     # "interactive" or "background", for requests that use the card
        self.fit = None               # what the window fit left out (window.Fit), for requests that have one

    def line(self):
        def seconds(value):
            return "-" if value is None else f"{value:.3f}s"
        # The method and path are the client's: escaped, so that they cannot end the line or forge another.
        fields = [f"id={self.id}", f"{printable(self.method)} {printable(self.path)}", f"status={self.status}",
                  f"prompt_tokens={'-' if self.prompt_tokens is None else self.prompt_tokens}",
                  f"completion_tokens={'-' if self.completion_tokens is None else self.completion_tokens}",
                  f"queue_wait={seconds(self.queue_wait)}", f"ttft={seconds(self.ttft)}",
                  f"duration={seconds(time.monotonic() - self.received)}"]
        if self.finish_reason:
            fields.append(f"finish={self.finish_reason}")
        if self.request_class:
            fields.append(f"class={self.request_class}")
        fit = self.fit
        if fit is not None and (fit.dropped_messages or fit.dropped_tools):
            fields.append(f"dropped=messages:{fit.dropped_messages},tools:{fit.dropped_tools}")
        if fit is not None and fit.kept_tools is not None:
            fields.append(f"tools=kept:{len(fit.kept_tools)},compacted:{fit.compacted_tools}")
        if fit is not None and fit.unfit_tool:
            fields.append(f"unfit_tool={fit.unfit_tool}")  # a tool name: [A-Za-z0-9_.-]{1,64} (schemas.py)
        if self.ignored_fields:
            fields.append("ignored=" + ",".join(printable(name[:40]) for name in self.ignored_fields))
        if self.prompt_text is not None:
            fields.append(f"prompt={self.prompt_text!r}")
        return " ".join(fields)


def current_record():
    return g.get("record")


def note_fit(fit):
    """What the window fit of this request left out, for its log line and the metrics."""
    record = current_record()
    if record is not None:
        record.fit = fit


def note_prompt(text):
    """Remember the prompt text for the log line, only when the operator asked for it."""
    record = current_record()
    if record is not None and current_app.config["QWEN"]["server"]["log_prompts"]:
        record.prompt_text = text


def start_record():
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
    g.record = RequestRecord(request_id, request.method, request.path, request.url_rule.rule
                             if request.url_rule else "unmatched")


def finish_record(response):
    record = g.get("record")
    if record is None:
        return response
    record.status = response.status_code
    response.headers["X-Request-Id"] = record.id
    observers = current_app.extensions[OBSERVERS]

    def closed():
        for observe in observers:
            observe(record)
    response.call_on_close(closed)
    return response


def add_observer(app, observe):
    """Have `observe(record)` called with every request's record once its response has been sent."""
    app.extensions[OBSERVERS].append(observe)


def init_app(app):
    """Register first, so that every request (an error included) has a record and an id."""
    app.extensions[OBSERVERS] = [lambda record: log.info("%s", record.line())]
    app.before_request(start_record)
    app.after_request(finish_record)
