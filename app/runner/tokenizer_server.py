"""The tokenizer service's own process: the HTTP server main_axcl calls back (docs/PROTOCOL.md, "The tokenizer
service it calls back").

Why a process of its own: the vendor's loop dies (SIGSEGV) when an answer is refused or later than 1 s, and the
worker's threads, which parse, fit and stream every client's request, share one interpreter lock: under
hostile requests on a busy Pi its answers were seen 648 ms late. Here nothing else runs, so an answer waits
for nothing but the kernel's scheduler. It loads only the `tokenizers` library (app/tokenizer/pieces.py).

    python -m app.runner.tokenizer_server --control FD --tokenizer DIR [--max-connections N]
                                          [--request-seconds S] [--idle-seconds S]

The worker's TokenizerService (tokenizer_service.py) starts it and talks to it over FD, an AF_UNIX
SOCK_SEQPACKET socket, one JSON object per message:
- from the worker: `register` {handle, ids}, `forget` {handle}, `spawning` {id}, `spawned` {id}, `admit`
  {pid, id}, `dismiss` {pid, id} and `ping` {id} (`spawning`, `admit`, `dismiss` and `ping` are answered by
  `ack` {id} once done);
- to the worker: `ready` {port} once listening, `ack` {id}, `encoded` {handle, at} when the runner fetched a
  registered prompt, `decoded` {handle, ids, printed, maybe_final, at} for every /decode of its generation,
  sent before the answer goes to the runner (so the worker always knows a chunk before it is printed).
It ends when the worker closes its end, or dies (PR_SET_PDEATHSIG).

Since any call can change a generation, only the runner the worker spawned is served (peer.RunnerPeers: the
worker admits its pid), requests a web page could send are refused, and connections are bounded in number and
in time (docs/PROTOCOL.md, "Who may call the service").
"""
import argparse
import ctypes
import errno
import json
import logging
import os
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import deque

from app.runner.deadline_reader import DeadlineReader
from app.runner.peer import RunnerPeers
from app.tokenizer.pieces import Pieces

log = logging.getLogger("app.runner.tokenizer_service")

