"""The Win32 facade: Windows memory calls with Win32 names, parameter order and results.

Addresses are ints (offsets into the segment, NULL is 0), handles are ints, and arguments are
converted the way C converts them (a SIZE_T or pointer is taken modulo 2**64, a DWORD modulo
2**32, so -1 is (SIZE_T)-1). Failure returns what C returns (0, NULL, FALSE, None for a struct)
and sets the calling thread's `GetLastError()`; success leaves it alone, as Windows does.
Out-parameters become return values. The behaviour of each call is the daemon's (see
daemon/pagetable.py); this module converts arguments and keeps the last error.

The default connection is made on first use (`SHMHEAP_SOCKET`, autostart).
"""

import ctypes
import operator
import os
import platform
import threading
from contextlib import nullcontext
from dataclasses import dataclass

from . import client as client_module
from .client import default_client
from .constants import *  # noqa: F401,F403 -- the facade exports the Win32 constants
from .errors import ShmheapError, WinError, raise_for
from .segment import MIN_ADDRESS

globals().update(WinError.__members__)  # ERROR_* codes under their Win32 names

_MASK64 = 2**64 - 1
_MASK32 = 2**32 - 1
_state = threading.local()


def _ptr(value):
    return operator.index(value) & _MASK64


_size = _ptr


def _dword(value):
    return operator.index(value) & _MASK32


def GetLastError():
    return getattr(_state, "last_error", 0)


def SetLastError(dwErrCode):
    _state.last_error = _dword(dwErrCode)


def _call(failure, op, *args):
    error, result = default_client().call_raw(op, *args)
    if error:
        _state.last_error = error
        return failure
    return result


# ---- virtual memory ------------------------------------------------------------------------

@dataclass(slots=True)
class MEMORY_BASIC_INFORMATION:
    BaseAddress: int
    AllocationBase: int
    AllocationProtect: int
    RegionSize: int
    State: int
    Protect: int
    Type: int


SIZEOF_MEMORY_BASIC_INFORMATION = 48


def VirtualAlloc(lpAddress, dwSize, flAllocationType, flProtect):
    """Reserve and/or commit pages; returns the base address, or 0 (NULL) on failure."""
    return _call(0, "virtual_alloc", _ptr(lpAddress), _size(dwSize),
                 _dword(flAllocationType), _dword(flProtect))


def VirtualFree(lpAddress, dwSize, dwFreeType):
    """MEM_DECOMMIT a page range, or MEM_RELEASE a whole region (base address, size 0)."""
    return _call(False, "virtual_free", _ptr(lpAddress), _size(dwSize), _dword(dwFreeType))


def VirtualQuery(lpAddress, dwLength=SIZEOF_MEMORY_BASIC_INFORMATION):
    """The MEMORY_BASIC_INFORMATION of the run of like pages at lpAddress, or None."""
    if _size(dwLength) < SIZEOF_MEMORY_BASIC_INFORMATION:
        _state.last_error = WinError.ERROR_BAD_LENGTH
        return None
    fields = _call(None, "virtual_query", _ptr(lpAddress))
    return None if fields is None else MEMORY_BASIC_INFORMATION(*fields)


def VirtualProtect(lpAddress, dwSize, flNewProtect):
    """Change the protection of committed pages; returns the old protection of the first
    page, or 0 on failure (no valid protection is 0)."""
    return _call(0, "virtual_protect", _ptr(lpAddress), _size(dwSize), _dword(flNewProtect))


# ---- system information --------------------------------------------------------------------

@dataclass(slots=True)
class SYSTEM_INFO:
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


def GetSystemInfo():
    info = default_client().info
    architecture, processor_type = _ARCHITECTURES.get(platform.machine().lower(), (0xFFFF, 0))
    cpus = len(os.sched_getaffinity(0))
    return SYSTEM_INFO(
        wProcessorArchitecture=architecture,
        dwPageSize=info["page_size"],
        lpMinimumApplicationAddress=info["min_address"],
        lpMaximumApplicationAddress=info["size"] - 1,
        dwActiveProcessorMask=sum(1 << cpu for cpu in os.sched_getaffinity(0)),
        dwNumberOfProcessors=cpus,
        dwProcessorType=processor_type,
        dwAllocationGranularity=info["granularity"],
        wProcessorLevel=6,
        wProcessorRevision=0,
    )


