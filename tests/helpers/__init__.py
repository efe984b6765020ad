"""What the tests (and the benchmarks) share besides fixtures (those are in conftest.py): the emulated runner, a
live service, nginx in front, SSE parsing, and the request helpers. One of each. A package of the project
(pyproject.toml): importable wherever the project is installed."""
from app.paths import PROJECT_DIR
from tests.helpers.emulated import (EMULATOR, MODEL, answer_to, emulator_command, emulator_env, prompt_ids, said,
                                    settings, spawn_as_runner)
from tests.helpers.live import LiveServer, alive, children, free_port, wait_for
from tests.helpers.nginx import Nginx
from tests.helpers.requests import chat, sse_events

__all__ = ["EMULATOR", "MODEL", "PROJECT_DIR", "LiveServer", "Nginx", "alive", "answer_to", "chat", "children",
           "emulator_command", "emulator_env", "free_port", "prompt_ids", "said", "settings", "spawn_as_runner",
           "sse_events", "wait_for"]
