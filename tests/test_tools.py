"""Tool calling in Qwen2.5's format, through the official openai and ollama clients (emulated runner)."""
import json

import ollama
import openai
import pytest

from tests.helpers import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a place",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                         "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(oai, text, stream=False, **kwargs):
    messages = kwargs.pop("messages", [{"role": "user", "content": text}])
    kwargs.setdefault("tools", TOOLS)
    result = oai.chat.completions.create(model=MODEL, messages=messages, stream=stream, **kwargs)
    return gather(result) if stream else (result.choices[0].message.content,
                                          [(c.function.name, json.loads(c.function.arguments), c.id)
                                           for c in result.choices[0].message.tool_calls or []],
                                          result.choices[0].finish_reason)


def gather(chunks):
    """Rebuild (content, [(name, arguments, id)], finish) from a stream, checking the deltas' shape."""
    content, calls, finish = [], {}, None
    for chunk in chunks:
        choice = chunk.choices[0]
        if choice.delta.content:
            content.append(choice.delta.content)
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:  # the first delta of a call carries its id, type and name
                assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                calls[delta.index] = [delta.function.name, "", delta.id]
            calls[delta.index][1] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    text = "".join(content) or None
    return text, [(name, json.loads(args), call_id) for name, args, call_id in calls.values()], finish


def without_ids(answer):
    content, calls, finish = answer
    return content, [(name, args) for name, args, _ in calls], finish


@pytest.mark.parametrize("stream", [False, True])
def test_one_call(oai, stream):
    content, calls, finish = ask(oai, "What's the weather in Paris?", stream)
    assert content is None and finish == "tool_calls"  # not a single content delta: no markup leaked
    ((name, arguments, call_id),) = calls
    assert name == "get_weather" and arguments == {"location": "Paris"} and call_id.startswith("call_")


@pytest.mark.parametrize("stream", [False, True])
def test_two_parallel_calls(oai, stream):
    content, calls, finish = ask(oai, "What's the weather in Paris and Rome?", stream)
    assert [(n, a) for n, a, _ in calls] == [("get_weather", {"location": "Paris"}),
                                            ("get_weather", {"location": "Rome"})]
    assert len({i for _, _, i in calls}) == 2 and finish == "tool_calls" and content is None


def test_streamed_equals_not_streamed(oai):
    for text in ('call get_weather with {"location": "Oslo"} and call get_time', "hello there",
                 'call get_weather with {"location": '):
        assert without_ids(ask(oai, text, True)) == without_ids(ask(oai, text, False))


@pytest.mark.parametrize("stream", [False, True])
def test_call_then_result_then_answer(oai, stream):
    first = oai.chat.completions.create(model=MODEL, tools=TOOLS,
                                        messages=[{"role": "user", "content": "call get_time"}])
    call = first.choices[0].message.tool_calls[0]
    messages = [{"role": "user", "content": "call get_time"}, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "12:34"}]
    content, calls, finish = ask(oai, None, stream, messages=messages)
    assert content == 'Emulated runner: the tools answered "12:34".' and not calls and finish == "stop"


def test_tool_choice_none_renders_no_tools(oai):
    content, calls, finish = ask(oai, "call get_time", tool_choice="none")
    assert not calls and finish == "stop" and content.endswith('You said: "call get_time"')


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_json_stays_text(oai, stream):
    content, calls, finish = ask(oai, 'call get_weather with {"location": ', stream)
    assert not calls and finish == "stop"
    assert content == '<tool_call>\n{"name": "get_weather", "arguments": {"location":}\n</tool_call>'


def test_an_unknown_tool_stays_text(oai):
    content, calls, finish = ask(oai, "call launch_rockets")
    assert not calls and '"name": "launch_rockets"' in content and finish == "stop"


def test_text_around_calls_is_content(oai):
    # A mix: the emulator's call blocks, but the request offers only one of the two tools.
    content, calls, finish = ask(oai, "call get_time and call nope", tools=[TIME])
    assert [n for n, _, _ in calls] == ["get_time"] and '"name": "nope"' in content and finish == "tool_calls"


def test_required_and_named_choices(oai):
    _, calls, finish = ask(oai, "call get_time", tool_choice="required")
    assert [n for n, _, _ in calls] == ["get_time"] and finish == "tool_calls"
    _, calls, _ = ask(oai, "call get_time", tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [n for n, _, _ in calls] == ["get_time"]
    # Nothing can force this runner: a model that does not comply is answered as it answered.
    content, calls, finish = ask(oai, "just chatting", tool_choice="required")
    assert not calls and finish == "stop" and "just chatting" in content


@pytest.mark.parametrize("kwargs, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": None, "tool_choice": "auto"}, "tool_choice"),  # as OpenAI: only allowed with tools, even "auto"
    ({"tools": [], "tool_choice": "none"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
])
def test_bad_tool_requests(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(oai, "x", **kwargs)
    assert caught.value.body["param"] == param


def test_a_tool_result_must_answer_a_call(oai):
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(oai, None, messages=messages)
    assert caught.value.body["param"] == "messages[2].tool_call_id"


def test_prompt_ids_of_a_tool_conversation_are_the_templates(client, tokenizer, fed_prompts):
    messages = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location": "Rome"}'}}]},
        # Results sent out of order: they are put back in the order of the calls.
        {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_a", "content": "sun"},
    ]
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": TOOLS})
    assert response.status_code == 200
    expected = tokenizer.chat_ids([
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Rome"}}}]},
        {"role": "tool", "content": "sun"}, {"role": "tool", "content": "rain"}], TOOLS)
    assert fed_prompts == [expected]
    text = tokenizer.decode(expected)
    assert "# Tools" in text and '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}' in text
    assert "<tool_response>\nsun\n</tool_response>\n<tool_response>\nrain\n</tool_response>" in text
    assert response.get_json()["choices"][0]["message"]["content"] == \
        'Emulated runner: the tools answered "sun"; "rain".'


def test_required_adds_an_instruction(client, tokenizer, fed_prompts):
    client.post("/v1/chat/completions", json={"model": MODEL, "tools": TOOLS, "tool_choice": "required",
                                              "messages": [{"role": "user", "content": "hi"}]})
    text = tokenizer.decode(fed_prompts[-1])
    assert text.endswith("do not answer in prose.<|im_end|>\n<|im_start|>assistant\n")


def test_without_tools_markup_is_plain_text(client):
    # No tools offered: nothing is parsed, whatever the text holds.
    body = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "<tool_call>{}</tool_call>"}]}).get_json()
    assert "<tool_call>" in body["choices"][0]["message"]["content"]
    assert "tool_calls" not in body["choices"][0]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_client_with_tools(server, stream):
    client = ollama.Client(host=server.url)
    result = client.chat(model=MODEL, tools=TOOLS, stream=stream,
                         messages=[{"role": "user", "content": "What's the weather in Paris and Rome?"}])
    parts = list(result) if stream else [result]
    calls = [call for part in parts for call in (part.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", {"location": "Paris"}), ("get_weather", {"location": "Rome"})]
    assert "".join(p.message.content or "" for p in parts) == ""
    assert parts[-1].done and parts[-1].done_reason == "stop"
    # The conversation continues with the results.
    follow = client.chat(model=MODEL, tools=TOOLS, messages=[
        {"role": "user", "content": "What's the weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "content": "sun", "tool_name": "get_weather"},
        {"role": "tool", "content": "rain", "tool_name": "get_weather"}])
    assert follow.message.content == 'Emulated runner: the tools answered "sun"; "rain".'