@dataclass(slots=True)
class MEMORYSTATUSEX:
    dwLength: int
    dwMemoryLoad: int
    ullTotalPhys: int
    ullAvailPhys: int
    ullTotalPageFile: int
    ullAvailPageFile: int
    ullTotalVirtual: int
    ullAvailVirtual: int
    ullAvailExtendedVirtual: int


def GlobalMemoryStatusEx():
    """Physical memory from the OS; the 'page file' is the daemon's commit limit and what is
    left of it; 'virtual' is the segment's user address space and its free part."""
    status = default_client().call("memory_status")
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

def view(address, size, *, write=False):
    """A zero-copy memoryview of committed, accessible pages (read-only for read-only pages).
    Raises ShmheapPermissionError (ERROR_NOACCESS) for reserved, free, no-access or another
    process's pages, and GuardPageError once for PAGE_GUARD pages."""
    return default_client().view(_ptr(address), _size(size), write=write)


def read(address, size):
    return bytes(view(address, size))


def write(address, data):
    data = memoryview(data).cast("B")
    view(address, len(data), write=True)[:] = data


def CopyMemory(Destination, Source, Length):
    """Copy Length bytes; the ranges may overlap (memmove semantics, like MoveMemory)."""
    length = _size(Length)
    if length:
        view(_ptr(Destination), length, write=True)[:] = view(_ptr(Source), length)


MoveMemory = CopyMemory


def FillMemory(Destination, Length, Fill):
    length, fill = _size(Length), _dword(Fill) & 0xFF
    if length:
        target = view(_ptr(Destination), length, write=True)
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(target)), fill, length)


def ZeroMemory(Destination, Length):
    FillMemory(Destination, Length, 0)


def RaiseLastError():
    """Raise the exception for GetLastError() (for callers who prefer exceptions)."""
    raise_for(GetLastError())


# ---- heaps ---------------------------------------------------------------------------------
# The allocator runs in this process (shmheap/heap.py); only commit changes reach the daemon.

_HEAP_FAILURE = ShmheapError


def _client():
    """default_client() with its fast path inlined, for the per-block calls."""
    client = client_module._default
    return client if client is not None and client._sock is not None else default_client()


def _heap(hHeap):
    """This process's heap for a handle, or None with ERROR_INVALID_HANDLE (a handle of
    another process, a destroyed heap, or garbage)."""
    heap = _client().heaps.get(_ptr(hHeap))
    if heap is None:
        _state.last_error = WinError.ERROR_INVALID_HANDLE
    return heap


def _serialized(heap, flags):
    if (flags | heap.flags) & HEAP_NO_SERIALIZE:
        return nullcontext()
    return heap.lock


def _outside_segment(address):
    return not MIN_ADDRESS <= address < default_client().info["size"]


def _heap_failed(heap, flags, exc, failure):
    """Record a heap failure; with HEAP_GENERATE_EXCEPTIONS raise STATUS_NO_MEMORY (HC-14)."""
    if (flags | heap.flags) & HEAP_GENERATE_EXCEPTIONS and exc.winerror in _OUT_OF_MEMORY:
        raise_for(WinError.STATUS_NO_MEMORY, str(exc))
    _state.last_error = exc.winerror
    return failure


_OUT_OF_MEMORY = {WinError.ERROR_NOT_ENOUGH_MEMORY, WinError.ERROR_COMMITMENT_LIMIT,
                  WinError.ERROR_OUTOFMEMORY}


def HeapCreate(flOptions, dwInitialSize, dwMaximumSize, *, name=None):
    """A private heap of this process; returns its handle (64 KiB aligned) or NULL.
    dwMaximumSize 0 makes it growable; `name` registers it under that name with the daemon."""
    try:
        heap = default_client().heap_create(_dword(flOptions), _size(dwInitialSize),
                                            _size(dwMaximumSize), name)
    except _HEAP_FAILURE as exc:
        _state.last_error = exc.winerror
        return 0
    return heap.base


