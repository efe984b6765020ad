"""What peer test suites (llama.cpp's, vLLM's) and real clients expect: an optional model name, CORS for the
openai JS SDK, text parts, fingerprints, continuing an assistant message, structured (JSON) output, and
counting tokens before sending. Through Flask's test client, and the official clients against gunicorn."""
import json

import ollama
import openai
import pydantic
import pytest

from app.cors import ALLOWED_HEADERS
from tests.helpers import MODEL, chat, sse_events

EMULATED_CONTINUATION = " (continued by the emulated runner)"


# -- behaviour -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [None, "", "absent"])
def test_the_model_may_be_left_out(client, model):
    body = {"messages": [{"role": "user", "content": "no model"}]}
    if model != "absent":
        body["model"] = model
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.get_json()["model"] == MODEL
    completion = client.post("/v1/completions", json={k: v for k, v in {"prompt": "raw", "model": model}.items()
                                                      if model != "absent" or k != "model"})
    assert completion.status_code == 200
    assert client.post("/v1/chat/completions", json={**body, "model": "gpt-4o"}).status_code == 404


def test_a_preflight_gets_the_headers_its_origin_asks_for(make_app):
    app = make_app(server={"cors_origins": ["http://ui.example"]})
    asked = ("authorization, content-type, x-stainless-os, x-stainless-lang, x-stainless-package-version, "
             "x-stainless-runtime, x-stainless-runtime-version, x-stainless-arch, x-stainless-retry-count, "
             "x-stainless-timeout")
    response = app.test_client().options("/v1/chat/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asked})
    assert response.status_code == 204 and response.headers["Access-Control-Allow-Headers"] == asked
    odd = app.test_client().options("/v1/models", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "x-ok, bad header!"})
    assert odd.headers["Access-Control-Allow-Headers"] == ALLOWED_HEADERS  # nonsense gets the fixed list


def test_logprobs_zero_is_refused_on_completions(client):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 0})
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "logprobs"


def test_system_fingerprint_names_the_build_and_the_runner(client):
    body = chat(client, "fingerprint").get_json()
    assert isinstance(body["system_fingerprint"], str)
    assert body["system_fingerprint"].startswith("qwen-chat-") and body["system_fingerprint"].endswith("-emulated")
    events = sse_events(chat(client, "fingerprint", stream=True).get_data())
    assert {e["system_fingerprint"] for e in events[:-1]} == {body["system_fingerprint"]}


@pytest.mark.parametrize("body, message", [
    ({"think": True}, '"qwen2.5" does not support thinking'),
    ({"think": "high"}, '"qwen2.5" does not support thinking'),
    ({"format": "xml"}, 'invalid format: "xml"; expected "json" or a valid JSON Schema object'),
    ({"format": {"type": 5}}, "invalid JSON schema in format"),
])
def test_ollama_format_and_think_errors(client, body, message):
    response = client.post("/api/chat", json={"model": "qwen2.5", "messages": [{"role": "user", "content": "x"}],
                                              "stream": False, **body})
    assert response.status_code == 400 and message in response.get_json()["error"]


# -- continuing an assistant message ----------------------------------------------------------------------
PREFILL = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
           {"role": "assistant", "content": "The colour is"}]


def test_continue_final_message_ends_the_prompt_inside_that_message(client, tokenizer, fed_prompts):
    fed = fed_prompts
    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": PREFILL, "continue_final_message": True, "add_generation_prompt": False})
    body = response.get_json()
    assert body["choices"][0]["message"]["content"] == EMULATED_CONTINUATION  # the continuation only
    rendered = tokenizer.render_chat(PREFILL, add_generation_prompt=False)
    assert rendered.endswith("The colour is<|im_end|>\n")
    expected = tokenizer.encode(rendered[:-len("<|im_end|>\n")])
    assert fed[-1] == expected and body["usage"]["prompt_tokens"] == len(expected)
    assert expected[-1] != tokenizer.eos_id and tokenizer.decode(expected).endswith("assistant\nThe colour is")
    # Ollama continues a final assistant message on its own.
    answer = client.post("/api/chat", json={"model": MODEL, "messages": PREFILL, "stream": False}).get_json()
    assert answer["message"]["content"] == EMULATED_CONTINUATION and fed == [expected, expected]


