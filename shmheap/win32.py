"""The Win32 facade: Windows memory calls with Win32 names, parameter order and results.

Addresses are ints (offsets into the segment, NULL is 0), handles are ints, and arguments are
converted the way C converts them (a SIZE_T or pointer is taken modulo 2**64, a DWORD modulo
2**32, so -1 is (SIZE_T)-1). Out-parameters become return values.

Errors: every layer below raises ShmheapError with the Win32 code. Each call here catches it
and returns its failure value (what C returns: 0, NULL, FALSE, None for a struct, or the
handle back for the Free calls), storing the code for the calling thread's `GetLastError()`
through `_failed`, the one place that turns an exception into a failure. Success leaves the
last error alone, as Windows does, except where Windows documents otherwise (an unlock that
leaves the count at 0 sets NO_ERROR, a walk's end NO_MORE_ITEMS); a few failures the facade
itself detects (a short VirtualQuery buffer, an address outside the segment) or that leave
the error untouched are cited at their call.
ProtocolError (the daemon is gone or broke the protocol) is no Win32 failure: it propagates.

The behaviour of each call is the layer's below (the daemon's page table, sections and global
memory; this process's heaps); this module converts arguments and keeps the last error. The
default connection is made on first use (`SHMHEAP_SOCKET`, autostart).
"""

from __future__ import annotations

import ctypes
import operator
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, MutableSequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NoReturn

from . import client as client_module
from . import constants as _constants
from .client import default_client
from .constants import (CREATE_ALWAYS, GMEM_INVALID_HANDLE, GMEM_MOVEABLE, HEAP_GENERATE_EXCEPTIONS,
                        HEAP_NO_SERIALIZE, HEAP_REALLOC_IN_PLACE_ONLY, HEAP_ZERO_MEMORY, INVALID_FILE_SIZE,
                        INVALID_HANDLE_VALUE, LMEM_INVALID_HANDLE, MEM_FREE, MEMORY_BASIC_INFORMATION, OPEN_ALWAYS,
                        PROCESS_HEAP_ENTRY_BUSY, PROCESS_HEAP_REGION, PROCESS_HEAP_UNCOMMITTED_RANGE)
from .errors import ProtocolError, ShmheapError, WinError, raise_for
from .files import files
from .mapping import WRITE
from .moveable import MoveableTable

# The facade exports the Win32 constants, as `from .constants import *` would (the names used
# here are imported above by name, so pyflakes checks them), and the ERROR_* codes.
globals().update({name: value for name, value in vars(_constants).items() if not name.startswith("_")})
globals().update(WinError.__members__)  # ERROR_* codes under their Win32 names

_MASK64 = 2**64 - 1
_MASK32 = 2**32 - 1
_state = threading.local()


def _ptr(value):
    return operator.index(value) & _MASK64


_size = _ptr


def _dword(value):
    return operator.index(value) & _MASK32


def GetLastError() -> int:
    """The calling thread's last error code (0 until a call fails)."""
    return getattr(_state, "last_error", 0)


def SetLastError(dwErrCode: int) -> None:
    """Set the calling thread's last error code (taken as a DWORD)."""
    _state.last_error = _dword(dwErrCode)


def _failed(exc, failure):
    """The one place an exception becomes a Win32 failure: store its code as the last error
    and return the call's failure value."""
    if isinstance(exc, ProtocolError):
        raise exc
    _state.last_error = exc.winerror
    return failure


def _attempt(failure, function, *args):
    """function(*args), or `failure` with the last error set if it raises ShmheapError."""
    try:
        return function(*args)
    except ShmheapError as exc:
        return _failed(exc, failure)


# ---- virtual memory ------------------------------------------------------------------------

SIZEOF_MEMORY_BASIC_INFORMATION = 48


def VirtualAlloc(lpAddress: int, dwSize: int, flAllocationType: int, flProtect: int) -> int:
    """Reserve and/or commit pages; returns the base address, or 0 (NULL) on failure."""
    return _attempt(0, default_client().virtual_alloc, _ptr(lpAddress), _size(dwSize),
                    _dword(flAllocationType), _dword(flProtect))


def VirtualFree(lpAddress: int, dwSize: int, dwFreeType: int) -> bool:
    """MEM_DECOMMIT a page range, or MEM_RELEASE a whole region (base address, size 0);
    TRUE, or FALSE on failure."""
    return _attempt(False, default_client().virtual_free, _ptr(lpAddress), _size(dwSize),
                    _dword(dwFreeType))


def VirtualQuery(lpAddress: int,
                 dwLength: int = SIZEOF_MEMORY_BASIC_INFORMATION) -> MEMORY_BASIC_INFORMATION | None:
    """The MEMORY_BASIC_INFORMATION of the run of like pages at lpAddress, or None on failure
    (ERROR_BAD_LENGTH if dwLength is shorter than the struct)."""
    if _size(dwLength) < SIZEOF_MEMORY_BASIC_INFORMATION:
        _state.last_error = WinError.ERROR_BAD_LENGTH
        return None
    return _attempt(None, default_client().virtual_query, _ptr(lpAddress))


