"""Heaps that do not churn: in the configurations people use (HeapCreate(0, 0, 0),
GetProcessHeap(), a heap with no sizes, the Block API), a loop that allocates and frees sends
the daemon nothing; the pages it freed go back after the purge delay, at once under commit
pressure or on HeapCompact."""

import multiprocessing
import pickle
import time

import pytest

import shmheap
from shmheap.heap import PURGE_DELAY
from shmheap.segment import PAGE_SIZE

from conftest import bind_win32, receive, wait_until

KiB, MiB = 1024, 2**20
SIZES = [16, 64, KiB, 4 * KiB, 64 * KiB, 256 * KiB]
spawn = multiprocessing.get_context("spawn")


def _heap_forms(win32):
    """(name, alloc(size) -> token, free(token)) for each way users get a heap."""
    client = shmheap.default_client()
    created = win32.HeapCreate(0, 0, 0)
    named = client.create_heap("plain")
    process = win32.GetProcessHeap()
    sized = win32.HeapCreate(0, MiB, 0)
    return [
        ("HeapCreate(0, 0, 0)", lambda n: win32.HeapAlloc(created, 0, n), lambda p: win32.HeapFree(created, 0, p)),
        ("GetProcessHeap()", lambda n: win32.HeapAlloc(process, 0, n), lambda p: win32.HeapFree(process, 0, p)),
        ("create_heap(name)", named.alloc, lambda block: block.free()),
        ("HeapCreate(0, 1 MiB, 0)", lambda n: win32.HeapAlloc(sized, 0, n), lambda p: win32.HeapFree(sized, 0, p)),
    ]


@pytest.mark.parametrize("size", SIZES)
def test_a_steady_alloc_free_loop_sends_the_daemon_nothing(win32, size):
    client = shmheap.default_client()
    for name, alloc, free in _heap_forms(win32):
        free(alloc(size))  # the first pair may commit
        before = client.requests_sent
        for _ in range(200):
            token = alloc(size)
            assert token, f"{name}: allocation of {size} failed"
            free(token)
        assert client.requests_sent == before, f"{name}, {size} B: the loop asked the daemon"


def test_a_loop_that_outlasts_the_delay_still_sends_nothing(win32):
    client = shmheap.default_client()
    heap = win32.HeapCreate(0, 0, 0)
    win32.HeapFree(heap, 0, win32.HeapAlloc(heap, 0, 64 * KiB))  # grows once; a purge is due
    before = client.requests_sent
    deadline = time.monotonic() + 1.5 * PURGE_DELAY
    while time.monotonic() < deadline:  # in use: the purge is put off, not run under the loop
        win32.HeapFree(heap, 0, win32.HeapAlloc(heap, 0, 64 * KiB))
        time.sleep(0.005)  # the heap's lock is free most of the time: the purger could run
    assert client.requests_sent == before


def test_a_one_page_slab_fits_a_heap_with_one_free_page(win32):
    heap = win32.HeapCreate(0, 0, 0)
    allocator = shmheap.default_client().heaps[heap]
    committed = allocator.committed
    block = win32.HeapAlloc(heap, 0, 64)  # its slab is one page, page-aligned
    assert block and allocator.committed == committed, "alignment padding made the heap grow"
    assert win32.HeapFree(heap, 0, block)


def test_freed_pages_stay_until_the_delay_then_go_back(win32):
    client = shmheap.default_client()
    heap = win32.HeapCreate(0, 0, 0)
    allocator = client.heaps[heap]
    start = allocator.committed
    blocks = [win32.HeapAlloc(heap, 0, 64 * KiB) for _ in range(64)]
    grown = allocator.committed
    assert grown >= start + 4 * MiB
    for block in blocks:
        win32.HeapFree(heap, 0, block)
    assert allocator.committed == grown  # kept for the next loop: nothing decommitted yet
    wait_until(lambda: allocator.committed == start, timeout=PURGE_DELAY + 10, what="the purge")
    daemon_view = {row["handle"]: row["committed"] for row in client.heap_list()}
    assert daemon_view[heap] == start  # the daemon counts what the heap holds


