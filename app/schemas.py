"""Every marshmallow schema of the service, created once: the configuration file and the request bodies."""
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, pre_load, validate, validates_schema


class _Strict(Schema):
    class Meta:
        unknown = RAISE

    @pre_load
    def _sections(self, data, **kwargs):
        # A missing section, or one written as "server:" with nothing under it, gets its defaults.
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValidationError("must be a mapping")
        data = dict(data)
        for name, field in self.fields.items():
            if isinstance(field, fields.Nested) and data.get(name) is None:
                data[name] = {}
        return data


# -- configuration (instance/config.yaml; every key documented in README.md) ----------------------------
class ServerConfig(_Strict):
    host = fields.String(load_default="127.0.0.1")
    port = fields.Integer(load_default=8000, validate=validate.Range(1, 65535))
    threads = fields.Integer(load_default=64, validate=validate.Range(2, 1024))
    max_body_bytes = fields.Integer(load_default=1 << 20, validate=validate.Range(1024, 1 << 30))
    max_queue = fields.Integer(load_default=32, validate=validate.Range(1, 10000))
    queue_timeout = fields.Float(load_default=300.0, validate=validate.Range(min=0, min_inclusive=False))
    api_key = fields.Raw(load_default=None)
    cors_origins = fields.List(fields.String(), load_default=list)
    log_prompts = fields.Boolean(load_default=False)

    @validates_schema
    def _threads_for_the_queue(self, data, **kwargs):
        # Every waiting request holds a thread; keep some for the running one, /health and /metrics.
        if data.get("max_queue", 0) > data.get("threads", 0) - 4:
            raise ValidationError(f"must be at most threads - 4 ({data.get('threads', 0) - 4}): each waiting "
                                  "request holds a thread, and /health must still be answered", "max_queue")

    @validates_schema
    def _api_key(self, data, **kwargs):
        key = data.get("api_key")
        if key is not None and not (isinstance(key, str) or (
                isinstance(key, list) and all(isinstance(k, str) and k for k in key))):
            raise ValidationError("must be a string or a list of strings", "api_key")


class ModelConfig(_Strict):
    name = fields.String(load_default="Qwen2.5-1.5B-Instruct", validate=validate.Length(min=1))
    aliases = fields.List(fields.String(validate=validate.Length(min=1)),
                          load_default=lambda: ["qwen2.5", "qwen2.5:1.5b", "qwen2.5-1.5b-instruct"])
    dir = fields.String(load_default="models/Qwen2.5-1.5B-Instruct-GPTQ-Int4")


class EmulatorConfig(_Strict):
    token_ms = fields.Float(load_default=70.0, validate=validate.Range(min=0))
    load_ms = fields.Float(load_default=0.0, validate=validate.Range(min=0))
    fault = fields.String(load_default="", validate=validate.Regexp(
        r"^((crash|hang|dead)(:\d+)?|slow_start|start_fail|no_permission)?$",
        error="must be one of crash[:N], hang[:N], dead[:N], slow_start, start_fail, no_permission"))
    fault_file = fields.String(load_default=None, allow_none=True)
    trace = fields.String(load_default=None, allow_none=True)


class RunnerConfig(_Strict):
    binary = fields.String(load_default="auto", validate=validate.Length(min=1))
    startup_timeout = fields.Float(load_default=120.0, validate=validate.Range(min=0, min_inclusive=False))
    stall_timeout = fields.Float(load_default=30.0, validate=validate.Range(min=0, min_inclusive=False))
    backoff_initial = fields.Float(load_default=0.5, validate=validate.Range(min=0))
    backoff_max = fields.Float(load_default=60.0, validate=validate.Range(min=0))
    emulator = fields.Nested(EmulatorConfig)


class SamplingConfig(_Strict):
    temperature = fields.Float(load_default=0.7, allow_none=True, validate=validate.Range(min=0))
    top_k = fields.Integer(load_default=40, allow_none=True, validate=validate.Range(min=0))
    top_p = fields.Float(load_default=0.9, allow_none=True, validate=validate.Range(0, 1))
    repetition_penalty = fields.Float(load_default=1.1, allow_none=True, validate=validate.Range(min=0))
    penalty_window = fields.Integer(load_default=20, validate=validate.Range(min=1))


class GenerationConfig(_Strict):
    max_tokens = fields.Integer(load_default=512, validate=validate.Range(1, 1024))
    timeout = fields.Float(load_default=600.0, validate=validate.Range(min=0, min_inclusive=False))
    heartbeat_seconds = fields.Float(load_default=10.0, validate=validate.Range(min=0, min_inclusive=False))


class Config(_Strict):
    server = fields.Nested(ServerConfig)
    model = fields.Nested(ModelConfig)
    runner = fields.Nested(RunnerConfig)
    sampling = fields.Nested(SamplingConfig)
    generation = fields.Nested(GenerationConfig)


CONFIG = Config()


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
        return "".join(texts)


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


class _Sampling(_Lenient):
    """Sampling fields every client sends. The card's sampling is fixed when the runner starts, so these are
    accepted (and type-checked) but do not change the output; see README."""
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

    @validates_schema
    def _what_the_card_cannot_do(self, data, **kwargs):
        if (data.get("n") or 1) > 1:
            raise ValidationError("`n` > 1 is not supported: the card generates one choice at a time.", "n")
        if data.get("logit_bias"):
            raise ValidationError("`logit_bias` is not supported: the card's sampling is fixed.", "logit_bias")
        options = data.get("stream_options")
        if options is not None and not isinstance(options.get("include_usage", False), bool):
            raise ValidationError("`include_usage` must be a boolean.", "stream_options")


class ChatCompletionRequest(_Sampling):
    model = fields.String(required=True, validate=validate.Length(min=1))
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
        fmt = data.get("response_format")
        if fmt is not None and fmt.get("type", "text") != "text":
            raise ValidationError("Only `response_format` {\"type\": \"text\"} is supported: the card's output "
                                  "cannot be constrained.", "response_format")
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


class CompletionRequest(_Sampling):
    model = fields.String(required=True, validate=validate.Length(min=1))
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
        if data.get("logprobs"):
            raise ValidationError("`logprobs` is not supported by this server.", "logprobs")


CHAT_COMPLETION_REQUEST = ChatCompletionRequest()
COMPLETION_REQUEST = CompletionRequest()


# -- Ollama (docs/api.md) --------------------------------------------------------------------------------
class OllamaOptions(_Lenient):
    """Ollama's `options`. Only these change what we do; the sampling ones are fixed when the runner starts
    and every other option is accepted and ignored, as Ollama itself ignores unknown ones."""
    num_predict = fields.Integer(strict=True, load_default=None, allow_none=True)
    num_ctx = fields.Integer(strict=True, load_default=None, allow_none=True, validate=validate.Range(min=1))
    stop = StopField(load_default=list)
    temperature = fields.Float(load_default=None, allow_none=True)
    top_k = fields.Integer(strict=True, load_default=None, allow_none=True)
    top_p = fields.Float(load_default=None, allow_none=True)
    repeat_penalty = fields.Float(load_default=None, allow_none=True)
    seed = fields.Integer(strict=True, load_default=None, allow_none=True)


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
        if data.get("format") not in (None, ""):
            raise ValidationError("structured outputs are not supported: the card's output cannot be "
                                  "constrained", "format")
        if data.get("think") not in (None, False):
            raise ValidationError("this model does not support thinking", "think")


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
