"""Conformance of the Win32 heap calls of the facade (`shmheap.win32`) with
../shared/reference/win32_semantics.md sections 2-6 (rows HC-*, HA-*, HR-*, HF-*, HW-*, HL-*,
and HI-07 for HeapCompact), under the team's emulator conventions:

* failure returns 0 / False / None (HeapSize: 2**64-1) and sets GetLastError(); success leaves
  the last error alone (checked with a 0xDEADBEEF sentinel);
* HEAP_GENERATE_EXCEPTIONS raises ShmheapMemoryError with winerror STATUS_NO_MEMORY;
* bad pointers: double free / another heap's pointer -> ERROR_INVALID_PARAMETER, an address
  outside the segment -> ERROR_NOACCESS, HeapValidate failures leave the last error alone,
  an unknown heap handle (or another process's) -> ERROR_INVALID_HANDLE.

Every test runs against a real daemon (the `win32` fixture, 256 MiB segment). Tests are named
after the reference row they check. A = 0x40000, the block size of the Wine heap tests.

Rows not tested: HI-01..HI-06 (HeapQueryInformation, HeapSetInformation, HeapSummary are not
implemented). HF-08 and HW-04 are about GlobalAlloc; they are checked with the LocalAlloc
calls, whose moveable objects live in the process heap the same way.
"""

import multiprocessing
import os
import threading
from collections import namedtuple

import pytest

from shmheap import client as client_module
from shmheap.constants import (
    HEAP_CREATE_ENABLE_EXECUTE, HEAP_FREE_CHECKING_ENABLED, HEAP_GENERATE_EXCEPTIONS,
    HEAP_NO_SERIALIZE, HEAP_REALLOC_IN_PLACE_ONLY, HEAP_TAIL_CHECKING_ENABLED, HEAP_ZERO_MEMORY,
    LMEM_MOVEABLE, MEM_COMMIT, MEM_FREE, MEM_RESERVE, PAGE_EXECUTE_READWRITE, PAGE_READWRITE,
    PROCESS_HEAP_ENTRY_BUSY, PROCESS_HEAP_ENTRY_DDESHARE, PROCESS_HEAP_ENTRY_MOVEABLE,
    PROCESS_HEAP_REGION, PROCESS_HEAP_UNCOMMITTED_RANGE,
)
from shmheap.errors import ShmheapMemoryError, WinError

from win32_checks import SENTINEL, _show

SIZE_T_MAX = 2**64 - 1
A = 0x40000  # 0x8000 * sizeof(void*)
MiB = 2**20
PAGE = 0x1000
GRANULE = 0x10000
OUTSIDE = 2**40  # an address beyond the 256 MiB segment: unmapped memory
DEADLINE = 30.0  # seconds, for anything that waits on another thread or process
BLOCKED = 0.1  # how long a blocked thread must stay blocked (HL-01: "after 100 ms")

ERROR_INVALID_HANDLE = WinError.ERROR_INVALID_HANDLE
ERROR_NOT_ENOUGH_MEMORY = WinError.ERROR_NOT_ENOUGH_MEMORY
ERROR_INVALID_PARAMETER = WinError.ERROR_INVALID_PARAMETER
ERROR_NO_MORE_ITEMS = WinError.ERROR_NO_MORE_ITEMS
ERROR_NOACCESS = WinError.ERROR_NOACCESS
ERROR_SUCCESS = WinError.ERROR_SUCCESS
STATUS_NO_MEMORY = WinError.STATUS_NO_MEMORY

spawn = multiprocessing.get_context("spawn")


# ---- helpers ---------------------------------------------------------------------------------

def ok(w, fn, *args):
    """Call fn(*args); assert success (non-zero, True) with the last error untouched."""
    w.SetLastError(SENTINEL)
    result = fn(*args)
    assert result is not None and result is not False and result != 0, (
        f"{fn.__name__}{_show(args)} failed with error {w.GetLastError()}")
    assert w.GetLastError() == SENTINEL, (
        f"{fn.__name__}{_show(args)} succeeded but set the last error to {w.GetLastError()}")
    return result


def fails(w, error, fn, *args, result=0):
    """Call fn(*args); assert it returned `result` (0, False, SIZE_T_MAX) and set `error`."""
    w.SetLastError(SENTINEL)
    got = fn(*args)
    assert type(got) is type(result) and got == result, (
        f"{fn.__name__}{_show(args)} returned {got!r}, expected {result!r}")
    assert w.GetLastError() == error, (
        f"{fn.__name__}{_show(args)}: GetLastError() = {w.GetLastError()}, expected {int(error)} ({error!r})")


def alloc(w, h, size, flags=0):
    return ok(w, w.HeapAlloc, h, flags, size)


def size_of(w, h, p):
    """HeapSize that must succeed (it may legitimately return 0)."""
    w.SetLastError(SENTINEL)
    size = w.HeapSize(h, 0, p)
    assert size != SIZE_T_MAX, f"HeapSize({h:#x}, 0, {p:#x}) failed with error {w.GetLastError()}"
    assert w.GetLastError() == SENTINEL
    return size


def validate(w, h, p):
    """HeapValidate's answer; it never touches the last error (HF-04, HF-05)."""
    w.SetLastError(SENTINEL)
    result = w.HeapValidate(h, 0, p)
    assert type(result) is bool
    assert w.GetLastError() == SENTINEL, f"HeapValidate set the last error to {w.GetLastError()}"
    return result


def free(w, h, p):
    assert ok(w, w.HeapFree, h, 0, p) is True


def create(w, options=0, initial=0, maximum=0):
    h = ok(w, w.HeapCreate, options, initial, maximum)
    assert h % GRANULE == 0
    return h


def destroy(w, h):
    assert ok(w, w.HeapDestroy, h) is True


def reservation(w, base):
    """Bytes of the region whose AllocationBase is `base`, summed over VirtualQuery runs."""
    total, address = 0, base
    while True:
        info = w.VirtualQuery(address)
        if info is None or info.State == MEM_FREE or info.AllocationBase != base:
            return total
        total += info.RegionSize
        address += info.RegionSize


