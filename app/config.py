"""The service's configuration: the YAML file named by QWEN_CHAT_CONFIG, else instance/config.yaml, else
built-in defaults; validated at start, one clear line per problem.

    python -m app.config [KEY]   prints the resolved configuration (or one dotted key), or the problems
    python -m app.config --check prints nothing and exits 0 when the configuration is valid
"""
import os
import sys
from pathlib import Path

import yaml
from marshmallow import ValidationError

from app.schemas import CONFIG

PROJECT_DIR = Path(__file__).resolve().parents[1]
INSTANCE_DIR = PROJECT_DIR / "instance"
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


def _flatten(messages, prefix=""):
    """marshmallow's nested error dict -> ["server.port: Not a valid integer.", ...]"""
    if isinstance(messages, dict):
        lines = []
        for key, value in messages.items():
            name = prefix if key == "_schema" else (f"{prefix}.{key}" if prefix else str(key))
            lines += _flatten(value, name)
        return lines
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{prefix or 'configuration'}: {' '.join(messages)}"]
    if isinstance(messages, list):
        return [line for m in messages for line in _flatten(m, prefix)]
    return [f"{prefix}: {messages}"]


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
        raise ConfigError(source, _flatten(exc.messages)) from None
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
