"""The OpenAI-compatible API: /v1/chat/completions (tools included), /v1/completions, /v1/models."""
import json
import logging
import time
import uuid

from flask import Blueprint, jsonify, request

from app.backend import current_backend
from app.errors import APIError
from app.generation import CardRun, client_probe, serve
from app.inputs import chat_prompt_ids, read_json
from app.requestlog import current_record, note_prompt
from app.runner.protocol import MAX_TOKEN_LEN
from app.schemas import CHAT_COMPLETION_REQUEST, COMPLETION_REQUEST
from app.tools import collect, output_parser, required_instruction, template_tool_calls, tool_names

bp = Blueprint("openai", __name__, url_prefix="/v1")
log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
ARGUMENT_FRAGMENT = 32  # streamed tool-call arguments arrive in pieces of this many characters


def check_model(name):
    if not current_backend().knows_model(name):
        raise APIError(404, f"The model `{name}` does not exist. This server serves `{current_backend().model_name}`.",
                       param="model", code="model_not_found")


def check_context(prompt_ids, param):
    """A prompt must fit the card's 1024-token window (PROTOCOL.md: 1025 - L output ids at most)."""
    if len(prompt_ids) > MAX_TOKEN_LEN:
        raise APIError(400, f"This model's maximum context length is {MAX_TOKEN_LEN} tokens. However, your "
                       f"{param} resulted in {len(prompt_ids)} tokens. Please reduce the length of the {param}.",
                       param=param, code="context_length_exceeded")


def usage(result):
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def sse(obj):
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class TextChunks:
    """SSE chunks that differ only in one text field, built by splicing the text's JSON into a chunk serialized
    once: byte for byte what sse() would give, without serializing the whole chunk for every piece."""
    PLACEHOLDER = "\x00text\x00"  # control characters are always escaped, so this cannot occur in real text

    def __init__(self, template):
        marker = json.dumps(self.PLACEHOLDER).encode()
        self.head, self.tail = sse(template).split(marker)

    def __call__(self, text):
        return self.head + json.dumps(text, ensure_ascii=False).encode() + self.tail


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
    """(tools to render as the client sent them, their names, the tool_choice instruction or None)."""
    tools = raw.get("tools") if body["tools"] else None
    choice = body["tool_choice"]
    if choice == "none" or not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "`tool_choice` needs `tools`.", param="tool_choice")
        return None, [], None
    names = tool_names(body["tools"])
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        raise APIError(400, f"`tool_choice` names {choice['function']['name']!r}, which is not among the tools.",
                       param="tool_choice")
    return tools, names, required_instruction(choice)


@bp.post("/chat/completions")
def chat_completions():
    raw = read_json('{"model": ..., "messages": [{"role": "user", "content": ...}]}')
    body = CHAT_COMPLETION_REQUEST.load(raw)
    check_model(body["model"])
    be = current_backend()
    messages = template_messages(body["messages"])
    tools, names, instruction = chat_tools(raw, body)
    if instruction:
        messages.append({"role": "system", "content": instruction})
    note_prompt(next((m["content"] for m in reversed(messages) if m["role"] in ("user", "tool")), ""))
    prompt_ids = chat_prompt_ids(be.tokenizer, messages, tools)
    check_context(prompt_ids, "messages")
    run = CardRun(be, prompt_ids, body["max_completion_tokens"] or body["max_tokens"], body["stop"],
                  client_probe(request.environ), current_record())
    return respond(run, ChatReply(be.model_name, names, body["tool_choice"]), body)


