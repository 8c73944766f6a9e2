"""Conformance of the Win32 virtual-memory facade (`shmheap.win32`) with
../shared/reference/win32_semantics.md sections 8-11 (rows VA-*, VF-*, VQ-*, VP-*), plus
GetSystemInfo, GlobalMemoryStatusEx, GetLastError/SetLastError and the byte helpers.

Every test runs against a real daemon (the `win32` fixture, 256 MiB segment). Tests are named
after the reference row they check. Addresses are pointers into the segment, which the daemon
maps at a base of its choosing: row addresses such as 0x50000000 are moved to BASE (the base
+ 64 MiB, set for each test), keeping their offsets from the 64 KiB granule.

Rows not tested, because they do not apply to this emulator:
  VA-08  the reference gives no reliable behaviour (PAGE_GUARD on MEM_RESERVE only).
  VA-23  VirtualAllocEx/VirtualFreeEx take a process handle; the facade has no *Ex calls.
  VP-07  lpflOldProtect is an out-parameter in C; here the old protection is the return value.
"""

import array
import json
import os
import select
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from shmheap.constants import (
    AT_ROUND_TO_PAGE, MEM_COMMIT, MEM_DECOMMIT, MEM_FREE, MEM_PRIVATE, MEM_RELEASE, MEM_RESERVE,
    MEM_RESET, MEM_TOP_DOWN, MEM_WRITE_WATCH, PAGE_EXECUTE, PAGE_EXECUTE_READ,
    PAGE_EXECUTE_READWRITE, PAGE_EXECUTE_WRITECOPY, PAGE_GUARD, PAGE_NOACCESS, PAGE_NOCACHE,
    PAGE_READONLY, PAGE_READWRITE, PAGE_WRITECOMBINE, PAGE_WRITECOPY,
)
from shmheap.errors import GuardPageError, ShmheapPermissionError, WinError

from conftest import bind_win32, wait_until

PAGE = 0x1000
GRANULE = 0x10000
MiB = 2**20
SEGMENT = 256 * MiB  # the `win32` fixture's daemon
BASE = None  # stands in for the reference's 0x50000000: segment base + 64 MiB, set per test
END = None  # the segment's end, set per test
SENTINEL = 0xDEADBEEF
DEADLINE = 30.0  # seconds, for anything that waits on another process

BASE_PROTECTIONS = (PAGE_NOACCESS, PAGE_READONLY, PAGE_READWRITE, PAGE_EXECUTE,
                    PAGE_EXECUTE_READ, PAGE_EXECUTE_READWRITE)

ERROR_NOT_ENOUGH_MEMORY = WinError.ERROR_NOT_ENOUGH_MEMORY
ERROR_BAD_LENGTH = WinError.ERROR_BAD_LENGTH
ERROR_NOT_SUPPORTED = WinError.ERROR_NOT_SUPPORTED
ERROR_INVALID_PARAMETER = WinError.ERROR_INVALID_PARAMETER
ERROR_INVALID_ADDRESS = WinError.ERROR_INVALID_ADDRESS
ERROR_NOACCESS = WinError.ERROR_NOACCESS
ERROR_COMMITMENT_LIMIT = WinError.ERROR_COMMITMENT_LIMIT
STATUS_GUARD_PAGE_VIOLATION = WinError.STATUS_GUARD_PAGE_VIOLATION


# ---- helpers ---------------------------------------------------------------------------------

_FAILURE_RESULT = {"VirtualAlloc": 0, "VirtualProtect": 0, "VirtualFree": False, "VirtualQuery": None}


def ok(w, fn, *args):
    """Call fn(*args), assert it succeeded and left the last error untouched; return its result."""
    w.SetLastError(SENTINEL)
    result = fn(*args)
    assert result is not None and result is not False and result != 0, (
        f"{fn.__name__}{tuple(hex(a) if isinstance(a, int) else a for a in args)} failed "
        f"with error {w.GetLastError()}")
    assert w.GetLastError() == SENTINEL, (
        f"{fn.__name__} succeeded but changed the last error to {w.GetLastError()}")
    return result


def _assert_failure_result(fn, args, result):
    expected = _FAILURE_RESULT[fn.__name__]
    if expected is None or expected is False:
        assert result is expected, f"{fn.__name__}{args} returned {result!r}, expected {expected!r}"
    else:
        assert type(result) is int and result == 0, f"{fn.__name__}{args} returned {result!r}, expected 0"


def fails(w, error, fn, *args):
    """Call fn(*args), assert it returned C's failure value and set GetLastError() to error."""
    w.SetLastError(SENTINEL)
    result = fn(*args)
    _assert_failure_result(fn, args, result)
    got = w.GetLastError()
    assert got == error, f"{fn.__name__}: GetLastError() = {got}, expected {int(error)} ({error!r})"


def fails_any(w, fn, *args):
    """Call fn(*args), assert it returned C's failure value with some non-zero error set;
    return that error."""
    w.SetLastError(0)
    result = fn(*args)
    _assert_failure_result(fn, args, result)
    assert w.GetLastError() != 0, f"{fn.__name__}{args} failed without setting an error"
    return w.GetLastError()


def query(w, address):
    return ok(w, w.VirtualQuery, address)


def mbi(w, base, allocation_base, allocation_protect, size, state, protect, type_=MEM_PRIVATE):
    return w.MEMORY_BASIC_INFORMATION(BaseAddress=base, AllocationBase=allocation_base,
                                      AllocationProtect=allocation_protect, RegionSize=size,
                                      State=state, Protect=protect, Type=type_)


def reserve(w, size=GRANULE, address=0, protect=PAGE_NOACCESS):
    return ok(w, w.VirtualAlloc, address, size, MEM_RESERVE, protect)


def allocate(w, size, protect=PAGE_READWRITE, address=0):
    """Reserve and commit; returns the base."""
    return ok(w, w.VirtualAlloc, address, size, MEM_RESERVE | MEM_COMMIT, protect)


def release(w, address):
    assert ok(w, w.VirtualFree, address, 0, MEM_RELEASE) is True


def assert_free(w, address):
    q = query(w, address)
    assert q.State == MEM_FREE, f"{address:#x} is not free: {q}"
    return q


def view_error(w, address, size, *, write=False):
    """The winerror of the exception view() raises (failing the test if it does not)."""
    with pytest.raises(ShmheapPermissionError) as info:
        w.view(address, size, write=write)
    return info.value.winerror


@pytest.fixture(autouse=True)
def _addresses(request):
    """BASE and END for a test bound to the `win32` daemon: where its segment lies."""
    global BASE, END
    if "win32" in request.fixturenames:
        info = request.getfixturevalue("win32").GetSystemInfo()
        BASE = info.lpMinimumApplicationAddress - GRANULE + 0x4000000
        END = info.lpMaximumApplicationAddress + 1


@pytest.fixture
def limited_daemon(make_daemon):
    return make_daemon("--commit-limit", "1M")


@pytest.fixture
def win32_limited(limited_daemon, monkeypatch):
    """The facade bound to a daemon with a 1 MiB commit limit."""
    yield from bind_win32(limited_daemon, monkeypatch)


@pytest.fixture
def win32_process_limited(make_daemon, monkeypatch):
    """The facade bound to a daemon whose per-process commit limit is 4 MiB."""
    yield from bind_win32(make_daemon("--process-commit-limit", "4M"), monkeypatch)


# ---- 8. VirtualAlloc -------------------------------------------------------------------------

def test_va01_zero_size_is_invalid_parameter(win32):
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, 0, 0, MEM_RESERVE, PAGE_NOACCESS)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, 0, 0, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    a = reserve(win32)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, a, 0, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, a).State == MEM_RESERVE


def test_va02_reserve_rounds_to_pages(win32):
    a = reserve(win32, 0xFFFC)
    assert a % GRANULE == 0 and a >= 0x10000
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x10000, MEM_RESERVE, 0)
    assert ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_NOACCESS) == a
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x1000, MEM_COMMIT, PAGE_NOACCESS)


def test_va02_reserve_of_odd_size_rounds_up_to_whole_pages(win32):
    a = reserve(win32, 0x1001)
    assert query(win32, a).RegionSize == 0x2000
    assert_free(win32, a + 0x2000)


def test_va03_released_address_can_be_allocated_again(win32):
    a = allocate(win32, 0x2000, PAGE_EXECUTE_READWRITE)
    assert a % GRANULE == 0
    release(win32, a)
    assert_free(win32, a)
    assert ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_RESERVE | MEM_COMMIT, PAGE_EXECUTE_READWRITE) == a
    assert query(win32, a) == mbi(win32, a, a, PAGE_EXECUTE_READWRITE, 0x1000, MEM_COMMIT,
                                  PAGE_EXECUTE_READWRITE)


@pytest.mark.parametrize("protect", BASE_PROTECTIONS, ids=hex)
def test_va04_commit_without_reserve_implies_reserve(win32, protect):
    a = ok(win32, win32.VirtualAlloc, 0, 0x1000, MEM_COMMIT, protect)
    assert a % GRANULE == 0
    assert query(win32, a) == mbi(win32, a, a, protect, 0x1000, MEM_COMMIT, protect)
    assert_free(win32, a + 0x1000)
    if protect in (PAGE_READWRITE, PAGE_EXECUTE_READWRITE):
        win32.write(a, b"written")
        assert query(win32, a).Protect == protect  # writing does not change Protect
    assert ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, protect) == a
    assert query(win32, a) == mbi(win32, a, a, protect, 0x1000, MEM_COMMIT, protect)


