"""Home Assistant's Assist through its own request shapes (tests/fixtures/home_assistant/, made by
tests/helpers/home_assistant.py from Home Assistant 2026.2.3's Ollama integration and the ollama client 0.5.1 it
pins), posted byte for byte as that client posts them to a real gunicorn on the emulated runner."""
import json

import httpx
import pytest

from app.tool_selection import tool_name
from tests.helpers import PROJECT_DIR, said
from tests.helpers.home_assistant import home, assist_request

FIXTURES = PROJECT_DIR / "tests" / "fixtures" / "home_assistant"
HEADERS = {"Content-Type": "application/json", "Accept": "application/json",
           "User-Agent": "ollama-python/0.5.1 (x86_64 linux) Python/3.13.2"}


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def post_chat(server, body):
    """POST /api/chat as the ollama client does (compact JSON); (response, NDJSON objects) for a stream."""
    response = httpx.post(server.url + "/api/chat", content=json.dumps(body, separators=(",", ":")),
                          headers=HEADERS, timeout=60)
    lines = [json.loads(line) for line in response.text.splitlines()] if body.get("stream", True) else []
    return response, lines


def calls(lines):
    return [call["function"] for line in lines for call in line.get("message", {}).get("tool_calls") or ()]


def test_the_request_shape_is_what_home_assistant_sends():
    body = fixture("assist_17_entities")
    assert list(body) == ["model", "stream", "options", "keep_alive", "messages", "tools", "think"]
    assert body["options"] == {"num_ctx": 8192.0} and isinstance(body["options"]["num_ctx"], float)
    assert body["keep_alive"] == "-1.0s" and body["think"] is False and body["stream"] is True
    assert len(body["tools"]) == 24


def test_a_plain_chat_with_home_assistants_floats_is_answered(server):
    body = fixture("plain_chat")
    response, lines = post_chat(server, body)
    assert response.status_code == 200, response.text
    assert "".join(line["message"]["content"] for line in lines) == said(body["messages"][-1]["content"])
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"


def test_turn_on_the_kitchen_light_with_17_entities_calls_hassturnon(server, tokenizer):
    body = fixture("assist_17_entities")
    response, lines = post_chat(server, body)
    assert response.status_code == 200, response.text
    assert calls(lines) == [{"index": 0, "name": "HassTurnOn", "arguments": {"name": "kitchen light"}}]
    assert response.headers["X-Context-Kept-Tools"] == "HassTurnOn"
    assert response.headers["X-Context-Dropped-Tools"] == "23"
    # The card was fed the system prompt, HassTurnOn and the command: nothing else.
    turn_on = next(t for t in body["tools"] if tool_name(t) == "HassTurnOn")
    fed = len(tokenizer.chat_ids(body["messages"], [turn_on]))
    assert lines[-1]["prompt_eval_count"] == fed <= 1024 - 80


def test_the_tool_result_comes_back_as_the_answer(server):
    body = fixture("tool_result_17_entities")
    response, lines = post_chat(server, body)
    assert response.status_code == 200, response.text
    text = "".join(line["message"]["content"] for line in lines)
    assert text.startswith("Emulated runner: the tools answered") and "light.kitchen_light" in text
    assert calls(lines) == [] and lines[-1]["done_reason"] == "stop"


@pytest.mark.parametrize("name, tools_kept", [("assist_0_entities", None), ("assist_1_light", "HassTurnOn")])
def test_small_homes_call_the_tool_too(server, name, tools_kept):
    response, lines = post_chat(server, fixture(name))
    assert response.status_code == 200, response.text
    assert [call["name"] for call in calls(lines)] == ["HassTurnOn"]
    kept = response.headers.get("X-Context-Kept-Tools")
    assert kept is None if tools_kept is None else tools_kept in kept.split(",")


def test_too_many_entities_for_the_tool_is_said_plainly_without_the_card(server):
    before = server.metric("qwen_chat_card_requests_total", request_class="interactive")
    response, lines = post_chat(server, assist_request(home(30), "turn on the kitchen light"))
    assert response.status_code == 200, response.text
    text = "".join(line["message"]["content"] for line in lines)
    assert text.startswith("This request needs the tool HassTurnOn, and it does not fit")
    assert "expose fewer entities" in text and calls(lines) == []
    assert response.headers["X-Context-Unfit-Tool"] == "HassTurnOn"
    assert lines[-1]["prompt_eval_count"] == 0 and lines[-1]["eval_count"] == 0
    assert server.metric("qwen_chat_card_requests_total", request_class="interactive") == before  # no card time
    assert server.metric("qwen_chat_context_tool_unfit_total", endpoint="/api/chat") >= 1


def test_a_client_that_wants_json_gets_the_unfit_tool_as_a_400_not_prose(server):
    body = {**assist_request(home(30), "turn on the kitchen light"), "format": "json", "stream": False}
    response, _ = post_chat(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("This request needs the tool HassTurnOn, and it does not fit")


def test_a_system_prompt_larger_than_the_window_is_a_400_that_names_it(server):
    response, _ = post_chat(server, fixture("assist_37_entities"))
    assert response.status_code == 400
    message = response.json()["error"]
    assert "system 1,015 tokens" in message and "24 tool definitions 3,185 tokens" in message


@pytest.mark.parametrize("options", [
    {"num_ctx": 8192.0, "num_predict": 5.0, "top_k": 40.0, "seed": 7.0, "num_keep": 4.0, "repeat_last_n": 64.0,
     "num_batch": 512.0, "num_gpu": 0.0, "main_gpu": 0.0, "num_thread": 4.0, "temperature": 0.7},
])
def test_whole_number_floats_are_integers_as_ollama_takes_them(server, options):
    body = {"model": "qwen2.5:latest", "messages": [{"role": "user", "content": "count to 50"}], "stream": False,
            "options": options, "keep_alive": "-1.0s"}
    response = httpx.post(server.url + "/api/chat", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["eval_count"] == 5  # num_predict 5.0 is 5


@pytest.mark.parametrize("option", ["num_ctx", "num_predict", "top_k", "seed", "num_keep", "num_thread"])
def test_a_fractional_integer_option_is_a_clear_400(server, option):
    body = {"model": "qwen2.5", "messages": [{"role": "user", "content": "x"}], "stream": False,
            "options": {option: 2048.5}}
    response = httpx.post(server.url + "/api/chat", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json() == {"error": f"Invalid request: options.{option}: Must be a whole number."}


def test_openai_keeps_its_strictness(server):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "qwen2.5", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5.0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
