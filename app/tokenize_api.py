"""Count before you send: POST /tokenize and POST /detokenize, in vLLM's shapes and llama.cpp's.

With a 1024-token window and ~70 ms per prompt token, a client wants to know what a prompt costs before the
card spends its time on it. The ids are exactly the ones the card would be fed (the same tokenizer and chat
template; a conversation is not fitted to the window here: `count` says whether it fits).
"""
from flask import Blueprint, jsonify

from app.backend import current_backend
from app.bodies import read_body
from app.errors import APIError
from app.openai_format import chat_ending, template_messages
from app.schemas import DETOKENIZE_REQUEST, TOKENIZE_REQUEST

bp = Blueprint("tokenize", __name__)


@bp.post("/tokenize")
def tokenize():
    """vLLM: `prompt` (raw text) or `messages` (the chat template applied: add_generation_prompt,
    continue_final_message, tools) -> count, max_model_len, tokens[, token_strs]. llama.cpp: `content`
    -> tokens (with_pieces: [{id, piece}])."""
    raw, body = read_body(TOKENIZE_REQUEST, '{"prompt": ...} or {"messages": [...]}')
    backend = current_backend()
    backend.check_model(body["model"])
    tokenizer = backend.tokenizer
    if body["content"] is not None:  # llama.cpp's shape
        ids = tokenizer.encode(body["content"])
        if body["with_pieces"]:
            return jsonify({"tokens": [{"id": i, "piece": tokenizer.decode([i])} for i in ids]})
        return jsonify({"tokens": ids})
    if body["messages"] is not None:
        try:
            ids = tokenizer.chat_ids(template_messages(body["messages"]), raw.get("tools") or None,
                                     ending=chat_ending(body))
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
    else:
        ids = tokenizer.encode(body["prompt"])
    out = {"count": len(ids), "max_model_len": backend.window, "tokens": ids, "token_strs": None}
    if body["return_token_strs"]:
        out["token_strs"] = tokenizer.token_strings(ids)
    return jsonify(out)


@bp.post("/detokenize")
def detokenize():
    """`tokens` -> the text: vLLM calls it `prompt`, llama.cpp `content`; both are there."""
    _, body = read_body(DETOKENIZE_REQUEST, '{"tokens": [...]}')
    backend = current_backend()
    backend.check_model(body["model"])
    tokenizer = backend.tokenizer
    bad = next((i for i in body["tokens"] if not tokenizer.valid_id(i)), None)
    if bad is not None:
        raise APIError(400, f"Token id {bad} is outside the vocabulary.", param="tokens")
    text = tokenizer.decode(body["tokens"])
    return jsonify({"prompt": text, "content": text})
