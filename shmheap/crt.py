"""The C runtime heap: malloc and its family as Microsoft's C runtime gives them, over a heap of
this process's own (docs/crt_semantics.md, rows CRT-01..30).

Which C runtime
---------------
Each process has a CRT heap (`Client.crt_heap`: made at connect with the process heap, named
"crt heap", listed by GetProcessHeaps). That is msvcrt.dll's model (CRT-22), not the UCRT's:
`_get_heap_handle()` is not `GetProcessHeap()`, so a malloc block is no block of the process
heap: `HeapSize(GetProcessHeap(), 0, malloc(n))` is (SIZE_T)-1 and `HeapFree(GetProcessHeap(),
0, malloc(n))` is FALSE with ERROR_INVALID_PARAMETER (on UCRT Windows both would succeed,
CRT-27). The handle is an ordinary heap handle of the facade's: HeapSize, HeapValidate and
HeapWalk on it see malloc's blocks (CRT-23). Every other result follows the modern UCRT:

* a 0-byte malloc or calloc allocates 1 byte, so `_msize(malloc(0))` is 1 (CRT-01, CRT-05);
  every other size is exact: `_msize` is the size last asked for (CRT-13);
* blocks are 16-byte aligned (CRT-04), not zeroed unless calloc/_recalloc say so;
* requests above _HEAP_MAXREQ fail before the heap is asked, and calloc and _recalloc check
  count * size for overflow (CRT-02, CRT-06, CRT-21);
* realloc(p, 0) frees p and returns NULL; realloc(NULL, n) is malloc(n) (CRT-07, CRT-08);
* _expand never moves a block (CRT-15, CRT-16).

Errors
------
Nothing here raises for bad input. A failure returns what C returns (NULL, (size_t)-1 or
nothing) and sets the calling thread's errno (`_get_errno`): ENOMEM when memory runs out, EINVAL
for a pointer that is no live block of this CRT heap (NULL where a block is needed, another
heap's block, a freed one, an interior pointer); the block is left as it was. A failure the heap
reports also sets `GetLastError()` (through win32's `_failed`), as the HeapAlloc family under
the CRT would: ERROR_INVALID_PARAMETER for every pointer the heap refuses (HeapFree itself tells
an address outside the segment, ERROR_NOACCESS, and memory of no heap of ours, error left alone,
HF-06; the CRT asks its own heap only). Success touches neither (CRT-24). ProtocolError (the
daemon is gone) is no C failure: it propagates.

Where Windows gives no answer (it crashes, or corrupts its heap), this module decides:

* a pointer not from this heap, or freed already, is refused by free, realloc, _msize and
  _expand alike with EINVAL (CRT-12, CRT-25, CRT-26). CRT-30 has UCRT's realloc say ENOMEM
  for it (any HeapReAlloc failure) and its _msize leave errno alone; here both say EINVAL, so
  a caller can tell a bad pointer from want of memory.
* the invalid-parameter handler (`_msize(NULL)`, `_expand(NULL, n)`: CRT-14, CRT-17) is taken
  as one installed that returns: the documented "handled" results, (size_t)-1 or NULL with
  EINVAL, never the termination the default handler brings.
* CRT-18 (a small block _expand cannot contract) does not arise: this heap shrinks every block
  in place, so `_msize(_expand(p, smaller))` is the smaller size.
* `HeapDestroy(_get_heap_handle())` (Windows allows it, and the CRT is broken after) leaves
  every call here failing as with a bad handle: NULL with ENOMEM from the allocators, EBADF
  (ERROR_INVALID_HANDLE mapped) from free, _msize and _expand.
"""

from __future__ import annotations

import operator
import threading

from . import client as client_module
from .client import default_client
from .errors import ShmheapError, WinError, raise_for
from .heap import Heap
from .win32 import _MASK64, _failed, _ptr, _serialized, _size

# errno values (errno.h, MSVC); the allocators write ENOMEM and EINVAL, the rest come from
# mapping a Win32 error as the CRT does.
ENOENT = 2
ENOEXEC = 8
EBADF = 9
ENOMEM = 12  # not enough memory
EACCES = 13
EEXIST = 17
EINVAL = 22  # invalid argument
ERANGE = 34

_HEAP_MAXREQ = 0xFFFFFFFFFFFFFFE0  # the largest request the 64-bit CRT passes to its heap (malloc.h)
SIZE_MAX = _MASK64  # (size_t)-1: _msize's failure value

