"""gunicorn's threaded worker, made to read every request whole before a thread takes it.

gunicorn 27's gthread worker gives each new connection to a pool thread, which waits up to 5 s for the first
byte and then reads the head and the body with no deadline: a few clients sending a byte now and then hold
every thread, and /health stops answering. This worker's event loop (its main thread) reads requests
instead, without ever blocking, until one is whole (app/request_bytes.py says when), and only then gives it
to a pool thread, whose parser reads those bytes and never the socket. So no thread waits for a client:

- a request must arrive whole within server.request_timeout of its first byte (of the connection's opening,
  on a new connection); else 408 and the connection closes. One that sent nothing is just closed;
- at most server.max_partial_requests requests may be partly here at once; one more that is not whole on its
  first read gets 503 with Retry-After;
- Expect: 100-continue is answered as soon as the head is here (not when the body is too large: the app
  answers 413 at once, and the connection closes);
- a head over 64 KiB gets 431, and a chunked body over server.max_body_bytes 413 (the app answers a
  Content-Length over it);
- connections are closed gracefully by the event loop: FIN, then what the client still sends is read and
  dropped, for up to 2 s (gunicorn does this in its event loop too, but blocking it, for up to 2 s each);
- open connections are at most server.max_connections (gunicorn's worker_connections).

Keep-alive and pipelining work as before: bytes read past one request are where the next one starts.
Plain HTTP/1.1 only, no TLS, HTTP/2 or PROXY protocol (nginx in front does those).

Out of file descriptors, gunicorn's accept() raised and the worker died, with the runner and every generation
in it. Here it sheds idle connections instead (new ones that sent nothing yet, then kept-alive ones, then ones
lingering in their close), pauses accepting for a moment when there is nothing to shed, and goes on: what it
holds keeps being served, /health answers once a descriptor is free, and /metrics counts what was shed.

The pool threads, which parse, fit and render requests (a hostile one can cost a second of CPU), run at a
lower priority than the rest (REQUEST_THREAD_NICE): on a busy core the tokenizer service, whose answers the
runner must have within 1 s, and the card thread go first (docs/PROTOCOL.md, "Our answer: a service in a
process of its own").
"""
import collections
import errno
import json
import os
import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from gunicorn.http.unreader import IterUnreader
from gunicorn.workers.gthread import ThreadWorker
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app.errors import APIError, is_ollama_path
from app.request_bytes import MAX_HEAD_BYTES, Arrived, RequestBytes