def test_va05_every_invalid_base_protection_is_refused(win32):
    free_before = win32.GlobalMemoryStatusEx().ullAvailVirtual
    target = reserve(win32)
    for protect in range(0x100):
        for alloc_type in (MEM_COMMIT, MEM_RESERVE, MEM_RESERVE | MEM_COMMIT):
            if protect in BASE_PROTECTIONS:
                a = ok(win32, win32.VirtualAlloc, 0, 0x1000, alloc_type, protect)
                release(win32, a)
            else:
                fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, 0, 0x1000, alloc_type, protect)
        if protect not in BASE_PROTECTIONS:
            # committing into an existing reservation checks the protection as well
            fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, target, 0x1000, MEM_COMMIT, protect)
    assert query(win32, target) == mbi(win32, target, target, PAGE_NOACCESS, 0x10000, MEM_RESERVE, 0)
    release(win32, target)
    assert win32.GlobalMemoryStatusEx().ullAvailVirtual == free_before  # no failed call kept a range


@pytest.mark.parametrize("protect", [
    0, PAGE_READONLY | PAGE_NOACCESS, PAGE_READONLY | PAGE_EXECUTE, PAGE_EXECUTE_READ | PAGE_EXECUTE,
    PAGE_WRITECOPY, PAGE_EXECUTE_WRITECOPY, PAGE_NOACCESS | PAGE_GUARD, PAGE_NOACCESS | PAGE_WRITECOMBINE,
    PAGE_GUARD, PAGE_NOCACHE, PAGE_READWRITE | PAGE_EXECUTE_WRITECOPY,
], ids=hex)
@pytest.mark.parametrize("alloc_type", [MEM_COMMIT, MEM_RESERVE, MEM_RESERVE | MEM_COMMIT], ids=hex)
def test_va05_invalid_protection_is_invalid_parameter(win32, protect, alloc_type):
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, 0, 0x1000, alloc_type, protect)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, BASE, 0x1000, alloc_type, protect)
    assert_free(win32, BASE)


@pytest.mark.parametrize("protect", [PAGE_READWRITE | PAGE_GUARD, PAGE_READONLY | PAGE_GUARD,
                                     PAGE_READWRITE | PAGE_NOCACHE, PAGE_READWRITE | PAGE_WRITECOMBINE,
                                     PAGE_EXECUTE_READ | PAGE_GUARD], ids=hex)
def test_va05_base_protection_with_a_modifier_is_valid(win32, protect):
    a = allocate(win32, 0x1000, protect)
    assert query(win32, a) == mbi(win32, a, a, protect, 0x1000, MEM_COMMIT, protect)


def test_va06_guard_page_allocation_reports_0x104(win32):
    a = allocate(win32, 0x1000, PAGE_READWRITE | PAGE_GUARD)
    q = query(win32, a)
    assert q.Protect == 0x104 and q.AllocationProtect == 0x104
    assert q == mbi(win32, a, a, 0x104, 0x1000, MEM_COMMIT, 0x104)


def test_va07_first_read_of_guard_page_raises_once_and_clears_guard(win32):
    a = allocate(win32, 0x1000, PAGE_READWRITE | PAGE_GUARD)
    with pytest.raises(GuardPageError) as info:
        win32.view(a, 16)
    assert info.value.winerror == STATUS_GUARD_PAGE_VIOLATION == 0x80000001
    assert query(win32, a) == mbi(win32, a, a, 0x104, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    assert win32.read(a, 16) == bytes(16)  # the second access succeeds
    assert win32.read(a, 16) == bytes(16)


def test_va07_first_write_of_guard_page_raises_once_and_writes_nothing(win32):
    a = allocate(win32, 0x1000, PAGE_READWRITE | PAGE_GUARD)
    with pytest.raises(GuardPageError):
        win32.write(a, b"first")
    assert query(win32, a).Protect == PAGE_READWRITE
    assert win32.read(a, 5) == bytes(5)
    win32.write(a, b"again")
    assert win32.read(a, 5) == b"again"


@pytest.mark.parametrize("touch", ["read", "write", "view_write", "CopyMemory_to", "CopyMemory_from",
                                   "FillMemory", "ZeroMemory"])
def test_va07_every_byte_helper_trips_the_guard_once(win32, touch):
    guarded = allocate(win32, 0x1000, PAGE_READWRITE | PAGE_GUARD)
    plain = allocate(win32, 0x1000)
    win32.write(plain, b"plain")
    do = {
        "read": lambda: win32.read(guarded, 5),
        "write": lambda: win32.write(guarded, b"bytes"),
        "view_write": lambda: win32.view(guarded, 5, write=True),
        "CopyMemory_to": lambda: win32.CopyMemory(guarded, plain, 5),
        "CopyMemory_from": lambda: win32.CopyMemory(plain, guarded, 5),
        "FillMemory": lambda: win32.FillMemory(guarded, 5, 0x61),
        "ZeroMemory": lambda: win32.ZeroMemory(guarded, 5),
    }[touch]
    with pytest.raises(GuardPageError) as info:
        do()
    assert info.value.winerror == STATUS_GUARD_PAGE_VIOLATION
    assert query(win32, guarded).Protect == PAGE_READWRITE
    do()  # the guard is gone
    assert query(win32, guarded) == mbi(win32, guarded, guarded, 0x104, 0x1000, MEM_COMMIT, PAGE_READWRITE)


def test_va07_guard_is_cleared_only_on_the_touched_page(win32):
    a = allocate(win32, 0x2000, PAGE_READWRITE | PAGE_GUARD)
    with pytest.raises(GuardPageError):
        win32.view(a, 1)
    assert query(win32, a) == mbi(win32, a, a, 0x104, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, a + 0x1000) == mbi(win32, a + 0x1000, a, 0x104, 0x1000, MEM_COMMIT, 0x104)
    win32.view(a, 1)
    with pytest.raises(GuardPageError):
        win32.view(a + 0x1000, 1)
    assert query(win32, a) == mbi(win32, a, a, 0x104, 0x2000, MEM_COMMIT, PAGE_READWRITE)
    assert len(win32.view(a, 0x2000)) == 0x2000


def test_va07_view_over_a_guard_page_in_the_middle_raises_once(win32):
    a = allocate(win32, 0x3000)
    assert ok(win32, win32.VirtualProtect, a + 0x1000, 0x1000, PAGE_READWRITE | PAGE_GUARD) == PAGE_READWRITE
    with pytest.raises(GuardPageError):
        win32.view(a, 0x3000, write=True)
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x3000, MEM_COMMIT, PAGE_READWRITE)
    win32.view(a, 0x3000, write=True)[:] = b"g" * 0x3000
    assert win32.read(a + 0x1800, 2) == b"gg"


def test_va09_nocache_is_sticky_across_virtualprotect(win32):
    a = ok(win32, win32.VirtualAlloc, 0, 0x2000, MEM_COMMIT, PAGE_READWRITE | PAGE_NOCACHE)
    assert query(win32, a) == mbi(win32, a, a, 0x204, 0x2000, MEM_COMMIT, 0x204)
    assert ok(win32, win32.VirtualProtect, a, 0x1000, PAGE_READWRITE) == 0x204
    assert query(win32, a) == mbi(win32, a, a, 0x204, 0x2000, MEM_COMMIT, 0x204)


def test_va09_nocache_added_by_virtualprotect_is_ignored(win32):
    b = allocate(win32, 0x1000, PAGE_READWRITE)
    assert ok(win32, win32.VirtualProtect, b, 0x1000, PAGE_READONLY | PAGE_NOCACHE) == PAGE_READWRITE
    assert query(win32, b) == mbi(win32, b, b, PAGE_READWRITE, 0x1000, MEM_COMMIT, PAGE_READONLY)


def test_va10_recommit_with_another_protection_changes_it(win32):
    a = allocate(win32, 0x2000, PAGE_READWRITE)
    win32.write(a, b"keep")
    assert ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_READONLY) == a
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x1000, MEM_COMMIT, PAGE_READONLY)
    assert query(win32, a + 0x1000).Protect == PAGE_READWRITE
    assert win32.read(a, 4) == b"keep"  # recommitting does not clear committed pages
    assert view_error(win32, a, 4, write=True) == ERROR_NOACCESS


@pytest.mark.parametrize("alloc_type", [
    0, MEM_TOP_DOWN, MEM_RESET | MEM_COMMIT, MEM_RESET | MEM_COMMIT | MEM_RESERVE, 0xFFFFFFFF, -1,
    AT_ROUND_TO_PAGE, AT_ROUND_TO_PAGE | MEM_COMMIT, AT_ROUND_TO_PAGE | MEM_RESERVE | MEM_COMMIT,
    MEM_WRITE_WATCH, MEM_WRITE_WATCH | MEM_COMMIT, MEM_RESET | MEM_RESERVE,
], ids=hex)
def test_va11_invalid_allocation_type(win32, alloc_type):
    free_before = win32.GlobalMemoryStatusEx().ullAvailVirtual
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, 0, 0x1000, alloc_type, PAGE_READWRITE)
    a = reserve(win32)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, a, 0x1000, alloc_type, PAGE_READWRITE)
    assert query(win32, a).State == MEM_RESERVE
    release(win32, a)
    assert win32.GlobalMemoryStatusEx().ullAvailVirtual == free_before


