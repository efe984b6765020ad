"""The service under real gunicorn, with the emulated runner, through the official openai client."""
import socket
import threading
import time

import httpx
import openai
import pytest
from tests.helpers import MODEL, said



def client_for(server, **kwargs):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kwargs)


@pytest.fixture(scope="module")
def oai(server):
    return client_for(server)


def test_plain_chat(oai, tokenizer):
    messages = [{"role": "user", "content": "hello from openai"}]
    completion = oai.chat.completions.create(model=MODEL, messages=messages)
    assert completion.choices[0].message.content == said("hello from openai")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == len(tokenizer.chat_ids(messages))
    assert completion.usage.completion_tokens == len(tokenizer.encode(said("hello from openai")))


def test_streamed_chat_with_usage_equals_the_plain_answer(oai):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "same 你好 🎉 answer"}]
    plain = oai.chat.completions.create(model=MODEL, messages=messages)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_max_tokens_gives_length_with_exact_counts(oai, tokenizer):
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "count to 100"}], max_tokens=7)
        if stream:
            chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
            usage, finish = chunks[-1].usage, [c for c in chunks if c.choices][-1].choices[0].finish_reason
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            done = oai.chat.completions.create(**kwargs)
            usage, finish, text = done.usage, done.choices[0].finish_reason, done.choices[0].message.content
        assert finish == "length" and usage.completion_tokens == 7
        assert len(tokenizer.encode(text)) <= 7 and said("count to 100").startswith(text)


def test_stop_strings(oai):
    done = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count to 20"}],
                                       stop=["7, 8", "never"])
    assert done.choices[0].message.content.endswith("5, 6, ") and done.choices[0].finish_reason == "stop"


def test_multi_turn(oai, tokenizer):
    messages = [{"role": "system", "content": "You are a test."},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": said("first")},
                {"role": "user", "content": "second\nturn"}]
    done = oai.chat.completions.create(model=MODEL, messages=messages)
    assert done.choices[0].message.content == said("second\nturn")
    assert done.usage.prompt_tokens == len(tokenizer.chat_ids(messages))


def test_context_too_long(oai):
    messages = [{"role": "user", "content": "7" * 1100}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            result = oai.chat.completions.create(model=MODEL, messages=messages, stream=stream)
            list(result) if stream else None
        assert caught.value.code == "context_length_exceeded"
        assert "1024" in caught.value.message


def test_legacy_completions_and_models(oai):
    done = oai.completions.create(model=MODEL, prompt="Raw prompt", max_tokens=50)
    assert done.choices[0].text == said("Raw prompt")
    assert [m.id for m in oai.models.list()] == [MODEL]
    assert oai.models.retrieve("qwen2.5").id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_concurrent_clients_get_their_own_answers_in_arrival_order(start_server):
    server = start_server(runner={"emulator": {"token_ms": 3}})
    oai = client_for(server, timeout=120)
    count = 20
    finished, answers = [], {}
    lock = threading.Lock()
    first_started = threading.Event()
    # Client 0 asks for a long answer (the window ends it after ~1000 ids) so that everyone else queues
    # up behind it in a known order.
    questions = ["client 0, count to 1000"] + [f"client {i}" for i in range(1, count)]

    def ask(i):
        chunks = oai.chat.completions.create(model=MODEL, stream=True,
                                             messages=[{"role": "user", "content": questions[i]}])
        first_started.set()  # the stream opens when the card takes the request
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        with lock:
            answers[i] = text
            finished.append(i)

    def queued():
        return httpx.get(server.url + "/health").json()["details"]["queue_depth"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    threads[0].start()
    assert first_started.wait(30)
    for i in range(1, count):
        threads[i].start()
        deadline = time.monotonic() + 30
        while queued() < i and time.monotonic() < deadline:  # request i has reached the card's queue
            time.sleep(0.005)
        assert not finished, "client 0 finished before everyone arrived: make its answer longer"
    for thread in threads:
        thread.join(120)
    assert answers[0].startswith(said(questions[0])[:-1])
    assert {i: answers[i] for i in range(1, count)} == {i: said(questions[i]) for i in range(1, count)}
    assert finished == list(range(count))


def test_disconnect_mid_stream_frees_the_card(start_server):
    server = start_server(runner={"emulator": {"token_ms": 20}})
    # An answer to the window's end: ~990 ids at 20 ms each, about 20 s if nobody stopped it.
    body = {"model": MODEL, "stream": True, "max_tokens": 1024,
            "messages": [{"role": "user", "content": "count to 3000"}]}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"content":"Emulated' in line:
                    break  # the generation is under way; now the client goes away
    server.wait_until_idle(timeout=3)  # freed at once, not in 20 s
    done = client_for(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "next"}])
    assert done.choices[0].message.content == said("next")


def test_disconnect_while_waiting_for_a_plain_answer_frees_the_card(start_server):
    server = start_server(runner={"emulator": {"token_ms": 20}})
    body = b'{"model": "qwen2.5", "max_tokens": 1024, "messages": [{"role": "user", "content": "count to 3000"}]}'
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    server.wait_until_busy()
    sock.close()  # never reads the answer
    server.wait_until_idle(timeout=3)  # freed at once, not after the ~20 s answer
    done = client_for(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "after"}])
    assert done.choices[0].message.content == said("after")


def test_health_while_loading_and_when_ready(start_server):
    server = start_server(wait=False, runner={"emulator": {"load_ms": 150}})
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            response = httpx.get(server.url + "/health", timeout=5)
        except httpx.HTTPError:
            continue  # the worker is still importing
        seen.append((response.status_code, response.json()))
        if response.status_code == 200:
            break
        time.sleep(0.05)
    loading = [body for status, body in seen if status == 503 and body["details"]["model"] == "loading"]
    assert loading, seen
    assert loading[-1]["status"] == "loading" and 0 <= loading[-1]["details"]["progress"]["step"] <= 31
    assert seen[-1][0] == 200 and seen[-1][1]["details"]["model"] == "loaded"


@pytest.mark.parametrize("method, path, data, headers, status, code", [
    ("POST", "/v1/chat/completions", b"{oops", {"Content-Type": "application/json"}, 400, "invalid_json"),
    ("POST", "/v1/chat/completions", b'{"model": "qwen2.5", "messages": [{"role": "alien", "content": "x"}]}',
     {}, 400, None),
    ("POST", "/v1/chat/completions", b'{"model": "qwen2.5", "messages": []}', {}, 400, None),
    ("POST", "/v1/chat/completions", b'{"model": "qwen2.5", "messages": [{"role": "user", "content": {}}]}',
     {}, 400, None),
    ("POST", "/v1/chat/completions", b'{"model": "qwen2.5", "max_tokens": [], "messages": []}', {}, 400, None),
    ("POST", "/v1/chat/completions", b"x" * (2 << 20), {"Content-Type": "application/json"}, 413,
     "request_too_large"),
    ("GET", "/v1/unknown", None, {}, 404, "unknown_url"),
    ("PUT", "/v1/models", None, {}, 405, "method_not_allowed"),
    ("DELETE", "/health", None, {}, 405, "method_not_allowed"),
])
def test_error_shapes_through_gunicorn(server, method, path, data, headers, status, code):
    response = httpx.request(method, server.url + path, content=data, headers=headers, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
