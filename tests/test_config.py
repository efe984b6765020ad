"""Configuration: defaults, the commented example, one clear line per problem."""
import re
import subprocess
import sys

import pytest
import yaml
from marshmallow import fields

from app import config
from tests.helpers import PROJECT_DIR

EXAMPLE = PROJECT_DIR / "instance" / "config.example.yaml"


def strip_derived(settings):
    settings = {k: v for k, v in settings.items() if k != "source"}
    settings["model"] = {k: v for k, v in settings["model"].items() if k != "tokenizer_dir"}
    settings["server"] = {k: v for k, v in settings["server"].items() if k != "api_keys"}
    return settings


def test_the_example_documents_exactly_the_defaults():
    example = yaml.safe_load(EXAMPLE.read_text())
    assert strip_derived(config.load(example)) == strip_derived(config.load({}))
    # Every key of the schema appears in the example (so every key is documented there).
    defaults = strip_derived(config.load({}))
    for section, values in defaults.items():
        for key in values:
            assert key in example[section], f"{section}.{key} is missing from {EXAMPLE.name}"


def schema_keys(schema, prefix=""):
    """Every key of the configuration's schema, dotted (a nested section below the top level is a key too)."""
    for name, field in schema.fields.items():
        if isinstance(field, fields.Nested):
            if prefix:
                yield prefix + name
            yield from schema_keys(field.schema, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_every_key_is_documented_once_in_configuration_md_and_no_other():
    table = re.findall(r"^\| `([a-z_.]+)` \|", (PROJECT_DIR / "docs" / "CONFIGURATION.md").read_text(), re.M)
    assert sorted(table) == sorted(schema_keys(config.CONFIG))


def test_one_line_per_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: eighty\n  colour: blue\nrunner:\n  binary: ''\n  emulator: {fault: melt}\n"
                   "generation:\n  max_tokens: 5000\n")
    done = subprocess.run([sys.executable, "-m", "app.config"], cwd=PROJECT_DIR, capture_output=True, text=True,
                          env={"QWEN_CHAT_CONFIG": str(bad), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0] == f"invalid configuration in {bad}:"
    problems = sorted(line.strip().split(":")[0] for line in lines[1:])
    assert problems == ["generation.max_tokens", "runner.binary", "runner.emulator.fault", "server.colour",
                        "server.port"]


@pytest.mark.parametrize("text, problem", [
    ("server: [1, 2]", "server: must be a mapping"),
    ("{not yaml", "not valid YAML"),
    ("- a list", "must be a mapping"),
])
def test_unreadable_files(tmp_path, monkeypatch, text, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    monkeypatch.setenv("QWEN_CHAT_CONFIG", str(path))
    with pytest.raises(config.ConfigError) as caught:
        config.load()
    assert any(problem in line for line in caught.value.problems)


def test_file_from_the_environment_and_api_keys(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9000\n  api_key: [one, two]\nmodel:\n  dir: /opt/model\n")
    monkeypatch.setenv("QWEN_CHAT_CONFIG", str(path))
    monkeypatch.setenv("QWEN_CHAT_API_KEY", "three, four")
    settings = config.load()
    assert settings["server"]["port"] == 9000 and settings["source"] == str(path)
    assert settings["server"]["api_keys"] == ["one", "two", "three", "four"]
    assert settings["model"]["dir"] == "/opt/model"


def test_relative_model_dir_is_under_the_project():
    assert config.load({"model": {"dir": "models/x"}})["model"]["dir"] == str(PROJECT_DIR / "models" / "x")


def test_sampling_becomes_post_config():
    from app.runner.command import post_config
    assert post_config(config.load({})["sampling"]) == {
        "enable_temperature": True, "temperature": 0.7, "enable_top_k_sampling": True, "top_k": 40,
        "enable_top_p_sampling": True, "top_p": 0.9, "enable_repetition_penalty": True,
        "repetition_penalty": 1.1, "penalty_window": 20}
    off = post_config({"temperature": None, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0})
    assert not any(off[k] for k in off if k.startswith("enable_"))
