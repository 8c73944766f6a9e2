"""The client: one connection to the daemon plus the process's mapping of the segment.

`connect()` assembles the stack: socket path, (autostarted) daemon, socket, handshake, mapping.

Calls are thread-safe: a lock covers each round trip (send, then read until the reply with our
msgid), so threads share one connection and take turns; `call_many` pipelines a batch in one
write and one read. After `fork()` the child never speaks on its parent's socket: a fork hook
closes the inherited descriptor in the child, and the next call there opens a new connection
under the child's own pid, so the child owns what it allocates and the parent keeps its own.
"""

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import weakref

import msgpack

from . import segment
from .errors import ProtocolError, ShmheapError, WinError, raise_for
from .constants import GMEM_DDESHARE, GMEM_ZEROINIT
from .heap import Heap, PageSource, heap_layout
from .moveable import LOCAL, MoveableTable
from .protocol import PROTOCOL_VERSION, encode_request, new_unpacker, parse_reply

AUTOSTART_IDLE_EXIT = 60.0  # seconds an autostarted daemon lingers with no clients
CONNECT_TIMEOUT = 10.0
RECV_SIZE = 64 * 1024
PROCESS_HEAP_NAME = "process heap"
PROCESS_HEAP_INITIAL = 64 * 1024  # commit of GetProcessHeap() at connect

_clients = weakref.WeakSet()
_connections = itertools.count()  # numbers this process's process heaps, one per connection


def connect(socket_path=None, *, autostart=True, timeout=CONNECT_TIMEOUT):
    """Connect to the daemon on `socket_path` (default: `segment.default_socket_path()`),
    starting an embedded one first if none listens and `autostart` is true."""
    path = os.path.abspath(socket_path or segment.default_socket_path())
    return Client(path, autostart=autostart, timeout=timeout)


