"""Ollama's native API (docs/api.md) over the same runner, lock and tokenizer: /api/chat, /api/generate,
/api/tags, /api/show, /api/ps, /api/version, and the "Ollama is running" answer that app/page.py gives to
every client of `GET /` but browsers."""
import hashlib
import time
from datetime import datetime, timezone

from flask import Blueprint, Response, jsonify, request

from app.backend import current_backend
from app.errors import APIError
from app.inputs import ToolDoesNotFit, chat_prompt_ids, check_raw_prompt, read_body
from app.requestlog import note_prompt
from app.runner.protocol import LAYERS, MAX_TOKEN_LEN
from app.schemas import OLLAMA_CHAT_REQUEST, OLLAMA_GENERATE_REQUEST, OLLAMA_MODEL_REQUEST, ollama_json_format
from app.serving import Answer, CardRun, compact_json, serve, serve_text
from app.structured import StructuredText
from app.tools import collect, output_parser, tool_names

bp = Blueprint("ollama", __name__)

# The Ollama API level this server follows (clients compare it to decide what they may send).
OLLAMA_VERSION = "0.11.0"
NDJSON = "application/x-ndjson"


def iso_time(when=None):
    """Ollama's timestamps: UTC, ISO 8601 with a Z (`when` in seconds since the epoch; default now)."""
    moment = datetime.now(timezone.utc) if when is None else datetime.fromtimestamp(when, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def ns(seconds):
    return int(seconds * 1e9)


def check_model(name):
    if not current_backend().knows_model(name):
        raise APIError(404, f'model "{name}" not found, try pulling it first')


def max_tokens(options):
    """num_predict: absent -> the configured default; 0 (no limit, as Ollama reads it), -1 (forever) or -2
    (fill the context) -> the window decides."""
    num_predict = options.get("num_predict")
    if num_predict is not None and num_predict <= 0:
        return MAX_TOKEN_LEN
    return num_predict


def window(options):
    """num_ctx, within the card's window (Ollama clamps it to what the model can do, as we do)."""
    return min(options.get("num_ctx") or MAX_TOKEN_LEN, MAX_TOKEN_LEN)


def load_reply(model, keep_alive, **empty):
    """An empty prompt (or no messages) is how Ollama clients ask for the model to be loaded: answer at once."""
    reason = "unload" if keep_alive in (0, "0", "0s", "0m") else "load"
    return jsonify({"model": model, "created_at": iso_time(), **empty, "done": True, "done_reason": reason})


class OllamaAnswer(Answer):
    """One Ollama answer, whole or as NDJSON lines ending with the `done` one (no heartbeats: Ollama sends
    none). `field` is "message" (chat) or "response" (generate). Chat answers go through the tool-call parser
    when tools were offered: calls come out as message.tool_calls (arguments as objects), never as
    <tool_call> markup in the content. `extra(result)` adds fields to the done object (generate's context)."""
    mimetype = "application/x-ndjson"

    def __init__(self, run, model, field, received, tools=(), extra=lambda result: None, json_format=None):
        self.run = run
        self.model = model
        self.field = field
        self.received = received
        self.json_format = json_format  # `format`: the answer is its JSON value only, validated (structured.py)
        self.parser = StructuredText(json_format, tools) if json_format else output_parser(tools)
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

    def _lines(self, events):
        """NDJSON for parser events: one object per content piece, one per tool call."""
        return b"".join(line(self._object(value) if kind == "content" else self._object("", [self._numbered(value)]))
                        for kind, value in events)

    def _final(self, result, content="", calls=()):
        """The done object; a whole answer carries its content and calls in it."""
        body = self._object(content, [self._numbered(call) for call in calls])
        body.update({
            "done": True,
            "done_reason": result.finish_reason,
            "total_duration": ns(time.monotonic() - self.received),
            # The time before the card took the request (waiting in line, or for the runner to load).
            "load_duration": ns(self.run.started_at - self.received) if self.run is not None else 0,
            "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": ns(result.prompt_seconds),
            "eval_count": result.completion_tokens,
            "eval_duration": ns(result.generation_seconds),
        })
        body.update(self.extra(result) or {})
        return body

    def text(self, text):
        return self._lines(self.parser.feed(text))

    def closing(self, result):
        if self.json_format:
            self.parser.check(result.finish_reason)  # APIError: the stream ends with an error line, not done
        return self._lines(self.parser.finish()) + line(self._final(result))

    def error(self, error):
        return line(error.ollama_body())

    def whole(self, result):
        content, calls = collect(self.parser, result.text)
        if self.json_format:
            content = self.parser.check(result.finish_reason) or content
        return jsonify(self._final(result, content, calls))


def line(obj):
    return compact_json(obj) + b"\n"


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


@bp.post("/api/chat")
def chat():
    received = time.monotonic()
    raw, body = read_body(OLLAMA_CHAT_REQUEST, '{"model": ..., "messages": [{"role": "user", "content": ...}]}')
    check_model(body["model"])
    backend = current_backend()
    if not body["messages"]:
        return load_reply(body["model"], body["keep_alive"], message={"role": "assistant", "content": ""})
    options = body["options"] or {}
    messages = template_messages(body["messages"])
    note_prompt(messages[-1]["content"])
    tools = raw.get("tools") if body["tools"] else None
    limit = max_tokens(options)
    fmt = ollama_json_format(body["format"])
    # As Ollama does: a conversation that ends with an assistant message is continued (a prefill).
    last = body["messages"][-1]
    ending = "continue" if last["role"] == "assistant" and not last["tool_calls"] else "generate"
    try:
        prompt_ids = chat_prompt_ids(backend, messages, tools, max_tokens=limit, window=window(options),
                                     instruction=fmt.instruction() if fmt else None, ending=ending)
    except ToolDoesNotFit as unfit:
        answer = OllamaAnswer(None, body["model"], "message", received)
        return serve_text(answer, unfit.reason, body["stream"])
    klass = backend.request_class(request.headers, messages, body["model"])
    # The card stops after a JSON value, unless tools are offered: a tool call is JSON too.
    run = CardRun.for_request(prompt_ids, limit, options.get("stop", []), klass, body["stream"],
                              json_value=fmt.opener if fmt and not tools else None)
    answer = OllamaAnswer(run, body["model"], "message", received, tool_names(body["tools"]), json_format=fmt)
    return serve(run, answer, body["stream"])


@bp.post("/api/generate")
def generate():
    received = time.monotonic()
    _, body = read_body(OLLAMA_GENERATE_REQUEST, '{"model": ..., "prompt": ...}')
    check_model(body["model"])
    backend = current_backend()
    if not body["prompt"]:
        return load_reply(body["model"], body["keep_alive"], response="")
    options = body["options"] or {}
    fmt = ollama_json_format(body["format"])
    messages = [{"role": "system", "content": body["system"]}] if body["system"] else []
    messages.append({"role": "user", "content": body["prompt"]})
    if body["raw"]:
        prompt_ids = backend.tokenizer.encode(body["prompt"])  # no template: no room for the format's words
    else:
        instruction = [{"role": "system", "content": fmt.instruction()}] if fmt else []
        prompt_ids = backend.tokenizer.chat_ids(messages + instruction)
    context = body["context"] or []
    if not all(backend.tokenizer.valid_id(i) for i in context):
        raise APIError(400, "context holds token ids outside the vocabulary")
    prompt_ids = context + prompt_ids  # a conversation continued from an earlier answer's context
    check_raw_prompt(prompt_ids, "prompt", window(options), len(context))
    note_prompt(body["prompt"])
    klass = backend.request_class(request.headers, messages, body["model"])
    run = CardRun.for_request(prompt_ids, max_tokens(options), options.get("stop", []), klass, body["stream"],
                              json_value=fmt.opener if fmt else None)
    answer = OllamaAnswer(run, body["model"], "response", received,
                          extra=lambda result: {"context": prompt_ids + result.ids}, json_format=fmt)
    return serve(run, answer, body["stream"])


# -- models ------------------------------------------------------------------------------------------------
def model_entry():
    backend = current_backend()
    digest = hashlib.sha256(f"{backend.model_name}@{backend.settings['model']['dir']}".encode()).hexdigest()
    return {"name": backend.model_name, "model": backend.model_name, "modified_at": iso_time(backend.created),
            "size": backend.model_size,
            "digest": digest, "details": {
                "parent_model": "", "format": "axmodel", "family": "qwen2", "families": ["qwen2"],
                "parameter_size": "1.5B", "quantization_level": "GPTQ-Int4"}}


@bp.get("/api/tags")
def tags():
    return jsonify({"models": [model_entry()]})


@bp.get("/api/ps")
def running():
    """The model is "running" while the runner holds it on the card."""
    if current_backend().card.state != "ready":
        return jsonify({"models": []})
    entry = model_entry()
    expires = iso_time(time.time() + 365 * 86400)
    entry.pop("modified_at")
    entry.update({"expires_at": expires, "size_vram": entry["size"]})
    return jsonify({"models": [entry]})


@bp.post("/api/show")
def show():
    _, body = read_body(OLLAMA_MODEL_REQUEST, '{"model": ...}')
    check_model(body["model"] or body["name"])
    backend = current_backend()
    entry = model_entry()
    sampling = backend.settings["sampling"]
    parameters = "\n".join(f"{name:<20} {value}" for name, value in [
        ("temperature", sampling["temperature"]), ("top_k", sampling["top_k"]), ("top_p", sampling["top_p"]),
        ("repeat_penalty", sampling["repetition_penalty"]), ("num_ctx", MAX_TOKEN_LEN),
        ("stop", '"<|im_end|>"')] if value is not None)
    template = backend.tokenizer.chat_template
    return jsonify({
        "license": "Apache License 2.0 (Qwen2.5-1.5B-Instruct)",
        "modelfile": (f"# qwen-chat serves {backend.model_name} on the LLM-8850 card\n"
                      f"FROM {backend.settings['model']['dir']}\n"),
        "parameters": parameters,
        "template": template,
        "details": entry["details"],
        "model_info": {"general.architecture": "qwen2", "general.basename": "Qwen2.5",
                       "general.parameter_count": 1_543_714_304, "general.quantization_version": 2,
                       "qwen2.context_length": MAX_TOKEN_LEN, "qwen2.block_count": LAYERS,
                       "qwen2.embedding_length": 1536, "tokenizer.ggml.model": "gpt2"},
        "capabilities": ["completion", "tools"],
        "modified_at": entry["modified_at"],
    })


@bp.get("/api/version")
def version():
    return jsonify({"version": OLLAMA_VERSION})


@bp.post("/api/pull")
def pull():
    """The model is already here: answer as Ollama does for a model that is up to date."""
    _, body = read_body(OLLAMA_MODEL_REQUEST, '{"model": ...}')
    check_model(body["model"] or body["name"])
    return jsonify({"status": "success"})


@bp.route("/api/<any(create, copy, delete, push, embed, embeddings, blobs):what>", methods=["POST", "DELETE", "HEAD"])
def unsupported(what):
    raise APIError(501, f"/api/{what} is not supported by this server: it serves one fixed model on the NPU card")


def probe_answer():
    """What Ollama answers on `GET /`: its clients probe it to find a server (app/page.py routes `/`)."""
    return Response("Ollama is running", mimetype="text/plain")
