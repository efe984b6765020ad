"""Tool calling in Qwen2.5's format: requests' tools rendered by the chat template, and the model's
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks parsed out of its text.

One parser serves streamed and whole answers alike (a whole answer is the parser's events joined), so the two
can never disagree. A block that is not valid JSON, or names a tool that was not offered, stays text: what the
model said is never dropped.
"""
import json
import uuid
from dataclasses import dataclass

from app.text import marker_prefix_at_end

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict

    def openai(self):
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def ollama(self, index):
        return {"function": {"index": index, "name": self.name, "arguments": self.arguments}}


def new_call_id():
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """feed(text) / finish() -> events: ("content", str) and ("call", ToolCall), in order.

    Content outside the blocks is passed on as it comes, except that a possible start of "<tool_call>" is held
    back until it is decided, and leading and trailing whitespace is dropped (the joined content is the
    outside text, stripped), so markup never leaks into content.
    """

    def __init__(self, tool_names):
        self.tool_names = set(tool_names)
        self._buffer = ""
        self._in_block = False
        self._started = False      # some content has been passed on
        self._held_space = ""      # whitespace that is only passed on if more content follows

    def feed(self, text):
        events = []
        self._buffer += text
        while True:
            if self._in_block:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE):]
                self._in_block = False
                call = self.parse(body)
                if call is not None:
                    events.append(("call", call))
                else:
                    self._content(OPEN + body + CLOSE, events)
            else:
                start = self._buffer.find(OPEN)
                if start >= 0:
                    self._content(self._buffer[:start], events)
                    self._buffer = self._buffer[start + len(OPEN):]
                    self._in_block = True
                    continue
                keep = marker_prefix_at_end(self._buffer, [OPEN])
                self._content(self._buffer[:len(self._buffer) - keep], events)
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
        return events

    def finish(self):
        """The end of the answer: an unterminated block is text (cut by a limit, or never closed)."""
        events = []
        self._content((OPEN if self._in_block else "") + self._buffer, events)
        self._buffer, self._in_block = "", False
        return events

    def parse(self, body):
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes: text
            return None
        if not isinstance(obj, dict):
            return None
        name = obj.get("name")
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):  # some answers carry the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(name, str) or name not in self.tool_names or not isinstance(arguments, dict):
            return None
        return ToolCall(new_call_id(), name, arguments)

    def _content(self, text, events):
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        text = self._held_space + text
        settled = text.rstrip()
        self._held_space = text[len(settled):]
        if settled:
            events.append(("content", settled))


# -- requests ----------------------------------------------------------------------------------------------
def tool_names(tools):
    return [tool["function"]["name"] for tool in tools or []]


def arguments_object(arguments):
    """Arguments as the template renders them (an object; OpenAI sends a JSON string)."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return arguments


def template_tool_calls(tool_calls):
    return [{"type": "function", "function": {"name": call["function"]["name"],
                                              "arguments": arguments_object(call["function"]["arguments"])}}
            for call in tool_calls]


def required_instruction(forced_tool, required):
    """What the template lacks for tool_choice "required" or a named function: an explicit instruction."""
    if forced_tool is not None:
        return (f"Answer only with a <tool_call></tool_call> block calling the function \"{forced_tool}\"; "
                "do not answer in prose.")
    if required:
        return ("Answer only with one or more <tool_call></tool_call> blocks calling the functions above; "
                "do not answer in prose.")
    return None
