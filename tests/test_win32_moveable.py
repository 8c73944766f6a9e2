"""Conformance of the LocalAlloc and GlobalAlloc families of the facade (`shmheap.win32`) with
the GL-* rows of ../shared/reference/win32_semantics.md section 7 that hold for both, each
test run once per family (fixture `m`, see moveable_checks.Api). Where a row's expected value
differs between the families, the Api says which (GL-15, GL-34, GL-38, and where a freed data
block is looked for in GL-36 and GL-40).

Rows for one family only, and the cross-process tests, are in test_win32_local.py and
test_win32_global.py. Failure returns 0 / False (Free: the handle back; Flags:
INVALID_HANDLE) and sets GetLastError(); success leaves the last error alone unless the row
says otherwise (checked with a 0xDEADBEEF sentinel).
"""

import pytest

from shmheap.errors import WinError

from moveable_checks import FLAVORS
from win32_checks import SENTINEL, call, expect, ok, pattern

MiB = 2**20
MAX_HANDLES = 0x10000

(ERROR_SUCCESS, ERROR_INVALID_HANDLE, ERROR_NOT_ENOUGH_MEMORY, ERROR_INVALID_PARAMETER,
 ERROR_DISCARDED, ERROR_NOT_LOCKED) = (
    WinError.ERROR_SUCCESS, WinError.ERROR_INVALID_HANDLE, WinError.ERROR_NOT_ENOUGH_MEMORY,
    WinError.ERROR_INVALID_PARAMETER, WinError.ERROR_DISCARDED, WinError.ERROR_NOT_LOCKED)


@pytest.fixture(params=FLAVORS, ids=str)
def m(request, win32):
    """The family under test, bound to this test's facade (m.Alloc, m.MOVEABLE, m.size(h)...)."""
    return request.param.bind(win32)


def test_gl01_free_and_realloc_of_null(win32, m):
    expect(win32, m.Free, 0, result=0)  # success, last error untouched
    result, _ = call(win32, m.ReAlloc, 0, 10, m.MOVEABLE)
    assert result == 0


def test_gl02_65536_moveable_handles_then_not_enough_memory(win32, m):
    handles = [m.Alloc(m.MOVEABLE | m.DISCARDABLE, 0) for _ in range(MAX_HANDLES)]
    assert all(handles), f"allocation {handles.index(0)} failed: {win32.GetLastError()}"
    assert len(set(handles)) == MAX_HANDLES
    assert all(h % 16 == 8 for h in handles)
    expect(win32, m.Alloc, m.MOVEABLE | m.DISCARDABLE, 0, result=0, error=ERROR_NOT_ENOUGH_MEMORY)
    expect(win32, m.Alloc, m.MOVEABLE, 16, result=0, error=ERROR_NOT_ENOUGH_MEMORY)
    p = ok(win32, m.Alloc, m.FIXED | m.DISCARDABLE, 0)  # fixed still works
    assert p % 16 == 0
    expect(win32, m.Free, p, result=0)
    expect(win32, m.Free, handles[-1], result=0)
    assert ok(win32, m.Alloc, m.MOVEABLE, 16) % 16 == 8  # a freed slot serves again


@pytest.mark.parametrize("size", [1, 32, 1024, 32768, MiB])
def test_gl05_lock_returns_the_data_pointer(win32, m, size):
    h = ok(win32, m.Alloc, m.MOVEABLE, size)
    p = ok(win32, m.Lock, h)
    assert p == m.slot(h) and p % 16 == 0 and p != h
    win32.write(p + size - 1, b"z")
    assert win32.read(p + size - 1, 1) == b"z"
    expect(win32, m.Unlock, h, result=False, error=ERROR_SUCCESS)


def test_gl06_lock_unlock_flags_sequence(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 256)
    p = ok(win32, m.Lock, h)
    assert m.flags(h) == 1
    assert ok(win32, m.Lock, h) == p
    assert m.flags(h) == 2
    assert ok(win32, m.Unlock, h) is True
    assert m.flags(h) == 1
    expect(win32, m.Unlock, h, result=False, error=ERROR_SUCCESS)
    assert m.flags(h) == 0
    expect(win32, m.Unlock, h, result=False, error=ERROR_NOT_LOCKED)
    assert ok(win32, m.Handle, p) == h


def test_gl07_lock_count_saturates_at_255(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 64)
    p = m.slot(h)
    for i in range(256):
        assert ok(win32, m.Lock, h) == p, f"lock {i + 1}"
    assert m.lock_count(h) == 0xFF
    for i in range(254):
        assert ok(win32, m.Unlock, h) is True, f"unlock {i + 1}"
    expect(win32, m.Unlock, h, result=False, error=ERROR_SUCCESS)
    assert m.lock_count(h) == 0


