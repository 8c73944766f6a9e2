"""The server: one event loop, many clients, the kernel's op table.

Every connection is read without blocking; whatever whole frames arrived are answered in order
and the replies sent in one write, so pipelined requests cost one syscall each way. Nothing a
peer sends can stop the loop: a refused request becomes an error reply, a framing violation
closes that connection only, and an unexpected exception in a handler is logged and answered
with ERROR_GEN_FAILURE. The server answers "hello" itself (it is about the connection) and
hands every other op to the kernel (kernel.py) under the caller's pid, as SO_PEERCRED says.
"""

import array
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import struct
import time

from shmheap.errors import ProtocolError, ShmheapError, WinError, raise_for
from shmheap.protocol import HELLO, PROTOCOL_VERSION, SHUTDOWN, RequestError, encode_reply, parse_request

from .clipboard import PENDING
from .sessions import Session

log = logging.getLogger("shmheapd.server")

RECV_SIZE = 64 * 1024
MAX_PENDING_OUTPUT = 16 << 20  # a peer that stops reading is dropped past this
TICK = 0.25  # seconds between housekeeping rounds (pins lapsing, caches, idle exit)
HANDSHAKE_TIMEOUT = 10.0  # seconds a connection has to say hello
# Each stops the daemon cleanly (socket and segment removed); SIGHUP is its terminal closing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_FDS = 4  # descriptors a peer may send ahead of the requests that take them
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_READ, _WRITE, _CLOSED = select.EPOLLIN, select.EPOLLOUT, select.EPOLLHUP | select.EPOLLERR


