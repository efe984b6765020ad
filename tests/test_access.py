"""API keys, CORS, request ids and the per-request log line."""
import logging

import ollama
import openai
import pytest

from app import create_app
from tests.helpers import MODEL, settings

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "secret question"}]}
PROTECTED = [
    ("GET", "/v1/models", None), ("GET", "/v1/models/qwen2.5", None),
    ("POST", "/v1/chat/completions", CHAT), ("POST", "/v1/completions", {"model": MODEL, "prompt": "x"}),
    ("POST", "/api/chat", {**CHAT, "stream": False}), ("POST", "/api/generate", {"model": MODEL, "prompt": "x"}),
    ("GET", "/api/tags", None), ("POST", "/api/show", {"model": MODEL}), ("GET", "/api/ps", None),
    ("GET", "/api/version", None), ("POST", "/api/pull", {"model": MODEL}),
]


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path_factory.mktemp("locked")),
                      "SETTINGS": settings(server={"api_key": ["k1", "k2-secret"],
                                                   "cors_origins": ["http://ui.example"]})})
    assert app.extensions["qwen"].card.wait_ready(60) == "ready"
    yield app.test_client()
    app.extensions["qwen"].stop()


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_every_protected_route_needs_a_key(locked, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
        response = locked.open(path, method=method, json=body, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        error = response.get_json()["error"]
        if path.startswith("/api/"):
            assert isinstance(error, str)
        else:
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    for key in ("k1", "k2-secret"):
        response = locked.open(path, method=method, json=body, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, (path, response.data)


def test_health_and_the_ollama_probe_stay_public(locked):
    assert locked.get("/health").status_code == 200
    assert locked.get("/").data == b"Ollama is running"


def test_cors_preflight_and_headers(locked):
    preflight = locked.options("/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204  # no key needed for a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://ui.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    response = locked.get("/v1/models", headers={"Origin": "http://ui.example", "Authorization": "Bearer k1"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://ui.example"
    other = locked.options("/v1/models", headers={"Origin": "http://evil.example",
                                                   "Access-Control-Request-Method": "GET"})
    assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers


def test_cors_is_off_by_default(client):
    response = client.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_request_id_is_echoed_or_made(client):
    assert client.get("/health", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    made = client.get("/health").headers["X-Request-Id"]
    assert len(made) == 32 and made != client.get("/health").headers["X-Request-Id"]
    assert client.get("/nope", headers={"X-Request-Id": "bad id <>"}).headers["X-Request-Id"] != "bad id <>"


def request_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "qwen_chat.requests"]


def test_one_log_line_per_request_without_the_prompt(client, caplog, tokenizer):
    caplog.set_level(logging.INFO, logger="qwen_chat.requests")
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    response.get_data()
    response.close()
    (line,) = request_lines(caplog)
    assert f"id={response.headers['X-Request-Id']}" in line and "POST /v1/chat/completions" in line
    assert "status=200" in line and f"prompt_tokens={len(tokenizer.chat_ids(CHAT['messages']))}" in line
    assert "completion_tokens=" in line and "completion_tokens=-" not in line
    assert "queue_wait=" in line and "ttft=" in line and "ttft=-" not in line and "duration=" in line
    assert "secret question" not in line


def test_prompts_are_logged_only_when_asked(make_app, caplog):
    caplog.set_level(logging.INFO, logger="qwen_chat.requests")
    app = make_app(server={"log_prompts": True})
    assert app.extensions["qwen"].card.wait_ready(60) == "ready"
    app.test_client().post("/v1/chat/completions", json=CHAT).close()
    assert "secret question" in request_lines(caplog)[-1]


def test_errors_are_logged_too(client, caplog):
    caplog.set_level(logging.INFO, logger="qwen_chat.requests")
    client.post("/v1/chat/completions", data=b"{bad").close()
    assert "status=400" in request_lines(caplog)[-1]


def test_real_clients_with_keys(start_server):
    server = start_server(server={"api_key": "live-key"})
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="live-key", max_retries=0)
    assert good.chat.completions.create(**CHAT).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert ollama.Client(host=server.url, headers={"Authorization": "Bearer live-key"}).list().models
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=server.url).list()
    assert caught.value.status_code == 401


def test_ignored_fields_are_named_in_the_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="qwen_chat.requests")
    body = {**CHAT, "store": False, "metadata": {"a": "b"}, "temperature": 0.1}
    client.post("/v1/chat/completions", json=body).close()
    line = request_lines(caplog)[-1]
    assert "ignored=store,metadata" in line  # temperature is known (accepted, fixed at runner start)
    client.post("/v1/chat/completions", json=CHAT).close()
    assert "ignored=" not in request_lines(caplog)[-1]
