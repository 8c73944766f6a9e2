"""The connection: one Unix socket to the daemon, its handshake and its framing.

Theory of operation
-------------------
A Connection opens the socket (starting an embedded daemon first if none listens and it may),
sends the handshake, then carries requests and replies framed by `protocol` (the same sans-IO
Decoder the daemon uses). A lock covers each round trip (send, then read until the replies
with our msgids are in), so threads share one connection and take turns; `call_many`
pipelines a batch in one write and one read. Every connection of this process to one daemon
shares that lock: the access changes each reply carries are applied in the order the daemon
made them, so a process's mapping never goes back to an older state.

`post` sends a request whose answer the caller does not wait for (a free the client has
checked: a region it reserved, a buffer it holds): it goes out at once, and its reply is read
with the next call's (one wait for both), its access changes applied in order. Should the
daemon refuse it all the same, its error is raised by the next call that starts once that
reply is in (which then sends nothing), or by `close`.

Whoever owns the connection may send requests of its own with the handshake (the client
creates its process heap there), so connecting is one round trip: `greeting()` names them and
`on_open(info, results)` receives the daemon's hello and their results. `on_drop()` is told
whenever the socket goes (loss, fork, close): what the daemon held for this connection is
gone, or is the parent's. `on_access(changes)` gets the access changes a reply carries, as it
arrives, before the call returns (shmheap/mapping.py).

Fork hygiene: a forked child never speaks on its parent's socket. A fork hook closes the
child's copy of the descriptor (the parent's stays open); the next call in the child opens a
new connection under the child's own pid. A lost connection is reopened the same way, but
never by starting a daemon: a client whose daemon died gets errors, not a silent replacement
(the generation in the hello tells a restarted daemon from the one we knew).
"""

import array
import contextlib
import itertools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref

from . import segment
from .errors import ProtocolError, ShmheapError, WinError, error_for, raise_for
from .protocol import MAX_REPLY, REPORT_OPS, Decoder, encode_request, hello_request, parse_reply

# A deferred request waits at most about this long for a call to carry it. Not much less: a
# pool that hands a worker the same buffer again within it pays no page-table walk in the
# worker (the release and the new hold travel together and cancel out).
DEFER_SECONDS = 2.0
MIN_WAIT = 0.01  # seconds: the shortest a waiting call waits for its answer
MAX_POSTED = 1000  # posted requests whose replies may wait unread
AUTOSTART_IDLE_EXIT = 60.0  # seconds an autostarted daemon lingers with no clients
LOG_MAX = 1 << 20  # bytes of log an autostarted daemon appends to before it is rotated
CONNECT_TIMEOUT = 10.0
RECV_SIZE = 64 * 1024
_FD_SPACE = socket.CMSG_SPACE(4 * 4)  # room for a few descriptors beside a reply

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_TRUSTED_UIDS = (0,)  # besides our own: root's daemon, which lets users in with --allow-uid
# Another user's daemon that lets us in is trusted only when we say so: it names the segment.
DAEMON_UID_ENV = "SHMHEAP_DAEMON_UID"
_connections = weakref.WeakSet()
traffic = [0, 0]  # bytes this process sent to and received from daemons, every connection
_unsettled = {}  # daemon socket path -> connections with posted replies still unread
class _ThreadState(threading.local):
    background = False  # in `background()`: the library's own calls


_thread_state = _ThreadState()


@contextlib.contextmanager
def background():
    """Calls made inside are the library's own (the purger's): a posted request's error
    they meet is kept for the user's next call, not raised to them."""
    _thread_state.background = True
    try:
        yield
    finally:
        _thread_state.background = False
_round_trip_locks = {}  # daemon socket path -> the lock every connection to it shares


def _round_trip_lock(path):
    return _round_trip_locks.setdefault(os.path.abspath(path), threading.Lock())