class Client:
    _sock = None  # a half-built client is safe to close

    def __init__(self, path, *, autostart=True, timeout=CONNECT_TIMEOUT):
        self.path = path
        self._autostart = autostart
        self._timeout = timeout
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.mapping = None
        self._view = None
        self._connect()
        _clients.add(self)

    # ---- connection ----------------------------------------------------------------------

    def _connect(self):
        sock = _open_socket(self.path, self._autostart, self._timeout)
        self._sock = sock
        self._unpacker = new_unpacker()
        # A reused buffer: a fresh 256 KiB bytes per recv costs an mmap/munmap each time.
        self._buffer = bytearray(RECV_SIZE)
        self._buffer_view = memoryview(self._buffer)
        self._pid = os.getpid()
        # The handshake and the process heap in one round trip. Each connection has its own
        # process heap (its allocator state lives in this object); the first is the one named
        # plainly, as GetProcessHeap's.
        reserve, commit, _ = heap_layout(PROCESS_HEAP_INITIAL, 0)
        number = next(_connections)
        name = PROCESS_HEAP_NAME if number == 0 else f"{PROCESS_HEAP_NAME} #{number + 1}"
        try:
            (error, result), (heap_error, heap_handle) = self._roundtrip([
                ("hello", (PROTOCOL_VERSION, {"pid": self._pid})),
                ("heap_create", (name, 0, reserve, commit, 0))])
            if error:
                raise_for(error, f"handshake refused: {result}")
            if heap_error:
                raise_for(heap_error, f"no process heap: {heap_handle}")
        except BaseException:
            self._drop_socket()
            raise
        if self.mapping is None:
            self.mapping = segment.map_segment(result["segment"], result["size"])
            self._view = memoryview(self.mapping)
        elif result["generation"] != self.info["generation"]:
            self._drop_socket()
            raise ProtocolError(WinError.ERROR_INVALID_HANDLE, "the daemon restarted; reconnect")
        self.info = result
        self.pid = result["pid"]  # as the daemon sees us (SO_PEERCRED)
        # Heaps belong to the process that made them: a forked child starts with none.
        self.heaps = {}
        self._heap_names = itertools.count(1)
        self.process_heap = self._adopt_heap(heap_handle, reserve, commit, 0, True)
        self.local_objects = MoveableTable(self.process_heap, LOCAL)  # LocalAlloc's objects

    def _adopt_heap(self, handle, reserve, commit, flags, growable):
        heap = Heap(_DaemonPages(self, handle), handle, reserve, commit, flags=flags, growable=growable)
        self.heaps[handle] = heap
        return heap

    def _drop_socket(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _after_fork_in_child(self):
        # The inherited socket is the parent's conversation: close our copy of the descriptor
        # (the parent's stays open) and start afresh on the next call. The parent's heaps are
        # the parent's: their copies here must never carve the shared pages again.
        self._lock = threading.Lock()
        self._drop_socket()
        self.heaps = {}
        self.process_heap = None
        self.local_objects = None

    def ensure_connected(self):
        """Reconnect if needed (after fork, or a lost connection); returns self."""
        if self._sock is None:
            with self._lock:
                if self._sock is None:
                    self._reconnect()
        return self

    @property
    def closed(self):
        return self._sock is None and self.mapping is None

    def close(self):
        self._drop_socket()
        _clients.discard(self)
        if self._view is not None:
            self._view.release()
            self._view = None
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                pass  # views handed out still use it; it unmaps when they are gone
            self.mapping = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- calls ---------------------------------------------------------------------------

    def call_raw(self, op, *args):
        """One request; returns (error, result) without raising for Win32 errors."""
        with self._lock:
            if self._sock is None:
                self._reconnect()
            msgid = next(self._ids)
            return self._exchange(encode_request(msgid, op, args), (msgid,))[0]

    def call(self, op, *args):
        """One request; returns its result or raises the exception for its Win32 error."""
        error, result = self.call_raw(op, *args)
        if error:
            raise_for(error, result if isinstance(result, str) else None)
        return result

    def call_many(self, requests):
        """Pipeline [(op, args), ...] in one write; returns [(error, result), ...] in order."""
        with self._lock:
            if self._sock is None:
                self._reconnect()
            return self._roundtrip(requests)

    def _reconnect(self):
        """Under the lock: a new connection after close, loss, or fork (not after close())."""
        if self.mapping is None:
            raise ProtocolError(WinError.ERROR_INVALID_HANDLE, "client is closed")
        self._connect()

    def _roundtrip(self, requests):
        """Under the lock: number, send and await [(op, args), ...] on the open socket."""
        ids = [next(self._ids) for _ in requests]
        return self._exchange(b"".join([encode_request(i, op, args) for i, (op, args) in zip(ids, requests)]), ids)

    def _exchange(self, payload, ids):
        """Send `payload` (the requests numbered `ids`) and read until every reply is in."""
        replies = {}
        send_error = None
        try:
            try:
                self._sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError) as exc:
                send_error = exc  # the daemon may have said why before it closed: read on
            while len(replies) < len(ids):
                received = self._sock.recv_into(self._buffer)
                if not received:
                    raise ProtocolError(WinError.ERROR_GEN_FAILURE,
                                        f"the daemon closed the connection{f' ({send_error})' if send_error else ''}")
                try:
                    self._unpacker.feed(self._buffer_view[:received])
                    frames = list(self._unpacker)
                except (ValueError, msgpack.UnpackException) as exc:
                    raise ProtocolError(WinError.ERROR_INVALID_PARAMETER, f"malformed reply: {exc}") from None
                for frame in frames:
                    msgid, error, result = parse_reply(frame)
                    if msgid == 0 and error:  # refused before any request (foreign uid)
                        raise_for(error, result)
                    replies[msgid] = (error, result)
        except ShmheapError:
            self._drop_socket()
            raise
        except OSError as exc:
            self._drop_socket()
            raise ProtocolError(WinError.ERROR_GEN_FAILURE, f"connection to the daemon lost: {exc}") from exc
        return [replies[msgid] for msgid in ids]

    # ---- heaps ---------------------------------------------------------------------------

    def heap_create(self, flags=0, initial=0, maximum=0, name=None):
        """Create a private heap and return the allocator (shmheap.heap.Heap) itself; the
        Win32 facade's HeapCreate. `create_heap` is the Pythonic form."""
        reserve, commit, growable = heap_layout(initial, maximum)
        name = name or f"heap {next(self._heap_names)}"
        handle = self.call("heap_create", name, flags, reserve, commit, maximum)
        return self._adopt_heap(handle, reserve, commit, flags, growable)

    def heap_destroy(self, heap):
        """Release every page of `heap` (not the process heap), whatever is still allocated."""
        if heap is self.process_heap:
            raise_for(WinError.ERROR_INVALID_HANDLE, "the process heap cannot be destroyed")
        if self.heaps.get(heap.base) is not heap:
            raise_for(WinError.ERROR_INVALID_HANDLE, "not a live heap of this process")
        self.call("heap_destroy", heap.base)
        del self.heaps[heap.base]
        heap.segments = []
        heap.large.clear()

    def create_heap(self, name=None, initial=0, maximum=0, *, flags=0):
        """A private heap of this process, as an object; `maximum` 0 makes it growable.
        Use it as a context manager to destroy it (and every block in it) on exit."""
        return PrivateHeap(self, self.heap_create(flags, initial, maximum, name))

    @property
    def heap(self):
        """The process heap (GetProcessHeap) as an object; it lives as long as the process."""
        return PrivateHeap(self, self.ensure_connected().process_heap)

    # ---- shared buffers (global memory) --------------------------------------------------

    def share(self, size, *, zero=False, keep=False):
        """A SharedBuffer of `size` bytes in global memory, usable from any process by handle.
        It belongs to this process and is freed when it exits, unless `keep` (GMEM_SHARE):
        then it lives until some process frees it."""
        return self.share_many([size], zero=zero, keep=keep)[0]

    def share_many(self, sizes, *, zero=False, keep=False):
        """Many SharedBuffers in one round trip (all or none)."""
        sizes = [int(size) for size in sizes]
        if any(size < 0 for size in sizes):
            raise_for(WinError.ERROR_INVALID_PARAMETER, "sizes must not be negative")
        flags = (GMEM_ZEROINIT if zero else 0) | (GMEM_DDESHARE if keep else 0)
        addresses = self.call("global_alloc_many", flags, sizes)
        return [SharedBuffer(self, address, size, owner=True) for address, size in zip(addresses, sizes)]

    def share_array(self, shape, dtype="float64", *, zero=False, keep=False):
        """A SharedBuffer sized for a numpy array of `shape` and `dtype`; returns
        (buffer, array), the array viewing the buffer's bytes with no copy."""
        import numpy

        dtype = numpy.dtype(dtype)
        count = int(numpy.prod(shape, dtype=numpy.int64))
        buffer = self.share(count * dtype.itemsize, zero=zero, keep=keep)
        return buffer, buffer.numpy(dtype, shape)

    def heap_list(self):
        """Every heap the daemon knows (all processes): name, owner, reserved, committed."""
        return self.call("heap_list")

    # ---- memory --------------------------------------------------------------------------

    def view(self, address, size, *, write=False):
        """A zero-copy memoryview of [address, address+size), checked by the daemon: the
        pages must be committed, readable and ours (or shared); read-only pages give a
        read-only view, and `write=True` insists on a writable one."""
        if size == 0:
            return self._view[0:0]
        writable = self.call("access", address, size, int(write))
        mv = self._view[address:address + size]
        return mv if writable else mv.toreadonly()

    def raw_view(self, address, size):
        """The bytes at [address, address+size) with no check at all: the whole segment is
        mapped in every process, as any kernel's memory is to a debugger."""
        if address < 0 or size < 0 or address + size > len(self._view):
            raise ValueError("range outside the segment")
        return self._view[address:address + size]

    def status(self):
        return self.call("status")

    def check(self):
        """Ask the daemon to walk its invariants; raises ShmheapError if any is broken."""
        return self.call("check")


