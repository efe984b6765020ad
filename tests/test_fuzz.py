"""Property-based fuzzing of request bodies and headers, both APIs: never a 5xx, never a traceback, always
the API's error shape, and the runner keeps answering."""
import json
import socket

import httpx
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.helpers import MODEL

TEXT = st.text(max_size=40)
SCALARS = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)

ROLES = st.sampled_from(["system", "user", "assistant", "tool", "developer", "bot", "", None, 3])
CONTENT = TEXT | st.none() | st.integers() | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", None]), "text": TEXT | st.integers()}),
    max_size=3)
MESSAGE = st.fixed_dictionaries({"role": ROLES}, optional={
    "content": CONTENT, "tool_calls": JSON, "tool_call_id": TEXT | st.none(), "name": TEXT, "images": JSON})
TOOL = st.fixed_dictionaries({"type": st.sampled_from(["function", "x"])}, optional={
    "function": st.fixed_dictionaries({"name": st.sampled_from(["get_weather", "bad name", ""])},
                                      optional={"parameters": JSON, "description": TEXT})})
COMMON = {
    "model": st.sampled_from([MODEL, "Qwen2.5-1.5B-Instruct", "gpt-4", "", None, 7]),
    "stream": st.booleans() | JSON, "max_tokens": st.integers(-5, 2000) | JSON, "stop": JSON | TEXT,
    "temperature": SCALARS, "top_p": SCALARS, "seed": SCALARS, "n": st.integers(-1, 3),
    "stream_options": JSON, "user": JSON, "logprobs": JSON, "response_format": JSON, "extra": JSON,
}
CHAT = st.fixed_dictionaries({}, optional={
    **COMMON, "messages": st.lists(MESSAGE, max_size=4) | JSON, "tools": st.lists(TOOL, max_size=2) | JSON,
    "tool_choice": JSON | st.sampled_from(["auto", "none", "required"]), "max_completion_tokens": JSON})
COMPLETION = st.fixed_dictionaries({}, optional={
    **COMMON, "prompt": TEXT | st.lists(st.integers(-3, 200000), max_size=5) | JSON, "echo": JSON, "suffix": JSON})
OLLAMA_OPTIONS = st.fixed_dictionaries({}, optional={
    "num_predict": st.integers(-3, 2000) | JSON, "num_ctx": st.integers(-3, 5000) | JSON, "stop": JSON,
    "temperature": SCALARS})
OLLAMA_CHAT = st.fixed_dictionaries({}, optional={
    "model": COMMON["model"], "messages": st.lists(MESSAGE, max_size=4) | JSON, "stream": JSON,
    "options": OLLAMA_OPTIONS | JSON, "format": JSON, "tools": st.lists(TOOL, max_size=2) | JSON,
    "keep_alive": JSON, "think": JSON})
OLLAMA_GENERATE = st.fixed_dictionaries({}, optional={
    "model": COMMON["model"], "prompt": TEXT | JSON, "system": JSON, "raw": JSON, "context": JSON,
    "options": OLLAMA_OPTIONS | JSON, "stream": JSON, "images": JSON, "template": JSON, "suffix": JSON})
ENDPOINTS = st.sampled_from([("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION),
                             ("/api/chat", OLLAMA_CHAT), ("/api/generate", OLLAMA_GENERATE),
                             ("/api/show", st.fixed_dictionaries({}, optional={"model": JSON, "name": JSON}))])
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "", "application/json; charset=latin-1"])


def check(path, status, data, content_type):
    assert status < 500, (path, status, data[:500])
    assert b"Traceback" not in data
    if status >= 400 and status != 499:
        body = json.loads(data)
        if path.startswith("/api/"):
            assert set(body) == {"error"} and isinstance(body["error"], str)
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
def test_bodies_and_headers_through_the_app(client, data):
    path, strategy = data.draw(ENDPOINTS)
    body = data.draw(strategy | JSON)
    raw = data.draw(st.sampled_from(["json", "bytes", "truncated"]))
    payload = json.dumps(body).encode()
    if raw == "bytes":
        payload = data.draw(st.binary(max_size=64))
    elif raw == "truncated":
        payload = payload[:max(1, len(payload) // 2)]
    content_type = data.draw(CONTENT_TYPES)
    headers = {"Authorization": data.draw(st.sampled_from(["", "Bearer x", "Basic y", "Bearer"])),
               "X-Request-Id": data.draw(st.from_regex(r"[A-Za-z0-9 <>]{0,20}", fullmatch=True))}
    response = client.post(path, data=payload, content_type=content_type, headers=headers)
    check(path, response.status_code, response.get_data(), content_type)
    response.close()


def test_the_runner_still_answers_after_the_fuzz(client):
    body = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "still there?"}]}).get_json()
    assert body["choices"][0]["message"]["content"].endswith('"still there?"')


HEADER_VALUE = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c not in b"\r\n"))


def raw_request(url, path, headers, body):
    """One request as raw bytes (any header value, any body), read to the end: (status, body bytes)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    head = b"POST %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nContent-Length: %d\r\n" % (
        path.encode(), host.encode(), len(body))
    head += b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    head, _, payload = rest.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        payload = b""  # a stream: its status is what matters here
    return int(status_line.split()[1]), payload


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ENDPOINTS.flatmap(lambda e: st.tuples(st.just(e[0]), e[1])),
       st.lists(st.tuples(st.sampled_from([b"Content-Type", b"Authorization", b"X-Request-Id", b"Accept",
                                           b"Origin", b"X-Anything", b"Expect"]), HEADER_VALUE), max_size=4))
def test_bodies_and_headers_through_gunicorn(server, endpoint, headers):
    path, body = endpoint
    status, payload = raw_request(server.url, path, headers, json.dumps(body).encode())
    assert status < 500, (status, payload[:300])
    assert b"Traceback" not in payload
    if status >= 400 and payload.startswith(b"{"):
        check(path, status, payload, "")
    after = httpx.post(server.url + "/api/generate", json={"model": MODEL, "prompt": "ok?", "stream": False},
                       timeout=30)
    assert after.status_code == 200 and after.json()["response"].endswith('"ok?"')


def test_absurdly_nested_bodies_are_400s(client):
    # Regression: json.loads raises RecursionError (not ValueError) past ~1000 levels: that was a 500.
    for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show"):
        response = client.post(path, data=b"[" * 50000 + b"]" * 50000, content_type="application/json")
        check(path, response.status_code, response.get_data(), "application/json")
        assert response.status_code == 400
    # Deep, but parseable: the chat template's tojson cannot render it.
    deep = "[" * 950 + '"x"' + "]" * 950  # written out: encoding it here would hit the same limit
    body = ('{"model": "qwen2.5", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
            '"function": {"name": "deep", "parameters": {"type": "object", "deep": ' + deep + '}}}]}')
    response = client.post("/v1/chat/completions", data=body, content_type="application/json")
    # Which limit is hit first (the parser's or the template's) depends on how deep the stack already is.
    check("/v1/chat/completions", response.status_code, response.get_data(), "application/json")
    assert response.status_code == 400