# -- structured output ------------------------------------------------------------------------------------
WRAPPED = 'answer with: Here you are:\n```json\n{"city": "Paris", "tags": ["a", "b}"]}\n```\nAnything else?'


def test_json_object_is_the_value_alone_and_the_card_stops_after_it(client, tokenizer):
    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "response_format": {"type": "json_object"}, "messages": [{"role": "user", "content": WRAPPED}]})
    body = response.get_json()
    assert response.status_code == 200
    assert body["choices"][0]["message"]["content"] == '{"city": "Paris", "tags": ["a", "b}"]}'
    assert body["choices"][0]["finish_reason"] == "stop"
    whole = WRAPPED.removeprefix("answer with: ")
    until_value = whole[:whole.index("]}") + 2]
    # The ids up to the one that closed the value: the fence and the question after it never cost card time.
    assert body["usage"]["completion_tokens"] == len(tokenizer.encode(until_value))
    streamed = sse_events(client.post("/v1/chat/completions", json={
        "model": MODEL, "response_format": {"type": "json_object"}, "stream": True,
        "messages": [{"role": "user", "content": WRAPPED}]}).get_data())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in streamed[:-1] if e.get("choices"))
    assert text == body["choices"][0]["message"]["content"]


def test_the_schema_is_in_the_prompt_compactly(client, tokenizer, fed_prompts):
    from app.structured import JsonFormat
    fed = fed_prompts
    schema = {"title": "Weather", "type": "object", "properties": {"city": {"type": "string", "title": "City"}},
              "required": ["city"]}
    messages = [{"role": "user", "content": 'answer with: {"city": "Oslo"}'}]
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "response_format": {
        "type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}}).close()
    instruction = JsonFormat(schema).instruction()
    assert '"title"' not in instruction and '{"type":"object","properties":{"city":{"type":"string"}}' in instruction
    assert fed[-1] == tokenizer.chat_ids(messages + [{"role": "system", "content": instruction}])


@pytest.mark.parametrize("reply, problem", [
    ('answer with: {"city": "Paris", "tags": [1, 2', "began but never ended"),
    ("answer with: I do not know.", "was not there"),
    ('answer with: {"city": Paris}', "not valid JSON"),
    ('answer with: {"town": "Paris"}', "does not validate against the schema"),
])
def test_output_that_is_not_the_json_asked_for_is_an_error(client, reply, problem):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {"model": MODEL, "messages": [{"role": "user", "content": reply}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}}
    response = client.post("/v1/chat/completions", json=body)
    error = response.get_json()["error"]
    assert response.status_code == 502 and error["code"] == "invalid_model_output" and problem in error["message"]
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}).get_data())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "invalid_model_output"
    assert not any(e.get("choices") and e["choices"][0]["finish_reason"] for e in events[:-1])  # never a success


class Place(pydantic.BaseModel):
    city: str
    population: int


def test_official_clients_structured_output(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    completion = oai.chat.completions.parse(model=MODEL, response_format=Place, messages=[
        {"role": "user", "content": 'answer with: ```json\n{"city": "Lyon", "population": 522000}\n``` ok?'}])
    assert completion.choices[0].message.parsed == Place(city="Lyon", population=522000)
    with pytest.raises(openai.APIStatusError) as caught:
        oai.chat.completions.parse(model=MODEL, response_format=Place,
                                   messages=[{"role": "user", "content": 'answer with: {"city": "Lyon"}'}])
    assert caught.value.status_code == 502
    client = ollama.Client(host=server.url)
    answer = client.chat(model=MODEL, format=Place.model_json_schema(), messages=[
        {"role": "user", "content": 'answer with: Sure! {"city": "Nice", "population": 340000} Bye.'}])
    assert Place.model_validate_json(answer.message.content) == Place(city="Nice", population=340000)
    generated = client.generate(model=MODEL, format="json", prompt='answer with: {"ok": true} and more')
    assert json.loads(generated.response) == {"ok": True}
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model=MODEL, format="json", prompt="answer with: nope")
    assert caught.value.status_code == 502


