"""Hostile by default: errors, /health, metrics and logs carry counts, never anyone's text; client-controlled
strings cannot forge log lines or mint metric series; broken Unicode is a 400; a runner that hangs while idle
is noticed and replaced before a person needs it. Real gunicorn, real emulated runner."""
import json
import logging
import os
import signal
import socket
from pathlib import Path

import httpx
import pytest

from tests.helpers import MODEL, alive, answer_to, chat, wait_for

PRIVATE = "PRIVATE-5n7q9 count to 20"


def test_a_stalled_runner_leaks_no_ones_text(start_server, tmp_path):
    fault = tmp_path / "fault"
    fault.write_text("hang:6")
    server = start_server(runner={"emulator": {"fault_file": str(fault)}, "stall_timeout": 1,
                                  "backoff_initial": 0.1, "backoff_max": 0.2})
    seen = []
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": PRIVATE}]}
    for _ in range(3):  # three stalls in a row: the card is declared unavailable, with a reason
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json=body) as response:
            seen.append(response.read().decode())
        assert '"code":"stalled"' in seen[-1], seen[-1]
        wait_for(lambda: server.health()[1]["details"]["model"] != "loading" or
                 server.health()[1]["details"]["npu"] == "unavailable", what="a settled card")
    wait_for(lambda: server.health()[1]["details"]["npu"] == "unavailable", what="unavailable")
    bystander = chat(server, "someone else")
    assert bystander.status_code == 503
    seen += [json.dumps(server.health()[1]), bystander.text, server.log()]
    answer = answer_to(PRIVATE)
    for text in seen:
        assert "PRIVATE-5n7q9" not in text
        assert answer[:40] not in text and "You said" not in text
    assert "unaccounted output" in seen[0]  # the error still says what happened, in counts


def test_log_lines_cannot_be_forged(client, caplog):
    caplog.set_level(logging.INFO)
    forged = "2026-01-01 00:00:00,000 INFO qwen_chat.requests: id=FORGED GET / status=200"
    with client.get("/v1/models/x%0a" + forged.replace(" ", "%20")) as response:
        assert response.status_code == 404  # the log line is written when the response closes
    client.open("/v1/models%0d%0aINJECTED", method="GET").close()
    messages = [record.getMessage() for record in caplog.records]
    assert messages and not any("\n" in m or "\r" in m for m in messages if "FORGED" in m or "INJECTED" in m)
    line = next(m for m in messages if "FORGED" in m)
    assert "x\\n2026-01-01" in line  # escaped, on the request's own line


def test_made_up_methods_and_statuses_mint_no_series(client):
    def series():
        return [row for row in client.get("/metrics").get_data(as_text=True).splitlines()
                if row.startswith("qwen_chat_requests_total{")]
    before = len(series())
    for i in range(40):
        client.open("/v1/models", method=f"M{i}XYZ").close()
        client.open(f"/made/up/{i}", method="GET").close()
    after = series()
    assert len(after) <= before + 3  # at most: other-method 405s, unmatched 404s, and one more status
    assert any('method="other"' in row for row in after)
    assert not any("XYZ" in row or "/made/up" in row for row in after)


SURROGATE = "a\\ud800b"  # a JSON escape for a lone surrogate


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"model": "qwen2.5", "prompt": "%s"}' % SURROGATE),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "x"}]}' % SURROGATE),
    ("/v1/chat/completions", '{"model": "qwen2.5", "messages": [{"role": "user", "content": "%s"}]}' % SURROGATE),
    ("/api/generate", '{"model": "qwen2.5", "prompt": "%s", "raw": true, "stream": false}' % SURROGATE),
    ("/api/chat", '{"model": "%s", "messages": [{"role": "user", "content": "x"}]}' % SURROGATE),
    ("/api/show", '{"model": "%s"}' % SURROGATE),
    ("/v1/chat/completions", '{"model": "qwen2.5", "messages": [{"role": "user", "content": "x"}], "%s": 1}'
     % SURROGATE),
])
def test_lone_surrogates_are_a_clear_400(client, path, body):
    response = client.post(path, data=body.encode(), content_type="application/json")
    assert response.status_code == 400, response.data
    error = response.get_json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert "surrogate" in message


def test_broken_percent_escapes_in_a_path_are_a_404(client):
    assert client.get("/v1/models/x%ED%A0%80").status_code == 404
    assert chat(client, "ok").status_code == 200