def HeapDestroy(hHeap):
    heap = _heap(hHeap)
    if heap is None:
        return False
    try:
        with heap.lock:
            default_client().heap_destroy(heap)
    except _HEAP_FAILURE as exc:
        _state.last_error = exc.winerror
        return False
    return True


def GetProcessHeap():
    return default_client().process_heap.base


def GetProcessHeaps(NumberOfHeaps=0, ProcessHeaps=None):
    """Returns how many heaps the process has; stores at most NumberOfHeaps handles into the
    list ProcessHeaps (replacing its contents), process heap first, then by creation."""
    handles = list(default_client().heaps)
    if ProcessHeaps is not None:
        ProcessHeaps[:] = handles[:_dword(NumberOfHeaps)]
    return len(handles)


def HeapAlloc(hHeap, dwFlags, dwBytes):
    heap = _client().heaps.get(hHeap & _MASK64)
    if heap is None:
        _state.last_error = WinError.ERROR_INVALID_HANDLE
        return 0
    flags = dwFlags & _MASK32
    try:
        if (flags | heap.flags) & HEAP_NO_SERIALIZE:
            return heap.alloc(dwBytes & _MASK64, flags & HEAP_ZERO_MEMORY)
        with heap.lock:
            return heap.alloc(dwBytes & _MASK64, flags & HEAP_ZERO_MEMORY)
    except _HEAP_FAILURE as exc:
        return _heap_failed(heap, flags, exc, 0)


def HeapReAlloc(hHeap, dwFlags, lpMem, dwBytes):
    address = _ptr(lpMem)
    if address == 0:
        _state.last_error = WinError.ERROR_SUCCESS  # HR-01
        return 0
    heap = _heap(hHeap)
    if heap is None:
        return 0
    flags = _dword(dwFlags)
    if _outside_segment(address):
        _state.last_error = WinError.ERROR_NOACCESS
        return 0
    try:
        with _serialized(heap, flags):
            return heap.realloc(address, _size(dwBytes), zero=bool(flags & HEAP_ZERO_MEMORY),
                                in_place_only=bool(flags & HEAP_REALLOC_IN_PLACE_ONLY))
    except _HEAP_FAILURE as exc:
        return _heap_failed(heap, flags, exc, 0)


def HeapFree(hHeap, dwFlags, lpMem):
    address = lpMem & _MASK64
    if address == 0:
        return True  # HF-01: NULL short-circuits before the heap is looked at
    client = _client()
    heap = client.heaps.get(hHeap & _MASK64)
    if heap is None:
        _state.last_error = WinError.ERROR_INVALID_HANDLE
        return False
    try:
        if (dwFlags | heap.flags) & HEAP_NO_SERIALIZE:
            heap.free(address)
        else:
            with heap.lock:
                heap.free(address)
    except _HEAP_FAILURE as exc:
        # HF-06: an address outside the segment is unmapped memory; one in memory no heap of
        # ours holds is not heap memory at all (the last error stays); in a heap, a bad block.
        if not MIN_ADDRESS <= address < client.info["size"]:
            _state.last_error = WinError.ERROR_NOACCESS
        elif not _in_foreign_region(client, address):
            _state.last_error = exc.winerror
        return False
    return True


def _in_foreign_region(client, address):
    """True if `address` lies in live memory that is no heap's of ours (a VirtualAlloc
    region, say): a failure path only, so one round trip is fine."""
    error, fields = client.call_raw("virtual_query", address)
    if error or fields[4] == MEM_FREE:
        return False
    base = fields[1]
    return not any(base in heap.segment_bases or base in heap.large for heap in client.heaps.values())


def HeapSize(hHeap, dwFlags, lpMem):
    """The exact requested size, or (SIZE_T)-1 with ERROR_INVALID_PARAMETER (HF-07)."""
    heap = _heap(hHeap)
    if heap is None:
        return _MASK64
    try:
        with _serialized(heap, _dword(dwFlags)):
            address = _ptr(lpMem)
            if heap.checking and not heap.validate(address):
                raise_for(WinError.ERROR_INVALID_PARAMETER, "block fails validation")
            return heap.size(address)
    except _HEAP_FAILURE as exc:
        _state.last_error = exc.winerror
        return _MASK64


