"""Conformance of the C runtime heap (`shmheap.crt`) with docs/crt_semantics.md, rows CRT-01..30,
under the choices the module's docstring states (msvcrt.dll's own heap, UCRT's sizes, bad
pointers refused with EINVAL, the invalid-parameter handler taken as returning):

* success leaves errno and the last error alone (checked with sentinels stored before the call);
* failure returns C's value (NULL 0, (size_t)-1 as 2**64-1, None) and sets errno (ENOMEM, EINVAL),
  never raises; a refused pointer leaves its block intact (bytes, size) and freeable.

Every test runs against a real daemon (the `win32` fixture, whose teardown runs every heap's
own check, the CRT heap's included). One test per group of rows, named after them.
"""

import multiprocessing
import signal
import threading

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import shmheap
from conftest import finish, in_forked_child, receive
from shmheap import com, crt
from shmheap import win32 as facade
from shmheap.crt import EINVAL, ENOMEM
from shmheap.errors import WinError
from win32_checks import SENTINEL, pattern

SIZE_MAX = 2**64 - 1
HEAP_MAXREQ = 0xFFFFFFFFFFFFFFE0
MiB = 2**20
ERRNO_SENTINEL = 0x5EED  # stored with _set_errno before a call: "unchanged" means still this
DEADLINE = 30  # seconds, for anything that waits on another thread or process
ERROR_INVALID_PARAMETER = WinError.ERROR_INVALID_PARAMETER
# small (one-page slab), small (64 KiB slab), medium, medium, large (a region of its own)
SIZES = [1, 24, 1000, 5000, 20_000, 300_000, 2 * MiB]

spawn = multiprocessing.get_context("spawn")


# ---- helpers ---------------------------------------------------------------------------------

def call(fn, *args):
    """(result, errno, GetLastError()) of fn(*args), with sentinels stored before the call."""
    crt._set_errno(ERRNO_SENTINEL)
    facade.SetLastError(SENTINEL)
    result = fn(*args)
    return result, crt._get_errno(), facade.GetLastError()


def ok(fn, *args):
    """Call fn(*args); assert a non-NULL result with errno and the last error untouched."""
    result, errno, error = call(fn, *args)
    assert result, f"{fn.__name__}{args} failed: errno {errno}, last error {error}"
    assert (errno, error) == (ERRNO_SENTINEL, SENTINEL), f"{fn.__name__}{args} succeeded but wrote errno/last error"
    return result


def fails(fn, *args, result=0, errno, error=None):
    """Call fn(*args); assert C's failure value (and its type) and errno; `error`: the last
    error expected (SENTINEL: untouched; None: not checked)."""
    got, got_errno, got_error = call(fn, *args)
    assert type(got) is type(result) and got == result, f"{fn.__name__}{args} returned {got!r}, expected {result!r}"
    assert got_errno == errno, f"{fn.__name__}{args}: errno {got_errno}, expected {errno}"
    if error is not None:
        assert got_error == error, f"{fn.__name__}{args}: last error {got_error}, expected {int(error)}"


def filled(size, seed=1):
    """A malloc block of `size` bytes holding pattern(size, seed)."""
    p = ok(crt.malloc, size)
    facade.write(p, pattern(size, seed))
    return p


def assert_intact(p, size, seed=1):
    """The CRT block at p is still live, `size` bytes of pattern(size, seed)."""
    assert crt._msize(p) == size
    assert facade.read(p, size) == pattern(size, seed)


def release(p):
    """free(p), which must succeed (errno untouched), and p is no block any more."""
    result, errno, error = call(crt.free, p)
    assert result is None and (errno, error) == (ERRNO_SENTINEL, SENTINEL), f"free({p:#x}): errno {errno}"
    fails(crt._msize, p, result=SIZE_MAX, errno=EINVAL)


# ---- §1 constants ----------------------------------------------------------------------------

