"""The request bodies' marshmallow schemas, created once (the configuration's own schema is in config.py)."""
import json
import re

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from app.structured import schema_error


# -- request bodies --------------------------------------------------------------------------------------
# Clients send many fields we have no use for; like vLLM we ignore unknown fields instead of failing.
class _Lenient(Schema):
    class Meta:
        unknown = EXCLUDE


class JsonBool(fields.Boolean):
    """A JSON true or false (marshmallow would also take "yes", "on", "1"...)."""
    truthy = {True}
    falsy = {False}


class StopField(fields.Field):
    """`stop`: a string or a list of up to 4 non-empty strings; always loaded as a list."""
    default_error_messages = {"invalid": "Must be a string or a list of up to 4 strings."}

    def _deserialize(self, value, attr, data, **kwargs):
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or len(value) > 4 or not all(isinstance(v, str) for v in value):
            raise self.make_error("invalid")
        return [v for v in value if v]


class ContentField(fields.Field):
    """Message content: a string, a list of text parts, or null (only where the role allows it)."""
    default_error_messages = {
        "invalid": "Must be a string or a list of content parts.",
        "part": "Content parts must be objects with a type.",
        "modality": "This model reads text only; content parts of type {type!r} are not supported.",
        "text": "A text part needs a string `text`.",
    }

    def _deserialize(self, value, attr, data, **kwargs):
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise self.make_error("invalid")
        texts = []
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise self.make_error("part")
            if part["type"] not in ("text", "input_text"):
                raise self.make_error("modality", type=part["type"])
            if not isinstance(part.get("text"), str):
                raise self.make_error("text")
            texts.append(part["text"])
        return "\n".join(texts)  # as llama.cpp and vLLM join text parts


class ToolFunction(_Lenient):
    name = fields.String(required=True, validate=validate.Regexp(
        r"^[A-Za-z0-9_.-]{1,64}$", error="Must be 1-64 letters, digits, underscores, dots or dashes."))
    description = fields.String(load_default=None, allow_none=True)
    parameters = fields.Dict(load_default=None, allow_none=True)
    strict = JsonBool(load_default=None, allow_none=True)


class Tool(_Lenient):
    type = fields.String(required=True, validate=validate.Equal("function", error="Only function tools exist."))
    function = fields.Nested(ToolFunction, required=True)


class ToolCallFunction(_Lenient):
    name = fields.String(required=True)
    arguments = fields.Raw(required=True)  # a JSON string (OpenAI) or an object (Ollama)


class ToolCall(_Lenient):
    id = fields.String(load_default=None, allow_none=True)
    type = fields.String(load_default="function", validate=validate.Equal("function"))
    function = fields.Nested(ToolCallFunction, required=True)


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatMessage(_Lenient):
    role = fields.String(required=True, validate=validate.OneOf(CHAT_ROLES))
    content = ContentField(load_default=None)
    name = fields.String(load_default=None, allow_none=True)
    tool_calls = fields.List(fields.Nested(ToolCall), load_default=None, allow_none=True)
    tool_call_id = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def _content(self, data, **kwargs):
        if data.get("content") is None and not (data.get("role") == "assistant" and data.get("tool_calls")):
            raise ValidationError("Field may not be null (only an assistant message with tool_calls may "
                                  "omit its content).", "content")


class _ChatEnding(_Lenient):
    """How a chat prompt ends (vLLM's fields): the assistant's next turn (the default), right after the last
    message (`add_generation_prompt: false`), or inside the final assistant message, which the model goes on
    with (`continue_final_message`, a prefill)."""
    continue_final_message = JsonBool(load_default=False)
    add_generation_prompt = JsonBool(load_default=None, allow_none=True)

    @validates_schema
    def _one_ending(self, data, **kwargs):
        if data.get("continue_final_message") and data.get("add_generation_prompt"):
            raise ValidationError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                                  "continue_final_message")


