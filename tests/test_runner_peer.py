"""Only the runner we spawned can affect a generation (docs/PROTOCOL.md, "Who may call the service").

Every caller is a real process (tests/helpers/caller.py): another program of this user or of `nobody`, or one
admitted the way the Runner admits the runner. The runner is the emulator under a real pty; where the
worker's own limits or view of /proc matter, the Card runs in a process of its own
(tests/helpers/card_process.py).
"""
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from app.runner.tokenizer_service import TokenizerService
from tests.helpers.card_process import ask, start_card_process
from tests.helpers import PROJECT_DIR, answer_to, prompt_ids, said, spawn_as_runner, wait_for

HELPERS = PROJECT_DIR / "tests" / "helpers"
SYSTEM_PYTHON = "/usr/bin/python3"  # ours may live where `nobody` cannot read


def port_of(service):
    return urllib.parse.urlsplit(service.url).port


def start_caller(mode, port, *args, user=None, **popen):
    """tests/helpers/caller.py in a process of its own, as this user or as `user`."""
    argv = [sys.executable, str(HELPERS / "caller.py"), mode, str(port), *map(str, args)]
    if user is not None:
        if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK):
            pytest.skip(f"running a process as {user} needs root, setpriv and {SYSTEM_PYTHON}")
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", SYSTEM_PYTHON, *argv[1:]]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, **popen)


