"""Conformance of the LocalAlloc family of the facade (`shmheap.win32`: LocalAlloc, LocalFree,
LocalReAlloc, LocalSize, LocalLock, LocalUnlock, LocalFlags, LocalHandle, LocalDiscard) with
../shared/reference/win32_semantics.md section 7 (rows GL-*), as they apply to the Local calls.

LocalAlloc uses the caller's process heap. Moveable handles are the address of the pointer
slot of a handle-table entry: 8 mod 16, and the 8 bytes at the handle hold the data pointer
(little-endian). Failure returns 0 / False (LocalFree: the handle back; LocalFlags:
LMEM_INVALID_HANDLE) and sets GetLastError(); success leaves the last error alone unless the
row says otherwise (checked with a 0xDEADBEEF sentinel).

Rows not tested here, because they are about GlobalAlloc only: GL-03, GL-09, GL-11, GL-13,
GL-17, GL-18, GL-20, GL-22, GL-30 (GL-17's Local twin is part of GL-19).
"""

import pytest

from shmheap.constants import (
    LHND, LMEM_DISCARDABLE, LMEM_DISCARDED, LMEM_FIXED, LMEM_INVALID_HANDLE, LMEM_LOCKCOUNT,
    LMEM_MODIFY, LMEM_MOVEABLE, LMEM_NOCOMPACT, LMEM_NODISCARD, LMEM_ZEROINIT, LPTR,
)
from shmheap.errors import WinError

from win32_checks import SENTINEL, call, expect, ok, pattern

MiB = 2**20
MAX_HANDLES = 0x10000

ERROR_SUCCESS = WinError.ERROR_SUCCESS
ERROR_INVALID_HANDLE = WinError.ERROR_INVALID_HANDLE
ERROR_NOT_ENOUGH_MEMORY = WinError.ERROR_NOT_ENOUGH_MEMORY
ERROR_INVALID_PARAMETER = WinError.ERROR_INVALID_PARAMETER
ERROR_DISCARDED = WinError.ERROR_DISCARDED
ERROR_NOT_LOCKED = WinError.ERROR_NOT_LOCKED
ERROR_NOACCESS = WinError.ERROR_NOACCESS


# ---- helpers ---------------------------------------------------------------------------------


def expect_size(w, h):
    """LocalSize that succeeds (0 is a valid size): the last error must stay untouched."""
    size, error = call(w, w.LocalSize, h)
    assert error == SENTINEL, f"LocalSize({h:#x}) set the last error to {error}"
    return size


def slot(w, h):
    """The data pointer stored in a moveable handle's slot (GL-04)."""
    return int.from_bytes(w.read(h, 8), "little")


def lock_count(w, h):
    return expect_flags(w, h) & LMEM_LOCKCOUNT


def expect_flags(w, h):
    flags, error = call(w, w.LocalFlags, h)
    assert error == SENTINEL and flags != LMEM_INVALID_HANDLE, f"LocalFlags({h:#x}) failed: {error}"
    return flags


def dirty(w, size, count=2, byte=0xCC):
    """Leave freed, dirty blocks of `size` in the process heap so zero-fill checks mean
    something."""
    blocks = [ok(w, w.LocalAlloc, LMEM_FIXED, size) for _ in range(count)]
    for p in blocks:
        w.write(p, bytes([byte]) * size)
    for p in blocks:
        expect(w, w.LocalFree, p, result=0)


def is_heap_block(w, p):
    w.SetLastError(SENTINEL)
    return w.HeapValidate(w.GetProcessHeap(), 0, p)


# ---- 7. LocalAlloc family ----------------------------------------------------------------------

def test_gl01_free_and_realloc_of_null(win32):
    expect(win32, win32.LocalFree, 0, result=0)  # success, last error untouched
    result, _ = call(win32, win32.LocalReAlloc, 0, 10, LMEM_MOVEABLE)
    assert result == 0


