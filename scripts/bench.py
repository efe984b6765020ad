#!/usr/bin/env python3
"""Benchmark: does the service cost the card anything? Prints one table (medians and spread).

    .venv/bin/python scripts/bench.py [--rounds 5] [--quick]

Each figure is taken side by side in one run against a baseline that drives the same emulated runner
directly: a bare pexpect loop and a bare tokenizer service (a few lines of http.server around the same
tokenizer), no Flask, no HTTP client. Service and baseline rounds alternate, so machine noise hits both.

1. Time to first token and end-to-end time at card pacing (70 ms/token), streamed over HTTP: service over
   baseline, as a ratio and in milliseconds added.          Goal: <= 1.01 and <= 10 ms.
2. Throughput ceiling at 0 ms/token, streamed over HTTP: service tokens/s over baseline, and the absolute
   figure (how far the service is from ever limiting a card of ~14 tokens/s).   Goal: >= 0.8.
3. Saturation: 16 concurrent streaming clients at card pacing: the share of wall time the runner was
   generating, from the emulated runner's own timestamps.    Goal: >= 0.98.
4. Memory: the worker's RSS idle after start, over a bare Python process that only loads the same tokenizer
   folder with transformers; and its growth over 500 requests.  Goal: <= 1.25x and <= 5 MB.
5. Start-up: process start to /health ok with the emulated runner at 0 ms (the service's own cost).
"""
import argparse
import functools
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pexpect


from app import config
from app.paths import PROJECT_DIR
from app.runner import emulated_model, protocol
from app.runner.driver import child_setup

CARD_MS = 70
QUESTION = "What is the capital of France?"


# -- the baseline: the emulated runner driven by hand ------------------------------------------------------
class BareTokenizerService:
    """The four calls main_axcl makes, and nothing else: /encode answers the ids it is told to."""

    def __init__(self, tokenizer_json):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.prompt_ids = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def _send(self, obj):
                body = json.dumps(obj).encode()
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))

            def do_GET(self):
                self._send({"bos_id": -1} if self.path == "/bos_id" else {"eos_id": protocol.EOS_ID})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/encode":
                    self._send({"token_ids": service.prompt_ids})
                else:
                    self._send({"text": service.tokenizer.decode(body["token_ids"], skip_special_tokens=False)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]


class Baseline:
    """A bare pexpect loop over the emulated runner: write a line, time the first text and the end notice."""

    def __init__(self, token_ms, tokenizer_dir, workdir):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self.service = BareTokenizerService(str(Path(tokenizer_dir) / "tokenizer.json"))
        env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR), QWEN_EMULATOR_TOKEN_MS=str(token_ms),
                   QWEN_EMULATOR_TOKENIZER=str(tokenizer_dir))
        model = emulated_model.write(Path(workdir) / "model")
        command = [sys.executable, "-m", "app.runner.emulator"] + protocol.vendor_flags(str(model), self.service.url)
        self.child = pexpect.spawn(command[0], command[1:], cwd=str(workdir), env=env, echo=False, timeout=600,
                                   use_poll=True, preexec_fn=functools.partial(child_setup, os.getpid()))
        self.child.delaybeforesend = None
        self.child.expect_exact(protocol.READY_PROMPT)

    def run(self, prompt_ids):
        """(time to first token, end to end, output ids) for one prompt."""
        self.service.prompt_ids = prompt_ids
        started = time.perf_counter()
        self.child.send(b"bench\n")
        head = self.child.read_nonblocking(1, timeout=600)  # the first byte of text
        first = time.perf_counter()
        self.child.expect(protocol.END_RE)
        done = time.perf_counter()
        text = (head + self.child.before).decode("utf-8", "replace")
        return first - started, done - started, text

    def close(self):
        if self.child.isalive():
            self.child.sendline(b"q")
            self.child.expect(pexpect.EOF)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the service ---------------------------------------------------------------------------------------------
