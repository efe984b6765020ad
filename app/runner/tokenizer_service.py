"""The tokenizer service main_axcl calls back, seen from the worker (docs/PROTOCOL.md, "The tokenizer service it
calls back").

The service itself runs in a process of its own (tokenizer_server.py): the vendor's loop dies when an answer is
later than 1 s, and nothing the worker does may delay one. This side starts that process, registers prompts
with it, admits the runner's pid, and collects what it reports, through one control socket.

Because the service answers `/encode`, it decides the exact prompt the card sees: the driver never writes a
prompt's text to the runner's stdin, only a handle naming a prompt registered here (`register()` returns its
`DecodeLog`), and `/encode` of that handle returns the ids rendered from the whole conversation. Every
`/decode` of that generation is reported here before the runner prints its answer, so the driver learns the
output ids and the exact bytes the runner is about to print from the DecodeLog (`pump()` takes the reports;
the driver polls `fileno()` beside the runner's terminal).
"""
import contextlib
import itertools
import json
import logging
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
import time

from app.paths import PROJECT_DIR
from app.runner.errors import RunnerStartError
from app.runner.tokenizer_server import HANDLE_PREFIX, IDLE_SECONDS, MAX_CONNECTIONS, MAX_MESSAGE, REQUEST_SECONDS

log = logging.getLogger(__name__)

START_SECONDS = 30.0   # for the service's process to listen (it loads tokenizer.json: well under a second)
ACK_SECONDS = 10.0     # for it to act on a spawn's start
PING_SECONDS = 1.0     # for it to answer before a runner starts: later, and the runner's calls would be late
STOP_SECONDS = 5.0


class DecodeCall:
    """One /decode call of a generation: the ids asked for and the text answered (what the runner prints)."""
    __slots__ = ("ids", "printed", "maybe_final", "at")

    def __init__(self, ids, printed, maybe_final, at):
        self.ids = ids
        self.printed = printed
        self.maybe_final = maybe_final
        self.at = at


class DecodeLog:
    """One prompt sent to the runner, and the /decode calls the runner made for it (as the service reported)."""

    def __init__(self, handle, prompt_ids, pump=lambda: None):
        self.handle = handle
        self.prompt_ids = list(prompt_ids)
        self._calls = []
        self._pump = pump       # takes the service's reports, these calls' among them
        self.encoded_at = None  # when the runner fetched the prompt (monotonic): its run has begun

    def add(self, call):
        self._calls.append(call)

    def calls(self, start=0):
        """The calls so far: every one the service answered before now."""
        self._pump()
        return self._calls[start:]

    @property
    def call_count(self):
        return len(self._calls)


