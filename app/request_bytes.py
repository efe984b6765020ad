"""Whether an HTTP/1.1 request has arrived whole, judged from the bytes received so far.

The worker (app/http_worker.py) reads requests in its event loop and gives one to a thread only once it is
here: this says when. Only the framing is read (where the head ends, then the body by Content-Length or
chunked coding, RFC 9112 sections 6 and 7); gunicorn's parser still parses and validates the request, from
these same bytes. A head this module cannot frame is handed over as it is, and the parser answers it (400,
501, ...) without needing the body.
"""
import enum
import re

# The request line and the headers. nginx allows 32 KiB by default (4 buffers of 8 KiB); API clients send
# well under 2 KiB.
MAX_HEAD_BYTES = 64 * 1024
# A chunk-size line is a few hex digits and perhaps extensions (gunicorn's limit is a header line's).
MAX_CHUNK_LINE_BYTES = 8192

BARE_LF = re.compile(rb"(?<!\r)\n")


class Arrived(enum.Enum):
    NOT_YET = "not yet"       # more bytes are needed
    WHOLE = "whole"           # the head and the whole body
    HEAD = "head"             # the head, and it is all the answer needs: its Content-Length is over the limit
    #                           (the app answers 413 without reading the body) or the body cannot be framed (the
    #                           parser answers 400)
    OVERSIZED_HEAD = "oversized head"  # no end of the head within MAX_HEAD_BYTES
    OVERSIZED_BODY = "oversized body"  # chunked data beyond max_body (the app would read it cut at the limit)


class RequestBytes:
    """The bytes of one request (and perhaps of the next ones, pipelined) as they arrive."""

    def __init__(self, max_body, data=b""):
        self.max_body = max_body
        self.data = bytearray()
        self.arrived = Arrived.NOT_YET
        self.path = None                # from the request line, once that is here
        self.expects_continue = False   # an HTTP/1.1 head with Expect: 100-continue and a body we will read
        self._scanned = 0               # how far the head has been searched for its end
        self._body_start = None
        self._length = None             # the body's Content-Length, or None for chunked coding
        self._chunk_at = None           # chunked: where the next chunk-size line (or the trailers) starts
        self._chunked_body = 0          # chunked: data bytes in the chunks walked so far
        self._in_trailers = False
        self.add(data)

    @property
    def body_whole(self):
        return self.arrived is Arrived.WHOLE

    def add(self, data):
        """Take more bytes; returns what has arrived now."""
        self.data += data
        if self.arrived is Arrived.NOT_YET and self.data:
            if self._body_start is None:
                self._find_head()
            if self._body_start is not None and self.arrived is Arrived.NOT_YET:
                self._frame_body()
        return self.arrived

    # -- the head ------------------------------------------------------------------------------------------
    def _find_head(self):
        data = self.data
        if self.path is None:
            self._read_request_line()
        # The end of the head, or a bare LF, may straddle what arrived last time.
        start = max(0, self._scanned - 3)
        end = data.find(b"\r\n\r\n", start)
        if BARE_LF.search(data, max(0, self._scanned - 1), end if end >= 0 else len(data)):
            self.arrived = Arrived.HEAD  # RFC 9112 section 2.2: lines end with CRLF; the parser says 400
            return
        if end < 0:
            self._scanned = len(data)
            if len(data) > MAX_HEAD_BYTES:
                self.arrived = Arrived.OVERSIZED_HEAD
            return
        if end + 4 > MAX_HEAD_BYTES:
            self.arrived = Arrived.OVERSIZED_HEAD
            return
        self._body_start = end + 4
        if not self._read_headers(bytes(data[:end])):
            self.arrived = Arrived.HEAD

    def _request_line(self, head):
        # One empty line may come before the request line (RFC 9112 section 2.2), as gunicorn allows.
        return head[2:] if head.startswith(b"\r\n") else head

    def _read_request_line(self):
        line, crlf, _ = self._request_line(bytes(self.data[:MAX_HEAD_BYTES])).partition(b"\r\n")
        if crlf:
            parts = line.split(b" ")
            self.path = parts[1].split(b"?", 1)[0].decode("latin-1") if len(parts) == 3 else ""

    def _read_headers(self, head):
        """Content-Length, Transfer-Encoding and Expect; False when the body's framing is not one we read."""
        lines = self._request_line(head).split(b"\r\n")
        version = lines[0].rsplit(b" ", 1)[-1]
        http11 = re.fullmatch(rb"HTTP/1\.[1-9]", version) is not None
        lengths, codings, expectations = [], [], []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return False
            name, value = name.lower(), value.strip(b" \t")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings += [coding.strip(b" \t").lower() for coding in value.split(b",")]
            elif name == b"expect":
                expectations.append(value.lower())
        if codings:
            # Chunked must be the last coding, and alone in framing the body (RFC 9112 section 6.3).
            if lengths or not http11 or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
                return False
            self._chunk_at = self._body_start
        elif len(lengths) > 1 or (lengths and not re.fullmatch(rb"[0-9]{1,19}", lengths[0])):
            return False
        else:
            self._length = int(lengths[0]) if lengths else 0
            if self._length > self.max_body:
                return False
        # HTTP/1.0 clients do not wait for 100 Continue (RFC 9110 section 10.1.1).
        self.expects_continue = http11 and b"100-continue" in expectations
        return True

    # -- the body ------------------------------------------------------------------------------------------
    def _frame_body(self):
        if self._length is not None:
            if len(self.data) >= self._body_start + self._length:
                self.arrived = Arrived.WHOLE
        else:
            self._walk_chunks()

    def _walk_chunks(self):
        """From where the last call stopped, over every chunk that has arrived whole (RFC 9112 section 7.1)."""
        data = self.data
        while not self._in_trailers:
            line_end = data.find(b"\r\n", self._chunk_at)
            if line_end < 0:
                if len(data) - self._chunk_at > MAX_CHUNK_LINE_BYTES:
                    self.arrived = Arrived.HEAD
                return
            size = data[self._chunk_at:line_end].split(b";", 1)[0].strip(b" \t")
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size):
                self.arrived = Arrived.HEAD
                return
            size = int(size, 16)
            start = line_end + 2
            if size == 0:
                self._in_trailers, self._chunk_at = True, start
                break
            if self._chunked_body + size > self.max_body:
                self.arrived = Arrived.OVERSIZED_BODY
                return
            if len(data) < start + size + 2:
                return
            if data[start + size:start + size + 2] != b"\r\n":
                self.arrived = Arrived.HEAD
                return
            self._chunked_body += size
            self._chunk_at = start + size + 2
        # The trailer section: an empty line at once, or header lines and then one.
        if data[self._chunk_at:self._chunk_at + 2] == b"\r\n" or data.find(b"\r\n\r\n", self._chunk_at) >= 0:
            self.arrived = Arrived.WHOLE
        elif len(data) - self._chunk_at > MAX_HEAD_BYTES:
            self.arrived = Arrived.HEAD
