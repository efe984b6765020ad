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
    threads = fields.Integer(load_default=32, validate=validate.Range(2, 1024))
    max_body_bytes = fields.Integer(load_default=1 << 20, validate=validate.Range(1024, 1 << 30))
    max_queue = fields.Integer(load_default=16, validate=validate.Range(0, 10000))
    queue_timeout = fields.Float(load_default=300.0, validate=validate.Range(min=0, min_inclusive=False))
    api_key = fields.Raw(load_default=None)
    cors_origins = fields.List(fields.String(), load_default=list)
    log_prompts = fields.Boolean(load_default=False)

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