def test_va11_write_watch_with_reserve_is_not_supported(win32):
    # Windows accepts MEM_RESERVE+MEM_WRITE_WATCH; this emulator does not implement write
    # watching and says so with ERROR_NOT_SUPPORTED (the brief's mapping).
    fails(win32, ERROR_NOT_SUPPORTED, win32.VirtualAlloc, 0, 0x10000, MEM_RESERVE | MEM_WRITE_WATCH, PAGE_READWRITE)
    fails(win32, ERROR_NOT_SUPPORTED, win32.VirtualAlloc, 0, 0x10000,
          MEM_RESERVE | MEM_COMMIT | MEM_WRITE_WATCH, PAGE_READWRITE)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, 0, 0x10000, MEM_COMMIT | MEM_WRITE_WATCH, PAGE_READWRITE)


@pytest.mark.parametrize("alloc_type", [MEM_RESERVE | MEM_COMMIT, MEM_RESERVE, MEM_COMMIT], ids=hex)
def test_va12_top_down_is_above_bottom_up(win32, alloc_type):
    size = 0x30000
    top = win32.GetSystemInfo().lpMaximumApplicationAddress + 1
    bottom = ok(win32, win32.VirtualAlloc, 0, size, alloc_type, PAGE_READWRITE)
    high = ok(win32, win32.VirtualAlloc, 0, size, alloc_type | MEM_TOP_DOWN, PAGE_READWRITE)
    assert high > bottom and high % GRANULE == 0
    assert high + size <= top
    # the highest suitable free address: nothing free is left above it
    assert high + size == top or query(win32, high + size).State != MEM_FREE
    committed = bool(alloc_type & MEM_COMMIT)
    assert query(win32, high) == mbi(win32, high, high, PAGE_READWRITE, size,
                                     MEM_COMMIT if committed else MEM_RESERVE,
                                     PAGE_READWRITE if committed else 0)
    lower = ok(win32, win32.VirtualAlloc, 0, size, alloc_type | MEM_TOP_DOWN, PAGE_READWRITE)
    assert lower == high - size  # the next top-down allocation goes right below it


def test_va13_mem_reset_keeps_committed_page(win32):
    a = reserve(win32)
    assert ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_READWRITE) == a
    win32.FillMemory(a, 0x1000, 0x55)
    assert ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_RESET, PAGE_NOACCESS) == a
    # VA-13 allows either old contents or zeros; this emulator keeps them.
    assert win32.read(a, 0x1000) == b"\x55" * 0x1000
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x1000, MEM_COMMIT, PAGE_READWRITE)


def test_va13_mem_reset_with_zero_size_or_on_free_memory_fails(win32):
    a = allocate(win32, 0x1000)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, a, 0, MEM_RESET, PAGE_NOACCESS)
    assert_free(win32, BASE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, BASE, 0x1000, MEM_RESET, PAGE_NOACCESS)


def test_va14_mem_reset_on_reserved_page_leaves_it_reserved(win32):
    a = reserve(win32)
    ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    assert ok(win32, win32.VirtualAlloc, a + 0x1000, 0x1000, MEM_RESET, PAGE_NOACCESS) == a + 0x1000
    assert query(win32, a + 0x1000) == mbi(win32, a + 0x1000, a, PAGE_NOACCESS, 0xF000, MEM_RESERVE, 0)


def test_va15_mem_reset_crossing_the_reservation_end_fails(win32):
    a = reserve(win32, address=BASE)
    assert a == BASE
    ok(win32, win32.VirtualAlloc, a + 0xF000, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, a + 0xF000, 0x2000, MEM_RESET, PAGE_NOACCESS)
    # the same with a reservation right behind it
    reserve(win32, address=BASE + GRANULE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, a + 0xF000, 0x2000, MEM_RESET, PAGE_NOACCESS)


@pytest.mark.parametrize("offset, size, span", [
    (0x0, 1, 0x1000), (0x8000, 1, 0x9000), (0x10, 0x1000, 0x2000), (0x10000, 0x2000, 0x2000),
    (0xFFFF, 0x3000, 0x13000), (0x1010, 0x7000, 0x9000), (0x1010, 0xC000, 0xE000),
], ids=lambda v: hex(v))
def test_va16_reserve_at_address_rounds_base_down_and_end_up(win32, offset, size, span):
    address = BASE + offset
    base = address - address % GRANULE
    assert_free(win32, base)
    assert ok(win32, win32.VirtualAlloc, address, size, MEM_RESERVE, PAGE_NOACCESS) == base
    assert query(win32, base) == mbi(win32, base, base, PAGE_NOACCESS, span, MEM_RESERVE, 0)
    assert_free(win32, base + span)


def test_va17_granule_holds_one_allocation_and_commit_stays_inside(win32):
    assert ok(win32, win32.VirtualAlloc, BASE + 0x1010, 0x1000, MEM_RESERVE, PAGE_NOACCESS) == BASE
    assert query(win32, BASE).RegionSize == 0x3000
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, BASE + 0x8000, 0x1000, MEM_RESERVE, PAGE_NOACCESS)
    assert ok(win32, win32.VirtualAlloc, BASE + 0x2000, 0x1000, MEM_COMMIT, PAGE_READWRITE) == BASE + 0x2000
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, BASE + 0x3000, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, BASE) == mbi(win32, BASE, BASE, PAGE_NOACCESS, 0x2000, MEM_RESERVE, 0)
    assert query(win32, BASE + 0x2000) == mbi(win32, BASE + 0x2000, BASE, PAGE_NOACCESS, 0x1000,
                                              MEM_COMMIT, PAGE_READWRITE)
    assert_free(win32, BASE + 0x3000)


def test_va17_commit_rounds_the_range_outward_to_pages(win32):
    a = reserve(win32)
    assert ok(win32, win32.VirtualAlloc, a + 0x1FFF, 2, MEM_COMMIT, PAGE_READWRITE) == a + 0x1000
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x1000, MEM_RESERVE, 0)
    assert query(win32, a + 0x1000) == mbi(win32, a + 0x1000, a, PAGE_NOACCESS, 0x2000, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, a + 0x3000) == mbi(win32, a + 0x3000, a, PAGE_NOACCESS, 0xD000, MEM_RESERVE, 0)


def test_va18_commit_of_unreserved_memory_fails(win32):
    assert_free(win32, BASE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, BASE, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, BASE + 0x1234, 0x10, MEM_COMMIT, PAGE_READWRITE)
    assert_free(win32, BASE)


def test_va18_commit_spanning_two_reservations_fails(win32):
    assert reserve(win32, address=BASE) == BASE
    assert reserve(win32, address=BASE + GRANULE) == BASE + GRANULE
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, BASE + 0xF000, 0x2000, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, BASE) == mbi(win32, BASE, BASE, PAGE_NOACCESS, 0x10000, MEM_RESERVE, 0)
    assert query(win32, BASE + GRANULE) == mbi(win32, BASE + GRANULE, BASE + GRANULE, PAGE_NOACCESS,
                                               0x10000, MEM_RESERVE, 0)


def test_va19_reserve_below_lowest_address_and_on_a_taken_granule(win32):
    low = win32.GetSystemInfo().lpMinimumApplicationAddress  # the segment's base + 64 KiB
    for address in (low - 0x1000, low - 0xF000, low - 1, 0x1000, 0xF000):
        fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, address, 0x1000, MEM_RESERVE, PAGE_NOACCESS)
    # The lowest user address: either it is free (and now ours) or already taken (this
    # emulator's process heap may live there); a reservation on it then must fail.
    win32.SetLastError(SENTINEL)
    first = win32.VirtualAlloc(low, 0x1000, MEM_RESERVE, PAGE_NOACCESS)
    assert first == low or (first == 0 and win32.GetLastError() == ERROR_INVALID_ADDRESS)
    assert query(win32, low).State != MEM_FREE
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, low, 0x1000, MEM_RESERVE, PAGE_NOACCESS)


def test_va20_reserve_commit_at_unaligned_address_commits_whole_span(win32):
    assert_free(win32, BASE)
    assert ok(win32, win32.VirtualAlloc, BASE + 0x4080, 0x1000, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE) == BASE
    assert query(win32, BASE) == mbi(win32, BASE, BASE, PAGE_READWRITE, 0x6000, MEM_COMMIT, PAGE_READWRITE)
    win32.write(BASE, b"start")
    win32.write(BASE + 0x4080, b"asked")
    assert win32.read(BASE, 5) == b"start" and win32.read(BASE + 0x4080, 5) == b"asked"


def test_va21_new_commit_reads_zeros(win32):
    a = allocate(win32, 4 * MiB)
    assert win32.read(a, 4 * MiB) == bytes(4 * MiB)
    win32.FillMemory(a, 4 * MiB, 0xA5)
    release(win32, a)
    assert ok(win32, win32.VirtualAlloc, a, 4 * MiB, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE) == a
    assert win32.read(a, 4 * MiB) == bytes(4 * MiB)  # a reused address is zeroed too


def test_va21_decommit_then_recommit_reads_zeros(win32):
    a = allocate(win32, 0x4000)
    win32.FillMemory(a, 0x4000, 0x77)
    assert ok(win32, win32.VirtualFree, a + 0x1000, 0x2000, MEM_DECOMMIT) is True
    assert ok(win32, win32.VirtualAlloc, a + 0x1000, 0x2000, MEM_COMMIT, PAGE_READWRITE) == a + 0x1000
    assert win32.read(a, 0x4000) == b"\x77" * 0x1000 + bytes(0x2000) + b"\x77" * 0x1000


