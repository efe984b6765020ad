"""CORS for browser clients, off by default: server.cors_origins lists the allowed origins ("*" for any). A
web page from anywhere else may not POST here."""
import re
from urllib.parse import urlsplit

from flask import current_app, request

from app.errors import APIError
from app.text import printable
from app.window import DECISION_HEADERS

ALLOWED_HEADERS = "Authorization, Content-Type, X-Request-Id, OpenAI-Organization, OpenAI-Project"
# The headers a preflight may ask for and get, as llama.cpp and Ollama effectively allow: what a configured
# origin's client sends (the openai JS SDK adds x-stainless-*), within sane bounds.
REQUESTED_HEADERS_RE = re.compile(r"^[A-Za-z0-9-]{1,64}(\s*,\s*[A-Za-z0-9-]{1,64}){0,49}$")
ALLOWED_METHODS = "GET, POST, HEAD, OPTIONS"
EXPOSED_HEADERS = ", ".join(["X-Request-Id", "Retry-After", *DECISION_HEADERS])


def _allowed_origin():
    origin = request.headers.get("Origin")
    origins = current_app.config["QWEN"]["server"]["cors_origins"]
    if not origin or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def same_host(origin):
    """Whether a browser's Origin is this service's own host (the chat page), whatever port nginx shows."""
    return urlsplit(origin).hostname == urlsplit(f"//{request.host}").hostname


def refuse_foreign_pages():
    """A web page on any site can make a visitor's browser POST here (a text/plain body needs no CORS
    preflight) and spend the card's time, even where the answer cannot be read. Browsers say where such a
    request comes from: a POST whose Origin is neither this host nor one of server.cors_origins is refused.
    Clients that are not browsers send no Origin and are not affected."""
    origin = request.headers.get("Origin")
    if request.method != "POST" or not origin or _allowed_origin() is not None or same_host(origin):
        return None
    raise APIError(403, f"Requests from web pages at {printable(origin[:100])} are not allowed; add the origin to "
                   "server.cors_origins to allow them.", type="permission_error", code="origin_not_allowed")


def preflight():
    """Answer a CORS preflight ourselves (no auth, no body)."""
    if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
        origin = _allowed_origin()
        if origin is None:
            return current_app.response_class(status=403)
        response = current_app.response_class(status=204)
        response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        requested = request.headers.get("Access-Control-Request-Headers", "").strip()
        response.headers["Access-Control-Allow-Headers"] = (
            requested if REQUESTED_HEADERS_RE.match(requested) else ALLOWED_HEADERS)
        response.vary.add("Access-Control-Request-Headers")
        response.headers["Access-Control-Max-Age"] = "600"
        return response
    return None


def add_headers(response):
    origin = _allowed_origin()
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if origin != "*":
            response.vary.add("Origin")
    return response


def init_app(app):
    """Register before the API key check: a preflight never carries the Authorization header."""
    app.before_request(preflight)
    app.before_request(refuse_foreign_pages)
    app.after_request(add_headers)
