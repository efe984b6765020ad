"""Ollama's native API (its docs/api.md) over the same card: /api/chat, /api/generate, /api/tags, /api/show,
/api/ps, /api/version, /api/pull. Each generating view parses its body (ollama_format.py), prepares it
(prepare.py) and serves it (serve.py) with its writer (ollama_writers.py)."""
import hashlib
import time

from flask import Blueprint, jsonify, request

from app.backend import current_backend
from app.bodies import read_body
from app.errors import APIError
from app.ollama_format import chat_request, generate_request
from app.ollama_writers import OllamaWriter, iso_time
from app.prepare import prepare
from app.requestlog import note_prompt
from app.runner.card import CardState
from app.runner.protocol import LAYERS
from app.schemas import OLLAMA_CHAT_REQUEST, OLLAMA_GENERATE_REQUEST, OLLAMA_MODEL_REQUEST
from app.serve import serve

bp = Blueprint("ollama", __name__)

# The Ollama API level this server follows (clients compare it to decide what they may send).
OLLAMA_VERSION = "0.11.0"


def load_reply(model, keep_alive, **empty):
    """An empty prompt (or no messages) is how Ollama clients ask for the model to be loaded: answer at once."""
    reason = "unload" if keep_alive in (0, "0", "0s", "0m") else "load"
    return jsonify({"model": model, "created_at": iso_time(), **empty, "done": True, "done_reason": reason})


@bp.post("/api/chat")
def chat():
    raw, body = read_body(OLLAMA_CHAT_REQUEST, '{"model": ..., "messages": [{"role": "user", "content": ...}]}')
    backend = current_backend()
    backend.check_model(body["model"])
    if not body["messages"]:
        return load_reply(body["model"], body["keep_alive"], message={"role": "assistant", "content": ""})
    chat_asked = chat_request(raw, body)
    note_prompt(chat_asked.messages[-1]["content"])
    prepared = prepare(backend, chat_asked, request.headers)
    return serve(prepared, OllamaWriter(body["model"], "message"), chat_asked.stream)


@bp.post("/api/generate")
def generate():
    _, body = read_body(OLLAMA_GENERATE_REQUEST, '{"model": ..., "prompt": ...}')
    backend = current_backend()
    backend.check_model(body["model"])
    if not body["prompt"]:
        return load_reply(body["model"], body["keep_alive"], response="")
    generation = generate_request(body)
    prepared = prepare(backend, generation, request.headers)
    note_prompt(body["prompt"])
    writer = OllamaWriter(body["model"], "response",
                          extra=lambda outcome: {"context": [*prepared.prompt_ids, *outcome.result.ids]})
    return serve(prepared, writer, generation.stream)


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
    if current_backend().card.state != CardState.READY:
        return jsonify({"models": []})
    entry = model_entry()
    expires = iso_time(time.time() + 365 * 86400)
    entry.pop("modified_at")
    entry.update({"expires_at": expires, "size_vram": entry["size"]})
    return jsonify({"models": [entry]})


@bp.post("/api/show")
def show():
    _, body = read_body(OLLAMA_MODEL_REQUEST, '{"model": ...}')
    backend = current_backend()
    backend.check_model(body["model"] or body["name"])
    entry = model_entry()
    sampling = backend.settings["sampling"]
    parameters = "\n".join(f"{name:<20} {value}" for name, value in [
        ("temperature", sampling["temperature"]), ("top_k", sampling["top_k"]), ("top_p", sampling["top_p"]),
        ("repeat_penalty", sampling["repetition_penalty"]), ("num_ctx", backend.window),
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
                       "qwen2.context_length": backend.window, "qwen2.block_count": LAYERS,
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
    current_backend().check_model(body["model"] or body["name"])
    return jsonify({"status": "success"})


@bp.route("/api/<any(create, copy, delete, push, embed, embeddings, blobs):what>", methods=["POST", "DELETE", "HEAD"])
def unsupported(what):
    raise APIError(501, f"/api/{what} is not supported by this server: it serves one fixed model on the NPU card")
