"""GET /metrics: Prometheus text with requests, tokens, latencies and the card's state."""
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import PROJECT_DIR


def scrape(client):
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_tokens_and_latencies_are_counted(client, tokenizer):
    before = scrape(client)
    messages = [{"role": "user", "content": "measure me"}]
    with client.post("/v1/chat/completions", json={"model": "qwen2.5", "messages": messages}) as response:
        body = response.get_json()  # observers run when the response closes, as a server closes it
    client.post("/v1/chat/completions", json={"model": "nope", "messages": messages}).close()
    after = scrape(client)
    endpoint = {"endpoint": "/v1/chat/completions", "method": "POST"}
    assert value(after, "qwen_chat_requests_total", status="200", **endpoint) == \
        value(before, "qwen_chat_requests_total", status="200", **endpoint) + 1
    assert value(after, "qwen_chat_requests_total", status="404", **endpoint) == \
        value(before, "qwen_chat_requests_total", status="404", **endpoint) + 1
    grew = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert grew("qwen_chat_prompt_tokens_total", endpoint="/v1/chat/completions") == body["usage"]["prompt_tokens"]
    assert grew("qwen_chat_completion_tokens_total", endpoint="/v1/chat/completions") == \
        body["usage"]["completion_tokens"]
    assert grew("qwen_chat_time_to_first_token_seconds_count") == 1
    assert grew("qwen_chat_tokens_per_second_count") == 1
    assert grew("qwen_chat_queue_wait_seconds_count") == 1
    assert grew("qwen_chat_generations_total", finish_reason="stop") == 1


def test_card_state_is_exposed(client):
    samples = scrape(client)
    assert value(samples, "qwen_chat_runner_state", state="ready") == 1
    assert value(samples, "qwen_chat_runner_state", state="loading") == 0
    assert value(samples, "qwen_chat_npu_status", status="emulated") == 1
    assert value(samples, "qwen_chat_queue_depth") == 0 and value(samples, "qwen_chat_card_busy") == 0
    assert ("qwen_chat_runner_restarts_total", ()) in samples


def test_soak_script_runs_clean():
    done = subprocess.run([sys.executable, "scripts/soak.py", "--clients", "4", "--minutes", "0.15",
                           "--cancel", "0.3", "--token-ms", "2"], cwd=PROJECT_DIR, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "final request answered: True" in done.stdout and done.stdout.rstrip().endswith("soak: ok")