def test_gl02_65536_moveable_handles_then_not_enough_memory(win32):
    handles = [win32.LocalAlloc(LMEM_MOVEABLE | LMEM_DISCARDABLE, 0) for _ in range(MAX_HANDLES)]
    assert all(handles), f"allocation {handles.index(0)} failed: {win32.GetLastError()}"
    assert len(set(handles)) == MAX_HANDLES
    assert all(h % 16 == 8 for h in handles)
    expect(win32, win32.LocalAlloc, LMEM_MOVEABLE | LMEM_DISCARDABLE, 0, result=0,
           error=ERROR_NOT_ENOUGH_MEMORY)
    expect(win32, win32.LocalAlloc, LMEM_MOVEABLE, 16, result=0, error=ERROR_NOT_ENOUGH_MEMORY)
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED | LMEM_DISCARDABLE, 0)  # fixed still works
    assert p % 16 == 0
    expect(win32, win32.LocalFree, p, result=0)
    expect(win32, win32.LocalFree, handles[-1], result=0)
    assert ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 16) % 16 == 8  # a freed slot serves again


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


@pytest.mark.parametrize("size", [1, 32, 1024, 32768, MiB])
def test_gl05_lock_returns_the_data_pointer(win32, size):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, size)
    p = ok(win32, win32.LocalLock, h)
    assert p == slot(win32, h) and p % 16 == 0 and p != h
    win32.write(p + size - 1, b"z")
    assert win32.LocalUnlock(h) is False


def test_gl06_lock_unlock_flags_sequence(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 256)
    p = ok(win32, win32.LocalLock, h)
    assert expect_flags(win32, h) == 1
    assert ok(win32, win32.LocalLock, h) == p
    assert expect_flags(win32, h) == 2
    assert ok(win32, win32.LocalUnlock, h) is True
    assert expect_flags(win32, h) == 1
    expect(win32, win32.LocalUnlock, h, result=False, error=ERROR_SUCCESS)
    assert expect_flags(win32, h) == 0
    expect(win32, win32.LocalUnlock, h, result=False, error=ERROR_NOT_LOCKED)
    assert ok(win32, win32.LocalHandle, p) == h


def test_gl07_lock_count_saturates_at_255(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 64)
    p = slot(win32, h)
    for i in range(256):
        assert ok(win32, win32.LocalLock, h) == p, f"lock {i + 1}"
    assert lock_count(win32, h) == 0xFF
    for i in range(254):
        assert ok(win32, win32.LocalUnlock, h) is True, f"unlock {i + 1}"
    result, _ = call(win32, win32.LocalUnlock, h)
    assert result is False
    assert lock_count(win32, h) == 0


def test_gl08_zero_size_moveable_is_discarded(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 0)
    assert h % 16 == 8
    assert expect_size(win32, h) == 0
    assert slot(win32, h) == 0
    assert expect_flags(win32, h) == LMEM_DISCARDED == 0x4000
    expect(win32, win32.LocalFree, h, result=0)


def test_gl10_lock_of_zero_size_moveable_is_discarded_error(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE | LMEM_ZEROINIT, 0)
    expect(win32, win32.LocalLock, h, result=0, error=ERROR_DISCARDED)
    h2 = ok(win32, win32.LocalAlloc, LHND, 0)
    expect(win32, win32.LocalLock, h2, result=0, error=ERROR_DISCARDED)


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


def test_gl15_zero_size_fixed_block_has_size_0(win32):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 0)
    assert p % 16 == 0
    assert expect_size(win32, p) == 0
    q = ok(win32, win32.LocalAlloc, LMEM_FIXED, 0)
    assert q != p
    expect(win32, win32.LocalFree, p, result=0)
    expect(win32, win32.LocalFree, q, result=0)


