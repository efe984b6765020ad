"""A Card in a process of its own, for tests that need its limits or its view of /proc to differ from the
test's (a low RLIMIT_NOFILE; /proc hidden in a mount namespace). Driven by JSON lines:

    python -m tests.helpers.card_process WORKDIR NOFILE_LIMIT(0: unchanged)

It prints {"state", "reason", "url", "runner_pid"} once the card is ready or unavailable, then
answers each line on stdin: {"generate": text} -> {"text", "finish_reason"}; {"restart": true} (kill the
runner, wait for the Card to start a new one) -> {"runner_pid", "state"}; {"failures": n} (wait until the card
has failed n times in a row) -> {"failures", "state"}. Its log goes to stderr.
"""
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path


from app import config
from app.runner.card import Card, CardOptions
from app.tokenizer.qwen import QwenTokenizer
from tests.helpers import PROJECT_DIR
from tests.helpers.jobs import result_of, spec_for


def start_card_process(workdir, nofile=0, wrap=()):
    """(For tests) this script in a process of its own, and the first line it prints (ready or unavailable)."""
    card = subprocess.Popen([*wrap, sys.executable, "-m", "tests.helpers.card_process", str(workdir), str(nofile)],
                            cwd=PROJECT_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return card, json.loads(card.stdout.readline())


def ask(card, **command):
    """(For tests) one command to a card process, and its answer."""
    card.stdin.write(json.dumps(command) + "\n")
    card.stdin.flush()
    return json.loads(card.stdout.readline())


def say(obj):
    print(json.dumps(obj), flush=True)


def restart(card):
    old = card.runner.pid
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        runner = card.runner
        if runner is not None and runner.pid != old and card.state == "ready":
            return {"runner_pid": runner.pid, "state": card.state}
        time.sleep(0.02)
    return {"runner_pid": None, "state": card.state}


def failures(card, count):
    deadline = time.monotonic() + 30
    while card.failures < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"failures": card.failures, "state": card.state}


def main(workdir, nofile):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    tokenizer = QwenTokenizer(config.load({})["model"]["tokenizer_dir"])
    card = Card(tokenizer, CardOptions(model_dir=Path(workdir) / "model", binary="emulator", workdir=Path(workdir),
                                       lock_path=Path(workdir) / "card.lock", emulator={"token_ms": 0},
                                       backoff_initial=0.05)).start()
    state = card.wait_ready(60)
    say({"state": state, "reason": card.reason, "url": card.service.url,
         "runner_pid": card.runner.pid if card.runner else None})
    for line in sys.stdin:
        command = json.loads(line)
        if "generate" in command:
            try:
                result = result_of(card.submit(spec_for(tokenizer, command["generate"])), 60)
                say({"text": result.text, "finish_reason": result.finish_reason})
            except Exception as exc:  # the test reads what failed
                say({"error": f"{type(exc).__name__}: {exc}"})
        elif "restart" in command:
            say(restart(card))
        elif "failures" in command:
            say(failures(card, command["failures"]))
    card.stop()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
