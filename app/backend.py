"""What both APIs stand on: the tokenizer, the card (with the runner and its tokenizer service), the model's
names."""
import functools
import logging
import subprocess
import threading
import time
from pathlib import Path

from flask import current_app

from app.paths import PROJECT_DIR
from app.errors import ModelNotFound
from app.runner.card import Card, CardOptions, CardState
from app.scheduling import Classifier
from app.tokenizer.qwen import QwenTokenizer

log = logging.getLogger(__name__)


class SetupError(Exception):
    pass


def current_backend():
    """The Backend of the app handling this request (as flaskr's get_db())."""
    return current_app.extensions["qwen"]


@functools.lru_cache(maxsize=2)
def load_tokenizer(folder):
    """One tokenizer per folder per process (it is read-only; apps created in tests share it)."""
    if not (Path(folder) / "tokenizer.json").is_file():
        raise SetupError(f"no tokenizer in {folder}: run scripts/setup (it builds one when the model "
                         "repository is absent)")
    return QwenTokenizer(folder)


@functools.lru_cache(maxsize=1)
def build_id():
    """The checkout's commit, or "dev" where there is no git (a copied tree)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "dev"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "dev"


class Backend:
    def __init__(self, settings, instance_path):
        self.settings = settings
        model = settings["model"]
        self.model_name = model["name"]
        self.aliases = {name.lower() for name in [model["name"], *model["aliases"]]}
        self.tokenizer = load_tokenizer(model["tokenizer_dir"])
        self.card = Card(self.tokenizer, CardOptions.from_settings(settings, instance_path))
        # OpenAI's system_fingerprint: this build and what runs the model, e.g. qwen-chat-0ba9667a1c-emulated.
        # Found at start-up (git runs once per process), not by the first request.
        self.fingerprint = f"qwen-chat-{build_id()}-{'emulated' if self.card.emulated else 'card'}"
        self.request_class = Classifier(settings["scheduling"]["background"]).request_class
        self.started_at = time.monotonic()
        self.created = int(time.time())
        self._stop_lock = threading.Lock()
        self._stopped = False

    def start(self):
        self.card.start()
        if self.card.emulated:
            log.warning("EMULATED RUNNER: no LLM-8850 card is used; answers come from %s",
                        self.card.program.description)
        return self

    def stop(self):
        """Idempotent and safe from several threads (the SIGTERM hook and atexit both call it)."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            self.card.stop()

    @functools.cached_property
    def model_size(self):
        """Bytes of the model folder (0 without one); read once, it does not change while we run."""
        model_dir = Path(self.settings["model"]["dir"])
        if not model_dir.is_dir():
            return 0
        return sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file() and ".git" not in p.parts)

    def check_model(self, name):
        """A name of the served model (the configured one or an alias, in any case; Ollama's clients may add the
        default tag ":latest"), or none at all (absent, null or ""), which means the served model. Else
        ModelNotFound (404)."""
        if name in (None, ""):
            return
        lowered = name.lower() if isinstance(name, str) else None
        if lowered not in self.aliases and not (
                lowered is not None and lowered.endswith(":latest") and lowered[:-len(":latest")] in self.aliases):
            raise ModelNotFound(name, self.model_name)

    @property
    def window(self):
        """The card's window in tokens, as its runner reports it (the layer models' mask size - 1)."""
        return self.card.window

    def health(self):
        """(body, ok) for /health: judged from what the runner itself does and prints."""
        card = self.card
        model = {CardState.READY: "loaded", CardState.LOADING: "loading",
                 CardState.STARTING: "loading"}.get(card.state, "unavailable")
        details = {
            "tokenizer": "running" if card.service.running else "stopped",
            "model": model,
            "npu": card.npu,
            "uptime_seconds": int(time.monotonic() - self.started_at),
            "runner": card.program.description,
            "queue_depth": card.queue_depth,
            "queue": card.queue_depths(),
            "restarts": card.restarts,
        }
        if model == "loading":
            step, total = card.loading
            details["progress"] = {"step": step, "total": total}
        if card.reason:
            details["reason" if card.state == CardState.UNAVAILABLE else "last_error"] = card.reason
        ok = details["tokenizer"] == "running" and model == "loaded"
        status = "ok" if ok else ("loading" if model == "loading" else "unavailable")
        return {"status": status, "details": details}, ok