def test_constants():
    assert (crt.ENOMEM, crt.EINVAL, crt.ERANGE, crt.EBADF, crt.EACCES, crt.EEXIST) == (12, 22, 34, 9, 13, 17)
    assert crt._HEAP_MAXREQ == HEAP_MAXREQ and crt.SIZE_MAX == SIZE_MAX
    # the CRT's Win32 error -> errno table (CRT-12, CRT-16 map through it)
    assert crt.errno_from_os_error(WinError.ERROR_INVALID_PARAMETER) == EINVAL
    assert crt.errno_from_os_error(WinError.ERROR_NOT_ENOUGH_MEMORY) == ENOMEM
    assert crt.errno_from_os_error(WinError.ERROR_INVALID_BLOCK) == ENOMEM
    assert crt.errno_from_os_error(WinError.ERROR_INVALID_HANDLE) == crt.EBADF
    assert crt.errno_from_os_error(WinError.ERROR_ACCESS_DENIED) == crt.EACCES
    assert crt.errno_from_os_error(WinError.ERROR_NOACCESS) == EINVAL  # not in the table
    assert crt.errno_from_os_error(25) == crt.EACCES and crt.errno_from_os_error(190) == crt.ENOEXEC


def test_c_names_are_documented_and_typed():
    """test_public_api skips names with a leading underscore; MSVC's have one."""
    import inspect

    for name in crt.__all__:
        value = getattr(crt, name)
        if callable(value):
            assert inspect.getdoc(value), f"crt.{name} has no docstring"
            signature = inspect.signature(value)
            assert signature.return_annotation is not inspect.Signature.empty, name
            assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values()), name
    namespace = {}
    exec("from shmheap.crt import *", namespace)
    assert {"malloc", "_msize", "_expand", "_recalloc", "_get_heap_handle", "_get_errno", "ENOMEM"} <= set(namespace)


# ---- §2 the C runtime heap -------------------------------------------------------------------

def test_crt01_04_13_malloc_sizes_alignment(win32):
    # CRT-01: malloc(0) is a unique non-NULL block each time, of 1 byte (UCRT: size 0 -> 1)
    zeros = [ok(crt.malloc, 0) for _ in range(5)]
    assert len(set(zeros)) == 5
    assert all(crt._msize(p) == 1 for p in zeros)
    # CRT-13: _msize is the size asked for, exactly; CRT-04: 16-byte alignment
    blocks = {size: filled(size, size) for size in SIZES}
    for size, p in blocks.items():
        assert p % 16 == 0, f"malloc({size}) = {p:#x} is not 16-byte aligned"
        assert ok(crt._msize, p) == size
        assert_intact(p, size, size)
    # sizes are SIZE_T: taken modulo 2**64 (as the facade takes them)
    q = ok(crt.malloc, 2**64 + 40)
    assert crt._msize(q) == 40
    for p in [*zeros, *blocks.values(), q]:
        release(p)


def test_crt02_03_malloc_too_large(win32):
    # CRT-02: above _HEAP_MAXREQ, refused before the heap is asked: the last error stays
    for size in (SIZE_MAX, HEAP_MAXREQ + 1, -1):
        fails(crt.malloc, size, errno=ENOMEM, error=SENTINEL)
    # CRT-03: allowed by the CRT, but no heap can give it (the last error is not meaningful)
    for size in (HEAP_MAXREQ, 1 << 62, 1 << 40):
        fails(crt.malloc, size, errno=ENOMEM)
    release(ok(crt.malloc, 100))  # the heap is fine afterwards


