"""Several cards: one service per card, all listed in nginx's upstream (docs/OPERATIONS.md, "Deployment"), with a real
nginx running nginx/qwen-chat.conf in front of two services on emulated runners."""
import os
import signal
import threading

import httpx

from tests.helpers import MODEL, alive, said, sse_events, wait_for


def served(server, method="POST", **labels):
    """Requests the service has answered with 200."""
    try:
        return server.metric("qwen_chat_requests_total", method=method, status="200", **labels)
    except KeyError:
        return 0


class Stream:
    """A streamed chat through `url` in its own thread; `events` once it has ended."""

    def __init__(self, url, text):
        self.events = None
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": text}]}
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url, body):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            self.events = sse_events(response.read())

    def text(self):
        self.thread.join(120)
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in self.events[:-1] if e["choices"])


def chat(url, text):
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": text}]})


def test_requests_go_to_the_card_with_the_fewest(start_server, nginx):
    cards = [start_server(runner={"emulator": {"token_ms": 20}}) for _ in range(2)]
    front = nginx([card.port for card in cards])
    first = Stream(front.url, "count to 80")
    wait_for(lambda: any(card.metric("qwen_chat_card_busy") for card in cards), 30, "a card generating")
    busy, free = cards if cards[0].metric("qwen_chat_card_busy") else cards[::-1]
    # While one card streams, requests go to the other, and do not wait behind the stream.
    for text in ("one", "two"):
        reply = chat(front.url, text)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == said(text)
    assert first.thread.is_alive()
    assert served(free) == 2 and served(busy) == 0
    # A second stream runs beside the first, on the other card.
    second = Stream(front.url, "count to 20")
    wait_for(lambda: all(card.metric("qwen_chat_card_busy") for card in cards), 30, "both cards generating at once")
    assert first.text().endswith(", 80.") and second.text().endswith(", 20.")


def test_a_busy_card_sends_the_request_to_the_other(start_server, nginx):
    # One request generating and one waiting fill a card's queue (max_queue 1): the next gets 503 queue_full.
    cards = [start_server(server={"max_queue": 1, "threads": 5}, runner={"emulator": {"token_ms": 20}})
             for _ in range(2)]
    front = nginx([card.port for card in cards])
    full, other = cards
    running = Stream(full.url, "count to 200")
    full.wait_until_busy()
    waiting = Stream(full.url, "count to 2")
    wait_for(lambda: full.metric("qwen_chat_queue_depth") == 1, 30, "a full queue")
    # Requests that nginx gives to the full card come back 503 and are sent again to the other one.
    for text in ("a", "b", "c", "d"):
        reply = chat(front.url, text)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == said(text)
    assert full.metric("qwen_chat_requests_total", status="503") >= 1
    assert served(other) == 4
    assert running.thread.is_alive() and waiting.thread.is_alive()
    # With every card full, the client is told to come back: the service's 503, or nginx's 502 once it has
    # counted enough 503s to leave every card out for fail_timeout (docs/OPERATIONS.md, "Deployment").
    also_running = Stream(other.url, "count to 200")
    other.wait_until_busy()
    also_waiting = Stream(other.url, "count to 2")
    wait_for(lambda: other.metric("qwen_chat_queue_depth") == 1, 30, "every queue full")
    for _ in range(4):
        reply = chat(front.url, "e")
        assert reply.status_code in (502, 503) and "retry-after" in reply.headers
        assert reply.json()["error"]["code"] in ("queue_full", "upstream_unavailable")
    assert running.thread.is_alive() and also_running.thread.is_alive() and also_waiting.thread.is_alive()


def test_a_card_that_dies_is_routed_around_and_rejoins(start_server, nginx):
    cards = [start_server() for _ in range(2)]
    front = nginx([card.port for card in cards])
    dead, other = cards
    worker = dead.worker_pids()[0]
    os.kill(dead.proc.pid, signal.SIGKILL)
    os.kill(worker, signal.SIGKILL)
    dead.proc.wait(10)
    wait_for(lambda: not alive(worker), 10, "the worker gone")
    for text in ("a", "b", "c", "d"):
        reply = chat(front.url, text)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == said(text)
    assert served(other) == 4
    # The card's service starts again on its port: nginx sends it requests again (after fail_timeout at most).
    back = start_server(port=dead.port)
    # (Only nginx asks it for /v1/models: its own health checks and /metrics are other endpoints.)
    wait_for(lambda: httpx.get(front.url + "/v1/models", timeout=10).status_code == 200
             and served(back, "GET", endpoint="/v1/models"), 30, "requests on the restarted service")