@pytest.mark.parametrize("flags", [LMEM_FIXED, LMEM_ZEROINIT, LPTR])
def test_gl16_fixed_blocks_and_zeroinit(win32, flags):
    dirty(win32, 100000)
    p = ok(win32, win32.LocalAlloc, flags, 100000)
    assert expect_size(win32, p) >= 100000
    if flags & LMEM_ZEROINIT:
        assert win32.read(p, 100000) == bytes(100000)
    assert ok(win32, win32.LocalLock, p) == p
    assert ok(win32, win32.LocalHandle, p) == p
    expect(win32, win32.LocalFree, p, result=0)


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


def test_gl23_size_accepts_the_data_pointer(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 0x123)
    p = ok(win32, win32.LocalLock, h)
    assert expect_size(win32, h) == 0x123
    assert expect_size(win32, p) == 0x123


def test_gl24_realloc_zero_size_moveable_back_and_forth(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 0)
    assert ok(win32, win32.LocalReAlloc, h, 10, LMEM_MOVEABLE) == h
    assert 10 <= expect_size(win32, h) <= 16
    assert slot(win32, h) != 0
    assert ok(win32, win32.LocalReAlloc, h, 0, LMEM_MOVEABLE) == h
    assert expect_size(win32, h) == 0 and slot(win32, h) == 0
    assert ok(win32, win32.LocalReAlloc, h, 10, LMEM_MOVEABLE) == h
    assert 10 <= expect_size(win32, h) <= 16
    expect(win32, win32.LocalFree, h, result=0)
    size, _ = call(win32, win32.LocalSize, h)
    assert size == 0


def test_gl25_modify_on_fixed_block_returns_it_unchanged(win32):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 12)
    win32.write(p, b"twelve bytes")
    assert ok(win32, win32.LocalReAlloc, p, 11, LMEM_MODIFY) == p
    assert ok(win32, win32.LocalReAlloc, p, MiB, LMEM_MODIFY) == p
    assert expect_size(win32, p) == 12
    assert win32.read(p, 12) == b"twelve bytes"


def test_gl26_realloc_small_fixed_without_moveable_fails(win32):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 12)
    expect(win32, win32.LocalReAlloc, p, 12, 0, result=0, error=ERROR_NOT_ENOUGH_MEMORY)
    assert expect_size(win32, p) == 12


@pytest.mark.parametrize("flags", [0, LMEM_MOVEABLE | LMEM_DISCARDABLE])
@pytest.mark.parametrize("size", [512, 10, 0])
def test_gl27_small_fixed_block_resizes_only_with_moveable(win32, size, flags):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 12)
    win32.write(p, b"twelve bytes")
    result, error = call(win32, win32.LocalReAlloc, p, size, flags)
    assert result == 0
    assert error != SENTINEL, "the failure set no last error"
    assert expect_size(win32, p) == 12 and win32.read(p, 12) == b"twelve bytes"


@pytest.mark.parametrize("size", [13, 512, 10, 0])
def test_gl28_small_fixed_block_relocates_with_moveable(win32, size):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 12)
    win32.write(p, b"twelve bytes")
    q = ok(win32, win32.LocalReAlloc, p, size, LMEM_MOVEABLE)
    assert q != p and q % 16 == 0
    assert ok(win32, win32.LocalLock, q) == q  # still fixed
    assert expect_flags(win32, q) == 0
    assert expect_size(win32, q) == size
    assert win32.read(q, min(size, 12)) == b"twelve bytes"[:size]


@pytest.mark.parametrize("flags", [0, LMEM_MOVEABLE])
def test_gl29_big_fixed_block_resizes_in_place(win32, flags):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 0x20000)
    data = pattern(0x20000)
    win32.write(p, data)
    assert ok(win32, win32.LocalReAlloc, p, 0x20200, flags) == p
    assert expect_size(win32, p) == 0x20200
    assert win32.read(p, 0x20000) == data
    assert ok(win32, win32.LocalReAlloc, p, 10, flags) == p
    assert expect_size(win32, p) == 10 and win32.read(p, 10) == data[:10]
    assert ok(win32, win32.LocalReAlloc, p, 0, flags) == p
    assert expect_size(win32, p) == 0


