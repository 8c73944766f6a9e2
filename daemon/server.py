"""The server: one event loop, many clients, one dispatch table.

Every connection is read without blocking; whatever whole frames arrived are answered in order
and the replies sent in one write, so pipelined requests cost one syscall each way. Nothing a
peer sends can stop the loop: a refused request becomes an error reply, a framing violation
closes that connection only, and an unexpected exception in a handler is logged and answered
with ERROR_GEN_FAILURE.
"""

import logging
import os
import selectors
import signal
import socket
import struct
import time

from shmheap.errors import ProtocolError, ShmheapError, WinError
from shmheap.protocol import OPS, PROTOCOL_VERSION, RequestError, encode_reply, parse_request

from .reaper import release_process
from .sessions import Session

log = logging.getLogger("shmheapd.server")

RECV_SIZE = 64 * 1024
MAX_PENDING_OUTPUT = 16 << 20  # a peer that stops reading is dropped past this
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Handlers:
    """One method per op of `shmheap.protocol.OPS`, named after it. Each takes the session
    and the checked arguments and returns the result, or raises ShmheapError."""

    def __init__(self, daemon_info, pagetable, heaps, global_memory, sections, sessions):
        self.info = daemon_info
        self.pagetable = pagetable
        self.heaps = heaps
        self.global_memory = global_memory
        self.sections = sections
        self.sessions = sessions

    def hello(self, session, version, client_info):
        if version != PROTOCOL_VERSION:
            raise ShmheapError(WinError.ERROR_NOT_SUPPORTED,
                               f"protocol version {version}, daemon speaks {PROTOCOL_VERSION}")
        if not session.greeted:
            session.greeted = True
            self.sessions.attach(session)
        return dict(self.info, pid=session.pid)

    def echo(self, session, value):
        return value

    def system_info(self, session):
        return dict(self.info, pid=session.pid)

    def memory_status(self, session):
        table = self.pagetable
        free_virtual = sum(end - start for start, end in zip(table.free_starts, table.free_ends))
        return {"commit_limit": table.commit_limit, "committed": table.committed,
                "process_committed": table.committed_by_owner.get(session.pid, 0),
                "process_commit_limit": table.process_commit_limit,
                "resident": table.backing.resident_bytes(),
                "total_virtual": table.size - self.info["min_address"],
                "free_virtual": free_virtual}

    def virtual_alloc(self, session, address, size, alloc_type, protect):
        return self.pagetable.virtual_alloc(session.pid, address, size, alloc_type, protect)

    def virtual_free(self, session, address, size, free_type):
        return self.pagetable.virtual_free(session.pid, address, size, free_type)

    def virtual_query(self, session, address):
        return self.pagetable.virtual_query(session.pid, address)

    def virtual_protect(self, session, address, size, protect):
        return self.pagetable.virtual_protect(session.pid, address, size, protect)

    def access(self, session, address, size, want_write):
        return self.pagetable.access(session.pid, address, size, bool(want_write))

    def heap_create(self, session, name, flags, reserve, commit, maximum):
        return self.heaps.create(session.pid, name, flags, reserve, commit, maximum)

    def heap_extend(self, session, handle, size):
        return self.heaps.extend(session.pid, handle, size)

    def heap_commit(self, session, handle, address, size):
        return self.heaps.commit(session.pid, handle, address, size)

    def heap_decommit(self, session, handle, address, size):
        return self.heaps.decommit(session.pid, handle, address, size)

    def heap_release(self, session, handle, base):
        return self.heaps.release(session.pid, handle, base)

    def heap_destroy(self, session, handle):
        return self.heaps.destroy(session.pid, handle)

    def heap_list(self, session):
        return self.heaps.list()

    def global_alloc(self, session, flags, size):
        return self.global_memory.alloc(session.pid, flags, size)

    def global_alloc_many(self, session, flags, sizes):
        return self.global_memory.alloc_many(session.pid, flags, sizes)

    def global_free(self, session, handle):
        return self.global_memory.free(session.pid, handle)

    def global_realloc(self, session, handle, size, flags):
        return self.global_memory.realloc(session.pid, handle, size, flags)

    def global_size(self, session, handle):
        return self.global_memory.table.size(handle)

    def global_lock(self, session, handle):
        return self.global_memory.table.lock(handle)

    def global_unlock(self, session, handle):
        return self.global_memory.table.unlock(handle)

    def global_flags(self, session, handle):
        return self.global_memory.table.flags(handle)

    def global_handle(self, session, pointer):
        return self.global_memory.table.handle(pointer)

    def global_compact(self, session, min_free):
        return [self.global_memory.compact(session.pid), None]

    def section_create(self, session, protect, size, name):
        return self.sections.create(session.pid, protect, size, name)

    def section_open(self, session, access, name):
        return self.sections.open(session.pid, access, name)

    def section_map(self, session, handle, access, offset, size):
        return self.sections.map(session.pid, handle, access, offset, size)

    def section_unmap(self, session, address):
        return self.sections.unmap(session.pid, address)

    def section_close(self, session, handle):
        return self.sections.close(session.pid, handle)

    def section_list(self, session):
        return self.sections.list()

    def status(self, session):
        table = self.pagetable
        return {
            "daemon_pid": self.info["daemon_pid"],
            "processes": [{"pid": p.pid, "connections": len(p.sessions), "started": p.started,
                           "committed": table.committed_by_owner.get(p.pid, 0)}
                          for p in self.sessions.processes.values()],
            "regions": [[r.base, r.size, r.owner, r.kind, r.committed_pages]
                        for r in (table.regions[b] for b in table.bases)],
            "committed": table.committed,
            "resident": table.backing.resident_bytes(),
            "global_objects": self.global_memory.heap.live,
            "sections": len(self.sections.by_handle),
        }

    def check(self, session):
        try:
            self.global_memory.heap.check()
            return self.pagetable.check()
        except RuntimeError as exc:
            raise ShmheapError(WinError.ERROR_GEN_FAILURE, str(exc)) from None