def pattern(size, seed=1):
    unit = bytes((i * 7 + seed) & 0xFF for i in range(251))  # a prime period: no 16-byte repeats
    return (unit * (size // 251 + 1))[:size]


def dirty(w, h, size, count=4, byte=0xCC):
    """Allocate, fill with `byte` and free blocks of `size`, so that later zero-fill checks
    cannot pass merely because fresh pages read zero."""
    blocks = [alloc(w, h, size) for _ in range(count)]
    for p in blocks:
        w.write(p, bytes([byte]) * size)
    for p in blocks:
        free(w, h, p)


Entry = namedtuple("Entry", "lpData cbData cbOverhead iRegionIndex wFlags committed uncommitted")


def walk(w, h, limit=1_000_000):
    """Every HeapWalk entry of `h`, then assert the walk ended with ERROR_NO_MORE_ITEMS."""
    e = w.PROCESS_HEAP_ENTRY()
    entries = []
    w.SetLastError(SENTINEL)
    while w.HeapWalk(h, e):
        assert w.GetLastError() == SENTINEL, "a successful HeapWalk set the last error"
        region = e.wFlags & PROCESS_HEAP_REGION
        entries.append(Entry(e.lpData, e.cbData, e.cbOverhead, e.iRegionIndex, e.wFlags,
                             e.Region.dwCommittedSize if region else None,
                             e.Region.dwUnCommittedSize if region else None))
        assert len(entries) < limit, "HeapWalk does not end"
    assert w.GetLastError() == ERROR_NO_MORE_ITEMS, f"walk ended with error {w.GetLastError()}"
    return entries


def start_thread(fn):
    """Run fn() in a daemon thread; returns (done Event, result dict)."""
    done = threading.Event()
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # reported by the test
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, daemon=True).start()
    return done, result


# ---- 2. HeapCreate, HeapDestroy, GetProcessHeap, GetProcessHeaps -----------------------------

def test_hc01_heap_handle_is_64k_aligned(win32):
    h = ok(win32, win32.HeapCreate, 0, 0, 0)
    assert h & 0xFFFF == 0
    info = win32.VirtualQuery(h)
    assert info.AllocationBase == h and info.State == MEM_COMMIT
    destroy(win32, h)


def test_hc02_process_heaps_count_grows_with_each_heap(win32):
    n = ok(win32, win32.GetProcessHeaps, 0, None)
    assert 1 <= n <= 6
    h1 = create(win32)
    assert ok(win32, win32.GetProcessHeaps, 0, None) == n + 1
    h2 = create(win32)
    assert ok(win32, win32.GetProcessHeaps, 0, None) == n + 2
    buf = [SENTINEL, SENTINEL]
    assert ok(win32, win32.GetProcessHeaps, 0, buf) == n + 2
    assert buf == []  # a count of 0 stores no handle: the list holds at most 0 of them
    assert h1 != h2


def test_hc03_process_heap_first_then_creation_order(win32):
    n = win32.GetProcessHeaps(0, None)
    h1 = create(win32)
    h2 = create(win32)
    buf = []
    assert ok(win32, win32.GetProcessHeaps, 8, buf) == n + 2
    process_heap = win32.GetProcessHeap()
    assert process_heap != 0 and process_heap % GRANULE == 0
    assert win32.GetProcessHeap() == process_heap  # the same value on every call
    assert len(buf) == n + 2
    assert buf[0] == process_heap
    assert buf[n] == h1 and buf[n + 1] == h2


def test_hc04_destroyed_heaps_leave_the_list(win32):
    n = win32.GetProcessHeaps(0, None)
    h1 = create(win32)
    h2 = create(win32)
    destroy(win32, h2)
    destroy(win32, h1)
    assert ok(win32, win32.GetProcessHeaps, 0, None) == n
    buf = []
    win32.GetProcessHeaps(8, buf)
    assert h1 not in buf and h2 not in buf and len(buf) == n


def test_hc05_short_buffer_gets_only_k_handles(win32):
    n = win32.GetProcessHeaps(0, None)
    made = [create(win32) for _ in range(3)]
    total = n + 3
    buf = [SENTINEL] * 10
    assert ok(win32, win32.GetProcessHeaps, 2, buf) == total
    assert total > 2 and len(buf) == 2
    assert buf[0] == win32.GetProcessHeap()
    full = []
    assert win32.GetProcessHeaps(total, full) == total  # a return <= k: everything was stored
    assert len(full) == total and full[-3:] == made
    assert buf == full[:2]


@pytest.mark.parametrize("start", [0x100, 0x4000, 0x8000, 0xC000])
def test_hc06_fixed_heap_reservation_rounds_to_0x2000(win32, start):
    for n in range(start, min(start + 0x4000, 0xFF01), 0x100):
        h = create(win32, 0, n, n)
        expected = -(-n // 0x2000) * 0x2000
        assert reservation(win32, h) == expected, f"HeapCreate(0,{n:#x},{n:#x})"
        destroy(win32, h)


@pytest.mark.parametrize("initial", [0, 0x80000, 0x150000])
def test_hc07_growable_heap_reserves_initial_plus_64k(win32, initial):
    h = create(win32, HEAP_NO_SERIALIZE, initial, 0)
    assert reservation(win32, h) == initial + 0x10000


@pytest.mark.parametrize("initial", [0, 0x80000, 0x150000])
def test_hc08_growable_heap_extensions_double_up_to_cap(win32, initial):
    h = create(win32, HEAP_NO_SERIALIZE, initial, 0)
    seen = {h}
    extensions = []
    for _ in range(100):
        p = alloc(win32, h, 0x60000)
        base = win32.VirtualQuery(p).AllocationBase
        if base not in seen:
            seen.add(base)
            extensions.append(reservation(win32, base))
        if extensions.count(0xFD0000) >= 2:
            break
    expected = [0x100000, 0x200000, 0x400000, 0x800000, 0xFD0000, 0xFD0000]
    assert extensions == expected[:len(extensions)]
    assert 0xFD0000 in extensions, f"cap not reached within 100 allocations: {extensions}"


def test_hc09_fixed_heap_largest_block(win32):
    h = create(win32, 0, A, A)
    p = alloc(win32, h, A - (0x400 + 0x100 * 8))
    assert size_of(win32, h, p) == 0x3F400
    win32.write(p + 0x3F400 - 4, b"last")
    assert validate(win32, h, 0)


def test_hc10_fixed_heap_bookkeeping_leaves_last_bytes_unusable(win32):
    h = create(win32, 0, A, A)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, A - (0x200 + 0x80 * 8))
    assert validate(win32, h, 0)
    p = alloc(win32, h, 0x3F400)  # the heap is unharmed by the refusal
    free(win32, h, p)


def test_hc10_k_alloc_variant_initial_2c_maximum_5c(win32):
    c = 10 * PAGE
    h = create(win32, 0, 2 * c, 5 * c)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, 5 * c + 1)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, 5 * c)


