"""The OpenAI-compatible API: /v1/chat/completions (tools included), /v1/completions, /v1/models."""
import logging
import time
import uuid

from flask import Blueprint, jsonify, request

from app.backend import current_backend
from app.errors import APIError
from app.inputs import ToolDoesNotFit, chat_prompt_ids, check_raw_prompt, read_body
from app.requestlog import note_prompt
from app.runner.protocol import MAX_TOKEN_LEN
from app.schemas import CHAT_COMPLETION_REQUEST, COMPLETION_REQUEST, chat_ending, json_format
from app.serving import Answer, CardRun, compact_json, serve, serve_text
from app.structured import StructuredText
from app.tools import collect, output_parser, required_instruction, template_tool_calls, tool_names

bp = Blueprint("openai", __name__, url_prefix="/v1")
log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
ARGUMENT_FRAGMENT = 32  # streamed tool-call arguments arrive in pieces of this many characters


def check_model(name):
    """A name of the served model, or none at all (absent, null or ""), which means the served model."""
    if name in (None, ""):
        return
    if not current_backend().knows_model(name):
        raise APIError(404, f"The model `{name}` does not exist. This server serves `{current_backend().model_name}`.",
                       param="model", code="model_not_found")


def usage(result):
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def sse(obj):
    return b"data: " + compact_json(obj) + b"\n\n"


class TextChunks:
    """SSE chunks that differ only in one text field, built by splicing the text's JSON into a chunk serialized
    once: byte for byte what sse() would give, without serializing the whole chunk for every piece."""
    PLACEHOLDER = "\x00text\x00"  # control characters are always escaped, so this cannot occur in real text

    def __init__(self, template):
        self.head, self.tail = sse(template).split(compact_json(self.PLACEHOLDER))

    def __call__(self, text):
        return self.head + compact_json(text) + self.tail


def include_usage(body):
    return bool((body["stream_options"] or {}).get("include_usage"))


# -- chat --------------------------------------------------------------------------------------------------
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


def chat_tools(raw, body):
    """(tools to render as the client sent them, their names, the tool_choice instruction or None); the tool
    tool_choice names is raw["tool_choice"]["function"]["name"]."""
    tools = raw.get("tools") if body["tools"] else None
    choice = body["tool_choice"]
    if choice is not None and not tools:  # as OpenAI answers it, "none" and "auto" included
        raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                       "specified.", param="tool_choice")
    if choice == "none" or not tools:
        return None, [], None
    names = tool_names(body["tools"])
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        raise APIError(400, f"`tool_choice` names {choice['function']['name']!r}, which is not among the tools.",
                       param="tool_choice")
    return tools, names, required_instruction(choice)


@bp.post("/chat/completions")
def chat_completions():
    raw, body = read_body(CHAT_COMPLETION_REQUEST, '{"model": ..., "messages": [{"role": "user", "content": ...}]}')
    check_model(body["model"])
    backend = current_backend()
    messages = template_messages(body["messages"])
    tools, names, instruction = chat_tools(raw, body)
    note_prompt(next((m["content"] for m in reversed(messages) if m["role"] in ("user", "tool")), ""))
    max_tokens = body["max_completion_tokens"] or body["max_tokens"]
    choice = body["tool_choice"]
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    fmt = json_format(body["response_format"])
    try:
        prompt_ids = chat_prompt_ids(backend, messages, tools, named, instruction, max_tokens,
                                     instruction=fmt.instruction() if fmt else None, ending=chat_ending(body))
    except ToolDoesNotFit as unfit:
        return serve_text(ChatAnswer(backend, [], None, include_usage(body)), unfit.reason, body["stream"])
    klass = backend.request_class(request.headers, messages, body["model"])
    # The card stops after a JSON value, unless tools are offered: a tool call is JSON too.
    run = CardRun.for_request(prompt_ids, max_tokens, body["stop"], klass, body["stream"],
                              json_value=fmt.opener if fmt and not tools else None)
    answer = ChatAnswer(backend, names, choice, include_usage(body), body["return_progress"], fmt)
    return serve(run, answer, body["stream"], progress=body["return_progress"])


