"""API keys: `Authorization: Bearer <key>` on /v1/* (and its twins without /v1), /api/*, /tokenize and
/detokenize when server.api_key (or QWEN_CHAT_API_KEY) names any. /health and Ollama's `GET /` probe stay
public; CORS preflights carry no credentials."""
import hmac

from flask import current_app, request

from app.errors import APIError

PROTECTED = ("/v1/", "/api/", "/tokenize", "/detokenize", "/chat/completions", "/completions", "/models")


def _presented_key():
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def check_api_key():
    keys = current_app.config["QWEN"]["server"]["api_keys"]
    if not keys or request.method == "OPTIONS" or not request.path.startswith(PROTECTED):
        return None
    presented = _presented_key().encode()
    # Compare with every key, always, in constant time: neither timing nor early exit tells which matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if matched:
        return None
    message = ("Missing API key: send it as \"Authorization: Bearer <key>\"." if not presented
               else "Incorrect API key provided.")
    raise APIError(401, message, type="authentication_error", code="invalid_api_key",
                   headers={"WWW-Authenticate": "Bearer"})


def init_app(app):
    app.before_request(check_api_key)
