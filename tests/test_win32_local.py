"""Conformance of the LocalAlloc family of the facade (`shmheap.win32`: LocalAlloc, LocalFree,
LocalReAlloc, LocalSize, LocalLock, LocalUnlock, LocalFlags, LocalHandle, LocalDiscard) with
../shared/reference/win32_semantics.md section 7 (rows GL-*), as they apply to the Local calls.

LocalAlloc uses the caller's process heap. Moveable handles are the address of the pointer
slot of a handle-table entry: 8 mod 16, and the 8 bytes at the handle hold the data pointer
(little-endian). Failure returns 0 / False (LocalFree: the handle back; LocalFlags:
LMEM_INVALID_HANDLE) and sets GetLastError(); success leaves the last error alone unless the
row says otherwise (checked with a 0xDEADBEEF sentinel).

Only the rows, or parts of rows, that are about LocalAlloc alone are here (GL-04's process-heap
block, GL-12, GL-14, GL-19, GL-21, GL-31, GL-39's fixed block); the rows common to LocalAlloc and
GlobalAlloc run against both in test_win32_moveable.py. Rows not tested for Local, because they
are about GlobalAlloc only: GL-03, GL-09, GL-11, GL-13, GL-17, GL-18, GL-20, GL-22, GL-30
(GL-17's Local twin is part of GL-19).
"""

import pytest

from shmheap.constants import (
    LMEM_DISCARDABLE, LMEM_FIXED, LMEM_INVALID_HANDLE, LMEM_MODIFY, LMEM_MOVEABLE, LMEM_NOCOMPACT,
    LMEM_NODISCARD, LMEM_ZEROINIT,
)
from shmheap.errors import WinError

from moveable_checks import LOCAL
from win32_checks import SENTINEL, call, expect, ok

MiB = 2**20

ERROR_INVALID_HANDLE = WinError.ERROR_INVALID_HANDLE
ERROR_NOT_LOCKED = WinError.ERROR_NOT_LOCKED
ERROR_NOACCESS = WinError.ERROR_NOACCESS


# ---- helpers ---------------------------------------------------------------------------------

expect_size, expect_flags, slot = LOCAL.expect_size, LOCAL.expect_flags, LOCAL.slot


def is_heap_block(w, p):
    w.SetLastError(SENTINEL)
    return w.HeapValidate(w.GetProcessHeap(), 0, p)


# ---- 7. LocalAlloc family ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 32, 1024, 32768, MiB, 32 * MiB])
def test_gl04_moveable_handle_is_pointer_slot(win32, size):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, size)
    assert h % 16 == 8
    data = slot(win32, h)
    assert data != 0 and data != h and data % 16 == 0
    heap = win32.GetProcessHeap()
    assert is_heap_block(win32, data) is True
    win32.SetLastError(SENTINEL)
    assert win32.HeapSize(heap, 0, data) == size
    assert expect_size(win32, h) == size
    expect(win32, win32.LocalFree, h, result=0)


@pytest.mark.parametrize("flags,discardable", [
    (LMEM_FIXED, False),
    (LMEM_FIXED | LMEM_DISCARDABLE, False),
    (LMEM_MOVEABLE, False),
    (LMEM_MOVEABLE | LMEM_NODISCARD, False),
    (LMEM_MOVEABLE | LMEM_DISCARDABLE, True),
    (LMEM_MOVEABLE | LMEM_DISCARDABLE | LMEM_NOCOMPACT | LMEM_NODISCARD, True),
])
def test_gl12_local_flags_bits(win32, flags, discardable):
    h = ok(win32, win32.LocalAlloc, flags, 10)
    got = expect_flags(win32, h)
    assert got & ~LMEM_DISCARDABLE == 0, f"LocalFlags = {got:#x}"
    if discardable:
        assert got != 0
    else:
        assert got == 0
    expect(win32, win32.LocalFree, h, result=0)


def test_gl14_unlock_of_fixed_block_not_locked(win32):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 100)
    expect(win32, win32.LocalUnlock, p, result=False, error=ERROR_NOT_LOCKED)
    expect(win32, win32.LocalUnlock, p, result=False, error=ERROR_NOT_LOCKED)
    assert expect_size(win32, p) == 100


def _freed_moveable(w):
    h = ok(w, w.LocalAlloc, LMEM_MOVEABLE, 32)
    expect(w, w.LocalFree, h, result=0)
    return h


@pytest.mark.parametrize("which", ["freed", "never allocated"])
def test_gl19_stale_or_bogus_moveable_handle(win32, which):
    h = _freed_moveable(win32) if which == "freed" else 0xDEADBEE0 + 8
    expect(win32, win32.LocalFree, h, result=h, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.LocalFlags, h, result=LMEM_INVALID_HANDLE, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.LocalSize, h, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.LocalLock, h, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.LocalUnlock, h, result=False, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.LocalReAlloc, h, 0, LMEM_MOVEABLE, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.LocalHandle, h, result=0, error=ERROR_INVALID_HANDLE)


def test_gl21_pointer_shaped_garbage(win32):
    v = 0xDEADBEE0
    expect(win32, win32.LocalFree, v, result=v, error=ERROR_NOACCESS)
    expect(win32, win32.LocalFlags, v, result=LMEM_INVALID_HANDLE, error=ERROR_NOACCESS)
    expect(win32, win32.LocalSize, v, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.LocalLock, v, result=0)  # last error unchanged
    expect(win32, win32.LocalUnlock, v, result=False, error=ERROR_NOT_LOCKED)
    expect(win32, win32.LocalReAlloc, v, 0, LMEM_MOVEABLE, result=0, error=ERROR_NOACCESS)
    expect(win32, win32.LocalHandle, v, result=0, error=ERROR_NOACCESS)


def test_gl31_local_cannot_make_fixed_moveable(win32):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 40)
    assert ok(win32, win32.LocalReAlloc, p, 80, LMEM_MOVEABLE | LMEM_MODIFY) == p
    assert ok(win32, win32.LocalLock, p) == p
    expect(win32, win32.LocalUnlock, p, result=False, error=ERROR_NOT_LOCKED)
    assert expect_flags(win32, p) == 0
    assert expect_size(win32, p) == 40
    assert ok(win32, win32.LocalReAlloc, p, 80, LMEM_MODIFY) == p
    q = ok(win32, win32.LocalReAlloc, p, 80, LMEM_MOVEABLE)
    assert q != p and expect_size(win32, q) == 80
    result, _ = call(win32, win32.LocalReAlloc, q, 100, LMEM_ZEROINIT)
    assert result == 0


def test_gl39_discard_of_fixed_block(win32):
    # a fixed block of the size Wine's test uses (no small-block relocation, GL-29); the
    # moveable part of GL-39 is in test_win32_moveable.py
    p = ok(win32, win32.LocalAlloc, LMEM_ZEROINIT, 200000)
    assert ok(win32, win32.LocalDiscard, p) == p
    assert ok(win32, win32.LocalDiscard, p) == p
    assert expect_size(win32, p) == 0
