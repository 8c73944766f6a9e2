"""Conformance of COM's task allocator (`shmheap.com`) with docs/crt_semantics.md, rows
COM-01..15 and the cross-heap rows CRT-28/29: CoTaskMem* and the IMalloc of CoGetMalloc, on the
process heap. CoGetMalloc's out-parameter is the second item of the pair it returns.

Every test runs against a real daemon (the `win32` fixture, whose teardown runs every heap's own
check). One test per group of rows, named after them.
"""

import multiprocessing
import signal

import pytest

import shmheap
from conftest import finish, in_forked_child, receive
from shmheap import com, crt
from shmheap import win32 as facade
from shmheap.com import E_INVALIDARG, MEMCTX_TASK, S_OK
from shmheap.errors import WinError
from win32_checks import SENTINEL, pattern

SIZE_MAX = 2**64 - 1
MiB = 2**20
DEADLINE = 30  # seconds, for anything that waits on another process
ERROR_INVALID_PARAMETER = WinError.ERROR_INVALID_PARAMETER
SIZES = [0, 1, 16, 1000, 5000, 300_000, 2 * MiB]  # zero-length, small, medium, large

spawn = multiprocessing.get_context("spawn")


def call(fn, *args):
    """(result, GetLastError()) of fn(*args), with the sentinel stored before the call."""
    facade.SetLastError(SENTINEL)
    return fn(*args), facade.GetLastError()


def ok(fn, *args):
    """Call fn(*args); assert a non-NULL result with the last error untouched."""
    result, error = call(fn, *args)
    assert result, f"{fn.__name__}{args} failed with error {error}"
    assert error == SENTINEL, f"{fn.__name__}{args} succeeded but set the last error to {error}"
    return result


def expect(fn, *args, result, error=SENTINEL):
    """Call fn(*args); assert its exact result (and type) and the last error (SENTINEL:
    untouched; None: not checked)."""
    got, got_error = call(fn, *args)
    assert type(got) is type(result) and got == result, f"{fn.__name__}{args} returned {got!r}, expected {result!r}"
    if error is not None:
        assert got_error == error, f"{fn.__name__}{args}: last error {got_error}, expected {int(error)}"


def task_allocator():
    hr, malloc = com.CoGetMalloc(MEMCTX_TASK)
    assert hr == S_OK and malloc is not None
    return malloc


def filled(size, seed=1):
    p = ok(com.CoTaskMemAlloc, size)
    facade.write(p, pattern(size, seed))
    return p


def assert_intact(p, size, seed=1):
    """The task-allocator block at p is live, `size` bytes of pattern(size, seed)."""
    assert facade.HeapSize(facade.GetProcessHeap(), 0, p) == size
    assert facade.read(p, size) == pattern(size, seed)


# ---- §1 constants ----------------------------------------------------------------------------

def test_constants():
    assert (com.S_OK, com.E_INVALIDARG, com.E_OUTOFMEMORY) == (0, 0x80070057, 0x8007000E)
    assert (com.MEMCTX_TASK, com.MEMCTX_SHARED, com.MEMCTX_MACSYSTEM) == (1, 2, 3)
    assert (com.MEMCTX_UNKNOWN, com.MEMCTX_SAME) == (-1, -2)
    assert com.SIZE_T_MAX == SIZE_MAX
    assert com.FAILED(E_INVALIDARG) and com.FAILED(E_INVALIDARG - 2**32)  # unsigned or as a LONG
    assert com.SUCCEEDED(S_OK) and com.SUCCEEDED(1) and not com.SUCCEEDED(E_INVALIDARG)


# ---- §3 the task allocator -------------------------------------------------------------------

def test_com01_04_cogetmalloc(win32):
    # COM-01: S_OK and the same process-wide allocator every time
    first = task_allocator()
    assert task_allocator() is first and isinstance(first, com.IMalloc)
    # COM-02: every other context: E_INVALIDARG, and the out-parameter NULL (None)
    for context in (0, com.MEMCTX_SHARED, com.MEMCTX_MACSYSTEM, com.MEMCTX_UNKNOWN, com.MEMCTX_SAME, 2**32 + 2):
        assert com.CoGetMalloc(context) == (E_INVALIDARG, None), context
    assert com.CoGetMalloc(2**32 + 1) == (S_OK, first)  # a DWORD: taken modulo 2**32
    # COM-04: a static object: AddRef / Release count nothing, Release never destroys it
    assert [first.AddRef(), first.AddRef(), first.Release(), first.Release(), first.Release()] == [2, 2, 1, 1, 1]
    p = ok(first.Alloc, 8)
    first.Free(p)


