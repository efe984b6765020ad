"""OpenAI's request bodies, loaded by schemas.py, made into typed requests (generation.py): messages as the chat
template reads them, tools and tool_choice, response_format, the prompt's ending, limits and stops. Also what
/tokenize reads, since it takes OpenAI's messages."""
from app.errors import APIError
from app.generation import ChatRequest, PromptRequest
from app.structured import JsonFormat
from app.tools import template_tool_calls, tool_names


def template_messages(messages):
    """Request messages as the chat template reads them.

    "developer" is OpenAI's newer name for system. Assistant tool calls get their arguments as objects, and
    each run of tool results is checked against, and put in the order of, the calls it answers (the
    template's <tool_response> turns carry no ids: order is all the model sees).
    """
    out, call_ids, run_start = [], [], None
    for i, message in enumerate(messages):
        role = "system" if message["role"] == "developer" else message["role"]
        entry = {"role": role, "content": message["content"] or ""}
        if role == "assistant" and message["tool_calls"]:
            entry["tool_calls"] = template_tool_calls(message["tool_calls"])
            call_ids = [call["id"] for call in message["tool_calls"]]
        if role == "tool":
            if message["tool_call_id"] not in call_ids:
                raise APIError(400, f"messages[{i}] answers tool call {message['tool_call_id']!r}, which no "
                               "preceding assistant message made.", param=f"messages[{i}].tool_call_id")
            entry["order"] = call_ids.index(message["tool_call_id"])
            run_start = len(out) if run_start is None else run_start
        elif run_start is not None:
            out[run_start:] = sorted(out[run_start:], key=lambda e: e.pop("order"))
            run_start = None
        out.append(entry)
    if run_start is not None:
        out[run_start:] = sorted(out[run_start:], key=lambda e: e.pop("order"))
    return out


def chat_ending(body):
    """How a chat prompt ends (vLLM's fields, schemas._ChatEnding), as QwenTokenizer.chat_ids takes it."""
    if body["continue_final_message"]:
        return "continue"
    return "none" if body["add_generation_prompt"] is False else "generate"


def json_format(response_format):
    """The JsonFormat response_format asks for, or None for text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return JsonFormat()
    if kind == "json_schema":
        return JsonFormat(response_format["json_schema"].get("schema") or {})
    return None


def chat_tools(raw, body):
    """(the tools to render as the client sent them, the tool tool_choice names, whether it asks for a call)."""
    tools = raw.get("tools") if body["tools"] else None
    choice = body["tool_choice"]
    if choice is not None and not tools:  # as OpenAI answers it, "none" and "auto" included
        raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                       "specified.", param="tool_choice")
    if choice == "none" or not tools:
        return (), None, False
    forced = choice["function"]["name"] if isinstance(choice, dict) else None
    if forced is not None and forced not in tool_names(body["tools"]):
        raise APIError(400, f"`tool_choice` names {forced!r}, which is not among the tools.", param="tool_choice")
    return tuple(tools), forced, choice == "required"


def include_usage(body):
    return bool((body["stream_options"] or {}).get("include_usage"))


def chat_request(raw, body):
    """A ChatRequest from a loaded CHAT_COMPLETION_REQUEST body (and the body as sent, for the tools)."""
    tools, forced, required = chat_tools(raw, body)
    return ChatRequest(
        messages=tuple(template_messages(body["messages"])), model=body["model"], tools=tools, forced_tool=forced,
        tool_required=required, json_format=json_format(body["response_format"]), ending=chat_ending(body),
        max_tokens=body["max_completion_tokens"] or body["max_tokens"], stop_strings=tuple(body["stop"]),
        stream=body["stream"], progress=body["return_progress"])


def completion_request(body):
    """A PromptRequest from a loaded COMPLETION_REQUEST body: text, or token ids."""
    prompt = body["prompt"]
    return PromptRequest(text=prompt if isinstance(prompt, str) else None,
                         ids=None if isinstance(prompt, str) else tuple(prompt), model=body["model"],
                         max_tokens=body["max_tokens"], stop_strings=tuple(body["stop"]), stream=body["stream"],
                         progress=body["return_progress"])