READ_BYTES = 64 * 1024
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
SHED_AT_ONCE = 16            # idle connections closed when accept() finds no descriptor free
ACCEPT_PAUSE_SECONDS = 0.1   # when none was idle: the requests being served will free some
LINGER_SECONDS = 2.0  # as gunicorn's own graceful close
RETRY_AFTER_SECONDS = 1
REQUEST_THREAD_NICE = 5      # added to each pool thread's niceness (Linux: per thread) as it starts
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
REASONS = {408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


class Arrival:
    """One connection's next request, while it arrives."""

    def __init__(self, conn, request, deadline):
        self.conn = conn
        self.request = request
        self.deadline = deadline
        self.partial = False    # counted against max_partial_requests
        self.watched = False    # registered with the event loop
        self.continued = False  # 100 Continue sent


class WholeRequestWorker(ThreadWorker):
    """Configured by the app's own settings (server.*), read once the app is loaded."""

    @classmethod
    def check_config(cls, cfg, log):
        super().check_config(cfg, log)
        # request_bytes.py frames plain HTTP/1.1 requests, nothing before or around them.
        if cfg.is_ssl or cfg.http2_cleartext != "off" or cfg.proxy_protocol != "off":
            raise RuntimeError("qwen-chat's worker serves plain HTTP/1.1 (no TLS, HTTP/2 or PROXY protocol): "
                               "nginx in front does those")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrivals = {}        # connection -> Arrival, oldest first, so also soonest deadline first
        self.closing = {}         # socket -> when to stop waiting for the client's FIN, soonest first
        self.body_unread = set()  # connections served before their body arrived: they close after the answer
        self.partial_requests = 0
        self.refused = collections.Counter()  # status -> requests answered here, never seen by the app
        self.shed = collections.Counter()     # state -> idle connections closed for want of descriptors
        self.accept_paused_until = 0.0

    def load_wsgi(self):
        super().load_wsgi()
        server = self.wsgi.config["QWEN"]["server"]
        self.request_timeout = server["request_timeout"]
        self.max_partial_requests = server["max_partial_requests"]
        self.max_body = server["max_body_bytes"]
        self.wsgi.extensions["qwen_metrics"].registry.register(ConnectionMetrics(self))

    def get_thread_pool(self):
        return ThreadPoolExecutor(max_workers=self.cfg.threads, initializer=lower_this_threads_priority)

    # -- out of descriptors ---------------------------------------------------------------------------------
    def accept(self, listener):
        try:
            super().accept(listener)
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS:
                raise
            self.out_of_descriptors()

    def out_of_descriptors(self):
        """accept() found no descriptor free: close idle connections, oldest first, or pause accepting."""
        shed = 0
        for arrival in [a for a in self.arrivals.values() if not a.request.data][:SHED_AT_ONCE]:
            self.forget(arrival)  # a new connection that has sent nothing: nobody waits for an answer
            self.close_now(arrival.conn.sock)
            self.shed["new"] += 1
            shed += 1
        while self.keepalived_conns and shed < SHED_AT_ONCE:
            conn = self.keepalived_conns.popleft()  # between two requests: the client reconnects if it needs to
            self.poller.unregister(conn.sock)
            self.close_now(conn.sock)
            self.shed["keepalive"] += 1
            shed += 1
        for sock in list(self.closing)[:max(0, SHED_AT_ONCE - shed)]:
            self.finish_closing(sock)  # its answer has left; only the client's last bytes are not read
            self.shed["closing"] += 1
            shed += 1
        if not shed:
            self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
            self.set_accept_enabled(False)
            self.shed["none_idle"] += 1
        self.log.warning("out of file descriptors with %d connections open: closed %d idle ones%s", self.nr_conns,
                         shed, "" if shed else f"; accepting again in {ACCEPT_PAUSE_SECONDS:g} s")

    def set_accept_enabled(self, enabled):
        if enabled and time.monotonic() < self.accept_paused_until:
            return  # gunicorn's loop asks every turn; the pause decides
        super().set_accept_enabled(enabled)

    # -- before a thread: gather the request ------------------------------------------------------------------
    def enqueue_req(self, conn):
        """gunicorn calls this for a new connection, a kept-alive one that became readable, and one with
        bytes left after a request (pipelining). The request is gathered here, then given to a thread."""
        leftover = conn.parser.unreader.take_buffered() if conn.parser else b""
        arrival = Arrival(conn, RequestBytes(self.max_body, leftover), time.monotonic() + self.request_timeout)
        self.arrivals[conn] = arrival
        conn.sock.setblocking(False)
        self.receive(arrival)

    def receive(self, arrival, _fileobj=None):
        """Read what the client has sent, without waiting, and act on what has arrived."""
        request = arrival.request
        while request.arrived is Arrived.NOT_YET:
            try:
                data = arrival.conn.sock.recv(READ_BYTES)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:  # the client left, or stopped sending, before the request was whole
                self.forget(arrival)
                self.close_now(arrival.conn.sock)
                return
            request.add(data)
        if request.arrived is Arrived.NOT_YET:
            self.wait_for_more(arrival)
        elif request.arrived is Arrived.OVERSIZED_HEAD:
            self.refuse(arrival, 431, f"The request head is larger than this server accepts ({MAX_HEAD_BYTES} "
                        "bytes).", "invalid_request_error", "request_header_too_large")
        elif request.arrived is Arrived.OVERSIZED_BODY:
            # Only a chunked body gets here (a Content-Length over the limit goes to the app, which answers 413
            # from the head): the app would read it cut at the limit, and answer that it is not valid JSON.
            self.refuse(arrival, 413, f"The request body is larger than this server accepts ({self.max_body} "
                        "bytes).", "invalid_request_error", "request_too_large")
        else:
            self.hand_over(arrival)

    def wait_for_more(self, arrival):
        request, sock = arrival.request, arrival.conn.sock
        if request.data and not arrival.partial:
            if self.partial_requests >= self.max_partial_requests:
                self.refuse(arrival, 503, "Too many requests are arriving slowly at once; try again shortly.",
                            "server_busy", "too_many_partial_requests", {"Retry-After": str(RETRY_AFTER_SECONDS)})
                return
            arrival.partial = True
            self.partial_requests += 1
        if request.expects_continue and not arrival.continued:
            # curl waits a second for this before it sends a body; we will read the body, so at once.
            arrival.continued = True
            if not send_now(sock, CONTINUE):
                self.forget(arrival)
                self.close_now(sock)
                return
        if not arrival.watched:
            self.poller.register(sock, selectors.EVENT_READ, partial(self.receive, arrival))
            arrival.watched = True

    def hand_over(self, arrival):
        conn = arrival.conn
        self.forget(arrival)
        if conn.parser is None:
            conn.init()
            # The parser reads what arrived and never the socket, so a thread cannot wait for a client.
            conn.parser.unreader = IterUnreader(())
        conn.parser.unreader.unread(bytes(arrival.request.data))
        if not arrival.request.body_whole:
            self.body_unread.add(conn)
        super().enqueue_req(conn)

    def forget(self, arrival):
        del self.arrivals[arrival.conn]
        if arrival.partial:
            self.partial_requests -= 1
        if arrival.watched:
            self.poller.unregister(arrival.conn.sock)

    def refuse(self, arrival, status, message, error_type, code, headers=None):
        """Answer a request the app will never see, and close the connection."""
        self.forget(arrival)
        self.refused[status] += 1
        error = APIError(status, message, type=error_type, code=code)
        path = arrival.request.path or ""
        body = json.dumps(error.ollama_body() if is_ollama_path(path) else error.openai_body()).encode()
        head = [f"HTTP/1.1 {status} {REASONS[status]}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        send_now(arrival.conn.sock, ("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.log.info("%s: %d %s, %d bytes received", client_address(arrival.conn), status, REASONS[status],
                      len(arrival.request.data))
        self.close_gently(arrival.conn.sock)

    def expire_arrivals(self):
        now = time.monotonic()
        while self.arrivals:
            arrival = next(iter(self.arrivals.values()))
            if arrival.deadline > now:
                break
            if arrival.request.data:
                self.refuse(arrival, 408, f"The request did not arrive whole within {self.request_timeout:g} "
                            "seconds.", "invalid_request_error", "request_timeout")
            else:  # nothing was asked: no answer is owed
                self.forget(arrival)
                self.close_now(arrival.conn.sock)

    # -- in a thread: serve it ------------------------------------------------------------------------------
    def handle_request(self, req, conn):
        # gunicorn sends 100 Continue as the app starts; the event loop has sent it already, or the body was
        # here before anyone asked for it.
        req._expected_100_continue = False
        if conn in self.body_unread:
            req.force_close()  # the rest of the body is still on the way: no next request can be found after it
        return super().handle_request(req, conn)

    # -- after a thread: keep alive, or close ----------------------------------------------------------------
    def finish_request(self, conn, fs):
        self.body_unread.discard(conn)
        if fs.cancelled() or fs.exception() is not None or not fs.result():
            self.close_gently(conn.sock)
            return
        super().finish_request(conn, fs)

    def close_gently(self, sock):
        """Close after the answer has left (RFC 9112 section 9.6): FIN now, then read and drop what the client
        still sends until it closes too, for LINGER_SECONDS at most. Closing with bytes unread would send a
        reset, which can destroy the answer before the client reads it."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, self.drain_closing)
        except (OSError, ValueError):
            self.close_now(sock)
            return
        self.closing[sock] = time.monotonic() + LINGER_SECONDS

    def drain_closing(self, sock):
        try:
            for _ in range(16):  # a turn of the event loop drops 1 MiB at most: other connections come first
                if not sock.recv(READ_BYTES):
                    break
            else:
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.finish_closing(sock)

    def finish_closing(self, sock):
        del self.closing[sock]
        self.poller.unregister(sock)
        self.close_now(sock)

    def close_now(self, sock):
        self.nr_conns -= 1
        try:
            sock.close()
        except OSError:
            pass

    def expire_closing(self):
        now = time.monotonic()
        while self.closing:
            sock, deadline = next(iter(self.closing.items()))
            if deadline > now:
                break
            self.finish_closing(sock)

    # -- the event loop's timers ---------------------------------------------------------------------------
    def wait_for_and_dispatch_events(self, timeout):
        # Wake up for the next deadline, not only once a second.
        deadlines = []
        if self.arrivals:
            deadlines.append(next(iter(self.arrivals.values())).deadline)
        if self.closing:
            deadlines.append(next(iter(self.closing.values())))
        if self.accept_paused_until > time.monotonic():
            deadlines.append(self.accept_paused_until)
        if deadlines:
            timeout = max(0.0, min(timeout, min(deadlines) - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)

    def murder_pending(self):
        # Called after every turn of gunicorn's event loop, while running and while stopping.
        super().murder_pending()
        self.expire_arrivals()
        self.expire_closing()


def lower_this_threads_priority():
    """A pool thread's start (the pool's initializer). Nothing is spawned from these threads, so no child
    inherits it. On Linux, PRIO_PROCESS with 0 names the calling thread, not the whole process."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + REQUEST_THREAD_NICE)
    except OSError:
        pass  # an initializer that raises breaks the whole pool: serving at the same priority is better


def send_now(sock, data):
    """Write a short answer without waiting; False if it did not all go."""
    try:
        return sock.send(data) == len(data)
    except OSError:
        return False


def client_address(conn):
    return conn.client[0] if isinstance(conn.client, tuple) else str(conn.client)


class ConnectionMetrics:
    """The worker's connections for /metrics, read when Prometheus scrapes."""

    def __init__(self, worker):
        self.worker = worker

    def collect(self):
        worker = self.worker
        connections = GaugeMetricFamily("qwen_chat_connections", "Open client connections")
        connections.add_metric([], worker.nr_conns)
        yield connections
        arriving = GaugeMetricFamily("qwen_chat_requests_arriving", "Requests partly received, waiting for "
                                     "the rest (without a thread)")
        arriving.add_metric([], worker.partial_requests)
        yield arriving
        shed = CounterMetricFamily("qwen_chat_connections_shed", "Idle connections closed because no file "
                                   "descriptor was free to accept another (new: nothing sent yet; keepalive: "
                                   "between requests; closing: its answer sent; none_idle: accepting paused "
                                   "instead)", labels=["state"])
        for state in ("new", "keepalive", "closing", "none_idle"):
            shed.add_metric([state], worker.shed[state])
        yield shed
        refused = CounterMetricFamily("qwen_chat_requests_refused", "Requests answered before they arrived whole "
                                      "(408 too slow, 413 chunked body too large, 431 head too large, 503 too "
                                      "many arriving)", labels=["status"])
        for status in REASONS:
            refused.add_metric([str(status)], worker.refused[status])
        yield refused