def VirtualProtect(lpAddress: int, dwSize: int, flNewProtect: int) -> int:
    """Change the protection of committed pages; returns the old protection of the first
    page, or 0 on failure (no valid protection is 0)."""
    return _attempt(0, default_client().virtual_protect, _ptr(lpAddress), _size(dwSize),
                    _dword(flNewProtect))


# ---- system information --------------------------------------------------------------------

@dataclass(slots=True)
class SYSTEM_INFO:
    """GetSystemInfo's answer, with the Win32 field names."""

    wProcessorArchitecture: int
    dwPageSize: int
    lpMinimumApplicationAddress: int
    lpMaximumApplicationAddress: int
    dwActiveProcessorMask: int
    dwNumberOfProcessors: int
    dwProcessorType: int
    dwAllocationGranularity: int
    wProcessorLevel: int
    wProcessorRevision: int
    wReserved: int = 0


# PROCESSOR_ARCHITECTURE_* and PROCESSOR_* values for the machines Python reports.
_ARCHITECTURES = {"x86_64": (9, 8664), "amd64": (9, 8664), "aarch64": (12, 0), "arm64": (12, 0),
                  "i686": (0, 586), "i386": (0, 386)}


def GetSystemInfo() -> SYSTEM_INFO:
    """The page size, allocation granularity and the segment's address range, with this
    machine's processors; it cannot fail."""
    info = default_client().info
    architecture, processor_type = _ARCHITECTURES.get(platform.machine().lower(), (0xFFFF, 0))
    cpus = os.sched_getaffinity(0)
    return SYSTEM_INFO(
        wProcessorArchitecture=architecture,
        dwPageSize=info["page_size"],
        lpMinimumApplicationAddress=info["min_address"],
        lpMaximumApplicationAddress=info["base"] + info["size"] - 1,
        dwActiveProcessorMask=sum(1 << cpu for cpu in cpus),
        dwNumberOfProcessors=len(cpus),
        dwProcessorType=processor_type,
        dwAllocationGranularity=info["granularity"],
        wProcessorLevel=6,
        wProcessorRevision=0,
    )


@dataclass(slots=True)
class MEMORYSTATUSEX:
    """GlobalMemoryStatusEx's answer, with the Win32 field names."""

    dwLength: int
    dwMemoryLoad: int
    ullTotalPhys: int
    ullAvailPhys: int
    ullTotalPageFile: int
    ullAvailPageFile: int
    ullTotalVirtual: int
    ullAvailVirtual: int
    ullAvailExtendedVirtual: int


def GlobalMemoryStatusEx() -> MEMORYSTATUSEX:
    """Physical memory from the OS; the 'page file' is the daemon's commit limit and what is
    left of it; 'virtual' is the segment's user address space and its free part."""
    status = default_client().memory_status()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return MEMORYSTATUSEX(
        dwLength=64,
        dwMemoryLoad=round(100 * (total - available) / total),
        ullTotalPhys=total,
        ullAvailPhys=available,
        ullTotalPageFile=status["commit_limit"],
        ullAvailPageFile=max(status["commit_limit"] - status["committed"], 0),
        ullTotalVirtual=status["total_virtual"],
        ullAvailVirtual=status["free_virtual"],
        ullAvailExtendedVirtual=0,
    )


# ---- bytes (non-Win32 helpers and the RtlMoveMemory family) ---------------------------------

# view and write are the byte-level hot path: they check the last run the mapping opened
# inline (Client.view's first lines, without its call), and take Client.view otherwise. The
# run is reset whenever the mapping closes (fork, a lost connection), so it is never stale.

def view(address: int, size: int, *, write: bool = False) -> memoryview:
    """A zero-copy memoryview of committed, accessible pages (read-only for read-only pages).
    Raises ShmheapPermissionError (ERROR_NOACCESS) for reserved, free, no-access or another
    process's pages, and GuardPageError once for PAGE_GUARD pages."""
    client = client_module.current
    if client is not None and client.mapping is not None:
        start, end, allowed = client.mapping.last_run
        if start <= address and address + size <= end and (allowed == WRITE or allowed and not write):
            bytes_there = client.memory[address:address + size]
            return bytes_there if allowed == WRITE else bytes_there.toreadonly()
    return default_client().view(address & _MASK64, size & _MASK64, write=write)


def read(address: int, size: int) -> bytes:
    """A copy of the `size` bytes at `address`; raises as `view` does."""
    return bytes(view(address, size))


def write(address: int, data: bytes | bytearray | memoryview) -> None:
    """Copy `data` (bytes or any buffer) to `address`; raises as `view(write=True)` does."""
    client = client_module.current
    if client is not None and client.mapping is not None and type(data) is bytes:
        start, end, allowed = client.mapping.last_run
        stop = address + len(data)
        if allowed == WRITE and start <= address and stop <= end:
            client.memory[address:stop] = data
            return
    if type(data) is not bytes:
        data = memoryview(data).cast("B")
    default_client().view(address & _MASK64, len(data), write=True)[:] = data


def CopyMemory(Destination: int, Source: int, Length: int) -> None:
    """Copy Length bytes; the ranges may overlap (memmove semantics, like MoveMemory).
    Raises as `view` does for memory this process may not touch (Windows faults)."""
    length = _size(Length)
    if length:
        view(_ptr(Destination), length, write=True)[:] = view(_ptr(Source), length)