def test_va21_decommit_returns_memory_to_the_machine(win32, daemon):
    win32.GetSystemInfo()  # connect first: connecting commits the process heap
    before = daemon.resident_bytes()
    a = allocate(win32, 4 * MiB)
    assert daemon.resident_bytes() - before == 4 * MiB  # commit is backed at once
    win32.FillMemory(a, 4 * MiB, 1)
    assert ok(win32, win32.VirtualFree, a, 0, MEM_DECOMMIT) is True
    assert daemon.resident_bytes() == before
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 4 * MiB, MEM_RESERVE, 0)


def test_va22_access_to_reserved_noaccess_and_readonly_pages(win32):
    a = reserve(win32)
    ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_NOACCESS)
    ok(win32, win32.VirtualAlloc, a + 0x1000, 0x1000, MEM_COMMIT, PAGE_READONLY)
    ok(win32, win32.VirtualAlloc, a + 0x2000, 0x1000, MEM_COMMIT, PAGE_EXECUTE_READ)
    assert view_error(win32, a + 0x3000, 1) == ERROR_NOACCESS  # reserved only
    assert view_error(win32, a, 1) == ERROR_NOACCESS  # PAGE_NOACCESS
    with pytest.raises(ShmheapPermissionError) as info:
        win32.read(a, 1)
    assert info.value.winerror == ERROR_NOACCESS and isinstance(info.value, PermissionError)
    for page in (a + 0x1000, a + 0x2000):  # READONLY, EXECUTE_READ: reads work, writes do not
        assert win32.read(page, 8) == bytes(8)
        v = win32.view(page, 8)
        assert v.readonly
        assert view_error(win32, page, 8, write=True) == ERROR_NOACCESS
        with pytest.raises(ShmheapPermissionError):
            win32.write(page, b"x")
    # a view is only as good as its worst page
    assert view_error(win32, a + 0x1000, 0x3000) == ERROR_NOACCESS


def test_va22_access_outside_any_allocation(win32):
    a = allocate(win32, 0x1000)
    assert view_error(win32, a + 0x1000, 1) == ERROR_NOACCESS  # granule tail, free
    assert view_error(win32, a + 0xFFF, 2) == ERROR_NOACCESS  # runs off the end of the region
    assert view_error(win32, 0, 1) == ERROR_NOACCESS  # NULL / the header
    assert view_error(win32, END - 1, 2) == ERROR_NOACCESS  # past the segment
    assert view_error(win32, 2**64 - 1, 1) == ERROR_NOACCESS


def test_va22_execute_readwrite_pages_are_writable(win32):
    a = allocate(win32, 0x1000, PAGE_EXECUTE_READWRITE)
    v = win32.view(a, 4, write=True)
    assert not v.readonly
    v[:] = b"exec"
    assert win32.read(a, 4) == b"exec"


def test_va24_commit_over_the_limit_fails_and_leaves_nothing(win32_limited):
    w = win32_limited
    status = w.GlobalMemoryStatusEx()
    assert status.ullTotalPageFile == 1 * MiB
    probe = reserve(w)  # where the next bottom-up allocation lands
    release(w, probe)
    for alloc_type in (MEM_RESERVE | MEM_COMMIT, MEM_COMMIT):
        fails(w, ERROR_COMMITMENT_LIMIT, w.VirtualAlloc, 0, 2 * MiB, alloc_type, PAGE_READWRITE)
        q = assert_free(w, probe)
        assert q.RegionSize >= 2 * MiB
        after = w.GlobalMemoryStatusEx()
        assert after.ullAvailVirtual == status.ullAvailVirtual
        assert after.ullAvailPageFile == status.ullAvailPageFile


def test_va24_commit_into_a_reservation_over_the_limit_is_all_or_nothing(win32_limited):
    w = win32_limited
    avail = w.GlobalMemoryStatusEx().ullAvailPageFile
    a = reserve(w, 2 * MiB, protect=PAGE_READWRITE)  # reserving costs no commit
    assert w.GlobalMemoryStatusEx().ullAvailPageFile == avail
    fails(w, ERROR_COMMITMENT_LIMIT, w.VirtualAlloc, a, 2 * MiB, MEM_COMMIT, PAGE_READWRITE)
    assert query(w, a) == mbi(w, a, a, PAGE_READWRITE, 2 * MiB, MEM_RESERVE, 0)
    assert ok(w, w.VirtualAlloc, a, 0x40000, MEM_COMMIT, PAGE_READWRITE) == a
    w.FillMemory(a, 0x40000, 0x11)
    fails(w, ERROR_COMMITMENT_LIMIT, w.VirtualAlloc, a, 2 * MiB, MEM_COMMIT, PAGE_READONLY)
    assert query(w, a) == mbi(w, a, a, PAGE_READWRITE, 0x40000, MEM_COMMIT, PAGE_READWRITE)
    assert query(w, a + 0x40000) == mbi(w, a + 0x40000, a, PAGE_READWRITE, 2 * MiB - 0x40000, MEM_RESERVE, 0)
    assert w.read(a, 0x40000) == b"\x11" * 0x40000
    assert w.GlobalMemoryStatusEx().ullAvailPageFile == avail - 0x40000
    # exactly up to the limit works; one page more does not
    rest = w.GlobalMemoryStatusEx().ullAvailPageFile
    assert rest % PAGE == 0 and 0 < rest < 2 * MiB - 0x40000
    assert ok(w, w.VirtualAlloc, a + 0x40000, rest, MEM_COMMIT, PAGE_READWRITE) == a + 0x40000
    assert w.GlobalMemoryStatusEx().ullAvailPageFile == 0
    fails(w, ERROR_COMMITMENT_LIMIT, w.VirtualAlloc, a + 0x40000 + rest, PAGE, MEM_COMMIT, PAGE_READWRITE)
    fails(w, ERROR_COMMITMENT_LIMIT, w.VirtualAlloc, 0, PAGE, MEM_COMMIT, PAGE_READWRITE)
    # recommitting already committed pages costs nothing, so it still works at the limit
    assert ok(w, w.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_READONLY) == a
    release(w, a)
    assert w.GlobalMemoryStatusEx().ullAvailPageFile == avail
    b = allocate(w, 0x80000)  # the commit came back
    assert w.read(b, 16) == bytes(16)


def test_va24_per_process_commit_limit(win32_process_limited):
    w = win32_process_limited
    fails(w, ERROR_COMMITMENT_LIMIT, w.VirtualAlloc, 0, 8 * MiB, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    a = allocate(w, 2 * MiB)
    fails(w, ERROR_COMMITMENT_LIMIT, w.VirtualAlloc, 0, 2 * MiB + 0x10000, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    release(w, a)
    release(w, allocate(w, 2 * MiB + 0x10000))


def test_va24_no_free_range_is_not_enough_memory(win32):
    # a small reservation in the middle of the segment leaves no 200 MiB hole anywhere
    middle = END - 128 * MiB
    assert reserve(win32, address=middle) == middle
    free_before = win32.GlobalMemoryStatusEx().ullAvailVirtual
    assert free_before > 200 * MiB
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.VirtualAlloc, 0, 200 * MiB, MEM_RESERVE, PAGE_NOACCESS)
    fails(win32, ERROR_NOT_ENOUGH_MEMORY, win32.VirtualAlloc, 0, 200 * MiB, MEM_RESERVE | MEM_TOP_DOWN, PAGE_NOACCESS)
    assert win32.GlobalMemoryStatusEx().ullAvailVirtual == free_before
    release(win32, middle)
    a = reserve(win32, 200 * MiB)  # with the hole gone it fits
    assert query(win32, a).RegionSize == 200 * MiB


# ---- 9. VirtualFree --------------------------------------------------------------------------

def _mixed_region(w):
    """A 0x10000 PAGE_NOACCESS reservation with its first page committed read-write."""
    a = reserve(w)
    assert ok(w, w.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_READWRITE) == a
    w.write(a, b"data")
    return a


def _assert_mixed_region_intact(w, a):
    assert query(w, a) == mbi(w, a, a, PAGE_NOACCESS, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    assert query(w, a + 0x1000) == mbi(w, a + 0x1000, a, PAGE_NOACCESS, 0xF000, MEM_RESERVE, 0)
    assert w.read(a, 4) == b"data"


@pytest.mark.parametrize("size, free_type", [(0x10000, 0), (0, MEM_FREE), (0, 0), (0x1000, MEM_FREE),
                                             (0, MEM_RESERVE), (0, 0x20000), (0, 0xFFFFFFFF)], ids=hex)
def test_vf01_invalid_free_type(win32, size, free_type):
    a = _mixed_region(win32)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualFree, a, size, free_type)
    _assert_mixed_region_intact(win32, a)


def test_vf02_decommit_and_release_together_is_invalid(win32):
    a = _mixed_region(win32)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualFree, a, 0, MEM_DECOMMIT | MEM_RELEASE)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualFree, a, 0x1000, MEM_DECOMMIT | MEM_RELEASE)
    _assert_mixed_region_intact(win32, a)


@pytest.mark.parametrize("size", [1, 0x1000, 0x10000, 2**64 - 1], ids=hex)
def test_vf03_release_with_nonzero_size_is_invalid(win32, size):
    a = _mixed_region(win32)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualFree, a, size, MEM_RELEASE)
    _assert_mixed_region_intact(win32, a)


def test_vf04_decommit_of_uncommitted_pages_is_not_an_error(win32):
    a = _mixed_region(win32)
    assert ok(win32, win32.VirtualFree, a, 0x10000, MEM_DECOMMIT) is True
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x10000, MEM_RESERVE, 0)
    assert ok(win32, win32.VirtualFree, a, 0x10000, MEM_DECOMMIT) is True  # again: nothing committed
    assert ok(win32, win32.VirtualFree, a + 0x3000, 0x1000, MEM_DECOMMIT) is True


