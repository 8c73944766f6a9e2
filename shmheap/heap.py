"""The block allocator: the HeapAlloc layer, over an abstract page source.

Theory of operation
-------------------
A heap owns the *regions* it reserved from its page source. The first one starts with
HEAP_HEADER bytes that are never handed out (where Windows keeps its heap header; keeping the
span unused gives a fixed heap the capacity Windows gives, HC-09/HC-10). Each region is
committed from its base up to a watermark; above it the pages are only reserved.

All metadata is out of band, in Python objects; nothing in the region describes a block, so
an overrun can corrupt data but never the allocator. Blocks are 16-byte aligned and come in
three kinds, by size:

    small   size <= SMALL_MAX (16 KiB): a slot in a *slab*, pages cut into equal slots of one
            size class (every multiple of 16 up to 1 KiB in one-page slabs, then four classes
            per power of two up to 16 KiB in 64 KiB slabs; a slab is filed under each of its
            pages). A slab keeps the exact size of each slot in an array('H') and its free
            slots on a stack, so alloc and free are a pop and a push: about two bytes of
            metadata per live block, and no search.
    medium  up to LARGE_THRESHOLD: carved from the heap's free ranges, found by segregated
            fit: free ranges sit in bins by size (exact 16-byte classes up to 1 KiB, then four
            bins per power of two, as TLSF does) and a bitmap of non-empty bins finds the
            first bin whose every range is large enough in O(1). Freeing coalesces with both
            neighbours through two dicts (start -> end, end -> start), also O(1). So no
            operation costs more as the number of live blocks grows.
            A freed medium block waits a while as it is, on a list by extent (`recent`,
            as a thread cache does), so the next block of that extent is a pop: a loop
            that allocates and frees one buffer never touches the free ranges. The lists
            go back into the free ranges at the purge, or before the heap would grow.
    large   above LARGE_THRESHOLD (0xFE000, Windows' virtual-memory threshold on 64-bit): a
            region of its own, released when freed. Fixed-size heaps refuse them (HC-11).

Commit grows a region's watermark in COMMIT_STEP (64 KiB) steps. Giving pages back waits:
a heap made with a `purge_delay` (the clients' heaps: PURGE_DELAY, in the spirit of mimalloc's
purge delay and jemalloc's decay) only notes, when a free leaves pages it could return, that a
*purge* is due that many seconds later; `purge()` (run then by the process's purger thread,
at once under commit pressure, or by `compact()`) decommits every free top of a region and
releases empty extension regions and cached large regions, and an empty heap goes back to
its starting commit. So a loop that allocates and frees never commits or decommits on its
path, and its slabs and free ranges stay set up across an empty heap. With no delay (the
daemon's global heap), a free trims at once, keeping DECOMMIT_SLACK free at the top so a loop
at the edge does not commit and decommit each time. Slabs that empty are dissolved back into
free ranges, except the one slab per size class that allocation is using.

With checking on (HEAP_TAIL_CHECKING_ENABLED / HEAP_FREE_CHECKING_ENABLED), every block gets
at least 16 bytes of tail filled with TAIL_FILL and every free byte holds FREE_FILL, so
`validate()` finds overruns and writes after free.

`check()` walks all of it: free ranges coalesced and in their bins, slabs consistent, no two
blocks overlapping, live + free + header == committed.
"""

from __future__ import annotations

import threading
import time
from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator

from .constants import (HEAP_CREATE_ENABLE_EXECUTE, HEAP_FREE_CHECKING_ENABLED,
                        HEAP_TAIL_CHECKING_ENABLED)
from .errors import ShmheapError, WinError, raise_for
from .segment import ALLOCATION_GRANULARITY, PAGE_SHIFT, PAGE_SIZE, round_up

ALIGN = 16
HEAP_HEADER = 0x400 + 0x100 * 8  # bytes of the first region never handed out (HC-09/HC-10)
SMALL_MAX = 16 * 1024
TINY_MAX = 1024  # classes up to here are exact multiples of 16, in one-page slabs
BIG_SLAB = 64 * 1024  # slab size of the classes above TINY_MAX
LARGE_THRESHOLD = 0xFE000  # larger blocks get a region of their own (HC-11, HC-13)
MAX_REQUEST = 2**62  # anything larger cannot be satisfied: fail before doing arithmetic on it
COMMIT_STEP = 64 * 1024
DECOMMIT_SLACK = 2 * COMMIT_STEP  # kept free at a region's top by an immediate trim
HOLE_MIN = 4 * PAGE_SIZE  # the purge gives back free pages inside a region in runs of at least this
RECENT_LIMIT = 2 * 2**20  # bytes of freed medium blocks a heap keeps on its `recent` lists
RECENT_PER_EXTENT = 8
PURGE_DELAY = 1.0  # seconds a client heap keeps freed pages before giving them back
PURGE_REPRIEVES = 10  # a heap in use puts its purge off this many delays at most
MIN_COMMIT = 0x400 * 8  # a new heap commits at least this (HW-01: dwCommittedSize 0x2000)
FIRST_EXTENSION = 0x100000  # growable heaps add regions of 1 MiB, doubling (HC-08)
MAX_EXTENSION = 0xFD0000
TAIL_FILL = 0xAB
FREE_FILL = 0xFE
SLOT_FREE = 0xFFFF  # size marker of a free slot in a slab

# Size classes: every multiple of 16 up to 1 KiB, then four per power of two up to 16 KiB.
CLASS_SIZES = [0] + list(range(ALIGN, TINY_MAX + 1, ALIGN)) + [
    (4 + step) << (power - 2) for power in range(10, 14) for step in range(1, 5)]
_CLASS_OF = bytes(next(i for i, c in enumerate(CLASS_SIZES) if c >= extent) if extent else 1
                  for extent in range(0, SMALL_MAX + 1, ALIGN))  # indexed by extent // 16