MoveMemory = CopyMemory


def FillMemory(Destination: int, Length: int, Fill: int) -> None:
    """Set Length bytes to the low byte of Fill; raises as `view(write=True)` does."""
    length, fill = _size(Length), _dword(Fill) & 0xFF
    if length:
        target = view(_ptr(Destination), length, write=True)
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(target)), fill, length)


def ZeroMemory(Destination: int, Length: int) -> None:
    """Set Length bytes to 0; raises as `view(write=True)` does."""
    FillMemory(Destination, Length, 0)


def RaiseLastError() -> NoReturn:
    """Raise the exception for GetLastError() (for callers who prefer exceptions)."""
    raise_for(GetLastError())


# ---- heaps ---------------------------------------------------------------------------------
# The allocator runs in this process (shmheap/heap.py); only commit changes reach the daemon.

_NO_LOCK = nullcontext()
_OUT_OF_MEMORY = {WinError.ERROR_NOT_ENOUGH_MEMORY, WinError.ERROR_COMMITMENT_LIMIT,
                  WinError.ERROR_OUTOFMEMORY}


def _heap(hHeap):
    """This process's heap for a handle; ERROR_INVALID_HANDLE for a handle of another
    process, a destroyed heap, or garbage."""
    client = client_module.current
    if client is None or client.process_heap is None:  # not connected yet, or again
        client = default_client()
    heap = client.heaps.get(hHeap & _MASK64)
    if heap is None:
        raise_for(WinError.ERROR_INVALID_HANDLE, f"no heap {hHeap:#x} in this process")
    return heap


def _serialized(heap, flags):
    """The heap's lock, unless the heap or the call says HEAP_NO_SERIALIZE."""
    if heap.flags & HEAP_NO_SERIALIZE:
        return _NO_LOCK
    if flags & HEAP_NO_SERIALIZE:
        return _unless_held(heap)
    return heap.lock


@contextmanager
def _unless_held(heap):
    """A HEAP_NO_SERIALIZE call on a serialized heap takes no lock (it runs even while a
    thread holds HeapLock), but never runs beside the purger thread: the caller promised that
    no thread of its own uses the heap, not that ours does not. Each side says it is there,
    then looks for the other (Heap.unlocked_calls, Heap.purging); one of them waits."""
    token = object()
    while True:
        heap.unlocked_calls.add(token)
        if not heap.purging:
            try:
                yield
            finally:
                heap.unlocked_calls.discard(token)
            return
        heap.unlocked_calls.discard(token)
        time.sleep(0.001)


def _heap_failed(exc, failure, hHeap, flags):
    """A failed heap call; with HEAP_GENERATE_EXCEPTIONS out of memory raises
    STATUS_NO_MEMORY instead (HC-14)."""
    heap = default_client().heaps.get(hHeap & _MASK64)
    if heap is not None and (flags | heap.flags) & HEAP_GENERATE_EXCEPTIONS and exc.winerror in _OUT_OF_MEMORY:
        raise_for(WinError.STATUS_NO_MEMORY, str(exc))
    return _failed(exc, failure)


def _outside_segment(address):
    return not default_client().in_segment(address)


def HeapCreate(flOptions: int, dwInitialSize: int, dwMaximumSize: int, *, name: str | None = None) -> int:
    """A private heap of this process; returns its handle (64 KiB aligned) or NULL.
    dwMaximumSize 0 makes it growable; `name` registers it under that name with the daemon."""
    try:
        heap = default_client().heap_create(_dword(flOptions), _size(dwInitialSize),
                                            _size(dwMaximumSize), name)
    except ShmheapError as exc:
        return _failed(exc, 0)
    return heap.base


def HeapDestroy(hHeap: int) -> bool:
    """Free a private heap and every block in it; TRUE, or FALSE with ERROR_INVALID_HANDLE
    (the process heap, a destroyed heap, another process's)."""
    try:
        heap = _heap(hHeap)
        with heap.lock:
            default_client().heap_destroy(heap)
    except ShmheapError as exc:
        return _failed(exc, False)
    return True


def GetProcessHeap() -> int:
    """The handle of this process's heap (made at connect); it cannot fail."""
    return default_client().process_heap.base


def GetProcessHeaps(NumberOfHeaps: int = 0, ProcessHeaps: MutableSequence[int] | None = None) -> int:
    """Returns how many heaps the process has; stores at most NumberOfHeaps handles into the
    list ProcessHeaps (replacing its contents), process heap first, then by creation."""
    handles = list(default_client().heaps)
    if ProcessHeaps is not None:
        ProcessHeaps[:] = handles[:_dword(NumberOfHeaps)]
    return len(handles)


def HeapAlloc(hHeap: int, dwFlags: int, dwBytes: int) -> int:
    """A block of exactly dwBytes (HEAP_ZERO_MEMORY: zeroed); its address, or NULL on failure.
    Out of memory with HEAP_GENERATE_EXCEPTIONS raises STATUS_NO_MEMORY instead."""
    flags = dwFlags & _MASK32
    try:
        client = client_module.current  # _heap, inlined: the hot path
        heap = client.heaps.get(hHeap & _MASK64) if client is not None else None
        if heap is None:
            heap = _heap(hHeap)
        with heap.lock if not (flags | heap.flags) & HEAP_NO_SERIALIZE else _serialized(heap, flags):
            return heap.alloc(dwBytes & _MASK64, flags & HEAP_ZERO_MEMORY)
    except ShmheapError as exc:
        return _heap_failed(exc, 0, hHeap, flags)