def HeapValidate(hHeap, dwFlags, lpMem):
    """TRUE if the block (or, for NULL, the whole heap) is sound. A failure leaves the last
    error alone (HF-04, HF-05)."""
    heap = _heap(hHeap)
    if heap is None:
        return False
    address = _ptr(lpMem)
    with _serialized(heap, _dword(dwFlags)):
        return heap.validate(address or None)


def HeapCompact(hHeap, dwFlags):
    """Gives free memory back; returns the largest committed free range (0 with NO_ERROR when
    there is none, HI-07)."""
    heap = _heap(hHeap)
    if heap is None:
        return 0
    try:
        with _serialized(heap, _dword(dwFlags)):
            largest = heap.compact()
    except _HEAP_FAILURE as exc:
        _state.last_error = exc.winerror
        return 0
    if not largest:
        _state.last_error = WinError.ERROR_SUCCESS
    return largest


def HeapLock(hHeap):
    """Take the heap's lock (recursive for its owner). A HEAP_NO_SERIALIZE heap has none to
    take: TRUE, excluding nothing (HL-03)."""
    heap = _heap(hHeap)
    if heap is None:
        return False
    if not heap.flags & HEAP_NO_SERIALIZE:
        heap.lock.acquire()
    return True


def HeapUnlock(hHeap):
    heap = _heap(hHeap)
    if heap is None:
        return False
    if not heap.flags & HEAP_NO_SERIALIZE:
        try:
            heap.lock.release()
        except RuntimeError:
            _state.last_error = WinError.ERROR_NOT_LOCKED
            return False
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

    def __init__(self):
        self.lpData = 0
        self.cbData = 0
        self.cbOverhead = 0
        self.iRegionIndex = 0
        self.wFlags = 0
        self.Region = self._Region()
        self._walk = None

    def __repr__(self):
        return (f"PROCESS_HEAP_ENTRY(lpData={self.lpData:#x}, cbData={self.cbData}, cbOverhead="
                f"{self.cbOverhead}, iRegionIndex={self.iRegionIndex}, wFlags={self.wFlags:#x})")


_WALK_FLAGS = {"region": PROCESS_HEAP_REGION, "uncommitted": PROCESS_HEAP_UNCOMMITTED_RANGE,
               "busy": PROCESS_HEAP_ENTRY_BUSY, "large": PROCESS_HEAP_ENTRY_BUSY, "free": 0}


def HeapWalk(hHeap, lpEntry):
    """Fill lpEntry with the next entry of the heap; FALSE with ERROR_NO_MORE_ITEMS at the end.
    The walk reads a snapshot taken when lpData is 0 (hold HeapLock to keep it current)."""
    heap = _heap(hHeap)
    if heap is None:
        return False
    if lpEntry.lpData == 0 or lpEntry._walk is None:
        with _serialized(heap, 0):
            lpEntry._walk = iter(list(heap.walk()))
    item = next(lpEntry._walk, None)
    if item is None:
        lpEntry._walk = None
        _state.last_error = WinError.ERROR_NO_MORE_ITEMS
        return False
    kind, address, size, overhead, index, segment = item
    lpEntry.lpData, lpEntry.cbData, lpEntry.cbOverhead = address, size, overhead
    lpEntry.iRegionIndex, lpEntry.wFlags = index, _WALK_FLAGS[kind]
    if kind == "region":
        lpEntry.Region = PROCESS_HEAP_ENTRY._Region(
            segment.committed_end - segment.base, segment.end - segment.committed_end,
            segment.start, segment.end)
    return True


# ---- LocalAlloc: moveable and fixed objects on the process heap (private) ------------------

def _local(op, *args):
    client = default_client()
    with client.process_heap.lock:
        value, error = getattr(client.local_objects, op)(*args)
    if error is not None:
        _state.last_error = error
    return value


def LocalAlloc(uFlags, uBytes):
    return _local("alloc", _dword(uFlags), _size(uBytes))


def LocalFree(hMem):
    """NULL on success; the handle back, with the error set, on failure."""
    return _local("free", _ptr(hMem))


def LocalReAlloc(hMem, uBytes, uFlags):
    return _local("realloc", _ptr(hMem), _size(uBytes), _dword(uFlags))