def test_crt05_06_calloc(win32):
    # CRT-05: zeroed, even over memory a freed block dirtied (the same size class comes back)
    for size in SIZES:
        crt.free(filled(size, 7))
        p = ok(crt.calloc, size, 1)
        assert crt._msize(p) == size
        assert facade.read(p, size) == bytes(size), f"calloc of {size} bytes is not zeroed"
        release(p)
    p = ok(crt.calloc, 10, 24)
    assert crt._msize(p) == 240 and facade.read(p, 240) == bytes(240)
    release(p)
    # CRT-05: a 0-byte calloc is a non-NULL block (1 byte, zeroed)
    for count, size in ((1, 0), (0, 0), (0, 1)):
        p = ok(crt.calloc, count, size)
        assert crt._msize(p) == 1 and facade.read(p, 1) == b"\0"
        release(p)
    # CRT-06: count * size overflows (or exceeds _HEAP_MAXREQ): NULL, ENOMEM, no heap call
    for count, size in ((SIZE_MAX // 2, SIZE_MAX // 2), (SIZE_MAX, 2), (2, HEAP_MAXREQ // 2 + 1), (SIZE_MAX, 1)):
        fails(crt.calloc, count, size, errno=ENOMEM, error=SENTINEL)
    fails(crt.calloc, 1 << 31, 1 << 31, errno=ENOMEM)  # no overflow, but no heap gives 2**62


def test_crt07_10_realloc(win32):
    # CRT-07: realloc(NULL, n) is malloc(n); realloc(NULL, 0) a non-NULL block
    p = ok(crt.realloc, 0, 100)
    assert crt._msize(p) == 100
    z = ok(crt.realloc, 0, 0)
    assert crt._msize(z) == 1
    # CRT-08: realloc(p, 0) frees p and returns NULL, errno unchanged
    result, errno, _ = call(crt.realloc, z, 0)
    assert (result, errno) == (0, ERRNO_SENTINEL)
    fails(crt._msize, z, result=SIZE_MAX, errno=EINVAL)  # gone
    # CRT-09: growth (small -> medium -> large) and shrinking keep min(old, new) bytes
    facade.write(p, pattern(100))
    for size in (5000, 300_000, 2 * MiB, 40, 100):
        q = ok(crt.realloc, p, size)
        assert crt._msize(q) == size and q % 16 == 0
        assert facade.read(q, min(size, 40)) == pattern(100)[:min(size, 40)]
        p = q
    facade.write(p, pattern(100))
    # CRT-10: cannot be satisfied (too large for the CRT, or for the heap): NULL, ENOMEM, p intact
    for size in (SIZE_MAX, HEAP_MAXREQ + 16, 1 << 62, 1 << 40):
        fails(crt.realloc, p, size, errno=ENOMEM)
        assert_intact(p, 100)
    release(p)


def test_crt11_12_free(win32):
    # CRT-11: free(NULL) does nothing: errno and last error unchanged
    result, errno, error = call(crt.free, 0)
    assert (result, errno, error) == (None, ERRNO_SENTINEL, SENTINEL)
    # CRT-12: a HeapFree that fails: errno EINVAL (87 mapped), last error 87, nothing raised
    for size in SIZES:
        p = filled(size)
        keep = filled(size, 2)
        fails(crt.free, p + 8, result=None, errno=EINVAL, error=ERROR_INVALID_PARAMETER)  # interior
        assert_intact(p, size)
        release(p)
        fails(crt.free, p, result=None, errno=EINVAL, error=ERROR_INVALID_PARAMETER)  # double free
        assert_intact(keep, size, 2)  # a refused free damaged no neighbour
        release(keep)
    # addresses that were never blocks: outside the segment, the heap header, NULL-ish
    heap = shmheap.default_client().crt_heap
    for address in (1, 2**40, SIZE_MAX, heap.base, heap.base + 0x10):
        fails(crt.free, address, result=None, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
    heap.check()


def test_crt12_free_past_the_last_slot_of_a_slab(win32):
    # CRT-12 at the allocator: a slab of 1280-byte slots has 51 of them in 64 KiB, and 256 bytes
    # of tail that are no slot; an address there once raised IndexError out of Heap.free.
    p = filled(1200)
    heap = shmheap.default_client().crt_heap
    slab = heap.slabs[p >> 12]
    tail = slab.base + len(slab.sizes) * slab.block
    assert slab.block == 1280 and tail < slab.base + slab.size
    fails(crt.free, tail, result=None, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
    fails(crt._msize, tail, result=SIZE_MAX, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
    fails(crt.realloc, tail, 10, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
    fails(crt._expand, tail, 10, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
    assert_intact(p, 1200)
    release(p)


def test_crt13_14_msize(win32):
    # CRT-14: _msize(NULL): the handler, taken as returning: (size_t)-1, EINVAL
    fails(crt._msize, 0, result=SIZE_MAX, errno=EINVAL, error=SENTINEL)
    # CRT-13: the size last asked for, by any of the calls that size a block
    p = ok(crt.malloc, 33)
    assert ok(crt._msize, p) == 33
    p = ok(crt.realloc, p, 70)
    assert ok(crt._msize, p) == 70
    assert ok(crt._expand, p, 50) == p
    assert ok(crt._msize, p) == 50
    p = ok(crt._recalloc, p, 3, 7)
    assert ok(crt._msize, p) == 21
    release(p)


def test_crt15_18_expand(win32):
    # CRT-15: fits in place (within a slab slot; a medium block into the free space after it;
    # shrinking): returns p itself, _msize = n, contents kept; n = 0 is taken as 1
    p = filled(20)
    assert ok(crt._expand, p, 32) == p and crt._msize(p) == 32
    assert facade.read(p, 20) == pattern(20)
    medium = filled(100_000)
    assert ok(crt._expand, medium, 150_000) == medium and crt._msize(medium) == 150_000
    assert ok(crt._expand, medium, 60_000) == medium and crt._msize(medium) == 60_000
    assert facade.read(medium, 60_000) == pattern(100_000)[:60_000]
    # CRT-18 does not arise here: a small block contracts in place too
    assert ok(crt._expand, p, 0) == p and crt._msize(p) == 1
    assert facade.read(p, 1) == pattern(20)[:1]
    # CRT-16: growth that does not fit in place: NULL, ENOMEM, p unchanged (size and bytes)
    q = filled(16)
    fails(crt._expand, q, 5000, errno=ENOMEM, error=WinError.ERROR_NOT_ENOUGH_MEMORY)
    assert_intact(q, 16)
    large = filled(2 * MiB)
    fails(crt._expand, large, 3 * MiB, errno=ENOMEM)  # past a large block's own pages
    assert_intact(large, 2 * MiB)
    # CRT-17: _expand(NULL, n): EINVAL (the handler returning); n > _HEAP_MAXREQ: ENOMEM
    fails(crt._expand, 0, 10, errno=EINVAL, error=SENTINEL)
    fails(crt._expand, q, SIZE_MAX, errno=ENOMEM, error=SENTINEL)
    assert_intact(q, 16)
    for block in (p, medium, q, large):
        release(block)


def test_crt19_21_recalloc(win32):
    # CRT-19: growth reads zero even where the slot held garbage past the old size; old bytes kept
    p = filled(20)
    facade.write(p + 20, b"\xcc" * 12)  # the rest of its 32-byte slot: the heap's, not the block's
    assert ok(crt._recalloc, p, 1, 32) == p  # grows in place, in its slot
    assert facade.read(p, 32) == pattern(20) + bytes(12)
    q = ok(crt._recalloc, p, 1000, 300)  # moves (small -> medium)
    assert crt._msize(q) == 300_000
    assert facade.read(q, 32) == pattern(20) + bytes(12) and facade.read(q + 32, 300_000 - 32) == bytes(300_000 - 32)
    q = ok(crt._recalloc, q, 4, 4)  # shrinking keeps the first bytes
    assert crt._msize(q) == 16 and facade.read(q, 16) == pattern(20)[:16]
    # CRT-20: _recalloc(NULL, n, s) is calloc(n, s); a product of 0 frees and returns NULL
    crt.free(filled(64, 9))
    r = ok(crt._recalloc, 0, 8, 8)
    assert crt._msize(r) == 64 and facade.read(r, 64) == bytes(64)
    for count, size in ((0, 8), (8, 0)):
        victim = ok(crt.malloc, 10)
        result, errno, _ = call(crt._recalloc, victim, count, size)
        assert (result, errno) == (0, ERRNO_SENTINEL)
        fails(crt._msize, victim, result=SIZE_MAX, errno=EINVAL)
    # CRT-21: overflow or no memory: NULL, ENOMEM, the block as it was
    facade.write(q, pattern(16, 3))
    for count, size in ((SIZE_MAX // 2, SIZE_MAX // 2), (SIZE_MAX, 1), (1 << 31, 1 << 31)):
        fails(crt._recalloc, q, count, size, errno=ENOMEM)
        assert_intact(q, 16, 3)
    release(q)
    release(r)


def test_crt22_23_heap_handle(win32):
    # CRT-22 (msvcrt.dll): the CRT's own heap, not the process heap, listed among the heaps
    h = ok(crt._get_heap_handle)
    assert h != facade.GetProcessHeap() and h == shmheap.default_client().crt_heap.base
    heaps = []
    facade.GetProcessHeaps(16, heaps)
    assert heaps[0] == facade.GetProcessHeap() and h in heaps
    assert crt._get_heap_handle() == h  # the same every time
    # CRT-23: an ordinary Win32 heap: HeapSize, HeapValidate, HeapWalk see malloc's blocks
    blocks = {size: filled(size) for size in (24, 5000, 2 * MiB)}
    for size, p in blocks.items():
        assert facade.HeapSize(h, 0, p) == size
        assert facade.HeapValidate(h, 0, p)
    busy = {}
    entry = facade.PROCESS_HEAP_ENTRY()
    while facade.HeapWalk(h, entry):
        if entry.wFlags & facade.PROCESS_HEAP_ENTRY_BUSY:
            busy[entry.lpData] = entry.cbData
    assert all(busy.get(p) == size for size, p in blocks.items()), busy
    # a block HeapAlloc put on the CRT heap is one free() takes, and the other way round
    q = facade.HeapAlloc(h, 0, 48)
    assert crt._msize(q) == 48
    release(q)
    for p in blocks.values():
        assert facade.HeapFree(h, 0, p)
        fails(crt._msize, p, result=SIZE_MAX, errno=EINVAL)


def test_crt24_errno_is_per_thread_and_written_on_failure_only(win32):
    assert crt._set_errno(0) == 0 and crt._get_errno() == 0
    crt._set_errno(2**32 + 5)  # taken as a C int
    assert crt._get_errno() == 5
    crt._set_errno(-1)
    assert crt._get_errno() == -1
    # success never writes errno (nor the last error): ok() checks both sentinels
    p = ok(crt.malloc, 10)
    p = ok(crt.realloc, p, 20)
    p = ok(crt._expand, p, 16)
    p = ok(crt._recalloc, p, 2, 16)
    assert ok(crt._msize, p) == 32
    release(p)
    # each thread has its own: a failure in one leaves the other's alone
    crt._set_errno(ERRNO_SENTINEL)
    seen = {}

    def worker():
        seen["initial"] = crt._get_errno()
        seen["result"] = crt.malloc(SIZE_MAX)
        seen["after"] = crt._get_errno()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), f"the thread did not end within {DEADLINE}s"
    assert seen == {"initial": 0, "result": 0, "after": ENOMEM}
    assert crt._get_errno() == ERRNO_SENTINEL


# ---- §4 a block freed on the wrong heap (CRT-25..30, §5 "Cross-heap refusal") ------------------

@pytest.mark.parametrize("size", SIZES)
def test_crt26_27_crt_block_on_the_process_heap(win32, size):
    # CRT-27 in msvcrt.dll's model: HeapFree(GetProcessHeap(), 0, malloc(n)) is the wrong heap:
    # FALSE, ERROR_INVALID_PARAMETER (CRT-26), the block intact and usable
    process_heap = facade.GetProcessHeap()
    p = filled(size)
    facade.SetLastError(SENTINEL)
    assert facade.HeapFree(process_heap, 0, p) is False
    assert facade.GetLastError() == ERROR_INVALID_PARAMETER
    facade.SetLastError(SENTINEL)
    assert facade.HeapSize(process_heap, 0, p) == SIZE_MAX  # §5: (SIZE_T)-1
    assert facade.GetLastError() == ERROR_INVALID_PARAMETER
    assert facade.HeapReAlloc(process_heap, 0, p, size + 100) == 0
    assert facade.HeapValidate(process_heap, 0, p) is False
    assert_intact(p, size)
    facade.write(p, pattern(size, 5))  # still usable
    q = ok(crt.realloc, p, size + 64)
    assert facade.read(q, size) == pattern(size, 5)
    for heap in shmheap.default_client().heaps.values():
        heap.check()
    release(q)


def test_crt28_30_foreign_blocks_given_to_the_crt(win32):
    # CRT-28, CRT-30: a block of another heap (COM's, the process heap's, a private heap's),
    # or memory of no heap, given to free / realloc / _msize / _expand: EINVAL, left intact.
    private = facade.HeapCreate(0, 0, 0)
    region = facade.VirtualAlloc(0, 0x10000, facade.MEM_COMMIT | facade.MEM_RESERVE, facade.PAGE_READWRITE)
    foreign = {"CoTaskMemAlloc": (com.CoTaskMemAlloc, com.CoTaskMemFree),
               "HeapAlloc(private)": (lambda n: facade.HeapAlloc(private, 0, n), lambda p: facade.HeapFree(private, 0, p)),
               "GlobalAlloc": (lambda n: facade.GlobalAlloc(0, n), facade.GlobalFree)}
    for what, (allocate, deallocate) in foreign.items():
        for size in (24, 5000, 2 * MiB):
            p = allocate(size)
            assert p, what
            facade.write(p, pattern(size, 4))
            fails(crt.free, p, result=None, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
            fails(crt.realloc, p, size * 2, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
            fails(crt.realloc, p, 0, errno=EINVAL, error=ERROR_INVALID_PARAMETER)  # realloc(p, 0) frees p
            fails(crt._msize, p, result=SIZE_MAX, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
            fails(crt._expand, p, size // 2, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
            fails(crt._recalloc, p, 2, size, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
            assert facade.read(p, size) == pattern(size, 4), f"{what} block of {size} changed"
            deallocate(p)  # still a block of its own heap, which frees it
    process_heap = facade.GetProcessHeap()
    c = com.CoTaskMemAlloc(40)
    crt.free(c)
    assert facade.HeapSize(process_heap, 0, c) == 40
    com.CoTaskMemFree(c)
    assert facade.HeapSize(process_heap, 0, c) == SIZE_MAX
    fails(crt.free, region, result=None, errno=EINVAL)  # a VirtualAlloc region: no heap's
    assert facade.VirtualFree(region, 0, facade.MEM_RELEASE)
    assert facade.HeapDestroy(private)


# ---- each process has its own CRT heap ------------------------------------------------------

def _crt_child(socket_path, conn):
    """In a spawned process: malloc a block, report it and the heaps, wait for the parent's
    attempt to free it, then say whether it survived and whether it frees here."""
    import os

    os.environ["SHMHEAP_SOCKET"] = socket_path
    from shmheap import crt, win32

    p = crt.malloc(5000)
    win32.write(p, pattern(5000, 11))
    heaps = []
    win32.GetProcessHeaps(16, heaps)
    conn.send((p, crt._get_heap_handle(), win32.GetProcessHeap(), heaps))
    if conn.poll(DEADLINE):
        conn.recv()
        intact = crt._msize(p) == 5000 and win32.read(p, 5000) == pattern(5000, 11)
        crt._set_errno(0)
        crt.free(p)
        conn.send((intact, crt._get_errno() == 0 and crt._msize(p) == SIZE_MAX))


def test_crt22_each_process_has_its_own_crt_heap(win32, daemon):
    mine = crt._get_heap_handle()
    my_heaps = []
    facade.GetProcessHeaps(16, my_heaps)
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_crt_child, args=(daemon.socket, theirs), daemon=True)
    child.start()
    try:
        p, handle, process_heap, heaps = receive(ours, DEADLINE)
        assert handle in heaps and process_heap in heaps and handle != process_heap
        assert handle != mine and handle not in my_heaps
        # the child's block is no block of this process's CRT heap: refused, not freed
        assert not shmheap.default_client().crt_heap.holds(p)
        fails(crt._msize, p, result=SIZE_MAX, errno=EINVAL)
        fails(crt.free, p, result=None, errno=EINVAL, error=ERROR_INVALID_PARAMETER)
        fails(crt.realloc, p, 10, errno=EINVAL)
        assert facade.HeapSize(mine, 0, p) == SIZE_MAX
        ours.send("tried")
        assert receive(ours, DEADLINE) == (True, True)
    finally:
        finish(child, DEADLINE)
    assert child.exitcode == 0


def test_crt22_a_forked_child_gets_a_crt_heap_of_its_own(win32):
    parent_heap = crt._get_heap_handle()
    parent_block = filled(64, 6)

    def child():
        signal.alarm(DEADLINE)  # the deadline: a hung child dies, and the parent's read ends
        heap = crt._get_heap_handle()
        heaps = []
        facade.GetProcessHeaps(16, heaps)
        if heap == parent_heap or heap not in heaps or parent_heap in heaps:
            return 2
        p = crt.malloc(64)
        if not p or shmheap.default_client().crt_heap.base != heap:
            return 3
        crt._set_errno(0)
        if crt._msize(parent_block) != SIZE_MAX or crt._get_errno() != EINVAL:
            return 4  # the parent's block is no block of the child's heap
        crt.free(p)
        return 0 if crt._get_errno() == EINVAL else 5

    assert in_forked_child(child) == 0
    assert crt._get_heap_handle() == parent_heap
    assert_intact(parent_block, 64, 6)
    release(parent_block)


# ---- a state machine against a plain model --------------------------------------------------

CRT_SIZES = st.sampled_from([0, 1, 15, 16, 17, 100, 1024, 1300, 4096, 20_000, 70_000, 1_100_000])


class CrtModel(RuleBasedStateMachine):
    """The model: address -> bytes of every live block; freed addresses no longer live."""

    def __init__(self):
        super().__init__()
        self.blocks = {}
        self.freed = set()
        self.seed = 0

    def _fill(self, p, size):
        self.seed += 1
        data = pattern(size, self.seed)
        facade.write(p, data)
        self.blocks[p] = data
        self.freed.discard(p)

    def _pick(self, index):
        return sorted(self.blocks)[index % len(self.blocks)]

    @precondition(lambda self: len(self.blocks) < 12)
    @rule(size=CRT_SIZES, zeroed=st.booleans())
    def allocate(self, size, zeroed):
        p = ok(crt.calloc, size, 1) if zeroed else ok(crt.malloc, size)
        assert crt._msize(p) == max(size, 1) and p % 16 == 0
        if zeroed:
            assert facade.read(p, max(size, 1)) == bytes(max(size, 1))
        self._fill(p, max(size, 1))

    @precondition(lambda self: self.blocks)
    @rule(index=st.integers(0, 100), size=CRT_SIZES, zeroed=st.booleans())
    def resize(self, index, size, zeroed):
        p = self._pick(index)
        old = self.blocks.pop(p)
        if size == 0:
            assert crt.realloc(p, 0) == 0
            self.freed.add(p)
            return
        q = ok(crt._recalloc, p, size, 1) if zeroed else ok(crt.realloc, p, size)
        kept = min(len(old), size)
        assert facade.read(q, kept) == old[:kept]
        if zeroed and size > len(old):
            assert facade.read(q + len(old), size - len(old)) == bytes(size - len(old))
        if q != p:
            self.freed.add(p)
        self._fill(q, size)

    @precondition(lambda self: self.blocks)
    @rule(index=st.integers(0, 100), size=CRT_SIZES)
    def expand(self, index, size):
        p = self._pick(index)
        old = self.blocks[p]
        result, errno, _ = call(crt._expand, p, size)
        if result:
            assert result == p and errno == ERRNO_SENTINEL
            new = max(size, 1)
            assert facade.read(p, min(len(old), new)) == old[:new]
            self._fill(p, new)
        else:
            assert errno == ENOMEM and size > len(old)  # only growth fails

    @precondition(lambda self: self.blocks)
    @rule(index=st.integers(0, 100))
    def release(self, index):
        p = self._pick(index)
        del self.blocks[p]
        release(p)
        self.freed.add(p)

    @rule(index=st.integers(0, 100))
    def free_again(self, index):
        if not self.freed:  # no precondition: what is freed depends on where blocks moved
            return
        p = sorted(self.freed)[index % len(self.freed)]
        fails(crt.free, p, result=None, errno=EINVAL, error=ERROR_INVALID_PARAMETER)

    @invariant()
    def blocks_intact(self):
        for p, data in self.blocks.items():
            assert crt._msize(p) == len(data)
            assert facade.read(p, len(data)) == data

    @invariant()
    def heap_consistent(self):
        heap = shmheap.default_client().crt_heap
        with heap.lock:
            heap.check()
            assert heap.live == len(self.blocks)

    def teardown(self):
        for p in list(self.blocks):
            crt.free(p)


def test_crt_state_machine(win32):
    run_state_machine_as_test(CrtModel, settings=settings(
        max_examples=40, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]))


def test_crt22_the_crt_heap_cannot_be_destroyed(win32):
    # Not a table row: HeapDestroy(_get_heap_handle()) is refused, as for the process heap
    # (msvcrt would go on handing out the released pages); its blocks stay intact and usable.
    h = crt._get_heap_handle()
    p = filled(24)
    facade.SetLastError(SENTINEL)
    assert not facade.HeapDestroy(h)
    assert facade.GetLastError() == WinError.ERROR_INVALID_HANDLE
    assert_intact(p, 24)
    assert crt._msize(p) == 24
    release(p)
    q = crt.malloc(24)
    assert q and crt._msize(q) == 24
    crt.free(q)