def test_vf05_release_of_mixed_region_frees_it(win32):
    a = _mixed_region(win32)
    ok(win32, win32.VirtualAlloc, a + 0x5000, 0x2000, MEM_COMMIT, PAGE_READONLY)
    assert ok(win32, win32.VirtualFree, a, 0, MEM_RELEASE) is True
    q = assert_free(win32, a)
    assert (q.AllocationBase, q.AllocationProtect, q.Protect, q.Type) == (0, 0, PAGE_NOACCESS, 0)
    assert view_error(win32, a, 4) == ERROR_NOACCESS


def test_vf06_decommit_rounds_the_range_outward_to_pages(win32):
    a = allocate(win32, 0x10000)
    assert ok(win32, win32.VirtualFree, a + 0x1FFF, 2, MEM_DECOMMIT) is True
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, a + 0x1000) == mbi(win32, a + 0x1000, a, PAGE_READWRITE, 0x2000, MEM_RESERVE, 0)
    assert query(win32, a + 0x3000) == mbi(win32, a + 0x3000, a, PAGE_READWRITE, 0xD000, MEM_COMMIT, PAGE_READWRITE)


def test_vf07_decommit_size_zero_needs_the_allocation_base(win32):
    a = allocate(win32, 0x10000)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, a + 0x1001, 0, MEM_DECOMMIT)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, a + 0x1000, 0, MEM_DECOMMIT)
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x10000, MEM_COMMIT, PAGE_READWRITE)


def test_vf08_decommit_size_zero_in_first_page_decommits_everything(win32):
    a = allocate(win32, 0x10000)
    win32.FillMemory(a, 0x10000, 9)
    assert ok(win32, win32.VirtualFree, a + 0xFFE, 0, MEM_DECOMMIT) is True
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x10000, MEM_RESERVE, 0)
    assert ok(win32, win32.VirtualAlloc, a, 0x10000, MEM_COMMIT, PAGE_READWRITE) == a
    assert win32.read(a, 0x10000) == bytes(0x10000)


def test_vf09_release_inside_the_region_fails(win32):
    a = _mixed_region(win32)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, a + 0x1001, 0, MEM_RELEASE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, a + 0x1000, 0, MEM_RELEASE)
    _assert_mixed_region_intact(win32, a)


def test_vf10_release_within_the_first_page_releases_the_region(win32):
    a = _mixed_region(win32)
    assert ok(win32, win32.VirtualFree, a + 0xFFF, 0, MEM_RELEASE) is True
    assert_free(win32, a)
    assert reserve(win32, address=a) == a  # the whole allocation went back


def test_vf11_release_where_there_is_no_allocation_fails(win32):
    assert reserve(win32, 0x1000, address=BASE) == BASE
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, BASE + 0x8000, 0, MEM_RELEASE)  # same granule
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, BASE + GRANULE, 0, MEM_RELEASE)  # next granule
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, BASE + 8 * GRANULE, 0, MEM_RELEASE)  # free gap
    release(win32, BASE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, BASE, 0, MEM_RELEASE)  # double release


def test_vf11_release_of_null_and_out_of_range_addresses_fails(win32):
    for address in (0, 0x1000, END, 2**64 - 1):
        error = fails_any(win32, win32.VirtualFree, address, 0, MEM_RELEASE)
        assert error in (ERROR_INVALID_ADDRESS, ERROR_INVALID_PARAMETER)


def test_vf12_decommit_of_free_memory_fails(win32):
    assert_free(win32, BASE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, BASE, 0x1000, MEM_DECOMMIT)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, BASE, 0, MEM_DECOMMIT)
    a = reserve(win32, 0x1000, address=BASE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, a + 0x1000, 0x1000, MEM_DECOMMIT)  # granule tail
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, a, 0x2000, MEM_DECOMMIT)  # runs past the end
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x1000, MEM_RESERVE, 0)


# ---- 10. VirtualQuery ------------------------------------------------------------------------

def test_vq01_query_returns_memory_basic_information(win32):
    assert win32.SIZEOF_MEMORY_BASIC_INFORMATION == 48
    a = allocate(win32, 0x1000)
    q = ok(win32, win32.VirtualQuery, a, 48)
    assert isinstance(q, win32.MEMORY_BASIC_INFORMATION)
    assert [f for f in type(q).__dataclass_fields__] == [
        "BaseAddress", "AllocationBase", "AllocationProtect", "RegionSize", "State", "Protect", "Type"]
    assert ok(win32, win32.VirtualQuery, a, 4096) == q  # a larger buffer is fine
    assert ok(win32, win32.VirtualQuery, a) == q  # dwLength defaults to the size


def test_vq02_fresh_reservation(win32):
    a = reserve(win32)
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x10000, MEM_RESERVE, 0)
    assert query(win32, a + 0x8765) == mbi(win32, a + 0x8000, a, PAGE_NOACCESS, 0x8000, MEM_RESERVE, 0)


def test_vq03_commit_splits_the_region(win32):
    a = reserve(win32)
    ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_NOACCESS)
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x1000, MEM_COMMIT, PAGE_NOACCESS)
    assert query(win32, a + 0x1000) == mbi(win32, a + 0x1000, a, PAGE_NOACCESS, 0xF000, MEM_RESERVE, 0)


def test_vq04_query_inside_a_committed_page(win32):
    assert reserve(win32, address=BASE) == BASE
    ok(win32, win32.VirtualAlloc, BASE + 0xF000, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, BASE + 0xF700) == mbi(win32, BASE + 0xF000, BASE, PAGE_NOACCESS, 0x1000,
                                              MEM_COMMIT, PAGE_READWRITE)


def test_vq05_like_pages_merge(win32):
    a = allocate(win32, 0x2000)
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x2000, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, a + 0x1000) == mbi(win32, a + 0x1000, a, PAGE_READWRITE, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    # committing the pages one by one gives the same single run
    b = reserve(win32, 0x4000, protect=PAGE_READWRITE)
    for page in range(4):
        ok(win32, win32.VirtualAlloc, b + page * PAGE, PAGE, MEM_COMMIT, PAGE_READWRITE)
    assert query(win32, b) == mbi(win32, b, b, PAGE_READWRITE, 0x4000, MEM_COMMIT, PAGE_READWRITE)


def test_vq06_regions_split_and_remerge_on_protection_changes(win32):
    a = allocate(win32, 16 * PAGE)
    assert ok(win32, win32.VirtualProtect, a, 3 * PAGE, PAGE_READONLY) == PAGE_READWRITE
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 3 * PAGE, MEM_COMMIT, PAGE_READONLY)
    assert query(win32, a + 3 * PAGE) == mbi(win32, a + 3 * PAGE, a, PAGE_READWRITE, 13 * PAGE,
                                             MEM_COMMIT, PAGE_READWRITE)
    assert ok(win32, win32.VirtualProtect, a, 3 * PAGE, PAGE_READWRITE) == PAGE_READONLY
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x10000, MEM_COMMIT, PAGE_READWRITE)


def test_vq07_free_memory(win32):
    assert reserve(win32, address=BASE) == BASE
    assert reserve(win32, address=BASE + 4 * GRANULE) == BASE + 4 * GRANULE
    release(win32, BASE)
    # BaseAddress is the page; RegionSize runs from there to the next allocation
    assert query(win32, BASE + 0x1234) == mbi(win32, BASE + 0x1000, 0, 0, 4 * GRANULE - 0x1000,
                                              MEM_FREE, PAGE_NOACCESS, 0)


def test_vq07_free_tail_of_a_granule_and_top_of_the_segment(win32):
    assert reserve(win32, 0x1000, address=BASE) == BASE
    assert reserve(win32, address=BASE + 2 * GRANULE) == BASE + 2 * GRANULE
    assert query(win32, BASE + 0x1000) == mbi(win32, BASE + 0x1000, 0, 0, 2 * GRANULE - 0x1000,
                                              MEM_FREE, PAGE_NOACCESS, 0)
    # the highest free granule (found top-down): its free run ends where the segment or the
    # next allocation begins
    t = ok(win32, win32.VirtualAlloc, 0, GRANULE, MEM_RESERVE | MEM_TOP_DOWN, PAGE_NOACCESS)
    release(win32, t)
    assert query(win32, t + 0x8765) == mbi(win32, t + 0x8000, 0, 0, 0x8000, MEM_FREE, PAGE_NOACCESS, 0)


@pytest.mark.parametrize("length", [0, 1, 28, 47], ids=str)
def test_vq08_short_buffer_is_bad_length(win32, length):
    a = allocate(win32, 0x1000)
    fails(win32, ERROR_BAD_LENGTH, win32.VirtualQuery, a, length)


def test_vq08_length_is_a_size_t(win32):
    a = allocate(win32, 0x1000)
    assert ok(win32, win32.VirtualQuery, a, -1).BaseAddress == a  # (SIZE_T)-1 is plenty
    fails(win32, ERROR_BAD_LENGTH, win32.VirtualQuery, a, 2**64)  # wraps to 0


def test_vq09_query_beyond_the_address_space_is_invalid_parameter(win32):
    for address in (END, END + 0x10000, 2**63, 2**64 - 1, -1):
        fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualQuery, address)


# ---- 11. VirtualProtect ----------------------------------------------------------------------

