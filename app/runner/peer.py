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
import logging
import os
import threading
import time
from dataclasses import dataclass

from app.sockets import SocketsUnreadable, caller_socket

log = logging.getLogger(__name__)

SPAWN_WAIT_SECONDS = 5.0  # how long a connection may wait for a spawn in progress to admit its pid

class ProcUnreadable(OSError):
    """A process's entries in /proc do not answer: whether it holds a socket cannot be known."""


@dataclass(frozen=True)
class Caller:
    """The owner of a connection's other end: its uid (None when its socket is already gone) and, when it is
    a process we admitted, its pid."""
    uid: int | None
    runner_pid: int | None = None


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
        except (SocketsUnreadable, ProcUnreadable) as exc:
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
