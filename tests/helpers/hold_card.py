"""A separate process that drives the card: prints its state as JSON lines, then waits to be killed.

    python tests/helpers/hold_card.py LOCK_PATH WORKDIR
"""
import json
import sys
import threading
from pathlib import Path


from app import config
from app.runner.card import Card, CardOptions
from app.tokenizer.qwen import QwenTokenizer


def main(lock_path, workdir):
    tokenizer = QwenTokenizer(config.load({})["model"]["tokenizer_dir"])
    card = Card(tokenizer, CardOptions(model_dir=Path(workdir) / "model", binary="emulator", workdir=Path(workdir),
                                       lock_path=Path(lock_path), emulator={"token_ms": 0},
                                       backoff_initial=30)).start()
    state = card.wait_ready(60)
    pid = card.runner.pid if card.runner else None
    print(json.dumps({"state": state, "reason": card.reason, "runner_pid": pid}), flush=True)
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main(*sys.argv[1:3])
