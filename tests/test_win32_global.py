"""Conformance of the GlobalAlloc family of the facade (`shmheap.win32`: GlobalAlloc, GlobalFree,
GlobalReAlloc, GlobalSize, GlobalLock, GlobalUnlock, GlobalFlags, GlobalHandle, GlobalDiscard,
GlobalCompact) with ../shared/reference/win32_semantics.md section 7 (rows GL-*) as they apply
to the Global calls, and with the contract's "Global memory" section (../shared/DESIGN.md):
global objects live in the daemon's global heap, their handles work in every connected process,
lock counts are the same everywhere, stale handles are detected and never aliased, an object
dies with its allocator unless GMEM_DDESHARE, and GlobalCompact moves unlocked moveable objects.

Global handles are stamped: a generation count sits above bit 48, so `h & ADDRESS_MASK` is the
address of the pointer slot (8 mod 16) and the 8 bytes there hold the data pointer. Fixed
objects have handle == pointer (0 mod 16). Failure returns 0 / FALSE (GlobalFree: the handle
back; GlobalFlags: GMEM_INVALID_HANDLE) and sets GetLastError(); success leaves the last error
alone unless the row says otherwise (checked with a 0xDEADBEEF sentinel).

Only the rows, or parts of rows, that are about GlobalAlloc alone are here, with the
cross-process tests; the rows common to GlobalAlloc and LocalAlloc run against both in
test_win32_moveable.py. Rows that do not apply here: GL-12, GL-14, GL-19, GL-21, GL-31 (Local only). Parts of rows
that rest on Global and Local sharing the process heap and one handle table, which the design
deliberately departs from (GlobalAlloc uses the daemon's global heap, LocalAlloc the process
heap): GL-02's "one more LocalAlloc fails", GL-03's HeapValidate(GetProcessHeap()), GL-04's
HeapSize on the process heap (GlobalSize is checked instead), GL-38's GlobalHandle of a
process-heap block (here: not a global object, so GL-20's result), GL-39's LocalDiscard.

Multi-process tests run real processes (multiprocessing, spawn) that serve Win32 calls over a
pipe (`Peer`), so each step's result and last error can be checked from the test.
"""


import pytest

from shmheap.constants import (
    GMEM_DDESHARE, GMEM_DISCARDABLE, GMEM_DISCARDED, GMEM_FIXED, GMEM_INVALID_HANDLE, GMEM_LOWER,
    GMEM_MODIFY, GMEM_MOVEABLE, GMEM_NOCOMPACT, GMEM_NODISCARD, GMEM_NOT_BANKED, GMEM_NOTIFY,
    GMEM_SHARE, GMEM_ZEROINIT, GPTR,
)
from shmheap.errors import WinError

from moveable_checks import GLOBAL, STAMP_SHIFT
from win32_checks import SENTINEL, call, expect, ok, pattern

from conftest import wait_until

GARBAGE = 0xDEADBEE0  # pointer-shaped, never memory of ours (GL-20)
MiB = 2**20
MAX_HANDLES = 0x10000
ADDRESS_MASK = GLOBAL.address_mask

ERROR_SUCCESS = WinError.ERROR_SUCCESS
ERROR_INVALID_HANDLE = WinError.ERROR_INVALID_HANDLE
ERROR_DISCARDED = WinError.ERROR_DISCARDED
ERROR_NOT_LOCKED = WinError.ERROR_NOT_LOCKED
ERROR_NOACCESS = WinError.ERROR_NOACCESS


# ---- helpers ---------------------------------------------------------------------------------


expect_size, expect_flags = GLOBAL.expect_size, GLOBAL.expect_flags
lock_count, slot = GLOBAL.lock_count, GLOBAL.slot  # the slot is the handle without its stamp


def peek(w, h, size):
    """An object's data, reached as a program must: lock, read, unlock (a process touches
    global memory only while it holds it; an unlocked moveable object's data may move)."""
    pointer = ok(w, w.GlobalLock, h)
    try:
        return w.read(pointer, size)
    finally:
        w.GlobalUnlock(h)


