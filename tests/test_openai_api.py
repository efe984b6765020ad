"""The /v1 API through Flask's test client: validation and response shapes (the runner is the emulator)."""
import json

import pytest
from tests.helpers import MODEL, chat, said, sse_events


def assert_openai_error(response, status, param=None, code=None):
    assert response.status_code == status, response.data
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_chat_completion_shape(client, tokenizer):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello there"}]
    response = chat(client, messages=messages)
    assert response.status_code == 200
    body = response.get_json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == said("hello there")
    assert body["usage"] == {
        "prompt_tokens": len(tokenizer.chat_ids(messages)),
        "completion_tokens": len(tokenizer.encode(said("hello there"))),
        "total_tokens": len(tokenizer.chat_ids(messages)) + len(tokenizer.encode(said("hello there")))}


def test_content_as_text_parts_joined_by_newlines(client):
    # As llama.cpp and vLLM join them: ["What is", "the best book"] must not become "What isthe best book".
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}]
    answer = chat(client, messages=[{"role": "user", "content": parts}]).get_json()["choices"][0]["message"]
    assert answer["content"] == said("What is\nthe best book")


def test_developer_role_is_a_system_prompt(client, tokenizer):
    messages = [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "x"}]
    usage = chat(client, messages=messages).get_json()["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.chat_ids([{"role": "system", "content": "Rules."},
                                                              {"role": "user", "content": "x"}]))


@pytest.mark.parametrize("alias", ["qwen2.5", "QWEN2.5:1.5b", "qwen2.5-1.5b-instruct", MODEL])
def test_model_aliases(client, alias):
    assert chat(client, model=alias).status_code == 200


def test_sampling_fields_are_accepted(client):
    response = chat(client, temperature=0.2, top_p=0.5, frequency_penalty=0.1, presence_penalty=0.1, seed=7,
                    user="someone", top_k=5, repetition_penalty=1.05, n=1, logprobs=False,
                    response_format={"type": "text"}, parallel_tool_calls=True, store=False, metadata={"a": "b"})
    assert response.status_code == 200


def test_max_tokens_and_max_completion_tokens(client):
    body = chat(client, max_tokens=3, messages=[{"role": "user", "content": "count to 50"}]).get_json()
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    body = chat(client, max_completion_tokens=4, messages=[{"role": "user", "content": "count to 50"}]).get_json()
    assert body["usage"]["completion_tokens"] == 4


def test_stop_as_string_and_list(client):
    body = chat(client, stop="runner", messages=[{"role": "user", "content": "x"}]).get_json()
    assert body["choices"][0]["message"]["content"] == "Emulated "
    assert body["choices"][0]["finish_reason"] == "stop"
    body = chat(client, stop=["zzz", "(no"], messages=[{"role": "user", "content": "x"}]).get_json()
    assert body["choices"][0]["message"]["content"] == "Emulated runner "


def test_stream_shape(client):
    response = chat(client, stream=True, stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": "stream this"}])
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"
    events = sse_events(response.get_data())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert text == said("stream this")
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_without_usage(client):
    chunks = sse_events(chat(client, stream=True).get_data())[:-1]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions(client, tokenizer):
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "Say something", "max_tokens": 5}).get_json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(tokenizer.encode("Say something")), "completion_tokens": 5,
                             "total_tokens": len(tokenizer.encode("Say something")) + 5}
    # No chat template: the emulator quotes the raw prompt.
    full = client.post("/v1/completions", json={"model": MODEL, "prompt": "Say something"}).get_json()
    assert full["choices"][0]["text"] == said("Say something")


def test_completions_token_ids_echo_and_stream(client, tokenizer):
    ids = tokenizer.encode("From ids")
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "echo": True}).get_json()
    assert body["choices"][0]["text"] == "From ids" + said("From ids")
    streamed = client.post("/v1/completions", json={"model": MODEL, "prompt": ["Streamed"], "stream": True})
    events = sse_events(streamed.get_data())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == said("Streamed")
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_models(client):
    listing = client.get("/v1/models").get_json()
    assert listing["object"] == "list"
    (model,) = listing["data"]
    assert model["id"] == MODEL and model["object"] == "model" and model["owned_by"]
    assert client.get("/v1/models/qwen2.5:1.5b").get_json()["id"] == MODEL
    assert_openai_error(client.get("/v1/models/gpt-4"), 404, param="model", code="model_not_found")


def test_context_length_exceeded(client, tokenizer):
    long = "7" * 1100  # one id per digit
    error = assert_openai_error(chat(client, messages=[{"role": "user", "content": long}]), 400,
                                param="messages", code="context_length_exceeded")
    count = len(tokenizer.chat_ids([{"role": "user", "content": long}]))
    assert "1024" in error["message"] and str(count) in error["message"]
    # The same before any event when streaming.
    response = chat(client, stream=True, messages=[{"role": "user", "content": long}])
    assert_openai_error(response, 400, code="context_length_exceeded")
    assert_openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": long}), 400,
                        param="prompt", code="context_length_exceeded")


X = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hello"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}, "logit_bias"),
    ({"model": MODEL, "messages": X, "response_format": {"type": "xml"}}, "response_format"),
    ({"model": MODEL, "messages": X, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format"),
    ({"model": MODEL, "messages": X, "response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "no such type"}}}}, "response_format"),
    ({"model": MODEL, "messages": X, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": MODEL, "messages": X, "stream": False, "stream_options": {}}, "stream_options"),
    ({"model": MODEL, "messages": X, "continue_final_message": True}, "continue_final_message"),
    ({"model": MODEL, "messages": X + [{"role": "assistant", "content": "Sure"}], "continue_final_message": True,
      "add_generation_prompt": True}, "continue_final_message"),
])
def test_bad_chat_requests_name_the_parameter(client, body, param):
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param=param)


def test_every_bad_field_is_named(client):
    error = assert_openai_error(client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "bot", "content": 1}], "max_tokens": "x"}), 400)
    for field in ("messages[0].role", "messages[0].content", "max_tokens"):
        assert field in error["message"]


@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b'"string"', b"\xff\xfe"])
def test_malformed_bodies(client, data):
    assert_openai_error(client.post("/v1/chat/completions", data=data, content_type="application/json"), 400,
                        code="invalid_json")


def test_form_content_type_is_read_as_json(client):
    # curl -d '{...}' without -H sends application/x-www-form-urlencoded; read the JSON anyway.
    data = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "curl"}]})
    response = client.post("/v1/chat/completions", data=data, content_type="application/x-www-form-urlencoded")
    assert response.get_json()["choices"][0]["message"]["content"] == said("curl")


def test_unknown_model(client):
    assert_openai_error(chat(client, model="gpt-4o"), 404, param="model", code="model_not_found")


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ({"model": MODEL, "prompt": 5}, "prompt"),
    ({"model": MODEL, "prompt": [1, 10 ** 9]}, "prompt"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
])
def test_bad_completion_requests(client, body, param):
    assert_openai_error(client.post("/v1/completions", json=body), 400, param=param)


def test_oversized_body_is_413(client, app):
    limit = app.config["MAX_CONTENT_LENGTH"]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * limit}]})
    assert_openai_error(client.post("/v1/chat/completions", data=body, content_type="application/json"), 413,
                        code="request_too_large")


def test_unknown_routes_and_methods(client):
    assert_openai_error(client.get("/v1/nothing"), 404, code="unknown_url")
    error = assert_openai_error(client.get("/v1/chat/completions"), 405, code="method_not_allowed")
    assert "GET" in error["message"]
    assert "POST" in client.get("/v1/chat/completions").headers["Allow"]


def test_health_when_ready(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    details = body["details"]
    assert details["tokenizer"] == "running" and details["model"] == "loaded" and details["npu"] == "emulated"
    assert isinstance(details["uptime_seconds"], int)


def test_heartbeats_while_the_card_reads_a_long_prompt(make_app):
    app = make_app(runner={"emulator": {"token_ms": 40}}, generation={"heartbeat_seconds": 0.2})
    assert app.extensions["qwen"].card.wait_ready(60) == "ready"
    # ~130 prompt tokens at 40 ms: about 5 s before the first output token.
    response = chat(app.test_client(), stream=True, max_tokens=2,
                    messages=[{"role": "user", "content": "7" * 100}])
    body = response.get_data(as_text=True)
    before_text = body.split('"content":"Emulated')[0]
    assert before_text.count(": keep-alive\n\n") >= 5
    assert body.endswith("data: [DONE]\n\n")


def test_an_error_after_the_stream_started_is_an_event(make_app):
    app = make_app(runner={"emulator": {"fault": "crash:4"}})
    assert app.extensions["qwen"].card.wait_ready(60) == "ready"
    response = chat(app.test_client(), stream=True)
    assert response.status_code == 200
    events = sse_events(response.get_data())
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "card_dead"
    assert "device 1 is dead" in error["message"]
    assert any(e["choices"][0]["delta"].get("content") for e in events[:-2])  # text came first


def test_an_error_before_the_stream_is_a_plain_http_error(make_app, tmp_path):
    app = make_app(runner={"emulator": {"fault": "start_fail"}})
    assert app.extensions["qwen"].card.wait_ready(60) == "unavailable"
    response = chat(app.test_client(), stream=True)
    error = assert_openai_error(response, 503, code="card_unavailable")
    assert "Set AXCL device failed" in error["message"]


@pytest.mark.parametrize("path", ["/chat/completions", "/completions", "/models", "/models/qwen2.5"])
def test_the_v1_endpoints_answer_without_v1_too(client, path):
    # As llama.cpp's server and the vendor's newer one do: a client configured without /v1 just works.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "no prefix"}], "prompt": "no prefix"}
    ours = client.post(path, json=body) if "completions" in path else client.get(path)
    twin = client.post("/v1" + path, json=body) if "completions" in path else client.get("/v1" + path)
    assert ours.status_code == twin.status_code == 200
    strip = ("id", "created")
    if "choices" in ours.get_json():
        assert ours.get_json()["choices"] == twin.get_json()["choices"]
    else:
        assert {k: v for k, v in ours.get_json().items() if k not in strip} == \
            {k: v for k, v in twin.get_json().items() if k not in strip}


def test_the_unprefixed_twins_need_the_key_too(make_app):
    client = make_app(server={"api_key": "sekrit"}).test_client()
    assert client.post("/chat/completions", json={"model": MODEL, "messages": []}).status_code == 401
    assert client.get("/models").status_code == 401
    assert client.get("/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
