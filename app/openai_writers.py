"""OpenAI's answers, framed: a chat.completion or text_completion, or their SSE chunks ending with [DONE]. Only
bytes here: what the answer says was decided by serve() (serve.py)."""
import time
import uuid

from flask import jsonify

from app.serve import Writer, compact_json

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HEARTBEAT = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
ARGUMENT_FRAGMENT = 32  # streamed tool-call arguments arrive in pieces of this many characters


def sse(obj):
    return b"data: " + compact_json(obj) + b"\n\n"


def usage(result):
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class TextChunks:
    """SSE chunks that differ only in one text field, built by splicing the text's JSON into a chunk serialized
    once: byte for byte what sse() would give, without serializing the whole chunk for every piece."""
    PLACEHOLDER = "\x00text\x00"  # control characters are always escaped, so this cannot occur in real text

    def __init__(self, template):
        self.head, self.tail = sse(template).split(compact_json(self.PLACEHOLDER))

    def __call__(self, text):
        return self.head + compact_json(text) + self.tail


class OpenAIWriter(Writer):
    """What OpenAI's chat and completion answers share: SSE framing, heartbeats, errors, [DONE], and the
    progress chunks of a stream that asked for them (return_progress): an empty chunk (see empty_chunk())
    with `queue` while the request waits, or llama.cpp's `prompt_progress` while the card reads the prompt,
    and `timings` on the last chunk."""
    mimetype = "text/event-stream"
    headers = SSE_HEADERS
    kind = "chatcmpl"

    def __init__(self, model, fingerprint, window, with_usage, with_progress=False):
        self.id = f"{self.kind}-{uuid.uuid4().hex}"
        self.model = model
        self.fingerprint = fingerprint
        self.window = window
        self.created = int(time.time())
        self.with_usage = with_usage
        self.with_progress = with_progress

    def empty_chunk(self):
        raise NotImplementedError

    def heartbeat(self):
        return HEARTBEAT

    def error(self, error):
        return sse(error.openai_body()) + DONE

    def queued(self, event):
        body = self.empty_chunk()
        body["queue"] = {"position": event.position, "request_class": event.request_class,
                         "waiting": event.waiting}
        return sse(body)

    def progress(self, event):
        body = self.empty_chunk()
        body["prompt_progress"] = {
            "total": event.total, "cache": 0, "processed": event.processed, "time_ms": round(event.elapsed * 1000),
            # Ours: the runner prints nothing while it reads, so until the first text these are estimates.
            "estimated": event.estimated, "remaining_ms": round(event.remaining * 1000), "window": self.window}
        return sse(body)

    def timings(self, result):
        """llama.cpp's timings, for the last chunk of a stream that asked for progress."""
        prompt_ms, predicted_ms = result.prompt_seconds * 1000, result.generation_seconds * 1000
        return {"prompt_n": result.prompt_tokens, "prompt_ms": round(prompt_ms, 1),
                "prompt_per_second": round(result.prompt_tokens / result.prompt_seconds, 2)
                if result.prompt_seconds else None,
                "predicted_n": result.completion_tokens, "predicted_ms": round(predicted_ms, 1),
                "predicted_per_second": round(result.tokens_per_second, 2)}


class ChatWriter(OpenAIWriter):
    """One chat answer: a chat.completion, or its chunks; one id for all of them. Tool calls stream as OpenAI
    streams them: a first delta with the call's index, id, type and name, then its arguments in fragments."""

    def __init__(self, model, fingerprint, window, with_usage, with_progress=False, tools_offered=False):
        super().__init__(model, fingerprint, window, with_usage, with_progress)
        self.tools_offered = tools_offered  # content is null, not "", in a whole answer with tools offered
        self.calls = 0
        self.content_chunk = TextChunks(self._chunk_body({"content": TextChunks.PLACEHOLDER}))

    def _base(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    @staticmethod
    def finish_reason(outcome):
        if outcome.called and outcome.result.finish_reason == "stop":
            return "tool_calls"
        return outcome.result.finish_reason

    def whole(self, outcome):
        content = outcome.content
        message = {"role": "assistant", "content": content if content or not self.tools_offered else None,
                   "refusal": None}
        if outcome.calls:
            message["tool_calls"] = [call.openai() for call in outcome.calls]
        body = self._base("chat.completion")
        body["choices"] = [{"index": 0, "message": message, "logprobs": None,
                            "finish_reason": self.finish_reason(outcome)}]
        body["usage"] = usage(outcome.result)
        return jsonify(body)

    def _chunk_body(self, delta, finish=None):
        body = self._base("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if self.with_usage:
            body["usage"] = None  # as OpenAI does: only the last chunk carries usage
        return body

    def _chunk(self, delta, finish=None):
        return sse(self._chunk_body(delta, finish))

    def empty_chunk(self):
        return self._chunk_body({"role": "assistant", "content": None})

    def opening(self):
        return self._chunk({"role": "assistant", "content": ""})

    def content(self, text):
        return self.content_chunk(text)

    def call(self, call):
        body, index = call.openai(), self.calls
        self.calls += 1
        out = self._chunk({"tool_calls": [{"index": index, "id": body["id"], "type": "function",
                                           "function": {"name": body["function"]["name"], "arguments": ""}}]})
        arguments = body["function"]["arguments"]
        for at in range(0, len(arguments), ARGUMENT_FRAGMENT):
            fragment = arguments[at:at + ARGUMENT_FRAGMENT]
            out += self._chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        return out

    def closing(self, outcome):
        last = self._chunk_body({}, self.finish_reason(outcome))
        if self.with_progress:
            last["timings"] = self.timings(outcome.result)
        out = sse(last)
        if self.with_usage:
            body = self._base("chat.completion.chunk")
            body.update(choices=[], usage=usage(outcome.result))
            out += sse(body)
        return out + DONE


class CompletionWriter(OpenAIWriter):
    """One completion: a text_completion, or its chunks (the echoed prompt, one per text piece, the finish)."""
    kind = "cmpl"

    def __init__(self, model, fingerprint, window, with_usage, with_progress=False, echo=""):
        super().__init__(model, fingerprint, window, with_usage, with_progress)
        self.echo = echo
        self.text_chunk = TextChunks(self.body(TextChunks.PLACEHOLDER, None, with_usage=with_usage))

    def body(self, text, finish, usage_value=None, with_usage=False):
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage_value is not None or with_usage:
            body["usage"] = usage_value  # None on all but the last chunk, as OpenAI does
        return body

    def whole(self, outcome):
        return jsonify(self.body(self.echo + outcome.content, outcome.result.finish_reason, usage(outcome.result)))

    def opening(self):
        return sse(self.body(self.echo, None, with_usage=self.with_usage)) if self.echo else b""

    def empty_chunk(self):
        return self.body("", None, with_usage=self.with_usage)

    def content(self, text):
        return self.text_chunk(text)

    def call(self, call):
        raise AssertionError("a completion offers no tools")

    def closing(self, outcome):
        last = self.body("", outcome.result.finish_reason, with_usage=self.with_usage)
        if self.with_progress:
            last["timings"] = self.timings(outcome.result)
        out = sse(last)
        if self.with_usage:
            last = self.body("", None, usage(outcome.result))
            last["choices"] = []
            out += sse(last)
        return out + DONE