def moveable_with(w, data, flags=GMEM_MOVEABLE):
    """A moveable object holding `data`, unlocked."""
    h = ok(w, w.GlobalAlloc, flags, len(data))
    w.write(ok(w, w.GlobalLock, h), data)
    expect(w, w.GlobalUnlock, h, result=False, error=ERROR_SUCCESS)
    return h


# ---- 7. GlobalAlloc family: single-process conformance -----------------------------------------

@pytest.mark.parametrize("size", [1, 32, 1024, 32768, MiB, 32 * MiB])
def test_gl03_fixed_object_is_its_data_pointer(win32, size):
    p = ok(win32, win32.GlobalAlloc, GMEM_FIXED, size)
    assert p % 16 == 0
    assert expect_size(win32, p) >= size
    win32.write(p + size - 1, b"z")  # the whole object is usable memory
    assert ok(win32, win32.GlobalLock, p) == p
    assert ok(win32, win32.GlobalHandle, p) == p
    assert expect_flags(win32, p) == 0
    expect(win32, win32.GlobalFree, p, result=0)


@pytest.mark.parametrize("size", [1, 32, 1024, 32768, MiB, 32 * MiB])
def test_gl04_moveable_handle_is_stamped_pointer_slot(win32, size):
    h = ok(win32, win32.GlobalAlloc, GMEM_MOVEABLE, size)
    assert h % 16 == 8
    assert h >> STAMP_SHIFT != 0, "a global handle carries its slot's generation"
    data = slot(win32, h)
    assert data != 0 and data != h and data != h & ADDRESS_MASK and data % 16 == 0
    assert expect_size(win32, h) == size
    assert expect_size(win32, data) == size
    expect(win32, win32.GlobalFree, h, result=0)


@pytest.mark.parametrize("flags,size,expected", [
    (GMEM_MOVEABLE | GMEM_DISCARDABLE, 0, 0x4100),
    (GMEM_MOVEABLE | GMEM_DISCARDABLE, 1, 0x0100),
    (GMEM_MOVEABLE | GMEM_DISCARDABLE | GMEM_DDESHARE, 1, 0x2100),
])
def test_gl09_flags_of_discardable_and_shared(win32, flags, size, expected):
    h = ok(win32, win32.GlobalAlloc, flags, size)
    assert expect_flags(win32, h) == expected
    expect(win32, win32.GlobalFree, h, result=0)


@pytest.mark.parametrize("flags,expected", [
    (GMEM_FIXED | GMEM_NOTIFY, 0),
    (GMEM_FIXED | GMEM_DISCARDABLE, 0),
    (GMEM_MOVEABLE | GMEM_NOTIFY, 0),
    (GMEM_MOVEABLE | GMEM_DDESHARE, GMEM_DDESHARE),
    (GMEM_MOVEABLE | GMEM_NOT_BANKED, 0),
    (GMEM_MOVEABLE | GMEM_NODISCARD, 0),
    (GMEM_MOVEABLE | GMEM_DISCARDABLE, GMEM_DISCARDABLE),
    (GMEM_MOVEABLE | GMEM_DDESHARE | GMEM_DISCARDABLE | GMEM_LOWER | GMEM_NOCOMPACT
     | GMEM_NODISCARD | GMEM_NOT_BANKED | GMEM_NOTIFY, GMEM_DDESHARE | GMEM_DISCARDABLE),
])
def test_gl11_obsolete_flags(win32, flags, expected):
    h = ok(win32, win32.GlobalAlloc, flags, 4)
    assert expect_flags(win32, h) == expected
    expect(win32, win32.GlobalFree, h, result=0)


@pytest.mark.parametrize("flags", [GMEM_FIXED, GMEM_DDESHARE])
def test_gl13_unlock_of_fixed_object_is_true(win32, flags):
    p = ok(win32, win32.GlobalAlloc, flags, 100)
    expect(win32, win32.GlobalUnlock, p, result=True)  # last error unchanged
    expect(win32, win32.GlobalUnlock, p, result=True)
    assert expect_flags(win32, p) == 0
    assert expect_size(win32, p) >= 100