class Connection:
    sock = None  # a half-built connection is safe to close
    peer_uid = None  # the daemon's uid, checked at connect (_daemon_uid)
    deferred_seen = False  # the flusher saw deferred requests waiting on its last round

    def __init__(self, path, *, autostart=True, timeout=CONNECT_TIMEOUT, greeting=list,
                 on_open=None, on_drop=None, on_access=None, own_lock=False):
        self.path = path
        self.autostart = autostart
        self.timeout = timeout
        self.greeting = greeting  # () -> [(op, args)] to send with the hello
        self.on_open = on_open  # (info, results) -> None, once the handshake is answered
        self.on_drop = on_drop  # () -> None, when the socket goes
        self.on_access = on_access  # (changes) -> None, for every reply that carries some
        self._apply_access = on_access or (lambda changes: None)
        self.info = None  # the daemon's hello reply
        self.requests_sent = 0  # every request this connection has sent, the handshake's too
        self.reports_sent = 0  # reports of what a heap holds, counted apart (REPORT_OPS)
        self.posted = []  # msgids of posted requests whose replies are still to be read
        self.late_error = None  # a posted request's error, for the user's next call
        self._key = os.path.abspath(path)
        _unsettled.setdefault(self._key, weakref.WeakSet())
        self._posted_errors_matter = set()  # of those, the ones posted by `post` itself
        self.closed = False
        # Requests that need no answer of their own (a hold let go by a finalizer): they go
        # with the next call, in its write.
        self.deferred = []
        # A connection that carries only requests whose replies change no access (the
        # clipboard's waits) takes turns on a lock of its own: a wait holds it up to a timeout.
        self.own_lock = own_lock
        self._lock = threading.Lock() if own_lock else _round_trip_lock(path)
        self._ids = itertools.count(1)
        # A reused buffer: a fresh 64 KiB bytes per recv costs an mmap/munmap each time.
        self._buffer = bytearray(RECV_SIZE)
        self._buffer_view = memoryview(self._buffer)
        _connections.add(self)

    def ensure_open(self):
        """Connect now if not connected (the first time, or again after fork or loss)."""
        with self._lock:
            if self.sock is None:
                self._open()

    def _open(self):
        if self.closed:
            raise ProtocolError(WinError.ERROR_INVALID_HANDLE, "connection is closed")
        self.sock = _open_socket(self.path, self.autostart and self.info is None, self.timeout)
        try:
            self.peer_uid = _daemon_uid(self.sock, self.path)
        except BaseException:
            self.sock.close()
            self.sock = None
            raise
        _flusher.start()
        self._decoder = Decoder(MAX_REPLY)
        self.deferred = []  # what they let go of went with the connection they were meant for
        handshake_access = []  # applied once the hello is known to be our daemon's
        self._apply_access = handshake_access.extend
        try:
            try:
                hello, *results = self._roundtrip([hello_request(os.getpid()), *self.greeting()], True)
            finally:
                self._apply_access = self.on_access or (lambda changes: None)
            if isinstance(hello, ShmheapError):
                raise_for(hello.winerror, f"handshake refused: {hello.args[0]}")
            if self.info is not None and hello["generation"] != self.info["generation"]:
                raise ProtocolError(WinError.ERROR_INVALID_HANDLE, "the daemon restarted; reconnect")
            self.info = hello
            if self.on_open is not None:
                self.on_open(hello, results)
            if handshake_access:
                self._apply_access(handshake_access)
        except BaseException:
            self.drop()
            raise

    def defer(self, op, *args):
        """Send (op, args) with the next call, or within about DEFER_SECONDS if no call comes
        (the flusher thread); its answer and any error are dropped. Safe from a finalizer:
        it only appends."""
        self.deferred.append((op, args))

    def flush_deferred(self):
        """Send the deferred requests now, unless a call is under way (it carries them)."""
        if not self.deferred or not self._lock.acquire(blocking=False):
            return
        try:
            if self.deferred and self.sock is not None:
                self._send_posted([])  # their replies are read with the next call
                if len(self.posted) >= MAX_POSTED:  # (a process that only allocates makes none)
                    self._collect_posted()
        except ShmheapError:
            pass  # the connection went, and what they let go of with it
        finally:
            self._lock.release()

    def post(self, op, *args, before=None):
        """Send (op, args) now and return at once; its reply is read with the next one, and
        an error in it is raised by the call after (see the module docstring). `before()`
        runs first under the lock (a mapping closing what the request gives up, in order with
        every reply's access changes)."""
        with self._lock:
            if self.sock is None:
                self._open()
            self._settle()  # not our own: a post does not wait for the one before it
            if before is not None:
                before()
            self._posted_errors_matter.add(self._send_posted([(op, args)]))
            if len(self.posted) >= MAX_POSTED:  # read them now and then: the daemon drops a
                self._collect_posted()          # peer that leaves its replies unread too long

    def _send_posted(self, requests):
        """Under the lock: write the deferred requests and `requests` now, reading no reply;
        returns the last one's msgid."""
        deferred, self.deferred = self.deferred, []  # a swap: a finalizer may defer meanwhile
        requests = deferred + requests
        ids = [next(self._ids) for _ in requests]
        payload = b"".join([encode_request(i, o, a) for i, (o, a) in zip(ids, requests)])
        try:
            self.sock.sendall(payload)
            traffic[0] += len(payload)
        except OSError as exc:
            raise self._lost(exc) from exc
        self._count(requests)
        self.posted += ids
        _unsettled[self._key].add(self)
        return ids[-1]

    def _count(self, requests):
        """Count what goes out: requests, and apart the reports (REPORT_OPS) that ride along."""
        reports = sum(1 for op, _ in requests if op in REPORT_OPS)
        self.reports_sent += reports
        self.requests_sent += len(requests) - reports

    def _collect_posted(self):
        """Under the lock: read the posted requests' replies now."""
        ids, self.posted = self.posted, []
        _unsettled[self._key].discard(self)
        results = self._exchange(None, ids, True)
        for msgid, result in zip(ids, results):
            self._posted_replied(msgid, result)

    def _posted_replied(self, msgid, result):
        """A posted request's reply: the first error of one sent by `post` is kept for the
        user's next call (a deferred request's is dropped: it only let go of something)."""
        if msgid in self._posted_errors_matter:
            self._posted_errors_matter.discard(msgid)
            if self.late_error is None and isinstance(result, ShmheapError):
                self.late_error = result

    def _raise_late_error(self):
        """A posted request of the user's failed: its error is this call's (it sends nothing)."""
        if self.late_error is not None:
            error, self.late_error = self.late_error, None
            raise error

    def _settle(self):
        """Under the shared lock, before this connection speaks: read every other connection's
        posted replies to the same daemon first, so that access changes apply in the order the
        daemon made them (their errors wait for those connections' next calls)."""
        others = _unsettled.get(self._key)
        if not others:
            return
        for other in list(others):
            if other is not self and other.posted and other.sock is not None:
                try:
                    other._collect_posted()
                except ShmheapError:
                    pass  # that connection went; its next call says so

    def _begin(self):
        """Under the lock, before a call's request goes out: open if needed; read the posted
        replies of the other connections; raise a posted request's error that came in (unless
        the library's own thread is calling: it is kept for the user's next call)."""
        if self.sock is None:
            self._open()
        if not self.own_lock:  # (its replies change no access: it needs no order with the others)
            self._settle()
        if not _thread_state.background:
            self._raise_late_error()

    def call(self, op, *args):
        """One request; returns its result or raises the exception for its Win32 error."""
        with self._lock:
            self._begin()
            if self.deferred or self.posted:  # their replies come with this one's: one wait
                return self._roundtrip([(op, args)], False)[0]
            msgid = next(self._ids)
            return self._exchange_one(encode_request(msgid, op, args), msgid)

    def call_passing_fd(self, op, *args, send_fd=None):
        """One request that passes a file descriptor beside its frame (SCM_RIGHTS): `send_fd`
        goes with it, and a descriptor the reply brings is returned with the result, as
        (result, fd or None); the caller owns that fd. It goes alone, once every earlier
        reply is in, so no other frame shares its bytes."""
        with self._lock:
            self._begin()
            if self.deferred or self.posted:
                self._roundtrip([], False)  # settle what is outstanding first
            msgid = next(self._ids)
            payload = encode_request(msgid, op, args)
            self.requests_sent += 1
            ancillary = [] if send_fd is None else [
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [send_fd]))]
            received_fds = []
            try:
                sent = self.sock.sendmsg([payload], ancillary)
                if sent < len(payload):
                    self.sock.sendall(payload[sent:])
                frames = []
                while not frames:
                    received, ancillary_in, _, _ = self.sock.recvmsg_into([self._buffer], _FD_SPACE)
                    for level, kind, data in ancillary_in:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            received_fds += array.array("i", data[:len(data) - len(data) % 4])
                    if not received:
                        raise ProtocolError(WinError.ERROR_GEN_FAILURE, "the daemon closed the connection")
                    frames = self._decoder.feed(self._buffer_view[:received])
                reply_id, error, result, changes = parse_reply(frames[0])
                if len(frames) != 1 or reply_id != msgid:
                    raise ProtocolError(WinError.ERROR_INVALID_PARAMETER, f"reply {reply_id} to request {msgid}")
            except ShmheapError:
                _close_all(received_fds)
                self.drop()
                raise
            except OSError as exc:
                _close_all(received_fds)
                raise self._lost(exc) from exc
            if changes:
                self._apply_access(changes)
            if error:
                _close_all(received_fds)
                raise error_for(error, result if isinstance(result, str) else None)
            _close_all(received_fds[1:])  # one was asked for
            return result, (received_fds[0] if received_fds else None)

    def call_waiting(self, op, *args, timeout=None):
        """A request the daemon may answer only when something happens (a clipboard wait),
        on a connection of its own (`own_lock`). Returns (True, result), or (False, None)
        when `timeout` seconds pass first: then the connection closes, and the daemon forgets
        the request with it (the next call opens a new one)."""
        with self._lock:
            self._begin()
            # (a zero timeout still lets an answer the daemon has at once arrive)
            self.sock.settimeout(None if timeout is None else max(timeout, MIN_WAIT))
            try:
                msgid = next(self._ids)
                return True, self._exchange_one(encode_request(msgid, op, args), msgid)
            except ProtocolError as exc:
                if isinstance(exc.__cause__, TimeoutError):
                    return False, None
                raise
            finally:
                if self.sock is not None:
                    self.sock.settimeout(None)

    def interrupt(self):
        """Wake a thread blocked in `call_waiting` on this connection (from another thread,
        without its lock): its call fails as if the daemon had gone."""
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _exchange_one(self, payload, msgid):
        """_exchange for one request, the common case, with less bookkeeping: send it, read
        until its reply is in; returns its result or raises its error."""
        self.requests_sent += 1
        sock, buffer, view, decoder = self.sock, self._buffer, self._buffer_view, self._decoder
        try:
            sock.sendall(payload)
            traffic[0] += len(payload)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The daemon may have said why before it closed: the general path reads that.
            (result,) = self._exchange(None, (msgid,), False, send_error=exc)
            return result
        try:
            while True:
                received = sock.recv_into(buffer)
                traffic[1] += received
                if not received:
                    raise ProtocolError(WinError.ERROR_GEN_FAILURE, "the daemon closed the connection")
                frames = decoder.feed(view[:received])
                if frames:
                    break
        except ShmheapError:
            self.drop()
            raise
        except OSError as exc:
            raise self._lost(exc) from exc
        if len(frames) != 1:
            self.drop()
            raise ProtocolError(WinError.ERROR_INVALID_PARAMETER, "replies the daemon was not asked for")
        try:
            reply_id, error, result, changes = parse_reply(frames[0])
        except ShmheapError:
            self.drop()
            raise
        if reply_id != msgid:
            self.drop()
            if reply_id == 0 and error:  # refused before any request (foreign uid)
                raise_for(error, result)
            raise ProtocolError(WinError.ERROR_INVALID_PARAMETER, f"reply {reply_id} to request {msgid}")
        if changes:
            self._apply_access(changes)
        if error:
            raise error_for(error, result if isinstance(result, str) else None)
        return result

    def call_many(self, requests, *, return_exceptions=False):
        """Pipeline [(op, args), ...] in one write; returns their results in order. Every
        reply is read before a failure is raised (the first), so none is lost; with
        `return_exceptions` a failure stands in its request's place as the exception."""
        with self._lock:
            self._begin()
            return self._roundtrip(requests, return_exceptions)

    def _roundtrip(self, requests, return_exceptions):
        """Under the lock: number and send the deferred requests, then `requests`, in one
        write, and await the replies (the posted and deferred requests' come first)."""
        deferred, self.deferred = self.deferred, []  # a swap: a finalizer may defer meanwhile
        requests = deferred + list(requests)
        ids = [next(self._ids) for _ in requests]
        payload = b"".join([encode_request(i, op, args) for i, (op, args) in zip(ids, requests)])
        self._count(requests)
        self.posted += ids[:len(deferred)]
        return self._exchange(payload, ids[len(deferred):], return_exceptions)

    def _exchange(self, payload, ids, return_exceptions, send_error=None):
        """Send `payload` (the requests numbered `ids`) and read until every reply is in
        (`send_error`: the send failed already; read what the daemon said before it closed).
        With a payload, the posted requests' replies come first: read here too."""
        replies = {}
        if self.posted and payload is not None:
            ids = [*self.posted, *ids]
            skipped, self.posted = len(self.posted), []
            _unsettled[self._key].discard(self)
        else:
            skipped = 0
        access = []  # the exchange's access changes, in order, applied once all replies are in
        try:
            try:
                if payload is not None and send_error is None:
                    self.sock.sendall(payload)
                    traffic[0] += len(payload)
            except (BrokenPipeError, ConnectionResetError) as exc:
                send_error = exc  # the daemon may have said why before it closed: read on
            while len(replies) < len(ids):
                received = self.sock.recv_into(self._buffer)
                traffic[1] += received
                if not received:
                    why = f" ({send_error})" if send_error else ""
                    raise ProtocolError(WinError.ERROR_GEN_FAILURE, f"the daemon closed the connection{why}")
                for frame in self._decoder.feed(self._buffer_view[:received]):
                    msgid, error, result, changes = parse_reply(frame)
                    if msgid == 0 and error:  # refused before any request (foreign uid)
                        raise_for(error, result)
                    if changes:
                        access += changes
                    if error:
                        result = error_for(error, result if isinstance(result, str) else None)
                    replies[msgid] = result
        except ShmheapError:
            self.drop()
            raise
        except OSError as exc:
            raise self._lost(exc) from exc
        if access:
            self._apply_access(access)
        for msgid in ids[:skipped]:
            self._posted_replied(msgid, replies[msgid])
        results = [replies[msgid] for msgid in ids[skipped:]]
        if not return_exceptions:
            for result in results:
                if isinstance(result, ShmheapError):
                    raise result
        return results

    def _lost(self, exc):
        """The socket failed (`exc`): drop it; returns the error to raise."""
        self.drop()
        return ProtocolError(WinError.ERROR_GEN_FAILURE, f"connection to the daemon lost: {exc}")

    @property
    def is_open(self):
        return self.sock is not None

    def drop(self):
        """Close the socket; the next call opens a new one (unless closed). Deferred
        requests go too: what they let go of went with the connection."""
        self.deferred = []
        self.posted = []
        self._posted_errors_matter.clear()
        self.late_error = None
        _unsettled[self._key].discard(self)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.on_drop is not None:
                self.on_drop()

    def close(self):
        """Close; a posted request's error not yet raised is raised here, after closing."""
        try:
            with self._lock:
                if self.posted and self.sock is not None:
                    self._collect_posted()
                self._raise_late_error()
        finally:
            self.closed = True
            self.drop()
            _connections.discard(self)

    def _after_fork_in_child(self):
        # The inherited socket is the parent's conversation: close our copy of the descriptor
        # and start afresh on the next call.
        self._lock = threading.Lock() if self.own_lock else _round_trip_lock(self.path)
        self.drop()