class TokenizerService:
    """The runner's tokenizer service: its process, its registry of pending prompts, and who may call it."""

    def __init__(self, tokenizer, host="127.0.0.1", port=0, max_connections=MAX_CONNECTIONS,
                 request_seconds=REQUEST_SECONDS, idle_seconds=IDLE_SECONDS, program=None):
        self.tokenizer = tokenizer  # the worker's own (the driver decodes the output with it)
        self.peers = ServicePeers(self)
        # The service's command; tests may run it through a program of their own (below the process boundary).
        self.program = program or [sys.executable, "-m", "app.runner.tokenizer_server"]
        self._options = ["--host", host, "--port", str(port), "--max-connections", str(max_connections),
                         "--request-seconds", str(request_seconds), "--idle-seconds", str(idle_seconds)]
        self._logs = {}
        self._lock = threading.RLock()
        self._acks = set()
        self._process = None
        self._sock = None
        self.port = None
        self.starts = 0

    # -- its process -----------------------------------------------------------------------------------
    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self):
        return self._process is not None and self._process.poll() is None and self._sock is not None

    def start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_DIR),
                                                                         os.environ.get("PYTHONPATH")])))
        try:
            self._process = subprocess.Popen(
                [*self.program, "--control", str(theirs.fileno()), "--tokenizer", self.tokenizer.folder,
                 "--parent", str(os.getpid()), *self._options], pass_fds=[theirs.fileno()], env=env,
                stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise RunnerStartError(f"cannot start the tokenizer service: {exc}") from None
        finally:
            theirs.close()
        self._sock = ours
        ready = self._wait_for(lambda message: message.get("op") == "ready", START_SECONDS)
        if ready is None:
            self.stop()
            raise RunnerStartError(f"the tokenizer service did not start within {START_SECONDS:g} s")
        self.port = ready["port"]
        self.starts += 1
        return self

    def ensure_running(self):
        """Before a runner starts: a service whose process has ended, or does not answer within PING_SECONDS
        (stopped, stuck), is replaced (a new port: the runner is started after). Its answers come late too, and
        a late answer kills the runner."""
        if self.running and not self._ack(self._ping(), PING_SECONDS):
            log.error("the tokenizer service's process (pid %s) does not answer; replacing it", self.pid)
            self._process.kill()
            self._process.wait()
        if not self.running:
            if self._process is not None:
                log.error("the tokenizer service's process ended (%s); starting it again", self._process.poll())
                self.stop()
            self.start()

    def _ping(self):
        number = next(ServicePeers._numbers)
        self._send({"op": "ping", "id": number})
        return number

    def stop(self):
        sock, process = self._sock, self._process
        self._sock = None
        if sock is not None:
            sock.close()  # the service ends when its control socket closes
        if process is not None:
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @property
    def pid(self):
        return self._process.pid if self._process is not None else None

    # -- prompts ---------------------------------------------------------------------------------------
    def register(self, prompt_ids):
        """Register a prompt; write `log.handle` (one short line) to the runner to run it."""
        self.pump()  # reports about an earlier generation go now, not into this one
        handle = HANDLE_PREFIX + secrets.token_hex(16)
        log_ = DecodeLog(handle, prompt_ids, self.pump)
        with self._lock:
            self._logs[handle] = log_
        self._send({"op": "register", "handle": handle, "ids": log_.prompt_ids})
        return log_

    def forget(self, log_):
        with self._lock:
            self._logs.pop(log_.handle, None)
        self._send({"op": "forget", "handle": log_.handle})

    def fileno(self):
        """The control socket: readable when the service has reported something (the driver polls it)."""
        sock = self._sock
        if sock is None:
            raise RunnerStartError("the tokenizer service ended while the runner started")
        return sock.fileno()

    def pump(self):
        """Take every report the service has sent, without waiting."""
        with self._lock:
            sock = self._sock
            while sock is not None:
                try:
                    data = sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    log.error("the tokenizer service's process has ended")
                    self._sock = None
                    sock.close()
                    return
                self._take(json.loads(data))

    def _take(self, message):
        op = message["op"]
        if op == "decoded":
            log_ = self._logs.get(message["handle"])
            if log_ is not None:
                log_.add(DecodeCall(message["ids"], message["printed"], message["maybe_final"], message["at"]))
        elif op == "encoded":
            log_ = self._logs.get(message["handle"])
            if log_ is not None:
                log_.encoded_at = message["at"]
        elif op == "ack":
            self._acks.add(message["id"])

    def _send(self, message):
        if self._sock is None:
            return  # ended: the runner's calls will be refused, and the Card starts it again
        try:
            self._sock.sendall(json.dumps(message, separators=(",", ":")).encode())
        except OSError:
            pass  # it has ended; pump() notices and says so

    def _wait_for(self, wanted, seconds):
        """The first message `wanted` accepts, reading the control socket for up to `seconds`; None if none."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while (remaining := deadline - time.monotonic()) > 0:
            if not poller.poll(remaining * 1000):
                continue
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except OSError:
                return None
            if not data:
                return None
            message = json.loads(data)
            if wanted(message):
                return message
            self._take(message)
        return None

    def _ack(self, number, seconds=ACK_SECONDS):
        """Whether the service answered message `number` within `seconds`."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        while number not in self._acks and self._sock is not None and time.monotonic() < deadline:
            poller.register(self._sock, select.POLLIN)
            poller.poll(min(100, max(1, (deadline - time.monotonic()) * 1000)))
            self.pump()
        answered = number in self._acks
        self._acks.discard(number)
        return answered


class ServicePeers:
    """Who the service answers: `with peers.spawning() as admit: child = spawn(...); admit(child.pid)` around
    every spawn (a call made meanwhile waits for the pid); `dismiss(pid)` once that process is closed. The
    service itself finds each connection's owner (peer.py)."""

    _numbers = itertools.count(1)

    def __init__(self, service):
        self._service = service

    @contextlib.contextmanager
    def spawning(self):
        number = next(self._numbers)
        self._service._send({"op": "spawning", "id": number})
        self._service._ack(number)  # the service holds the runner's first calls from now on
        try:
            yield self.admit
        finally:
            self._service._send({"op": "spawned", "id": number})

    def admit(self, pid):
        """From the moment this returns, the service serves `pid`'s connections."""
        self._tell("admit", pid)

    def dismiss(self, pid):
        self._tell("dismiss", pid)

    def _tell(self, op, pid):
        number = next(self._numbers)
        self._service._send({"op": op, "pid": pid, "id": number})
        self._service._ack(number)