def HeapReAlloc(hHeap: int, dwFlags: int, lpMem: int, dwBytes: int) -> int:
    """Resize a block, moving it unless HEAP_REALLOC_IN_PLACE_ONLY; the new address, or NULL
    with the block left as it was (lpMem NULL: NULL with ERROR_SUCCESS, HR-01)."""
    address = _ptr(lpMem)
    if address == 0:
        _state.last_error = WinError.ERROR_SUCCESS  # HR-01
        return 0
    flags = _dword(dwFlags)
    try:
        heap = _heap(hHeap)
        if _outside_segment(address):
            raise_for(WinError.ERROR_NOACCESS, f"{address:#x} is outside the segment")
        with _serialized(heap, flags):
            return heap.realloc(address, _size(dwBytes), zero=bool(flags & HEAP_ZERO_MEMORY),
                                in_place_only=bool(flags & HEAP_REALLOC_IN_PLACE_ONLY))
    except ShmheapError as exc:
        return _heap_failed(exc, 0, hHeap, flags)


def HeapFree(hHeap: int, dwFlags: int, lpMem: int) -> bool:
    """Free a block (NULL is TRUE); FALSE on failure: ERROR_INVALID_PARAMETER for no block of
    the heap, ERROR_NOACCESS outside the segment, the error untouched for non-heap memory."""
    address = lpMem & _MASK64
    if address == 0:
        return True  # HF-01: NULL short-circuits before the heap is looked at
    try:
        client = client_module.current  # _heap, inlined: the hot path
        heap = client.heaps.get(hHeap & _MASK64) if client is not None else None
        if heap is None:
            heap = _heap(hHeap)
        with heap.lock if not (dwFlags | heap.flags) & HEAP_NO_SERIALIZE else _serialized(heap, dwFlags & _MASK32):
            heap.free(address)
        return True
    except ShmheapError as exc:
        if exc.winerror == WinError.ERROR_INVALID_HANDLE:
            return _failed(exc, False)  # no such heap
        # HF-06, a bad block: an address outside the segment is unmapped memory; one in memory
        # no heap of ours holds is not heap memory at all (the last error stays).
        if _outside_segment(address):
            _state.last_error = WinError.ERROR_NOACCESS
            return False
        if _in_foreign_region(address):
            return False
        return _failed(exc, False)


def _in_foreign_region(address):
    """True if `address` lies in live memory that is no heap's of ours (a VirtualAlloc
    region, say): a failure path only, so one round trip is fine."""
    client = default_client()
    try:
        info = client.virtual_query(address)
    except ProtocolError:
        raise
    except ShmheapError:
        return False
    return info.State != MEM_FREE and not any(
        heap.has_region(info.AllocationBase) for heap in client.heaps.values())


def HeapSize(hHeap: int, dwFlags: int, lpMem: int) -> int:
    """The exact requested size, or (SIZE_T)-1 with ERROR_INVALID_PARAMETER (HF-07)."""
    try:
        heap = _heap(hHeap)
        with _serialized(heap, _dword(dwFlags)):
            address = _ptr(lpMem)
            if heap.checking and not heap.validate(address):
                raise_for(WinError.ERROR_INVALID_PARAMETER, "block fails validation")
            return heap.size(address)
    except ShmheapError as exc:
        return _failed(exc, _MASK64)


def HeapValidate(hHeap: int, dwFlags: int, lpMem: int) -> bool:
    """TRUE if the block (or, for NULL, the whole heap) is sound. A failing block or heap
    leaves the last error alone (HF-04, HF-05); a bad heap handle sets it."""
    try:
        heap = _heap(hHeap)
    except ShmheapError as exc:
        return _failed(exc, False)
    with _serialized(heap, _dword(dwFlags)):
        return heap.validate(_ptr(lpMem) or None)


def HeapCompact(hHeap: int, dwFlags: int) -> int:
    """Gives free memory back; returns the largest committed free range (0 with NO_ERROR when
    there is none, HI-07)."""
    try:
        heap = _heap(hHeap)
        with _serialized(heap, _dword(dwFlags)):
            largest = heap.compact()
    except ShmheapError as exc:
        return _failed(exc, 0)
    if not largest:
        _state.last_error = WinError.ERROR_SUCCESS
    return largest


def HeapLock(hHeap: int) -> bool:
    """Take the heap's lock (recursive for its owner). A HEAP_NO_SERIALIZE heap has none to
    take: TRUE, excluding nothing (HL-03)."""
    try:
        heap = _heap(hHeap)
    except ShmheapError as exc:
        return _failed(exc, False)
    if not heap.flags & HEAP_NO_SERIALIZE:
        heap.lock.acquire()
    return True


