"""The page table in-process, in a kernel built as the daemon builds it (over a real
segment): runs, accounting, backing and a seeded random walk checked against a plain per-page
model and `check()` after every step. The kernel's own regions (the global heap's) are there
from the start: `before` is what the table held before the test."""

import random
from types import SimpleNamespace

import pytest

from shmheap import segment
from shmheap.constants import (MEM_COMMIT, MEM_DECOMMIT, MEM_RELEASE, MEM_RESERVE, PAGE_NOACCESS,
                               PAGE_READONLY, PAGE_READWRITE)
from shmheap.errors import ShmheapError, WinError
from shmheapd.pagetable import RESERVED

PAGE = segment.PAGE_SIZE
SIZE = 64 * 2**20


@pytest.fixture
def table(make_kernel):
    return make_kernel(SIZE, commit_limit=8 * 2**20, process_commit_limit=6 * 2**20).pagetable


@pytest.fixture
def before(table):
    """What the table held before the test: commit, resident bytes, regions, free extents."""
    return SimpleNamespace(committed=table.committed, resident=table.resident_bytes(),
                           regions=list(table.regions), free=(list(table.free_starts), list(table.free_ends)))


def test_commit_is_backed_and_decommit_punches_out(table):
    base = table.virtual_alloc(1, 0, 16 * PAGE, MEM_RESERVE, PAGE_READWRITE)
    before = table.backing.resident_bytes()
    table.virtual_alloc(1, base, 16 * PAGE, MEM_COMMIT, PAGE_READWRITE)
    assert table.backing.resident_bytes() - before == 16 * PAGE  # fallocate, not lazy
    memory = segment.address_space(table.end)
    memory[base:base + 4] = b"data"
    table.virtual_free(1, base, 16 * PAGE, MEM_DECOMMIT)
    assert table.backing.resident_bytes() == before
    table.virtual_alloc(1, base, PAGE, MEM_COMMIT, PAGE_READWRITE)
    assert memory[base:base + 4] == b"\0\0\0\0"
    table.check()


def test_runs_split_and_coalesce(table):
    base = table.virtual_alloc(1, 0, 16 * PAGE, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    region = table.region_at(base)
    assert region.values == [PAGE_READWRITE]
    table.virtual_protect(1, base + 3 * PAGE, 2 * PAGE, PAGE_READONLY)
    assert region.starts == [0, 3, 5] and region.values == [PAGE_READWRITE, PAGE_READONLY, PAGE_READWRITE]
    table.virtual_protect(1, base + 3 * PAGE, 2 * PAGE, PAGE_READWRITE)
    assert region.starts == [0] and region.values == [PAGE_READWRITE]
    table.virtual_free(1, base + 15 * PAGE, PAGE, MEM_DECOMMIT)
    assert region.starts == [0, 15] and region.values == [PAGE_READWRITE, RESERVED]
    table.check()


def test_commit_limits_refuse_cleanly(table, before):
    big = table.virtual_alloc(1, 0, 7 * 2**20, MEM_RESERVE, PAGE_READWRITE)
    with pytest.raises(ShmheapError) as info:
        table.virtual_alloc(1, big, 7 * 2**20, MEM_COMMIT, PAGE_READWRITE)  # over the process limit
    assert info.value.winerror == WinError.ERROR_COMMITMENT_LIMIT
    assert table.committed == before.committed and table.resident_bytes() == before.resident
    table.virtual_alloc(1, big, 5 * 2**20, MEM_COMMIT, PAGE_READWRITE)
    with pytest.raises(ShmheapError) as info:
        table.virtual_alloc(2, 0, 4 * 2**20, MEM_COMMIT, PAGE_READWRITE)  # over the global limit
    assert info.value.winerror == WinError.ERROR_COMMITMENT_LIMIT
    assert len(table.regions) == len(before.regions) + 1  # the implied reservation was undone too
    table.check()


def test_release_owner_returns_everything(table, before):
    for _ in range(5):
        table.virtual_alloc(7, 0, 3 * PAGE, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    keep = table.virtual_alloc(8, 0, PAGE, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    assert table.release_owner(7) == (5, 15 * PAGE)
    assert list(table.regions) == [*before.regions, keep]
    assert table.committed == before.committed + PAGE and table.resident_bytes() == before.resident + PAGE
    table.check()


def test_address_space_exhaustion_is_not_enough_memory(table):
    with pytest.raises(ShmheapError) as info:
        table.virtual_alloc(1, 0, SIZE, MEM_RESERVE, PAGE_NOACCESS)
    assert info.value.winerror == WinError.ERROR_NOT_ENOUGH_MEMORY
    table.check()


def test_random_walk_matches_page_model(table, before):
    """Seeded random reserve/commit/decommit/protect/release by three owners; after each step
    the table's view of every page equals a plain dict model, and check() passes."""
    rng = random.Random(2026)
    model = {}  # page address -> (owner, value); value 0 = reserved
    regions = {}  # base -> (owner, size)
    for step in range(600):
        owner = rng.randint(1, 3)
        mine = [base for base, (o, _) in regions.items() if o == owner]
        action = rng.random()
        try:
            if action < 0.3 or not mine:
                size = rng.randint(1, 40) * PAGE
                kind = rng.choice([MEM_RESERVE, MEM_RESERVE | MEM_COMMIT])
                base = table.virtual_alloc(owner, 0, size, kind, PAGE_READWRITE)
                regions[base] = (owner, size)
                for page in range(base, base + size, PAGE):
                    model[page] = (owner, PAGE_READWRITE if kind & MEM_COMMIT else 0)
            else:
                base = rng.choice(mine)
                size = regions[base][1]
                first = rng.randrange(0, size // PAGE)
                count = rng.randint(1, size // PAGE - first)
                start, length = base + first * PAGE, count * PAGE
                if action < 0.55:
                    table.virtual_alloc(owner, start, length, MEM_COMMIT, PAGE_READWRITE)
                    new = {p: (owner, PAGE_READWRITE) for p in range(start, start + length, PAGE)}
                elif action < 0.75:
                    table.virtual_free(owner, start, length, MEM_DECOMMIT)
                    new = {p: (owner, 0) for p in range(start, start + length, PAGE)}
                elif action < 0.9:
                    committed = all(model[p][1] for p in range(start, start + length, PAGE))
                    try:
                        table.virtual_protect(owner, start, length, PAGE_READONLY)
                        assert committed
                        new = {p: (owner, PAGE_READONLY) for p in range(start, start + length, PAGE)}
                    except ShmheapError as exc:
                        assert not committed and exc.winerror == WinError.ERROR_INVALID_ADDRESS
                        new = {}
                else:
                    table.virtual_free(owner, base, 0, MEM_RELEASE)
                    del regions[base]
                    new = {}
                    for page in range(base, base + size, PAGE):
                        del model[page]
                model.update(new)
        except ShmheapError as exc:
            assert exc.winerror == WinError.ERROR_COMMITMENT_LIMIT, exc
        table.check()
        if step % 50 == 0:
            for page, (page_owner, value) in model.items():
                region = table.region_at(page)
                assert region.owner == page_owner
                assert next(region.runs((page - region.base) // PAGE, region.pages))[2] == value
    expected = sum(PAGE for _, value in model.values() if value)
    assert table.committed - before.committed == expected == table.resident_bytes() - before.resident
    for owner in (1, 2, 3):
        table.release_owner(owner)
    assert table.committed == before.committed and table.resident_bytes() == before.resident
    assert (table.free_starts, table.free_ends) == before.free
