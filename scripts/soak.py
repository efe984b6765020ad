#!/usr/bin/env python3
"""Soak test: a bounded load on loopback, then a check that the runner still answers.

    .venv/bin/python scripts/soak.py [--clients 8] [--minutes 2] [--cancel 0.2] [--token-ms 5] [--url URL]

Without --url it starts its own service (`qwen-chat`) with the emulated runner at --token-ms
and a queue of --max-queue; with --url it loads a running deployment. Each client loops until the time is
up, choosing at random between OpenAI and Ollama, streamed and not, and abandons a share of its requests
part-way (--cancel). Prints requests served, errors by kind and latency percentiles; exits non-zero if a
request failed in a way it should not (anything but a 503 "busy" or our own cancel) or if the final
request is not answered.
"""
import argparse
import collections
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


from app.paths import PROJECT_DIR

MODEL = "qwen2.5"


def start_server(token_ms, max_queue, workdir):
    config = Path(workdir) / "config.yaml"
    config.write_text(json.dumps({"server": {"max_queue": max_queue},
                                  "runner": {"binary": "emulator", "emulator": {"token_ms": token_ms}}}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(Path(workdir) / "gunicorn.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "--bind", f"127.0.0.1:{port}"], cwd=PROJECT_DIR,
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**__import__("os").environ, "QWEN_CHAT_CONFIG": str(config),
                                 "QWEN_CHAT_INSTANCE": str(Path(workdir) / "instance")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("soak: the service did not become healthy; see " + str(Path(workdir) / "gunicorn.log"))


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes = collections.Counter()
        self.latency = []
        self.ttft = []

    def add(self, outcome, latency=None, ttft=None):
        with self.lock:
            self.outcomes[outcome] += 1
            if latency is not None:
                self.latency.append(latency)
            if ttft is not None:
                self.ttft.append(ttft)


def answer_text(api, stream, lines):
    """The answer's text from the response lines (SSE or NDJSON or one JSON object)."""
    text = []
    for line in lines:
        if line.startswith("data: "):
            line = line[6:]
        if not line or line == "[DONE]" or line.startswith(":"):
            continue
        obj = json.loads(line)
        if api == "openai":
            choice = obj["choices"][0] if obj.get("choices") else {}
            text.append((choice.get("delta") or choice.get("message") or {}).get("content") or "")
        else:
            text.append(obj.get("message", {}).get("content", ""))
    return "".join(text)


def one_request(http, url, rng, cancel_share, tally, n):
    """One request; returns how long the client should wait before the next (a 503's Retry-After)."""
    api = rng.choice(["openai", "ollama"])
    stream = rng.random() < 0.6
    abandon = rng.random() < cancel_share
    marker = f"soak {n}"
    text = f"{marker}: " + rng.choice(["hello", "count to 40", "count to 150", "tell me something"])
    path = "/v1/chat/completions" if api == "openai" else "/api/chat"
    body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": text}]}
    started = time.monotonic()
    first, lines = None, []
    try:
        with http.stream("POST", url + path, json=body) as response:
            if response.status_code != 200:
                error = json.loads(response.read()).get("error", {})
                busy = "busy" in str(error) or "waited" in str(error)
                kind = "busy" if response.status_code == 503 and busy else (
                    error.get("code") if isinstance(error, dict) else error[:60])
                tally.add(f"HTTP {response.status_code} {kind}")
                return float(response.headers.get("Retry-After", 1))
            for line in response.iter_lines():
                if line.startswith(":"):
                    continue  # SSE heartbeat
                lines.append(line)
                first = first or time.monotonic()
                if '"error"' in line:
                    tally.add("error event")
                    return 0
                if abandon and len(lines) >= rng.randrange(1, 5):
                    tally.add("cancelled by the client")
                    return 0
    except httpx.HTTPError as error:
        tally.add(f"transport: {type(error).__name__}")
        return 1
    if marker not in answer_text(api, stream, lines):
        tally.add("someone else's or no answer")
        return 0
    tally.add("answered", time.monotonic() - started, (first - started) if stream else None)
    return 0


def client_loop(url, deadline, cancel_share, tally, seed):
    rng = random.Random(seed)
    n = 0
    with httpx.Client(timeout=300) as http:
        while time.monotonic() < deadline:
            pause = one_request(http, url, rng, cancel_share, tally, f"{seed}.{n}")
            n += 1
            if pause:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--cancel", type=float, default=0.2, help="share of requests abandoned part-way")
    parser.add_argument("--token-ms", type=float, default=5.0, help="emulator pace when soak starts the server")
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--url", help="load a running service instead of starting one")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        proc = None
        url = args.url
        if url is None:
            proc, url = start_server(args.token_ms, args.max_queue, workdir)
        tally = Tally()
        deadline = time.monotonic() + args.minutes * 60
        threads = [threading.Thread(target=client_loop, args=(url, deadline, args.cancel, tally, i))
                   for i in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        final = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": MODEL, "messages": [{"role": "user", "content": "final check"}]})
        final_ok = final.status_code == 200 and "final check" in final.json()["choices"][0]["message"]["content"]
        health = httpx.get(url + "/health", timeout=10).json()
        if proc is not None:
            proc.terminate()
            proc.wait(60)

    total = sum(tally.outcomes.values())
    print(f"soak: {args.clients} clients for {elapsed:.0f} s against {url if args.url else 'a fresh server'}"
          f" ({args.cancel:.0%} abandoned on purpose)")
    print(f"  requests: {total}, answered: {tally.outcomes['answered']} "
          f"({tally.outcomes['answered'] / max(elapsed, 1e-9):.1f}/s)")
    for outcome, count in sorted(tally.outcomes.items(), key=lambda kv: -kv[1]):
        if outcome != "answered":
            print(f"  {outcome}: {count}")
    if tally.latency:
        print(f"  latency of answered requests: p50 {percentile(tally.latency, 50):.2f} s, "
              f"p90 {percentile(tally.latency, 90):.2f} s, p99 {percentile(tally.latency, 99):.2f} s, "
              f"max {max(tally.latency):.2f} s")
    if tally.ttft:
        print(f"  time to first token (streams): p50 {statistics.median(tally.ttft):.2f} s, "
              f"p99 {percentile(tally.ttft, 99):.2f} s")
    print(f"  runner restarts: {health['details'].get('restarts')}, final request answered: {final_ok}")
    bad = {o: c for o, c in tally.outcomes.items() if o not in ("answered", "cancelled by the client", "HTTP 503 busy")}
    if bad or not final_ok:
        print(f"soak: FAILED ({bad or 'no final answer'})")
        return 1
    print("soak: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