def _open_socket(path, autostart, timeout):
    """A connected socket to the daemon on `path`, starting one if allowed and needed."""
    deadline = time.monotonic() + timeout
    started = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except PermissionError:
            sock.close()
            raise_for(WinError.ERROR_ACCESS_DENIED, f"not allowed to connect to {path}: its daemon lets in "
                      "its own user and those it is started with (--allow-uid, --allow-group)")
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if not autostart:
                raise ProtocolError(WinError.ERROR_GEN_FAILURE, f"no shmheapd on {path}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        if started is None:
            started = _start_daemon(path)
            exited = None
        if exited is None and started.poll() is not None:
            exited = time.monotonic()  # it may have lost a race to another's daemon: wait a moment
        if exited is not None and time.monotonic() - exited > 1.0:
            raise ProtocolError(WinError.ERROR_GEN_FAILURE, f"shmheapd could not start on {path}: {_said(path)}")
        if time.monotonic() > deadline:
            raise ProtocolError(WinError.ERROR_TIMEOUT, f"shmheapd did not come up on {path}; see {_log_path(path)}")
        time.sleep(0.01)


def _close_all(fds):
    for fd in fds:
        os.close(fd)


def _daemon_uid(sock, path):
    """The uid the daemon on `sock` runs as (SO_PEERCRED): ours, root's (a system daemon
    that lets us in with --allow-uid), or the one `$SHMHEAP_DAEMON_UID` names. Anyone else's
    could name a segment of its choosing for us to map: refused before the handshake."""
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    if uid != os.getuid() and uid not in _TRUSTED_UIDS and str(uid) != os.environ.get(DAEMON_UID_ENV):
        raise_for(WinError.ERROR_ACCESS_DENIED, f"the listener on {path} runs as uid {uid}, not as us: "
                  f"refused (set {DAEMON_UID_ENV}={uid} to trust it)")
    return uid


def _start_daemon(path):
    """Start a detached daemon on `path` that exits when idle; it logs beside its socket,
    in a folder that must be ours alone (segment.check_private_dir)."""
    segment.check_private_dir(os.path.dirname(path), create=True)
    idle = os.environ.get("SHMHEAP_IDLE_EXIT", str(AUTOSTART_IDLE_EXIT))
    log_path = _log_path(path)
    try:
        if os.path.getsize(log_path) > LOG_MAX:
            os.replace(log_path, log_path + ".1")  # one old log kept, so it never grows without bound
    except FileNotFoundError:
        pass
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # the log is the user's alone, whoever made it first
    with os.fdopen(fd, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "shmheapd", "--socket", path, "--idle-exit", idle],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


def _log_path(path):
    """An autostarted daemon's log: beside its socket."""
    return os.path.join(os.path.dirname(path), "shmheapd.log")


def _said(path):
    """The last line the autostarted daemon wrote to its log: why it stopped."""
    try:
        with open(_log_path(path), "rb") as f:
            lines = [line.strip() for line in f.read()[-4096:].decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines[-1] if lines else f"no word in {_log_path(path)}"


class _Flusher:
    """One thread per process that sends connections' deferred requests when no call has
    carried them for a while (a process that drops its last view of a SharedBuffer and then
    idles lets go of it within about DEFER_SECONDS). It only polls, so `defer` needs no lock
    and stays safe from a finalizer; it runs while connections exist."""

    def __init__(self):
        self.thread = None
        self.guard = threading.Lock()

    def start(self):
        with self.guard:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="shmheap flusher", daemon=True)
                self.thread.start()

    def _run(self):
        while True:
            time.sleep(DEFER_SECONDS / 2)
            connections = list(_connections)
            if not connections:
                with self.guard:
                    if not _connections:
                        self.thread = None
                        return
            for connection in connections:
                if connection.deferred:
                    # Seen twice in a row (or the first round): it has waited long enough.
                    if connection.deferred_seen:
                        connection.flush_deferred()
                    connection.deferred_seen = bool(connection.deferred)
                else:
                    connection.deferred_seen = False


_flusher = _Flusher()


def _after_fork_in_child():
    global _flusher
    _flusher = _Flusher()  # the thread did not come along
    _round_trip_locks.clear()  # a lock another thread held at the fork stays held in the copy
    for key in _unsettled:  # the parent's posted replies are the parent's to read
        _unsettled[key] = weakref.WeakSet()
    for connection in list(_connections):
        connection._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
