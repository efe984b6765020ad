"""The emulated runner as tests use it: its command, its environment, its deterministic answer, and service
settings that run it at full speed."""
import os

from app.paths import PROJECT_DIR
from app.runner import command, emulated_model, emulator, protocol

EMULATOR = command.EMULATOR
MODEL = "Qwen2.5-1.5B-Instruct"  # the served name; requests may also use an alias such as "qwen2.5"


def emulator_command(model_dir, tokenizer_url, mask=emulated_model.DEFAULT_MASK):
    """The emulated runner's command line, as the Card builds it, on an emulated model folder written first
    (its layer files give the window: mask - 1)."""
    emulated_model.write(model_dir, mask)
    return EMULATOR + protocol.vendor_flags(str(model_dir), tokenizer_url)


def said(text):
    """The emulated runner's answer to a last user turn (or raw prompt) of `text`, before any counting."""
    return emulator.SAID.format(text)


# Its whole answer to `text`: what it said, then "1, 2, ..., N." when asked to count.
answer_to = emulator.plain_reply


def prompt_ids(tokenizer, *turns, system=None):
    """The ids of a conversation of alternating user and assistant turns (and a system prompt)."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return tokenizer.chat_ids(messages)


def emulator_env(tokenizer, **settings):
    """The emulator's environment (at 0 ms/token unless `token_ms` says otherwise)."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR), QWEN_EMULATOR_TOKENIZER=tokenizer.folder)
    env.setdefault("QWEN_EMULATOR_TOKEN_MS", "0")
    for key, value in settings.items():
        env[f"QWEN_EMULATOR_{key.upper()}"] = str(value)
    return env


def settings(**sections):
    """Service configuration for tests: the emulated runner at full speed unless a test says otherwise."""
    base = {"runner": {"binary": "emulator", "emulator": {"token_ms": 0}, "backoff_initial": 0.05}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
        if name == "runner" and "emulator" in values:
            base[name]["emulator"] = {"token_ms": 0, **values["emulator"]}
    return base


def spawn_as_runner(service, start):
    """Start a process as the Runner starts the runner: admitted by the tokenizer service (which serves nobody
    else), its first calls waiting for the pid if they come before `start()` returns. Returns the process."""
    with service.peers.spawning() as admit:
        process = start()
        admit(process.pid)
    return process
