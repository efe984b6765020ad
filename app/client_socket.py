"""Whether the client of the request being served is still there (so that the card is freed at once when it
goes away)."""
import ipaddress
import socket

from app.sockets import caller_socket


def client_probe(environ):
    """A callable telling whether the client closed its connection (gunicorn gives us the socket).

    Peeking consumes nothing, and a client that pipelines its next request just looks present. A reset is a
    disconnect. End of input is ambiguous: a client that closed its connection, and one that only shut down
    its sending side after the request (shutdown(SHUT_WR), as some clients and proxies do) both look like
    that, and only the first is gone. On loopback (nginx in front, or a local client) the kernel tells them
    apart: a closed socket has no owner left (sockets.py). A remote peer cannot be asked: its end of input
    counts as gone, as it always did.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone():
        try:
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                return False
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not half_closed(sock)
    return gone


def half_closed(sock):
    """After end of input: whether the client's socket is still open (it only stopped sending)."""
    try:
        peer, ours = sock.getpeername()[:2], sock.getsockname()[:2]
        if not ipaddress.ip_address(peer[0]).is_loopback:
            return False
        return caller_socket(peer, ours) is not None
    except (OSError, ValueError):
        return False