def HeapUnlock(hHeap: int) -> bool:
    """Release the heap's lock; TRUE, or FALSE with ERROR_NOT_LOCKED if this thread does not
    hold it."""
    try:
        heap = _heap(hHeap)
        if not heap.flags & HEAP_NO_SERIALIZE:
            try:
                heap.lock.release()
            except RuntimeError:
                raise_for(WinError.ERROR_NOT_LOCKED, "the heap is not locked by this thread")
    except ShmheapError as exc:
        return _failed(exc, False)
    return True


class PROCESS_HEAP_ENTRY:
    """HeapWalk's entry; start a walk with lpData 0 and pass the same object back."""

    class _Region:
        __slots__ = ("dwCommittedSize", "dwUnCommittedSize", "lpFirstBlock", "lpLastBlock")

        def __init__(self, committed=0, uncommitted=0, first=0, last=0):
            self.dwCommittedSize = committed
            self.dwUnCommittedSize = uncommitted
            self.lpFirstBlock = first
            self.lpLastBlock = last

    def __init__(self) -> None:
        self.lpData = 0
        self.cbData = 0
        self.cbOverhead = 0
        self.iRegionIndex = 0
        self.wFlags = 0
        self.Region = self._Region()
        self.walk = None  # the snapshot being walked

    def __repr__(self) -> str:
        return (f"PROCESS_HEAP_ENTRY(lpData={self.lpData:#x}, cbData={self.cbData}, cbOverhead="
                f"{self.cbOverhead}, iRegionIndex={self.iRegionIndex}, wFlags={self.wFlags:#x})")


_WALK_FLAGS = {"region": PROCESS_HEAP_REGION, "uncommitted": PROCESS_HEAP_UNCOMMITTED_RANGE,
               "busy": PROCESS_HEAP_ENTRY_BUSY, "large": PROCESS_HEAP_ENTRY_BUSY, "free": 0}


def HeapWalk(hHeap: int, lpEntry: PROCESS_HEAP_ENTRY) -> bool:
    """Fill lpEntry with the next entry of the heap; FALSE with ERROR_NO_MORE_ITEMS at the end.
    The walk reads a snapshot taken when lpData is 0 (hold HeapLock to keep it current)."""
    try:
        heap = _heap(hHeap)
    except ShmheapError as exc:
        return _failed(exc, False)
    if lpEntry.lpData == 0 or lpEntry.walk is None:
        with _serialized(heap, 0):
            lpEntry.walk = iter(list(heap.walk()))
    item = next(lpEntry.walk, None)
    if item is None:
        lpEntry.walk = None
        _state.last_error = WinError.ERROR_NO_MORE_ITEMS
        return False
    kind, address, size, overhead, index, region = item
    lpEntry.lpData, lpEntry.cbData, lpEntry.cbOverhead = address, size, overhead
    lpEntry.iRegionIndex, lpEntry.wFlags = index, _WALK_FLAGS[kind]
    if kind == "region":
        lpEntry.Region = PROCESS_HEAP_ENTRY._Region(
            region.committed_end - region.base, region.end - region.committed_end,
            region.start, region.end)
    return True


# ---- LocalAlloc: moveable and fixed objects on the process heap (private) ------------------

def _local(method, *args):
    """method(table, *args) on this process's LocalAlloc table, under the process heap's lock."""
    table = default_client().local_objects
    with table.heap.lock:
        return method(table, *args)


def LocalAlloc(uFlags: int, uBytes: int) -> int:
    """An object on the process heap: a fixed one's address, or with LMEM_MOVEABLE a handle to
    lock; NULL on failure."""
    return _attempt(0, _local, MoveableTable.alloc, _dword(uFlags), _size(uBytes))


def LocalFree(hMem: int) -> int:
    """NULL on success; the handle back, with the error set, on failure."""
    handle = _ptr(hMem)
    try:
        _local(MoveableTable.free, handle)
    except ShmheapError as exc:
        return _failed(exc, handle)
    return 0


def LocalReAlloc(hMem: int, uBytes: int, uFlags: int) -> int:
    """Resize (or with LMEM_MODIFY change the flags of) an object; its handle or new address,
    or NULL on failure, the object left as it was."""
    return _attempt(0, _local, MoveableTable.realloc, _ptr(hMem), _size(uBytes), _dword(uFlags))


def LocalSize(hMem: int) -> int:
    """The object's size in bytes; 0 for a discarded object, or on failure."""
    return _attempt(0, _local, MoveableTable.size, _ptr(hMem))


def LocalLock(hMem: int) -> int:
    """The object's data pointer (a moveable object's lock count goes up); NULL on failure,
    leaving the last error alone for a value that is no memory (GL-21)."""
    try:
        return _local(MoveableTable.lock, _ptr(hMem))
    except ShmheapError as exc:
        if exc.winerror == WinError.ERROR_NOACCESS:
            return 0  # GL-21: LocalLock of a value that is no memory leaves the error alone
        return _failed(exc, 0)


def LocalUnlock(hMem: int) -> bool:
    """TRUE while the object stays locked; FALSE with NO_ERROR once the count reaches 0,
    FALSE with the error on failure (GL-06)."""
    try:
        locked = _local(MoveableTable.unlock, _ptr(hMem))
    except ShmheapError as exc:
        return _failed(exc, False)
    if not locked:
        _state.last_error = WinError.ERROR_SUCCESS  # GL-06: the count reached 0
    return locked