class Server:
    def __init__(self, listener, handlers, sessions, *, allowed_uids, idle_exit):
        self.listener = listener
        self.handlers = handlers
        self.sessions = sessions
        self.allowed_uids = allowed_uids
        self.idle_exit = idle_exit
        self.table = {op: getattr(handlers, op) for op in OPS}
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.live = set()
        # One receive buffer for every connection: the loop reads one socket at a time, and
        # a fresh large bytes object per recv would cost an mmap/munmap each time.
        self.buffer = bytearray(RECV_SIZE)
        self.buffer_view = memoryview(self.buffer)

    def serve_forever(self, early_signals=()):
        """Serve until SIGTERM/SIGINT (or idle exit). `early_signals` lists any that arrived
        before this loop took the handlers over."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.stopping = self.stopping or bool(early_signals)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(wake_r, selectors.EVENT_READ, lambda sock, mask: sock.recv(512))
        idle_since = time.monotonic()
        try:
            while not self.stopping:
                now = time.monotonic()
                timeout = self.handlers.global_memory.housekeeping(now)
                if self.idle_exit and not self.live:
                    idle_left = idle_since + self.idle_exit - now
                    if idle_left <= 0:
                        log.info("idle for %ss with no clients: exiting", self.idle_exit)
                        break
                    timeout = idle_left if timeout is None else min(timeout, idle_left)
                for key, mask in self.selector.select(timeout):
                    if type(key.data) is Session:
                        self._on_ready(key.data, mask)
                    else:
                        key.data(key.fileobj, mask)
                if self.live:
                    idle_since = time.monotonic()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for session in list(self.live):
                self._close(session)
            self.selector.close()
            wake_r.close()
            wake_w.close()

    def _on_signal(self, signum, frame):
        log.info("signal %d: shutting down", signum)
        self.stopping = True

    def _accept(self, listener, mask):
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in self.allowed_uids:
            log.warning("refused pid %d of uid %d", pid, uid)
            try:
                sock.setblocking(False)
                sock.send(encode_reply(0, WinError.ERROR_ACCESS_DENIED, f"uid {uid} is not allowed"))
            except OSError:
                pass
            sock.close()
            return
        sock.setblocking(False)
        session = Session(sock, pid, uid)
        self.live.add(session)
        self.selector.register(sock, selectors.EVENT_READ, session)
        log.debug("pid %d connected", pid)

    def _on_ready(self, session, mask):
        if mask & selectors.EVENT_WRITE:
            self._flush(session)
        if mask & selectors.EVENT_READ and session in self.live:
            self._read(session)

    def _read(self, session):
        try:
            received = session.sock.recv_into(self.buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            received = 0
        if not received:
            self._close(session)
            return
        try:
            frames = session.decoder.feed(self.buffer_view[:received])
        except ProtocolError as exc:
            log.warning("pid %d broke the protocol (%s): dropped", session.pid, exc)
            self._close(session)
            return
        out = session.outbuf
        for frame in frames:
            try:
                out += self._dispatch(session, frame)
            except ProtocolError as exc:
                log.warning("pid %d sent a bad frame (%s): dropped", session.pid, exc)
                self._close(session)
                return
        self._flush(session)

    def _dispatch(self, session, frame):
        try:
            msgid, op, args = parse_request(frame)
        except RequestError as exc:
            return encode_reply(exc.msgid, exc.code, str(exc))
        if not session.greeted and op != "hello":
            return encode_reply(msgid, WinError.ERROR_ACCESS_DENIED, "handshake (hello) first")
        try:
            return encode_reply(msgid, 0, self.table[op](session, *args))
        except ShmheapError as exc:
            return encode_reply(msgid, exc.winerror, exc.args[0])
        except Exception:
            log.exception("handler %s failed for pid %d", op, session.pid)
            return encode_reply(msgid, WinError.ERROR_GEN_FAILURE, f"internal error in {op}")

    def _flush(self, session):
        out = session.outbuf
        try:
            while out:
                sent = session.sock.send(out)
                del out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(session)
            return
        if len(out) > MAX_PENDING_OUTPUT:
            log.warning("pid %d does not read its replies: dropped", session.pid)
            self._close(session)
            return
        want_write = bool(out)
        if want_write != session.want_write:
            session.want_write = want_write
            key = self.selector.get_key(session.sock)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.selector.modify(session.sock, events, key.data)

    def _close(self, session):
        if session not in self.live:
            return
        self.live.discard(session)
        self.selector.unregister(session.sock)
        session.sock.close()
        process = self.sessions.detach(session)
        if process is not None:
            release_process(process.pid, self.handlers)
        log.debug("pid %d disconnected", session.pid)


def peer_is_listening(path):
    """True if a daemon accepts on `path` (a stale socket file refuses)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def listen(path):
    """A listening socket at `path`, mode 0600, that accepts from the instant the path exists:
    bound and listening under a temporary name, then renamed into place."""
    temp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(temp):
            os.unlink(temp)
        sock.bind(temp)
        os.chmod(temp, 0o600)
        sock.listen(128)
        os.rename(temp, path)
    except BaseException:
        sock.close()
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    return sock