def test_heap_compact_gives_the_pages_back_at_once(win32):
    heap = win32.HeapCreate(0, 0, 0)
    allocator = shmheap.default_client().heaps[heap]
    start = allocator.committed
    blocks = [win32.HeapAlloc(heap, 0, 200 * KiB) for _ in range(8)]
    for block in blocks[1:]:
        win32.HeapFree(heap, 0, block)
    assert allocator.committed >= start + 8 * 200 * KiB  # kept until the purge
    win32.HeapCompact(heap, 0)
    assert allocator.committed < start + 512 * KiB  # one block and the pages around it remain
    win32.HeapFree(heap, 0, blocks[0])
    win32.HeapCompact(heap, 0)
    assert allocator.committed == start


@pytest.fixture
def tight_win32(make_daemon, monkeypatch):
    yield from bind_win32(make_daemon("--process-commit-limit", "8M"), monkeypatch)


def test_commit_pressure_takes_the_freed_pages_back_at_once(tight_win32):
    win32 = tight_win32
    first, second = win32.HeapCreate(0, 0, 0), win32.HeapCreate(0, 0, 0)
    blocks = [win32.HeapAlloc(first, 0, 64 * KiB) for _ in range(80)]  # 5 MiB
    assert all(blocks)
    for block in blocks:
        win32.HeapFree(first, 0, block)
    # 5 MiB are still committed for `first`: these need them, and get them without waiting.
    assert all(win32.HeapAlloc(second, 0, 64 * KiB) for _ in range(64))
    address = win32.VirtualAlloc(0, MiB, win32.MEM_COMMIT | win32.MEM_RESERVE, win32.PAGE_READWRITE)
    assert address, f"VirtualAlloc failed under pressure: {win32.GetLastError()}"


def _free_all_then_sleep(socket_path, conn):
    from shmheap import win32

    client = shmheap.connect(socket_path, autostart=False)
    shmheap.client.current = client  # the facade's default client: this daemon's
    heaps = [win32.GetProcessHeap(), win32.HeapCreate(0, 0, 0)]
    blocks = [(h, win32.HeapAlloc(h, 0, size)) for h in heaps for size in SIZES for _ in range(8)]
    assert all(block for _, block in blocks)
    for h, block in blocks:
        win32.HeapFree(h, 0, block)
    conn.send(("freed", client.pid))  # ~5 MiB were committed
    time.sleep(60)  # asleep: only the purger thread can give the pages back


def test_a_process_that_frees_and_sleeps_holds_little_after_two_seconds(daemon, client):
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_free_all_then_sleep, args=(daemon.socket, child_end))
    child.start()
    try:
        _, pid = receive(parent_end, timeout=60)
        time.sleep(2.0)
        held = sum(row["committed"] for row in client.heap_list() if row["owner"] == pid)
        assert held <= MiB, f"{held} bytes of heap pages still committed 2 s after the last free"
    finally:
        child.kill()
        child.join(30)


def test_a_posted_error_is_not_lost_to_the_purger(win32):
    client = shmheap.default_client()
    heap = win32.HeapCreate(0, 0, 0)
    buffer = client.share(4096)
    copy = pickle.loads(pickle.dumps(buffer))  # a second hold, through another object
    buffer.free()
    client.echo(0)
    for block in [win32.HeapAlloc(heap, 0, 200 * KiB) for _ in range(4)]:
        win32.HeapFree(heap, 0, block)  # a purge is due: the purger thread will speak
    copy.free()  # the daemon refuses it (gone): the error belongs to this thread's next call
    wait_until(lambda: not client.connection.posted, timeout=PURGE_DELAY + 10,
               what="the purger's calls to read the refused free's reply")
    with pytest.raises(shmheap.ShmheapValueError):
        client.echo(1)


def test_a_destroyed_heap_leaves_the_purger_idle(win32):
    from shmheap import private_heap

    heap = shmheap.default_client().create_heap("short-lived")
    for block in [heap.alloc(200 * KiB) for _ in range(4)]:
        block.free()
    heap.destroy()
    assert heap._heap.purge_due is None
    wait_until(lambda: heap._heap not in set(private_heap.purger.heaps), timeout=PURGE_DELAY + 10,
               what="the purger to let the destroyed heap go")