def test_gl08_zero_size_moveable_is_discarded(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 0)
    assert h % 16 == 8
    assert m.size(h) == 0
    assert m.slot(h) == 0
    assert m.flags(h) == m.DISCARDED == 0x4000
    expect(win32, m.Free, h, result=0)


@pytest.mark.parametrize("hnd", [False, True], ids=["MOVEABLE|ZEROINIT", "HND"])
def test_gl10_lock_of_zero_size_moveable_is_discarded_error(win32, m, hnd):
    h = ok(win32, m.Alloc, m.HND if hnd else m.MOVEABLE | m.ZEROINIT, 0)
    expect(win32, m.Lock, h, result=0, error=ERROR_DISCARDED)
    assert m.lock_count(h) == 0


def test_gl15_zero_size_fixed_block_size(win32, m):
    p = ok(win32, m.Alloc, m.FIXED, 0)
    assert p % 16 == 0
    assert m.size(p) == m.zero_size_fixed  # Local: 0, Global: 1
    q = ok(win32, m.Alloc, m.FIXED, 0)
    assert q != p
    expect(win32, m.Free, p, result=0)
    expect(win32, m.Free, q, result=0)


@pytest.mark.parametrize("kind", ["FIXED", "ZEROINIT", "PTR"])
def test_gl16_fixed_blocks_and_zeroinit(win32, m, kind):
    flags = getattr(m, kind)
    m.dirty(100000)
    p = ok(win32, m.Alloc, flags, 100000)
    assert m.size(p) >= 100000
    if flags & m.ZEROINIT:
        assert win32.read(p, 100000) == bytes(100000)
    assert ok(win32, m.Lock, p) == p
    assert ok(win32, m.Handle, p) == p
    expect(win32, m.Free, p, result=0)


def test_gl23_size_accepts_the_data_pointer(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 0x123)
    p = ok(win32, m.Lock, h)
    assert m.size(h) == 0x123
    assert m.size(p) == 0x123


def test_gl24_realloc_zero_size_moveable_back_and_forth(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 0)
    assert ok(win32, m.ReAlloc, h, 10, m.MOVEABLE) == h
    assert 10 <= m.size(h) <= 16
    assert m.slot(h) != 0
    assert ok(win32, m.ReAlloc, h, 0, m.MOVEABLE) == h
    assert m.size(h) == 0 and m.slot(h) == 0
    assert ok(win32, m.ReAlloc, h, 10, m.MOVEABLE) == h
    assert 10 <= m.size(h) <= 16
    expect(win32, m.Free, h, result=0)
    size, _ = call(win32, m.Size, h)
    assert size == 0


def test_gl25_modify_on_fixed_block_returns_it_unchanged(win32, m):
    p = ok(win32, m.Alloc, m.FIXED, 12)
    win32.write(p, b"twelve bytes")
    assert ok(win32, m.ReAlloc, p, 11, m.MODIFY) == p
    assert ok(win32, m.ReAlloc, p, MiB, m.MODIFY) == p
    assert m.size(p) == 12
    assert win32.read(p, 12) == b"twelve bytes"
    assert m.flags(p) == 0


def test_gl26_realloc_small_fixed_without_moveable_fails(win32, m):
    p = ok(win32, m.Alloc, m.FIXED, 12)
    expect(win32, m.ReAlloc, p, 12, 0, result=0, error=ERROR_NOT_ENOUGH_MEMORY)
    assert m.size(p) == 12


@pytest.mark.parametrize("discardable", [False, True], ids=["0", "MOVEABLE|DISCARDABLE"])
@pytest.mark.parametrize("size", [512, 10, 0])
def test_gl27_small_fixed_block_resizes_only_with_moveable(win32, m, size, discardable):
    flags = m.MOVEABLE | m.DISCARDABLE if discardable else 0
    p = ok(win32, m.Alloc, m.FIXED, 12)
    win32.write(p, b"twelve bytes")
    result, error = call(win32, m.ReAlloc, p, size, flags)
    assert result == 0
    assert error != SENTINEL, "the failure set no last error"
    assert m.size(p) == 12 and win32.read(p, 12) == b"twelve bytes"


@pytest.mark.parametrize("size", [13, 512, 10, 0])
def test_gl28_small_fixed_block_relocates_with_moveable(win32, m, size):
    p = ok(win32, m.Alloc, m.FIXED, 12)
    win32.write(p, b"twelve bytes")
    q = ok(win32, m.ReAlloc, p, size, m.MOVEABLE)
    assert q != p and q % 16 == 0
    assert ok(win32, m.Lock, q) == q  # still fixed
    assert m.flags(q) == 0
    assert m.size(q) == size
    assert win32.read(q, min(size, 12)) == b"twelve bytes"[:size]
    expect(win32, m.Free, q, result=0)