class Service:
    """The service (`qwen-chat`) with the emulated runner, as scripts/serve runs it."""

    def __init__(self, workdir, token_ms, trace=None, project=PROJECT_DIR, prefix=(), **sections):
        """`project`: the checkout to run (another one, to compare); `prefix`: what the command runs under
        (e.g. taskset)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = {"runner": {"binary": "emulator", "emulator": {"token_ms": token_ms, "trace": trace}}, **sections}
        (self.workdir / "config.yaml").write_text(json.dumps(settings))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        # `qwen-chat` (app/cli.py); a checkout from before it existed ran gunicorn with its scripts/gunicorn.conf.py.
        old = Path(project, "scripts", "gunicorn.conf.py")
        command = ["-m", "gunicorn", "--config", str(old)] if old.is_file() else ["-m", "app.cli"]
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, *command, "--bind", f"127.0.0.1:{self.port}"], cwd=project,
            stdout=open(self.workdir / "log", "wb"),
            stderr=subprocess.STDOUT, env=dict(os.environ, QWEN_CHAT_CONFIG=str(self.workdir / "config.yaml"),
                                               QWEN_CHAT_INSTANCE=str(self.workdir / "instance")))
        try:
            self.healthy_after = self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self):
        with httpx.Client(timeout=2) as http:
            while True:
                try:
                    if http.get(self.url + "/health").status_code == 200:
                        return time.perf_counter() - self.started
                except httpx.HTTPError:
                    pass
                if self.proc.poll() is not None:
                    raise SystemExit("bench: the service died; see " + str(self.workdir / "log"))
                # Not much oftener: on this VM's kernel, a worker woken every few ms on the core it shares with
                # a CPU hog (runner_deadline) kept the runner it was starting from ever being scheduled.
                time.sleep(0.05)

    def worker_pid(self):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        return int(entry.name)
                except (OSError, ValueError):
                    continue
        raise RuntimeError("no worker")

    def stream(self, http, messages):
        """(time to first token, end to end, text) for one streamed chat. The chunks' JSON is read after the
        clock stops: parsing is the client's work, not the service's, and it would share the cores."""
        started = time.perf_counter()
        first, lines = None, []
        with http.stream("POST", self.url + "/v1/chat/completions",
                         json={"model": "qwen2.5", "stream": True, "messages": messages,
                               "max_tokens": protocol.MAX_TOKEN_LEN}) as response:
            for line in response.iter_lines():
                if first is None and '"content":"' in line and '"content":""' not in line:
                    first = time.perf_counter()
                lines.append(line)
        done = time.perf_counter()
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in lines if line.startswith("data: {"))
        return first - started, done - started, text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()  # on every path: a benchmark that fails must not leave servers behind


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def bare_tokenizer_rss(tokenizer_dir):
    code = ("import os; os.environ['TRANSFORMERS_VERBOSITY']='error'\n"
            "from transformers import AutoTokenizer\n"
            f"t = AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})\n"
            "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=True)\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) / 1024


def spread(values, fmt="{:.1f}"):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


# -- the measurements ----------------------------------------------------------------------------------------
def latency(rounds, tokenizer, tokenizer_dir, tmp, projects):
    """Time to first token and end to end at card pacing: each checkout's service and the baseline, alternating."""
    messages = [{"role": "user", "content": QUESTION}]
    prompt_ids = tokenizer.chat_ids(messages)
    rows = {"ttft": {"baseline": []}, "e2e": {"baseline": []}}
    with Baseline(CARD_MS, tokenizer_dir, tmp / "baseline-latency") as baseline, \
            Services(tmp, "latency", CARD_MS, projects) as services, httpx.Client(timeout=600) as http:
        for _ in range(rounds):
            b_ttft, b_e2e, b_text = baseline.run(prompt_ids)
            rows["ttft"]["baseline"].append(b_ttft), rows["e2e"]["baseline"].append(b_e2e)
            for name, service in services:
                ttft, e2e, text = service.stream(http, messages)
                assert text == b_text, (text, b_text)  # the same work on both sides
                rows["ttft"].setdefault(name, []).append(ttft), rows["e2e"].setdefault(name, []).append(e2e)
    return rows, len(prompt_ids), len(tokenizer.encode(b_text))


