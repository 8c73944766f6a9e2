"""The kernel in-process, built as shmheapd builds it: its op table covers the protocol, its
walkers find what breaks, the reaper releases a process's everything, and the wiring between
services (reclaim under commit pressure, housekeeping) works."""

import pytest

from shmheap.constants import FILE_MAP_ALL_ACCESS, GMEM_MOVEABLE, MEM_COMMIT, MEM_RESERVE, PAGE_READWRITE
from shmheap.errors import ShmheapError, ShmheapMemoryError, WinError
from shmheap.moveable import ADDRESS_MASK
from shmheap.protocol import OPS, SERVER_OPS
from shmheapd.handles import LARGE_CACHE_SECONDS
from shmheapd.sessions import Session

MiB = 2**20
PID = 4242


@pytest.fixture
def kernel(make_kernel):
    return make_kernel(64 * MiB, 16 * MiB, 16 * MiB)


def attach(kernel, pid=PID):
    session = Session(None, pid, 0)  # the kernel never touches the socket
    kernel.attach(session)
    return session


def broken(kernel):
    """The message of the check that fails."""
    with pytest.raises(ShmheapError) as info:
        kernel.check()
    assert info.value.winerror == WinError.ERROR_GEN_FAILURE
    return str(info.value)


def test_the_op_table_answers_every_op_but_the_handshake(kernel):
    assert set(kernel.ops) == set(OPS) - SERVER_OPS
    assert kernel.ops["echo"](PID, [1, "x"]) == [1, "x"]
    assert kernel.check()["processes"] == 0


