"""Slow, silent and pipelining clients against a real gunicorn (and a real nginx): a request costs a thread only
once it has arrived whole (app/http_worker.py)."""
import json
import select
import socket
import subprocess
import threading
import time

import httpx
import pytest

from tests.helpers import answer_to, chat, said, sse_events, wait_for

TIMEOUT = 4  # server.request_timeout in these tests: short, so the tests are quick
# Fewer threads than there are slow clients below, so that any slow client holding a thread would show.
SMALL = {"request_timeout": TIMEOUT, "threads": 8, "max_queue": 4}
BODY = json.dumps({"model": "qwen2.5", "messages": [{"role": "user", "content": "slowly"}]}).encode()


def head(path="/v1/chat/completions", length=None, extra=()):
    length = len(BODY) if length is None else length
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json", f"Content-Length: {length}",
             *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def address(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


class Dribbler:
    """A client that sends `first` at once, then the rest a byte every `pace` seconds, in its own thread,
    until the server answers and closes (or `give_up` seconds pass). It keeps the answer and when it came."""

    def __init__(self, url, first, rest=b"", pace=0.5, give_up=3 * TIMEOUT):
        self.sock = socket.create_connection(address(url))
        self.first, self.rest, self.pace, self.give_up = first, rest, pace, give_up
        self.sent = 0
        self.answer = b""
        self.answered_at = self.closed_at = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        deadline = time.monotonic() + self.give_up
        sending = True
        try:
            if self.first:
                self.sock.sendall(self.first)
            while time.monotonic() < deadline:
                if sending and self.sent < len(self.rest):
                    try:
                        self.sock.send(self.rest[self.sent:self.sent + 1])
                        self.sent += 1
                    except OSError:
                        sending = False
                if select.select([self.sock], [], [], self.pace)[0]:
                    data = self.sock.recv(65536)
                    if not data:
                        self.closed_at = time.monotonic()
                        return
                    self.answer += data
                    self.answered_at = self.answered_at or time.monotonic()
        except OSError:
            self.closed_at = time.monotonic()
        finally:
            self.sock.close()

    def join(self):
        self.thread.join(self.give_up + 5)
        return self

    @property
    def status(self):
        return int(self.answer.split(b" ", 2)[1]) if self.answer else None

    @property
    def headers(self):
        return self.answer.split(b"\r\n\r\n", 1)[0].decode().lower()

    def json(self):
        return json.loads(self.answer.split(b"\r\n\r\n", 1)[1])


def read_responses(sock, count, timeout=30):
    """`count` whole responses (with Content-Length) from a socket, in order: [(status, headers, body)]."""
    sock.settimeout(timeout)
    data, responses = b"", []
    while len(responses) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            lines = data[:end].decode().split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            length = int(headers.get("content-length", 0))
            if len(data) >= end + 4 + length:
                responses.append((int(lines[0].split()[1]), headers, data[end + 4:end + 4 + length]))
                data = data[end + 4 + length:]
                continue
        more = sock.recv(65536)
        assert more, f"closed after {len(responses)} responses"
        data += more
    return responses


def test_clients_dribbling_heads_and_bodies_hold_no_thread(start_server):
    server = start_server(server=SMALL)
    # Twice as many slow clients as threads: a byte every half second, a head or a body.
    heads = [Dribbler(server.url, b"", head() + BODY) for _ in range(8)]
    bodies = [Dribbler(server.url, head(), BODY) for _ in range(8)]
    slow = heads + bodies
    wait_for(lambda: all(d.sent >= 2 for d in slow), 10, "every slow client under way")

    health = httpx.get(server.url + "/health", timeout=2 * TIMEOUT)
    reply = server.post("/v1/chat/completions", json={"model": "qwen2.5", "messages": [
        {"role": "user", "content": "hi"}]}, timeout=2 * TIMEOUT)
    answered = time.monotonic()
    assert health.status_code == 200 and reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == said("hi")

    for dribbler in slow:
        dribbler.join()
        # Answered at the deadline, not served: 408 in OpenAI's shape, then the connection closes.
        assert dribbler.status == 408, dribbler.answer
        assert "connection: close" in dribbler.headers
        assert dribbler.json()["error"]["code"] == "request_timeout"
        assert dribbler.closed_at is not None
        assert answered < dribbler.answered_at
    assert server.metric("qwen_chat_requests_refused_total", status="408") == len(slow)
    assert server.metric("qwen_chat_requests_total", method="POST") == 1  # only the chat reached the app


def test_ollama_paths_get_ollamas_error_shape(start_server):
    server = start_server(server=SMALL)
    dribbler = Dribbler(server.url, head("/api/chat"), BODY).join()
    assert dribbler.status == 408
    assert dribbler.json() == {"error": f"The request did not arrive whole within {TIMEOUT} seconds."}


def test_a_silent_connection_is_closed_without_holding_a_thread(start_server):
    server = start_server(server=SMALL)
    silent = [socket.create_connection(address(server.url)) for _ in range(20)]
    opened = time.monotonic()
    # Answered while the silent connections are open, though they outnumber the threads.
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    assert time.monotonic() < opened + TIMEOUT
    for sock in silent:
        sock.settimeout(3 * TIMEOUT)
        assert sock.recv(1024) == b""  # closed at the deadline, with nothing to answer
        sock.close()
    assert server.metric("qwen_chat_requests_refused_total", status="408") == 0


def test_too_many_partial_requests_at_once_get_503(start_server):
    server = start_server(server={**SMALL, "max_partial_requests": 4})
    slow = [Dribbler(server.url, head("/api/chat")[:30], head("/api/chat")[30:], pace=1) for _ in range(5)]
    wait_for(lambda: any(d.closed_at for d in slow), 2 * TIMEOUT, "one slow client turned away")
    # Requests that arrive whole are still served meanwhile.
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200
    for dribbler in slow:
        dribbler.join()
    refused = [d for d in slow if d.status == 503]
    assert len(refused) == 1, [d.answer for d in slow]
    assert "retry-after: 1" in refused[0].headers and "connection: close" in refused[0].headers
    assert "try again" in refused[0].json()["error"] and refused[0].closed_at is not None
    assert sorted(d.status for d in slow) == [408, 408, 408, 408, 503]
    assert refused[0].answered_at < min(d.answered_at for d in slow if d is not refused[0])


def test_expect_100_continue_is_answered_at_once(start_server):
    server = start_server(server=SMALL)
    body = json.dumps({"model": "qwen2.5", "messages": [{"role": "user", "content": "hi"}], "user": "x" * 5000})
    # curl would wait 30 s for the 100 before sending its body: beyond the server's deadline.
    done = subprocess.run(["curl", "-sv", "--expect100-timeout", "30", "-H", "Expect: 100-continue",
                           "-H", "Content-Type: application/json", "--data-binary", "@-",
                           server.url + "/v1/chat/completions"], input=body, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["choices"][0]["message"]["content"] == said("hi")
    assert done.stderr.count("< HTTP/1.1 100 Continue") == 1 and "< HTTP/1.1 200 OK" in done.stderr


@pytest.mark.parametrize("expect", [False, True])
def test_a_body_over_the_limit_is_refused_without_being_read(start_server, expect):
    server = start_server(server={**SMALL, "max_body_bytes": 4096})
    with socket.create_connection(address(server.url)) as sock:
        sock.sendall(head(length=1 << 20, extra=["Expect: 100-continue"] if expect else []))
        [(status, headers, body)] = read_responses(sock, 1, timeout=2 * TIMEOUT)
        # No 100 Continue before it: the client need not send the body at all.
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "request_too_large"
        assert sock.recv(1024) == b""


def test_keep_alive_and_pipelining(start_server):
    server = start_server(server=SMALL)
    models = b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n"
    with socket.create_connection(address(server.url)) as sock:
        # Three requests in one write, the third only in part; its rest later, then one more.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n" + head() + BODY + models[:10])
        first = read_responses(sock, 2)
        sock.sendall(models[10:])
        second = read_responses(sock, 1)
        sock.sendall(head() + BODY)
        third = read_responses(sock, 1)
    statuses = [status for status, _, _ in first + second + third]
    assert statuses == [200, 200, 200, 200]
    assert json.loads(first[1][2])["choices"][0]["message"]["content"] == said("slowly")
    assert json.loads(second[0][2])["data"][0]["object"] == "model"
    assert all(headers["connection"] == "keep-alive" for _, headers, _ in first + second + third)


def test_a_chunked_body_is_read_whole(start_server):
    server = start_server(server={**SMALL, "max_body_bytes": 4096})

    def pieces(text):
        yield text[:7]
        yield text[7:]

    reply = httpx.post(server.url + "/v1/chat/completions", content=pieces(BODY),
                       headers={"Content-Type": "application/json"}, timeout=10)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == said("slowly")
    too_big = httpx.post(server.url + "/v1/chat/completions", content=pieces(b"x" * 8192),
                         headers={"Content-Type": "application/json"}, timeout=10)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"


# -- behind nginx --------------------------------------------------------------------------------------------
SHORT_NGINX = {"client_header_timeout 10s;": "client_header_timeout 2s;",
               "client_body_timeout 10s;": "client_body_timeout 2s;"}


def test_nginx_passes_a_slow_body_on_only_once_it_is_whole(start_server, nginx):
    server = start_server(server={**SMALL, "request_timeout": 2})
    front = nginx(server.port, replace=SHORT_NGINX)
    # Slower in all than the service allows (2 s), but never pausing as long as nginx allows (2 s).
    dribbler = Dribbler(front.url, head(), BODY, pace=0.05)
    assert httpx.get(front.url + "/health", timeout=TIMEOUT).status_code == 200
    arriving = []

    def body_sent():
        arriving.append(server.metric("qwen_chat_requests_arriving"))
        return dribbler.sent == len(BODY)

    wait_for(body_sent, 30, "the whole body sent")
    dribbler.join()
    assert dribbler.status == 200, dribbler.answer
    assert dribbler.json()["choices"][0]["message"]["content"] == said("slowly")
    # The service never saw the request in part: nginx sent it whole.
    assert len(arriving) > 10 and set(arriving) == {0.0}
    assert server.metric("qwen_chat_requests_refused_total", status="408") == 0


def test_nginx_drops_a_stalled_request_before_the_service_sees_it(start_server, nginx):
    server = start_server(server=SMALL)
    front = nginx(server.port, replace=SHORT_NGINX)
    stalled = [Dribbler(front.url, head()[:40]), Dribbler(front.url, head() + BODY[:10])]
    assert httpx.get(front.url + "/health", timeout=TIMEOUT).status_code == 200
    arriving = []

    def dropped():
        arriving.append(server.metric("qwen_chat_requests_arriving"))
        return all(d.closed_at for d in stalled)

    wait_for(dropped, 3 * TIMEOUT, "nginx to drop both stalled clients")
    assert [d.status for d in stalled] == [None, None], [d.answer for d in stalled]
    assert len(arriving) > 10 and set(arriving) == {0.0}
    with pytest.raises(KeyError):  # no POST ever reached the app
        server.metric("qwen_chat_requests_total", method="POST")


def test_running_out_of_descriptors_sheds_idle_connections_and_never_kills_the_worker(start_server):
    # Regression: with the descriptor limit reached by idle connections, gunicorn's accept() raised EMFILE and
    # the worker died, with the runner and every generation. 40 descriptors here (the worker uses 13 idle).
    server = start_server(nofile=40, runner={"emulator": {"token_ms": 20}})
    (worker,) = server.worker_pids()
    streamed = []
    stream = threading.Thread(target=lambda: streamed.append(httpx.post(server.url + "/v1/chat/completions", json={
        "model": "qwen2.5", "stream": True, "messages": [{"role": "user", "content": "count to 60"}]}, timeout=60)))
    stream.start()
    server.wait_until_busy()
    idle = [socket.create_connection(address(server.url)) for _ in range(100)]  # more than it can hold
    try:
        wait_for(lambda: server.health()[0] == 200, 30, "/health to answer")
        assert server.metric("qwen_chat_connections_shed_total") > 0
        assert chat(server, "still serving").json()["choices"][0]["message"]["content"] == said("still serving")
        stream.join(60)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(streamed[0].text)
                       if isinstance(e, dict) and e.get("choices"))
        assert text == answer_to("count to 60")  # held, served whole
        assert server.worker_pids() == [worker]  # the same worker, alive
    finally:
        for sock in idle:
            sock.close()
    assert "out of file descriptors" in server.log()
