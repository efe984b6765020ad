"""Requests as tests make them: one chat() for Flask's test client and a live server alike, one SSE parser."""
import json

from tests.helpers.emulated import MODEL


def chat(target, text="hi", **body):
    """POST /v1/chat/completions with one user turn (or `messages=`) to a Flask test client or a LiveServer."""
    body.setdefault("model", MODEL)
    body.setdefault("messages", [{"role": "user", "content": text}])
    return target.post("/v1/chat/completions", json=body)


def sse_events(text):
    """The `data:` events of an SSE body: parsed JSON objects, and "[DONE]" as a string."""
    if not isinstance(text, str):
        text = text.decode()
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
