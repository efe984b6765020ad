"""The OpenAI-compatible API: /v1/chat/completions (tools included), /v1/completions, /v1/models (and the same
without /v1: app/__init__.py). Each view parses its body (openai_format.py), prepares it (prepare.py) and serves
it (serve.py) with its writer (openai_writers.py)."""
from flask import Blueprint, jsonify, request

from app.backend import current_backend
from app.bodies import read_body
from app.openai_format import chat_request, completion_request, include_usage
from app.openai_writers import ChatWriter, CompletionWriter
from app.prepare import prepare
from app.requestlog import note_prompt
from app.schemas import CHAT_COMPLETION_REQUEST, COMPLETION_REQUEST
from app.serve import serve

bp = Blueprint("openai", __name__, url_prefix="/v1")


@bp.post("/chat/completions")
def chat_completions():
    raw, body = read_body(CHAT_COMPLETION_REQUEST, '{"model": ..., "messages": [{"role": "user", "content": ...}]}')
    chat = chat_request(raw, body)
    note_prompt(next((m["content"] for m in reversed(chat.messages) if m["role"] in ("user", "tool")), ""))
    backend = current_backend()
    prepared = prepare(backend, chat, request.headers)
    writer = ChatWriter(backend.model_name, backend.fingerprint, backend.window, include_usage(body), chat.progress,
                        tools_offered=bool(prepared.tool_names))
    return serve(prepared, writer, chat.stream, progress=chat.progress)


@bp.post("/completions")
def completions():
    _, body = read_body(COMPLETION_REQUEST, '{"model": ..., "prompt": ...}')
    completion = completion_request(body)
    backend = current_backend()
    prepared = prepare(backend, completion, request.headers)
    note_prompt(completion.text if completion.text is not None else backend.tokenizer.decode(prepared.prompt_ids))
    echo = backend.tokenizer.decode(prepared.prompt_ids) if body["echo"] else ""
    writer = CompletionWriter(backend.model_name, backend.fingerprint, backend.window, include_usage(body),
                              completion.progress, echo=echo)
    return serve(prepared, writer, completion.stream, progress=completion.progress)


# -- models ------------------------------------------------------------------------------------------------
def model_object():
    backend = current_backend()
    # max_model_len as vLLM reports it: the window is what clients most need to know about this card.
    return {"id": backend.model_name, "object": "model", "created": backend.created, "owned_by": "qwen-chat",
            "max_model_len": backend.window}


@bp.get("/models")
def list_models():
    return jsonify({"object": "list", "data": [model_object()]})


@bp.get("/models/<path:model_id>")
def get_model(model_id):
    current_backend().check_model(model_id)
    return jsonify(model_object())
