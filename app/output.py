"""What the model said, made into the answer, once for every API: tool calls parsed out of the text (tools.py),
a JSON answer cut to its value and checked (structured.py). Streamed and whole answers go through the same
steps, so the two can never disagree."""
from app.structured import StructuredText
from app.tools import ToolCallParser


class PlainText:
    """Text as it comes (no tools, no JSON asked for)."""

    def feed(self, text):
        return [("content", text)] if text else []

    def finish(self):
        return []


class Output:
    """feed(text) and finish() give events: ("content", str) and ("call", ToolCall), in order. check() says
    whether a JSON answer is what was asked for, once it is whole."""

    def __init__(self, tool_names=(), json_format=None):
        self.json_format = json_format
        if json_format is not None:
            self._parser = StructuredText(json_format, tool_names)
        else:
            self._parser = ToolCallParser(tool_names) if tool_names else PlainText()

    def feed(self, text):
        return self._parser.feed(text)

    def finish(self):
        return self._parser.finish()

    def check(self, finish_reason):
        """The JSON text of a JSON answer (None when a tool was called, the answer was cut by a limit, or no JSON
        was asked for). Raises APIError (502) when the answer is not the JSON the request asked for."""
        return self._parser.check(finish_reason) if self.json_format is not None else None

    def whole(self, text, finish_reason):
        """A whole answer: (content, [ToolCall]); a JSON answer's content is its value only."""
        content, calls = [], []
        for kind, value in self.feed(text) + self.finish():
            (content if kind == "content" else calls).append(value)
        return self.check(finish_reason) or "".join(content), calls