def test_the_reaper_releases_everything_of_a_process(kernel):
    session = attach(kernel)
    ops = kernel.ops
    ops["virtual_alloc"](PID, 0, MiB, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    ops["heap_create"](PID, "h", 0, 2 * 65536, 65536, 0)
    ops["global_alloc"](PID, GMEM_MOVEABLE, 5000)
    section, _ = ops["section_create"](PID, PAGE_READWRITE, MiB, "s")
    ops["section_map"](PID, section, FILE_MAP_ALL_ACCESS, 0, 0)
    status = kernel.check()
    assert (status["processes"], status["heaps"], status["global_objects"], status["sections"]) == (1, 1, 1, 1)
    committed = kernel.pagetable.committed
    kernel.detach(session)
    status = kernel.check()
    assert (status["processes"], status["heaps"], status["global_objects"], status["sections"]) == (0, 0, 0, 0)
    assert kernel.pagetable.regions_of(PID) == []
    assert kernel.pagetable.committed < committed - 2 * MiB


def test_the_walkers_find_an_orphan_region(kernel):
    kernel.pagetable.reserve(PID, 65536, PAGE_READWRITE)  # no process 4242 is connected
    assert "processes that are gone" in broken(kernel)


def test_the_walkers_find_a_heap_region_of_no_heap(kernel):
    attach(kernel)
    kernel.pagetable.reserve(PID, 65536, PAGE_READWRITE, kind="heap")
    assert "heap regions of no heap" in broken(kernel)


def test_the_walkers_find_a_viewer_without_a_view(kernel):
    attach(kernel)
    section, _ = kernel.ops["section_create"](PID, PAGE_READWRITE, MiB, None)
    kernel.check()
    region = kernel.pagetable.region_at(kernel.sections.list()[0]["address"])
    kernel.pagetable.grant(region, PID, [(0, 16, True)])  # a grant no view accounts for
    assert "viewers" in broken(kernel)


def test_the_walkers_find_an_owner_of_a_freed_object(kernel):
    attach(kernel)
    pointer = kernel.ops["global_alloc"](PID, 0, 64)
    kernel.global_memory.table.free(pointer)  # behind the owners' back
    assert "records of freed objects" in broken(kernel)


def test_the_walkers_find_a_corrupted_handle_slot(kernel):
    attach(kernel)
    handle = kernel.ops["global_alloc"](PID, GMEM_MOVEABLE, 64)
    slot = handle & ADDRESS_MASK
    kernel.memory[slot:slot + 8] = bytes(8)  # a stray write over the pointer slot
    assert "does not hold its pointer" in broken(kernel)


def test_commit_pressure_reclaims_the_global_cache(kernel):
    attach(kernel)
    ops = kernel.ops
    big = ops["global_alloc"](PID, 0, 12 * MiB)  # large: a region of its own
    ops["global_free"](PID, big)  # kept committed for reuse
    assert kernel.pagetable.committed > 12 * MiB
    assert 0 < kernel.housekeeping(0.0) <= LARGE_CACHE_SECONDS
    # 12 MiB more cannot be had under the 16 MiB limit unless the cache goes: it does.
    ops["virtual_alloc"](PID, 0, 12 * MiB, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    assert kernel.housekeeping(1.0) is None  # nothing left to watch
    with pytest.raises(ShmheapMemoryError):
        ops["virtual_alloc"](PID, 0, 12 * MiB, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    kernel.check()


def test_housekeeping_keeps_a_cache_in_use_however_long(kernel):
    attach(kernel)
    ops = kernel.ops
    first = ops["global_alloc"](PID, 0, 4 * MiB)
    second = ops["global_alloc"](PID, 0, 4 * MiB)
    ops["global_free"](PID, first)  # one region always waits in the cache while the other works
    now = 100.0
    for _ in range(10):  # a pool's buffers taking turns, for longer than the cache's timeout
        kernel.housekeeping(now)
        assert kernel.global_memory.heap.large_cache, "a cache in use was released"
        now += LARGE_CACHE_SECONDS / 2
        taken = ops["global_alloc"](PID, 0, 4 * MiB)
        assert taken == first  # the cached region, still there
        ops["global_free"](PID, second)
        first, second = second, taken
    kernel.housekeeping(now)
    kernel.housekeeping(now + LARGE_CACHE_SECONDS)  # unused for the timeout: released now
    assert not kernel.global_memory.heap.large_cache
    kernel.check()


def test_the_global_heap_keeps_several_freed_large_regions(kernel):
    attach(kernel)
    ops = kernel.ops
    regions = [ops["global_alloc"](PID, 0, 2 * MiB) for _ in range(3)]
    for region in regions:
        ops["global_free"](PID, region)
    assert sorted(kernel.global_memory.heap.large_cache) == sorted(regions)  # none given back yet
    kernel.check()


def test_housekeeping_releases_an_unused_cache(kernel):
    attach(kernel)
    big = kernel.ops["global_alloc"](PID, 0, 4 * MiB)
    kernel.ops["global_free"](PID, big)
    committed = kernel.pagetable.committed
    assert kernel.housekeeping(100.0) == LARGE_CACHE_SECONDS  # the clock starts
    assert kernel.housekeeping(100.0 + LARGE_CACHE_SECONDS) is None
    assert kernel.pagetable.committed <= committed - 4 * MiB
    kernel.check()


def test_a_process_unlocks_only_its_own_locks_and_compaction_keeps_them(kernel):
    ops = kernel.ops
    attach(kernel, PID)
    attach(kernel, PID + 1)
    fillers = [ops["global_alloc"](PID, 0, 64) for _ in range(8)]
    handle, unlocked = ops["global_alloc"](PID, GMEM_MOVEABLE, 64), ops["global_alloc"](PID, GMEM_MOVEABLE, 64)
    pointer = ops["global_lock"](PID, handle)
    with pytest.raises(ShmheapError) as info:
        ops["global_unlock"](PID + 1, handle)  # not its lock to let go of
    assert info.value.winerror == WinError.ERROR_NOT_LOCKED
    moved_from = ops["global_lock"](PID, unlocked)
    ops["global_unlock"](PID, unlocked)
    for filler in fillers:
        ops["global_free"](PID, filler)  # room below for compaction to move them into
    ops["global_compact"](PID + 1, 0)
    assert ops["global_lock"](PID, unlocked) < moved_from  # the unlocked one moved down
    assert ops["global_lock"](PID, handle) == pointer  # the locked one stayed for its holder
    kernel.check()


def test_freeing_another_process_s_unlocked_moveable_object_frees_it(kernel):
    ops = kernel.ops
    attach(kernel, PID)
    attach(kernel, PID + 1)
    handle = ops["global_alloc"](PID, GMEM_MOVEABLE, 64)
    ops["global_free"](PID + 1, handle)
    for op in ("global_size", "global_free"):
        with pytest.raises(ShmheapError) as info:
            ops[op](PID, handle)  # gone for everyone (GL-17: a second free fails)
        assert info.value.winerror == WinError.ERROR_INVALID_HANDLE
    assert kernel.check()["global_objects"] == 0


def test_a_freed_object_held_by_another_is_gone_for_every_call_but_its_holder_s_unlock(kernel):
    ops = kernel.ops
    attach(kernel, PID)
    attach(kernel, PID + 1)
    handle = ops["global_alloc"](PID, GMEM_MOVEABLE, 64)
    pointer = ops["global_lock"](PID + 1, handle)
    ops["global_free"](PID, handle)  # doomed: the other process has it locked
    for op, value in (("global_size", handle), ("global_size", pointer), ("global_flags", handle),
                      ("global_unlock", handle)):  # (GL-18: the facade makes the last TRUE)
        with pytest.raises(ShmheapError) as info:
            ops[op](PID, value)
        assert info.value.winerror == WinError.ERROR_INVALID_HANDLE, op
    assert kernel.check()["global_objects"] == 1  # its memory stays for the holder
    assert ops["global_unlock"](PID + 1, handle) is False  # the holder lets go: it goes
    assert kernel.check()["global_objects"] == 0


def test_a_page_shared_by_read_only_and_writable_spans_opens_for_the_most(kernel):
    page, rw, ro = 4096, 3, 1
    base = kernel.pagetable.base + 64 * page
    memory = kernel.global_memory
    memory._open(PID, [(base + 8, base + 16, ro), (base + 100, base + 200, rw),
                       (base + page + 8, base + page + 16, ro)])
    assert memory.access_runs(PID, base, base + 3 * page) == [
        [base, page, rw], [base + page, page, ro], [base + 2 * page, page, 0]]
    memory._close(PID, [(base + 100, base + 200, rw)])
    assert memory.access_runs(PID, base, base + 3 * page) == [[base, 2 * page, ro], [base + 2 * page, page, 0]]
    memory._open(PID, [(base + page - 8, base + page + 4, rw)])  # across the two pages: both open for all
    assert memory.access_runs(PID, base, base + 3 * page) == [[base, 2 * page, rw], [base + 2 * page, page, 0]]