def throughput(rounds, tokenizer, tokenizer_dir, tmp, projects, count=200):
    """Tokens a second at 0 ms/token, streamed: each checkout's service and the baseline, alternating."""
    messages = [{"role": "user", "content": f"count to {count}"}]
    prompt_ids = tokenizer.chat_ids(messages)
    rates = {"baseline": []}
    with Baseline(0, tokenizer_dir, tmp / "baseline-throughput") as baseline, \
            Services(tmp, "throughput", 0, projects) as services, httpx.Client(timeout=600) as http:
        for _ in range(rounds + 1):  # the first round of each warms up
            _, b_e2e, b_text = baseline.run(prompt_ids)
            tokens = len(tokenizer.encode(b_text))
            rates["baseline"].append(tokens / b_e2e)
            for name, service in services:
                _, e2e, text = service.stream(http, messages)
                assert text == b_text
                rates.setdefault(name, []).append(tokens / e2e)
    return {name: values[1:] for name, values in rates.items()}, tokens


class Services(list):
    """A Service for each (name, checkout), started one after the other, all stopped at the end."""

    def __init__(self, tmp, label, token_ms, projects):
        super().__init__()
        try:
            for i, (name, project) in enumerate(projects):
                self.append((name, Service(tmp / f"service-{label}-{i}", token_ms, project=project)))
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _, service in self:
            service.stop()


def saturation(runs, tmp, clients=16):
    shares = []
    for run in range(runs):
        trace = tmp / f"trace-{run}"
        with Service(tmp / f"service-saturation-{run}", CARD_MS, trace=str(trace)) as service:
            def client(i):
                with httpx.Client(timeout=600) as http:
                    service.stream(http, [{"role": "user", "content": f"client {i}: {QUESTION}"}])

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        marks = [(kind, float(t)) for kind, t in (line.split() for line in trace.read_text().splitlines())
                 if kind in ("start", "end")]
        starts = [t for kind, t in marks if kind == "start"]
        ends = [t for kind, t in marks if kind == "end"]
        assert len(starts) == len(ends) == clients
        busy = sum(e - s for s, e in zip(starts, ends, strict=True))
        shares.append(busy / (max(ends) - min(starts)))
    return shares


def memory(tokenizer_dir, tmp, requests=500):
    with Service(tmp / "service-memory", 0) as service, httpx.Client(timeout=600) as http:
        worker = service.worker_pid()
        for i in range(20):  # the first requests build caches that stay; measure idle after them
            service.stream(http, [{"role": "user", "content": f"warm {i}"}])
        idle = rss_mb(worker)
        for i in range(requests):
            body = {"model": "qwen2.5", "messages": [{"role": "user", "content": f"request {i} " + "x" * (i % 50)}]}
            if i % 2:
                service.stream(http, body["messages"])
            else:
                http.post(service.url + "/v1/chat/completions", json=body).raise_for_status()
        after = rss_mb(worker)
    return idle, after, bare_tokenizer_rss(tokenizer_dir)


def startup(runs, tmp):
    times = []
    for run in range(runs):
        with Service(tmp / f"service-start-{run}", 0) as service:
            times.append(service.healthy_after)
    return times


