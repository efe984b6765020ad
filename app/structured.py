"""Structured output: JSON answers (OpenAI's response_format json_object and json_schema, Ollama's format).

llama.cpp, Ollama and vLLM constrain sampling with a grammar; main_axcl samples inside the card, so nothing
here can force the model. What we do instead, honestly:

- the request's schema goes into the prompt, compactly (every token costs ~70 ms on the card);
- the card is stopped as soon as one complete JSON value has been generated (JsonValueCut, which the driver
  feeds as text arrives, as it feeds stop strings), and prose or a code fence before the value is dropped;
- the value is parsed and validated (JSON Schema, with the jsonschema library); an answer that is not valid
  JSON, or does not validate, is an error that says so: never a 200 with invalid JSON dressed as a success.
"""
import json

import jsonschema

from app.errors import APIError
from app.runner.cutters import Cut
from app.text import JsonScanner
from app.tools import ToolCallParser


def schema_error(schema):
    """Why `schema` is not a usable JSON Schema for an answer, or None. The card is stopped at the end of a JSON
    object or array, so the top level must be one of those."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return exc.message
    if top_level_types(schema) and not top_level_types(schema) & {"object", "array"}:
        return "its top level must be an object or an array"
    return None


def top_level_types(schema):
    kind = schema.get("type") if isinstance(schema, dict) else None
    return {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else set()


class JsonFormat:
    """What a request asked for: any JSON object (`schema` None) or a value valid against `schema`."""

    def __init__(self, schema=None):
        self.schema = schema
        top = top_level_types(schema)
        self.opener = "[" if "array" in top and "object" not in top else "{"

    def instruction(self):
        """The system turn that asks for it. Compact: no titles, no "$schema", minimal separators."""
        if self.schema is None:
            return "Reply with one JSON object only."
        schema = json.dumps(_compact(self.schema), ensure_ascii=False, separators=(",", ":"))
        kind = "array" if self.opener == "[" else "object"
        return f"Reply with one JSON {kind} only, valid against this JSON Schema: {schema}"

    def scanner(self):
        return JsonScanner(self.opener)

    def value(self, text):
        """The JSON text of an answer: the first complete value, without the prose or fence around it. Raises
        APIError (502) when there is none, when it is not JSON, or when it does not validate."""
        scanner = self.scanner()
        scanner.feed(text)
        if scanner.start is None or scanner.end is None:
            found = "began but never ended" if scanner.start is not None else "was not there"
            raise invalid_output(f"the JSON {'array' if self.opener == '[' else 'object'} the request asked for "
                                 f"{found} ({len(text)} characters of output)")
        candidate = text[scanner.start:scanner.end]
        try:
            parsed = json.loads(candidate)
        except ValueError as exc:
            raise invalid_output(f"the answer is not valid JSON: {exc}") from None
        if self.schema is not None:
            error = jsonschema.exceptions.best_match(
                jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(parsed))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "the top level"
                raise invalid_output(f"the answer does not validate against the schema at {where}: {error.message}")
        return candidate


class JsonValueCut:
    """A cutter (app/runner/cutters.py): the answer ends with its first complete JSON value of the kind the
    request asked for (`opener`, "{" or "["): nothing after it is worth the card's time."""

    def __init__(self, opener):
        self._scanner = JsonScanner(opener)
        self._fed = 0

    def scan(self, text, emitted):
        end = self._scanner.feed(text[self._fed:])
        self._fed = len(text)
        return Cut(end, end) if end is not None else None

    def hold(self, text):
        return 0


def invalid_output(why):
    return APIError(502, f"The model did not produce the JSON the request asked for: {why}. Its sampling cannot "
                    "be constrained on this card; retrying may succeed.", type="server_error",
                    code="invalid_model_output")


# Keywords whose value maps names (of properties, definitions...) to schemas: "title" there is a name.
NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords whose value is data, not schema: left as it is.
DATA = ("default", "examples", "const", "enum")


def _compact(schema):
    """The schema without what only documents it for people: the "title" and "$schema" keywords (never a
    property that happens to be called "title")."""
    if isinstance(schema, list):
        return [_compact(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("title", "$schema"):
            continue
        if key in NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: _compact(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in DATA else _compact(value)
    return out


class StructuredText:
    """The tool-call parser's interface (feed/finish -> events) for a JSON answer.

    Without tools, it streams the value's text only, dropping prose or a fence before it and anything after
    it. With tools offered too, tool calls come first: the answer goes through the tool-call parser as usual,
    and only an answer without calls must be the JSON asked for. check() says whether the answer is what was
    asked for (an answer cut by a length limit is not held to it: its finish_reason says so, as OpenAI's does).
    """

    def __init__(self, json_format, tool_names=()):
        self.format = json_format
        self._tools = ToolCallParser(tool_names) if tool_names else None
        self._scanner = json_format.scanner()
        self._text = ""      # everything fed (without tools), or the content outside tool calls (with)
        self._passed = 0
        self._called = False

    def feed(self, text):
        if self._tools is not None:
            return self._note(self._tools.feed(text))
        self._text += text
        self._scanner.feed(text)
        if self._scanner.start is None:
            return []
        end = self._scanner.end if self._scanner.end is not None else len(self._text)
        begin = max(self._passed, self._scanner.start)
        self._passed = max(self._passed, end)
        return [("content", self._text[begin:end])] if end > begin else []

    def finish(self):
        return self._note(self._tools.finish()) if self._tools is not None else []

    def _note(self, events):
        for kind, value in events:
            if kind == "content":
                self._text += value
            else:
                self._called = True
        return events

    def check(self, finish_reason):
        """The answer's JSON text once it is whole; None when a tool was called or a limit cut the answer.
        Raises APIError (502) when the answer is not the JSON the request asked for."""
        if self._called or finish_reason == "length":
            return None
        return self.format.value(self._text)
