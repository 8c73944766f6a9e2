"""The block allocator as a contract, run over both page sources: the client's (a real
daemon, by RPC) and the daemon's own (an in-process page table over a real segment). A
seeded random walk checks it against a plain model of live blocks."""

import random

import pytest

from shmheap import connect
from shmheap.errors import ShmheapMemoryError, ShmheapValueError
from shmheap.heap import LARGE_THRESHOLD, SMALL_MAX, Heap, _large_pages, heap_layout
from shmheapd.handles import PageTablePages

SIZE = 256 * 2**20


@pytest.fixture(params=["client", "daemon"])
def make_heap(request, daemon, make_kernel):
    """make_heap(initial, maximum, flags) -> Heap over the page source under test."""
    if request.param == "client":
        client = connect(daemon.socket, autostart=False)
        made = []

        def make(initial=0, maximum=0, flags=0):
            heap = client.heap_create(flags, initial, maximum)
            heap.on_purge_due = None  # these tests drive the allocator without its lock: no purger thread
            made.append(heap)
            return heap

        yield make
        for heap in made:
            if heap.alive:
                client.heap_destroy(heap)
        client.check()
        client.close()
    else:
        kernel = make_kernel(SIZE, SIZE, SIZE)

        def make(initial=0, maximum=0, flags=0):
            reserve, commit, growable = heap_layout(initial, maximum)
            source = PageTablePages(kernel.pagetable, 0, kernel.memory)
            return Heap(source, source.allocate(reserve, commit), reserve, commit, flags=flags, growable=growable)

        yield make
        kernel.check()


def test_sizes_are_exact_and_blocks_aligned(make_heap):
    heap = make_heap()
    sizes = [0, 1, 15, 16, 17, 255, 1024, 1025, 4096, 100_000, LARGE_THRESHOLD, LARGE_THRESHOLD + 1]
    blocks = [heap.alloc(size) for size in sizes]
    assert [heap.size(b) for b in blocks] == sizes
    assert all(b % 16 == 0 for b in blocks)
    assert len(set(blocks)) == len(blocks)
    heap.check()
    for b in blocks:
        heap.free(b)
    heap.check()


def test_zero_memory_and_realloc_growth(make_heap):
    heap = make_heap()
    block = heap.alloc(100)
    heap.memory[block:block + 100] = b"\x55" * 100
    heap.free(block)
    again = heap.alloc(100, zero=True)
    assert bytes(heap.memory[again:again + 100]) == bytes(100)
    heap.memory[again:again + 100] = b"\x66" * 100
    grown = heap.realloc(again, 5000, zero=True)
    assert bytes(heap.memory[grown:grown + 100]) == b"\x66" * 100
    assert bytes(heap.memory[grown + 100:grown + 5000]) == bytes(4900)


def test_refusals_change_nothing(make_heap):
    heap = make_heap(0x40000, 0x40000)
    block = heap.alloc(5000)
    heap.memory[block:block + 5] = b"alive"
    before = heap.check()
    with pytest.raises(ShmheapValueError):
        heap.free(block + 16)  # not a block start
    with pytest.raises(ShmheapMemoryError):
        heap.alloc(LARGE_THRESHOLD + 1)  # fixed heaps take no large blocks
    with pytest.raises(ShmheapMemoryError):
        heap.alloc(0x40000)  # past the fixed maximum
    with pytest.raises(ShmheapMemoryError):
        heap.realloc(block, 2**64 - 1)
    heap.free(block)
    with pytest.raises(ShmheapValueError):
        heap.free(block)  # double free
    assert heap.check()["live"] == before["live"] - 1


def _check_usage(heap, live):
    """usage() (what `shmheap stat` shows) accounts for every committed byte: committed =
    region headers + the live blocks' extents + slab tails + free bytes; its block count is
    the model's, and the largest free range is part of the free bytes."""
    blocks, free, largest = heap.usage()
    assert blocks == len(live) and 0 <= largest <= free
    extents = 0
    for address, (size, _) in live.items():
        kind, slab, _ = heap._locate(address)
        extents += {"small": lambda: slab.block, "medium": lambda: heap._extent(size),
                    "large": lambda: _large_pages(size)}[kind]()
    tails = sum(slab.size - len(slab.sizes) * slab.block for slab in heap.slab_set)
    headers = sum(region.start - region.base for region in heap.regions)
    assert heap.committed == headers + extents + tails + free


@pytest.mark.parametrize("seed,purges", [(1, False), (2, False), (3, False), (4, True), (5, True), (6, True)])
def test_random_walk_keeps_blocks_apart_and_intact(make_heap, seed, purges):
    """Random alloc/realloc/free across all three block kinds (and, with `purges`, the purge
    now and then, which gives back free pages between blocks): live blocks never overlap,
    keep their bytes and sizes, and the heap goes back to its starting commit at the end."""
    rng = random.Random(seed)
    heap = make_heap()
    start_commit = heap.committed
    live = {}  # address -> (size, fill byte)

    def pick_size():
        kind = rng.random()
        if kind < 0.6:
            return rng.randint(0, SMALL_MAX)
        if kind < 0.95:
            return rng.randint(SMALL_MAX + 1, 64 * 1024)
        return rng.randint(LARGE_THRESHOLD + 1, LARGE_THRESHOLD + 300_000)

    for step in range(1500):
        action = rng.random()
        if action < 0.5 or not live:
            size = pick_size()
            address = heap.alloc(size)
            fill = rng.randrange(256)
            heap.memory[address:address + size] = bytes([fill]) * size
            live[address] = (size, fill)
        elif action < 0.7:
            address = rng.choice(list(live))
            size, fill = live.pop(address)
            new_size = pick_size()
            new = heap.realloc(address, new_size)
            kept = min(size, new_size)
            assert heap.memory[new:new + kept] == bytes([fill]) * kept
            heap.memory[new:new + new_size] = bytes([fill]) * new_size
            live[new] = (new_size, fill)
        else:
            address = rng.choice(list(live))
            size, fill = live.pop(address)
            assert heap.memory[address:address + size] == bytes([fill]) * size
            heap.free(address)
        if purges and step % 37 == 0:
            heap.purge()
        if step % 100 == 0:
            heap.check()
            _check_usage(heap, live)
            spans = sorted((a, a + s) for a, (s, _) in live.items())
            assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
            for address, (size, fill) in live.items():
                assert heap.size(address) == size
                assert heap.memory[address:address + size] == bytes([fill]) * size
    for address in list(live):
        heap.free(address)
    heap.check()
    assert heap.live == 0
    if heap.purge_delay:  # a client heap keeps the pages until its purge
        heap.purge()
        heap.check()
    assert heap.committed == start_commit
    assert len(heap.regions) == 1 and not heap.large


def test_checking_finds_overruns_and_writes_after_free(make_heap):
    from shmheap.constants import HEAP_FREE_CHECKING_ENABLED, HEAP_TAIL_CHECKING_ENABLED

    heap = make_heap(flags=HEAP_TAIL_CHECKING_ENABLED | HEAP_FREE_CHECKING_ENABLED)
    small, medium = heap.alloc(40), heap.alloc(3000)
    assert heap.validate() and heap.validate(small) and heap.validate(medium)
    heap.memory[small + 40] = 0  # one byte past the end
    assert not heap.validate(small) and not heap.validate()
    heap.memory[small + 40] = 0xAB  # the tail fill: intact again
    assert heap.validate()
    heap.free(medium)
    heap.memory[medium + 8] = 1  # a write after free
    assert not heap.validate()
