"""The client: this process's view of the daemon, the object every API call goes through.

`connect()` assembles the stack: socket path, connection (with its autostarted daemon and its
handshake), the mapping of the segment, and the process heap made in the handshake's write.

A Client holds the process's mapping of the segment at the daemon's base (`mapping`, which
opens to this process exactly what the daemon says it may touch, and `memory`, a memoryview
whose index is the address), its private heaps (`heaps`, handle -> allocator), its process heap and its LocalAlloc
objects. Its methods are of two kinds:

    the stub    one method per op of `shmheap.protocol.OPS`, named after the op, returning the
                daemon's result or raising the exception for its Win32 error. The Win32 facade
                is built on these.
    Pythonic    objects with lifetimes: `create_heap` and `heap` (PrivateHeap, Block), `share`,
                `share_many`, `share_array` (SharedBuffer), `view` (checked zero-copy bytes).

After `fork()` the child keeps none of its parent's heaps (using one there is an invalid
handle) and its next call opens its own connection, under its own pid, with its own process
heap.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import mapping, segment
from .connection import CONNECT_TIMEOUT, Connection
from .constants import (GMEM_DDESHARE, GMEM_ZEROINIT, HEAP_NO_SERIALIZE, MEM_COMMIT, MEM_RELEASE, MEM_RESERVE,
                        MEMORY_BASIC_INFORMATION, PAGE_READWRITE)
from .errors import ProtocolError, ShmheapError, WinError, raise_for
from .heap import PURGE_DELAY, SHORT_OF_COMMIT, Heap, heap_layout
from .mapping import WRITE
from .segment import PAGE_SIZE, round_down, round_up
from .moveable import LOCAL, MoveableTable
from . import files, private_heap
from .private_heap import DaemonPages, PrivateHeap
from .shared_buffer import SharedBuffer

if TYPE_CHECKING:  # for annotations only: numpy is optional, clipboard is imported when used
    from numpy import ndarray

    from .clipboard import Clipboard

PROCESS_HEAP_NAME = "process heap"
PROCESS_HEAP_INITIAL = 64 * 1024  # commit of GetProcessHeap() at connect
_PROCESS_HEAP_RESERVE, _PROCESS_HEAP_COMMIT, _ = heap_layout(PROCESS_HEAP_INITIAL, 0)
CRT_HEAP_NAME = "crt heap"  # malloc's: sized as HeapCreate(0, 0, 0) sizes a heap
_CRT_HEAP_RESERVE, _CRT_HEAP_COMMIT, _ = heap_layout(0, 0)

# Freed large blocks of a private heap (up to this many bytes) stay for the next one until the
# purge: a loop over big buffers reuses pages already committed and mapped.
LARGE_CACHE_LIMIT = 32 * 2**20

_process_heaps = itertools.count()  # numbers this process's process heaps, one per connection


def connect(socket_path: str | os.PathLike[str] | None = None, *, autostart: bool = True,
            timeout: float = CONNECT_TIMEOUT) -> Client:
    """Connect to the daemon on `socket_path` (default: `segment.default_socket_path()`),
    starting an embedded one first if none listens and `autostart` is true."""
    path = os.path.abspath(socket_path or segment.default_socket_path())
    return Client(path, autostart=autostart, timeout=timeout)


class Client:
    """One connection to the daemon and this process's use of the segment: the stub (one
    method per op), heaps, shared buffers, the clipboard and checked views of the bytes.
    `connect()` makes one; use it as a context manager to close it."""

    memory = mapping = None  # a half-built client is safe to close
    connection = None

    def __init__(self, path: str, *, autostart: bool = True, timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.memory = None
        self.info = None
        self.pid = None
        self.heaps = {}
        self.regions = {}  # base -> size of the regions this client reserved (VirtualAlloc)
        self.process_heap = None
        self.crt_heap = None  # malloc's (shmheap.crt), made with the process heap
        self.sections = {}  # section handle -> [base, size, protect, file-backed] (section_query)
        self.local_objects = None
        self.session = 0  # counts the connections lost: a hold is good for the one it was made on
        self._waiting = []  # idle connections of this client's for requests that may wait
        self._waiting_guard = threading.Lock()
        self._renderer = None  # the render thread's connection (clipboard_on_render)
        self._clipboard = None
        self._heap_names = itertools.count(1)
        self.connection = Connection(path, autostart=autostart, timeout=timeout, greeting=self._greeting,
                                     on_open=self._on_open, on_drop=self._on_drop,
                                     on_access=self._on_access)
        self.connection.ensure_open()

    # ---- connection ----------------------------------------------------------------------

    def _greeting(self):
        """Sent with the hello: this connection's process heap. Each connection has its own
        (its allocator state lives in this object); the first is named plainly, as
        GetProcessHeap's."""
        number = next(_process_heaps)
        suffix = "" if number == 0 else f" #{number + 1}"
        return [("heap_create", (PROCESS_HEAP_NAME + suffix, 0, _PROCESS_HEAP_RESERVE, _PROCESS_HEAP_COMMIT, 0)),
                ("heap_create", (CRT_HEAP_NAME + suffix, 0, _CRT_HEAP_RESERVE, _CRT_HEAP_COMMIT, 0))]

    def _on_open(self, info, results):
        handle, crt_handle = results
        for made, what in ((handle, "process heap"), (crt_handle, "C runtime heap")):
            if isinstance(made, ShmheapError):
                raise_for(made.winerror, f"no {what}: {made.args[0]}")
        if self.mapping is None:
            try:
                self.mapping = mapping.acquire(info["segment"], info["base"], info["size"],
                                               owner=self.connection.peer_uid)
            except PermissionError as exc:
                raise_for(WinError.ERROR_ACCESS_DENIED, f"refused to map the segment: {exc.strerror}")
            except OSError as exc:
                raise_for(WinError.ERROR_INVALID_ADDRESS,
                          f"this process cannot map the segment where every process does: {exc}")
            self.memory = segment.address_space(info["base"] + info["size"])
        self.info = info
        self.pid = info["pid"]  # as the daemon sees us (SO_PEERCRED)
        # Heaps and regions belong to the connection that made them: a new one starts with none.
        self.heaps = {}
        self.regions = {}
        self.process_heap = self._adopt_heap(handle, _PROCESS_HEAP_RESERVE, _PROCESS_HEAP_COMMIT, 0, True)
        # malloc's heap (shmheap.crt), as msvcrt.dll has one of its own (CRT-22)
        self.crt_heap = self._adopt_heap(crt_handle, _CRT_HEAP_RESERVE, _CRT_HEAP_COMMIT, 0, True)
        self.local_objects = MoveableTable(self.process_heap, LOCAL)  # LocalAlloc's objects

    def _adopt_heap(self, handle, reserve, commit, flags, growable):
        # Freed pages go back after PURGE_DELAY, by the purger thread; a HEAP_NO_SERIALIZE
        # heap takes no lock, so no other thread may touch it: its own frees purge it.
        heap = Heap(DaemonPages(self, handle), handle, reserve, commit, flags=flags, growable=growable,
                    large_cache_limit=LARGE_CACHE_LIMIT, purge_delay=PURGE_DELAY,
                    on_purge_due=None if flags & HEAP_NO_SERIALIZE else private_heap.purge_later,
                    on_short_of_commit=private_heap.purge_now)
        self.heaps[handle] = heap
        if not flags & HEAP_NO_SERIALIZE:  # a heap no other thread may touch is not reported
            private_heap.watch(heap)
        return heap

    def _on_access(self, changes):
        self.mapping.apply(changes)

    def _on_drop(self):
        self.session += 1  # what this process held through the connection is gone with it
        # The connection went: the daemon released its heaps (loss, close), or they are the
        # parent's (fork). Their copies here must never carve those pages again; the next
        # connection brings a process heap of its own. If no other client of this process
        # shares the mapping, the process holds nothing there any more: close it all.
        if self.mapping is not None and self.mapping.users == 1:
            self.mapping.close_all()
        elif self.mapping is not None:  # another client of this process goes on: only ours go
            for heap in self.heaps.values():
                for start, end in heap.extents():
                    self.mapping.close(start, end)
        for heap in self.heaps.values():
            heap.abandon()  # so the purger thread leaves it alone too
        self.heaps = {}
        self.regions = {}
        self.sections = {}
        self.process_heap = None
        self.crt_heap = None
        self.local_objects = None

    def ensure_connected(self) -> Client:
        """Reconnect if needed (after fork, or a lost connection); returns self."""
        if not self.connection.is_open:
            self.connection.ensure_open()
        return self

    @property
    def requests_sent(self) -> int:
        """Requests this client has sent the daemon (a loop that needs none shows none). The
        reports of what its heaps hold (about once a second while they change, riding with
        other requests: `shmheap stat`) are counted apart, in connection.reports_sent."""
        return self.connection.requests_sent

    @property
    def closed(self) -> bool:
        """True once closed (or never fully connected): the mapping is gone."""
        return self.mapping is None

    def close(self) -> None:
        """Close the connection and this client's use of the mapping: once no client of this
        process uses the segment, it is unmapped, and stale pointers into it fault."""
        try:
            self._close_waiting()
            if self.connection is not None:
                self.connection.close()  # may raise a posted request's error, once closed
        finally:
            if self.mapping is not None:
                mapping.release(self.mapping)
                self.mapping = self.memory = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the stub: one method per op -------------------------------------------------------

    def shutdown(self) -> None:
        """Ask the daemon to stop cleanly (`shmheap stop`): every client's connection goes."""
        self.connection.call("shutdown")

    def echo(self, value: Any) -> Any:
        """`value` back from the daemon: one round trip (for tests and benchmarks)."""
        return self.connection.call("echo", value)

    def echo_many(self, values: Iterable[Any]) -> list[Any]:
        """Every value echoed in one pipelined write (what a batch of requests costs)."""
        return self.connection.call_many([("echo", (value,)) for value in values])

    def system_info(self) -> dict[str, Any]:
        """The daemon's hello: segment name and size, page size, granularity, limits, pids."""
        return self.connection.call("system_info")

    def memory_status(self) -> dict[str, int]:
        """Commit limit and total, this process's commit, resident bytes, virtual space."""
        return self.connection.call("memory_status")

    def virtual_alloc(self, address: int, size: int, alloc_type: int = MEM_COMMIT | MEM_RESERVE,
                      protect: int = PAGE_READWRITE) -> int:
        """Reserve and/or commit pages (address 0: anywhere); returns the base address.
        Short of commit, this process's heaps give back their freed pages first."""
        try:
            base = self.connection.call("virtual_alloc", address, size, alloc_type, protect)
        except ShmheapError as exc:
            if exc.winerror not in SHORT_OF_COMMIT or not private_heap.purge_now():
                raise
            base = self.connection.call("virtual_alloc", address, size, alloc_type, protect)
        if address == 0 and alloc_type & MEM_RESERVE:
            self.regions[base] = round_up(size, PAGE_SIZE)  # a new region: releasing it cannot fail
        return base

    def virtual_free(self, address: int, size: int, free_type: int) -> bool:
        """MEM_DECOMMIT a page range, or MEM_RELEASE a whole region (base address, size 0).
        Releasing a region this client reserved cannot fail: it is posted (no wait), its
        pages closed here first."""
        if free_type == MEM_RELEASE and size == 0 and address in self.regions:
            end = address + self.regions.pop(address)
            self.connection.post("virtual_free", address, 0, MEM_RELEASE,
                                 before=lambda: self.mapping.close(address, end))
            return True
        result = self.connection.call("virtual_free", address, size, free_type)
        if free_type == MEM_RELEASE:
            self.regions.pop(address, None)
        return result

    def virtual_query(self, address: int) -> MEMORY_BASIC_INFORMATION:
        """VirtualQuery: the run of like pages at `address`."""
        return MEMORY_BASIC_INFORMATION(*self.connection.call("virtual_query", address))

    def virtual_protect(self, address: int, size: int, protect: int) -> int:
        """Change the protection of committed pages; returns the old protection."""
        return self.connection.call("virtual_protect", address, size, protect)

    def access(self, address: int, size: int, want_write: bool) -> bool:
        """May this process view [address, address+size)? True: writable, False: read-only;
        raises ShmheapPermissionError otherwise (GuardPageError once for guard pages)."""
        return self.connection.call("access", address, size, int(want_write))

    def heap_create(self, flags: int = 0, initial: int = 0, maximum: int = 0, name: str | None = None) -> Heap:
        """Create a private heap and return the allocator (shmheap.heap.Heap) itself; the
        Win32 facade's HeapCreate. `create_heap` is the Pythonic form."""
        reserve, commit, growable = heap_layout(initial, maximum)
        name = name or f"heap {next(self._heap_names)}"
        handle = self.connection.call("heap_create", name, flags, reserve, commit, maximum)
        return self._adopt_heap(handle, reserve, commit, flags, growable)

    def heap_extend(self, handle: int, size: int) -> int:
        """Reserve another region for heap `handle` (growth, or a large block); returns its base."""
        return self.connection.call("heap_extend", handle, size)

    def heap_commit(self, handle: int, address: int, size: int) -> None:
        """Commit [address, address+size) in a region of heap `handle`."""
        self.connection.call("heap_commit", handle, address, size)

    def heap_decommit(self, handle: int, address: int, size: int) -> None:
        """Decommit [address, address+size) in a region of heap `handle`."""
        self.connection.call("heap_decommit", handle, address, size)

    def heap_release(self, handle: int, base: int) -> None:
        """Release the region of heap `handle` that starts at `base`."""
        self.connection.call("heap_release", handle, base)

    def heap_report(self, handle: int, blocks: int, free: int, largest_free: int, when: float | None = None) -> None:
        """Tell the daemon what heap `handle` held at `when` (time.time(); default now), for
        `shmheap stat`; deferred: it rides with the next call and its answer is not waited
        for, so the time it was true travels with it."""
        when = time.time() if when is None else when
        self.connection.defer("heap_report", handle, blocks, free, largest_free, int(when * 1000))

    def heap_destroy(self, heap: Heap) -> None:
        """Release every page of `heap` (not the process heap), whatever is still allocated."""
        if heap is self.process_heap or heap is self.crt_heap:
            raise_for(WinError.ERROR_INVALID_HANDLE, "the process heap and the CRT heap cannot be destroyed")
        if self.heaps.get(heap.base) is not heap:
            raise_for(WinError.ERROR_INVALID_HANDLE, "not a live heap of this process")
        # Out of the table first: once the daemon has the request, another thread's new heap
        # may get the same base, and its entry must not be the one removed.
        del self.heaps[heap.base]
        try:
            self.connection.call("heap_destroy", heap.base)
        except ShmheapError:
            self.heaps.setdefault(heap.base, heap)
            raise
        heap.abandon()

    def heap_list(self) -> list[dict[str, Any]]:
        """Every heap the daemon knows (all processes): name, owner, reserved, committed."""
        return self.connection.call("heap_list")

    def global_alloc(self, flags: int, size: int) -> int:
        """GlobalAlloc: a fixed object's address, or a moveable object's handle."""
        return self.connection.call("global_alloc", flags, size)

    def global_alloc_many(self, flags: int, sizes: list[int]) -> list[list[int]]:
        """Many global objects in one round trip, all or none: [[handle, serial], ...]."""
        return self.connection.call("global_alloc_many", flags, sizes)

    def global_free(self, handle: int) -> None:
        """GlobalFree, waiting for the daemon's answer."""
        self.connection.call("global_free", handle)

    def global_free_posted(self, address: int, size: int) -> None:
        """GlobalFree of the fixed object of `size` bytes at `address`, posted (no wait; an
        error is raised by the next call). The pages that hold only this object close here
        first; the daemon's reply settles the rest."""
        start, end = round_up(address, PAGE_SIZE), round_down(address + size, PAGE_SIZE)
        self.connection.post("global_free", address,
                             before=(lambda: self.mapping.close(start, end)) if end > start else None)

    def global_realloc(self, handle: int, size: int, flags: int) -> int:
        """GlobalReAlloc: the object's handle, or a fixed object's new address."""
        return self.connection.call("global_realloc", handle, size, flags)

    def global_size(self, handle: int) -> int:
        """GlobalSize: the object's size in bytes (0 if discarded)."""
        return self.connection.call("global_size", handle)

    def global_lock(self, handle: int) -> int:
        """The data pointer; a moveable object's lock count goes up."""
        return self.connection.call("global_lock", handle)

    def global_unlock(self, handle: int) -> bool:
        """True while the object stays locked."""
        return self.connection.call("global_unlock", handle)

    def global_flags(self, handle: int) -> int:
        """GlobalFlags: the object's lock count and GMEM_* flags."""
        return self.connection.call("global_flags", handle)

    def global_handle(self, pointer: int) -> int:
        """GlobalHandle: the handle of the object whose data pointer is `pointer`."""
        return self.connection.call("global_handle", pointer)

    def global_compact(self, min_free: int = 0) -> int:
        """Move unlocked moveable objects together; returns the largest free block."""
        return self.connection.call("global_compact", min_free)

    def global_attach(self, pointer: int, serial: int) -> None:
        """Hold a fixed global object handed over by another process (a SharedBuffer
        unpickled): it stays, and this process may touch it, until it lets go."""
        self.connection.call("global_attach", pointer, serial)

    def global_release(self, pointer: int, serial: int, *, later: bool = False) -> None:
        """Let go of a global object this process attached; `later`: with the next call."""
        if later:
            self.connection.defer("global_release", pointer, serial)
        else:
            self.connection.call("global_release", pointer, serial)

    def global_pin(self, pointer: int, serial: int, *, wait: bool = False) -> None:
        """Keep a global object for a copy of its SharedBuffer on its way to another process.
        Posted unless `wait` (this process does not hold it: it may be gone): it reaches the
        daemon before anything this process sends later (its exit included), so a buffer
        handed on and then freed or orphaned still waits for the copy."""
        if wait:
            self.connection.call("global_pin", pointer, serial)
        else:
            self.connection.post("global_pin", pointer, serial)

    def section_create(self, protect: int, size: int, name: str | None = None) -> tuple[int, bool]:
        """A named section (or a handle to the existing one of that name): (handle, existed)."""
        handle, existed = self.connection.call("section_create", protect, size, name)
        return handle, existed

    def file_mapping_create(self, fd: int, protect: int, size: int = 0, name: str | None = None) -> tuple[int, bool]:
        """A section over the open file `fd` (size 0: the file's size; PAGE_READWRITE extends
        a smaller file), or a handle to the existing section of that name: (handle, existed).
        The daemon keeps its own copy of the descriptor while the section lives."""
        (handle, existed, _), _ = self.connection.call_passing_fd("file_mapping_create", protect, size, name,
                                                                  send_fd=fd)
        return handle, existed

    def section_open(self, access: int, name: str) -> int:
        """A new handle to the section named `name` (ERROR_FILE_NOT_FOUND if there is none)."""
        return self.connection.call("section_open", access, name)

    def _section(self, handle: int) -> list[Any]:
        """[base, size, protect, file-backed] of a section this process holds, asked once
        (handles are never reused while the daemon runs)."""
        info = self.sections.get(handle)
        if info is None:
            info = self.sections[handle] = self.connection.call("section_query", handle)
        return info

    def section_map(self, handle: int, access: int, offset: int = 0, size: int = 0) -> int:
        """The address of a view (size 0: to the end of the section). A file section's view
        is the file itself, mapped over the section's region before the daemon opens it to
        this process (mapping.Mapping.map_file)."""
        base, section_size, _, file_backed = self._section(handle)
        mapped_now = False
        if file_backed and base not in self.mapping.file_views:
            _, fd = self.connection.call_passing_fd("file_mapping_file", handle)
            try:
                mapped_now = self.mapping.map_file(base, round_up(section_size, segment.PAGE_SIZE), fd)
            except OSError as exc:
                raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, f"cannot map the file: {exc}")
            finally:
                os.close(fd)
        try:
            address = self.connection.call("section_map", handle, access, offset, size)
        except ShmheapError:
            if mapped_now:
                self.mapping.unmap_file(base)
            raise
        view = self.mapping.views.setdefault(address, [handle, 0, 0])
        view[1] = max(view[1], size or section_size - offset)
        view[2] += 1
        return address

    def section_unmap(self, address: int) -> bool:
        """Unmap this process's view holding `address` (its base or any byte inside); True."""
        base, still = self.connection.call("section_unmap", address)
        view = self.mapping.views.get(base)
        if view is not None:
            view[2] -= 1
            if not view[2]:
                del self.mapping.views[base]
        if not still:
            region = self.mapping.file_view_at(base)
            if region is not None:
                self.mapping.unmap_file(region[0])
        return True

    def section_flush(self, address: int, size: int = 0) -> None:
        """FlushViewOfFile: start writing the view's dirty pages in [address, address+size)
        (size 0: to the end of the view) to its file; a pagefile-backed view has none.
        ERROR_INVALID_ADDRESS if no view of this process holds `address`."""
        for base, (_, length, _) in self.mapping.views.items():
            if base <= address < base + length:
                break
        else:
            raise_for(WinError.ERROR_INVALID_ADDRESS, f"no view of this process at {address:#x}")
        end = base + length if size == 0 else min(address + size, base + length)
        start = address - address % segment.PAGE_SIZE
        if self.mapping.file_view_at(base) is not None:
            try:
                segment.flush(start, round_up(end, segment.PAGE_SIZE) - start)
            except OSError as exc:
                raise_for(WinError.ERROR_INVALID_ADDRESS, str(exc))

    def section_close(self, handle: int) -> bool:
        """Close a section handle (the section goes with its last handle and view); True."""
        result = self.connection.call("section_close", handle)
        if not any(view_handle == handle for view_handle, _, _ in self.mapping.views.values()):
            self.sections.pop(handle, None)
        return result

    def map_file(self, path: str | os.PathLike[str] | None, mode: str = "r", name: str | None = None,
                 size: int = 0) -> Any:
        """A file's bytes mapped with no copy, as a FileView (shmheap/files.py): a buffer
        (memoryview(), numpy.frombuffer()) at one address that names the same bytes in every
        process mapping it. `mode` "r", "r+" or "w+" (a new file of `size` bytes); `name`
        lets other processes map it with map_file(None, mode, name). Close it (or use it as a
        context manager) to unmap it."""
        return files.map_file(self, path, mode, name, size)

    def section_list(self) -> list[dict[str, Any]]:
        """Every section: handle, name, address, size, protection, holders and views."""
        return self.connection.call("section_list")

    def page_map(self) -> dict[str, Any]:
        """Every region's pages as runs, committed or reserved (`shmheap map`)."""
        return self.connection.call("page_map")

    def stat(self) -> dict[str, Any]:
        """What the daemon holds, for `shmheap stat` (clients/stat.py documents the schema)."""
        return self.connection.call("stat")

    def status(self) -> dict[str, Any]:
        """Processes, regions, commit and resident bytes, global objects, sections."""
        return self.connection.call("status")

    def check(self) -> dict[str, Any]:
        """Ask the daemon to walk its invariants; returns their counts, or raises ShmheapError
        if any is broken."""
        return self.connection.call("check")

    # ---- heaps ---------------------------------------------------------------------------

    def create_heap(self, name: str | None = None, initial: int = 0, maximum: int = 0, *,
                    flags: int = 0) -> PrivateHeap:
        """A private heap of this process, as an object; `maximum` 0 makes it growable.
        Use it as a context manager to destroy it (and every block in it) on exit."""
        return PrivateHeap(self, self.heap_create(flags, initial, maximum, name))

    @property
    def heap(self) -> PrivateHeap:
        """The process heap (GetProcessHeap) as an object; it lives as long as the process."""
        return PrivateHeap(self, self.ensure_connected().process_heap)

    # ---- shared buffers (global memory) --------------------------------------------------

    def share(self, size: int, *, zero: bool = False, keep: bool = False) -> SharedBuffer:
        """A SharedBuffer of `size` bytes in global memory, usable from any process by handle.
        It belongs to this process and is freed when it exits, unless `keep` (GMEM_SHARE):
        then it lives until some process frees it."""
        return self.share_many([size], zero=zero, keep=keep)[0]

    def share_many(self, sizes: Iterable[int], *, zero: bool = False,
                   keep: bool = False) -> list[SharedBuffer]:
        """Many SharedBuffers in one round trip (all or none)."""
        sizes = [int(size) for size in sizes]
        if any(size < 0 for size in sizes):
            raise_for(WinError.ERROR_INVALID_PARAMETER, "sizes must not be negative")
        flags = (GMEM_ZEROINIT if zero else 0) | (GMEM_DDESHARE if keep else 0)
        made = self.global_alloc_many(flags, sizes)
        return [SharedBuffer(self, address, size, serial) for (address, serial), size in zip(made, sizes)]

    def share_array(self, shape: int | tuple[int, ...], dtype: Any = "float64", *, zero: bool = False,
                    keep: bool = False) -> tuple[SharedBuffer, ndarray]:
        """A SharedBuffer sized for a numpy array of `shape` and `dtype`; returns
        (buffer, array), the array viewing the buffer's bytes with no copy."""
        import numpy

        dtype = numpy.dtype(dtype)
        count = int(numpy.prod(shape, dtype=numpy.int64))
        buffer = self.share(count * dtype.itemsize, zero=zero, keep=keep)
        return buffer, buffer.numpy(dtype, shape)

    def free_many(self, buffers: Iterable[SharedBuffer]) -> None:
        """Free SharedBuffers in one pipelined write. Every one is tried; then the first
        failure, if any, is raised (a buffer freed already: ShmheapValueError)."""
        buffers = list(buffers)
        held = [buffer for buffer in buffers if buffer._hold.detach()]  # their holds go with the free
        self.connection.call_many([("global_free", (buffer.address,)) for buffer in held])
        if len(held) < len(buffers):
            raise_for(WinError.ERROR_INVALID_HANDLE, f"{len(buffers) - len(held)} of the buffers were freed already")

    # ---- the clipboard (daemon/clipboard.py; the Pythonic form: shmheap/clipboard.py) ----------

    @property
    def clipboard(self) -> Clipboard:
        """This client's view of the daemon's clipboard (copy, paste, formats, wait)."""
        if self._clipboard is None:
            from .clipboard import Clipboard
            self._clipboard = Clipboard(self)
        return self._clipboard

    def clipboard_open(self, window: int = 0) -> None:
        """OpenClipboard for this process with `window` as its window; raises
        ShmheapPermissionError (ERROR_ACCESS_DENIED) while another process has it open."""
        self.connection.call("clipboard_open", window)

    def clipboard_close(self) -> int:
        """CloseClipboard; returns the sequence number after."""
        return self.connection.call("clipboard_close")

    def clipboard_empty(self) -> None:
        """EmptyClipboard: every format goes; this process's window becomes the owner."""
        self.connection.call("clipboard_empty")

    def clipboard_set(self, fmt: int, handle: int) -> int:
        """SetClipboardData: the clipboard takes the global object over; returns the handle."""
        return self.connection.call("clipboard_set", fmt, handle)

    def clipboard_get(self, fmt: int, timeout: float | None = None) -> int:
        """GetClipboardData: the handle. A promised format is rendered by its owner process
        first, so this may wait (on a connection of its own, up to the daemon's render bound
        or `timeout`: then ERROR_TIMEOUT)."""
        try:
            return self.connection.call("clipboard_get", fmt, 0)  # the usual case: no render
        except ShmheapError as exc:
            if exc.winerror != WinError.ERROR_IO_PENDING:
                raise
        answered, handle = self._call_waiting("clipboard_get", fmt, 1, timeout=timeout)
        if not answered:
            raise_for(WinError.ERROR_TIMEOUT, f"format {fmt} was not rendered within {timeout} s")
        return handle

    def clipboard_available(self, fmt: int) -> bool:
        """IsClipboardFormatAvailable: the format is there, or can be synthesized."""
        return self.connection.call("clipboard_available", fmt)

    def clipboard_enum(self, fmt: int) -> int:
        """EnumClipboardFormats: the format after `fmt` (0: the first), 0 after the last."""
        return self.connection.call("clipboard_enum", fmt)

    def clipboard_priority(self, formats: Iterable[int]) -> int:
        """GetPriorityClipboardFormat: the first of `formats` there; 0 if the clipboard is
        empty, -1 if none of them is."""
        return self.connection.call("clipboard_priority", list(formats))

    def clipboard_info(self) -> dict[str, Any]:
        """Sequence number, owner, opener and every format as [format, name, size, synthesized]."""
        return self.connection.call("clipboard_info")

    def clipboard_register(self, name: str) -> int:
        """RegisterClipboardFormat: the value for `name`, the same in every process."""
        return self.connection.call("clipboard_register", name)

    def clipboard_format_name(self, fmt: int) -> str:
        """GetClipboardFormatName: a registered format's name (ERROR_INVALID_HANDLE otherwise)."""
        return self.connection.call("clipboard_format_name", fmt)

    def clipboard_wait(self, after: int, timeout: float | None = None) -> int | None:
        """The sequence number once it passes `after`, or None if `timeout` seconds pass first.
        The daemon answers when it moves: no polling."""
        answered, sequence = self._call_waiting("clipboard_wait", after, timeout=timeout)
        return sequence if answered else None

    def clipboard_on_render(self, callback: Callable[[int], object] | None) -> None:
        """Run `callback(fmt)` on a thread of this process's own whenever another process (or
        this one) asks for a format this process promised; it renders with clipboard_set(fmt,
        handle), the clipboard needing no opening. One callback per client; None stops it."""
        if self._renderer is not None:
            self._renderer.interrupt()
            self._renderer = None
        if callback is None:
            return
        connection = self._renderer = Connection(self.path, autostart=False, greeting=list, own_lock=True)
        first = connection.call("clipboard_listen", 0)  # the listener, before this returns
        threading.Thread(target=self._render_loop, args=(connection, callback, first),
                         name="shmheap clipboard renderer", daemon=True).start()

    def _render_loop(self, connection, callback, fmt):
        try:
            while self._renderer is connection:
                if fmt:
                    try:
                        callback(fmt)
                    except Exception as exc:  # the reader gets NOT_FOUND at the daemon's bound
                        print(f"shmheap: clipboard render callback failed for format {fmt}: {exc!r}",
                              file=sys.stderr)
                fmt = connection.call_waiting("clipboard_listen", 1)[1]
        except ShmheapError:
            pass  # interrupted, or the daemon went: nothing more to render
        finally:
            connection.close()

    def _call_waiting(self, op, *args, timeout=None):
        with self._waiting_guard:
            connection = self._waiting.pop() if self._waiting else None
        if connection is None:
            connection = Connection(self.path, autostart=False, greeting=list, own_lock=True)
        try:
            answered, result = connection.call_waiting(op, *args, timeout=timeout)
        except ShmheapError as exc:
            if connection.is_open and not isinstance(exc, ProtocolError):
                self._keep_waiting(connection)
            else:
                connection.close()
            raise
        self._keep_waiting(connection) if answered else connection.close()
        return answered, result

    def _keep_waiting(self, connection):
        with self._waiting_guard:
            self._waiting.append(connection)

    def _close_waiting(self):
        renderer, self._renderer = self._renderer, None
        if renderer is not None:
            renderer.interrupt()
        with self._waiting_guard:
            waiting, self._waiting = self._waiting, []
        for connection in waiting:
            connection.close()

    # ---- bytes ---------------------------------------------------------------------------

    def view(self, address: int, size: int, *, write: bool = False) -> memoryview:
        """A zero-copy memoryview of [address, address+size) if this process may touch it:
        committed, readable pages of its own, of the global memory or of its section views.
        Read-only pages give a read-only view; `write=True` insists on a writable one.
        Checked against the mapping, with no round trip; only memory this process was never
        told about asks the daemon (which raises ShmheapPermissionError, or GuardPageError
        once for a guard page). The view is as good as the pages: used after they are gone
        or closed, it faults."""
        start, end, allowed = self.mapping.last_run
        if start <= address and address + size <= end and (allowed == WRITE or allowed and not write):
            view = self.memory[address:address + size]  # the hot path: no call, no round trip
            return view if allowed == WRITE else view.toreadonly()
        if size == 0:
            return self.memory[0:0]
        allowed = self.mapping.allows(address, size)
        if allowed != WRITE and (write or not allowed):
            self.access(address, size, write)  # raises, or its reply opens the pages
            allowed = self.mapping.allows(address, size)
        view = self.memory[address:address + size]
        return view if allowed == WRITE else view.toreadonly()

    def raw_view(self, address: int, size: int) -> memoryview:
        """The bytes at [address, address+size) with no check: touching them faults unless
        this process's mapping allows it (`view` checks)."""
        if size < 0 or not self.in_segment(address) or address + size > self.info["base"] + self.info["size"]:
            raise ValueError("range outside the segment")
        return self.memory[address:address + size]

    def in_segment(self, address: int) -> bool:
        """True if `address` lies in the segment's usable part (above its header)."""
        return self.info["min_address"] <= address < self.info["base"] + self.info["size"]


