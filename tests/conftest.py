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
