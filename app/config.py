"""The service's configuration: the YAML file named by QWEN_CHAT_CONFIG, else instance/config.yaml, else
built-in defaults; validated at start, one clear line per problem.

    python -m app.config [KEY]   prints the resolved configuration (or one dotted key), or the problems
    python -m app.config --check prints nothing and exits 0 when the configuration is valid
"""
import os
import re
import sys
from pathlib import Path

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, pre_load, validate, validates_schema

from app.paths import INSTANCE_DIR, PROJECT_DIR

ENV_CONFIG = "QWEN_CHAT_CONFIG"
ENV_API_KEY = "QWEN_CHAT_API_KEY"
ENV_INSTANCE = "QWEN_CHAT_INSTANCE"
TOKENIZER_SUBDIR = "qwen2.5_tokenizer"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line each."""

    def __init__(self, source, problems):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid configuration in {source}:\n" + "\n".join(f"  {p}" for p in problems))


# -- the schema (every key documented in docs/CONFIGURATION.md and instance/config.example.yaml) ------
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


class ServerConfig(_Strict):
    host = fields.String(load_default="127.0.0.1")
    port = fields.Integer(load_default=8000, validate=validate.Range(1, 65535))
    threads = fields.Integer(load_default=64, validate=validate.Range(2, 1024))
    max_body_bytes = fields.Integer(load_default=1 << 20, validate=validate.Range(1024, 1 << 30))
    max_queue = fields.Integer(load_default=32, validate=validate.Range(1, 10000))
    request_timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0, min_inclusive=False))
    max_connections = fields.Integer(load_default=256, validate=validate.Range(8, 65536))
    max_partial_requests = fields.Integer(load_default=64, validate=validate.Range(min=1))
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
    def _room_for_connections(self, data, **kwargs):
        # Every thread serves a connection; partly received requests must leave room for whole ones.
        connections = data.get("max_connections", 0)
        if data.get("threads", 0) >= connections:
            raise ValidationError(f"must be more than threads ({data.get('threads')}): each thread serves a "
                                  "connection, and others wait for their next request", "max_connections")
        if data.get("max_partial_requests", 0) >= connections:
            raise ValidationError(f"must be less than max_connections ({connections}): requests that arrive "
                                  "whole must still find a connection", "max_partial_requests")

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
    idle_probe_seconds = fields.Float(load_default=30.0, validate=validate.Range(min=0))
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


class ContextConfig(_Strict):
    overflow = fields.String(load_default="truncate", validate=validate.OneOf(("truncate", "error")))
    reserve_tokens = fields.Integer(load_default=256, validate=validate.Range(1, 1023))
    # The answer's room when only some tool definitions fit: a tool call is short (docs/API.md, "Home Assistant").
    tool_reserve_tokens = fields.Integer(load_default=80, validate=validate.Range(1, 1023))
    # What one request may hold (a 400 beyond): far above real clients (Open WebUI: 200 messages, 36 tools).
    max_messages = fields.Integer(load_default=2000, validate=validate.Range(1, 1_000_000))
    max_tools = fields.Integer(load_default=512, validate=validate.Range(0, 1_000_000))


def _regex(value):
    try:
        re.compile(value)
    except re.error as exc:
        raise ValidationError(f"not a valid regular expression: {exc}") from None


class BackgroundRule(_Strict):
    """One way to recognise background work: a regular expression searched in the last user message, in
    any system message, in the model name, or in a request header's value."""
    last_user_message = fields.String(validate=_regex)
    system_message = fields.String(validate=_regex)
    model = fields.String(validate=_regex)
    header = fields.String(validate=validate.Regexp(r"^[A-Za-z0-9-]{1,64}$", error="must be a header name"))
    pattern = fields.String(validate=_regex)

    @validates_schema
    def _one_kind(self, data, **kwargs):
        kinds = [k for k in ("last_user_message", "system_message", "model", "header") if k in data]
        if len(kinds) != 1:
            raise ValidationError("a rule has exactly one of last_user_message, system_message, model, header")
        if ("pattern" in data) != ("header" in data):
            raise ValidationError("`header` rules need a `pattern` (and only they have one)")


