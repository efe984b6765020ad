"""Conversations that outgrow the 1024-token window keep being answered, through both APIs; what was left
out is visible (headers, the log line, metrics) and usage counts what the card was fed."""
import json
import logging

import ollama
import openai

from tests.helpers import MODEL, PROJECT_DIR, said

OPEN_WEBUI_TOOLS = json.loads((PROJECT_DIR / "tests" / "fixtures" / "open_webui_tools.json").read_text())


def long_chat(turns):
    messages = [{"role": "system", "content": "You are a patient assistant."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question number {i}: " + "tell me more " * 6},
                     {"role": "assistant", "content": f"Answer number {i}: " + "here is more " * 8}]
    return messages + [{"role": "user", "content": f"Question number {turns}, the last one"}]


def test_open_webuis_default_request_is_answered_through_both_apis(server, tokenizer):
    messages = [{"role": "user", "content": "What can you do?"}]
    fed = len(tokenizer.chat_ids(messages))  # the card is fed the conversation without the tools
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=messages, tools=OPEN_WEBUI_TOOLS)
    completion = raw.parse()
    assert completion.choices[0].message.content == said("What can you do?")
    assert completion.usage.prompt_tokens == fed
    assert raw.headers["X-Context-Dropped-Tools"] == "36" and raw.headers["X-Context-Dropped-Messages"] == "0"
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, tools=OPEN_WEBUI_TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == said("What can you do?")
    answer = ollama.Client(host=server.url).chat(model=MODEL, messages=messages, tools=OPEN_WEBUI_TOOLS)
    assert answer.message.content == said("What can you do?") and answer.prompt_eval_count == fed


def test_a_chat_that_outgrows_the_window_keeps_being_answered(server, tokenizer):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    client = ollama.Client(host=server.url)
    for turns in (5, 15, 30):
        messages = long_chat(turns)
        raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
        completion = raw.parse()
        assert completion.choices[0].message.content == said(messages[-1]["content"])  # it answers the last turn
        assert completion.usage.prompt_tokens <= 1024 - 256
        dropped = int(raw.headers.get("X-Context-Dropped-Messages", 0))
        assert (dropped > 0) == (len(tokenizer.chat_ids(messages)) > 1024 - 256)
        kept = [messages[0], *messages[1 + dropped:]]
        assert completion.usage.prompt_tokens == len(tokenizer.chat_ids(kept))
        answer = client.chat(model=MODEL, messages=messages)
        assert answer.message.content == said(messages[-1]["content"]) and answer.prompt_eval_count <= 768
    assert dropped > 0


def test_the_log_line_and_metrics_say_what_was_dropped(client, caplog):
    caplog.set_level(logging.INFO, logger="qwen_chat.requests")
    before = client.get("/metrics").get_data(as_text=True)
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": long_chat(30)})
    response.close()
    dropped = int(response.headers["X-Context-Dropped-Messages"])
    line = [r.getMessage() for r in caplog.records if r.name == "qwen_chat.requests"][-1]
    assert f"dropped=messages:{dropped},tools:0" in line
    after = client.get("/metrics").get_data(as_text=True)

    def sample(text, name):
        return next((float(row.split()[-1]) for row in text.splitlines() if row.startswith(name)), 0.0)
    assert sample(after, 'qwen_chat_context_dropped_total{part="messages"}') - \
        sample(before, 'qwen_chat_context_dropped_total{part="messages"}') == dropped
    assert sample(after, 'qwen_chat_context_truncated_requests_total{endpoint="/v1/chat/completions"}') - \
        sample(before, 'qwen_chat_context_truncated_requests_total{endpoint="/v1/chat/completions"}') == 1


def test_what_cannot_fit_is_a_400_that_names_the_parts(client):
    messages = [{"role": "system", "content": "Rules. " * 50}, {"role": "user", "content": "7" * 1100}]
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                         "tools": OPEN_WEBUI_TOOLS})
    error = response.get_json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "system " in error["message"] and "36 tool definitions" in error["message"]
    assert "last message" in error["message"]
    ollama_error = client.post("/api/chat", json={"model": MODEL, "messages": messages, "stream": False})
    assert ollama_error.status_code == 400 and "last message" in ollama_error.get_json()["error"]


def test_overflow_error_keeps_the_400(make_app):
    app = make_app(context={"overflow": "error"})
    assert app.extensions["qwen"].card.wait_ready(60) == "ready"
    response = app.test_client().post("/v1/chat/completions", json={"model": MODEL, "messages": long_chat(30)})
    assert response.status_code == 400 and "nothing is left out" in response.get_json()["error"]["message"]


def test_raw_prompts_are_not_cut(client):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "7" * 1100})
    message = response.get_json()["error"]["message"]
    assert response.status_code == 400 and "maximum context length is 1024 tokens" in message
    assert "resulted in 1100 tokens" in message
    generate = client.post("/api/generate", json={"model": MODEL, "prompt": "7" * 1100, "stream": False})
    assert generate.status_code == 400 and "1024" in generate.get_json()["error"]