def test_gl17_double_free_of_moveable(win32):
    h = ok(win32, win32.GlobalAlloc, GMEM_MOVEABLE, 32)
    expect(win32, win32.GlobalFree, h, result=0)
    expect(win32, win32.GlobalFree, h, result=h, error=ERROR_INVALID_HANDLE)


def _freed_moveable(w):
    h = ok(w, w.GlobalAlloc, GMEM_MOVEABLE, 32)
    expect(w, w.GlobalFree, h, result=0)
    return h


def _check_invalid_moveable_handle(expect_fn, h):
    """GL-18's results for a freed (or never allocated, handle-shaped) moveable handle."""
    expect_fn("GlobalFlags", h, result=GMEM_INVALID_HANDLE, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalSize", h, result=0, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalLock", h, result=0, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalUnlock", h, result=True, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalReAlloc", h, 0, GMEM_MOVEABLE, result=0, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalReAlloc", h, 64, GMEM_MOVEABLE, result=0, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalHandle", h, result=0, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalFree", h, result=h, error=ERROR_INVALID_HANDLE)


def _check_garbage_pointer(expect_fn, v):
    """GL-20's results for a pointer-shaped value that is no object."""
    expect_fn("GlobalFree", v, result=v, error=ERROR_NOACCESS)
    expect_fn("GlobalFlags", v, result=GMEM_INVALID_HANDLE, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalSize", v, result=0, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalLock", v, result=0, error=ERROR_INVALID_HANDLE)
    expect_fn("GlobalUnlock", v, result=True)  # last error unchanged
    expect_fn("GlobalReAlloc", v, 0, GMEM_MOVEABLE, result=0, error=ERROR_NOACCESS)
    expect_fn("GlobalHandle", v, result=0, error=ERROR_INVALID_HANDLE)


def _local_expect(w):
    return lambda name, *args, **kw: expect(w, getattr(w, name), *args, **kw)


@pytest.mark.parametrize("which", ["freed", "never allocated"])
def test_gl18_stale_or_bogus_moveable_handle(win32, which):
    h = _freed_moveable(win32) if which == "freed" else GARBAGE + 8
    _check_invalid_moveable_handle(_local_expect(win32), h)


def test_gl20_pointer_shaped_garbage(win32):
    _check_garbage_pointer(_local_expect(win32), GARBAGE)


@pytest.mark.parametrize("size", [100, 4096, 20000, 100000])
@pytest.mark.parametrize("flags", [GMEM_FIXED, GMEM_DDESHARE])
def test_gl22_double_free_of_fixed(win32, flags, size):
    p = ok(win32, win32.GlobalAlloc, flags, size)
    expect(win32, win32.GlobalFree, p, result=0)
    expect(win32, win32.GlobalSize, p, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.GlobalFree, p, result=p, error=ERROR_INVALID_HANDLE)


@pytest.mark.parametrize("flags", [GMEM_FIXED, GMEM_DDESHARE])
def test_gl22_double_free_of_a_large_fixed_object_is_unmapped_memory(win32, flags):
    # Decision: a large object (over 0xFE000 bytes) has a region of its own, released when it
    # is freed, so a second free names memory that is no longer mapped at all: GL-20's
    # ERROR_NOACCESS, as on Windows where such a block is VirtualFree'd.
    p = ok(win32, win32.GlobalAlloc, flags, 2 * MiB)
    expect(win32, win32.GlobalFree, p, result=0)
    expect(win32, win32.GlobalSize, p, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.GlobalFree, p, result=p, error=ERROR_NOACCESS)


def test_gl22_double_free_of_fixed_and_odd_values(win32):
    p = ok(win32, win32.GlobalAlloc, GMEM_DDESHARE, 100)
    expect(win32, win32.GlobalFree, p, result=0)
    expect(win32, win32.GlobalFree, p, result=p, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.GlobalSize, 0xC042, result=0, error=ERROR_INVALID_HANDLE)
    result, _ = call(win32, win32.GlobalSize, GARBAGE)
    assert result == 0


@pytest.mark.parametrize("size", [12, 100000])
@pytest.mark.parametrize("discardable", [False, True])
def test_gl30_modify_moveable_converts_fixed_to_moveable(win32, size, discardable):
    p = ok(win32, win32.GlobalAlloc, GMEM_ZEROINIT, size)
    data = pattern(size)
    win32.write(p, data)
    flags = GMEM_MOVEABLE | GMEM_MODIFY | (GMEM_DISCARDABLE if discardable else 0)
    h = ok(win32, win32.GlobalReAlloc, p, size * 2, flags)
    assert h != p and h % 16 == 8
    assert expect_size(win32, h) == size  # the size is unchanged
    q = ok(win32, win32.GlobalLock, h)
    assert q != h and q == slot(win32, h)
    assert win32.read(q, size) == data
    assert ok(win32, win32.GlobalHandle, q) == h
    assert expect_flags(win32, h) == 1 | (GMEM_DISCARDABLE if discardable else 0)
    expect(win32, win32.GlobalUnlock, h, result=False, error=ERROR_SUCCESS)
    expect(win32, win32.GlobalFree, h, result=0)
    expect(win32, win32.GlobalFlags, h, result=GMEM_INVALID_HANDLE, error=ERROR_INVALID_HANDLE)


def test_stale_handle_is_never_taken_for_the_slots_next_object(win32):
    """A freed handle whose slot serves a newer object stays invalid (the contract: stale
    handles are detected, never aliased)."""
    h = _freed_moveable(win32)
    for _ in range(MAX_HANDLES):
        n = ok(win32, win32.GlobalAlloc, GMEM_MOVEABLE, 16)
        if n & ADDRESS_MASK == h & ADDRESS_MASK:
            break
    else:
        raise AssertionError("the freed slot was never handed out again")
    assert n != h
    win32.write(ok(win32, win32.GlobalLock, n), b"the new object!!")
    _check_invalid_moveable_handle(_local_expect(win32), h)
    assert expect_flags(win32, n) == 1
    assert expect_size(win32, n) == 16
    assert win32.read(slot(win32, n), 16) == b"the new object!!"


# ---- across real processes ---------------------------------------------------------------------

def test_moveable_handle_locked_read_and_written_in_another_process(win32, peers):
    h = ok(win32, win32.GlobalAlloc, GMEM_MOVEABLE, 64)
    p = ok(win32, win32.GlobalLock, h)
    win32.write(p, b"from the parent")
    peer = peers()
    assert peer.ok("GlobalLock", h) == p  # the same address in every process
    assert peer.ok("read", p, 15) == b"from the parent"
    peer.call("write", p + 16, b"from the child")
    assert win32.read(p + 16, 14) == b"from the child"
    assert peer.ok("GlobalSize", h) == 64
    assert peer.ok("GlobalHandle", p) == h
    assert peer.ok("GlobalUnlock", h) is True  # the parent's lock is still there
    expect(win32, win32.GlobalUnlock, h, result=False, error=ERROR_SUCCESS)
    peer.expect("GlobalUnlock", h, result=False, error=ERROR_NOT_LOCKED)


def test_fixed_object_read_and_written_in_another_process(win32, peers):
    p = ok(win32, win32.GlobalAlloc, GPTR, 4096)
    win32.write(p, b"fixed")
    peer = peers()
    assert peer.ok("GlobalLock", p) == p
    assert peer.ok("GlobalHandle", p) == p
    assert peer.ok("GlobalSize", p) >= 4096
    assert peer.ok("read", p, 5) == b"fixed"
    assert peer.ok("read", p + 5, 4091) == bytes(4091)
    peer.call("write", p + 4095, b"!")
    assert win32.read(p + 4095, 1) == b"!"
    peer.expect("GlobalFree", p, result=0)  # any process may free what it was given
    expect(win32, win32.GlobalSize, p, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.GlobalFlags, p, result=GMEM_INVALID_HANDLE, error=ERROR_INVALID_HANDLE)


def test_lock_counts_and_flags_are_the_same_in_every_process(win32, peers):
    h = moveable_with(win32, b"shared state....")
    peer = peers()
    assert peer.ok("GlobalLock", h) == slot(win32, h)
    assert peer.ok("GlobalLock", h) == slot(win32, h)
    assert lock_count(win32, h) == 2
    ok(win32, win32.GlobalLock, h)
    peer.expect("GlobalFlags", h, result=3)
    # A locked object cannot be discarded, whoever holds the lock.
    result, error = call(win32, win32.GlobalDiscard, h)
    assert result == 0 and error != SENTINEL
    for _ in range(2):
        peer.call("GlobalUnlock", h)
    win32.GlobalUnlock(h)  # each process lets go of its own locks: its pointer holds the data
    assert lock_count(win32, h) == 0
    # Flags changed by one process are seen by the other.
    assert peer.ok("GlobalReAlloc", h, 0, GMEM_MODIFY | GMEM_DISCARDABLE) == h
    assert expect_flags(win32, h) == GMEM_DISCARDABLE
    assert peer.ok("GlobalReAlloc", h, 4096, GMEM_MOVEABLE) == h
    assert expect_size(win32, h) == 4096
    assert peek(win32, h, 16) == b"shared state...."
    assert peer.ok("GlobalDiscard", h) == h
    assert expect_flags(win32, h) == GMEM_DISCARDABLE | GMEM_DISCARDED
    expect(win32, win32.GlobalLock, h, result=0, error=ERROR_DISCARDED)
    assert expect_size(win32, h) == 0
    # And a free by one process invalidates the handle for every process.
    expect(win32, win32.GlobalFree, h, result=0)
    peer.expect("GlobalFlags", h, result=GMEM_INVALID_HANDLE, error=ERROR_INVALID_HANDLE)


def test_stale_and_garbage_handles_in_another_process_touch_no_live_data(win32, peers):
    live = moveable_with(win32, pattern(256, seed=3))
    fixed = ok(win32, win32.GlobalAlloc, GMEM_FIXED, 256)
    win32.write(fixed, pattern(256, seed=5))
    live_pointer = slot(win32, live)
    stale = _freed_moveable(win32)
    stale_fixed = ok(win32, win32.GlobalAlloc, GMEM_FIXED, 100)
    expect(win32, win32.GlobalFree, stale_fixed, result=0)
    peer = peers()

    _check_invalid_moveable_handle(peer.expect, stale)
    _check_invalid_moveable_handle(peer.expect, GARBAGE + 8)
    # Forged handles: the live handle's slot with another generation, or with none.
    _check_invalid_moveable_handle(peer.expect, live + (1 << STAMP_SHIFT))
    _check_invalid_moveable_handle(peer.expect, live & ADDRESS_MASK)
    _check_garbage_pointer(peer.expect, GARBAGE)
    peer.expect("GlobalFree", stale_fixed, result=stale_fixed, error=ERROR_INVALID_HANDLE)
    peer.expect("GlobalSize", stale_fixed, result=0, error=ERROR_INVALID_HANDLE)

    # The stale handle's slot now serving the peer's new object changes nothing.
    for _ in range(MAX_HANDLES):
        newer = peer.ok("GlobalAlloc", GMEM_MOVEABLE, 16)
        if newer & ADDRESS_MASK == stale & ADDRESS_MASK:
            break
    else:
        raise AssertionError("the freed slot was never handed out again")
    peer.call("write", peer.ok("GlobalLock", newer), b"peer's new thing")
    _check_invalid_moveable_handle(_local_expect(win32), stale)
    assert expect_flags(win32, newer) == 1
    assert peek(win32, newer, 16) == b"peer's new thing"

    # The live objects are untouched.
    assert slot(win32, live) == live_pointer
    assert expect_flags(win32, live) == 0
    assert expect_size(win32, live) == 256
    assert peek(win32, live, 256) == pattern(256, seed=3)
    assert peer.ok("read", peer.ok("GlobalLock", live), 256) == pattern(256, seed=3)
    peer.call("GlobalUnlock", live)
    assert expect_size(win32, fixed) == 256
    assert win32.read(fixed, 256) == pattern(256, seed=5)


def _invalid_in(w, h, fn):
    """True once fn(h) reports an invalid handle in this process."""
    result, error = call(w, fn, h)
    return error == ERROR_INVALID_HANDLE and result in (0, GMEM_INVALID_HANDLE)


def test_objects_of_a_killed_process_are_reclaimed_unless_shared(win32, peers, daemon):
    peer = peers()
    moveable = peer.ok("GlobalAlloc", GMEM_MOVEABLE, 300)
    peer.call("write", peer.ok("GlobalLock", moveable), b"mine alone")
    fixed = peer.ok("GlobalAlloc", GMEM_FIXED, 300)
    shared = peer.ok("GlobalAlloc", GMEM_MOVEABLE | GMEM_DDESHARE, 300)
    peer.call("write", peer.ok("GlobalLock", shared), pattern(300, seed=9))
    peer.expect("GlobalUnlock", shared, result=False, error=ERROR_SUCCESS)
    shared_fixed = peer.ok("GlobalAlloc", GMEM_SHARE, 200)
    peer.call("write", shared_fixed, pattern(200, seed=11))
    # All four are visible from here while their owner lives.
    assert expect_flags(win32, moveable) == 1
    assert expect_size(win32, fixed) == 300
    assert expect_flags(win32, shared) == GMEM_DDESHARE
    assert expect_size(win32, shared_fixed) == 200

    pid = peer.pid
    peer.kill()
    wait_until(lambda: _invalid_in(win32, moveable, win32.GlobalFlags), 20,
               what="the killed process's moveable object to be freed")
    wait_until(lambda: _invalid_in(win32, fixed, win32.GlobalSize), 20,
               what="the killed process's fixed object to be freed")
    expect(win32, win32.GlobalFlags, moveable, result=GMEM_INVALID_HANDLE, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.GlobalSize, moveable, result=0, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.GlobalSize, fixed, result=0, error=ERROR_INVALID_HANDLE)
    # The shared ones outlive their allocator, contents and all.
    assert expect_flags(win32, shared) == GMEM_DDESHARE
    assert expect_size(win32, shared) == 300
    assert win32.read(ok(win32, win32.GlobalLock, shared), 300) == pattern(300, seed=9)
    expect(win32, win32.GlobalUnlock, shared, result=False, error=ERROR_SUCCESS)
    assert expect_size(win32, shared_fixed) == 200
    assert peek(win32, shared_fixed, 200) == pattern(200, seed=11)
    assert f"pid {pid} gone: released 2 global objects" in daemon.log_text()
    # Some other process frees them.
    expect(win32, win32.GlobalFree, shared, result=0)
    expect(win32, win32.GlobalFree, shared_fixed, result=0)


def test_ownership_follows_an_object_through_realloc(win32, peers):
    """A relocated fixed object and a fixed object made moveable (GL-28, GL-30) still die with
    their allocator; one modified with GMEM_DDESHARE no longer does."""
    peer = peers()
    relocated = peer.ok("GlobalReAlloc", peer.ok("GlobalAlloc", GMEM_FIXED, 12), 600, GMEM_MOVEABLE)
    converted = peer.ok("GlobalReAlloc", peer.ok("GlobalAlloc", GMEM_FIXED, 700), 0,
                        GMEM_MOVEABLE | GMEM_MODIFY)
    assert converted % 16 == 8
    kept = peer.ok("GlobalAlloc", GMEM_MOVEABLE, 800)
    peer.call("write", peer.ok("GlobalLock", kept), b"keep me")
    peer.call("GlobalUnlock", kept)
    assert peer.ok("GlobalReAlloc", kept, 0, GMEM_MODIFY | GMEM_DDESHARE) == kept
    assert expect_size(win32, relocated) == 600
    assert expect_size(win32, converted) == 700
    peer.kill()
    wait_until(lambda: _invalid_in(win32, converted, win32.GlobalFlags), 20,
               what="the converted object to be freed")
    wait_until(lambda: _invalid_in(win32, relocated, win32.GlobalSize), 20,
               what="the relocated object to be freed")
    assert expect_size(win32, kept) == 800
    assert peek(win32, kept, 7) == b"keep me"


def _pointers(w, handles):
    """The locked pointer of each handle (locked and unlocked again)."""
    pointers = []
    for h in handles:
        pointers.append(ok(w, w.GlobalLock, h))
        w.GlobalUnlock(h)
    return pointers


@pytest.mark.parametrize("size,count,fixed_first", [
    pytest.param(5000, 5, True, id="small-one-run"),
    pytest.param(200000, 6, False, id="medium"),
    pytest.param(5000, 6, False, id="small-below-a-newer-run"),
])
def test_global_compact_moves_unlocked_moveable_objects_only(win32, peers, size, count, fixed_first):
    if fixed_first:
        fixed = ok(win32, win32.GlobalAlloc, GMEM_FIXED, size)
    below = [ok(win32, win32.GlobalAlloc, GMEM_MOVEABLE, size) for _ in range(count)]
    handles = [moveable_with(win32, pattern(size, seed=i)) for i in range(count)]
    if not fixed_first:
        fixed = ok(win32, win32.GlobalAlloc, GMEM_FIXED, size)
    win32.write(fixed, pattern(size, seed=99))
    before = _pointers(win32, handles)
    for h in below:
        expect(win32, win32.GlobalFree, h, result=0)

    # Everything locked (by this process and by another): nothing moves.
    peer = peers()
    for h in handles[:3]:
        ok(win32, win32.GlobalLock, h)
    for h in handles[3:]:
        assert peer.ok("GlobalLock", h)
    largest, error = call(win32, win32.GlobalCompact, 0)
    assert largest > 0 and error == SENTINEL
    assert [slot(win32, h) for h in handles] == before

    # Unlocked ones move (lower, into the freed space); locked ones stay.
    locked_here, locked_there = handles[1], handles[4]
    for h in handles[:3]:
        if h != locked_here:
            win32.GlobalUnlock(h)
    for h in handles[3:]:
        if h != locked_there:
            peer.call("GlobalUnlock", h)
    assert lock_count(win32, locked_here) == 1 and lock_count(win32, locked_there) == 1
    largest, error = call(win32, win32.GlobalCompact, 0)
    assert largest > 0 and error == SENTINEL
    after = _pointers(win32, handles)
    moved = [h for h, old, new in zip(handles, before, after) if old != new]
    assert moved, "GlobalCompact moved no unlocked object although space below them was freed"
    assert locked_here not in moved and locked_there not in moved
    assert all(new < old for old, new in zip(before, after) if new != old)
    for i, (h, pointer) in enumerate(zip(handles, after)):
        assert slot(win32, h) == pointer
        assert expect_size(win32, h) == size
        assert peek(win32, h, size) == pattern(size, seed=i), f"object {i} lost its contents"
    # The other process finds the moved objects through the same handles.
    for h, pointer in zip(handles, after):
        assert peer.ok("GlobalLock", h) == pointer
    assert peer.ok("read", after[0], 32) == pattern(size, seed=0)[:32]
    # A fixed object never moves.
    assert expect_size(win32, fixed) == size
    assert win32.read(fixed, size) == pattern(size, seed=99)
    assert lock_count(win32, locked_here) == 2 and lock_count(win32, locked_there) == 2
