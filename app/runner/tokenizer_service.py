"""The tokenizer HTTP service that main_axcl calls back (docs/PROTOCOL.md, "The tokenizer service").

The runner's side of our process, owned by the Card: it runs in a thread, on 127.0.0.1 and a port picked at
start. Because it answers `/encode`, it decides the exact prompt the card sees: the driver never writes a
prompt's text to the runner's stdin, only a handle naming a `DecodeLog` registered here, and `/encode` of
that handle returns the ids rendered from the whole conversation. Any other line gets the vendor's behaviour
(default system prompt, one user turn), so the binary still works when someone drives it by hand against us.

`/decode` answers each live chunk with text that is safe to print (see `IncrementalDecoder`) and records
every call in the generation's `DecodeLog`, so the driver learns the output ids and the exact bytes the
runner is about to print.

Since any call can change a generation, only the runner we spawned is served (`peer.RunnerPeers`: the Runner
admits its pid), requests a web page could send are refused, and connections are bounded in number and in
time (docs/PROTOCOL.md, "Who may call the service").
"""
import json
import logging
import secrets
import socket
import socketserver
import struct
import threading
import time

from app.runner.deadline_reader import DeadlineReader
from app.runner.peer import RunnerPeers

log = logging.getLogger(__name__)

HANDLE_PREFIX = "#qwen-chat-request:"
MAX_BODY = 4 << 20  # a 1024-token prompt line is far below this
MAX_LINE = 8192
MAX_HEADERS = 100
# The Content-Types a web page can POST without a CORS preflight (the Fetch standard's "simple" ones).
SIMPLE_TYPES = (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data")

# The runner keeps one connection open; a few more leave room for reconnects while old ones close.
MAX_CONNECTIONS = 8
REQUEST_SECONDS = 5.0    # a request, once begun, must arrive whole within this (the runner's take < 1 ms)
# Only the runner's own connections get this far, at most MAX_CONNECTIONS of them: an idle one costs a thread
# and nothing else, and closing it would be a risk (the vendor's runner does not retry a failed /encode).
IDLE_SECONDS = None      # None: a kept-alive connection of the runner's stays open while it is quiet
REFUSAL_LOG_SECONDS = 60.0  # refused connections are logged at most once per this, with a count


RETRY_SECONDS = 0.9  # the runner waits 1 s for an answer, then 1 s more before it asks again


class DecodeCall:
    """One /decode call of a generation: the ids asked for and the text answered (what the runner prints)."""
    __slots__ = ("ids", "printed", "maybe_final", "at")

    def __init__(self, ids, printed, maybe_final):
        self.ids = ids
        self.printed = printed
        self.maybe_final = maybe_final
        self.at = time.monotonic()


class DecodeLog:
    """One prompt sent to the runner, and the /decode calls the runner made for it."""

    def __init__(self, handle, prompt_ids, decoder):
        self.handle = handle
        self.prompt_ids = list(prompt_ids)
        self._decoder = decoder
        self._lock = threading.Lock()
        self._calls = []
        self._live_ids = []  # ids of the calls so far, in order
        self.encoded_at = None  # when the runner fetched the prompt (monotonic): its run has begun

    def record(self, ids):
        """Answer a /decode call and remember it. Returns the text to send back."""
        with self._lock:
            last = self._calls[-1] if self._calls else None
            if last is not None and ids == last.ids and time.monotonic() - last.at >= RETRY_SECONDS:
                # The runner gave up waiting for our answer and asks again (docs/PROTOCOL.md: once, after 1 s).
                # It is the same call, not a new chunk: one call, the same answer, its ids counted once.
                last.at = time.monotonic()
                return last.printed
            live = self._live_ids
            # The runner ends every generation with one /decode of all output ids (docs/PROTOCOL.md). Such a
            # call repeats the ids seen so far plus at most the 1-2 that were still pending; a live chunk
            # of 3 new ids can only look like that in rare cases, which the driver settles from stdout.
            maybe_final = ids[:len(live)] == live and len(ids) - len(live) <= 2
            text = self._decoder.push(ids)
            # main_axcl prints the answer with printf("%s"): a NUL would end the string early.
            printed = text.replace("\x00", "")
            self._calls.append(DecodeCall(ids, printed, maybe_final))
            live.extend(ids)
            return printed

    def calls(self, start=0):
        with self._lock:
            return self._calls[start:]

    @property
    def call_count(self):
        return len(self._calls)  # a list's length is read atomically


class TokenizerService:
    """The runner's tokenizer over HTTP, plus the registry of pending prompts."""

    def __init__(self, tokenizer, host="127.0.0.1", port=0, max_connections=MAX_CONNECTIONS,
                 request_seconds=REQUEST_SECONDS, idle_seconds=IDLE_SECONDS):
        self.tokenizer = tokenizer
        self.peers = RunnerPeers()  # who may call: the Runner admits the pid it spawned
        self._pending = {}
        self._current = None
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.service = self
        self._server.max_connections = max_connections
        self._server.request_seconds = request_seconds
        self._server.idle_seconds = idle_seconds
        self._thread = None

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="tokenizer-service", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    # -- prompts ---------------------------------------------------------------------------------
    def register(self, prompt_ids):
        """Register a prompt; write `log.handle` (one short line) to the runner to run it."""
        handle = HANDLE_PREFIX + secrets.token_hex(16)
        log = DecodeLog(handle, prompt_ids, self.tokenizer.incremental_decoder())
        with self._lock:
            self._pending[handle] = log
        return log

    def forget(self, log):
        with self._lock:
            self._pending.pop(log.handle, None)
            if self._current is log:
                self._current = None

    # -- the four calls ----------------------------------------------------------------------------
    def encode(self, text):
        with self._lock:
            log = self._pending.get(text)
            if log is None:
                ids = self.tokenizer.vendor_prompt_ids(text)
                log = DecodeLog(None, ids, self.tokenizer.incremental_decoder())
            self._current = log
            log.encoded_at = time.monotonic()
        return log.prompt_ids

    def decode(self, ids):
        with self._lock:
            log = self._current
        if log is None:
            return self.tokenizer.decode(ids)
        return log.record(ids)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._open = set()            # connections being served
        self._open_lock = threading.Lock()
        self._refused = 0             # refused since the last log line
        self._quiet_until = 0.0

    def verify_request(self, request, client_address):
        """Runs on the accepting thread, before anything is read: only the runner's connections, and only as
        many as MAX_CONNECTIONS, get a thread."""
        caller = self.service.peers.identify(client_address, request.getsockname())
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
    """HTTP/1.1 just big enough for the runner's four calls: keep-alive, bodies with a Content-Length.

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
        service = self.server.service
        tokenizer = service.tokenizer
        if method == "GET" and path == "/bos_id":
            return 200, {"bos_id": tokenizer.bos_id}
        if method == "GET" and path == "/eos_id":
            return 200, {"eos_id": tokenizer.eos_id}
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
                return 200, {"token_ids": service.encode(text)}
            ids = request.get("token_ids")
            if not isinstance(ids, list) or not all(tokenizer.valid_id(i) for i in ids):
                raise ValueError('"token_ids" must be a list of token ids')
            return 200, {"text": service.decode(ids)}
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