def test_com05_07_alloc(win32):
    malloc = task_allocator()
    # COM-05: CoTaskMemAlloc(0) and Alloc(0): valid, distinct, zero-length (GetSize 0)
    zeros = [ok(com.CoTaskMemAlloc, 0) for _ in range(3)] + [ok(malloc.Alloc, 0) for _ in range(3)]
    assert len(set(zeros)) == 6
    assert all(malloc.GetSize(p) == 0 for p in zeros)
    # COM-07: exactly the size asked for here (the docs allow more), aligned for any type
    blocks = {}
    for size in SIZES:
        blocks[size] = p = filled(size, size)
        assert p % 16 == 0 and malloc.GetSize(p) == size
        assert_intact(p, size, size)
    # COM-06: too large: NULL, no HRESULT; the heap's ERROR_NOT_ENOUGH_MEMORY is the last error
    for size in (SIZE_MAX, 1 << 62, -1):
        expect(com.CoTaskMemAlloc, size, result=0, error=WinError.ERROR_NOT_ENOUGH_MEMORY)
        expect(malloc.Alloc, size, result=0, error=WinError.ERROR_NOT_ENOUGH_MEMORY)
    for p in zeros + list(blocks.values()):
        com.CoTaskMemFree(p)
        assert malloc.DidAlloc(p) == 0


def test_com08_10_realloc(win32):
    malloc = task_allocator()
    for realloc in (com.CoTaskMemRealloc, malloc.Realloc):
        # COM-08: a NULL block allocates; (NULL, 0) is a valid zero-length block
        p = ok(realloc, 0, 100)
        assert malloc.GetSize(p) == 100
        z = ok(realloc, 0, 0)
        assert malloc.GetSize(z) == 0 and malloc.DidAlloc(z) == 1
        # COM-09: (p, 0) frees p and returns NULL
        expect(realloc, z, 0, result=0)
        assert malloc.DidAlloc(z) == 0
        # growth and shrinking keep min(old, new) bytes, size exact
        facade.write(p, pattern(100))
        for size in (5000, 300_000, 2 * MiB, 40, 100):
            q = ok(realloc, p, size)
            assert malloc.GetSize(q) == size
            assert facade.read(q, min(size, 40)) == pattern(100)[:min(size, 40)]
            p = q
        facade.write(p, pattern(100, 2))
        # COM-10: cannot be satisfied: NULL, the block unchanged and still valid
        for size in (SIZE_MAX, 1 << 62):
            expect(realloc, p, size, result=0, error=None)
            assert_intact(p, 100, 2)
        malloc.Free(p)
        assert malloc.DidAlloc(p) == 0


def test_com11_free_null_and_refusals(win32):
    malloc = task_allocator()
    # COM-11: NULL does nothing, touches nothing (the last error stays)
    expect(com.CoTaskMemFree, 0, result=None)
    expect(malloc.Free, 0, result=None)
    # a block freed twice, an interior pointer: refused (void), ERROR_INVALID_PARAMETER, no raise
    p = filled(64)
    keep = filled(64, 2)
    expect(com.CoTaskMemFree, p + 8, result=None, error=ERROR_INVALID_PARAMETER)
    assert_intact(p, 64)
    com.CoTaskMemFree(p)
    expect(com.CoTaskMemFree, p, result=None, error=ERROR_INVALID_PARAMETER)
    expect(malloc.Free, p, result=None, error=ERROR_INVALID_PARAMETER)
    assert_intact(keep, 64, 2)
    malloc.Free(keep)


def test_com12_13_getsize_didalloc(win32):
    malloc = task_allocator()
    # COM-12: the requested size, exactly; (SIZE_T)-1 for NULL
    p = ok(malloc.Alloc, 16)
    expect(malloc.GetSize, p, result=16)
    expect(malloc.GetSize, 0, result=SIZE_MAX)
    # COM-13: 1 for a block, -1 for NULL, 0 for garbage and for an interior pointer
    expect(malloc.DidAlloc, p, result=1)
    expect(malloc.DidAlloc, 0, result=-1)
    expect(malloc.DidAlloc, 1, result=0)
    expect(malloc.DidAlloc, p + 4, result=0)
    expect(malloc.GetSize, p + 4, result=SIZE_MAX, error=ERROR_INVALID_PARAMETER)
    malloc.Free(p)
    expect(malloc.DidAlloc, p, result=0)


def test_com14_heapminimize(win32):
    malloc = task_allocator()
    blocks = {size: filled(size, 3) for size in SIZES}
    for size in (5000, 300_000):  # freed blocks it could give back
        com.CoTaskMemFree(filled(size))
    expect(malloc.HeapMinimize, result=None)
    for size, p in blocks.items():
        assert_intact(p, size, 3)
        malloc.Free(p)


@pytest.mark.parametrize("size", SIZES)
def test_com15_blocks_live_on_the_process_heap(win32, size):
    # COM-15: HeapSize(GetProcessHeap(), 0, CoTaskMemAlloc(n)) = n, HeapValidate agrees, and
    # the process heap's own calls free and take its blocks
    process_heap = facade.GetProcessHeap()
    p = filled(size)
    expect(facade.HeapSize, process_heap, 0, p, result=size)
    assert facade.HeapValidate(process_heap, 0, p)
    assert facade.HeapSize(crt._get_heap_handle(), 0, p) == SIZE_MAX  # not malloc's heap
    assert facade.HeapFree(process_heap, 0, p)
    assert task_allocator().DidAlloc(p) == 0
    q = facade.HeapAlloc(process_heap, 0, size)
    assert task_allocator().GetSize(q) == size
    com.CoTaskMemFree(q)
    expect(facade.HeapSize, process_heap, 0, q, result=SIZE_MAX, error=ERROR_INVALID_PARAMETER)