@pytest.mark.parametrize("sizes", [[0x20200, 10], [0x20200, 10, 0]], ids=["to-10", "to-0"])
@pytest.mark.parametrize("moveable", [False, True], ids=["0", "MOVEABLE"])
def test_gl29_big_fixed_block_resizes_in_place(win32, m, moveable, sizes):
    flags = m.MOVEABLE if moveable else 0
    p = ok(win32, m.Alloc, m.FIXED, 0x20000)
    data = pattern(0x20000)
    win32.write(p, data)
    for size in sizes:
        assert ok(win32, m.ReAlloc, p, size, flags) == p, f"size {size:#x}"
        assert m.size(p) == size
        assert win32.read(p, min(size, 0x20000)) == data[:size]


@pytest.mark.parametrize("moveable", [False, True], ids=["DISCARDABLE", "MOVEABLE|DISCARDABLE"])
def test_gl29_discardable_without_modify_fails(win32, m, moveable):
    flags = m.DISCARDABLE | (m.MOVEABLE if moveable else 0)
    p = ok(win32, m.Alloc, m.FIXED, 0x20000)
    for size in (0x20200, 10, 0):
        result, error = call(win32, m.ReAlloc, p, size, flags)
        assert result == 0 and error != SENTINEL
        assert m.size(p) == 0x20000


def test_gl32_locked_block_moves_with_moveable(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 12)
    p = ok(win32, m.Lock, h)
    win32.write(p, b"twelve bytes")
    assert ok(win32, m.ReAlloc, h, 512, m.MOVEABLE) == h
    q = m.slot(h)
    assert q != p and q != 0
    assert m.lock_count(h) == 1
    assert m.size(h) == 512
    assert win32.read(q, 12) == b"twelve bytes"
    expect(win32, m.Unlock, h, result=False, error=ERROR_SUCCESS)


def test_gl33_locked_block_without_moveable(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 12)
    p = ok(win32, m.Lock, h)
    win32.write(p, b"twelve bytes")
    result, error = call(win32, m.ReAlloc, h, 512, 0)
    assert result == 0 and error != SENTINEL
    assert m.slot(h) == p and m.size(h) == 12
    assert ok(win32, m.ReAlloc, h, 10, 0) == h
    assert m.slot(h) == p and m.size(h) == 10
    assert ok(win32, m.ReAlloc, h, 10, m.MOVEABLE) == h
    assert m.slot(h) == p and m.size(h) == 10
    for flags in (0, m.MOVEABLE):
        result, error = call(win32, m.ReAlloc, h, 0, flags)
        assert result == 0 and error != SENTINEL  # a locked block cannot be discarded
        assert m.slot(h) == p and m.size(h) == 10
    assert m.lock_count(h) == 1
    assert win32.read(p, 10) == b"twelve byt"


@pytest.mark.parametrize("locked", [False, True])
def test_gl33_discardable_without_modify_fails_on_moveable(win32, m, locked):
    h = ok(win32, m.Alloc, m.MOVEABLE, 12)
    if locked:
        ok(win32, m.Lock, h)
    for flags in (m.DISCARDABLE, m.MOVEABLE | m.DISCARDABLE):
        expect(win32, m.ReAlloc, h, 20, flags, result=0, error=ERROR_INVALID_PARAMETER)
    assert m.size(h) == 12
    assert m.flags(h) & m.DISCARDABLE == 0


def test_gl34_modify_on_moveable_changes_flags_only(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 12)
    p = ok(win32, m.Lock, h)
    win32.write(p, b"twelve bytes")
    for size in (0, 11, 512, MiB):
        assert ok(win32, m.ReAlloc, h, size, m.MODIFY) == h
        assert ok(win32, m.ReAlloc, h, size, m.MODIFY | m.MOVEABLE) == h
    assert m.slot(h) == p and m.size(h) == 12
    assert m.flags(h) == 1
    assert ok(win32, m.ReAlloc, h, 99, m.MODIFY | m.DISCARDABLE) == h
    flags = m.flags(h)
    assert flags & m.DISCARDABLE and flags & ~m.DISCARDABLE == 1
    if m.exact_discardable is not None:
        assert flags == m.exact_discardable | 1
    assert m.slot(h) == p and m.size(h) == 12
    assert win32.read(p, 12) == b"twelve bytes"