def test_hc11_fixed_heap_refuses_megabyte_blocks(win32):
    h = create(win32, 0, 8 * A, 8 * A)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, 4 * A)
    p = alloc(win32, h, A)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, 4 * A)
    assert size_of(win32, h, p) == A


def test_hc11_fixed_heap_large_block_threshold(win32):
    h = create(win32, 0, 8 * A, 8 * A)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, 0xFE001)
    p = alloc(win32, h, 0xFE000)
    assert size_of(win32, h, p) == 0xFE000
    assert win32.VirtualQuery(p).AllocationBase == h  # inside the heap's own region


def test_hc12_fixed_heap_zero_and_a_sized_blocks(win32):
    h = create(win32, 0, 8 * A, 8 * A)
    dirty(win32, h, A, count=2, byte=0x5A)
    p0 = alloc(win32, h, 0)
    p1 = alloc(win32, h, A)
    p2 = alloc(win32, h, A, HEAP_ZERO_MEMORY)
    assert len({p0, p1, p2}) == 3
    assert (size_of(win32, h, p0), size_of(win32, h, p1), size_of(win32, h, p2)) == (0, A, A)
    assert win32.read(p2, A) == bytes(A)


def test_hc13_growable_heap_large_block_gets_own_region(win32):
    h = create(win32)
    p = alloc(win32, h, 5 * A + 1)
    assert size_of(win32, h, p) == 5 * A + 1
    info = win32.VirtualQuery(p)
    assert info.AllocationBase != h and info.State == MEM_COMMIT
    win32.write(p + 5 * A, b"\x77")
    assert win32.read(p + 5 * A, 1) == b"\x77"
    free(win32, h, p)
    assert alloc(win32, h, 5 * A) == p  # kept for the next large block until the purge
    free(win32, h, p)
    win32.HeapCompact(h, 0)  # the purge at once
    assert win32.VirtualQuery(p).State == MEM_FREE  # the region went with the block


def test_hc13_large_block_threshold_own_region(win32):
    h = create(win32, 0, 0x200000, 0)  # room for 0xFE000 bytes in the heap's first region
    medium = alloc(win32, h, 0xFE000)
    large = alloc(win32, h, 0xFE001)
    assert win32.VirtualQuery(medium).AllocationBase == h
    assert win32.VirtualQuery(large).AllocationBase == large != h  # a region of its own
    assert reservation(win32, large) == 0xFF000
    assert (size_of(win32, h, medium), size_of(win32, h, large)) == (0xFE000, 0xFE001)


def test_hc14_generate_exceptions_heap_raises_on_alloc(win32):
    h = create(win32, HEAP_GENERATE_EXCEPTIONS)
    p = alloc(win32, h, 100)  # success is a plain return
    with pytest.raises(ShmheapMemoryError) as info:
        win32.HeapAlloc(h, 0, SIZE_T_MAX)
    assert info.value.winerror == STATUS_NO_MEMORY == 0xC0000017
    with pytest.raises(ShmheapMemoryError) as info:
        win32.HeapReAlloc(h, 0, p, SIZE_T_MAX)
    assert info.value.winerror == STATUS_NO_MEMORY
    assert size_of(win32, h, p) == 100 and validate(win32, h, p)


def test_hc14_generate_exceptions_flag_per_call(win32):
    h = create(win32)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, SIZE_T_MAX)  # no flag: NULL
    with pytest.raises(ShmheapMemoryError) as info:
        win32.HeapAlloc(h, HEAP_GENERATE_EXCEPTIONS, SIZE_T_MAX)
    assert info.value.winerror == STATUS_NO_MEMORY
    p = alloc(win32, h, 16, HEAP_GENERATE_EXCEPTIONS)
    with pytest.raises(ShmheapMemoryError) as info:
        win32.HeapReAlloc(h, HEAP_GENERATE_EXCEPTIONS | HEAP_REALLOC_IN_PLACE_ONLY, p, 0x10000)
    assert info.value.winerror == STATUS_NO_MEMORY
    assert size_of(win32, h, p) == 16


def test_hc14_generate_exceptions_fixed_heap_full(win32):
    h = create(win32, HEAP_GENERATE_EXCEPTIONS, A, A)
    with pytest.raises(ShmheapMemoryError) as info:
        win32.HeapAlloc(h, 0, 0x3FA00)
    assert info.value.winerror == STATUS_NO_MEMORY
    with pytest.raises(ShmheapMemoryError) as info:
        win32.HeapAlloc(h, 0, 0xFE001)
    assert info.value.winerror == STATUS_NO_MEMORY
    assert alloc(win32, h, 0x3F400)


def test_hc15_enable_execute_heap_pages_are_executable(win32):
    hx = create(win32, HEAP_CREATE_ENABLE_EXECUTE)
    h = create(win32)
    for size in (16, 0x8000, 0x200000):  # small, medium, large (own region)
        assert win32.VirtualQuery(alloc(win32, hx, size)).Protect == PAGE_EXECUTE_READWRITE
        assert win32.VirtualQuery(alloc(win32, h, size)).Protect == PAGE_READWRITE
    p = alloc(win32, win32.GetProcessHeap(), 16)
    assert win32.VirtualQuery(p).Protect in (PAGE_READWRITE, PAGE_EXECUTE_READWRITE)


