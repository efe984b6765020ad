"""The chat page: `GET /` answers browsers with it and every other client with Ollama's "Ollama is running"
(Ollama clients probe `/` to find a server). The page is static files in app/static/ talking to
/v1/chat/completions with progress on, so that a person sees what the card is doing while they wait."""
from pathlib import Path

from flask import Blueprint, Response, current_app, render_template, request

from app.backend import current_backend
from app.runner import protocol

bp = Blueprint("page", __name__)

# Everything the page runs and shows comes from this service: no inline script or style, nothing fetched from
# elsewhere (a Pi on a network without internet works the same), requests only to this origin. Model text is
# sanitised before it is shown; this is the second line of defence.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self'", "connect-src 'self'",
    "manifest-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"])

# Markdown and sanitising libraries that scripts/setup takes from the npm registry (scripts/page_libraries.py);
# without them the page shows answers as plain text.
VENDOR_FILES = ("marked.esm.js", "purify.es.js")


def probe_answer():
    """What Ollama answers on `GET /`: its clients probe it to find a server."""
    return Response("Ollama is running", mimetype="text/plain")


def wants_page():
    """Browsers ask for text/html first; Ollama clients, curl and health checks send `*/*` or nothing."""
    return request.accept_mimetypes.best_match(["text/plain", "text/html"]) == "text/html"


def markdown_available():
    vendor = Path(current_app.static_folder, "vendor")
    return all((vendor / name).is_file() for name in VENDOR_FILES)


@bp.route("/", methods=["GET", "HEAD"])
def index():
    if not wants_page():
        response = probe_answer()
    else:
        # The page takes the card's facts from the service: its window, and how many tokens a streamed piece holds.
        response = current_app.make_response(render_template(
            "page.html", markdown=markdown_available(), window=current_backend().window, chunk=protocol.CHUNK_IDS))
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-cache"
    response.vary.add("Accept")  # one URL, two answers: caches must tell them apart
    return response
