"""Holding up unattended, under real gunicorn with the emulated runner's fault modes."""
import contextlib
import json
import os
import random
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
from tests.helpers import MODEL, alive, answer_to, chat, said, sse_events, wait_for


def stream_events(server, text):
    """The SSE events of a streamed chat (the error event included)."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": text}]}) as r:
        assert r.status_code == 200
        return sse_events(r.read())


@pytest.fixture
def faulty(start_server, tmp_path):
    """A server whose emulated card reads its fault from a file the test writes."""
    fault = tmp_path / "fault"
    fault.write_text("")
    server = start_server(runner={"emulator": {"fault_file": str(fault)}, "stall_timeout": 1,
                                  "backoff_initial": 0.1, "backoff_max": 0.5})
    return server, fault


@pytest.mark.parametrize("mode, code", [("crash:4", "card_dead"), ("hang:4", "stalled"), ("dead:4", "card_dead")])
def test_failure_mid_stream_is_a_clean_error_then_the_next_request_works(faulty, mode, code):
    server, fault = faulty
    fault.write_text(mode)
    events = stream_events(server, "hello")
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == code
    assert any(e["choices"][0]["delta"].get("content") for e in events[1:-2])  # it had begun answering
    fault.write_text("")
    wait_for(lambda: server.health()[0] == 200, what="the runner to be back")
    assert chat(server, "again").json()["choices"][0]["message"]["content"] == said("again")
    assert server.health()[1]["details"]["restarts"] >= 1


def test_a_dead_card_answers_503_fast_and_recovers_by_itself(faulty):
    server, fault = faulty
    fault.write_text("crash:4")
    assert chat(server, "hello").status_code == 503  # the card dies under this request
    fault.write_text("start_fail")  # ...and does not come back: every restart fails
    wait_for(lambda: server.health()[1]["details"]["npu"] == "unavailable", what="npu unavailable")
    assert server.health()[0] == 503
    # First the death itself is the reason, then the failing restarts' [E] line.
    wait_for(lambda: "Set AXCL device failed" in server.health()[1]["details"]["reason"], what="a failed restart")
    started = time.monotonic()
    response = chat(server, "anyone?")
    assert response.status_code == 503 and time.monotonic() - started < 1.0
    assert response.json()["error"]["code"] == "card_unavailable" and "Retry-After" in response.headers
    ollama = httpx.post(server.url + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert ollama.status_code == 503 and isinstance(ollama.json()["error"], str)
    fault.write_text("")  # the card answers again (after a reboot, say)
    wait_for(lambda: server.health()[0] == 200, what="recovery")
    assert chat(server, "back").json()["choices"][0]["message"]["content"] == said("back")


def test_repeated_crashes_make_the_card_unavailable(faulty):
    server, fault = faulty
    fault.write_text("crash:1")
    for _ in range(3):
        wait_for(lambda: server.health()[1]["details"]["model"] != "loading", what="a settled card")
        if server.health()[1]["details"]["npu"] == "unavailable":
            break
        assert chat(server, "x").status_code == 503
    wait_for(lambda: server.health()[1]["details"]["npu"] == "unavailable", what="unavailable after crashes")
    fault.write_text("")
    wait_for(lambda: server.health()[0] == 200, what="recovery")


def test_start_up_failure(start_server, tmp_path):
    fault = tmp_path / "fault"
    fault.write_text("no_permission")
    server = start_server(wait=False, runner={"emulator": {"fault_file": str(fault)}, "backoff_max": 0.5})
    wait_for(lambda: server.health()[0] == 503 and server.health()[1]["details"]["npu"] == "unavailable",
             what="the failure to show")
    assert "Operation not permitted" in server.health()[1]["details"]["reason"]
    assert chat(server, "x").status_code == 503
    fault.write_text("")
    wait_for(lambda: server.health()[0] == 200, what="recovery")


def test_fifty_clients_and_a_small_queue(start_server):
    server = start_server(server={"max_queue": 5}, runner={"emulator": {"token_ms": 2}})
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    outcomes = {}

    def client(i):
        try:
            stream = random.random() < 0.5
            result = oai.chat.completions.create(model=MODEL, stream=stream,
                                                 messages=[{"role": "user", "content": f"client {i}"}])
            text = "".join(c.choices[0].delta.content or "" for c in result) if stream else \
                result.choices[0].message.content
            outcomes[i] = ("answer", text)
        except openai.APIStatusError as error:
            outcomes[i] = ("error", error.status_code, error.body.get("type"),
                           error.response.headers.get("Retry-After"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a client hung"
    answers = {i: o[1] for i, o in outcomes.items() if o[0] == "answer"}
    refused = [o for o in outcomes.values() if o[0] == "error"]
    assert len(outcomes) == 50
    assert answers == {i: said(f"client {i}") for i in answers}  # each its own, whole answer
    assert all(o[1:] == (503, "server_busy", "5") for o in refused), refused
    assert answers and refused  # the queue limit was reached, and the card still served


def test_a_hundred_random_disconnects_never_leave_the_card_busy(start_server):
    server = start_server(runner={"emulator": {"token_ms": 1}})
    rng = random.Random(5)

    def abandon(i):
        body = {"model": MODEL, "stream": rng.random() < 0.7,
                "messages": [{"role": "user", "content": f"count to {rng.randrange(50, 400)}"}]}
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
                for n, _ in enumerate(response.iter_bytes()):
                    if n >= rng.randrange(0, 6):
                        break  # the client goes away at a random point
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=abandon, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    server.wait_until_idle(timeout=30)
    started = time.monotonic()
    assert chat(server, "final").json()["choices"][0]["message"]["content"] == said("final")
    assert time.monotonic() - started < 5


def test_a_waiter_that_disconnects_leaves_the_queue_at_once(start_server):
    server = start_server(runner={"emulator": {"token_ms": 10}})
    long = threading.Thread(target=chat, args=(server, "count to 600"))  # keeps the card busy for seconds
    long.start()
    server.wait_until_busy()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "waiting"}]}).encode()
    waiter = socket.create_connection(("127.0.0.1", server.port))
    waiter.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: server.metric("qwen_chat_queue_depth") == 1, what="the waiter in line")
    waiter.close()
    wait_for(lambda: server.metric("qwen_chat_queue_depth") == 0, timeout=2, what="the waiter to leave")
    assert server.metric("qwen_chat_card_busy") == 1  # long before the long answer ends
    long.join(60)


def test_queue_timeout(start_server):
    server = start_server(server={"queue_timeout": 0.5}, runner={"emulator": {"token_ms": 10}})
    long = threading.Thread(target=chat, args=(server, "count to 300"))
    long.start()
    server.wait_until_busy()
    response = chat(server, "too late")
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_timeout"
    assert response.headers["Retry-After"]
    long.join(60)


def test_wall_clock_timeout_ends_as_length(start_server):
    server = start_server(generation={"timeout": 1.0}, runner={"emulator": {"token_ms": 20}})
    started = time.monotonic()
    # Unlimited, this answer would run to the window: ~990 ids at 20 ms, about 20 s.
    body = chat(server, "count to 3000", max_tokens=1024).json()
    elapsed = time.monotonic() - started
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < 150 and elapsed < 5


def test_sigkill_of_the_worker_leaves_no_runner(start_server):
    server = start_server()
    (worker,) = server.worker_pids()
    (runner,) = server.runner_pids()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not alive(runner), timeout=10, what="the runner to die with its worker")
    wait_for(lambda: server.health()[0] == 200, what="a new worker and runner")  # gunicorn starts another
    assert chat(server, "new worker").json()["choices"][0]["message"]["content"] == said("new worker")
    assert server.runner_pids() and runner not in server.runner_pids()


def test_sigkill_of_the_master_leaves_no_runner(start_server):
    server = start_server()
    (worker,) = server.worker_pids()
    (runner,) = server.runner_pids()
    server.proc.kill()
    server.proc.wait()
    wait_for(lambda: not alive(worker) and not alive(runner), timeout=15, what="worker and runner to go")


def test_sigterm_cancels_the_running_stream_and_quits_the_runner(start_server):
    server = start_server(runner={"emulator": {"token_ms": 20}})
    (runner,) = server.runner_pids()
    events, opened = [], threading.Event()

    def listen():
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "count to 3000"}]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                    opened.set()

    listener = threading.Thread(target=listen)
    listener.start()
    assert opened.wait(30)
    started = time.monotonic()
    server.proc.terminate()
    listener.join(30)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 15  # not the minute the answer would have taken
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
    assert not alive(runner)
    assert "Worker exiting" in server.log()


# -- a runner that dies or hangs under a request ---------------------------------------------------------------
def generating(server):
    """Until the runner is at work on a generation (the card busy, its first text out)."""
    server.wait_until_busy()


def test_a_runner_killed_under_a_request_runs_it_again_and_the_client_gets_it_whole(start_server):
    server = start_server(runner={"emulator": {"token_ms": 20}})
    (runner,) = server.runner_pids()
    answer = {}
    asking = threading.Thread(target=lambda: answer.update(response=chat(server, "count to 40")))
    asking.start()
    generating(server)
    os.kill(runner, signal.SIGSEGV)  # as the vendor's loop dies when a tokenizer answer is late
    asking.join(60)
    response = answer["response"]
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == answer_to("count to 40")
    assert server.metric("qwen_chat_generations_retried_total") == 1
    assert server.health()[1]["details"]["restarts"] == 1 and runner not in server.runner_pids()


def test_a_late_tokenizer_answer_kills_the_runner_and_the_request_is_still_answered(start_server):
    # The tokenizer service's process held for 1.3 s: the runner's /decode times out and it dies by SIGSEGV
    # (docs/PROTOCOL.md). Before the next runner starts, the service that did not answer is replaced.
    server = start_server(runner={"emulator": {"token_ms": 20}})
    (service,) = server.tokenizer_service_pids()
    answer = {}
    asking = threading.Thread(target=lambda: answer.update(response=chat(server, "late")))
    asking.start()
    generating(server)
    os.kill(service, signal.SIGSTOP)
    try:
        asking.join(60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # (it was replaced: killed)
            os.kill(service, signal.SIGCONT)
    assert answer["response"].status_code == 200, answer["response"].text
    assert answer["response"].json()["choices"][0]["message"]["content"] == said("late")
    assert server.metric("qwen_chat_generations_retried_total") == 1
    assert server.tokenizer_service_pids() != [service]  # replaced
    assert "SIGSEGV" in server.log()


def test_a_runner_stopped_while_idle_costs_the_next_request_seconds_not_an_error(start_server):
    server = start_server()
    (runner,) = server.runner_pids()
    os.kill(runner, signal.SIGSTOP)
    assert server.health()[0] == 200  # nothing tells, until a prompt goes unread
    started = time.monotonic()
    response = chat(server, "still there?")
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == said("still there?")
    assert time.monotonic() - started < 10
    assert server.metric("qwen_chat_generations_retried_total") == 1


def test_a_runner_killed_after_text_was_streamed_ends_the_stream_with_an_error(start_server):
    server = start_server(runner={"emulator": {"token_ms": 20}})
    (runner,) = server.runner_pids()
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "count to 300"}]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if len(events) == 3:
                    os.kill(runner, signal.SIGSEGV)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "runner_exited"
    assert "SIGSEGV" in events[-2]["error"]["message"]
    assert server.metric("qwen_chat_generations_retried_total") == 0
    assert chat(server, "after").json()["choices"][0]["message"]["content"] == said("after")