def test_hc16_destroy_with_live_blocks(win32):
    h = create(win32)
    small = alloc(win32, h, 10)
    large = alloc(win32, h, 2 * MiB)
    destroy(win32, h)
    fails(win32, ERROR_INVALID_HANDLE, win32.HeapSize, h, 0, small, result=SIZE_T_MAX)
    fails(win32, ERROR_INVALID_HANDLE, win32.HeapAlloc, h, 0, 10)
    fails(win32, ERROR_INVALID_HANDLE, win32.HeapFree, h, 0, small, result=False)
    fails(win32, ERROR_INVALID_HANDLE, win32.HeapReAlloc, h, 0, small, 20)
    fails(win32, ERROR_INVALID_HANDLE, win32.HeapWalk, h, win32.PROCESS_HEAP_ENTRY(), result=False)
    assert win32.HeapValidate(h, 0, 0) is False
    buf = []
    win32.GetProcessHeaps(16, buf)
    assert h not in buf
    assert win32.VirtualQuery(h).State == MEM_FREE
    assert win32.VirtualQuery(large).State == MEM_FREE


def test_hc17_process_heap_cannot_be_destroyed(win32):
    process_heap = win32.GetProcessHeap()
    fails(win32, ERROR_INVALID_HANDLE, win32.HeapDestroy, process_heap, result=False)
    p = alloc(win32, process_heap, 32)  # still usable
    free(win32, process_heap, p)
    assert win32.GetProcessHeaps(1, buf := []) >= 1 and buf == [process_heap]


def test_hc17_destroyed_or_bogus_heap_handle(win32):
    h = create(win32)
    destroy(win32, h)
    fails(win32, ERROR_INVALID_HANDLE, win32.HeapDestroy, h, result=False)
    for bogus in (0, 0x12340000, OUTSIDE, h + 0x10):
        fails(win32, ERROR_INVALID_HANDLE, win32.HeapDestroy, bogus, result=False)
        fails(win32, ERROR_INVALID_HANDLE, win32.HeapAlloc, bogus, 0, 16)
        fails(win32, ERROR_INVALID_HANDLE, win32.HeapSize, bogus, 0, 0x20000, result=SIZE_T_MAX)
        fails(win32, ERROR_INVALID_HANDLE, win32.HeapCompact, bogus, 0)
        fails(win32, ERROR_INVALID_HANDLE, win32.HeapLock, bogus, result=False)
        fails(win32, ERROR_INVALID_HANDLE, win32.HeapUnlock, bogus, result=False)


def _foreign_heap_child(socket_path, conn):
    """Another process: every call on the parent's heap handle must fail with
    ERROR_INVALID_HANDLE."""
    os.environ["SHMHEAP_SOCKET"] = socket_path
    from shmheap import win32
    h, p = conn.recv()
    results = {}
    calls = {"HeapAlloc": lambda: win32.HeapAlloc(h, 0, 16),
             "HeapFree": lambda: win32.HeapFree(h, 0, p),
             "HeapSize": lambda: win32.HeapSize(h, 0, p),
             "HeapReAlloc": lambda: win32.HeapReAlloc(h, 0, p, 64),
             "HeapDestroy": lambda: win32.HeapDestroy(h)}
    for name, call in calls.items():
        win32.SetLastError(SENTINEL)
        try:
            value = call()
        except Exception as exc:  # reported to the parent
            value = f"raised {exc!r}"
        results[name] = (value, win32.GetLastError())
    results["own heap works"] = win32.HeapAlloc(win32.GetProcessHeap(), 0, 16) != 0
    conn.send(results)
    conn.close()


def test_hc17_heap_of_another_process_is_invalid_handle(win32, daemon):
    h = create(win32)
    p = alloc(win32, h, 48)
    data = pattern(48)
    win32.write(p, data)
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_foreign_heap_child, args=(daemon.socket, child_end))
    child.start()
    try:
        parent_end.send((h, p))
        assert parent_end.poll(DEADLINE), "the child did not answer"
        results = parent_end.recv()
    finally:
        child.join(DEADLINE)
        if child.exitcode is None:
            child.kill()
            child.join(DEADLINE)
    assert child.exitcode == 0
    assert results == {"HeapAlloc": (0, ERROR_INVALID_HANDLE),
                       "HeapFree": (False, ERROR_INVALID_HANDLE),
                       "HeapSize": (SIZE_T_MAX, ERROR_INVALID_HANDLE),
                       "HeapReAlloc": (0, ERROR_INVALID_HANDLE),
                       "HeapDestroy": (False, ERROR_INVALID_HANDLE),
                       "own heap works": True}
    assert size_of(win32, h, p) == 48 and validate(win32, h, p) and validate(win32, h, 0)
    assert win32.read(p, 48) == data
    free(win32, h, p)
    destroy(win32, h)


# ---- 3. HeapAlloc and HeapSize ----------------------------------------------------------------

@pytest.mark.parametrize("heap", ["private", "process"])
def test_ha01_zero_size_blocks_are_distinct(win32, heap):
    h = create(win32) if heap == "private" else win32.GetProcessHeap()
    p = alloc(win32, h, 0)
    q = alloc(win32, h, 0)
    assert p != q
    assert size_of(win32, h, p) == 0 and size_of(win32, h, q) == 0
    assert validate(win32, h, p) and validate(win32, h, q)
    free(win32, h, p)
    free(win32, h, q)


def test_ha02_heap_size_is_exact_for_0_to_256(win32):
    h = win32.GetProcessHeap()
    blocks = [(alloc(win32, h, s), s) for s in range(257)]
    for p, s in blocks:
        assert size_of(win32, h, p) == s
    spans = sorted((p, p + max(s, 1)) for p, s in blocks)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), "blocks overlap"
    for p, s in blocks:
        if s:
            win32.write(p, bytes([s & 0xFF]) * s)
    for p, s in blocks:
        assert win32.read(p, s) == bytes([s & 0xFF]) * s
        free(win32, h, p)


