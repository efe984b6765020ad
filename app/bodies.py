"""Request bodies: JSON objects read whatever Content-Type the client claimed, their sizes bounded, loaded by a
schema (schemas.py); bad ones are 400s, never 500s."""
import json

from flask import current_app, request
from werkzeug.exceptions import HTTPException

from app.errors import APIError
from app.requestlog import current_record
from app.text import printable

MAX_IGNORED_LOGGED = 10  # field names per log line: a client can send thousands


def read_body(schema, example):
    """(the JSON body as sent, the body loaded by `schema`). Fields the schema does not know are ignored, as
    vLLM ignores them, and their names go into the request's log line (vLLM logs them too)."""
    raw = read_json(example)
    check_counts(raw)
    body = schema.load(raw)
    ignored = [name for name in raw if name not in schema.fields]
    record = current_record()
    if ignored and record is not None:
        record.ignored_fields = ignored[:MAX_IGNORED_LOGGED] + (["..."] if len(ignored) > MAX_IGNORED_LOGGED else [])
    return raw, body


# What a request may hold, checked before anything is done with it: each message and tool costs the worker
# time to validate and weigh, whatever the window keeps of it.
COUNTED = (("messages", "max_messages", "messages"), ("tools", "max_tools", "tool definitions"))


def check_counts(raw):
    """A 400 naming the limit (context.max_messages, context.max_tools) when the body holds more."""
    limits = current_app.config["QWEN"]["context"]
    for field, key, what in COUNTED:
        given = raw.get(field)
        if isinstance(given, list) and len(given) > limits[key]:
            raise APIError(400, f"This request has {len(given):,} {what}; this server takes at most "
                           f"{limits[key]:,} (context.{key}). Leave out the oldest or unused ones.",
                           param=field, code=f"too_many_{field}")


def read_json(example):
    """The body as a JSON object, whatever Content-Type the client claimed (curl -d sends a form type)."""
    try:
        body = request.get_data(cache=True)
    except HTTPException:
        raise  # 413: larger than server.max_body_bytes
    except Exception:  # the server's parser gave up on the body's framing (a bad chunk size, say): not our bug
        raise APIError(400, "The request body could not be read: its framing (Content-Length or chunks) is "
                       "broken.", code="invalid_body") from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        raise APIError(400, f"The request body is not valid JSON. Send a JSON object, e.g. {example}.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    where = unpaired_surrogate(data)
    if where is not None:
        raise APIError(400, f"The request body holds an unpaired UTF-16 surrogate (a \\ud800-\\udfff escape "
                       f"without its pair) at {where or 'the top level'}: that is not Unicode text.",
                       param=where or None, code="invalid_json")
    return data


def unpaired_surrogate(data):
    """Where the first string (or key) holding a lone surrogate is, as a path; None when there is none. JSON's
    \\u escapes allow lone surrogates, and nothing downstream can encode them. Iterative: bodies can nest
    deeply."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not _unicode(value):
            return path
        if isinstance(value, dict):
            for key, item in value.items():
                child = printable(f"{path}.{key}" if path else str(key))
                if not _unicode(key):
                    return child
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _unicode(text):
    """Whether a str is Unicode text (no lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
