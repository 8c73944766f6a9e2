"""COM's task allocator: CoTaskMemAlloc, CoTaskMemRealloc, CoTaskMemFree and the IMalloc that
CoGetMalloc hands out (docs/crt_semantics.md, rows COM-01..15).

Its blocks live on the process heap, as Wine's combase puts them (COM-15): Alloc is
`HeapAlloc(GetProcessHeap(), 0, cb)`, GetSize `HeapSize`, DidAlloc `HeapValidate`, so
`HeapSize(GetProcessHeap(), 0, CoTaskMemAlloc(n))` is n, and the facade's heap calls set
`GetLastError()` on failure as they do for any heap (no HRESULT: CoTaskMemAlloc returns NULL).
Sizes are exact: `CoTaskMemAlloc(0)` is a valid zero-length block (COM-05), unlike malloc(0)'s
one byte (shmheap.crt). Each of these calls is the facade's heap call on the process heap, so
conventions (addresses as ints, NULL 0, sizes modulo 2**64) are the facade's.

Out-parameters become return values (DESIGN.md): `CoGetMalloc(dwMemContext)` returns the pair
(HRESULT, IMalloc or None), None where C writes NULL (COM-02). C's `CoGetMalloc(0, NULL)`
(COM-03, a crash on Windows) has no Python spelling. HRESULTs are unsigned 32-bit values, as
winerror.h writes them and as the facade writes STATUS_* codes: E_INVALIDARG is 0x80070057, not
the negative LONG; `FAILED` and `SUCCEEDED` test either form.

A block of another heap (malloc's CRT heap, a private heap) is refused, never freed or resized
there: CoTaskMemFree leaves it intact (void, the last error ERROR_INVALID_PARAMETER), Realloc
returns NULL, GetSize (SIZE_T)-1, DidAlloc 0 (CRT-28, CRT-29). On UCRT Windows malloc shares the
process heap and such a free "works" by accident; here each has its own heap (shmheap.crt).
"""

from __future__ import annotations

from .win32 import (_MASK64, GetProcessHeap, HeapAlloc, HeapFree, HeapReAlloc, HeapSize, HeapValidate, _dword,
                    _ptr, _size)

S_OK = 0
E_INVALIDARG = 0x80070057  # one or more arguments are invalid
E_OUTOFMEMORY = 0x8007000E
MEMCTX_TASK = 1  # the only context CoGetMalloc accepts ("This parameter must be 1")
MEMCTX_SHARED = 2
MEMCTX_MACSYSTEM = 3
MEMCTX_UNKNOWN = -1
MEMCTX_SAME = -2
SIZE_T_MAX = _MASK64  # (SIZE_T)-1: GetSize's answer for NULL or no block


def SUCCEEDED(hr: int) -> bool:
    """True for a success HRESULT (the severity bit clear), signed or unsigned."""
    return not _dword(hr) & 0x80000000


def FAILED(hr: int) -> bool:
    """True for a failure HRESULT (the severity bit set), signed or unsigned."""
    return bool(_dword(hr) & 0x80000000)


def CoTaskMemAlloc(cb: int) -> int:
    """A block of exactly cb bytes on the process heap (0 is a valid zero-length block,
    COM-05), not zeroed (COM-07), 16-byte aligned; NULL if it cannot be had (COM-06)."""
    return HeapAlloc(GetProcessHeap(), 0, cb)


def CoTaskMemRealloc(pv: int, cb: int) -> int:
    """Resize a task-allocator block, moving it if need be; NULL pv allocates (COM-08), cb 0
    frees pv and returns NULL (COM-09). NULL on failure, the block as it was (COM-10)."""
    address, size = _ptr(pv), _size(cb)
    if address == 0:
        return CoTaskMemAlloc(size)
    if size == 0:
        CoTaskMemFree(address)
        return 0
    return HeapReAlloc(GetProcessHeap(), 0, address, size)


def CoTaskMemFree(pv: int) -> None:
    """Free a task-allocator block; NULL does nothing (COM-11). A block of another heap (a
    malloc block, say) is left intact: nothing is returned (the call is void in C), but
    GetLastError() says ERROR_INVALID_PARAMETER (CRT-28)."""
    address = _ptr(pv)
    if address:
        HeapFree(GetProcessHeap(), 0, address)


class IMalloc:
    """The task allocator's IMalloc, as CoGetMalloc gives it: one static object per process
    (COM-01, COM-04) whose methods are the CoTaskMem* calls on this process's process heap
    (after fork, the child's own)."""

    __slots__ = ()

    def AddRef(self) -> int:
        """A static object counts no references: always 2, as Wine's (COM-04)."""
        return 2

    def Release(self) -> int:
        """Never destroys the allocator: always 1, as Wine's (COM-04)."""
        return 1

    def Alloc(self, cb: int) -> int:
        """CoTaskMemAlloc(cb) (COM-05..07)."""
        return CoTaskMemAlloc(cb)

    def Realloc(self, pv: int, cb: int) -> int:
        """CoTaskMemRealloc(pv, cb) (COM-08..10)."""
        return CoTaskMemRealloc(pv, cb)

    def Free(self, pv: int) -> None:
        """CoTaskMemFree(pv); NULL does nothing (COM-11)."""
        CoTaskMemFree(pv)

    def GetSize(self, pv: int) -> int:
        """The block's exact size (COM-12); (SIZE_T)-1 for NULL (the last error left alone) or
        a pointer that is no block of the process heap (ERROR_INVALID_PARAMETER, CRT-29)."""
        address = _ptr(pv)
        if address == 0:
            return SIZE_T_MAX
        return HeapSize(GetProcessHeap(), 0, address)

    def DidAlloc(self, pv: int) -> int:
        """1 if pv is a block of the process heap, 0 if not (an interior pointer, another
        heap's block, garbage), -1 for NULL (COM-13, CRT-29). The last error is left alone."""
        address = _ptr(pv)
        if address == 0:
            return -1
        return int(HeapValidate(GetProcessHeap(), 0, address))

    def HeapMinimize(self) -> None:
        """Nothing to do: the heap gives freed pages back itself (COM-14)."""

    def __repr__(self) -> str:
        return "<IMalloc: the task allocator (process heap)>"


_TASK_ALLOCATOR = IMalloc()


def CoGetMalloc(dwMemContext: int) -> tuple[int, IMalloc | None]:
    """(S_OK, the task allocator) for MEMCTX_TASK, the same object every time, COM initialized
    or not (COM-01); (E_INVALIDARG, None) for any other context (COM-02). C's out-parameter
    is the pair's second item."""
    if _dword(dwMemContext) != MEMCTX_TASK:
        return E_INVALIDARG, None
    return S_OK, _TASK_ALLOCATOR


__all__ = ["CoTaskMemAlloc", "CoTaskMemRealloc", "CoTaskMemFree", "CoGetMalloc", "IMalloc", "SUCCEEDED",
           "FAILED", "S_OK", "E_INVALIDARG", "E_OUTOFMEMORY", "MEMCTX_TASK", "MEMCTX_SHARED",
           "MEMCTX_MACSYSTEM", "MEMCTX_UNKNOWN", "MEMCTX_SAME", "SIZE_T_MAX"]