class PrivateHeap:
    """A heap of this process. Blocks come from an allocator running here, so `alloc` and
    `Block.free` make no round trip to the daemon unless the heap's commit must change."""

    def __init__(self, client, heap):
        self._client = client
        self._heap = heap

    @property
    def handle(self):
        return self._heap.base

    def _live(self):
        """The allocator, if this heap is still one of this process's (not destroyed, and
        not a parent's heap seen from a forked child)."""
        heap = self._heap
        if self._client.heaps.get(heap.base) is not heap:
            raise_for(WinError.ERROR_INVALID_HANDLE, "heap destroyed or of another process")
        return heap

    def alloc(self, size, *, zero=False):
        if size < 0:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "size must not be negative")
        heap = self._live()
        with heap.lock:
            return Block(self, heap.alloc(size, zero=zero))

    def validate(self):
        with self._heap.lock:
            return self._heap.validate()

    def compact(self):
        with self._heap.lock:
            return self._heap.compact()

    @property
    def committed(self):
        return self._heap.committed

    @property
    def live_blocks(self):
        return self._heap.live

    def destroy(self):
        with self._heap.lock:
            self._client.heap_destroy(self._heap)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._heap is not self._client.process_heap and self._heap.segments:
            self.destroy()


class Block:
    """A heap block: `address` and exact `size`, with zero-copy views of its bytes."""

    __slots__ = ("heap", "address", "__weakref__")

    def __init__(self, heap, address):
        self.heap = heap
        self.address = address

    @property
    def size(self):
        heap = self.heap._live()
        with heap.lock:
            return heap.size(self.address)

    def view(self):
        """A writable memoryview of the block's bytes (no copy, no round trip)."""
        return self.heap._client._view[self.address:self.address + self.size]

    def numpy(self, dtype="uint8", shape=None):
        """A numpy array over the block's bytes (no copy). Needs numpy (the `numpy` extra)."""
        import numpy

        array = numpy.frombuffer(self.view(), dtype=dtype)
        return array if shape is None else array.reshape(shape)

    def resize(self, size, *, zero=False, in_place=False):
        """HeapReAlloc: keeps the first min(old, new) bytes; the address may change unless
        `in_place`, which raises MemoryError if the block cannot grow where it is."""
        heap = self.heap._live()
        with heap.lock:
            self.address = heap.realloc(self.address, size, zero=zero, in_place_only=in_place)
        return self

    def free(self):
        heap = self.heap._live()
        with heap.lock:
            heap.free(self.address)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()

    def __repr__(self):
        return f"Block(address={self.address:#x}, size={self.size})"