def LocalFlags(hMem: int) -> int:
    """The lock count and LMEM_* flags of an object; LMEM_INVALID_HANDLE on failure."""
    return _attempt(LMEM_INVALID_HANDLE, _local, MoveableTable.flags, _ptr(hMem))


def LocalHandle(pMem: int) -> int:
    """The handle of the object whose data pointer is pMem; NULL on failure."""
    return _attempt(0, _local, MoveableTable.handle, _ptr(pMem))


def LocalDiscard(hMem: int) -> int:
    """Discard a moveable object's data, keeping its handle; the handle, or NULL on failure."""
    return _attempt(0, _local, MoveableTable.discard, _ptr(hMem))


# ---- GlobalAlloc: objects in the daemon's global heap, valid in every process --------------
# The daemon keeps the objects, lock counts and ownership; each call is one round trip.

def GlobalAlloc(uFlags: int, dwBytes: int) -> int:
    """A fixed object (its handle is its address) or, with GMEM_MOVEABLE, a handle to lock;
    NULL on failure. It dies with this process unless GMEM_DDESHARE / GMEM_SHARE."""
    return _attempt(0, default_client().global_alloc, _dword(uFlags), _size(dwBytes))


def GlobalFree(hMem: int) -> int:
    """NULL on success; the handle back, with the error set, on failure."""
    handle = _ptr(hMem)
    try:
        default_client().global_free(handle)
    except ShmheapError as exc:
        return _failed(exc, handle)
    return 0


def GlobalReAlloc(hMem: int, dwBytes: int, uFlags: int) -> int:
    """Resize (or with GMEM_MODIFY change the flags of) an object; its handle or new address,
    or NULL on failure, the object left as it was."""
    return _attempt(0, default_client().global_realloc, _ptr(hMem), _size(dwBytes), _dword(uFlags))


def GlobalSize(hMem: int) -> int:
    """The object's size in bytes; 0 for a discarded object, or on failure."""
    return _attempt(0, default_client().global_size, _ptr(hMem))


def GlobalLock(hMem: int) -> int:
    """The object's data pointer, the same in every process (a moveable object's lock count
    goes up); NULL on failure."""
    return _attempt(0, default_client().global_lock, _ptr(hMem))


def GlobalUnlock(hMem: int) -> bool:
    """TRUE while the object stays locked; FALSE with NO_ERROR once the count reaches 0 (GL-06);
    on failure FALSE, but TRUE with ERROR_INVALID_HANDLE for a freed handle (GL-18)."""
    try:
        locked = default_client().global_unlock(_ptr(hMem))
    except ShmheapError as exc:
        # GL-18: a freed handle answers TRUE (with the error); anything else FALSE.
        return _failed(exc, exc.winerror == WinError.ERROR_INVALID_HANDLE)
    if not locked:
        _state.last_error = WinError.ERROR_SUCCESS  # GL-06: the count reached 0
    return locked


def GlobalFlags(hMem: int) -> int:
    """The lock count and GMEM_* flags of an object; GMEM_INVALID_HANDLE on failure."""
    return _attempt(GMEM_INVALID_HANDLE, default_client().global_flags, _ptr(hMem))


def GlobalHandle(pMem: int) -> int:
    """The handle of the object whose data pointer is pMem; NULL on failure."""
    return _attempt(0, default_client().global_handle, _ptr(pMem))


def GlobalDiscard(hMem: int) -> int:
    """Discard a moveable object's data, keeping its handle; the handle, or NULL on failure."""
    return GlobalReAlloc(hMem, 0, GMEM_MOVEABLE)


def GlobalCompact(dwMinFree: int) -> int:
    """Moves unlocked moveable objects together; returns the largest free block, or 0 on
    failure."""
    return _attempt(0, default_client().global_compact, _size(dwMinFree))


# ---- named file mappings (sections) -------------------------------------------------------

def CreateFile(lpFileName: str, dwDesiredAccess: int, dwShareMode: int, lpSecurityAttributes: object,
               dwCreationDisposition: int, dwFlagsAndAttributes: int, hTemplateFile: int | None) -> int:
    """Open or create a file (a handle of this process's); INVALID_HANDLE_VALUE on failure:
    ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND, ERROR_FILE_EXISTS (CREATE_NEW), ERROR_ACCESS_DENIED,
    ERROR_SHARING_VIOLATION, ERROR_INVALID_PARAMETER (FM-01..FM-13). CREATE_ALWAYS and
    OPEN_ALWAYS set ERROR_ALREADY_EXISTS when the file was there, else ERROR_SUCCESS.
    lpSecurityAttributes, dwFlagsAndAttributes and hTemplateFile are accepted and ignored."""
    try:
        handle, existed = files.create(os.fsdecode(lpFileName), _dword(dwDesiredAccess), _dword(dwShareMode),
                                       _dword(dwCreationDisposition))
    except ShmheapError as exc:
        return _failed(exc, INVALID_HANDLE_VALUE)
    if _dword(dwCreationDisposition) in (CREATE_ALWAYS, OPEN_ALWAYS):
        _state.last_error = WinError.ERROR_ALREADY_EXISTS if existed else WinError.ERROR_SUCCESS
    return handle


CreateFileW = CreateFileA = CreateFile


