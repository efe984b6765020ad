#!/usr/bin/env python3
"""Runner benchmark: the driver against a bare pexpect loop, and /decode latency as the runner sees it.

    .venv/bin/python scripts/bench_runner.py [--rounds 7] [--count 300] [--token-ms 0]

Both sides drive the same emulated runner with the same prompt through the same tokenizer service; the
bare loop only writes the handle and waits for the end notice with pexpect.expect, the driver does all
its work (matching every chunk against /decode answers, decoding ids, stop and limit checks). Rounds
alternate between the two so machine noise hits both alike; medians and the ratio are printed.

The emulator opens a new connection for every call, as the vendor's runner does, so the check of who is
calling (once per connection, app/runner/peer.py) is on its path; the last line times that alone: a call on a
new connection, from a process admitted as the runner is.
"""
import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect


from app import config
from app.paths import PROJECT_DIR
from app.runner import emulated_model, protocol
from app.runner.driver import Runner, child_setup
from app.runner.tokenizer_service import TokenizerService
from app.tokenizer.qwen import QwenTokenizer


def emulator_env(tokenizer, token_ms, trace):
    return dict(os.environ, PYTHONPATH=str(PROJECT_DIR), QWEN_EMULATOR_TOKENIZER=tokenizer.folder,
                QWEN_EMULATOR_TOKEN_MS=str(token_ms), QWEN_EMULATOR_TRACE=str(trace))


def bare_round(child, service, prompt_ids):
    """Write the handle, wait for the notice and prompt; tokens from the runner's final /decode."""
    log = service.register(prompt_ids)
    started = time.perf_counter()
    child.send(log.handle.encode() + b"\n")
    child.expect(protocol.END_RE)
    elapsed = time.perf_counter() - started
    # The service reports every /decode; unread while this loop waited, the last reports are still on their way.
    deadline = time.monotonic() + 10
    while not (log.calls() and log.calls()[-1].maybe_final) and time.monotonic() < deadline:
        time.sleep(0.01)
    tokens = len(log.calls()[-1].ids)
    service.forget(log)
    return tokens / elapsed


def driver_round(runner, prompt_ids):
    started = time.perf_counter()
    result = runner.generate(prompt_ids, on_text=lambda text: None)
    return len(result.ids) / (time.perf_counter() - started), len(result.ids)


FRESH_CONNECTIONS = """
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
request = b"GET /eos_id HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n"
for _ in range(count):
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        while sock.recv(65536):
            pass
    print((time.perf_counter() - started) * 1000)
"""


def fresh_connection_ms(service, count):
    """Round trips of GET /eos_id, each on a new connection, from a process admitted as the runner is."""
    port = service.url.rsplit(":", 1)[1]
    with service.peers.spawning() as admit:
        caller = subprocess.Popen([sys.executable, "-c", FRESH_CONNECTIONS, port, str(count)],
                                  stdout=subprocess.PIPE, text=True)
        admit(caller.pid)
    return [float(line) for line in caller.communicate()[0].split()]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--count", type=int, default=200, help='the prompt asks the emulator to "count to N"')
    parser.add_argument("--token-ms", type=float, default=0.0)
    parser.add_argument("--connections", type=int, default=500, help="calls timed on a new connection each")
    args = parser.parse_args()

    tokenizer = QwenTokenizer(config.load({})["model"]["tokenizer_dir"])
    service = TokenizerService(tokenizer).start()
    prompt_ids = tokenizer.chat_ids([{"role": "user", "content": f"count to {args.count}"}])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = emulated_model.write(tmp / "model")
        command = [sys.executable, "-m", "app.runner.emulator"] + protocol.vendor_flags(str(model), service.url)
        runner = Runner(command, service, tmp, env=emulator_env(tokenizer, args.token_ms, tmp / "driver.trace"))
        with service.peers.spawning() as admit:  # the service serves only the processes we spawned
            bare = pexpect.spawn(command[0], command[1:], cwd=str(tmp), echo=False, timeout=120, use_poll=True,
                                 env=emulator_env(tokenizer, args.token_ms, tmp / "bare.trace"),
                                 preexec_fn=functools.partial(child_setup, os.getpid()))
            admit(bare.pid)
        bare.delaybeforesend = None
        bare.expect_exact(protocol.READY_PROMPT)
        driver_rates, bare_rates = [], []
        for _ in range(args.rounds):
            bare_rates.append(bare_round(bare, service, prompt_ids))
            rate, tokens = driver_round(runner, prompt_ids)
            driver_rates.append(rate)
        runner.close()
        bare.sendline(b"q")
        bare.expect(pexpect.EOF)
        decode_ms = [float(line.split()[1]) * 1000 for line in (tmp / "driver.trace").read_text().splitlines()
                     if line.startswith("decode ")]

    print(f"runner benchmark: emulator at {args.token_ms:g} ms/token, {tokens} output ids per round, "
          f"{args.rounds} rounds alternating")
    print(f"  bare pexpect loop   median {statistics.median(bare_rates):8.0f} tokens/s  "
          f"(min {min(bare_rates):.0f}, max {max(bare_rates):.0f})")
    print(f"  driver (Runner)     median {statistics.median(driver_rates):8.0f} tokens/s  "
          f"(min {min(driver_rates):.0f}, max {max(driver_rates):.0f})")
    ratio = statistics.median(driver_rates) / statistics.median(bare_rates)
    print(f"  ratio driver/bare   {ratio:.3f}   (goal >= 0.9)")
    print(f"  /decode round trip seen by the runner during the driver's generations: n={len(decode_ms)}  "
          f"p50 {percentile(decode_ms, 50):.2f} ms  p99 {percentile(decode_ms, 99):.2f} ms  "
          f"max {max(decode_ms):.2f} ms   (goal p99 < 5 ms)")
    fresh_ms = fresh_connection_ms(service, args.connections)
    print(f"  a new connection per call (connect, peer check, GET /eos_id, close): n={len(fresh_ms)}  "
          f"p50 {percentile(fresh_ms, 50):.2f} ms  p99 {percentile(fresh_ms, 99):.2f} ms  max {max(fresh_ms):.2f} ms")
    service.stop()


if __name__ == "__main__":
    main()
