"""Ollama's request bodies (its docs/api.md), loaded by schemas.py, made into typed requests (generation.py)."""
from app.generation import UNTIL_THE_WINDOW, ChatRequest, PromptRequest
from app.structured import JsonFormat


def max_tokens(options):
    """num_predict: absent -> the configured default; 0 (no limit, as Ollama reads it), -1 (forever) or -2
    (fill the context) -> the window decides."""
    num_predict = options.get("num_predict")
    if num_predict is not None and num_predict <= 0:
        return UNTIL_THE_WINDOW
    return num_predict


def json_format(fmt):
    """The JsonFormat Ollama's `format` asks for ("json" or a schema), or None."""
    if fmt == "json":
        return JsonFormat()
    return JsonFormat(fmt) if isinstance(fmt, dict) else None


def template_messages(messages):
    """Ollama messages as the chat template reads them (tool calls' arguments are already objects)."""
    out = []
    for message in messages:
        entry = {"role": message["role"], "content": message["content"] or ""}
        if message["tool_calls"]:
            entry["tool_calls"] = [{"type": "function", "function": call["function"]}
                                   for call in message["tool_calls"]]
        out.append(entry)
    return out


def chat_request(raw, body):
    """A ChatRequest from a loaded OLLAMA_CHAT_REQUEST body (with messages). As Ollama does, a conversation that
    ends with an assistant message is continued (a prefill); num_ctx asks for a smaller window (a larger one is
    taken as the card's, as Ollama clamps it to what the model can do)."""
    options = body["options"] or {}
    last = body["messages"][-1]
    return ChatRequest(
        messages=tuple(template_messages(body["messages"])), model=body["model"],
        tools=tuple(raw.get("tools") or ()) if body["tools"] else (), json_format=json_format(body["format"]),
        ending="continue" if last["role"] == "assistant" and not last["tool_calls"] else "generate",
        max_tokens=max_tokens(options), stop_strings=tuple(options.get("stop", [])), window=options.get("num_ctx"),
        stream=body["stream"])


def generate_request(body):
    """A PromptRequest from a loaded OLLAMA_GENERATE_REQUEST body (with a prompt): the chat template around the
    system and the prompt, or (raw) the prompt alone; after an earlier answer's context."""
    options = body["options"] or {}
    messages = [{"role": "system", "content": body["system"]}] if body["system"] else []
    messages.append({"role": "user", "content": body["prompt"]})
    return PromptRequest(
        text=body["prompt"] if body["raw"] else None, messages=tuple(messages), context=tuple(body["context"] or ()),
        model=body["model"], json_format=json_format(body["format"]), max_tokens=max_tokens(options),
        stop_strings=tuple(options.get("stop", [])), window=options.get("num_ctx"), stream=body["stream"])