class OpenAIAnswer(Answer):
    """What OpenAI's chat and completion answers share: SSE framing, heartbeats, errors, [DONE], and the
    progress chunks of a stream that asked for them (return_progress): an empty chunk (see empty_chunk())
    with `queue` while the request waits, or llama.cpp's `prompt_progress` while the card reads the prompt,
    and `timings` on the last chunk."""
    mimetype = "text/event-stream"
    headers = SSE_HEADERS
    with_progress = False

    def empty_chunk(self):
        raise NotImplementedError

    def heartbeat(self):
        return HEARTBEAT

    def error(self, error):
        return sse(error.openai_body()) + DONE

    def queued(self, event):
        body = self.empty_chunk()
        body["queue"] = {"position": event.position, "request_class": event.request_class,
                         "waiting": event.waiting}
        return sse(body)

    def progress(self, event):
        body = self.empty_chunk()
        body["prompt_progress"] = {
            "total": event.total, "cache": 0, "processed": event.processed, "time_ms": round(event.elapsed * 1000),
            # Ours: the runner prints nothing while it reads, so until the first text these are estimates.
            "estimated": event.estimated, "remaining_ms": round(event.remaining * 1000), "window": MAX_TOKEN_LEN}
        return sse(body)

    def timings(self, result):
        """llama.cpp's timings, for the last chunk of a stream that asked for progress."""
        prompt_ms, predicted_ms = result.prompt_seconds * 1000, result.generation_seconds * 1000
        return {"prompt_n": result.prompt_tokens, "prompt_ms": round(prompt_ms, 1),
                "prompt_per_second": round(result.prompt_tokens / result.prompt_seconds, 2)
                if result.prompt_seconds else None,
                "predicted_n": result.completion_tokens, "predicted_ms": round(predicted_ms, 1),
                "predicted_per_second": round(result.tokens_per_second, 2)}


class ChatAnswer(OpenAIAnswer):
    """One chat answer: a chat.completion, or its chunks; one id for all of them. Tool calls stream as
    OpenAI streams them: a first delta with the call's index, id, type and name, then its arguments in
    fragments; no <tool_call> markup reaches content."""

    def __init__(self, backend, tools, tool_choice, with_usage, with_progress=False, json_format=None):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = backend.model_name
        self.fingerprint = backend.fingerprint
        self.created = int(time.time())
        self.tools = tools
        self.tool_choice = tool_choice
        self.with_usage = with_usage
        self.with_progress = with_progress
        self.json_format = json_format  # a JSON answer: its value only, validated (structured.py)
        self.parser = StructuredText(json_format, tools) if json_format else output_parser(tools)
        self.calls = 0
        self.content_chunk = TextChunks(self._chunk_body({"content": TextChunks.PLACEHOLDER}))

    def _base(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def finish_reason(self, result, called):
        if called and result.finish_reason == "stop":
            return "tool_calls"
        if not called and self.tool_choice not in (None, "auto", "none") and self.tools:
            # Nothing can force this runner to call a tool: the answer is returned as the model gave it.
            log.warning("tool_choice %r asked for a tool call; the model answered without one", self.tool_choice)
        return result.finish_reason

    def whole(self, result):
        content, calls = collect(self.parser, result.text)
        if self.json_format:
            content = self.parser.check(result.finish_reason) or content
        message = {"role": "assistant", "content": content if content or not self.tools else None,
                   "refusal": None}
        if calls:
            message["tool_calls"] = [call.openai() for call in calls]
        body = self._base("chat.completion")
        body["choices"] = [{"index": 0, "message": message, "logprobs": None,
                            "finish_reason": self.finish_reason(result, bool(calls))}]
        body["usage"] = usage(result)
        return jsonify(body)

    def _chunk_body(self, delta, finish=None):
        body = self._base("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if self.with_usage:
            body["usage"] = None  # as OpenAI does: only the last chunk carries usage
        return body

    def _chunk(self, delta, finish=None):
        return sse(self._chunk_body(delta, finish))

    def empty_chunk(self):
        return self._chunk_body({"role": "assistant", "content": None})

    def _events(self, events):
        out = b""
        for kind, value in events:
            if kind == "content":
                out += self.content_chunk(value)
                continue
            call, index = value.openai(), self.calls
            self.calls += 1
            out += self._chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                "function": {"name": call["function"]["name"], "arguments": ""}}]})
            arguments = call["function"]["arguments"]
            for at in range(0, len(arguments), ARGUMENT_FRAGMENT):
                fragment = arguments[at:at + ARGUMENT_FRAGMENT]
                out += self._chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        return out

    def opening(self):
        return self._chunk({"role": "assistant", "content": ""})

    def text(self, text):
        return self._events(self.parser.feed(text))

    def closing(self, result):
        out = self._events(self.parser.finish())
        if self.json_format:
            self.parser.check(result.finish_reason)  # APIError: the stream ends with an error event, not a finish
        last = self._chunk_body({}, self.finish_reason(result, self.calls > 0))
        if self.with_progress:
            last["timings"] = self.timings(result)
        out += sse(last)
        if self.with_usage:
            body = self._base("chat.completion.chunk")
            body.update(choices=[], usage=usage(result))
            out += sse(body)
        return out + DONE


