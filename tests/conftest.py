"""Shared fixtures (helpers are in tests/helpers/). Everything that touches the runner goes through a real
child process under a real pty."""
import pytest

from app import config, create_app
from app.runner.card import Card, CardOptions
from app.runner.driver import Runner
from app.runner.tokenizer_service import TokenizerService
from app.tokenizer.qwen import QwenTokenizer
from tests.helpers import LiveServer, Nginx, emulator_command, emulator_env, settings


@pytest.fixture(scope="session")
def tokenizer():
    return QwenTokenizer(config.load({})["model"]["tokenizer_dir"])


@pytest.fixture(scope="session")
def service(tokenizer):
    service = TokenizerService(tokenizer).start()
    yield service
    service.stop()


@pytest.fixture
def make_runner(tokenizer, service, tmp_path):
    """make_runner(token_ms=0, fault=..., stall_timeout=..., mask=...) -> a Runner on the emulator (on an
    emulated model folder of that mask size), closed afterwards."""
    runners = []

    def make(stall_timeout=30.0, startup_timeout=30.0, on_loading=None, mask=None, **settings):
        env = emulator_env(tokenizer, **settings)
        command = emulator_command(tmp_path / f"model{len(runners)}", service.url, *[mask] if mask else [])
        runner = Runner(command, service, tmp_path, env=env, startup_timeout=startup_timeout,
                        stall_timeout=stall_timeout, on_loading=on_loading)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.close()


@pytest.fixture
def make_card(tokenizer, tmp_path):
    """make_card(emulator={...}, stall_timeout=...) -> a started Card on the emulator, stopped afterwards."""
    cards = []

    def make(emulator=None, lock_path=None, **options):
        options.setdefault("backoff_initial", 0.05)
        card = Card(tokenizer, CardOptions(
            model_dir=tmp_path / "model", workdir=tmp_path / "runner", lock_path=lock_path or tmp_path / "card.lock",
            binary="emulator", emulator={"token_ms": 0, **(emulator or {})}, **options)).start()
        cards.append(card)
        return card

    yield make
    for card in cards:
        card.stop()


# -- the application --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def app(tmp_path_factory):
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path_factory.mktemp("instance")),
                      "SETTINGS": settings()})
    assert app.extensions["qwen"].card.wait_ready(60) == "ready"
    yield app
    app.extensions["qwen"].stop()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def fed_prompts(monkeypatch):
    """The exact prompt ids each generation registered with the tokenizer service (what the card is fed)."""
    fed = []
    register = TokenizerService.register

    def spy(self, prompt_ids):
        fed.append(list(prompt_ids))
        return register(self, prompt_ids)
    monkeypatch.setattr(TokenizerService, "register", spy)
    return fed


@pytest.fixture
def make_app(tmp_path):
    """make_app(server={...}, runner={...}) -> an app with those settings (its runner stopped afterwards)."""
    apps = []

    def make(**sections):
        app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / f"instance{len(apps)}"),
                          "SETTINGS": settings(**sections)})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["qwen"].stop()


# -- a real gunicorn ------------------------------------------------------------------------------------
@pytest.fixture
def start_server(tmp_path):
    """start_server(runner={...}, ...) -> a healthy LiveServer with those settings; stopped afterwards."""
    servers = []

    def start(wait=True, env=None, port=0, nofile=None, **sections):
        server = LiveServer(tmp_path / f"server{len(servers)}", settings(**sections), env=env, port=port,
                            nofile=nofile)
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


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, through playwright: tests/helpers/browser.py)."""
    from playwright.sync_api import sync_playwright

    from tests.helpers.browser import launch
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def nginx(tmp_path):
    """nginx(port or [ports], replace={...}) -> a running Nginx with nginx/qwen-chat.conf; stopped afterwards."""
    started = []

    def start(upstream_ports, replace=None):
        workdir = tmp_path / f"nginx{len(started)}"
        workdir.mkdir()
        ports = [upstream_ports] if isinstance(upstream_ports, int) else upstream_ports
        started.append(Nginx(workdir, ports, replace))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()