def test_vp01_protect_of_reserved_pages_fails(win32):
    a = reserve(win32)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, a, 0x1000, PAGE_READONLY)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, a + 0x5000, 0x10, PAGE_READWRITE)
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x10000, MEM_RESERVE, 0)


def test_vp02_protect_over_partly_committed_range_changes_nothing(win32):
    a = reserve(win32)
    ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_NOACCESS)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, a, 0xFFFC, PAGE_READONLY)
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x1000, MEM_COMMIT, PAGE_NOACCESS)
    # committed pages on both sides of a reserved one: still all or nothing
    ok(win32, win32.VirtualAlloc, a + 0x2000, 0x1000, MEM_COMMIT, PAGE_NOACCESS)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, a, 0x3000, PAGE_READONLY)
    assert query(win32, a).Protect == PAGE_NOACCESS and query(win32, a + 0x2000).Protect == PAGE_NOACCESS


def test_vp02_protect_across_two_allocations_fails(win32):
    assert allocate(win32, 0x10000, address=BASE) == BASE
    assert allocate(win32, 0x10000, address=BASE + GRANULE) == BASE + GRANULE
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, BASE + 0xF000, 0x2000, PAGE_READONLY)
    assert query(win32, BASE).Protect == PAGE_READWRITE
    assert query(win32, BASE + GRANULE).Protect == PAGE_READWRITE


def test_vp03_protect_returns_the_old_protection(win32):
    a = ok(win32, win32.VirtualAlloc, 0, 0x1000, MEM_COMMIT, PAGE_NOACCESS)
    assert ok(win32, win32.VirtualProtect, a, 0x1000, PAGE_READONLY) == PAGE_NOACCESS
    assert ok(win32, win32.VirtualProtect, a, 0x1000, PAGE_READWRITE) == PAGE_READONLY
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    win32.write(a, b"now writable")
    assert win32.read(a, 12) == b"now writable"


def test_vp04_only_single_base_protections_are_accepted(win32):
    a = ok(win32, win32.VirtualAlloc, 0, 0x1000, MEM_COMMIT, PAGE_NOACCESS)
    current = PAGE_NOACCESS
    for protect in range(0x100):
        if protect in BASE_PROTECTIONS:
            assert ok(win32, win32.VirtualProtect, a, 0x1000, protect) == current
            current = protect
        else:
            fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualProtect, a, 0x1000, protect)
        assert query(win32, a).Protect == current, f"after trying {protect:#x}"


@pytest.mark.parametrize("protect", [PAGE_NOACCESS | PAGE_GUARD, PAGE_NOACCESS | PAGE_WRITECOMBINE,
                                     PAGE_GUARD, PAGE_NOCACHE, PAGE_WRITECOPY | PAGE_GUARD], ids=hex)
def test_vp04_invalid_modifier_combinations_are_refused(win32, protect):
    a = allocate(win32, 0x1000, PAGE_READONLY)
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualProtect, a, 0x1000, protect)
    assert query(win32, a) == mbi(win32, a, a, PAGE_READONLY, 0x1000, MEM_COMMIT, PAGE_READONLY)


def test_vp05_guard_round_trip(win32):
    a = allocate(win32, 0x2000, PAGE_READWRITE | PAGE_GUARD)
    assert ok(win32, win32.VirtualProtect, a, 0x2000, PAGE_READWRITE) == 0x104
    assert query(win32, a) == mbi(win32, a, a, 0x104, 0x2000, MEM_COMMIT, PAGE_READWRITE)
    win32.view(a, 0x2000)  # no guard left
    assert ok(win32, win32.VirtualProtect, a, 0x2000, PAGE_READWRITE | PAGE_GUARD) == PAGE_READWRITE
    assert query(win32, a) == mbi(win32, a, a, 0x104, 0x2000, MEM_COMMIT, 0x104)
    with pytest.raises(GuardPageError):
        win32.view(a, 1)
    win32.view(a, 1)


def test_vp06_sub_range_changes_only_its_pages_and_returns_the_first_pages_old(win32):
    a = allocate(win32, 16 * PAGE)
    assert ok(win32, win32.VirtualProtect, a + PAGE, PAGE, PAGE_READONLY) == PAGE_READWRITE
    assert ok(win32, win32.VirtualProtect, a, 3 * PAGE, PAGE_EXECUTE_READ) == PAGE_READWRITE
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 3 * PAGE, MEM_COMMIT, PAGE_EXECUTE_READ)
    assert query(win32, a + 3 * PAGE) == mbi(win32, a + 3 * PAGE, a, PAGE_READWRITE, 13 * PAGE,
                                             MEM_COMMIT, PAGE_READWRITE)
    assert ok(win32, win32.VirtualProtect, a + PAGE + 5, 1, PAGE_READWRITE) == PAGE_EXECUTE_READ
    assert query(win32, a + PAGE) == mbi(win32, a + PAGE, a, PAGE_READWRITE, PAGE, MEM_COMMIT, PAGE_READWRITE)
    # an unaligned range covers every page it touches
    assert ok(win32, win32.VirtualProtect, a + 0x4FFF, 2, PAGE_READONLY) == PAGE_READWRITE
    assert query(win32, a + 0x4000) == mbi(win32, a + 0x4000, a, PAGE_READWRITE, 2 * PAGE, MEM_COMMIT, PAGE_READONLY)


def test_vp08_protect_of_free_memory_fails(win32):
    assert_free(win32, BASE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, BASE, 0x1000, PAGE_READWRITE)
    a = allocate(win32, 0x1000, address=BASE)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, a + 0x1000, 0x1000, PAGE_READWRITE)
    release(win32, a)
    fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, a, 0x1000, PAGE_READWRITE)


# ---- another process's memory ---------------------------------------------------------------

_CHILD = r"""
import json, os, sys
from shmheap import win32 as w
from shmheap.constants import *
from shmheap.errors import ShmheapPermissionError

def fields(q):
    return None if q is None else [q.BaseAddress, q.AllocationBase, q.AllocationProtect,
                                   q.RegionSize, q.State, q.Protect, q.Type]

def attempt(fn, *args):
    w.SetLastError(0)
    result = fn(*args)
    return [result, w.GetLastError()]

def view_error(address, size):
    try:
        w.view(address, size)
    except ShmheapPermissionError as exc:
        return int(exc.winerror)
    return 0

theirs = int(sys.argv[1])
report = {
    "pid": os.getpid(),
    "query": fields(w.VirtualQuery(theirs)),
    "query_inside": fields(w.VirtualQuery(theirs + 0x1234)),
    "commit": attempt(w.VirtualAlloc, theirs, 0x1000, MEM_COMMIT, PAGE_READWRITE),
    "reserve": attempt(w.VirtualAlloc, theirs, 0x1000, MEM_RESERVE, PAGE_READWRITE),
    "reset": attempt(w.VirtualAlloc, theirs, 0x1000, MEM_RESET, PAGE_READWRITE),
    "protect": attempt(w.VirtualProtect, theirs, 0x1000, PAGE_READONLY),
    "decommit": attempt(w.VirtualFree, theirs, 0x1000, MEM_DECOMMIT),
    "decommit_all": attempt(w.VirtualFree, theirs, 0, MEM_DECOMMIT),
    "release": attempt(w.VirtualFree, theirs, 0, MEM_RELEASE),
    "view": view_error(theirs, 1),
}
mine = w.VirtualAlloc(0, 0x2000, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
w.write(mine, b"child")
report["mine"] = mine
print(json.dumps(report), flush=True)
sys.stdin.readline()
"""


def _read_line(proc, deadline):
    ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
    if not ready:
        proc.kill()
        raise AssertionError("the child process did not answer in time")
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise AssertionError(f"the child process died: {proc.stderr.read().decode()}")
    return json.loads(line)


def test_other_process_memory_is_reserved_and_untouchable(win32, daemon):
    a = allocate(win32, 0x3000)
    win32.write(a, b"parent")
    env = dict(os.environ, SHMHEAP_SOCKET=daemon.socket)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(a)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        report = _read_line(proc, time.monotonic() + DEADLINE)
        assert report["pid"] == proc.pid != os.getpid()
        # the child's view of the parent's region
        assert report["query"] == [a, a, PAGE_NOACCESS, 0x3000, MEM_RESERVE, 0, MEM_PRIVATE]
        assert report["query_inside"] == [a + 0x1000, a, PAGE_NOACCESS, 0x2000, MEM_RESERVE, 0, MEM_PRIVATE]
        for call in ("commit", "reserve", "reset", "protect"):
            assert report[call] == [0, ERROR_INVALID_ADDRESS], call
        for call in ("decommit", "decommit_all", "release"):
            assert report[call] == [False, ERROR_INVALID_ADDRESS], call
        assert report["view"] == ERROR_NOACCESS
        # nothing the child tried changed the parent's region
        assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x3000, MEM_COMMIT, PAGE_READWRITE)
        assert win32.read(a, 6) == b"parent"
        # and the parent cannot touch the child's
        mine = report["mine"]
        assert query(win32, mine) == mbi(win32, mine, mine, PAGE_NOACCESS, 0x2000, MEM_RESERVE, 0)
        fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, mine, 0x1000, MEM_COMMIT, PAGE_READWRITE)
        fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualAlloc, mine, 0x1000, MEM_RESERVE, PAGE_READWRITE)
        fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualProtect, mine, 0x1000, PAGE_READONLY)
        fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, mine, 0x1000, MEM_DECOMMIT)
        fails(win32, ERROR_INVALID_ADDRESS, win32.VirtualFree, mine, 0, MEM_RELEASE)
        assert view_error(win32, mine, 1) == ERROR_NOACCESS
        with pytest.raises(ShmheapPermissionError):
            win32.write(mine, b"x")
        proc.stdin.write(b"done\n")
        proc.stdin.flush()
        assert proc.wait(timeout=DEADLINE) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    # the child's region dies with it and the address is free again
    wait_until(lambda: win32.VirtualQuery(mine).State == MEM_FREE, DEADLINE, what="the child's region to be released")
    assert reserve(win32, address=mine) == mine