class OpenAIRequest(_Lenient):
    """What every OpenAI request shares: model, limits, stop, stream, and the sampling fields every client
    sends. The card's sampling is fixed when the runner starts, so those are accepted (and type-checked) but
    do not change the output; see docs/CONFIGURATION.md."""
    temperature = fields.Float(load_default=None, allow_none=True, validate=validate.Range(0, 2))
    top_p = fields.Float(load_default=None, allow_none=True, validate=validate.Range(0, 1))
    top_k = fields.Integer(strict=True, load_default=None, allow_none=True)
    frequency_penalty = fields.Float(load_default=None, allow_none=True, validate=validate.Range(-2, 2))
    presence_penalty = fields.Float(load_default=None, allow_none=True, validate=validate.Range(-2, 2))
    repetition_penalty = fields.Float(load_default=None, allow_none=True)
    seed = fields.Integer(strict=True, load_default=None, allow_none=True)
    user = fields.String(load_default=None, allow_none=True)
    max_tokens = fields.Integer(strict=True, load_default=None, allow_none=True, validate=validate.Range(min=1))
    stop = StopField(load_default=list)
    stream = JsonBool(load_default=False)
    stream_options = fields.Dict(load_default=None, allow_none=True)
    n = fields.Integer(strict=True, load_default=None, allow_none=True, validate=validate.Range(min=1))
    logit_bias = fields.Dict(load_default=None, allow_none=True)
    # llama.cpp's opt-in: a stream that says where the request waits and how far the card has read the prompt.
    return_progress = JsonBool(load_default=False)
    # Absent, null or "" mean the served model (as vLLM and llama.cpp read them); a wrong name is a 404.
    model = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def _what_the_card_cannot_do(self, data, **kwargs):
        if (data.get("n") or 1) > 1:
            raise ValidationError("`n` > 1 is not supported: the card generates one choice at a time.", "n")
        if data.get("logit_bias"):
            raise ValidationError("`logit_bias` is not supported: the card's sampling is fixed.", "logit_bias")
        options = data.get("stream_options")
        if options is not None and not data.get("stream"):
            raise ValidationError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                  "stream_options")
        if options is not None and not isinstance(options.get("include_usage", False), bool):
            raise ValidationError("`include_usage` must be a boolean.", "stream_options")


class ChatCompletionRequest(OpenAIRequest, _ChatEnding):
    messages = fields.List(fields.Nested(ChatMessage), required=True, validate=validate.Length(
        min=1, error="At least one message is required."))
    max_completion_tokens = fields.Integer(strict=True, load_default=None, allow_none=True,
                                           validate=validate.Range(min=1))
    logprobs = JsonBool(load_default=None, allow_none=True)
    top_logprobs = fields.Integer(strict=True, load_default=None, allow_none=True)
    response_format = fields.Dict(load_default=None, allow_none=True)
    tools = fields.List(fields.Nested(Tool), load_default=None, allow_none=True)
    tool_choice = fields.Raw(load_default=None, allow_none=True)
    parallel_tool_calls = JsonBool(load_default=None, allow_none=True)
    functions = fields.Raw(load_default=None, allow_none=True)
    function_call = fields.Raw(load_default=None, allow_none=True)
    modalities = fields.List(fields.String(), load_default=None, allow_none=True)

    @validates_schema
    def _chat_features(self, data, **kwargs):
        if data.get("logprobs"):
            raise ValidationError("`logprobs` is not supported by this server.", "logprobs")
        if data.get("top_logprobs"):
            raise ValidationError("`top_logprobs` is not supported by this server.", "top_logprobs")
        check_response_format(data.get("response_format"))
        if data.get("continue_final_message"):
            messages = data.get("messages") or []
            if not messages or messages[-1]["role"] != "assistant" or messages[-1].get("tool_calls"):
                raise ValidationError("`continue_final_message` needs the conversation to end with an assistant "
                                      "message (without tool calls) to continue.", "continue_final_message")
            if (data.get("response_format") or {}).get("type", "text") != "text":
                # The continuation would be checked as a whole answer, without the start it continues.
                raise ValidationError("`continue_final_message` cannot be combined with a JSON `response_format`.",
                                      "continue_final_message")
        if data.get("functions") or data.get("function_call"):
            raise ValidationError("The legacy `functions` API is not supported; use `tools`.", "functions")
        if data.get("modalities") and set(data["modalities"]) != {"text"}:
            raise ValidationError("Only the text modality is supported.", "modalities")
        choice = data.get("tool_choice")
        if choice is not None and choice not in ("none", "auto", "required") and not (
                isinstance(choice, dict) and choice.get("type") == "function"
                and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)):
            raise ValidationError('Must be "none", "auto", "required" or {"type": "function", "function": '
                                  '{"name": ...}}.', "tool_choice")