@pytest.mark.parametrize("flags", [LMEM_DISCARDABLE, LMEM_MOVEABLE | LMEM_DISCARDABLE])
def test_gl29_discardable_without_modify_fails(win32, flags):
    p = ok(win32, win32.LocalAlloc, LMEM_FIXED, 0x20000)
    for size in (0x20200, 10, 0):
        result, error = call(win32, win32.LocalReAlloc, p, size, flags)
        assert result == 0 and error != SENTINEL
        assert expect_size(win32, p) == 0x20000


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


def test_gl32_locked_block_moves_with_moveable(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 12)
    p = ok(win32, win32.LocalLock, h)
    win32.write(p, b"twelve bytes")
    assert ok(win32, win32.LocalReAlloc, h, 512, LMEM_MOVEABLE) == h
    q = slot(win32, h)
    assert q != p and q != 0
    assert lock_count(win32, h) == 1
    assert expect_size(win32, h) == 512
    assert win32.read(q, 12) == b"twelve bytes"
    expect(win32, win32.LocalUnlock, h, result=False, error=ERROR_SUCCESS)


def test_gl33_locked_block_without_moveable(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 12)
    p = ok(win32, win32.LocalLock, h)
    win32.write(p, b"twelve bytes")
    result, error = call(win32, win32.LocalReAlloc, h, 512, 0)
    assert result == 0 and error != SENTINEL
    assert slot(win32, h) == p and expect_size(win32, h) == 12
    assert ok(win32, win32.LocalReAlloc, h, 10, 0) == h
    assert slot(win32, h) == p and expect_size(win32, h) == 10
    assert ok(win32, win32.LocalReAlloc, h, 10, LMEM_MOVEABLE) == h
    assert slot(win32, h) == p and expect_size(win32, h) == 10
    for flags in (0, LMEM_MOVEABLE):
        result, error = call(win32, win32.LocalReAlloc, h, 0, flags)
        assert result == 0 and error != SENTINEL  # a locked block cannot be discarded
        assert slot(win32, h) == p and expect_size(win32, h) == 10
    assert lock_count(win32, h) == 1
    assert win32.read(p, 10) == b"twelve byt"


@pytest.mark.parametrize("locked", [False, True])
def test_gl33_discardable_without_modify_fails_on_moveable(win32, locked):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 12)
    if locked:
        ok(win32, win32.LocalLock, h)
    for flags in (LMEM_DISCARDABLE, LMEM_MOVEABLE | LMEM_DISCARDABLE):
        expect(win32, win32.LocalReAlloc, h, 20, flags, result=0, error=ERROR_INVALID_PARAMETER)
    assert expect_size(win32, h) == 12


def test_gl34_modify_on_moveable_changes_flags_only(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 12)
    p = ok(win32, win32.LocalLock, h)
    win32.write(p, b"twelve bytes")
    for size in (0, 11, 512, MiB):
        assert ok(win32, win32.LocalReAlloc, h, size, LMEM_MODIFY) == h
        assert ok(win32, win32.LocalReAlloc, h, size, LMEM_MODIFY | LMEM_MOVEABLE) == h
    assert slot(win32, h) == p and expect_size(win32, h) == 12
    assert expect_flags(win32, h) == 1
    assert ok(win32, win32.LocalReAlloc, h, 99, LMEM_MODIFY | LMEM_DISCARDABLE) == h
    flags = expect_flags(win32, h)
    assert flags & LMEM_DISCARDABLE and flags & ~LMEM_DISCARDABLE == 1
    assert slot(win32, h) == p and expect_size(win32, h) == 12
    assert win32.read(p, 12) == b"twelve bytes"


