"""What requests give us: JSON bodies, and prompts rendered from them and fitted to the window; bad ones are
400s, never 500s."""
import json

from flask import current_app, request
from jinja2 import TemplateError
from werkzeug.exceptions import HTTPException

from app.errors import APIError
from app.requestlog import current_record
from app.runner.protocol import MAX_TOKEN_LEN
from app.text import printable
from app.window import Conversation, fit

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


def chat_prompt_ids(backend, messages, tools=None, keep_tool=None, tool_instruction=None, max_tokens=None,
                    window=MAX_TOKEN_LEN, instruction=None, ending="generate"):
    """The prompt ids of a conversation, by the chat template, fitted to the window (window.py): what was
    left out goes into the request's record (its log line, headers and metrics). What the template cannot
    render is the client's error."""
    context = backend.settings["context"]
    # The answer's room: the configured reserve, or less when the request asks for less; and never more than
    # half of a small window (Ollama's num_ctx), or nothing of the conversation could stay.
    reserve = min(context["reserve_tokens"], max_tokens or context["reserve_tokens"], window // 2)
    try:
        conversation = Conversation(backend.tokenizer, messages, tools, keep_tool, tool_instruction, instruction,
                                    ending)
        fitted = fit(conversation, window, reserve, context["overflow"], context["tool_reserve_tokens"])
    except (TemplateError, TypeError, ValueError, RecursionError) as exc:
        raise APIError(400, f"The conversation cannot be rendered by the model's chat template: {exc}",
                       param="messages") from None
    record = current_record()
    if record is not None and fitted.truncated:
        record.dropped_messages, record.dropped_tools = fitted.dropped_messages, fitted.dropped_tools
        record.kept_tools, record.compacted_tools = fitted.kept_tools, fitted.compacted_tools
        record.unfit_tool = fitted.unfit_tool
    if fitted.unfit_reason:
        raise ToolDoesNotFit(fitted.unfit_reason)
    return fitted.prompt_ids


class ToolDoesNotFit(Exception):
    """The person asked for something only a tool can do, and no tool it needs fits the window: the model
    would answer as if it had acted. The views answer this reason instead, without the card."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def check_raw_prompt(prompt_ids, param, window=MAX_TOKEN_LEN, context_tokens=0):
    """A raw prompt (no chat template: nothing to leave out) must fit the window as it is."""
    if len(prompt_ids) > window:
        carried = f" ({context_tokens} of them from `context`)" if context_tokens else ""
        raise APIError(400, f"This model's maximum context length is {window} tokens. However, your {param} "
                       f"resulted in {len(prompt_ids)} tokens{carried}. Please reduce the length of the {param}.",
                       param=param, code="context_length_exceeded")
