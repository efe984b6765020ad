"""Ollama's API under real gunicorn, through the official ollama client (and httpx where it has no call)."""
import threading

import httpx
import ollama
import openai
import pytest
from tests.helpers import MODEL, said



@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def test_chat_not_streamed(client, tokenizer):
    messages = [{"role": "user", "content": "hello ollama"}]
    response = client.chat(model="qwen2.5:1.5b", messages=messages, stream=False)
    assert response.message.role == "assistant" and response.message.content == said("hello ollama")
    assert response.done and response.done_reason == "stop"
    assert response.prompt_eval_count == len(tokenizer.chat_ids(messages))
    assert response.eval_count == len(tokenizer.encode(said("hello ollama")))
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(response, field), int) and getattr(response, field) >= 0
    assert response.total_duration >= response.prompt_eval_duration + response.eval_duration


def test_chat_streamed_equals_not_streamed(client):
    messages = [{"role": "system", "content": "Short."}, {"role": "user", "content": "stream 你好 🎉"}]
    parts = list(client.chat(model="qwen2.5", messages=messages, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    text = "".join(p.message.content for p in parts)
    whole = client.chat(model="qwen2.5", messages=messages)
    assert text == whole.message.content == said("stream 你好 🎉")
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == "stop"
    assert len(parts) > 3


def test_generate_streamed_and_not(client, tokenizer):
    whole = client.generate(model="qwen2.5", prompt="generate this", stream=False)
    assert whole.response == said("generate this") and whole.done
    parts = list(client.generate(model="qwen2.5", prompt="generate this", stream=True))
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count
    # The context carries the conversation's ids (prompt, then answer).
    assert whole.context[-whole.eval_count:] == tokenizer.encode(whole.response)


def test_generate_with_system_and_raw(client, tokenizer):
    with_system = client.generate(model="qwen2.5", prompt="p", system="You are a test.")
    assert with_system.prompt_eval_count == len(tokenizer.chat_ids(
        [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "p"}]))
    raw = client.generate(model="qwen2.5", prompt="no template here", raw=True)
    assert raw.prompt_eval_count == len(tokenizer.encode("no template here"))
    assert raw.response == said("no template here")


def test_empty_prompt_loads_the_model(client):
    response = client.generate(model="qwen2.5", prompt="")
    assert response.done and response.response == "" and response.done_reason == "load"


def test_num_predict_gives_length_with_exact_eval_count(client, tokenizer):
    for stream in (False, True):
        result = client.chat(model="qwen2.5", messages=[{"role": "user", "content": "count to 100"}],
                             options={"num_predict": 9}, stream=stream)
        last = list(result)[-1] if stream else result
        assert last.done_reason == "length" and last.eval_count == 9


def test_stop_strings(client):
    response = client.chat(model="qwen2.5", messages=[{"role": "user", "content": "count to 20"}],
                           options={"stop": ["8, 9"]})
    assert response.message.content.endswith("6, 7, ") and response.done_reason == "stop"


def test_multi_turn(client, tokenizer):
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": said("one")},
                {"role": "user", "content": "two"}]
    response = client.chat(model="qwen2.5", messages=messages)
    assert response.message.content == said("two")
    assert response.prompt_eval_count == len(tokenizer.chat_ids(messages))


def test_num_ctx_is_checked_against_the_window(client):
    long = "7" * 1100
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="qwen2.5", messages=[{"role": "user", "content": long}])
    assert caught.value.status_code == 400 and "1024" in caught.value.error
    with pytest.raises(ollama.ResponseError):
        client.chat(model="qwen2.5", messages=[{"role": "user", "content": "7" * 100}], options={"num_ctx": 64})
    # A larger num_ctx than the card's window is clamped, not an error (as Ollama clamps it).
    assert client.chat(model="qwen2.5", messages=[{"role": "user", "content": "x"}], options={"num_ctx": 8192}).done


def test_tags_show_ps_version(client, server):
    (model,) = client.list().models
    assert model.model == MODEL and model.details.family == "qwen2"
    shown = client.show("qwen2.5")
    assert shown.details.parameter_size == "1.5B" and "<|im_start|>" in shown.template
    assert shown.modelinfo["qwen2.context_length"] == 1024
    (running,) = client.ps().models
    assert running.model == MODEL
    assert httpx.get(server.url + "/api/version").json()["version"]


def test_unknown_model(client):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404 and "llama3.2" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("llama3.2")
    assert caught.value.status_code == 404


def test_root_answers_like_ollama(server):
    assert httpx.get(server.url + "/").text == "Ollama is running"
    assert httpx.head(server.url + "/").status_code == 200


@pytest.mark.parametrize("body, status", [
    ({"model": "qwen2.5", "messages": [{"role": "narrator", "content": "x"}]}, 400),
    ({"model": "qwen2.5", "messages": "hello"}, 400),
    ({"model": "qwen2.5", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400),
    ({"model": "qwen2.5", "messages": [{"role": "user", "content": "x"}], "format": "yaml"}, 400),
    ({"model": "qwen2.5", "messages": [{"role": "user", "content": "x"}], "think": True}, 400),
    ({"model": "qwen2.5", "messages": [{"role": "user", "content": "x"}], "options": {"num_predict": "lots"}}, 400),
    ({"messages": [{"role": "user", "content": "x"}]}, 400),
    ({"model": "gemma", "messages": []}, 404),
])
def test_errors_in_ollama_shape(server, body, status):
    response = httpx.post(server.url + "/api/chat", json=body)
    assert response.status_code == status
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)


def test_unknown_route_in_ollama_shape(server):
    response = httpx.get(server.url + "/api/nothing")
    assert response.status_code == 404 and set(response.json()) == {"error"}


def test_concurrent_ollama_and_openai_clients_each_get_their_own_answer(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    olla = ollama.Client(host=server.url)
    answers = {}

    def via_ollama(i):
        parts = olla.chat(model="qwen2.5", messages=[{"role": "user", "content": f"ollama {i}"}], stream=True)
        answers[f"ollama {i}"] = "".join(p.message.content for p in parts)

    def via_openai(i):
        chunks = oai.chat.completions.create(model="qwen2.5", stream=True,
                                             messages=[{"role": "user", "content": f"openai {i}"}])
        answers[f"openai {i}"] = "".join(c.choices[0].delta.content or "" for c in chunks)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(6) for f in (via_ollama, via_openai)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert answers == {key: said(key) for key in answers} and len(answers) == 12


def test_disconnect_cancels_the_generation(start_server):
    server = start_server(runner={"emulator": {"token_ms": 20}})
    # num_predict -1: on to the window's end, ~990 ids at 20 ms, about 20 s if nobody stopped it.
    body = {"model": "qwen2.5", "options": {"num_predict": -1},
            "messages": [{"role": "user", "content": "count to 3000"}]}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/api/chat", json=body) as response:
            for line in response.iter_lines():
                if '"done":false' in line:
                    break  # streaming has begun; the client leaves
    server.wait_until_idle(timeout=3)
    response = ollama.Client(host=server.url).chat(model="qwen2.5", messages=[{"role": "user", "content": "next"}])
    assert response.message.content == said("next")


def test_num_predict_zero_means_no_limit_as_with_ollama(client):
    # Ollama reads num_predict 0 as "no limit" (its runner only stops at a positive count): the window decides,
    # not generation.max_tokens (512).
    answer = client.generate(model=MODEL, prompt="count to 600", options={"num_predict": 0})
    assert answer.eval_count > 512 and answer.done_reason == "length"
    assert client.generate(model=MODEL, prompt="count to 600", options={"num_predict": 5}).eval_count == 5