JSON_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_response_format(fmt):
    """OpenAI's response_format: text, json_object, or json_schema with a name and a valid JSON Schema."""
    if fmt is None:
        return
    kind = fmt.get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise ValidationError('`type` must be "text", "json_object" or "json_schema".', "response_format")
    if kind != "json_schema":
        return
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not JSON_SCHEMA_NAME.match(spec["name"]):
        raise ValidationError("`json_schema` needs a `name` of 1-64 letters, digits, underscores or dashes.",
                              "response_format")
    schema = spec.get("schema")
    if schema is not None and (not isinstance(schema, dict) or schema_error(schema)):
        problem = schema_error(schema) if isinstance(schema, dict) else "it must be an object"
        raise ValidationError(f"`json_schema.schema` is not a valid JSON Schema: {problem}", "response_format")


class PromptField(fields.Field):
    """/v1/completions `prompt`: a string, a list of token ids, or a list holding exactly one of those."""
    default_error_messages = {
        "invalid": "Must be a string, a list of token ids, or a list with one of those.",
        "batch": "Only one prompt per request is supported.",
    }

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        elif isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
            raise self.make_error("batch")
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise self.make_error("invalid")


class CompletionRequest(OpenAIRequest):
    prompt = PromptField(required=True)
    echo = JsonBool(load_default=False)
    suffix = fields.String(load_default=None, allow_none=True)
    best_of = fields.Integer(strict=True, load_default=None, allow_none=True)
    logprobs = fields.Integer(strict=True, load_default=None, allow_none=True)

    @validates_schema
    def _completion_features(self, data, **kwargs):
        if data.get("suffix"):
            raise ValidationError("`suffix` (insertion) is not supported by this server.", "suffix")
        if (data.get("best_of") or 1) > 1:
            raise ValidationError("`best_of` > 1 is not supported: the card generates one choice at a time.",
                                  "best_of")
        if data.get("logprobs") is not None:  # even 0, which asks for the sampled token's own logprob
            raise ValidationError("`logprobs` is not supported by this server.", "logprobs")


class TokenizeRequest(_ChatEnding):
    """vLLM's /tokenize (`prompt`, or chat `messages`) and llama.cpp's (`content`)."""
    model = fields.String(load_default=None, allow_none=True)
    prompt = fields.String(load_default=None, allow_none=True)
    messages = fields.List(fields.Nested(ChatMessage), load_default=None, allow_none=True)
    content = fields.String(load_default=None, allow_none=True)
    tools = fields.List(fields.Nested(Tool), load_default=None, allow_none=True)
    add_special_tokens = JsonBool(load_default=None, allow_none=True)  # Qwen2.5 adds none either way
    return_token_strs = JsonBool(load_default=False)
    with_pieces = JsonBool(load_default=False)

    @validates_schema
    def _one_input(self, data, **kwargs):
        given = [name for name in ("prompt", "messages", "content") if data.get(name) is not None]
        if len(given) != 1:
            raise ValidationError("Send exactly one of `prompt`, `messages` (vLLM) or `content` (llama.cpp).",
                                  "prompt")


class DetokenizeRequest(_Lenient):
    model = fields.String(load_default=None, allow_none=True)
    tokens = fields.List(fields.Integer(strict=True), required=True)


CHAT_COMPLETION_REQUEST = ChatCompletionRequest()
COMPLETION_REQUEST = CompletionRequest()
TOKENIZE_REQUEST = TokenizeRequest()
DETOKENIZE_REQUEST = DetokenizeRequest()


# -- Ollama (docs/api.md) --------------------------------------------------------------------------------
class WholeNumber(fields.Field):
    """An integer option of Ollama's: a JSON integer, or a number with nothing after the point (8192.0), as
    Ollama takes it (clients such as Home Assistant send every number as a float). 2.5 is an error."""
    default_error_messages = {"invalid": "Must be a whole number."}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise self.make_error("invalid")


def whole_number(**kwargs):
    return WholeNumber(load_default=None, allow_none=True, **kwargs)


