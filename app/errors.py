"""Errors as clients expect them: OpenAI's `{"error": {"message", "type", "param", "code"}}` on /v1 and
everywhere else, Ollama's `{"error": "..."}` on /api. Never a traceback, never an HTML page."""
import logging

from flask import jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from app.config import field_problems
from app.text import printable, traceback_without_message

log = logging.getLogger(__name__)

# OpenAI's error types by HTTP status, for errors that do not name one.
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status, message, type=None, param=None, code=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or TYPES.get(status, "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self):
        return {"error": self.message}


class ModelNotFound(APIError):
    """A model this server does not serve, in each API's words (Ollama's clients pull a model on its "not found")."""

    def __init__(self, name, served):
        super().__init__(404, f"The model `{name}` does not exist. This server serves `{served}`.", param="model",
                         code="model_not_found")
        self.name = name

    def ollama_body(self):
        return {"error": f'model "{self.name}" not found, try pulling it first'}


def validation_error(exc: ValidationError):
    """marshmallow's nested messages -> one 400 naming every bad field ("param" is the first)."""
    problems = list(field_problems(exc.messages))
    message = "; ".join(f"{path}: {text.rstrip('.')}" if path else text.rstrip(".") for path, text in problems)
    message = f"Invalid request: {message}."
    return APIError(400, message, param=problems[0][0] or None if problems else None)


def is_ollama_path(path):
    """Ollama's clients read errors on /api/... in Ollama's shape; everyone else reads OpenAI's."""
    return path == "/api" or path.startswith("/api/")


def uses_ollama_shape():
    return request.blueprint == "ollama" or is_ollama_path(request.path)


def error_response(error: APIError):
    body = error.ollama_body() if uses_ollama_shape() else error.openai_body()
    response = jsonify(body)
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def register_error_handlers(app):
    @app.errorhandler(APIError)
    def api_error(error):
        return error_response(error)

    @app.errorhandler(ValidationError)
    def bad_fields(error):
        return error_response(validation_error(error))

    @app.errorhandler(HTTPException)
    def http_error(error):
        status = error.code or 500
        if status == 404:
            message = f"Unknown request URL: {request.method} {request.path}."
            code = "unknown_url"
        elif status == 405:
            message = f"Method {request.method} is not allowed for {request.path}."
            code = "method_not_allowed"
        elif status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"The request body is larger than this server accepts ({limit} bytes)."
            code = "request_too_large"
        else:
            message, code = error.description or error.name, None
        headers = {"Allow": ", ".join(error.valid_methods)} if getattr(error, "valid_methods", None) else None
        return error_response(APIError(status, message, code=code, headers=headers))

    @app.errorhandler(Exception)
    def unexpected(error):
        log.error("unhandled error on %s %s\n%s", printable(request.method), printable(request.path),
                  traceback_without_message(error))
        return error_response(APIError(500, "The server had an error while processing your request.",
                                       code="internal_error"))