# ---- §4 a block of another heap (CRT-28, CRT-29) ---------------------------------------------

@pytest.mark.parametrize("size", [24, 5000, 2 * MiB])
def test_crt28_29_foreign_blocks_given_to_com(win32, size):
    malloc = task_allocator()
    private = facade.HeapCreate(0, 0, 0)
    makers = {"malloc": (crt.malloc, crt.free),
              "HeapAlloc(private)": (lambda n: facade.HeapAlloc(private, 0, n),
                                     lambda p: facade.HeapFree(private, 0, p))}
    for what, (allocate, deallocate) in makers.items():
        p = allocate(size)
        assert p, what
        facade.write(p, pattern(size, 8))
        # CRT-28 (msvcrt.dll's model): CoTaskMemFree(malloc(n)) is the wrong heap: void, the
        # block intact, the last error ERROR_INVALID_PARAMETER (our choice)
        expect(com.CoTaskMemFree, p, result=None, error=ERROR_INVALID_PARAMETER)
        expect(malloc.Free, p, result=None, error=ERROR_INVALID_PARAMETER)
        expect(com.CoTaskMemRealloc, p, size * 2, result=0, error=ERROR_INVALID_PARAMETER)
        expect(com.CoTaskMemRealloc, p, 0, result=0, error=ERROR_INVALID_PARAMETER)  # (p, 0) frees p
        # CRT-29: DidAlloc 0 (the block is on another heap), GetSize (SIZE_T)-1
        expect(malloc.DidAlloc, p, result=0)
        expect(malloc.GetSize, p, result=SIZE_MAX, error=ERROR_INVALID_PARAMETER)
        assert facade.read(p, size) == pattern(size, 8), f"the {what} block changed"
        if what == "malloc":
            assert crt._msize(p) == size
        deallocate(p)  # still a block of its own heap, which frees it
    assert facade.HeapDestroy(private)
    for heap in shmheap.default_client().heaps.values():
        heap.check()


# ---- each process has its own task allocator's heap ----------------------------------------

def _com_child(socket_path, conn):
    """In a spawned process: a task-allocator block, reported with the process heap."""
    import os

    os.environ["SHMHEAP_SOCKET"] = socket_path
    from shmheap import com, win32

    hr, malloc = com.CoGetMalloc(com.MEMCTX_TASK)
    p = malloc.Alloc(300)
    win32.write(p, pattern(300, 12))
    conn.send((hr, p, win32.GetProcessHeap(), win32.HeapSize(win32.GetProcessHeap(), 0, p)))
    if conn.poll(DEADLINE):
        conn.recv()
        intact = malloc.GetSize(p) == 300 and win32.read(p, 300) == pattern(300, 12)
        malloc.Free(p)
        conn.send((intact, malloc.DidAlloc(p) == 0))


def test_com15_another_process_allocates_on_its_own_process_heap(win32, daemon):
    malloc = task_allocator()
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_com_child, args=(daemon.socket, theirs), daemon=True)
    child.start()
    try:
        hr, p, process_heap, size = receive(ours, DEADLINE)
        assert (hr, size) == (S_OK, 300)
        assert process_heap != facade.GetProcessHeap()
        # its block is none of ours: DidAlloc 0, GetSize (SIZE_T)-1, CoTaskMemFree refused
        # (memory of no heap of this process's: HeapFree leaves the last error alone, HF-06)
        expect(malloc.DidAlloc, p, result=0)
        expect(malloc.GetSize, p, result=SIZE_MAX, error=ERROR_INVALID_PARAMETER)
        expect(com.CoTaskMemFree, p, result=None, error=SENTINEL)
        ours.send("tried")
        assert receive(ours, DEADLINE) == (True, True)
    finally:
        finish(child, DEADLINE)
    assert child.exitcode == 0


def test_com01_after_fork_the_allocator_is_the_childs(win32):
    malloc = task_allocator()
    parent_heap = facade.GetProcessHeap()
    parent_block = filled(48, 4)

    def child():
        signal.alarm(DEADLINE)  # the deadline: a hung child dies, and the parent's read ends
        hr, m = com.CoGetMalloc(MEMCTX_TASK)
        if hr != S_OK or m is not malloc:
            return 2  # the same static object, now over the child's process heap
        if facade.GetProcessHeap() == parent_heap or m.DidAlloc(parent_block) != 0:
            return 3
        p = m.Alloc(48)
        if not p or facade.HeapSize(facade.GetProcessHeap(), 0, p) != 48:
            return 4
        m.Free(p)
        return 0 if m.DidAlloc(p) == 0 else 5

    assert in_forked_child(child) == 0
    assert_intact(parent_block, 48, 4)
    malloc.Free(parent_block)
