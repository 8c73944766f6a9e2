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
from dataclasses import dataclass

from .client import default_client
from .constants import *  # noqa: F401,F403 -- the facade exports the Win32 constants
from .errors import WinError, raise_for

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
    if Length:
        view(Destination, Length, write=True)[:] = view(Source, Length)


MoveMemory = CopyMemory


def FillMemory(Destination, Length, Fill):
    if Length:
        target = view(Destination, Length, write=True)
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(target)), _dword(Fill) & 0xFF, Length)


def ZeroMemory(Destination, Length):
    FillMemory(Destination, Length, 0)


def RaiseLastError():
    """Raise the exception for GetLastError() (for callers who prefer exceptions)."""
    raise_for(GetLastError())