SHORT_OF_COMMIT = {WinError.ERROR_COMMITMENT_LIMIT, WinError.ERROR_NOT_ENOUGH_MEMORY}


def _large_pages(size):
    """Bytes a large block keeps committed: its pages, never fewer than one."""
    return max(round_up(size, PAGE_SIZE), PAGE_SIZE)


def _bin_of(size):
    """Bin index for a free range of `size` bytes (a multiple of 16)."""
    if size < 1024:
        return size >> 4
    top = size.bit_length() - 1
    return 64 + ((top - 10) << 2) + ((size >> (top - 2)) & 3)


def _bin_floor(index):
    """The smallest size that falls in bin `index`."""
    if index < 64:
        return index << 4
    top, sub = divmod(index - 64, 4)
    return (4 + sub) << (top + 8)


def heap_layout(initial, maximum):
    """(reserve, commit, growable) of a new heap's first region, as HeapCreate sizes it:
    a growable heap (maximum 0) reserves initial + 64 KiB (HC-07); a fixed one its maximum
    rounded up to 0x2000 (HC-06). Both commit the initial size, at least MIN_COMMIT."""
    if initial > MAX_REQUEST or maximum > MAX_REQUEST:
        raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "heap size too large")
    initial = round_up(initial, PAGE_SIZE)
    if maximum:
        reserve = round_up(max(maximum, initial), 0x2000)
    else:
        reserve = initial + ALLOCATION_GRANULARITY
    return reserve, min(max(initial, MIN_COMMIT), reserve), not maximum


class PageSource:
    """What a heap needs from below. `memory` is a writable memoryview of the whole segment;
    addresses index it. The client's source speaks to the daemon; the daemon's (for the
    global heap) calls the page table directly."""

    memory = None

    def reserve(self, size: int) -> int:
        """Reserve a region of `size` bytes for this heap; return its base."""
        raise NotImplementedError

    def commit(self, address: int, size: int) -> None:
        """Commit [address, address+size) of a region this source reserved; raises
        ShmheapError (ERROR_COMMITMENT_LIMIT, ERROR_NOT_ENOUGH_MEMORY) if it cannot be backed."""
        raise NotImplementedError

    def decommit(self, address: int, size: int) -> None:
        """Decommit [address, address+size): its pages go back and read zeros when committed
        again."""
        raise NotImplementedError

    def release(self, base: int) -> None:
        """Release the whole region at `base`, committed pages and all."""
        raise NotImplementedError

    def allocate(self, size: int, commit: int) -> int:
        """Reserve a region of `size` bytes and commit its first `commit`: both or neither."""
        base = self.reserve(size)
        try:
            self.commit(base, commit)
        except ShmheapError:
            self.release(base)
            raise
        return base


class HeapRegion:
    __slots__ = ("base", "reserved", "committed_end", "start")

    def __init__(self, base, reserved, committed_end, start):
        self.base = base
        self.reserved = reserved
        self.committed_end = committed_end
        self.start = start  # first usable address (after the header in the first region)

    @property
    def end(self):
        return self.base + self.reserved


class Slab:
    __slots__ = ("base", "size", "block", "cls", "sizes", "free", "live")

    def __init__(self, base, size, cls):
        self.base = base
        self.size = size
        self.cls = cls
        self.block = block = CLASS_SIZES[cls]
        count = size // block
        self.sizes = array("H", [SLOT_FREE]) * count
        self.free = list(range(count - 1, -1, -1))  # pop() hands out low addresses first
        self.live = 0