class Server:
    def __init__(self, listener, kernel, *, access, idle_exit, handshake_timeout=HANDSHAKE_TIMEOUT):
        self.listener = listener
        self.kernel = kernel
        kernel.respond = self._respond
        self.access = access  # who may connect (access.py)
        self.idle_exit = idle_exit
        self.epoll = select.epoll()
        self.handlers = {}  # fd -> Session, or a callable for the listener, wakeup and tick
        self.stopping = False
        self.live = set()
        self.ungreeted = {}  # session -> the time by which it must have said hello
        self.handshake_timeout = handshake_timeout
        self.spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # see _shed
        self.shed_said = float("-inf")
        # One receive buffer for every connection: the loop reads one socket at a time, and
        # a fresh large bytes object per recv would cost an mmap/munmap each time.
        self.buffer = bytearray(RECV_SIZE)
        self.buffer_view = memoryview(self.buffer)
        self.idle_since = time.monotonic()
        self.kept_said = False  # logged once per idle spell that something keeps us up

    def serve_forever(self, early_signals=()):
        """Serve until SIGTERM/SIGINT/SIGHUP (or idle exit). `early_signals` lists any that arrived
        before this loop took the handlers over. The loop does per request only what the
        request needs: time-driven work (pins lapsing, caches released, idle exit) runs on
        a timer's tick, not on every turn."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        tick = Ticker(TICK)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        self.stopping = self.stopping or bool(early_signals)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        self.listener.setblocking(False)
        self._register(self.listener.fileno(), _READ, self._accept)
        self._register(wake_r.fileno(), _READ, lambda: wake_r.recv(512))
        self._register(tick.fd, _READ, lambda: self._on_tick(tick))
        handlers, poll = self.handlers, self.epoll.poll
        try:
            while not self.stopping:
                for fd, events in poll():
                    handler = handlers.get(fd)
                    if type(handler) is Session:
                        if events & _WRITE:
                            self._flush(handler)
                        if events & (_READ | _CLOSED) and handler in self.live:
                            self._read(handler)
                    elif handler is not None:
                        handler()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for session in list(self.live):
                self._close(session)
            self.epoll.close()
            tick.close()
            wake_r.close()
            wake_w.close()
            if self.spare_fd is not None:
                os.close(self.spare_fd)
                self.spare_fd = None

    def _register(self, fd, events, handler):
        self.handlers[fd] = handler
        self.epoll.register(fd, events)

    def _on_tick(self, tick):
        tick.consume()
        now = time.monotonic()
        for session in [s for s, deadline in self.ungreeted.items() if deadline <= now]:
            log.info("pid %d did not say hello within %ss: dropped", session.pid, self.handshake_timeout)
            self._close(session)
        try:
            self.kernel.housekeeping(now)
        except Exception:  # a bug in time-driven work must not take the daemon down
            log.exception("housekeeping failed")
        if self.live:
            self.idle_since = now
            self.kept_said = False
        elif self.idle_exit and now - self.idle_since >= self.idle_exit:
            kept = self.kernel.outliving()
            if not kept:
                log.info("idle for %ss with no clients and nothing meant to outlive them: exiting",
                         self.idle_exit)
                self.stopping = True
            elif not self.kept_said:
                log.info("idle, but staying up: %s", kept)
                self.kept_said = True

    def _on_signal(self, signum, frame):
        log.info("signal %d: shutting down", signum)
        self.stopping = True

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._shed()
            else:
                log.warning("accept failed: %s", exc)
            return
        pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if not self.access.admits(pid, uid, gid):
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
        self.ungreeted[session] = time.monotonic() + self.handshake_timeout
        self._register(sock.fileno(), _READ, session)
        log.debug("pid %d connected", pid)

    def _shed(self):
        """Out of file descriptors: refuse the connection waiting (closed at once: its client
        sees the daemon close), and keep serving the others. The spare descriptor is what
        lets us accept it at all."""
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
        try:
            self.listener.accept()[0].close()
        except OSError:
            pass
        try:
            self.spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass
        now = time.monotonic()
        if now - self.shed_said >= 10:
            log.warning("out of file descriptors with %d connections: refusing new ones", len(self.live))
            self.shed_said = now

    def _read(self, session):
        if session.closing:  # (a hang-up while its last replies go out)
            self._flush(session)
            return
        try:
            received, ancillary, _, _ = session.sock.recvmsg_into([self.buffer], _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            received, ancillary = 0, ()
        if ancillary and not self._take_fds(session, ancillary):
            return
        if not received:
            if session.outbuf:  # half-closed: the replies still queued go first (_flush closes)
                session.closing = True
                session.want_write = True
                self.epoll.modify(session.sock.fileno(), _WRITE)
            else:
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
                reply = self._dispatch(session, frame)
            except ProtocolError as exc:
                log.warning("pid %d sent a bad frame (%s): dropped", session.pid, exc)
                self._close(session)
                return
            if reply is None:
                continue  # parked: answered later (Kernel.respond)
            if self.kernel.reply_fd is not None:  # this reply carries a descriptor (SCM_RIGHTS)
                if out:
                    self._flush(session)
                if session not in self.live:
                    return
                fd, owned = self.kernel.take_reply_fd()
                try:
                    self._send_with_fd(session, reply, fd)
                finally:
                    if owned:
                        os.close(fd)
                continue
            if len(frames) == 1 and not out:  # the common case: one request, nothing queued
                try:
                    sent = session.sock.send(reply)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._close(session)
                    return
                if sent == len(reply):
                    return
                reply = memoryview(reply)[sent:]
            out += reply
        if out:
            self._flush(session)

    def _take_fds(self, session, ancillary):
        """Keep the descriptors a peer sent for the requests that take them; one that sends
        more than MAX_FDS ahead of them is dropped. False if the session was closed."""
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                session.fds += array.array("i", data[:len(data) - len(data) % 4])
        if len(session.fds) > MAX_FDS:
            log.warning("pid %d sent descriptors no request took: dropped", session.pid)
            self._close(session)
            return False
        return True

    @staticmethod
    def _close_fds(session):
        for passed in session.fds:
            os.close(passed)
        session.fds.clear()

    def _send_with_fd(self, session, reply, fd):
        """Send `reply` with `fd` attached to its first byte. Only with nothing queued ahead
        of it (the client asks for a descriptor alone, with no reply outstanding); else the
        request fails, and the client may ask again."""
        if session.outbuf:
            msgid = self.kernel.request[1]
            session.outbuf += encode_reply(msgid, WinError.ERROR_BUSY, "a descriptor goes only with no reply queued")
            self._flush(session)
            return
        try:
            sent = session.sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except (BlockingIOError, InterruptedError):
            msgid = self.kernel.request[1]
            session.outbuf += encode_reply(msgid, WinError.ERROR_BUSY, "the peer's socket is full")
            sent = None
        except OSError:
            self._close(session)
            return
        if sent is not None and sent < len(reply):
            session.outbuf += reply[sent:]  # the descriptor went with the first byte
        if session.outbuf:
            self._flush(session)

    def _dispatch(self, session, frame):
        try:
            msgid, op, args = parse_request(frame)
        except RequestError as exc:
            self._close_fds(session)  # a refused request takes nothing with it
            return encode_reply(exc.msgid, exc.code, str(exc))
        if op != HELLO and not session.greeted:
            self._close_fds(session)
            return encode_reply(msgid, WinError.ERROR_ACCESS_DENIED, "handshake (hello) first")
        self.kernel.begin()
        self.kernel.request = (session, msgid)
        try:
            if op == HELLO:
                error, result = 0, self._hello(session, *args)
            elif op == SHUTDOWN:
                error, result = 0, self._shutdown(session)
            else:
                error, result = 0, self.kernel.ops[op](session.pid, *args)
                if result is PENDING:
                    self.kernel.access_changes(session.pid)  # (none: parked ops touch nothing of the caller's)
                    return None
        except ShmheapError as exc:
            error, result = exc.winerror, exc.args[0]
        except Exception:
            log.exception("handler %s failed for pid %d", op, session.pid)
            error, result = WinError.ERROR_GEN_FAILURE, f"internal error in {op}"
        if session.fds:  # what came with this request and it did not take is closed, not
            self._close_fds(session)  # left for the next request to take by mistake
        # Success or not, the caller's mapping learns what the request changed for it.
        try:
            access = self.kernel.access_changes(session.pid)
        except Exception:
            log.exception("access changes failed after %s for pid %d", op, session.pid)
            raise ProtocolError(WinError.ERROR_GEN_FAILURE, "internal error: access unknown")
        return encode_reply(msgid, error, result, access)

    def _shutdown(self, session):
        """`shmheap stop`: stop as SIGTERM does, once this reply is out (the loop ends after
        this turn). Only the daemon's own user (or root) may."""
        if session.uid not in (os.getuid(), 0):
            raise_for(WinError.ERROR_ACCESS_DENIED, "only the daemon's own user may stop it")
        log.info("pid %d asked the daemon to stop", session.pid)
        self.stopping = True

    def _hello(self, session, version, client_info):
        if version != PROTOCOL_VERSION:
            raise_for(WinError.ERROR_NOT_SUPPORTED, f"protocol version {version}, daemon speaks {PROTOCOL_VERSION}")
        if not session.greeted:
            self.kernel.attach(session)
            session.greeted = True
            self.ungreeted.pop(session, None)
        return self.kernel.system_info(session.pid)

    def _respond(self, session, msgid, error, result):
        """Answer a parked request (Kernel.respond). Queued, and sent when the loop next
        turns: never from inside another request's handling."""
        if session in self.live:
            session.outbuf += encode_reply(msgid, error, result)
            if not session.want_write:
                session.want_write = True
                self.epoll.modify(session.sock.fileno(), _READ | _WRITE)

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
        if session.closing:
            if not out:
                self._close(session)
            return
        want_write = bool(out)
        if want_write != session.want_write:
            session.want_write = want_write
            self.epoll.modify(session.sock.fileno(), _READ | (_WRITE if want_write else 0))

    def _close(self, session):
        if session not in self.live:
            return
        self.live.discard(session)
        self.ungreeted.pop(session, None)
        fd = session.sock.fileno()
        self.epoll.unregister(fd)
        del self.handlers[fd]
        session.sock.close()
        self._close_fds(session)
        self.kernel.detach(session)
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


def listen(path, grant=lambda temp: None):
    """A listening socket at `path`, mode 0600 plus what `grant(temp path)` adds, that accepts
    from the instant the path exists: bound and listening under a temporary name, then
    renamed into place."""
    temp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.lexists(temp):
            os.unlink(temp)
        sock.bind(temp)
        os.chmod(temp, 0o600)
        grant(temp)
        sock.listen(128)
        os.rename(temp, path)
    except BaseException:
        sock.close()
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    return sock


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Ticker:
    """A periodic timerfd (CLOCK_MONOTONIC): readable every `seconds`, read by the loop."""

    def __init__(self, seconds):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        whole, fraction = divmod(seconds, 1)
        period = _Timespec(int(whole), int(fraction * 1e9))
        if libc.timerfd_settime(self.fd, 0, ctypes.byref(_Itimerspec(period, period)), None) != 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def consume(self):
        try:
            os.read(self.fd, 8)  # the count of expirations: one round of work covers them all
        except BlockingIOError:
            pass

    def close(self):
        os.close(self.fd)
