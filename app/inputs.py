"""What requests give us: JSON bodies, and prompts rendered from them; bad ones are 400s, never 500s."""
import json

from flask import request
from jinja2 import TemplateError

from app.errors import APIError
from app.requestlog import current_record

MAX_IGNORED_LOGGED = 10  # field names per log line: a client can send thousands


def read_body(schema, example):
    """(the JSON body as sent, the body loaded by `schema`). Fields the schema does not know are ignored, as
    vLLM ignores them, and their names go into the request's log line (vLLM logs them too)."""
    raw = read_json(example)
    body = schema.load(raw)
    ignored = [name for name in raw if name not in schema.fields]
    record = current_record()
    if ignored and record is not None:
        record.ignored_fields = ignored[:MAX_IGNORED_LOGGED] + (["..."] if len(ignored) > MAX_IGNORED_LOGGED else [])
    return raw, body


def read_json(example):
    """The body as a JSON object, whatever Content-Type the client claimed (curl -d sends a form type)."""
    try:
        data = json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        raise APIError(400, f"The request body is not valid JSON. Send a JSON object, e.g. {example}.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def chat_prompt_ids(tokenizer, messages, tools=None):
    """The prompt ids of a conversation, by the chat template; what it cannot render is the client's error."""
    try:
        return tokenizer.chat_ids(messages, tools)
    except (TemplateError, TypeError, ValueError, RecursionError) as exc:
        raise APIError(400, f"The conversation cannot be rendered by the model's chat template: {exc}",
                       param="messages") from None