class SharedBuffer:
    """Bytes in global memory that every connected process can use, with no copy.

    Pickling sends only (address, size, socket): the receiving process (a pool worker,
    whatever the start method) reattaches through its own mapping of the segment, with no
    round trip to the daemon. Ownership: the process that created the buffer owns it; it is
    freed by `free()` (from any process), or when the owner exits unless made with
    keep=True. A receiver must not use a buffer after its owner freed it: hand buffers out
    for as long as the owner keeps them (as a pool does until its results are in)."""

    __slots__ = ("client", "address", "size", "owner", "__weakref__")

    def __init__(self, client, address, size, *, owner=False):
        self.client = client
        self.address = address
        self.size = size
        self.owner = owner  # made by this process (a received copy is not the owner)

    @property
    def handle(self):
        return self.address  # a fixed global object's handle is its address

    def view(self):
        return self.client._view[self.address:self.address + self.size]

    def numpy(self, dtype="uint8", shape=None):
        import numpy

        array = numpy.frombuffer(self.view(), dtype=dtype)
        return array if shape is None else array.reshape(shape)

    def free(self):
        value, error = self.client.call("global_free", self.address)
        if value:
            raise_for(error or WinError.ERROR_INVALID_HANDLE, f"buffer {self.address:#x} was not live")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.owner:
            self.free()

    def __reduce__(self):
        return _attach_buffer, (self.address, self.size, self.client.path)

    def __repr__(self):
        return f"SharedBuffer(address={self.address:#x}, size={self.size})"


_attached = {}  # socket path -> the client received buffers use in this process


def _attach_buffer(address, size, path):
    """Unpickling a SharedBuffer: map it through a client of this process for `path` (the
    default one if it matches, else one opened once and kept)."""
    client = _default if _default is not None and _default.path == path else _attached.get(path)
    if client is None or client.mapping is None:
        client = _attached[path] = connect(path, autostart=False)
    return SharedBuffer(client, address, size)


class _DaemonPages(PageSource):
    """A private heap's page source: regions and commits from the daemon, by RPC."""

    def __init__(self, client, handle):
        self.client = client
        self.handle = handle
        self.memory = client._view

    def reserve(self, size):
        return self.client.call("heap_extend", self.handle, size)

    def commit(self, address, size):
        self.client.call("heap_commit", self.handle, address, size)

    def decommit(self, address, size):
        self.client.call("heap_decommit", self.handle, address, size)

    def release(self, base):
        self.client.call("heap_release", self.handle, base)


def _open_socket(path, autostart, timeout):
    """A connected socket to the daemon on `path`, starting one if allowed and needed."""
    deadline = time.monotonic() + timeout
    started = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if not autostart:
                raise ProtocolError(WinError.ERROR_GEN_FAILURE, f"no shmheapd on {path}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        if started is None:
            started = _start_daemon(path)
        if time.monotonic() > deadline:
            raise ProtocolError(WinError.ERROR_TIMEOUT, f"shmheapd did not come up on {path}")
        time.sleep(0.01)


def _start_daemon(path):
    """Start a detached daemon on `path` that exits when idle; it logs beside its socket."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    idle = os.environ.get("SHMHEAP_IDLE_EXIT", str(AUTOSTART_IDLE_EXIT))
    with open(os.path.join(folder, "shmheapd.log"), "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "shmheapd", "--socket", path, "--idle-exit", idle],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


_default = None
_default_lock = threading.Lock()


def default_client():
    """The connection the Win32 facade uses, made on first use (`SHMHEAP_SOCKET`, autostart)."""
    global _default
    client = _default
    if client is not None and client._sock is not None:
        return client
    with _default_lock:
        if _default is None or _default.closed:
            _default = connect()
        return _default.ensure_connected()


def close_default():
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
            _default = None


def _after_fork_in_child():
    global _default_lock, _connections
    _default_lock = threading.Lock()
    _connections = itertools.count()
    for client in list(_clients):
        client._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
