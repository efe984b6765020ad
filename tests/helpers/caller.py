"""A process that calls the tokenizer service, as another local user's program (or the runner) could.

    python3 tests/helpers/caller.py MODE PORT [ARG]

Standard library only, so any python3 can run it under any user. It prints what happened as JSON lines:
  hammer    /decode of 1 and 3 ids, /encode {"text": "x"}, /decode of 4 ids, round and round, a new connection
            each, until stdin closes; prints "started" after the first call, then the counts of calls
            answered (200), refused (any other status) and dropped (closed without an answer)
  once      one GET /eos_id: prints "connected" once connected, then {"status", "body"} or {"status": null}
  web       the requests a web page could make a browser send, and one the runner sends: their statuses
  slow      how long the service keeps an idle kept-alive connection, and one whose request trickles in a
            byte at a time, before it closes them (null: still open after ARG seconds)
  cap       opens ARG kept-alive connections, then one more, then closes the first and connects again
"""
import json
import select
import socket
import sys
import time

HOST = "127.0.0.1"


def request(method, path, body=None, headers=None, keep_alive=False):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    payload = b"" if body is None else json.dumps(body).encode()
    if body is not None:
        lines.append(f"Content-Length: {len(payload)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def exchange(sock, data):
    """Send one request; (status, body) of the answer, or (None, None) when the connection closed instead."""
    try:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                return None, None
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return None, None
            body += chunk
        return int(head.split()[1]), body.decode()
    except OSError:  # reset, broken pipe: refused
        return None, None


def call(port, data):
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            return exchange(sock, data)
    except OSError:
        return None, None


def hammer(port):
    json_type = {"Content-Type": "application/json"}
    calls = [request("POST", "/decode", {"token_ids": [16]}, json_type),
             request("POST", "/decode", {"token_ids": [17, 18, 19]}, json_type),
             request("POST", "/encode", {"text": "x"}, json_type),
             request("POST", "/decode", {"token_ids": [20, 21, 22, 23]}, json_type)]
    counts = {"answered": 0, "refused": 0, "dropped": 0}
    made = 0
    while True:
        status, _ = call(port, calls[made % len(calls)])
        counts["answered" if status == 200 else "dropped" if status is None else "refused"] += 1
        made += 1
        if made == 1:
            print("started", flush=True)
        if select.select([sys.stdin], [], [], 0)[0]:  # stdin closed: stop
            break
    print(json.dumps(counts), flush=True)


def once(port):
    try:
        sock = socket.create_connection((HOST, port), timeout=10)
    except OSError:  # reset so fast that connect() itself saw it
        status, body = None, None
    else:
        with sock:
            print("connected", flush=True)
            status, body = exchange(sock, request("GET", "/eos_id"))
    print(json.dumps({"status": status, "body": body}), flush=True)


WEB_PAGE = {
    "Origin": ("GET", "/eos_id", None, {"Origin": "http://evil.example"}),
    "Sec-Fetch-Site": ("GET", "/eos_id", None, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}),
    "text/plain POST": ("POST", "/decode", {"token_ids": [16]}, {"Content-Type": "text/plain"}),
    "form POST": ("POST", "/decode", {"token_ids": [16]}, {"Content-Type": "application/x-www-form-urlencoded"}),
    "POST without a type": ("POST", "/decode", {"token_ids": [16]}, {}),
    "JSON POST with Origin": ("POST", "/decode", {"token_ids": [16]},
                              {"Content-Type": "application/json", "Origin": "null"}),
    "the runner's POST": ("POST", "/decode", {"token_ids": [16]}, {"Content-Type": "application/json"}),
    "the runner's GET": ("GET", "/eos_id", None, {}),
}


def web(port):
    print(json.dumps({name: call(port, request(*spec))[0] for name, spec in WEB_PAGE.items()}), flush=True)


def closed_within(sock, seconds, trickle=b""):
    """Seconds until the service closed `sock` (sending a byte of `trickle` every 50 ms meanwhile); None if it
    was still open after `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if trickle:
            try:
                sock.sendall(trickle[:1])
            except OSError:
                return time.monotonic() - started
            trickle = trickle[1:] or b"X"
        if select.select([sock], [], [], 0.05)[0]:
            try:
                if not sock.recv(65536):
                    return time.monotonic() - started
            except OSError:
                return time.monotonic() - started
    return None


def slow(port, give_up):
    trickling = socket.create_connection((HOST, port), timeout=5)
    trickle = closed_within(trickling, give_up, b"POST /decode HTTP/1.1\r\nX-Slow: " + b"a" * 4000 + b"\r\n")
    idle = socket.create_connection((HOST, port), timeout=5)
    answered = exchange(idle, request("GET", "/eos_id", keep_alive=True))[0]
    print(json.dumps({"trickle": trickle, "answered": answered, "idle": closed_within(idle, give_up)}), flush=True)


def cap(port, count):
    kept = []
    for _ in range(count):
        sock = socket.create_connection((HOST, port), timeout=5)
        kept.append((sock, exchange(sock, request("GET", "/eos_id", keep_alive=True))[0]))
    one_more = call(port, request("GET", "/eos_id"))[0]
    kept[0][0].close()
    deadline, again = time.monotonic() + 10, None
    while again != 200 and time.monotonic() < deadline:  # until the service has seen the first one close
        again = call(port, request("GET", "/eos_id"))[0]
        time.sleep(0.02)
    print(json.dumps({"kept": [status for _, status in kept], "one_more": one_more, "after_closing_one": again}),
          flush=True)


if __name__ == "__main__":
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode in ("slow", "cap"):
        {"slow": slow, "cap": cap}[mode](port, float(sys.argv[3]) if mode == "slow" else int(sys.argv[3]))
    else:
        {"hammer": hammer, "once": once, "web": web}[mode](port)