def test_ha03_exact_sizes_for_large_blocks(win32):
    h = create(win32)
    p = alloc(win32, h, A)
    assert size_of(win32, h, p) == A
    big = 3000 * 1024 + 37
    q = alloc(win32, win32.GetProcessHeap(), big)
    assert size_of(win32, win32.GetProcessHeap(), q) == big
    win32.write(q + big - 1, b"!")
    free(win32, win32.GetProcessHeap(), q)


@pytest.mark.parametrize("heap", ["private", "process", "fixed"])
def test_ha04_impossible_size_not_enough_memory(win32, heap):
    h = {"private": lambda: create(win32), "process": win32.GetProcessHeap,
         "fixed": lambda: create(win32, 0, A, A)}[heap]()
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, SIZE_T_MAX)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, 0, -1)  # (SIZE_T)-1 as C sees it
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapAlloc, h, HEAP_ZERO_MEMORY, SIZE_T_MAX - 7)
    assert validate(win32, h, 0)


@pytest.mark.parametrize("size", [1, A, MiB])
def test_ha05_zero_memory(win32, size):
    h = create(win32)
    dirty(win32, h, size, count=2)
    p = alloc(win32, h, size, HEAP_ZERO_MEMORY)
    assert size_of(win32, h, p) == size
    assert win32.read(p, size) == bytes(size)


def test_ha06_a_sized_blocks_are_16_aligned(win32):
    h = create(win32)
    pointers = [alloc(win32, h, A) for _ in range(128)]
    assert all(p % 16 == 0 for p in pointers)
    q = alloc(win32, win32.GetProcessHeap(), 0x80000)  # 512 KiB from the process heap
    assert q % 16 == 0


def test_ha07_large_blocks_are_64_aligned(win32):
    h = create(win32)
    pointers = [alloc(win32, h, 4 * A) for _ in range(128)]
    assert all(p % 64 == 0 for p in pointers)
    for p in pointers:
        free(win32, h, p)


# ---- 4. HeapReAlloc ---------------------------------------------------------------------------

def test_hr01_realloc_null_sets_no_error(win32):
    h = create(win32)
    fails(win32, ERROR_SUCCESS, win32.HeapReAlloc, h, 0, 0, 1)
    fails(win32, ERROR_SUCCESS, win32.HeapReAlloc, win32.GetProcessHeap(), 0, 0, 1)


@pytest.mark.parametrize("heap,flags", [("private", 0), ("process", HEAP_ZERO_MEMORY)])
def test_hr02_impossible_realloc_leaves_block(win32, heap, flags):
    h = create(win32) if heap == "private" else win32.GetProcessHeap()
    p = alloc(win32, h, 0)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapReAlloc, h, flags, p, SIZE_T_MAX - 7)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapReAlloc, h, flags, p, SIZE_T_MAX)
    assert validate(win32, h, p)
    assert size_of(win32, h, p) == 0
    free(win32, h, p)


@pytest.mark.parametrize("size", [1, 17])
def test_hr03_realloc_to_zero(win32, size):
    h = create(win32)
    p = alloc(win32, h, size)
    q = ok(win32, win32.HeapReAlloc, h, 0, p, 0)
    assert q == p
    assert size_of(win32, h, q) == 0
    free(win32, h, q)


def test_hr04_zero_memory_growth_is_zero_filled(win32):
    h = create(win32)
    dirty(win32, h, 3 * A, count=2)
    dirty(win32, h, MiB, count=1)
    p = alloc(win32, h, A, HEAP_ZERO_MEMORY)
    assert win32.read(p, A) == bytes(A)
    p = ok(win32, win32.HeapReAlloc, h, HEAP_ZERO_MEMORY, p, 3 * A)
    assert size_of(win32, h, p) == 3 * A and win32.read(p, 3 * A) == bytes(3 * A)
    p = ok(win32, win32.HeapReAlloc, h, HEAP_ZERO_MEMORY, p, 1)
    assert size_of(win32, h, p) == 1
    p = ok(win32, win32.HeapReAlloc, h, HEAP_ZERO_MEMORY, p, MiB)
    assert size_of(win32, h, p) == MiB and win32.read(p, MiB) == bytes(MiB)


def test_hr04_in_place_growth_keeps_data_and_zero_fills_dirty_tail(win32):
    h = create(win32, 0, 0x100000, 0)  # one big first region: the blocks below are adjacent
    p = alloc(win32, h, 0x8000)
    q = alloc(win32, h, 0x8000)
    assert q == p + 0x8000, "expected adjacent medium blocks"
    win32.write(q, b"\xCC" * 0x8000)
    free(win32, h, q)  # the bytes behind p are free but dirty
    data = pattern(0x8000)
    win32.write(p, data)
    r = ok(win32, win32.HeapReAlloc, h, HEAP_ZERO_MEMORY, p, 0x10000)
    assert size_of(win32, h, r) == 0x10000
    assert win32.read(r, 0x8000) == data
    assert win32.read(r + 0x8000, 0x8000) == bytes(0x8000)


def test_hr04_moving_growth_keeps_data_and_zero_fills(win32):
    h = create(win32)
    dirty(win32, h, 5000, count=8)
    p = alloc(win32, h, 100)
    data = pattern(100)
    win32.write(p, data)
    q = ok(win32, win32.HeapReAlloc, h, HEAP_ZERO_MEMORY, p, 5000)
    assert size_of(win32, h, q) == 5000
    assert win32.read(q, 100) == data
    assert win32.read(q + 100, 4900) == bytes(4900)
    # without HEAP_ZERO_MEMORY the first min(old, new) bytes are still kept
    r = ok(win32, win32.HeapReAlloc, h, 0, q, 50)
    assert win32.read(r, 50) == data[:50]


def test_hr05_in_place_shrink_then_regrow(win32):
    h = create(win32)
    p = alloc(win32, h, 3 * A)
    data = pattern(0x60000)
    win32.write(p, data)
    assert ok(win32, win32.HeapReAlloc, h, HEAP_REALLOC_IN_PLACE_ONLY, p, 0x60000) == p
    assert size_of(win32, h, p) == 0x60000
    assert ok(win32, win32.HeapReAlloc, h, HEAP_REALLOC_IN_PLACE_ONLY, p, 2 * A) == p
    assert size_of(win32, h, p) == 2 * A
    assert win32.read(p, 0x60000) == data