def still_open(socks, seconds):
    """The sockets the other side has not closed (or reset) within `seconds`."""
    poller, left = select.poll(), {sock.fileno(): sock for sock in socks}
    for fd in left:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + seconds
    while left and (remaining := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(remaining * 1000):
            try:
                closed = left[fd].recv(65536) == b""
            except OSError:
                closed = True  # reset
            if closed:
                poller.unregister(fd)
                del left[fd]
    return list(left.values())


def connect(port):
    """A connection to the service, or None when the service reset it before connect() even returned."""
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    except (BrokenPipeError, ConnectionResetError):
        return None


def tcp_rows(port, state):
    """Fields of the /proc/net/tcp rows of sockets on local port `port` in `state` (0A: LISTEN, 01: ESTABLISHED)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return [fields for fields in rows if fields[1].endswith(f":{port:04X}") and fields[3] == state]


def listen_backlog(port):
    """Connections waiting for the service to accept them: the rx_queue of its LISTEN row."""
    return int(tcp_rows(port, "0A")[0][4].split(":")[1], 16)


# -- other processes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("user", [None, "nobody"], ids=["same-user", "nobody"])
def test_another_process_hammering_the_service_cannot_touch_a_generation(make_runner, tokenizer, service, user):
    # Regression: a /decode of <= 3 ids between two chunks came out as the runner's text, and one /encode (or
    # a /decode of 4 ids) stalled the generation.
    runner = make_runner(token_ms=20, stall_timeout=5)
    hammer = start_caller("hammer", port_of(service), user=user, stdin=subprocess.PIPE)
    pieces, text = [], "count to 20"
    try:
        assert hammer.stdout.readline() == b"started\n"
        result = runner.generate(prompt_ids(tokenizer, text), on_text=pieces.append)
    finally:
        hammer.stdin.close()
        counts = json.loads(hammer.stdout.readline())
        hammer.wait(10)
    assert result.text == answer_to(text) and "".join(pieces) == result.text
    assert result.finish_reason == "stop" and result.ids == tokenizer.encode(result.text)
    assert counts["answered"] == 0 and counts["dropped"] > 20, counts  # refused before anything was read


def test_requests_a_web_page_could_send_are_refused_even_from_the_runners_process(service):
    client = spawn_as_runner(service, lambda: start_caller("web", port_of(service)))
    statuses = json.loads(client.communicate(timeout=30)[0])
    assert statuses == {"Origin": 403, "Sec-Fetch-Site": 403, "text/plain POST": 403, "form POST": 403,
                        "POST without a type": 200, "JSON POST with Origin": 403,
                        "the runner's POST": 200, "the runner's GET": 200}


# -- the runner's own calls -----------------------------------------------------------------------------------
def test_a_call_made_before_the_spawn_returns_waits_for_the_pid(service):
    # The runner calls /bos_id as soon as it starts, possibly before the spawn has returned its pid. Another
    # process calling meanwhile is refused (its connection waits behind the first: connections are told apart
    # one at a time, on the accepting thread).
    port = port_of(service)
    with service.peers.spawning() as admit:
        client = start_caller("once", port)
        assert client.stdout.readline() == b"connected\n"
        wait_for(lambda: listen_backlog(port) == 0, 10, "the service to take the connection")
        other = start_caller("once", port)
        admit(client.pid)  # only now: the service held the connection until it knew the pid
    assert json.loads(client.communicate(timeout=30)[0]) == {"status": 200, "body": '{"eos_id": 151645}'}
    assert json.loads(other.communicate(timeout=30)[0].splitlines()[-1])["status"] is None  # (connected or not)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv4-mapped-ipv6"])
def test_netlink_and_proc_net_tcp_find_the_same_caller(family):
    # The fallback for a kernel without sock_diag must name the same socket, and the same owner.
    from app import sockets

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        try:
            client = socket.socket(family)
            client.connect(("127.0.0.1" if family == socket.AF_INET else "::ffff:127.0.0.1", listener.getsockname()[1]))
        except OSError:
            pytest.skip("no IPv6 here")
        with client:
            accepted, caller = listener.accept()
            with accepted:
                ours = accepted.getsockname()
                inode = int(os.readlink(f"/proc/self/fd/{client.fileno()}")[len("socket:["):-1])
                assert sockets.lookup_by_netlink(caller, ours, family) == (inode, os.geteuid())
                assert sockets.lookup_in_proc_net_tcp(caller, ours, "/proc") == (inode, os.geteuid())
                assert sockets.caller_socket(caller, ours) == (inode, os.geteuid())
                # and the other way round: that is our end, not theirs
                assert sockets.caller_socket(ours, caller)[0] != inode


# -- bounds ------------------------------------------------------------------------------------------------
def test_idle_and_trickling_connections_are_closed(tokenizer):
    service = TokenizerService(tokenizer, request_seconds=0.5, idle_seconds=0.5).start()
    try:
        client = spawn_as_runner(service, lambda: start_caller("slow", port_of(service), 5))
        seen = json.loads(client.communicate(timeout=30)[0])
    finally:
        service.stop()
    assert seen["answered"] == 200
    assert seen["trickle"] is not None and seen["trickle"] < 3, seen  # a byte every 50 ms did not keep it
    assert seen["idle"] is not None and 0.4 < seen["idle"] < 3, seen


def test_connections_past_the_cap_are_refused(tokenizer):
    service = TokenizerService(tokenizer, max_connections=3).start()
    try:
        client = spawn_as_runner(service, lambda: start_caller("cap", port_of(service), 3))
        seen = json.loads(client.communicate(timeout=30)[0])
    finally:
        service.stop()
    assert seen == {"kept": [200, 200, 200], "one_more": None, "after_closing_one": 200}


def test_idle_foreign_connections_cannot_exhaust_the_workers_descriptors(tmp_path):
    # Regression: each idle connection held a thread and a descriptor; 62 of them under a 76-descriptor limit
    # killed the worker. The Card here runs under a 40-descriptor limit; 200 connections come from elsewhere.
    card, started = start_card_process(tmp_path, nofile=40)
    foreign = []
    try:
        assert started["state"] == "ready", started
        port = urllib.parse.urlsplit(started["url"]).port
        foreign = [sock for sock in (connect(port) for _ in range(200)) if sock is not None]
        assert not still_open(foreign, 10)  # each refused at once
        assert ask(card, generate="one") == {"text": said("one"), "finish_reason": "stop"}
        restarted = ask(card, restart=True)  # a new runner, a new pid: served from its first call
        assert restarted["state"] == "ready" and restarted["runner_pid"] not in (None, started["runner_pid"])
        assert ask(card, generate="two") == {"text": said("two"), "finish_reason": "stop"}
        caller = start_caller("once", port)
        assert json.loads(caller.communicate(timeout=30)[0].splitlines()[-1])["status"] is None
    finally:
        for sock in foreign:
            sock.close()
        card.stdin.close()
        card.wait(60)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="hiding /proc needs root and unshare")
def test_without_proc_nobody_is_served_and_the_log_says_why_once(tmp_path):
    hide_proc = ["unshare", "--mount", "--propagation", "private",
                 "sh", "-c", 'mount -t tmpfs none /proc && exec "$@"', "sh"]
    card, started = start_card_process(tmp_path, wrap=hide_proc)
    try:
        # Refused at its first call, the vendor's loop crashes (SIGSEGV), and the reason says why.
        assert started["state"] == "unavailable" and "SIGSEGV" in started["reason"], started
        assert ask(card, failures=3)["failures"] >= 3  # the runner was refused at every start
    finally:
        card.stdin.close()
        log = card.stderr.read()
        card.wait(60)
    assert log.count("cannot tell which process is calling") == 1, log


def test_the_service_outlives_running_out_of_descriptors(tokenizer):
    # Its own process, under a limit of 16 descriptors (it uses about 8): connections beyond what it can accept
    # wait in the listen queue; nothing ends it, and once they close the runner's calls are answered again.
    limited = ["prlimit", "--nofile=16", sys.executable, "-m", "app.runner.tokenizer_server"]
    if not shutil.which("prlimit"):
        pytest.skip("no prlimit")
    service = TokenizerService(tokenizer, max_connections=30, program=limited).start()
    held = []
    try:
        service.peers.admit(os.getpid())
        port = port_of(service)
        for _ in range(24):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /eos_id HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(sock)
        wait_for(lambda: listen_backlog(port) > 0, 10, "connections the service could not accept yet")
        for sock in held:
            sock.close()
        held.clear()
        wait_for(lambda: listen_backlog(port) == 0, 10, "the queue to drain")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /eos_id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK") and service.running
    finally:
        for sock in held:
            sock.close()
        service.stop()
