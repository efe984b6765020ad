"""Shared fixtures. Everything that touches the runner goes through a real child process under a real pty."""
import os
import sys
from pathlib import Path

import pytest

from app import config
from app.runner import protocol
from app.runner.card import Card
from app.runner.driver import Runner
from app.tokenizer.qwen import QwenTokenizer
from app.tokenizer.service import TokenizerService

PROJECT_DIR = Path(__file__).resolve().parents[1]
EMULATOR = [sys.executable, "-m", "app.runner.emulator"]


def said(text):
    """The emulated runner's answer to a last user turn (or raw prompt) of `text`."""
    return f'Emulated runner (no NPU card here). You said: "{text}"'


def wait_for(predicate, timeout=30.0, what="condition"):
    """Poll a condition until it holds, with a deadline (a service still starting may refuse connections)."""
    import time
    import httpx
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def alive(pid):
    """Whether a process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


@pytest.fixture(scope="session")
def tokenizer():
    return QwenTokenizer(config.load({})["model"]["tokenizer_dir"])


@pytest.fixture(scope="session")
def service(tokenizer):
    service = TokenizerService(tokenizer).start()
    yield service
    service.stop()


def emulator_env(tokenizer, **settings):
    env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR), QWEN_EMULATOR_TOKENIZER=tokenizer.folder)
    env.setdefault("QWEN_EMULATOR_TOKEN_MS", "0")
    for key, value in settings.items():
        env[f"QWEN_EMULATOR_{key.upper()}"] = str(value)
    return env


@pytest.fixture
def make_runner(tokenizer, service, tmp_path):
    """make_runner(token_ms=0, fault=..., stall_timeout=...) -> a Runner on the emulator, closed afterwards."""
    runners = []

    def make(stall_timeout=30.0, startup_timeout=30.0, on_progress=None, **settings):
        env = emulator_env(tokenizer, **settings)
        command = EMULATOR + protocol.vendor_flags(str(tmp_path / "model"), service.url)
        runner = Runner(command, service, tmp_path, env=env, startup_timeout=startup_timeout,
                        stall_timeout=stall_timeout, on_progress=on_progress)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.close()


@pytest.fixture
def make_card(tokenizer, service, tmp_path):
    """make_card(emulator={...}, stall_timeout=...) -> a started Card on the emulator, stopped afterwards."""
    cards = []

    def make(emulator=None, lock_path=None, **options):
        emulator = {"token_ms": 0, **(emulator or {})}
        options.setdefault("backoff_initial", 0.05)
        card = Card(tokenizer, service, model_dir=tmp_path / "model", binary="emulator",
                    workdir=tmp_path / "runner", lock_path=lock_path or tmp_path / "card.lock",
                    emulator=emulator, **options).start()
        cards.append(card)
        return card

    yield make
    for card in cards:
        card.stop()


# -- the application --------------------------------------------------------------------------------------
def settings(**sections):
    """Configuration for tests: the emulated runner at full speed unless a test says otherwise."""
    base = {"runner": {"binary": "emulator", "emulator": {"token_ms": 0}, "backoff_initial": 0.05}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
        if name == "runner" and "emulator" in values:
            base[name]["emulator"] = {"token_ms": 0, **values["emulator"]}
    return base


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    from app import create_app
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path_factory.mktemp("instance")),
                      "SETTINGS": settings()})
    assert app.extensions["qwen"].card.wait_ready(60) == "ready"
    yield app
    app.extensions["qwen"].stop()


@pytest.fixture
def client(app):
    return app.test_client()


# -- a real gunicorn ------------------------------------------------------------------------------------
class LiveServer:
    """gunicorn running scripts/gunicorn.conf.py on a free port, with its own config and instance folder."""

    def __init__(self, workdir, config_settings, env=None):
        import subprocess
        import yaml
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config_settings))
        self.log_path = self.workdir / "gunicorn.log"
        self.env = dict(os.environ, QWEN_CHAT_CONFIG=str(self.config_path),
                        QWEN_CHAT_INSTANCE=str(self.workdir / "instance"), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "scripts/gunicorn.conf.py", "--bind", "127.0.0.1:0"],
            cwd=PROJECT_DIR, env=self.env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        self.url = "http://127.0.0.1:%d" % self._wait_for_port()

    def log(self):
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self, timeout=60):
        import re
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError("gunicorn exited:\n" + self.log())
            time.sleep(0.05)
        raise RuntimeError("gunicorn did not start:\n" + self.log())

    def wait_healthy(self, timeout=60):
        import time
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the service never became healthy:\n" + self.log())

    def metric(self, name):
        """A sample without labels from /metrics (qwen_chat_card_busy, qwen_chat_queue_depth, ...)."""
        import httpx
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_until_idle(self, timeout=3.0):
        """Until the card is neither generating nor has anyone waiting."""
        wait_for(lambda: not self.metric("qwen_chat_card_busy") and not self.metric("qwen_chat_queue_depth"),
                 timeout, "an idle card")

    def wait_until_busy(self, timeout=30.0):
        """Until the card is generating."""
        wait_for(lambda: self.metric("qwen_chat_card_busy") == 1, timeout, "a busy card")

    def worker_pids(self):
        return children(self.proc.pid)

    def runner_pids(self):
        return [pid for worker in self.worker_pids() for pid in children(worker)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def children(pid):
    """Direct children of a process, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture
def start_server(tmp_path):
    """start_server(runner={...}, ...) -> a healthy LiveServer with those settings; stopped afterwards."""
    servers = []

    def start(wait=True, env=None, **sections):
        server = LiveServer(tmp_path / f"server{len(servers)}", settings(**sections), env=env)
        servers.append(server)
        return server.wait_healthy() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One shared gunicorn for a test module, on the emulated runner at full speed."""
    server = LiveServer(tmp_path_factory.mktemp("server"), settings()).wait_healthy()
    yield server
    server.stop()


@pytest.fixture
def make_app(tmp_path):
    """make_app(server={...}, runner={...}) -> an app with those settings (its runner stopped afterwards)."""
    from app import create_app
    apps = []

    def make(**sections):
        app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / f"instance{len(apps)}"),
                          "SETTINGS": settings(**sections)})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["qwen"].stop()
