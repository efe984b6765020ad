"""Structured output: JSON answers (OpenAI's response_format json_object and json_schema, Ollama's format).

llama.cpp, Ollama and vLLM constrain sampling with a grammar; main_axcl samples inside the card, so nothing
here can force the model. What we do instead, honestly:

- the request's schema goes into the prompt, compactly (every token costs ~70 ms on the card);
- the card is stopped as soon as one complete JSON value has been generated (JsonScanner, fed by the driver
  as text arrives), and prose or a code fence before the value is dropped;
- the value is parsed and validated (JSON Schema, with the jsonschema library); an answer that is not valid
  JSON, or does not validate, is an error that says so: never a 200 with invalid JSON dressed as a success.
"""
import json

import jsonschema

from app.errors import APIError
from app.text import JsonScanner


def schema_error(schema):
    """Why `schema` is not a usable JSON Schema, or None."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return exc.message
    return None


class JsonFormat:
    """What a request asked for: any JSON object (`schema` None) or a value valid against `schema`."""

    def __init__(self, schema=None, name=None):
        self.schema = schema
        self.name = name
        top = (schema or {}).get("type") if isinstance(schema, dict) else None
        self.opener = "[" if top == "array" else "{"

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


def invalid_output(why):
    return APIError(502, f"The model did not produce the JSON the request asked for: {why}. Its sampling cannot "
                    "be constrained on this card; retrying may succeed.", type="server_error",
                    code="invalid_model_output")


def _compact(schema):
    """The schema without what only documents it for people (titles, $schema)."""
    if isinstance(schema, dict):
        return {k: _compact(v) for k, v in schema.items() if k not in ("title", "$schema")}
    if isinstance(schema, list):
        return [_compact(v) for v in schema]
    return schema


class StructuredText:
    """The tool-call parser's interface for a JSON answer (feed/finish -> ("content", text) events): streams
    the value's text only, dropping prose or a fence before it and anything after it."""

    def __init__(self, json_format):
        self.format = json_format
        self._scanner = json_format.scanner()
        self._text = ""
        self._passed = 0

    def feed(self, text):
        self._text += text
        self._scanner.feed(text)
        if self._scanner.start is None:
            return []
        end = self._scanner.end if self._scanner.end is not None else len(self._text)
        begin = max(self._passed, self._scanner.start)
        self._passed = max(self._passed, end)
        return [("content", self._text[begin:end])] if end > begin else []

    def finish(self):
        return []

    def check(self):
        """Raises APIError when what was streamed is not the JSON the request asked for."""
        self.format.value(self._text)
