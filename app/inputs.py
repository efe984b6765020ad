"""What requests give us: JSON bodies, and prompts rendered from them; bad ones are 400s, never 500s."""
import json

from flask import request
from jinja2 import TemplateError

from app.errors import APIError


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