# -- completions -------------------------------------------------------------------------------------------
@bp.post("/completions")
def completions():
    _, body = read_body(COMPLETION_REQUEST, '{"model": ..., "prompt": ...}')
    check_model(body["model"])
    backend = current_backend()
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompt_ids = backend.tokenizer.encode(prompt)
    else:
        bad = next((i for i in prompt if not backend.tokenizer.valid_id(i)), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} is outside the vocabulary.", param="prompt")
        prompt_ids = prompt
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param="prompt")
    check_raw_prompt(prompt_ids, "prompt")
    text = prompt if isinstance(prompt, str) else backend.tokenizer.decode(prompt_ids)
    note_prompt(text)
    echo = backend.tokenizer.decode(prompt_ids) if body["echo"] else ""
    klass = backend.request_class(request.headers, [{"role": "user", "content": text}], body["model"])
    run = CardRun.for_request(prompt_ids, body["max_tokens"], body["stop"], klass, body["stream"])
    answer = CompletionAnswer(backend, echo, include_usage(body), body["return_progress"])
    return serve(run, answer, body["stream"], progress=body["return_progress"])


class CompletionAnswer(OpenAIAnswer):
    """One completion: a text_completion, or its chunks (the echoed prompt, one per text piece, the
    finish)."""

    def __init__(self, backend, echo, with_usage, with_progress=False):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.model = backend.model_name
        self.fingerprint = backend.fingerprint
        self.created = int(time.time())
        self.echo = echo
        self.with_usage = with_usage
        self.with_progress = with_progress
        self.text_chunk = TextChunks(self.body(TextChunks.PLACEHOLDER, None, with_usage=with_usage))

    def body(self, text, finish, usage_value=None, with_usage=False):
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage_value is not None or with_usage:
            body["usage"] = usage_value  # None on all but the last chunk, as OpenAI does
        return body

    def whole(self, result):
        return jsonify(self.body(self.echo + result.text, result.finish_reason, usage(result)))

    def opening(self):
        return sse(self.body(self.echo, None, with_usage=self.with_usage)) if self.echo else b""

    def empty_chunk(self):
        return self.body("", None, with_usage=self.with_usage)

    def text(self, text):
        return self.text_chunk(text)

    def closing(self, result):
        last = self.body("", result.finish_reason, with_usage=self.with_usage)
        if self.with_progress:
            last["timings"] = self.timings(result)
        out = sse(last)
        if self.with_usage:
            last = self.body("", None, usage(result))
            last["choices"] = []
            out += sse(last)
        return out + DONE


# -- models ------------------------------------------------------------------------------------------------
def model_object():
    backend = current_backend()
    # max_model_len as vLLM reports it: the window is what clients most need to know about this card.
    return {"id": backend.model_name, "object": "model", "created": backend.created, "owned_by": "qwen-chat",
            "max_model_len": MAX_TOKEN_LEN}


@bp.get("/models")
def list_models():
    return jsonify({"object": "list", "data": [model_object()]})


@bp.get("/models/<path:model_id>")
def get_model(model_id):
    check_model(model_id)
    return jsonify(model_object())