def test_hr06_large_block_shrinks_in_place_but_cannot_regrow(win32):
    h = create(win32)
    p = alloc(win32, h, MiB)
    data = pattern(0x60000)
    win32.write(p, data)
    assert ok(win32, win32.HeapReAlloc, h, HEAP_REALLOC_IN_PLACE_ONLY, p, 0x60000) == p
    info = win32.VirtualQuery(p)  # the pages beyond the new size were given back
    assert info.State == MEM_COMMIT and info.RegionSize == 0x60000
    assert win32.VirtualQuery(p + 0x60000).State == MEM_RESERVE
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapReAlloc, h, HEAP_REALLOC_IN_PLACE_ONLY, p, 2 * A)
    assert size_of(win32, h, p) == 0x60000 and validate(win32, h, p)
    assert win32.read(p, 0x60000) == data


def test_hr07_fixed_heap_realloc(win32):
    h = create(win32, 0, 8 * A, 8 * A)
    dirty(win32, h, 2 * A, count=2)
    p = alloc(win32, h, A, HEAP_ZERO_MEMORY)
    q = ok(win32, win32.HeapReAlloc, h, HEAP_ZERO_MEMORY, p, 2 * A)
    assert size_of(win32, h, q) == 2 * A
    assert win32.read(q, 2 * A) == bytes(2 * A)
    assert ok(win32, win32.HeapReAlloc, h, HEAP_REALLOC_IN_PLACE_ONLY, q, 0x60000) == q
    assert ok(win32, win32.HeapReAlloc, h, HEAP_REALLOC_IN_PLACE_ONLY, q, 2 * A) == q
    assert size_of(win32, h, q) == 2 * A


@pytest.mark.parametrize("size,grow", [(0x8000, 0x10000), (16, 2000), (100, 0x8000)])
def test_hr08_impossible_in_place_growth_leaves_block(win32, size, grow):
    h = create(win32)
    p = alloc(win32, h, size)
    neighbours = [alloc(win32, h, size) for _ in range(4)]  # the next block is in use
    data = pattern(size)
    win32.write(p, data)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.HeapReAlloc, h, HEAP_REALLOC_IN_PLACE_ONLY, p, grow)
    assert size_of(win32, h, p) == size
    assert validate(win32, h, p) and validate(win32, h, 0)
    assert win32.read(p, size) == data
    for q in neighbours:
        assert size_of(win32, h, q) == size