def GetFileSize(hFile: int) -> tuple[int, int]:
    """(low DWORD, high DWORD) of the file's size; the high one is C's lpFileSizeHigh
    out-parameter. On failure (INVALID_FILE_SIZE, 0) with ERROR_INVALID_HANDLE."""
    size = _attempt(None, files.size, _ptr(hFile))
    if size is None:
        return INVALID_FILE_SIZE, 0
    if size & _MASK32 == INVALID_FILE_SIZE:
        _state.last_error = WinError.ERROR_SUCCESS  # tells the size from a failure, as Windows does
    return size & _MASK32, size >> 32


def GetFileSizeEx(hFile: int) -> int | None:
    """The file's size in bytes (C's LARGE_INTEGER out-parameter), or None with
    ERROR_INVALID_HANDLE."""
    return _attempt(None, files.size, _ptr(hFile))


def CreateFileMapping(hFile: int, lpFileMappingAttributes: object, flProtect: int, dwMaximumSizeHigh: int,
                      dwMaximumSizeLow: int, lpName: str | None) -> int:
    """A section: over the file hFile (FM-24..FM-36), or pagefile-backed for
    INVALID_HANDLE_VALUE; its handle, or NULL on failure. Size 0 is the file's size
    (ERROR_FILE_INVALID for an empty file); PAGE_READWRITE extends a smaller file, a read-only
    section may not be larger (ERROR_NOT_ENOUGH_MEMORY); a protection the file's access does
    not allow is ERROR_ACCESS_DENIED. Opening an existing name returns a handle to it and sets
    ERROR_ALREADY_EXISTS."""
    size = (_dword(dwMaximumSizeHigh) << 32) | _dword(dwMaximumSizeLow)
    try:
        if _ptr(hFile) == INVALID_HANDLE_VALUE:
            handle, existed = default_client().section_create(_dword(flProtect), size, lpName or None)
        else:
            opened = files.get(_ptr(hFile))
            handle, existed = default_client().file_mapping_create(opened.fd, _dword(flProtect), size,
                                                                   lpName or None)
    except ShmheapError as exc:
        return _failed(exc, 0)
    _state.last_error = WinError.ERROR_ALREADY_EXISTS if existed else WinError.ERROR_SUCCESS
    return handle


CreateFileMappingW = CreateFileMappingA = CreateFileMapping


def OpenFileMapping(dwDesiredAccess: int, bInheritHandle: bool, lpName: str) -> int:
    """A new handle to the named section, whose views may ask no more than dwDesiredAccess
    (FM-42, FM-43); NULL on failure (ERROR_FILE_NOT_FOUND for no section of that name, also
    once its last handle closed: FM-45). bInheritHandle is ignored."""
    return _attempt(0, default_client().section_open, _dword(dwDesiredAccess), str(lpName))


OpenFileMappingW = OpenFileMappingA = OpenFileMapping


def MapViewOfFile(hFileMappingObject: int, dwDesiredAccess: int, dwFileOffsetHigh: int, dwFileOffsetLow: int,
                  dwNumberOfBytesToMap: int) -> int:
    """The address of the view: the section's own bytes (a file section's: the file's), the
    same address in every process; NULL on failure: ERROR_MAPPED_ALIGNMENT for an offset not a
    multiple of 64 KiB, ERROR_ACCESS_DENIED past the end or beyond the handle's access.
    FILE_MAP_READ alone makes this process's views read-only."""
    offset = (_dword(dwFileOffsetHigh) << 32) | _dword(dwFileOffsetLow)
    return _attempt(0, default_client().section_map, _ptr(hFileMappingObject),
                    _dword(dwDesiredAccess), offset, _size(dwNumberOfBytesToMap))


def UnmapViewOfFile(lpBaseAddress: int) -> bool:
    """Unmap the view of this process's that holds lpBaseAddress (its base or any byte in it,
    FM-59); TRUE, or FALSE with ERROR_INVALID_ADDRESS if no view holds it."""
    return _attempt(False, default_client().section_unmap, _ptr(lpBaseAddress))


def FlushViewOfFile(lpBaseAddress: int, dwNumberOfBytesToFlush: int) -> bool:
    """Start writing a view's dirty pages to its file (0 bytes: to the end of the view);
    TRUE, or FALSE with ERROR_INVALID_ADDRESS if no view of this process holds the address."""
    return _attempt(False, _true, default_client().section_flush, _ptr(lpBaseAddress),
                    _size(dwNumberOfBytesToFlush))


def CloseHandle(hObject: int) -> bool:
    """Close a file handle (its sections keep the file open, FM-69) or a section handle (the
    section goes with its last handle and view); TRUE, or FALSE with ERROR_INVALID_HANDLE.
    INVALID_HANDLE_VALUE is the current process's pseudo-handle: TRUE (FM-22)."""
    handle = _ptr(hObject)
    if handle == INVALID_HANDLE_VALUE:
        return True
    if files.is_file_handle(handle):
        return _attempt(False, _true, files.close, handle)
    return _attempt(False, default_client().section_close, handle)


