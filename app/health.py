"""GET /health: 200 when the card can take work, 503 otherwise; always public."""
from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    body, ok = current_app.extensions["qwen"].health()
    return jsonify(body), 200 if ok else 503