_state = threading.local()  # errno, per thread (CRT-24)

# UCRT's __acrt_errno_from_os_error table (misc/errno.cpp). The heap below also reports running
# out as ERROR_OUTOFMEMORY or ERROR_COMMITMENT_LIMIT, which a Windows heap reports as
# ERROR_NOT_ENOUGH_MEMORY: those are ENOMEM too.
_ERRNO_OF = {
    WinError.ERROR_FILE_NOT_FOUND: ENOENT, 3: ENOENT,  # ERROR_PATH_NOT_FOUND
    WinError.ERROR_ACCESS_DENIED: EACCES, WinError.ERROR_INVALID_HANDLE: EBADF,
    WinError.ERROR_NOT_ENOUGH_MEMORY: ENOMEM, WinError.ERROR_INVALID_BLOCK: ENOMEM,
    7: ENOMEM, 1816: ENOMEM,  # ERROR_ARENA_TRASHED, ERROR_NOT_ENOUGH_QUOTA
    WinError.ERROR_OUTOFMEMORY: ENOMEM, WinError.ERROR_COMMITMENT_LIMIT: ENOMEM,
    WinError.ERROR_INVALID_PARAMETER: EINVAL,
    80: EEXIST, WinError.ERROR_ALREADY_EXISTS: EEXIST,  # ERROR_FILE_EXISTS
}


def errno_from_os_error(code: int) -> int:
    """The errno the CRT sets for a Win32 error code (UCRT's table; EINVAL for codes it does
    not list, EACCES for 19..36, ENOEXEC for 188..202)."""
    if code in _ERRNO_OF:
        return _ERRNO_OF[code]
    if 19 <= code <= 36:
        return EACCES
    if 188 <= code <= 202:
        return ENOEXEC
    return EINVAL


# ---- errno ---------------------------------------------------------------------------------

def _get_errno() -> int:
    """The calling thread's errno (0 until a call here fails). C's `_get_errno(&value)`
    returns the value through its out-parameter; here it is the return value."""
    return getattr(_state, "errno", 0)


def _set_errno(value: int) -> int:
    """Set the calling thread's errno (taken as a C int); returns 0, the errno_t of success."""
    _state.errno = (operator.index(value) + 2**31) % 2**32 - 2**31
    return 0


def _enomem(code):
    return ENOMEM  # malloc and calloc: any failure of the heap is ENOMEM (CRT-03)


def _realloc_errno(code):
    """realloc's errno: EINVAL for a bad pointer (our choice, CRT-30), ENOMEM otherwise (CRT-10)."""
    return EINVAL if code == WinError.ERROR_INVALID_PARAMETER else ENOMEM


def _refuse(errno_value, failure):
    """A failure found before the heap is asked: errno set, the last error alone."""
    _state.errno = errno_value
    return failure


# ---- the heap ------------------------------------------------------------------------------

def _crt_heap():
    """This process's CRT heap (connecting first if needed: on first use, after fork)."""
    client = client_module.current
    if client is None or client.crt_heap is None:  # not connected yet, or again
        client = default_client()
    return client.crt_heap


def _on_heap(failure, errno_of, method, *args):
    """method(the CRT heap, *args) under the heap's lock; if the heap refuses, `failure`, with
    errno = errno_of(its Win32 code) and the last error set (ProtocolError propagates)."""
    heap = _crt_heap()
    try:
        if not heap.alive:  # HeapDestroy(_get_heap_handle()) took it: its slabs are no memory now
            raise_for(WinError.ERROR_INVALID_HANDLE, "the C runtime heap was destroyed")
        with _serialized(heap, 0):
            return method(heap, *args)
    except ShmheapError as exc:
        result = _failed(exc, failure)
        _state.errno = errno_of(exc.winerror)
        return result


def _get_heap_handle() -> int:
    """The handle of the heap malloc allocates from: this process's own CRT heap, not
    GetProcessHeap() (msvcrt.dll's model, CRT-22); usable with every Heap* call (CRT-23)."""
    return _crt_heap().base


# ---- allocation ----------------------------------------------------------------------------

def malloc(size: int) -> int:
    """A block of `size` bytes (1 byte for 0, CRT-01), 16-byte aligned, not zeroed; NULL with
    errno ENOMEM above _HEAP_MAXREQ (CRT-02) or when the heap cannot give it (CRT-03)."""
    size = _size(size)
    if size > _HEAP_MAXREQ:
        return _refuse(ENOMEM, 0)
    return _on_heap(0, _enomem, Heap.alloc, size or 1)