# ---- the clipboard (docs/clipboard_semantics.md, rows CB-*) ---------------------------------
#
# One clipboard per daemon, shared by its processes. A window (hWnd) is any int the caller
# picks as its identity; 0 opens the clipboard for the calling process. Data is a global
# handle (GlobalAlloc) that SetClipboardData hands to the clipboard: do not free or lock it
# after; every process reads the same handle with GetClipboardData and GlobalLock.

def OpenClipboard(hWndNewOwner: int) -> bool:
    """TRUE, or FALSE with ERROR_ACCESS_DENIED while another process has it open (CB-04)."""
    return _attempt(False, _true, default_client().clipboard_open, _ptr(hWndNewOwner))


def CloseClipboard() -> bool:
    """Close the clipboard this process opened; TRUE, or FALSE with ERROR_CLIPBOARD_NOT_OPEN."""
    return _attempt(False, _true, default_client().clipboard_close)


def EmptyClipboard() -> bool:
    """Frees every format's data; the opener's window becomes the owner (CB-12). TRUE, or
    FALSE with ERROR_CLIPBOARD_NOT_OPEN unless this process has it open."""
    return _attempt(False, _true, default_client().clipboard_empty)


def SetClipboardData(uFormat: int, hMem: int) -> int:
    """hMem, now the clipboard's; NULL on failure. hMem 0 promises the format: its owner
    process renders it when asked (SetClipboardRenderer). Needs the clipboard open by some
    process (CB-16, CB-17)."""
    return _attempt(0, default_client().clipboard_set, _dword(uFormat), _ptr(hMem))


def GetClipboardData(uFormat: int) -> int:
    """The format's global handle (the same in every process), or NULL: ERROR_NOT_FOUND if
    it is not there (CB-27), ERROR_CLIPBOARD_NOT_OPEN unless this process has it open."""
    return _attempt(0, default_client().clipboard_get, _dword(uFormat))


def IsClipboardFormatAvailable(format: int) -> bool:
    """TRUE if the clipboard has the format (or can synthesize it); any process, open or not
    (CB-41). FALSE on failure."""
    return _attempt(False, default_client().clipboard_available, _dword(format))


def EnumClipboardFormats(format: int) -> int:
    """The format after `format` (0: the first); 0 at the end, with ERROR_SUCCESS (CB-39)."""
    result = _attempt(None, default_client().clipboard_enum, _dword(format))
    if result is None:
        return 0
    _state.last_error = WinError.ERROR_SUCCESS
    return result


def CountClipboardFormats() -> int:
    """How many formats the clipboard holds, synthesized ones included; 0 on failure."""
    return _attempt(0, lambda: len(default_client().clipboard_info()["formats"]))


def RegisterClipboardFormat(lpszFormat: str | None) -> int:
    """A value in 0xC000..0xFFFF, the same for the same name (case-insensitive) in every
    process; 0 with ERROR_INVALID_PARAMETER for None, ERROR_INVALID_NAME for "" (CB-72)."""
    if lpszFormat is None:
        _state.last_error = WinError.ERROR_INVALID_PARAMETER
        return 0
    return _attempt(0, default_client().clipboard_register, str(lpszFormat))


RegisterClipboardFormatW = RegisterClipboardFormatA = RegisterClipboardFormat


def GetClipboardFormatName(format: int) -> str | None:
    """The registered format's name, or None (ERROR_INVALID_HANDLE) for any other value,
    the standard formats included (CB-73)."""
    return _attempt(None, default_client().clipboard_format_name, _dword(format))


GetClipboardFormatNameW = GetClipboardFormatNameA = GetClipboardFormatName


def GetClipboardSequenceNumber() -> int:
    """The clipboard's sequence number, which moves on every change; 0 on failure."""
    return _attempt(0, lambda: default_client().clipboard_info()["sequence"])


def GetClipboardOwner() -> int:
    """The window that last emptied the clipboard (0 if none, or opened with 0)."""
    return _attempt(0, lambda: default_client().clipboard_info()["owner"])


def GetOpenClipboardWindow() -> int:
    """The window the clipboard is open with (0 if closed, or opened with 0)."""
    return _attempt(0, lambda: default_client().clipboard_info()["open_window"])


def GetPriorityClipboardFormat(paFormatPriorityList: Iterable[int], cFormats: int | None = None) -> int:
    """The first format of the list on the clipboard; 0 if the clipboard is empty, -1 if
    none of them is there (CB-47)."""
    formats = list(paFormatPriorityList)[:cFormats]
    return _attempt(-1, default_client().clipboard_priority, [_dword(fmt) for fmt in formats])


def SetClipboardRenderer(callback: Callable[[int], object] | None) -> None:
    """Not Win32: WM_RENDERFORMAT's role. `callback(uFormat)` runs on a thread of this
    process's own when another process asks for a format this process promised
    (SetClipboardData(uFormat, 0)); it renders with SetClipboardData(uFormat, hMem), the
    clipboard needing no opening (CB-66). None stops it."""
    default_client().clipboard_on_render(callback)


def _true(function, *args):
    function(*args)
    return True


# `from shmheap.win32 import *` brings the Win32 names only: constants, error codes, structs
# and calls, not this module's imports.
__all__ = sorted({"WinError"} | {name for name, value in globals().items() if not name.startswith("_") and (
    name.isupper() or getattr(value, "__module__", None) == __name__)} - {"WRITE"})
