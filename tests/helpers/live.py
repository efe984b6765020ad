"""A real gunicorn running the service, and the process and polling helpers that tests of it need."""
import functools
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from app.paths import PROJECT_DIR


def wait_for(predicate, timeout=30.0, what="condition"):
    """Poll a condition until it holds, with a deadline (a service still starting may refuse connections)."""
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


def listening(port):
    """Whether something accepts connections on 127.0.0.1:`port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def alive(pid):
    """Whether a process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


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


def is_tokenizer_service(pid):
    """Whether a process is the tokenizer service's (app/runner/tokenizer_server.py)."""
    try:
        return b"app.runner.tokenizer_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def limit_descriptors(count):
    """In a child before exec: at most `count` open file descriptors (RLIMIT_NOFILE's soft limit)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class LiveServer:
    """The service (`qwen-chat`: gunicorn with app/gunicorn_conf.py) on a free port (or `port`), with its own
    config and instance folder (and at most `nofile` open descriptors per process)."""

    def __init__(self, workdir, config_settings, env=None, port=0, nofile=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config_settings))
        self.log_path = self.workdir / "gunicorn.log"
        self.env = dict(os.environ, QWEN_CHAT_CONFIG=str(self.config_path),
                        QWEN_CHAT_INSTANCE=str(self.workdir / "instance"), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--bind", f"127.0.0.1:{port}"],
            cwd=PROJECT_DIR, env=self.env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
            preexec_fn=None if nofile is None else functools.partial(limit_descriptors, nofile))
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self):
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self, timeout=60):
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the service never became healthy:\n" + self.log())

    def post(self, path, **kwargs):
        """As Flask's test client posts: `server.post("/v1/chat/completions", json=...)`."""
        kwargs.setdefault("timeout", 60)
        return httpx.post(self.url + path, **kwargs)

    def health(self):
        """(status code, body) of /health."""
        response = httpx.get(self.url + "/health", timeout=5)
        return response.status_code, response.json()

    def metric(self, name, **labels):
        """The sum of a metric's samples (with these labels) from /metrics."""
        total, found = 0.0, False
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            metric, _, label_text = series.partition("{")
            if metric != name:
                continue
            present = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
            if all(present.get(key) == str(want) for key, want in labels.items()):
                total, found = total + float(value), True
        if not found:
            raise KeyError(name)
        return total

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
        """The worker's runner (its other child is the tokenizer service: tokenizer_service_pids())."""
        return [pid for worker in self.worker_pids() for pid in children(worker) if not is_tokenizer_service(pid)]

    def tokenizer_service_pids(self):
        return [pid for worker in self.worker_pids() for pid in children(worker) if is_tokenizer_service(pid)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
