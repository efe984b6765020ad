"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""
import json
import time
import uuid

from flask import Blueprint, Response, current_app, jsonify, request

from app.errors import APIError
from app.generation import CardRun, ClientGone, client_probe
from app.requestlog import current_record, note_prompt
from app.runner.protocol import MAX_TOKEN_LEN
from app.schemas import CHAT_COMPLETION_REQUEST, COMPLETION_REQUEST

bp = Blueprint("openai", __name__, url_prefix="/v1")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def backend():
    return current_app.extensions["qwen"]


def read_json():
    """The body as a JSON object, whatever Content-Type the client claimed (curl -d sends a form type)."""
    data = request.get_json(force=True, silent=True)
    if data is None:
        raise APIError(400, "The request body is not valid JSON. Send a JSON object, e.g. "
                       '{"model": ..., "messages": [...]}.', code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def check_model(name):
    if not backend().knows_model(name):
        raise APIError(404, f"The model `{name}` does not exist. This server serves `{backend().model_name}`.",
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


def template_messages(messages):
    """Request messages as the chat template reads them ("developer" is OpenAI's newer name for system)."""
    out = []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": message["content"] or ""})
    return out


# -- chat ------------------------------------------------------------------------------------------------
@bp.post("/chat/completions")
def chat_completions():
    body = CHAT_COMPLETION_REQUEST.load(read_json())
    check_model(body["model"])
    be = backend()
    messages = template_messages(body["messages"])
    note_prompt(messages[-1]["content"])
    prompt_ids = be.tokenizer.chat_ids(messages)
    check_context(prompt_ids, "messages")
    run = CardRun(be, prompt_ids, body["max_completion_tokens"] or body["max_tokens"], body["stop"],
                  client_probe(request.environ), current_record())
    reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", be.model_name)
    if body["stream"]:
        include_usage = bool((body["stream_options"] or {}).get("include_usage"))
        return stream(run, reply.chat_chunks(include_usage))
    with run:
        try:
            result = run.start().result()
        except ClientGone:
            return Response(status=499)
    return jsonify(reply.chat(result))


# -- completions -------------------------------------------------------------------------------------------
@bp.post("/completions")
def completions():
    body = COMPLETION_REQUEST.load(read_json())
    check_model(body["model"])
    be = backend()
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
    reply = Reply(f"cmpl-{uuid.uuid4().hex}", be.model_name, echo)
    if body["stream"]:
        include_usage = bool((body["stream_options"] or {}).get("include_usage"))
        return stream(run, reply.completion_chunks(include_usage))
    with run:
        try:
            result = run.start().result()
        except ClientGone:
            return Response(status=499)
    return jsonify(reply.completion(result))


# -- models ------------------------------------------------------------------------------------------------
def model_object():
    be = backend()
    return {"id": be.model_name, "object": "model", "created": be.created, "owned_by": "qwen-chat"}


@bp.get("/models")
def list_models():
    return jsonify({"object": "list", "data": [model_object()]})


@bp.get("/models/<path:model_id>")
def get_model(model_id):
    check_model(model_id)
    return jsonify(model_object())


# -- response bodies ---------------------------------------------------------------------------------------
class Reply:
    """The OpenAI objects for one answer, whole or as stream chunks (one id for all of them)."""

    def __init__(self, reply_id, model, echo=""):
        self.id = reply_id
        self.model = model
        self.created = int(time.time())
        self.echo = echo

    def _base(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chat(self, result):
        body = self._base("chat.completion")
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                            "logprobs": None, "finish_reason": result.finish_reason}]
        body["usage"] = usage(result)
        return body

    def completion(self, result):
        body = self._base("text_completion")
        body["choices"] = [{"index": 0, "text": self.echo + result.text, "logprobs": None,
                            "finish_reason": result.finish_reason}]
        body["usage"] = usage(result)
        return body

    def _chunk(self, obj, choice, include_usage):
        body = self._base(obj)
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None  # as OpenAI does: only the last chunk carries usage
        return sse(body)

    def _usage_chunk(self, obj, result):
        body = self._base(obj)
        body["choices"] = []
        body["usage"] = usage(result)
        return sse(body)

    def chat_chunks(self, include_usage):
        """The SSE bytes of a streamed chat answer: a first chunk with the role, one per text piece, and a
        last one with the finish reason (then usage, if asked for)."""
        def delta(content=None, role=None, finish=None):
            d = {}
            if role:
                d["role"] = role
            if content is not None:
                d["content"] = content
            return self._chunk("chat.completion.chunk", {"index": 0, "delta": d, "logprobs": None,
                                                         "finish_reason": finish}, include_usage)
        return _Chunks(
            first=lambda: delta(role="assistant", content=""),
            text=lambda text: delta(content=text),
            last=lambda result: delta(finish=result.finish_reason)
            + (self._usage_chunk("chat.completion.chunk", result) if include_usage else b""))

    def completion_chunks(self, include_usage):
        def choice(text, finish=None):
            return self._chunk("text_completion", {"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": finish}, include_usage)
        return _Chunks(
            first=lambda: choice(self.echo) if self.echo else b"",
            text=lambda text: choice(text),
            last=lambda result: choice("", result.finish_reason)
            + (self._usage_chunk("text_completion", result) if include_usage else b""))


class _Chunks:
    def __init__(self, first, text, last):
        self.first, self.text, self.last = first, text, last


def stream(run, chunks):
    """SSE: wait for the card (errors before this point are plain HTTP errors), then stream; an error after
    the stream started is an error event, and the stream still ends with [DONE]."""
    try:
        run.start()
    except ClientGone:
        return Response(status=499)

    def body():
        yield chunks.first()
        try:
            for kind, value in run.events():
                if kind == "text":
                    yield chunks.text(value)
                elif kind == "heartbeat":
                    yield HEARTBEAT
                elif kind == "done":
                    yield chunks.last(value)
        except APIError as error:
            yield sse(error.openai_body())
        except ClientGone:
            return
        yield DONE

    response = Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)
    # The server closes the response when the stream ends or the client goes, even if the body was never
    # iterated: either way the card is freed at once.
    response.call_on_close(lambda: run.__exit__(None, None, None))
    return response