# ---- argument conversion ---------------------------------------------------------------------

def test_arguments_convert_like_c(win32):
    # (SIZE_T)-1: fails cleanly with an error code, no exception
    for alloc_type in (MEM_RESERVE, MEM_RESERVE | MEM_COMMIT, MEM_COMMIT):
        error = fails_any(win32, win32.VirtualAlloc, 0, -1, alloc_type, PAGE_NOACCESS)
        assert error in (ERROR_INVALID_PARAMETER, ERROR_NOT_ENOUGH_MEMORY)
    # 2**64 wraps to 0: VA-01
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualAlloc, 0, 2**64, MEM_RESERVE, PAGE_NOACCESS)
    # DWORD flags are taken modulo 2**32
    a = ok(win32, win32.VirtualAlloc, 0, 0x1000, MEM_COMMIT + 2**32, PAGE_READWRITE + 2**32)
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    # pointers are taken modulo 2**64
    assert ok(win32, win32.VirtualAlloc, a + 2**64, 0x1000, MEM_COMMIT, PAGE_READWRITE) == a
    assert ok(win32, win32.VirtualProtect, a - 2**64, 0x1000, PAGE_READONLY - 2**32) == PAGE_READWRITE
    assert ok(win32, win32.VirtualQuery, a + 2**64) == query(win32, a)
    assert win32.read(a + 2**64, 4) == bytes(4)
    # MEM_RELEASE with size 2**64 is size 0
    assert ok(win32, win32.VirtualFree, a, 2**64, MEM_RELEASE) is True
    assert_free(win32, a)