def LocalSize(hMem):
    return _local("size", _ptr(hMem))


def LocalLock(hMem):
    return _local("lock", _ptr(hMem))


def LocalUnlock(hMem):
    return _local("unlock", _ptr(hMem))


def LocalFlags(hMem):
    return _local("flags", _ptr(hMem))


def LocalHandle(pMem):
    return _local("handle", _ptr(pMem))


def LocalDiscard(hMem):
    return _local("discard", _ptr(hMem))


# ---- GlobalAlloc: objects in the daemon's global heap, valid in every process --------------
# The daemon keeps the objects, lock counts and ownership; each call is one round trip and
# returns the Win32 value together with the last error it sets (or None: left alone).

def _global(op, *args):
    value, error = default_client().call(op, *args)
    if error is not None:
        _state.last_error = error
    return value


def GlobalAlloc(uFlags, dwBytes):
    """A fixed object (its handle is its address) or, with GMEM_MOVEABLE, a handle to lock.
    It dies with this process unless GMEM_DDESHARE / GMEM_SHARE."""
    return _global("global_alloc", _dword(uFlags), _size(dwBytes))


def GlobalFree(hMem):
    return _global("global_free", _ptr(hMem))


def GlobalReAlloc(hMem, dwBytes, uFlags):
    return _global("global_realloc", _ptr(hMem), _size(dwBytes), _dword(uFlags))


def GlobalSize(hMem):
    return _global("global_size", _ptr(hMem))


def GlobalLock(hMem):
    return _global("global_lock", _ptr(hMem))


def GlobalUnlock(hMem):
    return _global("global_unlock", _ptr(hMem))


def GlobalFlags(hMem):
    return _global("global_flags", _ptr(hMem))


def GlobalHandle(pMem):
    return _global("global_handle", _ptr(pMem))


def GlobalDiscard(hMem):
    return GlobalReAlloc(hMem, 0, GMEM_MOVEABLE)


def GlobalCompact(dwMinFree):
    """Moves unlocked moveable objects together; returns the largest free block."""
    return _global("global_compact", _size(dwMinFree))


# ---- named file mappings (sections) -------------------------------------------------------

def CreateFileMapping(hFile, lpFileMappingAttributes, flProtect, dwMaximumSizeHigh,
                      dwMaximumSizeLow, lpName):
    """A pagefile-backed section (hFile must be INVALID_HANDLE_VALUE). Opening an existing
    name returns a handle to it and sets ERROR_ALREADY_EXISTS."""
    if _ptr(hFile) != INVALID_HANDLE_VALUE:
        _state.last_error = WinError.ERROR_INVALID_HANDLE  # sections of real files: not here
        return 0
    size = (_dword(dwMaximumSizeHigh) << 32) | _dword(dwMaximumSizeLow)
    result = _call(None, "section_create", _dword(flProtect), size, lpName or None)
    if result is None:
        return 0
    handle, existed = result
    _state.last_error = WinError.ERROR_ALREADY_EXISTS if existed else WinError.ERROR_SUCCESS
    return handle


CreateFileMappingW = CreateFileMappingA = CreateFileMapping


def OpenFileMapping(dwDesiredAccess, bInheritHandle, lpName):
    return _call(0, "section_open", _dword(dwDesiredAccess), str(lpName))


OpenFileMappingW = OpenFileMappingA = OpenFileMapping


def MapViewOfFile(hFileMappingObject, dwDesiredAccess, dwFileOffsetHigh, dwFileOffsetLow,
                  dwNumberOfBytesToMap):
    """The address of the view: the section's own bytes, the same address in every process.
    FILE_MAP_READ alone makes this process's views read-only."""
    offset = (_dword(dwFileOffsetHigh) << 32) | _dword(dwFileOffsetLow)
    return _call(0, "section_map", _ptr(hFileMappingObject), _dword(dwDesiredAccess), offset,
                 _size(dwNumberOfBytesToMap))


def UnmapViewOfFile(lpBaseAddress):
    return _call(False, "section_unmap", _ptr(lpBaseAddress))


def CloseHandle(hObject):
    return _call(False, "section_close", _ptr(hObject))
