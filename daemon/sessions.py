"""Sessions (one per connection) and processes (one per client pid).

Ownership is keyed by process, not by connection: a process may open several connections
(threads, libraries) and its memory lives until the last of them closes, which is exactly when
the process has exited on Windows. The operating system closes a dead process's sockets for
it, whatever killed it, so a closed connection is all the reaper needs to learn of a death.
"""

import time

from shmheap.protocol import Decoder


class Session:
    """One client connection: its socket, framing state and pending output."""

    __slots__ = ("sock", "pid", "uid", "decoder", "outbuf", "greeted", "process", "want_write", "closing", "fds")

    def __init__(self, sock, pid, uid):
        self.sock = sock
        self.pid = pid  # from SO_PEERCRED, never from the peer's words
        self.uid = uid
        self.decoder = Decoder()
        self.outbuf = bytearray()
        self.greeted = False
        self.process = None
        self.want_write = False  # registered for EVENT_WRITE (replies waiting to be sent)
        self.closing = False  # the peer half-closed: send what is queued, then close
        self.fds = []  # file descriptors the peer sent (SCM_RIGHTS), for the requests that take one


class Process:
    """A client process: what it owns is recorded by the layers under its pid."""

    __slots__ = ("pid", "sessions", "started")

    def __init__(self, pid):
        self.pid = pid
        self.sessions = set()
        self.started = time.time()


class Sessions:
    def __init__(self):
        self.processes = {}

    def attach(self, session):
        process = self.processes.get(session.pid)
        if process is None:
            process = self.processes[session.pid] = Process(session.pid)
        process.sessions.add(session)
        session.process = process
        return process

    def detach(self, session):
        """Forget a closed session; returns its Process if that was its last connection."""
        process = session.process
        if process is None:
            return None
        session.process = None
        process.sessions.discard(session)
        if process.sessions:
            return None
        del self.processes[process.pid]
        return process

    def rows(self):
        """Every connected process: pid, connections, when it first connected."""
        return [{"pid": p.pid, "connections": len(p.sessions), "started": p.started}
                for p in self.processes.values()]

    def check(self):
        """Every process has a connection, and every connection names its process."""
        problems = [f"process {pid} is filed wrongly or has no connection"
                    for pid, process in self.processes.items() if process.pid != pid or not process.sessions]
        problems += [f"a connection of pid {process.pid} names another process"
                     for process in self.processes.values() for session in process.sessions
                     if session.process is not process or session.pid != process.pid]
        if problems:
            raise RuntimeError("sessions inconsistent: " + "; ".join(problems[:10]))
        return {"processes": len(self.processes)}
