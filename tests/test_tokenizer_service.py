"""The tokenizer HTTP service main_axcl calls, over real HTTP.

These tests call the service from the test process, which they admit as the runner would be admitted (who
else may call is tests/test_runner_peer.py's subject)."""
import http.client
import json
import os
import urllib.parse

import pytest

from app.tokenizer import build


@pytest.fixture(autouse=True)
def admitted(service):
    service.peers.admit(os.getpid())
    yield
    service.peers.dismiss(os.getpid())


def call(service, method, path, body=None, conn=None):
    parsed = urllib.parse.urlsplit(service.url)
    conn = conn or http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5)
    payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {} if payload is None else {"Content-Type": "application/json"}  # as the runner sends it
    conn.request(method, path, body=payload, headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_ids(service):
    assert call(service, "GET", "/bos_id") == (200, {"bos_id": -1})
    assert call(service, "GET", "/eos_id") == (200, {"eos_id": 151645})


def test_vendor_behaviour_for_a_plain_line(service):
    assert call(service, "POST", "/encode", {"text": "hello world"}) == (200, {"token_ids": build.CHECK_IDS})


def test_a_handle_encodes_to_the_registered_prompt(service, tokenizer):
    messages = [{"role": "system", "content": "S\nS"}, {"role": "user", "content": "a\n\nb"}]
    ids = tokenizer.chat_ids(messages)
    log = service.register(ids)
    try:
        assert "\n" not in log.handle and len(log.handle) < 80
        assert call(service, "POST", "/encode", {"text": log.handle}) == (200, {"token_ids": ids})
    finally:
        service.forget(log)
    # Once forgotten, the same line is just text again.
    status, body = call(service, "POST", "/encode", {"text": log.handle})
    assert body["token_ids"] != ids


def test_decode_chunks_are_safe_to_print(service, tokenizer):
    text = "你好，世界 🎉🎉 emoji 👨‍👩‍👧 done"
    ids = tokenizer.encode(text)
    log = service.register([1, 2, 3])
    try:
        call(service, "POST", "/encode", {"text": log.handle})
        parsed = urllib.parse.urlsplit(service.url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=5)  # kept alive
        pieces = [call(service, "POST", "/decode", {"token_ids": ids[i:i + 3]}, conn)[1]["text"]
                  for i in range(0, len(ids), 3)]
        assert "".join(pieces) == text
        assert not any("\ufffd" in piece for piece in pieces)
        assert [c.ids for c in log.calls()] == [ids[i:i + 3] for i in range(0, len(ids), 3)]
        # The closing call with all ids is recognised as possibly final.
        call(service, "POST", "/decode", {"token_ids": ids}, conn)
        assert log.calls()[-1].maybe_final
    finally:
        service.forget(log)


def test_decode_without_a_generation_is_plain(service, tokenizer):
    ids = tokenizer.encode("plain text")
    assert call(service, "POST", "/decode", {"token_ids": ids}) == (200, {"text": "plain text"})


@pytest.mark.parametrize("path, body", [
    ("/encode", {"text": 5}),
    ("/encode", b"{not json"),
    ("/encode", [1, 2]),
    ("/decode", {"token_ids": "abc"}),
    ("/decode", {"token_ids": [-1]}),
    ("/decode", {"token_ids": [10 ** 9]}),
])
def test_bad_requests_are_400(service, path, body):
    status, answer = call(service, "POST", path, body)
    assert status == 400 and "error" in answer


def test_unknown_paths_are_404(service):
    assert call(service, "GET", "/nope")[0] == 404
    assert call(service, "POST", "/nope", {})[0] == 404


def raw(service, data):
    """Send raw bytes, read until the server closes."""
    import socket
    import urllib.parse
    parsed = urllib.parse.urlsplit(service.url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=5) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("data", [
    b"garbage\r\n\r\n",
    b"POST /decode HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    b"POST /decode HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /decode HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n",
])
def test_malformed_http_is_a_400_and_a_closed_connection(service, data):
    answer = raw(service, data)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer


def test_connection_close_and_http_1_0_are_honoured(service):
    for request in (b"GET /eos_id HTTP/1.1\r\nConnection: close\r\n\r\n", b"GET /eos_id HTTP/1.0\r\n\r\n"):
        answer = raw(service, request)  # returns only because the server closed the connection
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b'{"eos_id": 151645}')


def test_wrong_method_is_405(service):
    assert call(service, "GET", "/decode")[0] == 405
