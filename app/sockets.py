"""Who holds the other end of a loopback TCP connection, as Linux knows it.

The socket at the other end of our connection is the one whose local address is the peer's and whose remote
address is ours. The kernel answers that exact question over netlink (sock_diag, what `ss` uses) with the
socket's inode and owner, in about 10 us whatever the number of sockets on the host; /proc/net/tcp holds the
same rows, but reading it walks every socket of the host (about 2 ms on a quiet machine, more under load), so
it is only the fallback for a kernel without sock_diag. A socket its process has closed has no inode (it
lingers in FIN_WAIT or TIME_WAIT, owned by nobody): it is reported as gone.

Used by the runner's tokenizer service (runner/peer.py: only the runner may call it) and by client_socket.py (a
client that half-closed its connection is still there to read the answer).
"""
import errno
import os
import socket
import struct
import sys


class SocketsUnreadable(OSError):
    """Neither netlink nor /proc/net/tcp answers."""


# sock_diag over netlink (linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NO_COOKIE = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")             # nlmsghdr: length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBBI")            # inet_diag_req_v2: family, protocol, ext, pad, states
_ENDPOINTS = struct.Struct("!HH16s16s")       # inet_diag_sockid: ports and addresses, in network order...
_INTERFACE_COOKIE = struct.Struct("=III")     # ...then interface and cookie, in host order
_ANSWER_OWNER = struct.Struct("=II")          # inet_diag_msg's uid and inode, after 4 bytes, the sockid and
_ANSWER_OWNER_AT = _HEADER.size + 4 + 48 + 12  # expires, rqueue, wqueue


def _mapped(ip):
    """An IPv4 address as an IPv6 socket connected to it sees it (::ffff:a.b.c.d)."""
    return bytes(10) + b"\xff\xff" + socket.inet_aton(ip)


def lookup_by_netlink(local, remote, family):
    """(inode, uid) of the TCP socket at `local` connected to `remote` (IPv4 (host, port) pairs), by an exact
    sock_diag lookup; None when there is no such socket. Raises OSError when netlink does not answer."""
    if family == socket.AF_INET:
        local_raw, remote_raw = socket.inet_aton(local[0]) + bytes(12), socket.inet_aton(remote[0]) + bytes(12)
    else:
        local_raw, remote_raw = _mapped(local[0]), _mapped(remote[0])
    request = (_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
               + _ENDPOINTS.pack(local[1], remote[1], local_raw, remote_raw)
               + _INTERFACE_COOKIE.pack(0, _NO_COOKIE, _NO_COOKIE))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(1.0)
        sock.send(_HEADER.pack(_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + request)
        answer = sock.recv(8192)
    kind = _HEADER.unpack_from(answer)[1]
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", answer, _HEADER.size)[0]
        if code == errno.ENOENT:
            return None
        raise OSError(code, os.strerror(code))
    if kind != _SOCK_DIAG_BY_FAMILY or len(answer) < _ANSWER_OWNER_AT + _ANSWER_OWNER.size:
        raise OSError(errno.EPROTO, "unexpected sock_diag answer")
    uid, inode = _ANSWER_OWNER.unpack_from(answer, _ANSWER_OWNER_AT)
    return (inode, uid) if inode else None  # a socket in TIME_WAIT has no inode: nobody owns it any more


def _hex_endpoint(ip, port, mapped):
    """An address as /proc/net/tcp prints it: 32-bit words in host byte order, in hex, then the port."""
    raw = _mapped(ip) if mapped else socket.inet_aton(ip)
    words = "".join(f"{int.from_bytes(raw[i:i + 4], sys.byteorder):08X}" for i in range(0, len(raw), 4))
    return f"{words}:{port:04X}"


def lookup_in_proc_net_tcp(local, remote, proc):
    """The same answer as `lookup_by_netlink`, from /proc/net/tcp and /proc/net/tcp6 (a v4-mapped caller)."""
    for name, mapped in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"{proc}/net/{name}", "rb") as table_file:
                table = table_file.read()
        except FileNotFoundError:
            if mapped:
                continue  # a kernel without IPv6
            raise
        key = f" {_hex_endpoint(*local, mapped)} {_hex_endpoint(*remote, mapped)} ".encode("ascii")
        at = table.find(key)
        while at >= 0:
            line = table[table.rfind(b"\n", 0, at) + 1:table.find(b"\n", at)].split()
            if int(line[9]):  # the inode; 0 in TIME_WAIT
                return int(line[9]), int(line[7])
            at = table.find(key, at + 1)
    return None


def caller_socket(peer, ours, proc="/proc"):
    """(inode, uid) of the socket at the other end of our connection from `peer` to `ours`; None when that
    socket is gone (closed by its process, even if the connection lingers). Raises SocketsUnreadable when
    neither netlink nor /proc/net/tcp answers."""
    try:
        found = lookup_by_netlink(peer, ours, socket.AF_INET) or lookup_by_netlink(peer, ours, socket.AF_INET6)
        if found is not None or lookup_by_netlink(ours, peer, socket.AF_INET) is not None:
            return found  # (our own end was found, so a missing caller is really gone)
    except OSError:
        pass  # no sock_diag in this kernel (or not for TCP): read the table
    try:
        return lookup_in_proc_net_tcp(peer, ours, proc)
    except (OSError, ValueError, IndexError) as exc:
        raise SocketsUnreadable(f"cannot read {proc}/net/tcp: {exc}") from None