# ---- the default client --------------------------------------------------------------------

current = None
_default_lock = threading.Lock()
_by_path = {}  # socket path -> a client opened for buffers received from that daemon


def default_client() -> Client:
    """The client the Win32 facade uses, made on first use (`SHMHEAP_SOCKET`, autostart),
    and connected again after fork or a lost connection (but not to a new daemon)."""
    global current
    client = current
    if client is not None and client.process_heap is not None:  # None once the connection went
        return client
    with _default_lock:
        if current is None or current.closed:
            current = connect()
        return current.ensure_connected()


def close_default() -> None:
    """Close the default client, if there is one; the facade's next call makes a new one."""
    global current
    with _default_lock:
        if current is not None:
            current.close()
            current = None


def client_for(path: str) -> Client:
    """A client of this process for the daemon on `path`: the default one if it is that
    daemon's, else one opened (without autostart) and kept for later calls."""
    client = current
    if client is not None and client.path == path and not client.closed:
        return client
    client = _by_path.get(path)
    if client is None or client.closed:
        client = _by_path[path] = connect(path, autostart=False)
    return client


def _after_fork_in_child():
    # Each client forgets its parent's heaps when the connection's own fork hook drops the
    # inherited socket (on_drop).
    global _default_lock, _process_heaps
    _default_lock = threading.Lock()
    _process_heaps = itertools.count()


os.register_at_fork(after_in_child=_after_fork_in_child)
