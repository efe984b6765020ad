"""Who is on the other end of a loopback connection: the runner we spawned, or anyone else.

Why: the tokenizer service listens on 127.0.0.1 without a password (the vendor's runner cannot send one), and
its port is on the runner's command line, which every local user can read. Any process could call it: a
/decode of up to 3 ids between two of the runner's chunks was taken as the runner's output, and one /encode
stalled the generation it arrived in. Linux can tell us who owns the other end of a connection, so the
service serves the process the Card spawned and nobody else (docs/PROTOCOL.md, "Who may call the service").

How, once per connection:
- the caller's socket is the one whose local address is the caller's address and port and whose remote
  address is ours. The kernel answers that exact question over netlink (sock_diag, what `ss` uses) with the
  socket's inode and owner, in about 10 us whatever the number of sockets on the host; /proc/net/tcp holds
  the same rows, but reading it walks every socket of the host (about 2 ms on a quiet machine, more under
  load), so it is only the fallback for a kernel without sock_diag;
- a process's sockets are the `socket:[inode]` links in /proc/<pid>/fd. The runner's pid, with its start
  time (a pid can be reused), is admitted right after the spawn returns; a connection that arrives while a
  spawn is in progress waits for it, because the runner calls /bos_id as soon as it starts.

When /proc cannot be read, nobody is served: one error line says why, and the service refuses every
connection until /proc can be read again. We would rather fail than guess.
"""
import contextlib
import errno
import logging
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

SPAWN_WAIT_SECONDS = 5.0  # how long a connection may wait for a spawn in progress to admit its pid

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


class ProcUnreadable(OSError):
    """/proc does not answer: who is calling cannot be known."""


@dataclass(frozen=True)
class Caller:
    """The owner of a connection's other end: its uid (None when its socket is already gone) and, when it is
    a process we admitted, its pid."""
    uid: int | None
    runner_pid: int | None = None


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
    socket is gone. Raises ProcUnreadable when neither netlink nor /proc/net/tcp answers."""
    try:
        found = lookup_by_netlink(peer, ours, socket.AF_INET) or lookup_by_netlink(peer, ours, socket.AF_INET6)
        if found is not None or lookup_by_netlink(ours, peer, socket.AF_INET) is not None:
            return found  # (our own end was found, so a missing caller is really gone)
    except OSError:
        pass  # no sock_diag in this kernel (or not for TCP): read the table
    try:
        return lookup_in_proc_net_tcp(peer, ours, proc)
    except (OSError, ValueError, IndexError) as exc:
        raise ProcUnreadable(f"cannot read {proc}/net/tcp: {exc}") from None


def start_time(pid, proc="/proc"):
    """When a process started (clock ticks after boot): a pid and its start time name one process for good."""
    with open(f"{proc}/{pid}/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[19])


def holds_socket(pid, inode, proc="/proc"):
    """Whether process `pid` has the socket `inode` open."""
    target = f"socket:[{inode}]"
    for entry in os.scandir(f"{proc}/{pid}/fd"):
        try:
            if os.readlink(entry.path) == target:
                return True
        except FileNotFoundError:
            continue  # closed while we looked
    return False


class RunnerPeers:
    """The processes whose connections the tokenizer service serves: the runner(s) we spawned.

    `with peers.spawning() as admit: child = spawn(...); admit(child.pid)` around every spawn; `dismiss(pid)`
    once that process is closed; `identify(peer, ours)` for each new connection.
    """

    def __init__(self, proc="/proc", spawn_wait=SPAWN_WAIT_SECONDS):
        self._proc = proc
        self._spawn_wait = spawn_wait
        self._admitted = {}   # pid -> start time
        self._spawns = 0      # spawns in progress
        self._changed = threading.Condition()
        self._blind = False   # /proc could not be read (said once, in the log)

    @contextlib.contextmanager
    def spawning(self):
        """Around a spawn: connections that arrive meanwhile wait until it ends. Yields `admit`."""
        with self._changed:
            self._spawns += 1
        try:
            yield self.admit
        finally:
            with self._changed:
                self._spawns -= 1
                self._changed.notify_all()

    def admit(self, pid):
        """Serve the connections process `pid` owns, from now until it is dismissed (or ends)."""
        try:
            started = start_time(pid, self._proc)
        except (OSError, ValueError, IndexError):
            started = None  # gone already, or /proc unreadable: none of its connections will be served
        with self._changed:
            self._admitted[pid] = started
            self._changed.notify_all()

    def dismiss(self, pid):
        with self._changed:
            self._admitted.pop(pid, None)

    def identify(self, peer, ours):
        """Who owns the other end of the connection from `peer` to `ours`: a Caller whose runner_pid is set
        only for a process we admitted. Fails closed: anything unknown is not the runner."""
        try:
            found = caller_socket(peer, ours, self._proc)
            if found is None:
                return Caller(None)
            inode, uid = found
            deadline = time.monotonic() + self._spawn_wait
            while True:
                with self._changed:
                    admitted, spawns = dict(self._admitted), self._spawns
                pid = next((pid for pid, started in admitted.items() if self._owns(pid, started, inode)), None)
                if pid is not None or not spawns:
                    self._can_see()
                    return Caller(uid, pid)
                # A spawn is in progress: this may be its runner's first call, made before its pid is known.
                if not self._wait_for_admission(admitted, deadline):
                    return Caller(uid)
        except ProcUnreadable as exc:
            self._went_blind(exc)
            return Caller(None)

    def _wait_for_admission(self, admitted, deadline):
        """Until a pid is admitted (or dismissed) or no spawn is in progress; False when the deadline passed."""
        with self._changed:
            return self._changed.wait_for(lambda: self._admitted != admitted or not self._spawns,
                                          deadline - time.monotonic())

    def _owns(self, pid, started, inode):
        try:
            return start_time(pid, self._proc) == started and holds_socket(pid, inode, self._proc)
        except FileNotFoundError:
            if not os.path.isdir(f"{self._proc}/{os.getpid()}/fd"):
                raise ProcUnreadable(f"{self._proc} shows no processes") from None
            with self._changed:  # the process has ended: its pid may be reused, never its admission
                if self._admitted.get(pid) == started:
                    del self._admitted[pid]
            return False
        except (OSError, ValueError, IndexError) as exc:
            raise ProcUnreadable(f"cannot read {self._proc}/{pid}: {exc}") from None

    def _went_blind(self, exc):
        if not self._blind:
            self._blind = True
            log.error("tokenizer service: cannot tell which process is calling (%s); refusing every connection "
                      "until /proc can be read", exc)

    def _can_see(self):
        if self._blind:
            self._blind = False
            log.warning("tokenizer service: /proc can be read again; serving the runner")
