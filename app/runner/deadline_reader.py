"""Reading a connection without ever waiting past a deadline.

Why: every connection to the tokenizer service holds a thread and a file descriptor of the worker, so none may
be held open by a caller that sends nothing, or sends a request a byte at a time. A socket timeout bounds
one recv(), not a request: a byte every few seconds would keep a header line open for hours. Here every
wait gets what is left of one deadline.
"""
import socket
import time

CHUNK = 65536


class DeadlineReader:
    """A socket's incoming bytes, buffered; each read raises TimeoutError once its deadline has passed."""

    def __init__(self, sock):
        self._sock = sock
        self._buffer = bytearray()

    def wait_for_data(self, seconds=None):
        """Whether bytes arrive within `seconds` (None: however long it takes); False when the connection
        stayed idle that long, or closed."""
        if self._buffer:
            return True
        try:
            if seconds is None:
                self._sock.settimeout(None)
                data = self._sock.recv(CHUNK)
                self._buffer += data
                return bool(data)
            return self._fill(time.monotonic() + seconds)
        except (TimeoutError, OSError):
            return False

    def readline(self, limit, deadline):
        """One line, "\\n" included; b"" when the connection closed first. ValueError past `limit` bytes."""
        scanned = 0
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                return line
            if len(self._buffer) >= limit:
                raise ValueError("header line too long")
            scanned = len(self._buffer)
            if not self._fill(deadline):
                line = bytes(self._buffer)
                self._buffer.clear()
                return line

    def read(self, size, deadline):
        """`size` bytes, fewer only when the connection closed first."""
        while len(self._buffer) < size and self._fill(deadline):
            pass
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _fill(self, deadline):
        """Receive what is there (waiting until `deadline` at most); False once the peer has closed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(CHUNK)
        except socket.timeout:
            raise TimeoutError("the request did not arrive in time") from None
        self._buffer += data
        return bool(data)