# Open WebUI's background tasks (title, tags, follow-ups, queries, autocomplete, image prompt, context
# compaction) start their only user message with "### Task:"; emoji generation has its own first words; tool
# selection in Legacy mode and memory review start a system message. Requests can also say it themselves.
DEFAULT_BACKGROUND_RULES = [
    {"last_user_message": r"^### Task:"},
    {"last_user_message": r"^Your task is to reflect the speaker's likely facial expression"},
    {"system_message": r"^(Available Tools: |You are Open WebUI's private memory reviewer)"},
    {"header": "Priority", "pattern": r"(^|,)\s*u=7\s*(,|;|$)"},
    {"header": "X-Qwen-Task", "pattern": r"\S"},
]


class SchedulingConfig(_Strict):
    preempt = fields.Boolean(load_default=True)
    background = fields.List(fields.Nested(BackgroundRule), load_default=lambda: [dict(r) for r in
                                                                                 DEFAULT_BACKGROUND_RULES])


class Config(_Strict):
    server = fields.Nested(ServerConfig)
    model = fields.Nested(ModelConfig)
    runner = fields.Nested(RunnerConfig)
    sampling = fields.Nested(SamplingConfig)
    generation = fields.Nested(GenerationConfig)
    context = fields.Nested(ContextConfig)
    scheduling = fields.Nested(SchedulingConfig)


CONFIG = Config()


def field_problems(messages, parts=()):
    """marshmallow's nested error messages as (path, text) pairs: ("messages[0].role", "Must be one of...").
    A problem with the whole object has the empty path."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            yield from field_problems(value, parts if key == "_schema" else parts + (key,))
    elif isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages):
        yield _path(parts), " ".join(messages)
    elif isinstance(messages, list):
        for item in messages:
            yield from field_problems(item, parts)
    else:
        yield _path(parts), str(messages)


def _path(parts):
    """("messages", 0, "role") -> "messages[0].role" """
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def problem_lines(messages):
    """marshmallow's nested errors -> ["server.port: Not a valid integer.", ...]"""
    return [f"{path or 'configuration'}: {text}" for path, text in field_problems(messages)]


def config_source():
    named = os.environ.get(ENV_CONFIG)
    if named:
        return Path(named)
    default = INSTANCE_DIR / "config.yaml"
    return default if default.is_file() else None


def load(overrides=None):
    """Validated settings as plain dicts. `overrides` (tests) replaces the file and is read the same way."""
    if overrides is not None:
        source, raw = "test configuration", overrides
    else:
        path = config_source()
        source = str(path) if path else "built-in defaults"
        raw = {}
        if path is not None:
            try:
                raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(source, [f"cannot read the file: {exc.strerror}"]) from None
            except yaml.YAMLError as exc:
                raise ConfigError(source, [f"not valid YAML: {exc}".replace("\n", " ")]) from None
    try:
        settings = CONFIG.load(raw if raw is not None else {})
    except ValidationError as exc:
        raise ConfigError(source, problem_lines(exc.messages)) from None
    settings["source"] = source
    return resolve(settings)


def resolve(settings):
    """Derived values: absolute paths, the tokenizer folder, API keys from the environment."""
    model_dir = Path(settings["model"]["dir"])
    if not model_dir.is_absolute():
        model_dir = PROJECT_DIR / model_dir
    settings["model"]["dir"] = str(model_dir)
    repo_tokenizer = model_dir / TOKENIZER_SUBDIR
    settings["model"]["tokenizer_dir"] = str(
        repo_tokenizer if (repo_tokenizer / "tokenizer.json").is_file() else INSTANCE_DIR / TOKENIZER_SUBDIR)
    keys = settings["server"]["api_key"]
    keys = [keys] if isinstance(keys, str) else list(keys or [])
    keys += [k.strip() for k in os.environ.get(ENV_API_KEY, "").split(",") if k.strip()]
    settings["server"]["api_keys"] = [k for k in keys if k]
    return settings


def main(argv):
    try:
        settings = load()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if argv and argv[0] == "--check":
        return 0
    if argv:
        value = settings
        for part in argv[0].split("."):
            value = value[part]
        print(value)
    else:
        print(yaml.safe_dump({k: v for k, v in settings.items() if k != "source"}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