def calloc(number: int, size: int) -> int:
    """A zeroed block of number * size bytes (1 byte for 0, CRT-05); NULL with errno ENOMEM if
    the product overflows or exceeds _HEAP_MAXREQ (CRT-06), or memory runs out."""
    count, size = _size(number), _size(size)
    if count and _HEAP_MAXREQ // count < size:
        return _refuse(ENOMEM, 0)
    return _on_heap(0, _enomem, Heap.alloc, count * size or 1, True)


def realloc(memblock: int, size: int) -> int:
    """Resize a block, moving it if need be; the first min(old, new) bytes are kept, growth is
    not zeroed (CRT-09). NULL memblock: malloc(size) (CRT-07). Size 0: frees the block and
    returns NULL (CRT-08). NULL on failure with the block left as it was: errno ENOMEM when
    memory runs out (CRT-10), EINVAL for no block of this heap (CRT-30, our choice)."""
    address, size = _ptr(memblock), _size(size)
    if address == 0:
        return malloc(size)
    if size == 0:
        free(address)
        return 0
    if size > _HEAP_MAXREQ:
        return _refuse(ENOMEM, 0)
    return _on_heap(0, _realloc_errno, Heap.realloc, address, size)


def _recalloc(memblock: int, number: int, size: int) -> int:
    """realloc(memblock, number * size) whose growth reads zero: the bytes past the old
    `_msize` are zeroed, the old ones kept (CRT-19). NULL memblock: calloc(number, size); a
    product of 0 frees the block and returns NULL (CRT-20). NULL on failure, the block as it
    was: errno ENOMEM on overflow or want of memory (CRT-21), EINVAL for a bad pointer."""
    address, count, size = _ptr(memblock), _size(number), _size(size)
    if count and _HEAP_MAXREQ // count < size:
        return _refuse(ENOMEM, 0)
    if address == 0:
        return calloc(count, size)
    if count * size == 0:
        free(address)
        return 0
    return _on_heap(0, _realloc_errno, Heap.realloc, address, count * size, True)


def _expand(memblock: int, size: int) -> int:
    """Resize a block in place: memblock itself, never another address (CRT-15; size 0 is
    taken as 1). NULL if it cannot grow in place, the block as it was, errno ENOMEM (CRT-16);
    NULL with EINVAL for a NULL or bad pointer, ENOMEM above _HEAP_MAXREQ (CRT-17)."""
    address, size = _ptr(memblock), _size(size)
    if address == 0:
        return _refuse(EINVAL, 0)  # the invalid-parameter handler, taken as returning
    if size > _HEAP_MAXREQ:
        return _refuse(ENOMEM, 0)
    return _on_heap(0, errno_from_os_error, Heap.realloc, address, size or 1, False, True)


def free(memblock: int) -> None:
    """Free a block; NULL does nothing (CRT-11). A pointer that is no live block of this heap
    (another heap's, freed already, interior) is refused: errno EINVAL, GetLastError()
    ERROR_INVALID_PARAMETER, the memory left as it was (CRT-12; Windows would corrupt)."""
    address = _ptr(memblock)
    if address:
        _on_heap(None, errno_from_os_error, Heap.free, address)


def _msize(memblock: int) -> int:
    """The size last asked for the block (1 for malloc(0)), exactly (CRT-13); (size_t)-1 with
    errno EINVAL for NULL (CRT-14, the handler taken as returning) or a pointer that is no
    block of this heap (CRT-30, our choice)."""
    address = _ptr(memblock)
    if address == 0:
        return _refuse(EINVAL, SIZE_MAX)
    return _on_heap(SIZE_MAX, errno_from_os_error, Heap.size, address)


# `from shmheap.crt import *` brings the C names, those with MSVC's leading underscore too.
__all__ = ["malloc", "calloc", "realloc", "free", "_msize", "_expand", "_recalloc", "_get_heap_handle",
           "_get_errno", "_set_errno", "errno_from_os_error", "_HEAP_MAXREQ", "SIZE_MAX",
           "ENOENT", "ENOEXEC", "EBADF", "ENOMEM", "EACCES", "EEXIST", "EINVAL", "ERANGE"]
