"""What the tests share besides fixtures (those are in conftest.py): the emulated runner, a live gunicorn,
nginx in front, SSE parsing, and the request helpers. One of each."""
from helpers.emulated import (EMULATOR, MODEL, answer_to, emulator_command, emulator_env, prompt_ids, said, settings,
                              spawn_as_runner)
from helpers.live import LiveServer, alive, children, free_port, wait_for
from helpers.nginx import Nginx
from helpers.requests import chat, sse_events

from app.paths import PROJECT_DIR

__all__ = ["EMULATOR", "MODEL", "PROJECT_DIR", "LiveServer", "Nginx", "alive", "answer_to", "chat", "children",
           "emulator_command", "emulator_env", "free_port", "prompt_ids", "said", "settings", "spawn_as_runner",
           "sse_events", "wait_for"]