class ChatReply:
    """chat.completion objects for one answer, whole or as chunks; one id for all of them."""

    def __init__(self, model, tools, tool_choice):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.tools = tools
        self.tool_choice = tool_choice

    def _base(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def finish_reason(self, result, called):
        if called and result.finish_reason == "stop":
            return "tool_calls"
        if not called and self.tool_choice not in (None, "auto", "none") and self.tools:
            # Nothing can force this runner to call a tool: the answer is returned as the model gave it.
            log.warning("tool_choice %r asked for a tool call; the model answered without one", self.tool_choice)
        return result.finish_reason

    def whole(self, result):
        content, calls = collect(output_parser(self.tools), result.text)
        message = {"role": "assistant", "content": content if content or not self.tools else None,
                   "refusal": None}
        if calls:
            message["tool_calls"] = [call.openai() for call in calls]
        body = self._base("chat.completion")
        body["choices"] = [{"index": 0, "message": message, "logprobs": None,
                            "finish_reason": self.finish_reason(result, bool(calls))}]
        body["usage"] = usage(result)
        return body

    def writer(self, with_usage):
        return ChatStream(self, with_usage)


class ChatStream:
    """The SSE chunks of one streamed chat answer. Tool calls stream as OpenAI does: a first delta with the
    call's index, id, type and name, then its arguments in fragments; no <tool_call> markup reaches content."""

    def __init__(self, reply, with_usage):
        self.reply = reply
        self.with_usage = with_usage
        self.parser = output_parser(reply.tools)
        self.calls = 0
        self.content_chunk = TextChunks(self._body({"content": TextChunks.PLACEHOLDER}))

    def _body(self, delta, finish=None):
        body = self.reply._base("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if self.with_usage:
            body["usage"] = None  # as OpenAI does: only the last chunk carries usage
        return body

    def _chunk(self, delta, finish=None):
        return sse(self._body(delta, finish))

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
        out += self._chunk({}, self.reply.finish_reason(result, self.calls > 0))
        if self.with_usage:
            body = self.reply._base("chat.completion.chunk")
            body.update(choices=[], usage=usage(result))
            out += sse(body)
        return out


# -- completions -------------------------------------------------------------------------------------------
@bp.post("/completions")
def completions():
    body = COMPLETION_REQUEST.load(read_json('{"model": ..., "prompt": ...}'))
    check_model(body["model"])
    be = current_backend()
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompt_ids = be.tokenizer.encode(prompt)
    else:
        bad = next((i for i in prompt if not be.tokenizer.valid_id(i)), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} is outside the vocabulary.", param="prompt")
        prompt_ids = prompt
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param="prompt")
    check_context(prompt_ids, "prompt")
    note_prompt(prompt if isinstance(prompt, str) else be.tokenizer.decode(prompt_ids))
    echo = be.tokenizer.decode(prompt_ids) if body["echo"] else ""
    run = CardRun(be, prompt_ids, body["max_tokens"], body["stop"], client_probe(request.environ),
                  current_record())
    return respond(run, CompletionReply(be.model_name, echo), body)


class CompletionReply:
    """text_completion objects for one answer, whole or as chunks."""

    def __init__(self, model, echo):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.echo = echo

    def body(self, text, finish, usage_value=None, with_usage=False):
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage_value is not None or with_usage:
            body["usage"] = usage_value  # None on all but the last chunk, as OpenAI does
        return body

    def whole(self, result):
        return self.body(self.echo + result.text, result.finish_reason, usage(result))

    def writer(self, with_usage):
        return CompletionStream(self, with_usage)


class CompletionStream:
    """The SSE chunks of one streamed completion: the echoed prompt, one per text piece, the finish."""

    def __init__(self, reply, with_usage):
        self.reply = reply
        self.with_usage = with_usage
        self.text = TextChunks(reply.body(TextChunks.PLACEHOLDER, None, with_usage=with_usage))

    def opening(self):
        return sse(self.reply.body(self.reply.echo, None, with_usage=self.with_usage)) if self.reply.echo else b""

    def closing(self, result):
        out = sse(self.reply.body("", result.finish_reason, with_usage=self.with_usage))
        if self.with_usage:
            last = self.reply.body("", None, usage(result))
            last["choices"] = []
            out += sse(last)
        return out


# -- models ------------------------------------------------------------------------------------------------
def model_object():
    be = current_backend()
    return {"id": be.model_name, "object": "model", "created": be.created, "owned_by": "qwen-chat"}


@bp.get("/models")
def list_models():
    return jsonify({"object": "list", "data": [model_object()]})


@bp.get("/models/<path:model_id>")
def get_model(model_id):
    check_model(model_id)
    return jsonify(model_object())


# -- answering ---------------------------------------------------------------------------------------------
def respond(run, reply, body):
    """The answer as SSE when the request streams, else whole once the card is done."""
    writer = reply.writer(include_usage(body)) if body["stream"] else None

    def write(kind, value):
        if kind == "open":
            return writer.opening()
        if kind == "text":
            return writer.text(value)
        if kind == "heartbeat":
            return HEARTBEAT
        if kind == "done":
            return writer.closing(value)
        if kind == "error":
            return sse(value.openai_body())
        return DONE  # "end": after the answer, or after an error event

    return serve(run, body["stream"], lambda result: jsonify(reply.whole(result)), write,
                 "text/event-stream", SSE_HEADERS)