def test_a_runner_that_hangs_while_idle_is_replaced_before_anyone_waits(start_server):
    server = start_server(runner={"idle_probe_seconds": 0.3, "backoff_initial": 0.1})
    (runner,) = server.runner_pids()
    os.kill(runner, signal.SIGSTOP)  # hung at its prompt: it prints nothing, as a wedged card driver would
    wait_for(lambda: server.health()[0] == 503, timeout=20, what="/health to notice")
    assert "did not answer at its prompt" in server.health()[1]["details"]["last_error"]
    wait_for(lambda: server.health()[0] == 200, timeout=20, what="a new runner")
    assert not alive(runner) and server.runner_pids() != [runner]
    assert chat(server, "after the hang").json()["choices"][0]["message"]["content"] == answer_to("after the hang")


def half_closing_request(server, body):
    """Send a request, shut down the sending side (as some clients and proxies do), read the whole answer."""
    port = server.port
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return head.decode(), rest


def test_a_client_that_only_stopped_sending_still_gets_its_answer(start_server):
    server = start_server(runner={"emulator": {"token_ms": 10}})  # slow enough for the probe to look, often
    question = "half closed, count to 40"
    head, body = half_closing_request(server, {"model": MODEL, "messages": [{"role": "user", "content": question}]})
    assert head.startswith("HTTP/1.1 200")
    assert json.loads(body)["choices"][0]["message"]["content"] == answer_to(question)
    head, body = half_closing_request(server, {"model": MODEL, "stream": True,
                                               "messages": [{"role": "user", "content": question}]})
    assert head.startswith("HTTP/1.1 200") and b"data: [DONE]" in body
    assert b'"finish_reason":"stop"' in body


def test_a_web_page_elsewhere_cannot_spend_the_cards_time(client):
    # A text/plain POST needs no CORS preflight: any page a visitor opens could send one. Browsers say where it
    # comes from; only this host (the chat page) and server.cors_origins may.
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "from a page"}]})
    foreign = client.post("/v1/chat/completions", data=body, content_type="text/plain",
                          headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and foreign.get_json()["error"]["code"] == "origin_not_allowed"
    ollama = client.post("/api/generate", data=body, headers={"Origin": "https://evil.example"})
    assert ollama.status_code == 403 and isinstance(ollama.get_json()["error"], str)
    own = client.post("/v1/chat/completions", data=body, content_type="text/plain",
                      headers={"Origin": "http://localhost:8080", "Host": "localhost"})
    assert own.status_code == 200  # the chat page, here behind nginx on another port
    assert client.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200  # unreadable
    assert client.post("/v1/chat/completions", data=body).status_code == 200  # not a browser: no Origin


def test_a_broken_chunked_body_is_a_400(start_server):
    server = start_server()
    port = server.port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


# -- what one request may cost ---------------------------------------------------------------------------------
def chat_of(count):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(count)] + \
        [{"role": "user", "content": "last"}]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat", "/tokenize"])
def test_more_messages_or_tools_than_the_limits_is_a_400_that_names_the_limit(server, path):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for body, field, count, key in [({"messages": chat_of(10_000)}, "messages", "10,001", "context.max_messages"),
                                    ({"messages": chat_of(1), "tools": [tool] * 3000}, "tools", "3,000",
                                     "context.max_tools")]:
        response = httpx.post(server.url + path, json={"model": MODEL, "stream": False, **body}, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        message = error if isinstance(error, str) else error["message"]
        assert f"has {count} " in message and key in message
        if not isinstance(error, str):
            assert error["param"] == field and error["code"] == f"too_many_{field}"
    # Within the limits, a long chat is answered (its oldest turns left out).
    response = httpx.post(server.url + path, json={"model": MODEL, "stream": False, "messages": chat_of(1999)},
                          timeout=60)
    assert response.status_code == 200, response.text


def test_request_threads_give_way_to_the_tokenizer_service_and_the_card(start_server):
    # A hostile request costs its pool thread CPU; the runner's 1 s deadline depends on the tokenizer service
    # getting the core first (app/http_worker.py), so the threads that serve requests run at a lower priority.
    server = start_server()
    for _ in range(3):
        assert chat(httpx.Client(base_url=server.url), "hello").status_code == 200
    [worker] = server.worker_pids()
    threads = {int(task.name): os.getpriority(os.PRIO_PROCESS, int(task.name))  # Linux: per thread
               for task in Path(f"/proc/{worker}/task").iterdir()}
    assert threads.pop(worker) == 0  # the event loop
    assert 5 in threads.values()  # the pool threads that served the requests
    assert 0 in threads.values()  # the card thread
    for pid in [*server.tokenizer_service_pids(), *server.runner_pids()]:
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0