@pytest.mark.parametrize("flags", [0, LMEM_MOVEABLE])
def test_gl35_unlocked_moveable_block_may_move(win32, flags):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 12)
    p = slot(win32, h)
    win32.write(p, b"twelve bytes")
    assert ok(win32, win32.LocalReAlloc, h, 512, flags) == h
    q = slot(win32, h)
    assert q != p and expect_size(win32, h) == 512
    assert win32.read(q, 12) == b"twelve bytes"
    assert ok(win32, win32.LocalReAlloc, h, 10, flags) == h
    assert slot(win32, h) == q and expect_size(win32, h) == 10
    assert win32.read(q, 10) == b"twelve byt"


def test_gl36_zero_size_moveable_realloc_discards(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 64)
    p = slot(win32, h)
    assert ok(win32, win32.LocalReAlloc, h, 0, LMEM_MOVEABLE) == h
    assert expect_size(win32, h) == 0
    assert slot(win32, h) == 0
    assert expect_flags(win32, h) & LMEM_DISCARDED
    expect(win32, win32.LocalLock, h, result=0, error=ERROR_DISCARDED)
    assert is_heap_block(win32, p) is False  # the data block went back to the heap
    h2 = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 64)
    q = slot(win32, h2)
    win32.write(q, b"x" * 64)
    result, error = call(win32, win32.LocalReAlloc, h2, 0, 0)
    assert result == 0 and error != SENTINEL
    assert slot(win32, h2) == q and expect_size(win32, h2) == 64
    assert expect_flags(win32, h2) & LMEM_DISCARDED == 0
    assert ok(win32, win32.LocalDiscard, h2) == h2  # the LocalDiscard macro does the same
    assert expect_size(win32, h2) == 0 and expect_flags(win32, h2) & LMEM_DISCARDED


def test_gl37_moveable_zeroinit_growth(win32):
    dirty(win32, 200000)
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE | LMEM_ZEROINIT, 100000)
    p = slot(win32, h)
    assert win32.read(p, 100000) == bytes(100000)
    data = pattern(100000)
    win32.write(p, data)
    dirty(win32, 200000)
    assert ok(win32, win32.LocalReAlloc, h, 200000, LMEM_MOVEABLE | LMEM_ZEROINIT) == h
    assert expect_size(win32, h) >= 200000
    q = slot(win32, h)
    assert win32.read(q, 100000) == data
    assert win32.read(q + 100000, 100000) == bytes(100000)


def test_gl38_handle_of_locked_pointer_and_plain_heap_block(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 40)
    assert ok(win32, win32.LocalHandle, ok(win32, win32.LocalLock, h)) == h
    p = ok(win32, win32.HeapAlloc, win32.GetProcessHeap(), 0, 16)
    assert ok(win32, win32.LocalHandle, p) == p
    f = ok(win32, win32.LocalAlloc, LMEM_FIXED, 16)
    assert ok(win32, win32.LocalHandle, f) == f


def test_gl39_discard_of_locked_then_unlocked(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 32)
    ok(win32, win32.LocalLock, h)
    result, _ = call(win32, win32.LocalDiscard, h)
    assert result == 0
    assert expect_size(win32, h) == 32
    expect(win32, win32.LocalUnlock, h, result=False, error=ERROR_SUCCESS)
    assert ok(win32, win32.LocalDiscard, h) == h
    assert expect_size(win32, h) == 0
    expect(win32, win32.LocalFree, h, result=0)
    # a fixed block of the size Wine's test uses (no small-block relocation, GL-29)
    p = ok(win32, win32.LocalAlloc, LMEM_ZEROINIT, 200000)
    assert ok(win32, win32.LocalDiscard, p) == p
    assert ok(win32, win32.LocalDiscard, p) == p
    assert expect_size(win32, p) == 0


def test_gl40_free_of_locked_moveable_block(win32):
    h = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 48)
    p = ok(win32, win32.LocalLock, h)
    ok(win32, win32.LocalLock, h)
    expect(win32, win32.LocalFree, h, result=0)
    expect(win32, win32.LocalFlags, h, result=LMEM_INVALID_HANDLE, error=ERROR_INVALID_HANDLE)
    assert is_heap_block(win32, p) is False
