"""Streams that asked for progress (return_progress, as llama.cpp names it): where the request waits, how far
the card has read the prompt (an estimate from the measured pace, monotonic, ending exactly at the first
text), and timings at the end. Real gunicorn, emulated runner at a pace slow enough to see it."""
import threading

import httpx
import pytest

from tests.helpers import MODEL, answer_to, sse_events

LONG = "Please read all this: " + "the card reads one token at a time. " * 12


def stream(server, text, **body):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "stream": True, "return_progress": True,
                            "messages": [{"role": "user", "content": text}], **body}) as response:
        assert response.status_code == 200
        return sse_events(response.read())


def content(events):
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    from tests.helpers import LiveServer, settings
    server = LiveServer(tmp_path_factory.mktemp("slow"), settings(runner={"emulator": {"token_ms": 20}}))
    yield server.wait_healthy()
    server.stop()


def test_prompt_progress_is_monotonic_and_ends_at_the_first_text(slow, tokenizer):
    stream(slow, "warm up")  # the card's pace is measured from its generations
    events = stream(slow, LONG)
    assert events[-1] == "[DONE]" and content(events) == answer_to(LONG)
    total = len(tokenizer.chat_ids([{"role": "user", "content": LONG}]))
    progress = [e["prompt_progress"] for e in events[:-1] if "prompt_progress" in e]
    assert len(progress) >= 3  # ~170 tokens at 20 ms: several reports, half a second apart
    assert all(p["total"] == total and p["window"] == 1024 for p in progress)
    processed = [p["processed"] for p in progress]
    assert processed == sorted(processed)
    assert [p["estimated"] for p in progress] == [True] * (len(progress) - 1) + [False]
    assert processed[-1] == total and processed[-2] < total
    assert processed[-2] >= total // 2  # the estimate follows the card's measured pace
    first_text = next(i for i, e in enumerate(events) if isinstance(e, dict) and e.get("choices")
                      and e["choices"][0]["delta"].get("content"))
    last_progress = max(i for i, e in enumerate(events[:-1]) if "prompt_progress" in e)
    assert last_progress < first_text
    timings = [e for e in events[:-1] if "timings" in e]
    assert len(timings) == 1 and timings[0]["choices"][0]["finish_reason"] == "stop"
    assert timings[0]["timings"]["prompt_n"] == total and timings[0]["timings"]["predicted_n"] > 0


def test_the_place_in_line_while_another_client_holds_the_card(slow):
    holder_started = threading.Event()

    def hold():
        with httpx.stream("POST", slow.url + "/v1/chat/completions", timeout=120,
                          json={"model": MODEL, "stream": True,
                                "messages": [{"role": "user", "content": "count to 120"}]}) as response:
            for line in response.iter_lines():
                if '"content":"Emulated' in line:
                    holder_started.set()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holder_started.wait(60)
    events = stream(slow, "my turn")
    holder.join(120)
    queue = [e["queue"] for e in events[:-1] if "queue" in e]
    assert queue and queue[0]["position"] == 0 and queue[0]["request_class"] == "interactive"
    assert queue[0]["waiting"] == {"interactive": 1, "background": 0}
    assert content(events) == answer_to("my turn")
    assert events.index(next(e for e in events if "queue" in e)) < events.index(
        next(e for e in events if "prompt_progress" in e))


def test_without_return_progress_nothing_changes(slow):
    with httpx.stream("POST", slow.url + "/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": LONG}]}) as r:
        events = sse_events(r.read())
    assert not any("prompt_progress" in e or "queue" in e or "timings" in e for e in events[:-1])


def test_a_wait_that_ends_in_a_failure_is_an_error_event(start_server):
    server = start_server(runner={"emulator": {"token_ms": 20}}, server={"queue_timeout": 0.5})

    def hold():
        httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "count to 200"}]})

    holder = threading.Thread(target=hold)
    holder.start()
    server.wait_until_busy()
    events = stream(server, "too late")
    holder.join(120)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "queue_timeout"
    assert any("queue" in e for e in events[:-2])
