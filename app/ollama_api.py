"""Ollama's native API (docs/api.md) over the same runner, lock and tokenizer: /api/chat, /api/generate,
/api/tags, /api/show, /api/ps, /api/version, and `GET /` answering "Ollama is running"."""
import hashlib
import json
import time
from datetime import datetime, timedelta, timezone

from flask import Blueprint, Response, jsonify, request

from app.backend import current_backend
from app.errors import APIError
from app.generation import CardRun, client_probe, serve
from app.requestlog import current_record, note_prompt
from app.inputs import chat_prompt_ids, read_json
from app.runner.protocol import MAX_TOKEN_LEN
from app.schemas import OLLAMA_CHAT_REQUEST, OLLAMA_GENERATE_REQUEST, OLLAMA_MODEL_REQUEST
from app.tools import collect, output_parser, tool_names

bp = Blueprint("ollama", __name__)

# The Ollama API level this server follows (clients compare it to decide what they may send).
OLLAMA_VERSION = "0.11.0"
NDJSON = "application/x-ndjson"


def now_iso():
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def ns(seconds):
    return int(seconds * 1e9)


def check_model(name):
    if not current_backend().knows_model(name):
        raise APIError(404, f'model "{name}" not found, try pulling it first')


def max_tokens(options):
    """num_predict: absent -> the configured default; -1 (forever) or -2 (fill the context) -> the window."""
    num_predict = options.get("num_predict")
    if num_predict is not None and num_predict < 0:
        return MAX_TOKEN_LEN
    return num_predict


def check_context(prompt_ids, options):
    window = min(options.get("num_ctx") or MAX_TOKEN_LEN, MAX_TOKEN_LEN)
    if len(prompt_ids) > window:
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens, more than the context window of {window} "
                       f"tokens (this model's window is {MAX_TOKEN_LEN}); shorten the conversation")


def load_reply(model, keep_alive, **empty):
    """An empty prompt (or no messages) is how Ollama clients ask for the model to be loaded: answer at once."""
    reason = "unload" if keep_alive in (0, "0", "0s", "0m") else "load"
    return jsonify({"model": model, "created_at": now_iso(), **empty, "done": True, "done_reason": reason})


class OllamaReply:
    """Ollama's objects for one answer: `field` is "message" (chat) or "response" (generate). Chat answers
    go through the tool-call parser when tools were offered: calls come out as message.tool_calls (arguments
    as objects), never as <tool_call> markup in the content."""

    def __init__(self, model, field, received, tools=()):
        self.model = model
        self.field = field
        self.received = received
        self.parser = output_parser(tools)
        self.calls = 0

    def _object(self, content, calls=()):
        if self.field == "message":
            value = {"role": "assistant", "content": content}
            if calls:
                value["tool_calls"] = [call.ollama(index) for index, call in calls]
        else:
            value = content
        return {"model": self.model, "created_at": now_iso(), self.field: value, "done": False}

    def _numbered(self, call):
        self.calls += 1
        return self.calls - 1, call

    def pieces(self, events):
        """Streamed objects for parser events: one per content piece, one per tool call."""
        return [self._object(value) if kind == "content" else self._object("", [self._numbered(value)])
                for kind, value in events]

    def final(self, result, waited, extra=None, content="", calls=()):
        """The done object; a whole answer carries its content and calls in it."""
        body = self._object(content, [self._numbered(call) for call in calls])
        body.update({
            "done": True,
            "done_reason": result.finish_reason,
            "total_duration": ns(time.monotonic() - self.received),
            # The time before the card took the request (waiting in line, or for the runner to load).
            "load_duration": ns(waited),
            "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": ns(result.prompt_seconds),
            "eval_count": result.completion_tokens,
            "eval_duration": ns(result.generation_seconds),
        })
        body.update(extra or {})
        return body