class Heap:
    """One heap: its regions, free ranges, slabs, medium and large blocks."""

    def __init__(self, source: PageSource, base: int, reserved: int, committed: int, *, flags: int = 0,
                 growable: bool = True, large_cache_limit: int = 0, purge_delay: float = 0.0,
                 on_purge_due: Callable[[Heap], None] | None = None,
                 on_short_of_commit: Callable[[Heap], bool] | None = None, cache_by_time: bool = False) -> None:
        self.source = source
        self.memory = source.memory
        self.flags = flags
        self.growable = growable
        self.checking = bool(flags & (HEAP_TAIL_CHECKING_ENABLED | HEAP_FREE_CHECKING_ENABLED))
        self.tail = ALIGN if self.checking else 0
        self.protect = 0x40 if flags & HEAP_CREATE_ENABLE_EXECUTE else 0x04
        self.lock = threading.RLock()
        self.base = base
        self.regions = [HeapRegion(base, reserved, base + committed, base + HEAP_HEADER)]
        self.region_bases = {base}  # free ranges never coalesce across a region start
        self.initial_commit = committed
        self.grown = False  # committed past the start since the heap was last empty
        self.next_extension = FIRST_EXTENSION
        self.free_start = {}  # start -> end of every free range
        self.free_end = {}  # end -> start
        self.bins = [set() for _ in range(_bin_of(MAX_REQUEST) + 1)]
        self.bitmap = 0
        self.slabs = {}  # page number -> Slab, for every page of every slab
        self.slab_set = set()
        self.current = [None] * len(CLASS_SIZES)  # the slab each class allocates from
        self.partial = [[] for _ in CLASS_SIZES]  # slabs with free slots, not current
        self.medium = {}  # address -> requested size
        self.recent = {}  # extent -> freed medium blocks kept as they are for the next one
        self.recent_bytes = 0
        self.large = {}  # address -> requested size (the region base is the address)
        # Freed large regions kept committed for the next large block, up to this many bytes
        # (0: none). The global heap keeps some: a pool that allocates, fills and frees big
        # arrays then reuses pages that are already backed and mapped.
        self.large_cache_limit = large_cache_limit
        self.cache_by_time = cache_by_time  # the owner releases the large cache (the daemon's, by time), not the purge
        self.large_cache = {}  # region base -> committed bytes
        self.large_cache_uses = 0  # regions put in or taken out, ever: tells a cache in use
        self.purge_delay = purge_delay
        self.purge_due = None  # monotonic time of the next purge, if a free left pages to give back
        self.allocations = 0  # blocks ever allocated: tells a heap in use from an idle one
        self.purge_mark = 0  # `allocations` when the purge was last put off or scheduled
        self.reprieves = 0
        self.on_purge_due = on_purge_due  # (heap) -> None, told when a purge is first due
        self.on_short_of_commit = on_short_of_commit  # (heap) -> True if other heaps gave back
        self.purging = set()  # purger attempts at work on the heap, or about to be
        self.unlocked_calls = set()  # HEAP_NO_SERIALIZE calls under way (shmheap/win32.py)
        self.live = 0
        self.changes = 0  # allocs, frees, resizes and purges, ever: tells a changed heap (stat's reports)
        self.holes = {}  # start -> end: decommitted pages inside free ranges (the purge's)
        self.hole_starts = []  # sorted
        self.hole_bytes = 0
        self._add_committed(base + HEAP_HEADER, base + committed)

    # ---- free ranges ---------------------------------------------------------------------

    def _add_free(self, start, end):
        """Insert free [start, end), coalescing with neighbours in the same region."""
        if start >= end:
            return
        left = self.free_end.get(start)
        if left is not None and not self._is_region_start(start):
            self._unlink(left, start)
            start = left
        right = self.free_start.get(end)
        if right is not None and not self._is_region_start(end):
            self._unlink(end, right)
            end = right
        self.free_start[start] = end
        self.free_end[end] = start
        index = _bin_of(end - start)
        self.bins[index].add(start)
        self.bitmap |= 1 << index

    def _unlink(self, start, end):
        del self.free_start[start]
        del self.free_end[end]
        index = _bin_of(end - start)
        members = self.bins[index]
        members.discard(start)
        if not members:
            self.bitmap &= ~(1 << index)

    def _is_region_start(self, address):
        return address in self.region_bases

    def _find_fit(self, size):
        """Start of a free range of at least `size` bytes, or None (segregated fit)."""
        index = _bin_of(size)
        exact = index
        if _bin_floor(index) < size:
            index += 1
        candidates = self.bitmap >> index
        if candidates:
            index += (candidates & -candidates).bit_length() - 1
            return next(iter(self.bins[index]))
        # Nothing in the bins that surely fit: the request's own bin may still hold a range
        # large enough (it holds sizes up to the next bin's floor).
        for start in self.bins[exact] if exact != index else ():
            if self.free_start[start] - start >= size:
                return start
        return None

    def _find_aligned_fit(self, size, align):
        """Start of a free range that holds `size` bytes at `align` although it is smaller
        than size + align (a page-aligned slab in a heap with one free page): a scan of the
        bins that may hold one, before the heap grows for want of it."""
        index = _bin_of(size)
        candidates = self.bitmap >> index
        while candidates:
            if candidates & 1:
                for start in self.bins[index]:
                    if round_up(start, align) + size <= self.free_start[start]:
                        return start
            candidates >>= 1
            index += 1
        return None

    def _carve(self, size, align=ALIGN):
        """Take `size` bytes at `align` alignment from the free ranges, growing the commit or
        the heap if needed. Returns the address."""
        start = self._find_fit(size + align - ALIGN)
        if start is None and align > ALIGN:
            start = self._find_aligned_fit(size, align)
        if start is None and self.recent:
            self._flush_recent()  # the blocks kept for reuse may make room where they lie
            start = self._find_fit(size + align - ALIGN)
        if start is None:
            start = self._grow(size + align - ALIGN)
        end = self.free_start[start]
        address = round_up(start, align)
        if self.holes:
            self._refill(address, address + size)  # first: it may fail, changing nothing
        self._unlink(start, end)
        self._add_free(start, address)
        self._add_free(address + size, end)
        return address

    def _grow(self, size):
        """Make a free range of at least `size` bytes by committing more of a region, or by
        adding a region to a growable heap. Returns its start. Short of commit, whatever a
        purge would give back goes first, and the heap tries once more."""
        try:
            return self._grow_once(size)
        except ShmheapError as exc:
            if exc.winerror not in SHORT_OF_COMMIT or not self._give_back_for_room():
                raise
        start = self._find_fit(size)
        return start if start is not None else self._grow_once(size)

    def _give_back_for_room(self):
        """Under commit pressure: purge this heap now if a purge is due, and the process's
        other heaps (on_short_of_commit); True if anything was given back."""
        gave = False
        if self.purge_due is not None or self.large_cache:
            self.purge()
            gave = True
        if self.on_short_of_commit is not None:
            gave = self.on_short_of_commit(self) or gave
        return gave

    def _grow_once(self, size):
        for region in self.regions:
            top = self.free_end.get(region.committed_end, region.committed_end)
            if top + size <= region.end:
                self._commit_to(region, min(round_up(top + size, COMMIT_STEP), region.end))
                return top
        if not self.growable:
            raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "the heap is full (fixed maximum size)")
        reserve = max(self.next_extension, round_up(size, ALLOCATION_GRANULARITY))
        self.next_extension = min(self.next_extension * 2, MAX_EXTENSION)
        commit = min(round_up(size, COMMIT_STEP), reserve)
        base = self.source.allocate(reserve, commit)
        self.grown = True
        self.regions.append(HeapRegion(base, reserve, base + commit, base))
        self.region_bases.add(base)
        self._add_committed(base, base + commit)
        return base

    def _commit_to(self, region, new_end):
        self.grown = True  # may hold more than the starting commit: reset when empty
        old_end = region.committed_end
        self.source.commit(old_end, new_end - old_end)
        region.committed_end = new_end
        self._add_committed(old_end, new_end)

    def _add_committed(self, start, end):
        """Newly committed [start, end) becomes free space."""
        if self.checking:
            self._fill(start, end - start, FREE_FILL)
        self._add_free(start, end)

    def _trim(self, region, slack=DECOMMIT_SLACK):
        """Decommit the free top of `region` beyond `slack`; release an empty extension."""
        top = self.free_end.get(region.committed_end)
        if top is None:
            return
        if region is not self.regions[0] and top == region.start:
            self._unlink(top, region.committed_end)
            self._forget_holes(region.base, region.end)
            self.regions.remove(region)
            self.region_bases.discard(region.base)
            self.source.release(region.base)
            return
        floor = self.base + self.initial_commit if region is self.regions[0] else region.base
        if region.committed_end - max(top, floor) <= slack:
            return
        new_end = max(round_up(top, COMMIT_STEP) + (COMMIT_STEP if slack else 0), floor)
        if new_end < region.committed_end:
            self._shrink_commit(region, top, new_end)

    def _shrink_commit(self, region, top, new_end):
        self.source.decommit(new_end, region.committed_end - new_end)  # first: it may fail
        self._forget_holes(new_end, region.committed_end)
        self._unlink(top, region.committed_end)
        region.committed_end = new_end
        self._add_free(top, new_end)

    # ---- holes: free pages given back from inside a region --------------------------------

    def _punch_holes(self):
        """The purge's last step: runs of HOLE_MIN or more whole free pages inside regions
        (their tops are _trim's) are decommitted too, so live blocks scattered over a heap
        that was once large (its processes killed, say) do not keep its pages. They are
        committed again when a block is carved over them (_refill)."""
        if self.checking:
            return  # free bytes there hold FREE_FILL, which a hole would lose
        first = self.regions[0]
        floor = self.base + self.initial_commit  # the starting commit stays, as _trim keeps it
        for start, end in list(self.free_start.items()):
            low, high = round_up(start, PAGE_SIZE), end - end % PAGE_SIZE
            if first.base <= start < first.end:
                low = max(low, floor)
            if high - low < HOLE_MIN or self.holes.get(low) == high:
                continue
            self.source.decommit(low, high - low)  # first: it may fail
            self._forget_holes(low, high)
            self._add_hole(low, high)

    def _forget_holes(self, start, end):
        """No hole in [start, end) any more (its pages are given back whole, or punched
        again): the records go, those that reach outside it keep what lies outside."""
        i = max(bisect_right(self.hole_starts, start) - 1, 0)
        while i < len(self.hole_starts) and self.hole_starts[i] < end:
            hole = self.hole_starts[i]
            hole_end = self.holes[hole]
            if hole_end <= start:
                i += 1
                continue
            self._drop_hole(hole)
            for piece_start, piece_end in ((hole, start), (end, hole_end)):
                if piece_end > piece_start:
                    self._add_hole(piece_start, piece_end)
            i = bisect_right(self.hole_starts, hole)  # the next one (a piece kept below starts at `hole`)

    def _add_hole(self, start, end):
        self.holes[start] = end
        insort(self.hole_starts, start)
        self.hole_bytes += end - start

    def _drop_hole(self, start):
        del self.hole_starts[bisect_left(self.hole_starts, start)]
        self.hole_bytes -= self.holes.pop(start) - start

    def _refill(self, start, end):
        """Commit again the hole pages that [start, end) is about to be handed out over."""
        low, high = start - start % PAGE_SIZE, round_up(end, PAGE_SIZE)
        i = max(bisect_right(self.hole_starts, low) - 1, 0)
        while i < len(self.hole_starts) and self.hole_starts[i] < high:
            hole_start = self.hole_starts[i]
            hole_end = self.holes[hole_start]
            lo, hi = max(hole_start, low), min(hole_end, high)
            if lo >= hi:
                i += 1
                continue
            self.source.commit(lo, hi - lo)
            self._forget_holes(lo, hi)
            i = bisect_left(self.hole_starts, hi)

    def extents(self) -> list[tuple[int, int]]:
        """(start, end) of every region of the heap's: its own, its large blocks', its cached
        ones'."""
        spans = [(region.base, region.end) for region in self.regions]
        spans += [(address, address + _large_pages(size)) for address, size in self.large.items()]
        spans += [(address, address + pages) for address, pages in self.large_cache.items()]
        return spans

    def _region_of(self, address):
        for region in self.regions:
            if region.base <= address < region.end:
                return region
        return None

    def holds(self, address: int) -> bool:
        """True if `address` lies in one of the heap's regions (large blocks aside)."""
        return self._region_of(address) is not None

    def has_region(self, base: int) -> bool:
        """True if a region of the heap, or of one of its large blocks (live or kept for the
        next), starts at `base`."""
        return base in self.region_bases or base in self.large or base in self.large_cache

    def _reset_when_empty(self):
        """No live block left: go back to the starting commit. Called only when there is
        something to give back, so a heap already there keeps its slabs, and a loop of alloc
        and free inside the initial commit costs no slab setup."""
        self.grown = False
        self._flush_recent()
        first = self.regions[0]
        if len(self.regions) == 1 and first.committed_end == self.base + self.initial_commit:
            return  # trimmed back already: keep the slabs
        for slab in list(self.slab_set):
            self._dissolve(slab)
        self.current = [None] * len(CLASS_SIZES)
        self.partial = [[] for _ in CLASS_SIZES]
        for region in self.regions[1:]:
            self._trim(region)
        top = self.free_end.get(first.committed_end)
        floor = self.base + self.initial_commit
        if top is not None and first.committed_end > floor:
            self._shrink_commit(first, top, floor)

    # ---- blocks --------------------------------------------------------------------------

    def _extent(self, size):
        """Bytes a small or medium block of `size` occupies: 16-aligned, plus the checked
        tail, never 0 (a 0-byte block is still a distinct block, HA-01)."""
        return ((size + 15) & ~15) + self.tail or ALIGN

    def alloc(self, size: int, zero: bool = False) -> int:
        """A block of exactly `size` bytes (HeapSize reports `size`); raises ShmheapError."""
        extent = ((size + 15) & ~15) + self.tail or ALIGN  # self._extent(size), inlined: hot path
        if extent <= SMALL_MAX:  # the hot path: a pop from the class's current slab
            cls = _CLASS_OF[extent >> 4]
            slab = self.current[cls]
            if slab is None or not slab.free:
                slab = self._next_slab(cls)
            slot = slab.free.pop()
            slab.sizes[slot] = size
            slab.live += 1
            address = slab.base + slot * slab.block
        elif size <= LARGE_THRESHOLD:
            recent = self.recent.get(extent)
            if recent:
                address = recent.pop()
                self.recent_bytes -= extent
            else:
                address = self._carve(extent)
            self.medium[address] = size
        elif size <= MAX_REQUEST:
            address = self._alloc_large(size)
        else:
            raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, f"cannot allocate {size} bytes")
        self.live += 1
        self.changes += 1
        self.allocations += 1
        if zero:
            self._fill(address, size, 0)
        if self.tail and size <= LARGE_THRESHOLD:
            self._fill(address + size, extent - size, TAIL_FILL)
        return address

    def _next_slab(self, cls):
        partial = self.partial[cls]
        while partial:
            slab = partial.pop()
            if slab.free and slab in self.slab_set:
                self.current[cls] = slab
                return slab
        size = PAGE_SIZE if CLASS_SIZES[cls] <= TINY_MAX else BIG_SLAB
        base = self._carve(size, PAGE_SIZE)
        slab = Slab(base, size, cls)
        self.slab_set.add(slab)
        for page in range(base // PAGE_SIZE, (base + size) // PAGE_SIZE):
            self.slabs[page] = slab
        self.current[cls] = slab
        return slab

    def _dissolve(self, slab):
        self.slab_set.discard(slab)
        for page in range(slab.base // PAGE_SIZE, (slab.base + slab.size) // PAGE_SIZE):
            del self.slabs[page]
        self._add_free(slab.base, slab.base + slab.size)

    def _alloc_large(self, size):
        if not self.growable:
            raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "a fixed-size heap takes no block this large")
        reserve = round_up(size, PAGE_SIZE)
        for base, kept in self.large_cache.items():
            if reserve <= kept <= 2 * reserve:  # reuse, wasting at most half
                del self.large_cache[base]
                self.large_cache_uses += 1
                if kept > reserve:
                    self.source.decommit(base + reserve, kept - reserve)
                self.large[base] = size
                return base
        base = self.source.allocate(reserve, reserve)
        self.large[base] = size
        return base

    def _locate(self, address):
        """('small', slab, slot) / ('medium', None, None) / ('large', None, None) for a live
        block starting at `address`; raises ERROR_INVALID_PARAMETER otherwise (HF-02, HF-03)."""
        slab = self.slabs.get(address >> PAGE_SHIFT)
        if slab is not None:
            slot, offset = divmod(address - slab.base, slab.block)  # slot may be past the last (the unused tail)
            if offset == 0 and slot < len(slab.sizes) and slab.sizes[slot] != SLOT_FREE:
                return "small", slab, slot
        elif address in self.medium:
            return "medium", None, None
        elif address in self.large:
            return "large", None, None
        raise_for(WinError.ERROR_INVALID_PARAMETER, f"{address:#x} is not a live block of this heap")

    def is_small(self, address: int) -> bool:
        """True if `address` lies in a slab (a small block's slot)."""
        return address >> PAGE_SHIFT in self.slabs

    def size(self, address: int) -> int:
        """HeapSize: the exact size the live block at `address` was asked for; raises
        ShmheapValueError (ERROR_INVALID_PARAMETER) for anything else."""
        kind, slab, slot = self._locate(address)
        if kind == "small":
            return slab.sizes[slot]
        return self.medium[address] if kind == "medium" else self.large[address]

    def free(self, address: int) -> None:
        """HeapFree: the block at `address` goes (its pages back now or at the purge); raises
        ShmheapValueError (ERROR_INVALID_PARAMETER) for no live block of this heap."""
        slab = self.slabs.get(address >> PAGE_SHIFT)
        if slab is not None:  # the hot path: a push onto the slab's free stack
            slot, offset = divmod(address - slab.base, slab.block)  # slot may be past the last (the unused tail)
            sizes = slab.sizes
            if offset or slot >= len(sizes) or sizes[slot] == SLOT_FREE:
                raise_for(WinError.ERROR_INVALID_PARAMETER, f"{address:#x} is not a live block of this heap")
            if self.checking:
                self._fill(address, slab.block, FREE_FILL)
            sizes[slot] = SLOT_FREE
            slab.free.append(slot)
            slab.live -= 1
            if self.current[slab.cls] is not slab:
                cls = slab.cls
                if slab.live == 0:
                    self._dissolve(slab)
                    self._give_back(self._region_of(slab.base))
                elif len(slab.free) == 1:
                    self.partial[cls].append(slab)
        elif address in self.medium:
            extent = ((self.medium.pop(address) + 15) & ~15) + self.tail or ALIGN  # _extent, inlined
            recent = self.recent.get(extent)
            if recent is None and self.purge_delay and not self.checking:
                recent = self.recent[extent] = []
            if recent is not None and len(recent) < RECENT_PER_EXTENT and self.recent_bytes + extent <= RECENT_LIMIT:
                recent.append(address)
                self.recent_bytes += extent
                if self.purge_due is None:
                    self._purge_later()
            else:
                if self.checking:
                    self._fill(address, extent, FREE_FILL)
                self._add_free(address, address + extent)
                self._give_back(self._region_of(address))
        elif address in self.large:
            kept = _large_pages(self.large.pop(address))
            if kept <= self.large_cache_limit:
                if self.purge_delay and not self.cache_by_time:
                    self._purge_later()  # a client heap's cache goes at its purge (the daemon's: by time)
                # Keep the latest few, within the limit: a buffer is often freed while the next
                # is in use (a worker still holds the last one), so two take turns.
                while self.large_cache and sum(self.large_cache.values()) + kept > self.large_cache_limit:
                    oldest = next(iter(self.large_cache))
                    del self.large_cache[oldest]
                    self.source.release(oldest)
                self.large_cache[address] = kept
                self.large_cache_uses += 1
            else:
                self.source.release(address)
        else:
            raise_for(WinError.ERROR_INVALID_PARAMETER, f"{address:#x} is not a live block of this heap")
        self.live -= 1
        self.changes += 1
        if self.live == 0 and self.grown:
            if not self.purge_delay:
                self._reset_when_empty()
            elif self.purge_due is None or self.on_purge_due is None:
                self._purge_later()

    # ---- giving pages back ---------------------------------------------------------------

    def _give_back(self, region):
        """A free may have left pages at the top of `region` to give back: now, or later."""
        if self.purge_delay:
            self._purge_later()
        else:
            self._trim(region)

    def _purge_later(self):
        if self.purge_due is None:
            self.purge_due = time.monotonic() + self.purge_delay
            self.purge_mark = self.allocations
            if self.on_purge_due is not None:
                self.on_purge_due(self)
        elif self.on_purge_due is None and time.monotonic() >= self.purge_due:
            self.purge_when_idle()  # nobody purges this heap in the background: its frees do

    def purge_when_idle(self) -> bool:
        """The purge, when it is due: run it if the heap allocated nothing since it was
        scheduled; else put it off one more delay (a loop in progress would take the pages
        right back), but not more than PURGE_REPRIEVES times in a row. True if it ran."""
        if self.allocations != self.purge_mark and self.reprieves < PURGE_REPRIEVES:
            self.reprieves += 1
            self.purge_mark = self.allocations
            self.purge_due = time.monotonic() + self.purge_delay
            return False
        self.purge()
        return True

    def purge(self) -> None:
        """Give back now what frees left committed: cached large regions, empty slabs, the
        free top of every region (no slack kept), empty extension regions; an empty heap goes
        back to its starting commit."""
        self.purge_due = None
        self.reprieves = 0
        self.changes += 1
        if not self.cache_by_time:
            self.flush_large_cache()
        self._flush_recent()
        if self.live == 0:
            self._reset_when_empty()
            return
        self._dissolve_empty_slabs()
        for region in list(self.regions):
            self._trim(region, slack=0)
        self._punch_holes()

    def realloc(self, address: int, size: int, zero: bool = False, in_place_only: bool = False) -> int:
        """Resize a block, in place when possible (else moved, unless `in_place_only`).
        The first min(old, new) bytes are kept; with `zero` any growth reads zero (HR-04).
        A refusal leaves the block as it was (HR-02, HR-08)."""
        kind, slab, slot = self._locate(address)
        if size > MAX_REQUEST:
            raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, f"cannot allocate {size} bytes")
        old = self.size(address)
        if self._resize_in_place(kind, address, slab, slot, old, size):
            self.changes += 1
            if zero and size > old:
                self._fill(address + old, size - old, 0)
            return address
        if in_place_only:
            raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "cannot resize in place")
        new = self.alloc(size, zero=zero)
        count = min(old, size)
        self.memory[new:new + count] = self.memory[address:address + count]
        self.free(address)
        return new

    def _resize_in_place(self, kind, address, slab, slot, old, size):
        extent = self._extent(size)
        if kind == "small":
            if extent > slab.block:
                return False
            slab.sizes[slot] = size
        elif kind == "medium":
            if size > LARGE_THRESHOLD:
                return False
            old_extent = self._extent(old)
            if extent > old_extent:
                self._flush_recent()  # a neighbour kept for reuse is free space to grow into
                end = address + old_extent
                need = address + extent
                next_end = self.free_start.get(end)
                if next_end is None or next_end < need:
                    region = self._region_of(address)
                    top = next_end if next_end is not None else end
                    if top != region.committed_end or need > region.end:
                        return False
                    self._commit_to(region, min(round_up(need, COMMIT_STEP), region.end))
                    next_end = self.free_start[end]
                if self.holes:
                    self._refill(end, need)
                self._unlink(end, next_end)
                self._add_free(need, next_end)
            elif extent < old_extent:
                if self.checking:
                    self._fill(address + extent, old_extent - extent, FREE_FILL)
                self._add_free(address + extent, address + old_extent)
            self.medium[address] = size
        else:
            committed = _large_pages(old)
            if size > committed:
                return False  # a shrunk large block gave its pages back (HR-06)
            keep = _large_pages(size)
            if keep < committed:
                self.source.decommit(address + keep, committed - keep)
            self.large[address] = size
        if self.tail and kind != "large":
            self._fill(address + size, extent - size, TAIL_FILL)
        return True

    # ---- whole-heap operations -----------------------------------------------------------

    def flush_large_cache(self) -> int:
        """Release the freed large regions kept for reuse; returns the bytes they held."""
        freed = 0
        while self.large_cache:  # each leaves the cache before it goes: a failure never reuses it
            base, kept = self.large_cache.popitem()
            self.source.release(base)
            freed += kept
        return freed

    def abandon(self) -> None:
        """Forget every region and block without giving them back (the daemon released them):
        the heap is unusable afterwards."""
        self.purge_due = None
        self.large_cache.clear()
        self.large.clear()
        self.medium.clear()
        self.recent.clear()
        self.recent_bytes = 0
        self.slabs.clear()
        self.slab_set.clear()
        self.regions = []
        self.live = 0

    @property
    def alive(self) -> bool:
        """False once abandoned (its regions are gone)."""
        return bool(self.regions)

    def blocks(self) -> Iterator[tuple[int, int]]:
        """(address, size) of every live block, in no particular order."""
        for slab in self.slab_set:
            for slot, size in enumerate(slab.sizes):
                if size != SLOT_FREE:
                    yield slab.base + slot * slab.block, size
        yield from self.medium.items()
        yield from self.large.items()

    def alloc_below(self, size: int, limit: int) -> int | None:
        """A block of `size` bytes at an address below `limit`, or None: the lowest free slot
        of the size class's slabs, or the lowest free range that fits. For compaction, which
        is explicit and rare, so it may scan."""
        self._flush_recent()
        extent = self._extent(size)
        if extent <= SMALL_MAX:
            cls = _CLASS_OF[extent >> 4]
            slabs = sorted((r for r in self.slab_set if r.cls == cls and r.free and r.base < limit),
                          key=lambda r: r.base)
            if not slabs:
                return None
            slab = slabs[0]
            slot = min(slab.free)
            if slab.base + slot * slab.block >= limit:
                return None
            slab.free.remove(slot)
            slab.sizes[slot] = size
            slab.live += 1
            address = slab.base + slot * slab.block
        elif size <= LARGE_THRESHOLD:
            starts = sorted(s for s, e in self.free_start.items() if e - s >= extent and s < limit)
            if not starts or starts[0] + extent > limit:
                return None
            address = starts[0]
            end = self.free_start[address]
            if self.holes:
                self._refill(address, address + extent)
            self._unlink(address, end)
            self._add_free(address + extent, end)
            self.medium[address] = size
        else:
            return None
        self.live += 1
        self.changes += 1
        if self.tail:
            self._fill(address + size, extent - size, TAIL_FILL)
        return address

    def walk(self) -> Iterator[tuple[str, int, int, int, int, HeapRegion | None]]:
        """HeapWalk's entries in order: per region a region entry, then its busy blocks and
        free ranges by address, then its uncommitted range; large blocks last (HW-01..HW-03).
        Each entry is (kind, address, size, overhead, region_index, region). A walk shows
        the heap settled: a purge that is due runs first (HW-02: freeing every block gives
        the fresh heap's walk again)."""
        if self.purge_due is not None:
            self.purge()
        for index, region in enumerate(self.regions):
            yield "region", region.base, region.committed_end - region.base, 0, index, region
            # Free ranges, with the purge's holes in them shown as uncommitted ranges.
            items = [(a, "free" if committed else "uncommitted", b - a, 0)
                     for start, end in self.free_start.items() if region.base <= start < region.end
                     for a, b, committed in self._free_pieces(start, end)]
            items += [(a, "busy", s, self._extent(s) - s) for a, s in self.medium.items()
                      if region.base <= a < region.end]
            for slab in self.slab_set:
                if region.base <= slab.base < region.end:
                    items += [(slab.base + slot * slab.block, "busy", size, slab.block - size)
                              for slot, size in enumerate(slab.sizes) if size != SLOT_FREE]
            for address, kind, size, overhead in sorted(items):
                yield kind, address, size, overhead, index, region
            if region.committed_end < region.end:
                yield ("uncommitted", region.committed_end, region.end - region.committed_end,
                       0, index, region)
        for address, size in sorted(self.large.items()):
            yield "large", address, size, 0, 64, None

    def validate(self, address: int | None = None) -> bool:
        """HeapValidate: one block (exists, tail intact) or the whole heap (structure, every
        tail, every free byte's fill). Returns True or False; never raises for bad input."""
        try:
            if address is not None:
                self._locate(address)
                return self._tail_intact(address, self.size(address))
            self.check()
            if not all(self._tail_intact(a, s) for a, s in self.blocks()):
                return False
            return not self.checking or all(self._is_filled(s, e - s, FREE_FILL)
                                            for s, e in self._free_spans())
        except (ShmheapError, RuntimeError):
            return False

    def _free_spans(self):
        yield from self.free_start.items()
        for slab in self.slab_set:
            for slot in slab.free:
                start = slab.base + slot * slab.block
                yield start, start + slab.block

    def _tail_intact(self, address, size):
        if not self.tail or address in self.large:
            return True
        return self._is_filled(address + size, self._extent(size) - size, TAIL_FILL)

    def largest_free(self) -> int:
        """HeapCompact's answer: the largest committed free range (the purge's holes, pages
        given back inside free ranges, split the ranges they lie in)."""
        best = 0
        for start, end in self.free_start.items():
            if end - start > best:
                best = max([best] + [b - a for a, b, committed in self._free_pieces(start, end) if committed])
        return best

    def _free_pieces(self, start, end):
        """The free range [start, end) in pieces (a, b, committed): the purge's holes apart."""
        cursor = start
        i = bisect_left(self.hole_starts, start)
        while i < len(self.hole_starts) and self.hole_starts[i] < end:
            hole = self.hole_starts[i]
            if hole > cursor:
                yield cursor, hole, True
            cursor = self.holes[hole]
            yield hole, cursor, False
            i += 1
        if end > cursor:
            yield cursor, end, True

    def usage(self) -> tuple[int, int, int]:
        """(live blocks, free bytes, largest free range): what `shmheap stat` shows of a heap.
        Free bytes are committed bytes no block holds: the free ranges less the purge's holes,
        free slab slots, freed blocks kept for reuse and the large cache."""
        free = sum(end - start for start, end in self.free_start.items()) - self.hole_bytes
        free += sum(len(slab.free) * slab.block for slab in self.slab_set)
        free += self.recent_bytes + sum(self.large_cache.values())
        return self.live, free, min(self.largest_free(), free)

    def _flush_recent(self):
        """The freed medium blocks kept for reuse go back into the free ranges."""
        for extent, addresses in self.recent.items():
            for address in addresses:
                self._add_free(address, address + extent)
        self.recent.clear()
        self.recent_bytes = 0

    def _dissolve_empty_slabs(self):
        for slab in list(self.slab_set):
            if slab.live == 0:
                cls = slab.cls
                if self.current[cls] is slab:
                    self.current[cls] = None
                self._dissolve(slab)

    def compact(self) -> int:
        """HeapCompact: the purge, at once; returns the largest free range."""
        self.purge()
        return self.largest_free()

    @property
    def committed(self) -> int:
        """Bytes committed: the regions up to their watermarks less the purge's holes, large
        blocks' pages and the large cache."""
        return sum(region.committed_end - region.base for region in self.regions) - self.hole_bytes + sum(
            _large_pages(size) for size in self.large.values()) + sum(self.large_cache.values())

    @property
    def live_bytes(self) -> int:
        """Bytes the live blocks hold, at their exact sizes."""
        return sum(self.medium.values()) + sum(self.large.values()) + sum(
            size for slab in self.slab_set for size in slab.sizes if size != SLOT_FREE)

    @property
    def reserved(self) -> int:
        """Bytes reserved: every region of the heap's, and its large blocks' pages."""
        return sum(region.reserved for region in self.regions) + sum(
            round_up(size, PAGE_SIZE) for size in self.large.values())

    def _fill(self, address, length, byte):
        if length > 0:
            self.memory[address:address + length] = bytes([byte]) * length

    def _is_filled(self, address, length, byte):
        return length <= 0 or self.memory[address:address + length] == bytes([byte]) * length

    # ---- invariants ----------------------------------------------------------------------

    def check(self) -> dict[str, int]:
        """Walk everything; raise RuntimeError naming each broken invariant. Returns counts
        (live blocks, committed bytes, free ranges)."""
        problems = []
        spans = []  # (start, end, what) inside regions' committed parts
        for start, end in self.free_start.items():
            if self.free_end.get(end) != start:
                problems.append(f"free range {start:#x} missing from free_end")
            if start not in self.bins[_bin_of(end - start)]:
                problems.append(f"free range {start:#x} not in its bin")
            if start % ALIGN or end % ALIGN or end <= start:
                problems.append(f"free range {start:#x}-{end:#x} misaligned or empty")
            if end in self.free_start and not self._is_region_start(end):
                problems.append(f"free ranges at {start:#x} and {end:#x} not coalesced")
            spans.append((start, end, "free"))
        if len(self.free_end) != len(self.free_start):
            problems.append("free_end has stale entries")
        if sum(len(b) for b in self.bins) != len(self.free_start):
            problems.append("bins hold ranges that are not free")
        live = len(self.medium) + len(self.large)
        for page, slab in self.slabs.items():
            if not slab.base <= page * PAGE_SIZE < slab.base + slab.size or slab not in self.slab_set:
                problems.append(f"slab {slab.base:#x} filed under page {page}")
        if sum(slab.size // PAGE_SIZE for slab in self.slab_set) != len(self.slabs):
            problems.append("slabs are not filed under exactly their pages")
        for slab in self.slab_set:
            used = sum(1 for s in slab.sizes if s != SLOT_FREE)
            if used != slab.live or used + len(slab.free) != len(slab.sizes):
                problems.append(f"slab {slab.base:#x} counts disagree")
            if any(slab.sizes[slot] != SLOT_FREE for slot in slab.free):
                problems.append(f"slab {slab.base:#x} lists a busy slot as free")
            live += used
            spans.append((slab.base, slab.base + slab.size, "slab"))
        for address, size in self.medium.items():
            spans.append((address, address + self._extent(size), "block"))
        for extent, addresses in self.recent.items():
            spans += [(address, address + extent, "freed block kept") for address in addresses]
        if sum(extent * len(a) for extent, a in self.recent.items()) != self.recent_bytes:
            problems.append("recent_bytes disagrees with the recent lists")
        if self.recent and self.purge_due is None:
            problems.append("freed blocks kept with no purge due")
        if live != self.live:
            problems.append(f"live count {self.live} != walked {live}")
        for region in self.regions:
            spans.append((region.base, region.start, "header"))
        spans.sort()
        for (s1, e1, w1), (s2, e2, w2) in zip(spans, spans[1:]):
            if s2 < e1:
                problems.append(f"{w1} {s1:#x}-{e1:#x} overlaps {w2} {s2:#x}-{e2:#x}")
        covered = sum(e - s for s, e, _ in spans)
        committed = sum(region.committed_end - region.base for region in self.regions)
        if covered != committed:
            problems.append(f"blocks + free + headers = {covered}, committed = {committed}")
        free_spans = sorted((s, e) for s, e, what in spans if what == "free")
        for hole, hole_end in self.holes.items():
            i = bisect_right(free_spans, (hole, float("inf"))) - 1
            if i < 0 or not free_spans[i][0] <= hole < hole_end <= free_spans[i][1] or hole % PAGE_SIZE:
                problems.append(f"hole {hole:#x}-{hole_end:#x} is not whole pages of one free range")
        if sorted(self.holes) != self.hole_starts or sum(e - s for s, e in self.holes.items()) != self.hole_bytes:
            problems.append("hole records disagree")
        for s, e, what in spans:
            region = self._region_of(s)
            if region is None or e > region.committed_end:
                problems.append(f"{what} {s:#x}-{e:#x} outside committed memory")
        if problems:
            raise RuntimeError("heap inconsistent: " + "; ".join(problems[:10]))
        return {"live": self.live, "committed": self.committed, "free_ranges": len(self.free_start)}