def test_a_neighbour_kept_for_reuse_does_not_stop_growth_in_place(win32):
    heap = win32.HeapCreate(0, MiB, 0)
    first, second, third = (win32.HeapAlloc(heap, 0, 40000) for _ in range(3))
    win32.HeapFree(heap, 0, second)  # kept as it is for the next 40000-byte block
    assert win32.HeapReAlloc(heap, win32.HEAP_REALLOC_IN_PLACE_ONLY, first, 80000) == first


def test_the_purge_gives_back_free_pages_between_scattered_live_blocks(win32):
    heap = win32.HeapCreate(0, 0, 0)
    blocks = [win32.HeapAlloc(heap, 0, 40 * KiB) for _ in range(200)]  # ~8 MiB over several regions
    kept = blocks[::37]  # a few live blocks spread over all of it
    for i, block in enumerate(kept):
        win32.write(block, f"kept {i}".encode())
    for block in blocks:
        if block not in kept:
            win32.HeapFree(heap, 0, block)
    assert win32.HeapCompact(heap, 0)  # the purge, at once
    state = shmheap.default_client().heaps[heap]
    assert state.committed < 2 * MiB, f"{state.committed} bytes still committed for {len(kept)} blocks"
    for i, block in enumerate(kept):
        assert win32.read(block, len(f"kept {i}")) == f"kept {i}".encode()
    again = [win32.HeapAlloc(heap, 0, 40 * KiB) for _ in range(100)]  # over the given-back pages
    for block in again:
        win32.write(block, b"x" * 40 * KiB)  # committed again before it was handed out
    state.check()
    shmheap.default_client().check()


def _global_churn(socket_path, seed, conn):
    import random

    client = shmheap.connect(socket_path, autostart=False)
    rng = random.Random(seed)
    live = []
    conn.send("started")
    while True:
        if len(live) < 200 or rng.random() < 0.5:
            live.append(client.global_alloc(0, rng.choice([16, 200, 3000, 20000, 100000])))
        else:
            client.global_free(live.pop(rng.randrange(len(live))))


def test_no_global_memory_stays_committed_after_its_processes_are_killed(daemon, client):
    kept = [client.global_alloc(0, 100) for _ in range(5)]
    baseline = client.memory_status()["committed"]
    spawn = multiprocessing.get_context("spawn")
    churners = []
    for seed in range(6):
        ours, theirs = spawn.Pipe()
        churner = spawn.Process(target=_global_churn, args=(daemon.socket, seed, theirs), daemon=True)
        churner.start()
        assert receive(ours) == "started"
        churners.append(churner)
    wait_until(lambda: client.memory_status()["committed"] > baseline + 8 * MiB, timeout=30,
               what="the churners to grow the global heap")
    kept += [client.global_alloc(0, size) for size in (100, 3000, 50000) for _ in range(3)]  # scattered high
    time.sleep(0.5)
    for churner in churners:
        churner.kill()
    for churner in churners:
        churner.join(10)
    wait_until(lambda: client.memory_status()["committed"] <= baseline + MiB, timeout=PURGE_DELAY + 10,
               what="the dead processes' global memory to be given back")
    assert daemon.resident_bytes() == client.status()["committed"] + PAGE_SIZE  # tmpfs agrees (+ the header page)
    for handle in kept:
        assert client.global_size(handle) > 0
    client.check()


def test_a_hole_that_becomes_part_of_the_top_is_trimmed_with_it(win32):
    heap = win32.HeapCreate(0, 0, 0)
    state = shmheap.default_client().heaps[heap]
    low = win32.HeapAlloc(heap, 0, 40 * KiB)
    middle = win32.HeapAlloc(heap, 0, 300 * KiB)
    high = win32.HeapAlloc(heap, 0, 40 * KiB)
    win32.HeapFree(heap, 0, middle)
    assert win32.HeapCompact(heap, 0)
    assert state.hole_bytes > 0  # the middle's pages went back, between live blocks
    win32.HeapFree(heap, 0, high)  # the hole is now part of the free top ...
    assert win32.HeapCompact(heap, 0)  # ... which the purge trims, the hole with it
    state.check()
    win32.write(low, b"still here")
    blocks = [win32.HeapAlloc(heap, 0, 100 * KiB) for _ in range(4)]  # over what was given back
    for block in blocks:
        win32.write(block, b"y" * 100 * KiB)
    state.check()
    shmheap.default_client().check()