def line(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def answer(run, reply, stream, extra=lambda result: None):
    """One JSON object, or NDJSON lines ending with the `done` one (no heartbeats: Ollama sends none)."""
    def whole(result):
        content, calls = collect(reply.parser, result.text)
        return jsonify(reply.final(result, waited(), extra(result), content, calls))

    def waited():
        return run.started_at - reply.received

    def write(kind, value):
        if kind == "text":
            return b"".join(line(obj) for obj in reply.pieces(reply.parser.feed(value)))
        if kind == "done":
            return (b"".join(line(obj) for obj in reply.pieces(reply.parser.finish()))
                    + line(reply.final(value, waited(), extra(value))))
        if kind == "error":
            return line(value.ollama_body())
        return b""  # open, heartbeat, end

    return serve(run, stream, whole, write, NDJSON)


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
    raw = read_json('{"model": ..., "messages": [{"role": "user", "content": ...}]}')
    body = OLLAMA_CHAT_REQUEST.load(raw)
    check_model(body["model"])
    be = current_backend()
    if not body["messages"]:
        return load_reply(body["model"], body["keep_alive"], message={"role": "assistant", "content": ""})
    options = body["options"] or {}
    messages = template_messages(body["messages"])
    note_prompt(messages[-1]["content"])
    tools = raw.get("tools") if body["tools"] else None
    prompt_ids = chat_prompt_ids(be.tokenizer, messages, tools)
    check_context(prompt_ids, options)
    run = CardRun(be, prompt_ids, max_tokens(options), options.get("stop", []), client_probe(request.environ),
                  current_record())
    reply = OllamaReply(body["model"], "message", received, tool_names(body["tools"]))
    return answer(run, reply, body["stream"])


@bp.post("/api/generate")
def generate():
    received = time.monotonic()
    body = OLLAMA_GENERATE_REQUEST.load(read_json('{"model": ..., "prompt": ...}'))
    check_model(body["model"])
    be = current_backend()
    if not body["prompt"]:
        return load_reply(body["model"], body["keep_alive"], response="")
    options = body["options"] or {}
    if body["raw"]:
        prompt_ids = be.tokenizer.encode(body["prompt"])
    else:
        messages = [{"role": "system", "content": body["system"]}] if body["system"] else []
        prompt_ids = chat_prompt_ids(be.tokenizer, messages + [{"role": "user", "content": body["prompt"]}])
    context = body["context"] or []
    if not all(be.tokenizer.valid_id(i) for i in context):
        raise APIError(400, "context holds token ids outside the vocabulary")
    prompt_ids = context + prompt_ids  # a conversation continued from an earlier answer's context
    check_context(prompt_ids, options)
    note_prompt(body["prompt"])
    run = CardRun(be, prompt_ids, max_tokens(options), options.get("stop", []), client_probe(request.environ),
                  current_record())
    reply = OllamaReply(body["model"], "response", received)
    return answer(run, reply, body["stream"], extra=lambda result: {"context": prompt_ids + result.ids})


# -- models ------------------------------------------------------------------------------------------------
def model_entry():
    be = current_backend()
    digest = hashlib.sha256(f"{be.model_name}@{be.settings['model']['dir']}".encode()).hexdigest()
    modified = datetime.fromtimestamp(be.created, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": be.model_name, "model": be.model_name, "modified_at": modified, "size": be.model_size,
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
    expires = (datetime.now(timezone.utc) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    entry.pop("modified_at")
    entry.update({"expires_at": expires, "size_vram": entry["size"]})
    return jsonify({"models": [entry]})


@bp.post("/api/show")
def show():
    body = OLLAMA_MODEL_REQUEST.load(read_json('{"model": ...}'))
    check_model(body["model"] or body["name"])
    be = current_backend()
    entry = model_entry()
    sampling = be.settings["sampling"]
    parameters = "\n".join(f"{name:<20} {value}" for name, value in [
        ("temperature", sampling["temperature"]), ("top_k", sampling["top_k"]), ("top_p", sampling["top_p"]),
        ("repeat_penalty", sampling["repetition_penalty"]), ("num_ctx", MAX_TOKEN_LEN),
        ("stop", '"<|im_end|>"')] if value is not None)
    template = be.tokenizer.chat_template
    return jsonify({
        "license": "Apache License 2.0 (Qwen2.5-1.5B-Instruct)",
        "modelfile": f"# qwen-chat serves {be.model_name} on the LLM-8850 card\nFROM {be.settings['model']['dir']}\n",
        "parameters": parameters,
        "template": template,
        "details": entry["details"],
        "model_info": {"general.architecture": "qwen2", "general.basename": "Qwen2.5",
                       "general.parameter_count": 1_543_714_304, "general.quantization_version": 2,
                       "qwen2.context_length": MAX_TOKEN_LEN, "qwen2.block_count": 28,
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
    body = OLLAMA_MODEL_REQUEST.load(read_json('{"model": ...}'))
    check_model(body["model"] or body["name"])
    return jsonify({"status": "success"})


@bp.route("/api/<any(create, copy, delete, push, embed, embeddings, blobs):what>", methods=["POST", "DELETE", "HEAD"])
def unsupported(what):
    raise APIError(501, f"/api/{what} is not supported by this server: it serves one fixed model on the NPU card")


@bp.route("/", methods=["GET", "HEAD"])
def root():
    return Response("Ollama is running", mimetype="text/plain")