# -- Open WebUI's pattern: a person and the background work their front end adds ---------------------------
def task_prompt(kind, history, tokens):
    """An Open WebUI-style task request: one user message starting "### Task:", about `tokens` long."""
    text = f"### Task:\nGenerate the {kind} for this chat.\n<chat_history>\n"
    text += "\n".join(f"{m['role'].upper()}: {m['content']}" for m in history[-6:]) + "\n</chat_history>\n"
    return text + "Guidelines: be concise. " * max(0, (tokens - 40 - len(text) // 4) // 5)


def openwebui_chat(service, tokenizer, turns, seed):
    """One person's chat, as Open WebUI 0.12 drives it: the first message goes with a title request (which
    reaches the card first), and after each reply come a follow-ups request and (after the first) a tags
    request, one after the other, while the person types the next message 1-2 s after the reply.

    Returns (the person's time to first token beyond their own prompt's cost, per turn; the background
    requests' outcomes). The emulated runner quotes the whole prompt back, so each task request caps its
    output (title 15 tokens, follow-ups 60, tags 20) as the model's short answers would."""
    rng = random.Random(seed)
    history, extra, outcomes = [], [], []
    card_s = CARD_MS / 1000

    def background(kind, tokens, max_tokens, chat):
        body = {"model": "qwen2.5", "stream": False, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": task_prompt(kind, chat, tokens)}]}
        with httpx.Client(timeout=900) as http:
            response = http.post(service.url + "/v1/chat/completions", json=body)
        outcomes.append((kind, response.status_code, response.status_code == 200 and
                         response.json()["choices"][0]["message"]["content"].startswith("Emulated runner")))

    tasks = []
    for turn in range(turns):
        question = f"Turn {turn + 1}: what should I read next about {rng.choice(['stars', 'rivers', 'bread'])}?"
        if turn == 0:
            first_message = [{"role": "user", "content": question}]
            title = threading.Thread(target=background, args=("title", 270, 15, first_message))
            title.start()
            tasks.append(title)
            wait_until(lambda: service_busy(service))  # as in 5 of 5 real chats: the title is first
        messages = history + [{"role": "user", "content": question}]
        prompt_tokens = len(tokenizer.chat_ids(messages))
        with httpx.Client(timeout=900) as http:
            ttft, _, text = service.stream(http, messages)
        extra.append(ttft - prompt_tokens * card_s)
        history = messages + [{"role": "assistant", "content": text}]

        def after_reply(chat, size, first):
            """Follow-ups, then tags (first turn only): one after the other, in the background."""
            background("follow-ups", size, 60, chat)
            if first:
                background("tags", 300, 20, chat)
        follow = threading.Thread(target=after_reply, args=(list(history), rng.randint(350, 560), turn == 0))
        follow.start()
        tasks.append(follow)
        time.sleep(rng.uniform(1.0, 2.0))  # the person reads, then types the next message
    for task in tasks:
        task.join()
    return extra, outcomes


def service_busy(service):
    for line in httpx.get(service.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("qwen_chat_card_busy "):
            return float(line.split()[1]) == 1
    return False


def wait_until(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("bench: timed out")
        time.sleep(0.01)


def openwebui(tokenizer, tmp, turns=5):
    """The same chat with scheduling on (the defaults) and off (no background rules, no preemption), on two
    services side by side in one run."""
    results = {}

    def run(name, **sections):
        with Service(tmp / f"service-openwebui-{name}", CARD_MS, **sections) as service:
            results[name] = openwebui_chat(service, tokenizer, turns, seed=7)

    threads = [threading.Thread(target=run, args=("on",)),
               threading.Thread(target=run, args=("off",), kwargs={"scheduling": {"preempt": False, "background": []}})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def long_chat(tokenizer, tmp, turns=30):
    """A 30-turn chat at full speed: every turn answered, and the prompt kept within 1024 - reserve."""
    errors, largest, dropped = 0, 0, 0
    history = [{"role": "system", "content": "You are a patient assistant."}]
    with Service(tmp / "service-long-chat", 0) as service, httpx.Client(timeout=600) as http:
        for turn in range(turns):
            history.append({"role": "user", "content": f"Question {turn}: " + "tell me more about it " * 8})
            response = http.post(service.url + "/v1/chat/completions", json={"model": "qwen2.5", "messages": history})
            if response.status_code != 200:
                errors += 1
                history.pop()
                continue
            largest = max(largest, response.json()["usage"]["prompt_tokens"])
            dropped = max(dropped, int(response.headers.get("X-Context-Dropped-Messages", 0)))
            history.append({"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]})
    return errors, largest, dropped, len(tokenizer.chat_ids(history))


def fitting(tokenizer, rounds):
    """The cost of fitting a 200-message conversation with 36 tool definitions, against one plain render."""
    from app.window import Conversation, fit
    tools = json.loads((PROJECT_DIR / "tests" / "fixtures" / "open_webui_tools.json").read_text())
    messages = [{"role": "system", "content": "You are helpful."}]
    for i in range(100):
        messages += [{"role": "user", "content": f"Question {i}: " + "and more " * (i % 9)},
                     {"role": "assistant", "content": f"Answer {i}: " + "indeed " * (i % 11)}]
    messages[-1] = {"role": "user", "content": "The last question."}
    fits, renders = [], []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        fitted = fit(Conversation(tokenizer, messages, tools), protocol.MAX_TOKEN_LEN, 256)
        fits.append(time.perf_counter() - started)
        started = time.perf_counter()
        whole = tokenizer.chat_ids(messages, tools)
        renders.append(time.perf_counter() - started)
    return fits[1:], renders[1:], len(whole), len(fitted.prompt_ids), len(messages)


# -- the runner's deadline under hostile load -------------------------------------------------------------
def hostile_load(url, stop, counts):
    """Clients doing their worst until `stop` is set: 1 MB bodies, a 10,000-message chat, 3,000 tool
    definitions (each refused above the configured limits), the same at the limits (2,000 messages, 512 tools:
    fitted), 64 streams at once and 32 clients sending their request a byte at a time. `counts` tallies the
    statuses they got."""
    tool = {"type": "function", "function": {"name": "f", "description": "d " * 50,
                                             "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
    big = json.dumps({"model": "qwen2.5", "messages": [{"role": "user", "content": "word " * 200_000}]})  # 1 MB

    def chat(count):  # `count` messages, the last one the user's
        return json.dumps({"model": "qwen2.5", "messages": [
            {"role": "user" if (count - i) % 2 else "assistant", "content": f"turn {i} " * 4} for i in range(count)]})

    def tools(count):
        return json.dumps({"model": "qwen2.5", "messages": [{"role": "user", "content": "hi"}],
                           "tools": [tool] * count})

    bodies = {"1 MB body": big,
              "10,000 messages": chat(10_000), "3,000 tools": tools(3000),
              "2,000 messages": chat(2000), "512 tools": tools(512)}

    def post(kind, body, stream=False):
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                try:
                    if stream:
                        with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                            for _ in response.iter_bytes():
                                if stop.is_set():
                                    break
                            status = response.status_code
                    else:
                        response = http.post(url + "/v1/chat/completions", content=body,
                                             headers={"Content-Type": "application/json"})
                        status = error_code(response)
                except httpx.HTTPError:
                    status = "error"
                counts[(kind, status)] = counts.get((kind, status), 0) + 1

    def slow():
        host, port = url.removeprefix("http://").split(":")
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n" + b"X-Slow: " + b"a" * 200
        while not stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=30) as sock:
                    for byte in head:
                        if stop.wait(0.1):
                            break
                        sock.sendall(bytes([byte]))
            except OSError:
                pass
            counts[("slow client", "closed")] = counts.get(("slow client", "closed"), 0) + 1

    threads = [threading.Thread(target=post, args=(kind, body)) for kind, body in bodies.items() for _ in range(2)]
    stream_body = {"model": "qwen2.5", "stream": True, "messages": [{"role": "user", "content": "count to 20"}]}
    threads += [threading.Thread(target=post, args=("stream", stream_body, True)) for _ in range(64)]
    threads += [threading.Thread(target=slow) for _ in range(32)]
    for thread in threads:
        thread.start()
    return threads


def runner_deadline(tmp, projects, seconds):
    """The /decode round trip the runner sees (its own timestamps: the emulator's trace) while the service
    takes hostile work, on one core beside a CPU hog (a busy Pi 5); the clients run on the other core. Its
    1 s timeout is the runner's death (docs/PROTOCOL.md)."""
    results = {}
    os.sched_setaffinity(0, {1})  # the clients, and this process, off the service's core
    for name, project in projects:
        trace = tmp / f"deadline-{name}.trace"
        hog = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
        try:
            with Service(tmp / f"service-deadline-{name}", 20, trace=str(trace), project=project,
                         prefix=("taskset", "-c", "0")) as service:
                restarts_before = service_metric(service.url, "qwen_chat_runner_restarts_total")
                start = trace.stat().st_size if trace.exists() else 0
                stop, counts = threading.Event(), {}
                load = hostile_load(service.url, stop, counts)
                # A person's streamed answers, one after another, all along: their /decode calls are measured.
                answered, started = 0, time.monotonic()
                with httpx.Client(timeout=120) as http:
                    while time.monotonic() - started < seconds:
                        try:  # in line with the 64 streams: it may wait its turn out, or find the line full
                            response = http.post(service.url + "/v1/chat/completions", json={
                                "model": "qwen2.5", "messages": [{"role": "user", "content": "count to 100"}]})
                            answered += response.status_code == 200
                        except httpx.HTTPError:
                            pass
                stop.set()
                for thread in load:
                    thread.join(60)
                lines = trace.read_text()[start:].splitlines()
                decode_ms = [float(line.split()[1]) * 1000 for line in lines if line.startswith("decode ")]
                # A refused or late call kills the vendor's loop (an emulator that copies it writes
                # "decode-failed" and dies; an older one waited on): either way, a death on the card.
                deaths = sum(line.startswith("decode-failed") for line in lines) + sum(ms >= 1000 for ms in decode_ms)
                restarts = service_metric(service.url, "qwen_chat_runner_restarts_total") - restarts_before
                results[name] = (decode_ms, deaths, restarts, answered, counts)
        finally:
            hog.kill()
            hog.wait()
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return results


def error_code(response):
    """The status, and for an error the code its body names (which limit refused it)."""
    if response.status_code < 400:
        return response.status_code
    try:
        return f"{response.status_code} {response.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return response.status_code


def service_metric(url, name):
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


HOME_ASSISTANT_ENTITIES = (0, 1, 5, 10, 17, 20, 22, 23, 30, 36, 37, 40)


def home_assistant(tokenizer, tmp):
    """Home Assistant's Assist request for "turn on the kitchen light" (its exact shape, tests/helpers/
    home_assistant.py) for homes of growing size, through the service: what the card is fed, which tools
    stay, and what comes back (a call, the service's explanation, or a 400)."""
    from tests.helpers.home_assistant import assist_request, home
    rows = []
    with Service(tmp / "service-home-assistant", 0) as service, httpx.Client(timeout=600) as http:
        for count in HOME_ASSISTANT_ENTITIES:
            body = assist_request(home(count), "turn on the kitchen light")
            body["stream"] = False
            system = len(tokenizer.encode(tokenizer.render_chat(body["messages"][:1], add_generation_prompt=False)))
            tools = len(tokenizer.chat_ids(body["messages"][:1], body["tools"], ending="none")) - system
            response = http.post(service.url + "/api/chat", json=body)
            answer = response.json()
            if response.status_code != 200:
                outcome, fed = f"{response.status_code}", "-"
            elif answer["message"].get("tool_calls"):
                outcome = "call " + ", ".join(call["function"]["name"] for call in answer["message"]["tool_calls"])
                fed = answer["prompt_eval_count"]
            else:
                outcome, fed = "explained, no card time", answer["prompt_eval_count"]
            kept = response.headers.get("X-Context-Kept-Tools", "all" if response.status_code == 200 else "-")
            compacted = response.headers.get("X-Context-Compacted-Tools", "0")
            rows.append((count, len(body["tools"]), system, tools, fed, f"{kept or 'none'} ({compacted} compacted)",
                         outcome))
    return rows


PREPARATION = """
import json, statistics, sys, time
from app.window import Conversation, fit
from app.tokenizer.qwen import QwenTokenizer
tokenizer = QwenTokenizer(sys.argv[1])
tools = json.load(open(sys.argv[2]))
out = {}
for messages, tool_count in json.loads(sys.argv[3]):
    chat = [{"role": "system", "content": "You are helpful."}]
    for i in range(messages // 2):
        chat += [{"role": "user", "content": f"Question {i}: " + "and more " * (i % 9)},
                 {"role": "assistant", "content": f"Answer {i}: " + "indeed " * (i % 11)}]
    chat.append({"role": "user", "content": "The last question."})
    offered = (tools * (tool_count // len(tools) + 1))[:tool_count]
    times = []
    for _ in range(int(sys.argv[4])):
        started = time.perf_counter()
        fit(Conversation(tokenizer, chat, offered), 1024, 256)
        times.append(time.perf_counter() - started)
    out[f"{messages} {tool_count}"] = times
print(json.dumps(out))
"""
PREPARATION_SIZES = [(200, 36), (2000, 0), (10000, 0), (200, 512), (200, 3000)]


def preparation(tokenizer_dir, projects, rounds):
    """Fitting conversations and tool lists of growing size to the window, in each checkout (the same code
    run with its own app/ on the path), alternating: does the cost follow the input, or the window?"""
    tools = str(PROJECT_DIR / "tests" / "fixtures" / "open_webui_tools.json")
    results = {name: {} for name, _ in projects}
    for _ in range(rounds):
        for name, project in projects:
            done = subprocess.run([sys.executable, "-c", PREPARATION, tokenizer_dir, tools,
                                   json.dumps(PREPARATION_SIZES), "1"], cwd=project, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(project)), check=True)
            for key, times in json.loads(done.stdout).items():
                results[name].setdefault(key, []).extend(times)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per comparison (alternating)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and one saturation run")
    measures = ["latency", "throughput", "saturation", "memory", "startup", "fitting", "long_chat", "openwebui",
                "home_assistant", "runner_deadline", "preparation"]
    parser.add_argument("--only", choices=measures, action="append", help="run only these measurements (repeatable)")
    parser.add_argument("--compare", metavar="CHECKOUT", help="latency, throughput, runner_deadline, preparation: "
                        "also run this other checkout (e.g. a git worktree of an earlier commit), side by side")
    parser.add_argument("--seconds", type=float, default=30, help="runner_deadline: how long the load lasts")
    args = parser.parse_args()
    wanted = set(args.only or measures)
    rounds = 3 if args.quick else args.rounds
    settings = config.load({})
    from app.tokenizer.qwen import QwenTokenizer
    tokenizer_dir = settings["model"]["tokenizer_dir"]
    tokenizer = QwenTokenizer(tokenizer_dir)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        projects = [("service", PROJECT_DIR)] + ([("compared", Path(args.compare))] if args.compare else [])
        if "latency" in wanted:
            results["latency"] = latency(rounds, tokenizer, tokenizer_dir, tmp, projects)
        if "throughput" in wanted:
            results["throughput"] = throughput(rounds, tokenizer, tokenizer_dir, tmp, projects)
        if "saturation" in wanted:
            results["saturation"] = saturation(1 if args.quick else 3, tmp)
        if "memory" in wanted:
            results["memory"] = memory(tokenizer_dir, tmp)
        if "startup" in wanted:
            results["startup"] = startup(rounds, tmp)
        if "fitting" in wanted:
            results["fitting"] = fitting(tokenizer, rounds)
        if "long_chat" in wanted:
            results["long_chat"] = long_chat(tokenizer, tmp)
        if "openwebui" in wanted:
            results["openwebui"] = openwebui(tokenizer, tmp)
        if "home_assistant" in wanted:
            results["home_assistant"] = home_assistant(tokenizer, tmp)
        if "runner_deadline" in wanted:
            results["runner_deadline"] = runner_deadline(tmp, projects, args.seconds)
        if "preparation" in wanted:
            results["preparation"] = preparation(tokenizer_dir, projects, rounds)

    print(f"qwen-chat benchmark on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
          f"; {rounds} alternating rounds; median (min-max)")
    print(f"{'measure':58} {'service':>22} {'baseline':>22} {'ratio / added':>18}  goal")
    if "latency" in results:
        lat, prompt_tokens, reply_tokens = results["latency"]
        for key, label in (("ttft", "time to first token, 70 ms/token"), ("e2e", "end to end, 70 ms/token")):
            b = lat[key]["baseline"]
            for name, s in ((n, v) for n, v in lat[key].items() if n != "baseline"):
                ratio = statistics.median(s) / statistics.median(b)
                added = (statistics.median(s) - statistics.median(b)) * 1000
                who = "" if name == "service" else f" [{name}]"
                print(f"{label + f' ({prompt_tokens} + {reply_tokens} tokens), ms' + who:58} "
                      f"{spread([x * 1000 for x in s]):>22} {spread([x * 1000 for x in b]):>22} "
                      f"{f'{ratio:.4f} / {added:+.1f} ms':>18}  <= 1.01, <= 10 ms")
    if "throughput" in results:
        rates, long_tokens = results["throughput"]
        for name, service_rates in ((n, v) for n, v in rates.items() if n != "baseline"):
            ratio = statistics.median(service_rates) / statistics.median(rates["baseline"])
            who = "" if name == "service" else f" [{name}]"
            print(f"{f'throughput at 0 ms/token ({long_tokens} tokens, streamed), tokens/s' + who:58} "
                  f"{spread(service_rates, '{:.0f}'):>22} {spread(rates['baseline'], '{:.0f}'):>22} "
                  f"{f'{ratio:.3f}':>18}  >= 0.8")
    if "saturation" in results:
        print(f"{'saturation, 16 streaming clients at 70 ms/token':58} {spread(results['saturation'], '{:.4f}'):>22} "
              f"{'':>22} {'':>18}  >= 0.98")
    if "memory" in results:
        idle, after, bare = results["memory"]
        print(f"{'worker RSS idle / bare transformers tokenizer, MB':58} {idle:>22.1f} {bare:>22.1f} "
              f"{f'{idle / bare:.3f}':>18}  <= 1.25")
        print(f"{'worker RSS growth over 500 requests, MB':58} {after - idle:>22.1f} {'':>22} {'':>18}  <= 5")
    if "startup" in results:
        print(f"{'start-up to /health ok, emulator at 0 ms, s':58} {spread(results['startup'], '{:.2f}'):>22}")
    if "fitting" in results:
        fits, renders, whole, fitted, count = results["fitting"]
        print(f"{f'fitting {count} messages + 36 tools ({whole} -> {fitted} tokens), ms':58} "
              f"{spread([x * 1000 for x in fits]):>22} {spread([x * 1000 for x in renders]):>22} "
              f"{f'{statistics.median(fits) / statistics.median(renders):.1f}x one render':>18}")
    if "long_chat" in results:
        errors, largest, dropped, whole = results["long_chat"]
        print(f"{'30-turn chat: errors / largest prompt fed / history, tokens':58} "
              f"{f'{errors} / {largest} / {whole}':>22} {'':>22} {f'{dropped} msgs left out':>18}  0, <= 768")
    if "openwebui" in results:
        for name in ("on", "off"):
            extra, outcomes = results["openwebui"][name]
            answered = sum(ok for _, _, ok in outcomes)
            print(f"{f'Open WebUI, 5 turns, scheduling {name}: wait beyond own prompt, s':58} "
                  f"{f'{statistics.median(extra):.2f} (worst {max(extra):.2f})':>22} "
                  f"{f'{answered}/{len(outcomes)} tasks answered':>22} {'':>18}  <= 0.5 (on)")

    if "preparation" in results:
        print("\nFitting to the window (app/window.py), ms, by messages and tool definitions:")
        names = list(results["preparation"])
        print(f"{'messages, tools':18}" + "".join(f"{name:>24}" for name in names))
        for messages, tools in PREPARATION_SIZES:
            key = f"{messages} {tools}"
            print(f"{f'{messages:,}, {tools:,}':18}" + "".join(
                f"{spread([x * 1000 for x in results['preparation'][name][key]]):>24}" for name in names))
    if "runner_deadline" in results:
        print("\nThe runner's /decode round trip (its 1 s timeout kills it), service on one core beside a CPU hog,"
              " under 1 MB bodies, a 10,000-message chat, 3,000 tools (and both at the limits), 64 streams and 32"
              " slow clients:")
        print(f"{'':16} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'deaths':>7} {'restarts':>8} "
              f"{'answers':>8}  goal: max < 250 ms, no death")
        for name, (decode_ms, deaths, restarts, answered, counts) in results["runner_deadline"].items():
            ordered = sorted(decode_ms)
            p50, p99 = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
                        for q in (0.5, 0.99))
            print(f"{name:16} {len(ordered):>6} {p50:>8.1f} {p99:>8.1f} {max(ordered, default=float('nan')):>8.1f} "
                  f"{deaths:>7} {restarts:>8.0f} {answered:>8}")
            print(f"{'':16} load: " + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(
                counts.items(), key=lambda item: str(item[0]))))
    if "home_assistant" in results:
        print("\nHome Assistant's Assist, 'turn on the kitchen light' (tokens; the card reads ~14 a second):")
        print(f"{'entities':>8} {'tools':>5} {'system':>6} {'tool defs':>9} {'fed':>5} {'wait':>6}  "
              f"{'tools kept':42} outcome")
        for count, offered, system, tools, fed, kept, outcome in results["home_assistant"]:
            wait = f"{fed / 14:.0f} s" if isinstance(fed, int) and fed else "-"
            print(f"{count:>8} {offered:>5} {system:>6} {tools:>9} {fed:>5} {wait:>6}  {kept:42} {outcome}")


if __name__ == "__main__":
    main()
