"""Ollama's answers, framed: one JSON object, or NDJSON lines ending with the `done` one (no heartbeats: Ollama
sends none). Only bytes here: what the answer says was decided by serve() (serve.py)."""
import time
from datetime import datetime, timezone

from flask import jsonify

from app.serve import Writer, compact_json


def iso_time(when=None):
    """Ollama's timestamps: UTC, ISO 8601 with a Z (`when` in seconds since the epoch; default now)."""
    moment = datetime.now(timezone.utc) if when is None else datetime.fromtimestamp(when, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def ns(seconds):
    return int(seconds * 1e9)


def line(obj):
    return compact_json(obj) + b"\n"


class OllamaWriter(Writer):
    """One Ollama answer. `field` is "message" (chat: tool calls come out as message.tool_calls, arguments as
    objects) or "response" (generate). `extra(outcome)` adds fields to the done object (generate's context)."""
    mimetype = "application/x-ndjson"

    def __init__(self, model, field, extra=lambda outcome: None):
        self.model = model
        self.field = field
        self.extra = extra
        self.calls = 0

    def _object(self, content, calls=()):
        if self.field == "message":
            value = {"role": "assistant", "content": content}
            if calls:
                value["tool_calls"] = [call.ollama(index) for index, call in calls]
        else:
            value = content
        return {"model": self.model, "created_at": iso_time(), self.field: value, "done": False}

    def _numbered(self, call):
        self.calls += 1
        return self.calls - 1, call

    def content(self, text):
        return line(self._object(text))

    def call(self, call):
        return line(self._object("", [self._numbered(call)]))

    def _final(self, outcome, content="", calls=()):
        """The done object; a whole answer carries its content and calls in it."""
        result = outcome.result
        body = self._object(content, [self._numbered(call) for call in calls])
        body.update({
            "done": True,
            "done_reason": result.finish_reason,
            "total_duration": ns(time.monotonic() - outcome.received),
            # The time before the card took the request (waiting in line, or for the runner to load).
            "load_duration": ns(outcome.waited),
            "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": ns(result.prompt_seconds),
            "eval_count": result.completion_tokens,
            "eval_duration": ns(result.generation_seconds),
        })
        body.update(self.extra(outcome) or {})
        return body

    def closing(self, outcome):
        return line(self._final(outcome))

    def error(self, error):
        return line(error.ollama_body())

    def whole(self, outcome):
        return jsonify(self._final(outcome, outcome.content, outcome.calls))