HANDLE_PREFIX = "#qwen-chat-request:"
MAX_BODY = 4 << 20  # a 1024-token prompt line is far below this
MAX_LINE = 8192
MAX_HEADERS = 100
MAX_MESSAGE = 1 << 20  # a control message (a registered prompt: 1024 ids)
# The Content-Types a web page can POST without a CORS preflight (the Fetch standard's "simple" ones).
SIMPLE_TYPES = (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data")

# The vendor's runner opens a new connection for every call and closes it after the answer: a few at once.
MAX_CONNECTIONS = 8
REQUEST_SECONDS = 5.0    # a request, once begun, must arrive whole within this (the runner's take < 1 ms)
IDLE_SECONDS = 10.0      # a connection quiet this long is closed (the runner's never are: one call each)
REFUSAL_LOG_SECONDS = 60.0  # refused connections are logged at most once per this, with a count
ACCEPT_PAUSE_SECONDS = 0.05  # after EMFILE: let connections close before accepting again
_PR_SET_PDEATHSIG = 1


class Prompt:
    """A prompt the worker registered: its ids, and its generation's /decode calls so far."""

    def __init__(self, handle, ids, pieces):
        self.handle = handle
        self.ids = ids
        self.decoder = pieces.incremental_decoder()
        self.live_ids = []  # ids of the /decode calls so far, in order


class Control:
    """The worker's end of things: registered prompts, admitted runners, and the messages both ways."""

    def __init__(self, sock, pieces, peers):
        self.sock = sock
        self.pieces = pieces
        self.peers = peers
        self.prompts = {}
        self.current = None           # the prompt whose generation runs (the runner fetched it last)
        self._read_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._outbox = deque()        # messages the worker has not taken yet (its socket buffer was full)
        self._spawns = {}             # spawn id -> the context manager holding the peers' spawn open
        self.closed = threading.Event()

    # -- to the worker -----------------------------------------------------------------------------------
    def send(self, message):
        """Never blocks: the runner waits for the answer this goes before. What the worker's buffer cannot take
        waits in order, and goes out as soon as it can (flush())."""
        data = json.dumps(message, separators=(",", ":")).encode()
        with self._send_lock:
            self._outbox.append(data)
            self._flush_locked()

    def flush(self):
        with self._send_lock:
            self._flush_locked()

    def _flush_locked(self):
        while self._outbox:
            try:
                self.sock.send(self._outbox[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self._outbox.clear()
                self.closed.set()
                return
            self._outbox.popleft()

    @property
    def backlog(self):
        return bool(self._outbox)

    # -- from the worker ---------------------------------------------------------------------------------
    def pump(self):
        """Act on every message waiting, without blocking. Any thread may call it: the HTTP handlers do before
        they answer, so that a prompt registered before its handle was typed is always known."""
        with self._read_lock:
            while True:
                try:
                    data = self.sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    self.closed.set()
                    return
                self._act(json.loads(data))

    def _act(self, message):
        op = message["op"]
        if op == "register":
            self.prompts[message["handle"]] = Prompt(message["handle"], message["ids"], self.pieces)
        elif op == "forget":
            prompt = self.prompts.pop(message["handle"], None)
            if prompt is not None and self.current is prompt:
                self.current = None
        elif op == "spawning":
            spawn = self.peers.spawning()
            spawn.__enter__()
            self._spawns[message["id"]] = spawn
            self.send({"op": "ack", "id": message["id"]})
        elif op == "spawned":
            spawn = self._spawns.pop(message["id"], None)
            if spawn is not None:
                spawn.__exit__(None, None, None)
        elif op == "ping":
            self.send({"op": "ack", "id": message["id"]})
        elif op == "admit":
            self.peers.admit(message["pid"])
            self.send({"op": "ack", "id": message["id"]})
        elif op == "dismiss":
            self.peers.dismiss(message["pid"])
            self.send({"op": "ack", "id": message["id"]})

    def watch(self):
        """The control socket's own thread: messages that come while no call does, the outbox, the end."""
        poller = select.poll()
        while not self.closed.is_set():
            poller.register(self.sock, select.POLLIN | (select.POLLOUT if self.backlog else 0))
            for _, events in poller.poll(1000):
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self.pump()
                if events & select.POLLOUT:
                    self.flush()

    # -- the runner's two calls that matter ----------------------------------------------------------------
    def encode(self, text):
        self.pump()
        prompt = self.prompts.get(text)
        if prompt is None:
            self.current = None
            return self.pieces.vendor_prompt_ids(text)
        self.current = prompt
        self.send({"op": "encoded", "handle": prompt.handle, "at": time.monotonic()})
        return prompt.ids

    def decode(self, ids):
        prompt = self.current
        if prompt is None:
            return self.pieces.decode(ids)
        live = prompt.live_ids
        # The runner ends every generation with one /decode of all output ids (docs/PROTOCOL.md). Such a call
        # repeats the ids seen so far plus at most 3 more: the 1-2 still pending, and the one an interrupted
        # step adds. A live chunk of 3 ids can only look like that in rare cases, which the driver settles from
        # what the runner prints.
        maybe_final = ids[:len(live)] == live and len(ids) - len(live) <= 3
        # main_axcl prints the answer with printf("%s"): a NUL would end the string early.
        printed = prompt.decoder.push(ids).replace("\x00", "")
        live.extend(ids)
        self.send({"op": "decoded", "handle": prompt.handle, "ids": ids, "printed": printed,
                   "maybe_final": maybe_final, "at": time.monotonic()})
        return printed


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, control, max_connections, request_seconds, idle_seconds):
        super().__init__(address, _Handler)
        self.control = control
        self.max_connections = max_connections
        self.request_seconds = request_seconds
        self.idle_seconds = idle_seconds
        self._open = set()            # connections being served
        self._open_lock = threading.Lock()
        self._refused = 0             # refused since the last log line
        self._quiet_until = 0.0

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors: the connections being served will close; accept again shortly.
                time.sleep(ACCEPT_PAUSE_SECONDS)
            raise

    def verify_request(self, request, client_address):
        """Runs on the accepting thread, before anything is read: only the runner's connections, and only as
        many as max_connections, get a thread."""
        caller = self.control.peers.identify(client_address, request.getsockname())
        if caller.runner_pid is None:
            self._refuse(request, f"not owned by the runner (from {client_address[0]}:{client_address[1]}, "
                                  f"uid {'unknown' if caller.uid is None else caller.uid})")
            return False
        with self._open_lock:
            if len(self._open) < self.max_connections:
                self._open.add(request)
                return True
        self._refuse(request, f"beyond the cap ({self.max_connections} already open)")
        return False

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def _refuse(self, request, why):
        # Reset rather than close: no TIME_WAIT left behind, however many connections a caller makes.
        request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._refused += 1
        now = time.monotonic()
        if now >= self._quiet_until:  # a caller that keeps trying must not flood the log
            log.warning("tokenizer service: refused a connection %s (%d refused since the last such line, which "
                        "comes at most once a minute)", why, self._refused)
            self._refused, self._quiet_until = 0, now + REFUSAL_LOG_SECONDS


class _Refused(Exception):
    """A well-formed request we will not serve (403)."""


class _Handler(socketserver.BaseRequestHandler):
    """HTTP/1.1 just big enough for the runner's four calls: bodies with a Content-Length, keep-alive honoured.

    Not http.server: its per-request header parsing (the email package) was the largest cost on the path
    every streamed chunk takes (the runner waits for each /decode before it generates on), and the runner's
    requests are tiny and always alike.
    """
    REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}

    def setup(self):
        # Answers are a single small write; never let Nagle hold one back for a delayed ACK.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = DeadlineReader(self.request)

    def handle(self):
        server = self.server
        while self.reader.wait_for_data(server.idle_seconds):  # else idle too long, or closed
            try:
                request = self._read_request(time.monotonic() + server.request_seconds)
            except OSError:
                return  # begun but not finished in time (TimeoutError), or the caller reset the connection
            except _Refused as exc:
                log.warning("tokenizer service: refused a request on the runner's connection: %s", exc)
                self._reply(403, {"error": str(exc)}, keep_alive=False)
                return
            except ValueError as exc:
                self._reply(400, {"error": str(exc)}, keep_alive=False)
                return
            if request is None:
                return  # the client closed the connection
            method, path, body, keep_alive = request
            status, answer = self._dispatch(method, path, body)
            self._reply(status, answer, keep_alive)
            if not keep_alive:
                return

    def _read_request(self, deadline):
        line = self.reader.readline(MAX_LINE, deadline)
        if not line:
            return None
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise ValueError("malformed request line")
        method, path, version = (part.decode("latin-1") for part in parts)
        length, keep_alive = 0, version == "HTTP/1.1"
        content_type, from_a_page = None, False
        for _ in range(MAX_HEADERS):
            header = self.reader.readline(MAX_LINE, deadline)
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)  # ValueError -> 400
            elif name == b"connection":
                keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
            elif name == b"transfer-encoding":
                raise ValueError("send a Content-Length, not a chunked body")
            elif name == b"content-type":
                content_type = value.partition(b";")[0].strip()
            elif name == b"origin" or name.startswith(b"sec-fetch-"):
                from_a_page = True  # browsers add these; the runner never sends them
        else:
            raise ValueError("too many header lines")
        if not 0 <= length <= MAX_BODY:
            raise ValueError("body too large")
        body = self.reader.read(length, deadline)
        # A page on this host can make a browser send requests here: cross-site ones carry Origin (and
        # Sec-Fetch-*), and the only POSTs a page can send without a CORS preflight (which this service never
        # answers) are the "simple" types. The vendor's runner sends application/json; a runner that sent no
        # type at all would still be served.
        if from_a_page:
            raise _Refused("requests from a web page (Origin or Sec-Fetch-* headers) are not served")
        if method == "POST" and content_type in SIMPLE_TYPES:
            raise _Refused("a POST with a form or text/plain body is what a web page sends; send application/json")
        return method, path, body, keep_alive

    def _dispatch(self, method, path, body):
        control = self.server.control
        pieces = control.pieces
        if method == "GET" and path == "/bos_id":
            return 200, {"bos_id": pieces.bos_id}
        if method == "GET" and path == "/eos_id":
            return 200, {"eos_id": pieces.eos_id}
        if path not in ("/encode", "/decode", "/bos_id", "/eos_id"):
            return 404, {"error": f"no such endpoint: {method} {path}"}
        if method != "POST" or path in ("/bos_id", "/eos_id"):
            return 405, {"error": f"{method} is not allowed for {path}"}
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("body must be a JSON object")
            if path == "/encode":
                text = request.get("text")
                if not isinstance(text, str):
                    raise ValueError('"text" must be a string')
                return 200, {"token_ids": control.encode(text)}
            ids = request.get("token_ids")
            if not isinstance(ids, list) or not all(pieces.valid_id(i) for i in ids):
                raise ValueError('"token_ids" must be a list of token ids')
            return 200, {"text": control.decode(ids)}
        except (ValueError, RecursionError) as exc:  # bad or absurdly nested JSON included
            return 400, {"error": str(exc) or "unreadable JSON"}

    def _reply(self, status, obj, keep_alive):
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        head = (f"HTTP/1.1 {status} {self.REASONS[status]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n" + ("" if keep_alive else "Connection: close\r\n"))
        try:
            self.request.settimeout(self.server.request_seconds)  # a caller that never reads holds nothing
            self.request.sendall(head.encode("ascii") + b"\r\n" + body)
        except OSError:
            pass  # the client went away (or stopped reading)


def die_with_parent(parent_pid):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the guard was armed
        os._exit(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description="qwen-chat's tokenizer service for main_axcl")
    parser.add_argument("--control", type=int, required=True, help="the worker's control socket (a descriptor)")
    parser.add_argument("--tokenizer", required=True, help="the folder holding tokenizer.json")
    parser.add_argument("--parent", type=int, default=None, help="die with this process")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    parser.add_argument("--request-seconds", type=float, default=REQUEST_SECONDS)
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS)
    args = parser.parse_args(argv)
    if args.parent:
        die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker stops us by closing the control socket
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=args.control)
    control = Control(sock, Pieces(args.tokenizer), RunnerPeers())
    server = _Server((args.host, args.port), control, args.max_connections, args.request_seconds,
                     args.idle_seconds)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http", daemon=True).start()
    control.send({"op": "ready", "port": server.server_address[1]})
    control.watch()  # until the worker closes its end
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