# -- counting before sending -------------------------------------------------------------------------------
def test_tokenize_and_detokenize_in_vllms_and_llamacpps_shapes(client, tokenizer):
    messages = [{"role": "user", "content": "How long is this?"}]
    body = client.post("/tokenize", json={"model": MODEL, "messages": messages}).get_json()
    assert body["tokens"] == tokenizer.chat_ids(messages) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024 and body["token_strs"] is None
    raw = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).get_json()
    assert raw["tokens"] == tokenizer.encode("Hello world") and raw["token_strs"] == ["Hello", "Ġworld"]
    prefill = client.post("/tokenize", json={"messages": PREFILL, "continue_final_message": True,
                                             "add_generation_prompt": False}).get_json()
    assert prefill["tokens"] == tokenizer.chat_ids(PREFILL, ending="continue")
    ended = client.post("/tokenize", json={"messages": PREFILL, "add_generation_prompt": False}).get_json()
    assert ended["tokens"] == tokenizer.chat_ids(PREFILL, ending="none")
    both = client.post("/tokenize", json={"messages": PREFILL, "continue_final_message": True,
                                          "add_generation_prompt": True})
    assert both.status_code == 400 and both.get_json()["error"]["param"] == "continue_final_message"
    llama = client.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).get_json()
    assert llama["tokens"] == [{"id": i, "piece": tokenizer.decode([i])} for i in tokenizer.encode("Hello world")]
    back = client.post("/detokenize", json={"tokens": tokenizer.encode("Hello world")}).get_json()
    assert back == {"prompt": "Hello world", "content": "Hello world"}
    assert client.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400
    assert client.post("/tokenize", json={"prompt": "a", "content": "b"}).status_code == 400


def test_the_window_is_in_the_model_listings(client):
    assert client.get("/v1/models").get_json()["data"][0]["max_model_len"] == 1024
    assert client.get("/v1/models/qwen2.5").get_json()["max_model_len"] == 1024
    shown = client.post("/api/show", json={"model": MODEL}).get_json()
    assert shown["model_info"]["qwen2.context_length"] == 1024


def test_tokenize_needs_the_key_when_one_is_set(make_app):
    locked = make_app(server={"api_key": "k"}).test_client()
    assert locked.post("/tokenize", json={"prompt": "x"}).status_code == 401
    assert locked.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k"}).status_code == 200


def test_langchains_structured_output(server):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=MODEL, max_retries=0)
    assert llm.invoke("plain question").content.startswith("Emulated runner")
    structured = llm.with_structured_output(Place)  # LangChain's default: response_format json_schema
    place = structured.invoke('answer with: {"city": "Bern", "population": 134000}')
    assert place == Place(city="Bern", population=134000)


def test_tools_and_a_json_format_together(client):
    # A tool call is JSON too: with tools offered, calls come first, and only an answer without one must be the
    # JSON asked for.
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = {"model": MODEL, "tools": [weather], "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": 'call get_weather with {"location": "Oslo"}'}]}
    answer = client.post("/v1/chat/completions", json=body).get_json()["choices"][0]
    assert answer["finish_reason"] == "tool_calls" and answer["message"]["tool_calls"][0]["function"]["name"] == \
        "get_weather"
    body["messages"] = [{"role": "user", "content": 'answer with: Sure: {"sky": "blue"} there'}]
    answer = client.post("/v1/chat/completions", json=body).get_json()["choices"][0]
    assert answer["message"]["content"] == '{"sky": "blue"}' and answer["finish_reason"] == "stop"


def test_a_json_answer_cut_by_max_tokens_is_a_length_finish_not_an_error(client):
    # As OpenAI answers it (and openai's parse() raises LengthFinishReasonError): retrying cannot help.
    body = {"model": MODEL, "max_tokens": 4, "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": 'answer with: {"city": "Paris", "people": 2100000}'}]}
    response = client.post("/v1/chat/completions", json=body)
    choice = response.get_json()["choices"][0]
    assert response.status_code == 200 and choice["finish_reason"] == "length"
    assert '{"city": "Paris", "people": 2100000}'.startswith(choice["message"]["content"])


def test_a_property_called_title_stays_in_the_instruction():
    from app.structured import JsonFormat
    schema = {"title": "Note", "type": "object", "required": ["title"],
              "properties": {"title": {"title": "Title", "type": "string"}}}
    assert '"properties":{"title":{"type":"string"}}' in JsonFormat(schema).instruction()
    assert '"Note"' not in JsonFormat(schema).instruction()


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "string"}}}},
    {"response_format": {"type": "json_object"}, "continue_final_message": True,
     "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "{"}]},
])
def test_json_requests_that_cannot_be_honoured_are_400s(client, body):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **body}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.get_json()