def test_huge_sizes_and_addresses_fail_cleanly(win32):
    a = reserve(win32)
    ok(win32, win32.VirtualAlloc, a, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    for call in ((win32.VirtualAlloc, a, -1, MEM_COMMIT, PAGE_READWRITE),
                 (win32.VirtualAlloc, a, 2**63, MEM_COMMIT, PAGE_READWRITE),
                 (win32.VirtualAlloc, -1, 0x1000, MEM_COMMIT, PAGE_READWRITE),
                 (win32.VirtualAlloc, -1, 0x1000, MEM_RESERVE, PAGE_READWRITE),
                 (win32.VirtualAlloc, 2**64 - 0x10000, 0x20000, MEM_RESERVE, PAGE_READWRITE),
                 (win32.VirtualProtect, a, -1, PAGE_READONLY),
                 (win32.VirtualProtect, -4096, 0x1000, PAGE_READONLY),
                 (win32.VirtualFree, a, -1, MEM_DECOMMIT),
                 (win32.VirtualFree, -4096, 0x2000, MEM_DECOMMIT)):
        error = fails_any(win32, *call)
        assert error in (ERROR_INVALID_PARAMETER, ERROR_INVALID_ADDRESS, ERROR_NOT_ENOUGH_MEMORY), call
    assert query(win32, a) == mbi(win32, a, a, PAGE_NOACCESS, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    with pytest.raises(ShmheapPermissionError):
        win32.view(a, -1)


NON_INTS = [4096.0, 0.0, "4096", None, b"\x10", 1j]


def _assert_type_errors(w, calls):
    w.SetLastError(SENTINEL)
    accepted = []
    for fn, *args in calls:
        try:
            fn(*args)
        except TypeError:
            continue
        accepted.append(f"{fn.__name__}{tuple(args)!r}")
    assert not accepted, f"no TypeError from: {accepted}"
    assert w.GetLastError() == SENTINEL


@pytest.mark.parametrize("bad", NON_INTS, ids=repr)
def test_non_int_arguments_raise_type_error(win32, bad):
    a = allocate(win32, 0x1000)
    _assert_type_errors(win32, [
        (win32.VirtualAlloc, bad, 0x1000, MEM_COMMIT, PAGE_READWRITE),
        (win32.VirtualAlloc, 0, bad, MEM_COMMIT, PAGE_READWRITE),
        (win32.VirtualAlloc, 0, 0x1000, bad, PAGE_READWRITE),
        (win32.VirtualAlloc, 0, 0x1000, MEM_COMMIT, bad),
        (win32.VirtualFree, bad, 0, MEM_RELEASE),
        (win32.VirtualFree, a, bad, MEM_RELEASE),
        (win32.VirtualFree, a, 0, bad),
        (win32.VirtualQuery, bad),
        (win32.VirtualQuery, a, bad),
        (win32.VirtualProtect, bad, 0x1000, PAGE_READONLY),
        (win32.VirtualProtect, a, bad, PAGE_READONLY),
        (win32.VirtualProtect, a, 0x1000, bad),
        (win32.SetLastError, bad),
        (win32.view, bad, 4),
        (win32.view, a, bad),
        (win32.read, bad, 4),
        (win32.read, a, bad),
        (win32.write, bad, b"data"),
        (win32.CopyMemory, bad, a, 4),
        (win32.CopyMemory, a, bad, 4),
        (win32.FillMemory, bad, 4, 0),
        (win32.FillMemory, a, 4, bad),
        (win32.ZeroMemory, bad, 4),
    ])
    assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x1000, MEM_COMMIT, PAGE_READWRITE)
    assert win32.read(a, 16) == bytes(16)


@pytest.mark.parametrize("bad", NON_INTS, ids=repr)
def test_byte_helper_lengths_must_be_ints(win32, bad):
    a = allocate(win32, 0x1000)
    _assert_type_errors(win32, [
        (win32.CopyMemory, a, a + 8, bad),
        (win32.MoveMemory, a, a + 8, bad),
        (win32.FillMemory, a, bad, 0),
        (win32.ZeroMemory, a, bad),
    ])
    assert win32.read(a, 16) == bytes(16)


def test_numpy_integers_are_accepted(win32):
    a = ok(win32, win32.VirtualAlloc, np.uint64(0), np.int64(0x2000), np.uint32(MEM_RESERVE | MEM_COMMIT),
           np.int32(PAGE_READWRITE))
    assert ok(win32, win32.VirtualProtect, np.int64(a), np.uint64(0x1000), np.int16(PAGE_READONLY)) == PAGE_READWRITE
    assert ok(win32, win32.VirtualQuery, np.uint64(a)).Protect == PAGE_READONLY
    win32.FillMemory(np.int64(a + 0x1000), np.int64(3), np.uint8(7))
    assert win32.read(a + 0x1000, 4) == b"\x07\x07\x07\x00"
    assert ok(win32, win32.VirtualFree, np.uint64(a), np.uint64(0), np.uint32(MEM_RELEASE)) is True


# ---- GetLastError / SetLastError -------------------------------------------------------------

def test_set_last_error_round_trips_as_a_dword(win32):
    for value, stored in ((0, 0), (5, 5), (0xDEADBEEF, 0xDEADBEEF), (-1, 0xFFFFFFFF), (2**32 + 7, 7)):
        win32.SetLastError(value)
        assert win32.GetLastError() == stored


def test_failure_sets_and_success_keeps_the_last_error(win32):
    win32.SetLastError(SENTINEL)
    assert win32.VirtualAlloc(0, 0, MEM_RESERVE, PAGE_NOACCESS) == 0
    assert win32.GetLastError() == ERROR_INVALID_PARAMETER
    a = win32.VirtualAlloc(0, 0x1000, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    assert a and win32.GetLastError() == ERROR_INVALID_PARAMETER  # success does not clear it
    win32.VirtualQuery(a)
    win32.VirtualProtect(a, 0x1000, PAGE_READONLY)
    win32.GetSystemInfo()
    win32.GlobalMemoryStatusEx()
    win32.read(a, 4)
    assert win32.VirtualFree(a, 0, MEM_RELEASE) is True
    assert win32.GetLastError() == ERROR_INVALID_PARAMETER
    assert win32.VirtualFree(a, 0, MEM_RELEASE) is False
    assert win32.GetLastError() == ERROR_INVALID_ADDRESS


def test_last_error_is_per_thread(win32):
    win32.SetLastError(0x1111)
    seen = {}

    def worker():
        seen["initial"] = win32.GetLastError()
        seen["result"] = win32.VirtualFree(BASE, 0, MEM_RELEASE)
        seen["after_failure"] = win32.GetLastError()
        win32.SetLastError(0x2222)
        seen["after_set"] = win32.GetLastError()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert seen == {"initial": 0, "result": False, "after_failure": ERROR_INVALID_ADDRESS, "after_set": 0x2222}
    assert win32.GetLastError() == 0x1111


def test_calls_from_many_threads_stay_consistent(win32):
    errors = []
    live = {}
    lock = threading.Lock()

    def worker(n):
        try:
            mine = []
            for i in range(40):
                a = win32.VirtualAlloc(0, 0x2000, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
                assert a, f"thread {n}: VirtualAlloc failed with {win32.GetLastError()}"
                with lock:
                    assert a not in live, f"{a:#x} handed out twice"
                    live[a] = n
                win32.write(a, bytes([n, i]) * 0x1000)
                mine.append((a, i))
                if len(mine) > 4:
                    old, j = mine.pop(0)
                    assert win32.read(old, 0x2000) == bytes([n, j]) * 0x1000, "another thread wrote here"
                    with lock:
                        del live[old]
                    assert win32.VirtualFree(old, 0, MEM_RELEASE) is True
                win32.SetLastError(n)
                assert win32.VirtualFree(a + 0x1000, 0, MEM_RELEASE) is False
                assert win32.GetLastError() == ERROR_INVALID_ADDRESS
        except Exception as exc:  # reported below, not lost with the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    assert len(live) == 8 * 4  # each thread keeps its last four
    for a, n in live.items():
        assert query(win32, a) == mbi(win32, a, a, PAGE_READWRITE, 0x2000, MEM_COMMIT, PAGE_READWRITE)
        assert win32.read(a, 1) == bytes([n])


# ---- GetSystemInfo / GlobalMemoryStatusEx ----------------------------------------------------

def test_get_system_info(win32):
    info = win32.GetSystemInfo()
    assert info.dwPageSize == 0x1000 == os.sysconf("SC_PAGE_SIZE")
    assert info.dwAllocationGranularity == 0x10000
    assert info.lpMinimumApplicationAddress % 2**21 == 0x10000  # the base is 2 MiB aligned
    assert info.lpMaximumApplicationAddress == info.lpMinimumApplicationAddress - 0x10000 + SEGMENT - 1
    cpus = os.sched_getaffinity(0)
    assert info.dwNumberOfProcessors == len(cpus) >= 1
    assert info.dwActiveProcessorMask == sum(1 << cpu for cpu in cpus)
    assert (info.wProcessorArchitecture, info.dwProcessorType) == (9, 8664)  # x86-64: AMD64
    # the bounds are the ones the other calls enforce
    assert query(win32, info.lpMaximumApplicationAddress).State == MEM_FREE
    fails(win32, ERROR_INVALID_PARAMETER, win32.VirtualQuery, info.lpMaximumApplicationAddress + 1)
    a = ok(win32, win32.VirtualAlloc, 0, info.dwAllocationGranularity, MEM_RESERVE | MEM_TOP_DOWN, PAGE_NOACCESS)
    end = a + info.dwAllocationGranularity
    assert end == info.lpMaximumApplicationAddress + 1 or (
        end <= info.lpMaximumApplicationAddress and query(win32, end).State != MEM_FREE)


def test_global_memory_status_ex(win32):
    status = win32.GlobalMemoryStatusEx()
    assert status.dwLength == 64
    assert 0 <= status.dwMemoryLoad <= 100
    assert status.ullTotalPhys == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < status.ullAvailPhys <= status.ullTotalPhys
    assert status.ullTotalVirtual == SEGMENT - 0x10000
    assert 0 < status.ullAvailVirtual <= status.ullTotalVirtual
    assert 0 <= status.ullAvailPageFile <= status.ullTotalPageFile
    assert status.ullAvailExtendedVirtual == 0
    a = reserve(win32, MiB)
    reserved = win32.GlobalMemoryStatusEx()
    assert reserved.ullAvailVirtual == status.ullAvailVirtual - MiB
    assert reserved.ullAvailPageFile == status.ullAvailPageFile  # reserving costs no commit
    ok(win32, win32.VirtualAlloc, a + 0x5000, 0x3000, MEM_COMMIT, PAGE_READWRITE)
    committed = win32.GlobalMemoryStatusEx()
    assert committed.ullAvailPageFile == status.ullAvailPageFile - 0x3000
    assert committed.ullAvailVirtual == reserved.ullAvailVirtual
    release(win32, a)
    after = win32.GlobalMemoryStatusEx()
    assert (after.ullAvailVirtual, after.ullAvailPageFile) == (status.ullAvailVirtual, status.ullAvailPageFile)


def test_global_memory_status_ex_reports_the_commit_limit(win32_limited):
    status = win32_limited.GlobalMemoryStatusEx()
    assert status.ullTotalPageFile == 1 * MiB
    assert status.ullAvailPageFile <= 1 * MiB
    a = allocate(win32_limited, 0x10000)
    assert win32_limited.GlobalMemoryStatusEx().ullAvailPageFile == status.ullAvailPageFile - 0x10000
    release(win32_limited, a)


# ---- byte helpers ----------------------------------------------------------------------------

def test_view_is_zero_copy_and_shared(win32):
    a = allocate(win32, 0x2000)
    v = win32.view(a, 16, write=True)
    assert isinstance(v, memoryview) and len(v) == 16 and not v.readonly
    v[:5] = b"hello"
    assert win32.read(a, 5) == b"hello"
    assert bytes(win32.view(a, 5)) == b"hello"
    other = win32.view(a, 0x2000)
    v[0:1] = b"J"
    assert bytes(other[:5]) == b"Jello"  # same memory, not a copy
    arr = np.frombuffer(win32.view(a + 0x1000, 16, write=True), dtype=np.uint32)
    arr[:] = [1, 2, 3, 4]
    assert win32.read(a + 0x1000, 8) == b"\x01\x00\x00\x00\x02\x00\x00\x00"


def test_view_of_mixed_protections_is_read_only(win32):
    a = allocate(win32, 0x2000)
    ok(win32, win32.VirtualProtect, a + 0x1000, 0x1000, PAGE_READONLY)
    assert win32.view(a, 0x2000).readonly
    assert not win32.view(a, 0x1000).readonly
    assert view_error(win32, a, 0x2000, write=True) == ERROR_NOACCESS
    with pytest.raises(ShmheapPermissionError):
        win32.write(a + 0xFFE, b"abcd")
    assert win32.read(a + 0xFFE, 4) == bytes(4)  # nothing written, not even the writable half


def test_write_accepts_any_buffer(win32):
    a = allocate(win32, 0x1000)
    win32.write(a, bytearray(b"ba"))
    win32.write(a + 2, memoryview(b"mv"))
    win32.write(a + 4, array.array("H", [0x4241]))
    win32.write(a + 6, np.array([0x44, 0x43], dtype=np.uint8))
    assert win32.read(a, 8) == b"bamvABDC"
    win32.write(a + 8, b"")
    assert win32.read(a, 9) == b"bamvABDC\x00"


def test_copy_memory(win32):
    a = allocate(win32, 0x1000)
    b = allocate(win32, 0x1000)
    win32.write(a, b"0123456789")
    win32.CopyMemory(b + 100, a, 10)
    assert win32.read(b + 99, 12) == b"\x000123456789\x00"
    win32.CopyMemory(a + 0x800, b + 100, 10)  # within one region
    assert win32.read(a + 0x800, 10) == b"0123456789"


def test_move_memory_handles_overlap_both_ways(win32):
    a = allocate(win32, 0x1000)
    win32.write(a, b"abcdefghij")
    win32.MoveMemory(a + 3, a, 7)
    assert win32.read(a, 10) == b"abcabcdefg"
    win32.write(a, b"abcdefghij")
    win32.MoveMemory(a, a + 3, 7)
    assert win32.read(a, 10) == b"defghijhij"
    win32.write(a, b"abcdefghij")
    win32.CopyMemory(a + 1, a, 9)  # CopyMemory is documented to behave the same
    assert win32.read(a, 10) == b"aabcdefghi"


def test_fill_and_zero_memory(win32):
    a = allocate(win32, 0x3000)
    win32.FillMemory(a + 1, 0x2000, 0x1AB)  # the fill is a BYTE
    assert win32.read(a, 0x2002) == b"\x00" + b"\xab" * 0x2000 + b"\x00"
    win32.FillMemory(a, 3, -1)
    assert win32.read(a, 4) == b"\xff\xff\xff\xab"
    win32.ZeroMemory(a + 2, 0x1000)
    assert win32.read(a, 0x1003) == b"\xff\xff" + bytes(0x1000) + b"\xab"


def test_byte_helpers_refuse_inaccessible_memory(win32):
    a = allocate(win32, 0x2000)
    win32.write(a, b"source")
    ok(win32, win32.VirtualProtect, a + 0x1000, 0x1000, PAGE_READONLY)
    ro = a + 0x1000
    for fn, args in ((win32.CopyMemory, (ro, a, 6)), (win32.MoveMemory, (ro, a, 6)),
                     (win32.FillMemory, (ro, 6, 1)), (win32.ZeroMemory, (ro, 6)),
                     (win32.write, (ro, b"source"))):
        with pytest.raises(ShmheapPermissionError) as info:
            fn(*args)
        assert info.value.winerror == ERROR_NOACCESS, fn.__name__
    assert win32.read(ro, 6) == bytes(6)
    r = reserve(win32)
    for fn, args in ((win32.CopyMemory, (a, r, 6)), (win32.CopyMemory, (r, a, 6)),
                     (win32.FillMemory, (r, 6, 1)), (win32.ZeroMemory, (r, 6)), (win32.read, (r, 6))):
        with pytest.raises(ShmheapPermissionError) as info:
            fn(*args)
        assert info.value.winerror == ERROR_NOACCESS, fn.__name__
    assert win32.read(a, 6) == b"source"


def test_zero_length_byte_helpers_do_nothing(win32):
    win32.SetLastError(SENTINEL)
    assert len(win32.view(0, 0)) == 0
    assert win32.read(0, 0) == b""
    win32.write(0, b"")
    win32.CopyMemory(0, 0, 0)
    win32.MoveMemory(0, 0, 0)
    win32.FillMemory(0, 0, 0xFF)
    win32.ZeroMemory(0, 0)
    assert win32.GetLastError() == SENTINEL