def bad_pointers(win32, size):
    """(h, live, other, freed, page): a heap with a live block of `size`, a second heap, a
    block freed from h, and a VirtualAlloc page (non-heap memory)."""
    h = create(win32)
    other = create(win32)
    live = alloc(win32, h, size)
    freed = alloc(win32, h, size)
    free(win32, h, freed)
    page = ok(win32, win32.VirtualAlloc, 0, 0x1000, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    return h, live, other, freed, page


def test_hr09_realloc_of_bad_pointers(win32):
    other, q, h, _, page = bad_pointers(win32, 40)  # q lives in `other`; h is a second heap
    freed = alloc(win32, h, 40)
    free(win32, h, freed)
    fails(win32, ERROR_NOACCESS, win32.HeapReAlloc, h, 0, OUTSIDE, 10)
    fails(win32, ERROR_INVALID_PARAMETER, win32.HeapReAlloc, h, 0, page + 0x100, 10)
    fails(win32, ERROR_INVALID_PARAMETER, win32.HeapReAlloc, h, 0, q, 10)
    fails(win32, ERROR_INVALID_PARAMETER, win32.HeapReAlloc, h, 0, freed, 10)
    assert size_of(win32, other, q) == 40 and validate(win32, other, q)
    assert validate(win32, h, 0) and validate(win32, other, 0)


# ---- 5. HeapFree, HeapValidate, HeapSize on bad pointers -------------------------------------

def test_hf01_free_null_is_true(win32):
    h = create(win32)
    assert ok(win32, win32.HeapFree, h, 0, 0) is True
    assert ok(win32, win32.HeapFree, 0, 0, 0) is True  # before the (NULL) heap is looked at


@pytest.mark.parametrize("size", [24, 0x8000, 2 * MiB])
def test_hf02_double_free_is_invalid_parameter(win32, size):
    h = create(win32)
    keep = alloc(win32, h, size)
    p = alloc(win32, h, size)
    free(win32, h, p)
    fails(win32, ERROR_INVALID_PARAMETER, win32.HeapFree, h, 0, p, result=False)
    assert validate(win32, h, 0)
    assert validate(win32, h, keep) and size_of(win32, h, keep) == size
    assert alloc(win32, h, size)  # the heap still works


def test_hf03_pointer_of_another_heap(win32):
    h1 = create(win32)
    h2 = create(win32)
    for size in (24, 0x8000, 2 * MiB):
        p = alloc(win32, h1, size)
        fails(win32, ERROR_INVALID_PARAMETER, win32.HeapFree, h2, 0, p, result=False)
        fails(win32, ERROR_INVALID_PARAMETER, win32.HeapFree, win32.GetProcessHeap(), 0, p,
              result=False)
        assert size_of(win32, h1, p) == size and validate(win32, h1, p)
        assert validate(win32, h2, 0) and validate(win32, h1, 0)
        free(win32, h1, p)


@pytest.mark.parametrize("heap", ["private", "process"])
def test_hf04_validate_whole_heap(win32, heap):
    h = create(win32) if heap == "private" else win32.GetProcessHeap()
    blocks = [alloc(win32, h, s) for s in (0, 1, 100, 5000, 0x8000, 2 * MiB)]
    assert validate(win32, h, 0) is True
    for p in blocks[::2]:
        free(win32, h, p)
    assert validate(win32, h, 0) is True


def test_hf05_validate_block_then_freed_then_non_heap(win32):
    h = create(win32)
    page = ok(win32, win32.VirtualAlloc, 0, 0x1000, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    for size in (24, 0x8000, 2 * MiB):
        keep = alloc(win32, h, size)
        p = alloc(win32, h, size)
        assert validate(win32, h, p) is True
        free(win32, h, p)
        assert validate(win32, h, p) is False
        assert validate(win32, h, keep) is True
    assert validate(win32, h, page) is False
    assert validate(win32, h, page + 0x10) is False
    assert validate(win32, h, keep + 16) is False  # inside a live block, not its start


def test_hf05_free_checking_detects_write_after_free(win32):
    h = create(win32, HEAP_FREE_CHECKING_ENABLED)
    for size in (64, 0x8000):
        p = alloc(win32, h, size)
        keep = alloc(win32, h, size)  # keeps p's pages committed
        free(win32, h, p)
        assert validate(win32, h, 0) is True
        raw = client_module.default_client().raw_view(p + 8, 1)
        old = bytes(raw)
        raw[:] = b"X" if old != b"X" else b"Y"
        assert validate(win32, h, 0) is False
        raw[:] = old  # undo the write: the heap is sound again
        assert validate(win32, h, 0) is True
        free(win32, h, keep)


@pytest.mark.parametrize("size", [0, 1, 16, 100, 0x8000])
def test_hf05_tail_checking_detects_overrun(win32, size):
    h = create(win32, HEAP_TAIL_CHECKING_ENABLED)
    p = alloc(win32, h, size)
    other = alloc(win32, h, size)
    assert validate(win32, h, p) is True and validate(win32, h, 0) is True
    win32.write(p, b"\x11" * size)  # writing the block itself is fine
    assert validate(win32, h, p) is True and validate(win32, h, 0) is True
    win32.write(p + size, b"X")  # one byte past the end
    assert validate(win32, h, p) is False
    assert validate(win32, h, 0) is False
    assert validate(win32, h, other) is True
    fails(win32, ERROR_INVALID_PARAMETER, win32.HeapSize, h, 0, p, result=SIZE_T_MAX)  # HF-07


def test_hf06_free_unmapped_address_noaccess(win32):
    h = create(win32)
    fails(win32, ERROR_NOACCESS, win32.HeapFree, h, 0, OUTSIDE, result=False)
    fails(win32, ERROR_NOACCESS, win32.HeapFree, h, 0, 0xDEADBE00 * 0x100, result=False)
    fails(win32, ERROR_NOACCESS, win32.HeapFree, win32.GetProcessHeap(), 0, OUTSIDE, result=False)
    assert validate(win32, h, 0)


def test_hf06_validate_unmapped_address_false_err_unchanged(win32):
    h = create(win32)
    assert validate(win32, h, OUTSIDE) is False
    assert validate(win32, win32.GetProcessHeap(), OUTSIDE) is False


def test_hf06_free_non_heap_memory_err_unchanged(win32):
    h = create(win32)
    page = ok(win32, win32.VirtualAlloc, 0, 0x1000, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    fails(win32, SENTINEL, win32.HeapFree, h, 0, page + 0x100, result=False)


def test_hf07_heap_size_of_bad_pointers(win32):
    h1, p, h2, freed, page = bad_pointers(win32, 100)
    for bad_heap, bad in ((h2, p), (h1, freed), (h1, p + 16), (h1, page)):
        fails(win32, ERROR_INVALID_PARAMETER, win32.HeapSize, bad_heap, 0, bad, result=SIZE_T_MAX)
    assert size_of(win32, h1, p) == 100


def test_hf08_local_handle_slot_is_not_a_heap_block(win32):
    heap = win32.GetProcessHeap()
    handle = ok(win32, win32.LocalAlloc, LMEM_MOVEABLE, 100)
    data = ok(win32, win32.LocalLock, handle)
    assert validate(win32, heap, handle) is False
    assert validate(win32, heap, data) is True
    assert size_of(win32, heap, data) == 100
    assert win32.LocalFree(handle) == 0


# ---- 6. HeapWalk, HeapLock/HeapUnlock, HeapCompact -------------------------------------------

def _check_fresh_walk(h, entries):
    assert len(entries) == 3, entries
    region, free_block, uncommitted = entries
    assert region.wFlags == PROCESS_HEAP_REGION and region.lpData == h
    assert region.cbOverhead == 0 and region.iRegionIndex == 0
    assert region.committed == 0x400 * 8 == 0x2000
    assert region.uncommitted == 0x10000 - 0x2000
    assert free_block.wFlags == 0 and free_block.cbData > 0
    assert h <= free_block.lpData and free_block.lpData + free_block.cbData <= h + 0x2000
    assert uncommitted.wFlags == PROCESS_HEAP_UNCOMMITTED_RANGE
    assert uncommitted.lpData == h + 0x2000 and uncommitted.cbOverhead == 0


def test_hw01_walk_of_fresh_heap(win32):
    h = create(win32)
    _check_fresh_walk(h, walk(win32, h))


def test_hw02_busy_entries_exact_in_address_order(win32):
    h = create(win32)
    p1 = alloc(win32, h, 123)
    p2 = alloc(win32, h, 456)
    entries = walk(win32, h)
    assert entries[0].wFlags == PROCESS_HEAP_REGION and entries[0].lpData == h
    busy = [e for e in entries if e.wFlags & PROCESS_HEAP_ENTRY_BUSY]
    assert [(e.lpData, e.cbData) for e in busy] == sorted([(p1, 123), (p2, 456)])
    assert all(e.cbOverhead != 0 and e.wFlags == PROCESS_HEAP_ENTRY_BUSY for e in busy)
    addresses = [e.lpData for e in entries[1:]]
    assert addresses == sorted(addresses), "entries are not in address order"


def test_hw02_walk_after_freeing_is_fresh_again(win32):
    h = create(win32)
    fresh = walk(win32, h)
    p1 = alloc(win32, h, 123)
    p2 = alloc(win32, h, 456)
    free(win32, h, p1)
    free(win32, h, p2)
    assert walk(win32, h) == fresh


def test_hw03_large_block_is_last_entry(win32):
    h = create(win32)
    fresh = walk(win32, h)
    p = alloc(win32, h, 5 * A)
    entries = walk(win32, h)
    assert entries[:3] == fresh[:3]
    assert len(entries) == 4
    last = entries[3]
    assert (last.wFlags, last.lpData, last.cbData, last.cbOverhead, last.iRegionIndex) == (
        PROCESS_HEAP_ENTRY_BUSY, p, 5 * A, 0, 64)


def test_hw04_no_moveable_or_ddeshare_flags_in_walk(win32):
    heap = win32.GetProcessHeap()
    handles = [win32.LocalAlloc(LMEM_MOVEABLE, 1 + i % 64) for i in range(65536)]
    assert all(handles) and len(set(handles)) == 65536
    assert ok(win32, win32.HeapLock, heap) is True
    try:
        entries = walk(win32, heap, limit=10**7)
    finally:
        assert ok(win32, win32.HeapUnlock, heap) is True
    assert sum(1 for e in entries if e.wFlags & PROCESS_HEAP_ENTRY_BUSY) >= 65536
    assert not any(e.wFlags & (PROCESS_HEAP_ENTRY_MOVEABLE | PROCESS_HEAP_ENTRY_DDESHARE)
                   for e in entries)
    for handle in handles:
        assert win32.LocalFree(handle) == 0


def _blocked_then_released(w, h, action, *, unlocks=1):
    """Main thread holds HeapLock(h) `unlocks` times; `action` runs in thread B and must
    still be waiting after BLOCKED seconds, then finish once every lock is released."""
    for _ in range(unlocks):
        assert ok(w, w.HeapLock, h) is True
    try:
        done, result = start_thread(action)
        assert not done.wait(BLOCKED), "thread B was not blocked by HeapLock"
        for remaining in range(unlocks - 1, 0, -1):
            assert ok(w, w.HeapUnlock, h) is True
            assert not done.wait(BLOCKED), f"B ran with {remaining} lock(s) still held"
    finally:
        assert ok(w, w.HeapUnlock, h) is True
    assert done.wait(DEADLINE), "thread B did not finish after HeapUnlock"
    assert "error" not in result, result.get("error")
    return result["value"]


def test_hl01_heap_lock_blocks_other_thread(win32):
    h = create(win32)
    p = alloc(win32, h, 32)

    def lock_unlock():
        return win32.HeapLock(h), win32.HeapUnlock(h)

    assert _blocked_then_released(win32, h, lock_unlock) == (True, True)
    q = _blocked_then_released(win32, h, lambda: win32.HeapAlloc(h, 0, 64))
    assert q and size_of(win32, h, q) == 64
    assert _blocked_then_released(win32, h, lambda: win32.HeapFree(h, 0, p)) is True
    assert validate(win32, h, p) is False


def test_hl01_heap_lock_is_recursive(win32):
    h = create(win32)
    q = _blocked_then_released(win32, h, lambda: win32.HeapAlloc(h, 0, 64), unlocks=3)
    assert q and size_of(win32, h, q) == 64


def test_hl02_no_serialize_calls_bypass_the_lock(win32):
    h = create(win32)
    p = alloc(win32, h, 32)
    assert ok(win32, win32.HeapLock, h) is True
    try:
        done, result = start_thread(lambda: (win32.HeapAlloc(h, HEAP_NO_SERIALIZE, 64),
                                             win32.HeapFree(h, HEAP_NO_SERIALIZE, p)))
        assert done.wait(DEADLINE), "HEAP_NO_SERIALIZE calls were blocked by HeapLock"
    finally:
        assert ok(win32, win32.HeapUnlock, h) is True
    assert "error" not in result, result.get("error")
    q, freed = result["value"]
    assert q and freed is True
    assert size_of(win32, h, q) == 64 and validate(win32, h, p) is False


def test_hl03_no_serialize_heap_lock_excludes_nothing(win32):
    h = create(win32, HEAP_NO_SERIALIZE)
    assert ok(win32, win32.HeapLock, h) is True
    try:
        def other():
            locked = win32.HeapLock(h)
            q = win32.HeapAlloc(h, 0, 64)
            return locked, q, win32.HeapUnlock(h)

        done, result = start_thread(other)
        assert done.wait(DEADLINE), "HeapLock of a HEAP_NO_SERIALIZE heap blocked"
        done2, result2 = start_thread(lambda: win32.HeapAlloc(h, 0, 32))
        assert done2.wait(DEADLINE)
    finally:
        assert ok(win32, win32.HeapUnlock, h) is True
    locked, q, unlocked = result["value"]
    assert locked is True and q and unlocked is True
    assert result2["value"]


def test_hi07_heap_compact(win32):
    h = create(win32)
    blocks = {}
    for i, size in enumerate([16, 300, 5000, 0x8000, 0x30000, 0x8000, 2 * MiB, 64]):
        p = alloc(win32, h, size)
        blocks[p] = (size, pattern(size, i))
        win32.write(p, blocks[p][1])
    for p in list(blocks)[1::2]:
        free(win32, h, p)
        del blocks[p]
    win32.SetLastError(SENTINEL)
    largest = win32.HeapCompact(h, 0)
    assert type(largest) is int and 0 <= largest < SIZE_T_MAX
    assert win32.GetLastError() == (SENTINEL if largest else ERROR_SUCCESS)
    free_sizes = [e.cbData for e in walk(win32, h) if e.wFlags == 0]
    assert largest == max(free_sizes, default=0)
    for p, (size, data) in blocks.items():
        assert size_of(win32, h, p) == size and validate(win32, h, p)
        assert win32.read(p, size) == data
    assert validate(win32, h, 0)


def test_hi07_compact_of_fresh_and_process_heap(win32):
    h = create(win32)
    fresh = win32.HeapCompact(h, 0)
    assert fresh == max(e.cbData for e in walk(win32, h) if e.wFlags == 0) > 0
    assert type(win32.HeapCompact(win32.GetProcessHeap(), 0)) is int