class OllamaOptions(_Lenient):
    """Ollama's `options`. Only num_predict, num_ctx and stop change what we do; the sampling ones are fixed
    when the runner starts, and the rest are type-checked as Ollama checks them, then ignored; options Ollama
    does not know are ignored, as Ollama ignores them."""
    num_predict = whole_number()
    num_ctx = whole_number(validate=validate.Range(min=1))
    stop = StopField(load_default=list)
    temperature = fields.Float(load_default=None, allow_none=True)
    top_k = whole_number()
    top_p = fields.Float(load_default=None, allow_none=True)
    repeat_penalty = fields.Float(load_default=None, allow_none=True)
    seed = whole_number()
    # Ollama's other integer options (api/types.go): accepted whole, as Ollama accepts them.
    num_keep = whole_number()
    repeat_last_n = whole_number()
    num_batch = whole_number()
    num_gpu = whole_number()
    main_gpu = whole_number()
    num_thread = whole_number()


def refuse_images(data):
    if data.get("images"):
        raise ValidationError("this model reads text only; images are not supported", "images")


class OllamaToolCallFunction(_Lenient):
    name = fields.String(required=True)
    arguments = fields.Dict(load_default=dict)


class OllamaToolCall(_Lenient):
    function = fields.Nested(OllamaToolCallFunction, required=True)


class OllamaMessage(_Lenient):
    role = fields.String(required=True, validate=validate.OneOf(("system", "user", "assistant", "tool")))
    content = fields.String(load_default="", allow_none=True)
    images = fields.List(fields.Raw(), load_default=None, allow_none=True)
    tool_calls = fields.List(fields.Nested(OllamaToolCall), load_default=None, allow_none=True)
    tool_name = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def _text_only(self, data, **kwargs):
        refuse_images(data)


class _OllamaRequest(_Lenient):
    model = fields.String(required=True, validate=validate.Length(min=1))
    stream = JsonBool(load_default=True)
    options = fields.Nested(OllamaOptions, load_default=None, allow_none=True)
    keep_alive = fields.Raw(load_default=None, allow_none=True)
    format = fields.Raw(load_default=None, allow_none=True)
    think = fields.Raw(load_default=None, allow_none=True)
    logprobs = fields.Raw(load_default=None, allow_none=True)

    @validates_schema
    def _unsupported(self, data, **kwargs):
        if data.get("logprobs"):
            raise ValidationError("logprobs are not supported by this server", "logprobs")
        fmt = data.get("format")
        if fmt not in (None, "", "json") and not isinstance(fmt, dict):
            raise ValidationError(f'invalid format: {json.dumps(fmt)}; expected "json" or a valid JSON Schema '
                                  "object", "format")
        if isinstance(fmt, dict) and schema_error(fmt):
            raise ValidationError(f"invalid JSON schema in format: {schema_error(fmt)}", "format")
        if data.get("think") not in (None, False):  # Ollama's words for a model without thinking
            raise ValidationError(f"{json.dumps(data.get('model'))} does not support thinking", "think")


class OllamaChatRequest(_OllamaRequest):
    messages = fields.List(fields.Nested(OllamaMessage), load_default=list)
    tools = fields.List(fields.Nested(Tool), load_default=None, allow_none=True)


class OllamaGenerateRequest(_OllamaRequest):
    prompt = fields.String(load_default="", allow_none=True)
    system = fields.String(load_default=None, allow_none=True)
    raw = JsonBool(load_default=False)
    context = fields.List(fields.Integer(strict=True), load_default=None, allow_none=True)
    images = fields.List(fields.Raw(), load_default=None, allow_none=True)
    suffix = fields.String(load_default=None, allow_none=True)
    template = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def _generate_features(self, data, **kwargs):
        refuse_images(data)
        if data.get("suffix"):
            raise ValidationError("suffix (fill-in-the-middle) is not supported", "suffix")
        if data.get("template"):
            raise ValidationError("custom templates are not supported; the model's own chat template is used "
                                  "(or raw: true for none)", "template")


class OllamaModelRequest(_Lenient):
    model = fields.String(load_default=None, allow_none=True)
    name = fields.String(load_default=None, allow_none=True)  # the older spelling

    @validates_schema
    def _named(self, data, **kwargs):
        if not (data.get("model") or data.get("name")):
            raise ValidationError("model is required", "model")


OLLAMA_CHAT_REQUEST = OllamaChatRequest()
OLLAMA_GENERATE_REQUEST = OllamaGenerateRequest()
OLLAMA_MODEL_REQUEST = OllamaModelRequest()