@pytest.mark.parametrize("moveable", [False, True], ids=["0", "MOVEABLE"])
def test_gl35_unlocked_moveable_block_may_move(win32, m, moveable):
    flags = m.MOVEABLE if moveable else 0
    h = ok(win32, m.Alloc, m.MOVEABLE, 12)
    p = m.slot(h)
    m.poke(h, b"twelve bytes")
    assert ok(win32, m.ReAlloc, h, 512, flags) == h
    q = m.slot(h)
    assert q != p and m.size(h) == 512
    assert m.peek(h, 12) == b"twelve bytes"
    assert ok(win32, m.ReAlloc, h, 10, flags) == h
    assert m.slot(h) == q and m.size(h) == 10
    assert m.peek(h, 10) == b"twelve byt"


def test_gl36_zero_size_moveable_realloc_discards(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 64)
    p = m.slot(h)
    assert ok(win32, m.ReAlloc, h, 0, m.MOVEABLE) == h
    assert m.size(h) == 0
    assert m.slot(h) == 0
    assert m.flags(h) & m.DISCARDED
    expect(win32, m.Lock, h, result=0, error=ERROR_DISCARDED)
    assert m.data_freed(p)  # the data block went back to the heap
    h2 = ok(win32, m.Alloc, m.MOVEABLE, 64)
    q = m.slot(h2)
    m.poke(h2, b"x" * 64)
    result, error = call(win32, m.ReAlloc, h2, 0, 0)
    assert result == 0 and error != SENTINEL
    assert m.slot(h2) == q and m.size(h2) == 64
    assert m.flags(h2) & m.DISCARDED == 0
    assert ok(win32, m.Discard, h2) == h2  # the Discard macro does the same
    assert m.size(h2) == 0 and m.flags(h2) & m.DISCARDED


def test_gl37_moveable_zeroinit_growth(win32, m):
    m.dirty(200000)
    h = ok(win32, m.Alloc, m.MOVEABLE | m.ZEROINIT, 100000)
    assert m.peek(h, 100000) == bytes(100000)
    data = pattern(100000)
    m.poke(h, data)
    m.dirty(200000)
    assert ok(win32, m.ReAlloc, h, 200000, m.MOVEABLE | m.ZEROINIT) == h
    assert m.size(h) >= 200000
    assert m.peek(h, 100000) == data
    assert m.peek(h, 100000, offset=100000) == bytes(100000)


def test_gl38_handle_of_locked_pointer_and_plain_heap_block(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 40)
    assert ok(win32, m.Handle, ok(win32, m.Lock, h)) == h
    f = ok(win32, m.Alloc, m.FIXED, 16)
    assert ok(win32, m.Handle, f) == f
    p = ok(win32, win32.HeapAlloc, win32.GetProcessHeap(), 0, 16)
    if m.heap_blocks_are_objects:
        assert ok(win32, m.Handle, p) == p
    else:
        # A process-heap block is no global object here (GlobalAlloc does not use the process
        # heap): it is a pointer that names no object, with GL-20's result.
        expect(win32, m.Handle, p, result=0, error=ERROR_INVALID_HANDLE)


def test_gl39_discard_of_locked_then_unlocked(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 32)
    ok(win32, m.Lock, h)
    result, _ = call(win32, m.Discard, h)
    assert result == 0
    assert m.size(h) == 32
    expect(win32, m.Unlock, h, result=False, error=ERROR_SUCCESS)
    assert ok(win32, m.Discard, h) == h
    assert m.size(h) == 0
    expect(win32, m.Free, h, result=0)


def test_gl40_free_of_locked_moveable_block(win32, m):
    h = ok(win32, m.Alloc, m.MOVEABLE, 48)
    p = ok(win32, m.Lock, h)
    ok(win32, m.Lock, h)
    expect(win32, m.Free, h, result=0)
    expect(win32, m.Flags, h, result=m.INVALID_HANDLE, error=ERROR_INVALID_HANDLE)
    assert m.data_freed(p)  # its data went too


def test_the_handle_table_itself_is_no_object(win32, m):
    """The pointer slots of moveable handles live in a heap block of the table's own. Handed
    to the family's calls that block names no object: freeing it would free every live handle
    with it (the fuzz test found GlobalFree doing just that)."""
    h = ok(win32, m.Alloc, m.MOVEABLE, 32)
    win32.write(ok(win32, m.Lock, h), b"still here")
    table = (h & m.address_mask) - 8  # the first handle of a fresh table is its first slot
    expect(win32, m.Free, table, result=table, error=ERROR_INVALID_HANDLE)
    expect(win32, m.Size, table, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, m.Flags, table, result=m.INVALID_HANDLE, error=ERROR_INVALID_HANDLE)
    expect(win32, m.Handle, table, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, m.Lock, table, result=0, error=ERROR_INVALID_HANDLE)
    others = [ok(win32, m.Alloc, m.MOVEABLE, 32) for _ in range(4)]  # nothing reuses the slots
    assert len({h, *others}) == 5
    assert win32.read(ok(win32, m.Lock, h), 10) == b"still here"
