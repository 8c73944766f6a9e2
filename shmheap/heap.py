"""The block allocator: the HeapAlloc layer, over an abstract page source.

Theory of operation
-------------------
A heap owns *segments*: regions it reserved from its page source. The first one starts with
HEAP_HEADER bytes that are never handed out (where Windows keeps its heap header; keeping the
span unused gives a fixed heap the capacity Windows gives, HC-09/HC-10). Each segment is
committed from its base up to a watermark; above it the pages are only reserved.

All metadata is out of band, in Python objects; nothing in the segment describes a block, so
an overrun can corrupt data but never the allocator. Blocks are 16-byte aligned and come in
three kinds, by size:

    small   size <= SMALL_MAX (16 KiB): a slot in a *run*, pages cut into equal slots of one
            size class (every multiple of 16 up to 1 KiB in one-page runs, then four classes
            per power of two up to 16 KiB in 64 KiB runs; a run is filed under each of its
            pages). A run keeps the exact size of each slot in an array('H') and its free
            slots on a stack, so alloc and free are a pop and a push: about two bytes of
            metadata per live block, and no search.
    medium  up to LARGE_THRESHOLD: carved from the heap's free ranges, found by segregated
            fit: free ranges sit in bins by size (exact 16-byte classes up to 1 KiB, then four
            bins per power of two, as TLSF does) and a bitmap of non-empty bins finds the
            first bin whose every range is large enough in O(1). Freeing coalesces with both
            neighbours through two dicts (start -> end, end -> start), also O(1). So no
            operation costs more as the number of live blocks grows.
    large   above LARGE_THRESHOLD (0xFE000, Windows' virtual-memory threshold on 64-bit): a
            region of its own, released when freed. Fixed-size heaps refuse them (HC-11).

Commit grows a segment's watermark in COMMIT_STEP (64 KiB) steps; a free range that reaches
the watermark is decommitted in the same steps once more than DECOMMIT_SLACK lies free there
(hysteresis, so a loop of alloc and free at the edge does not commit and decommit each time).
Extension segments that become empty are released. When the last live block goes, the heap
returns to its starting commit. Runs that empty are dissolved back into free ranges, except
the one run per size class that allocation is using.

With checking on (HEAP_TAIL_CHECKING_ENABLED / HEAP_FREE_CHECKING_ENABLED), every block gets
at least 16 bytes of tail filled with TAIL_FILL and every free byte holds FREE_FILL, so
`validate()` finds overruns and writes after free.

`check()` walks all of it: free ranges coalesced and in their bins, runs consistent, no two
blocks overlapping, live + free + header == committed.
"""

import threading
from array import array

from .constants import (HEAP_CREATE_ENABLE_EXECUTE, HEAP_FREE_CHECKING_ENABLED,
                        HEAP_TAIL_CHECKING_ENABLED)
from .errors import ShmheapError, WinError, raise_for

ALIGN = 16
PAGE = 4096
GRANULE = 64 * 1024
HEAP_HEADER = 0x400 + 0x100 * 8  # bytes of the first segment never handed out (HC-09/HC-10)
SMALL_MAX = 16 * 1024
TINY_MAX = 1024  # classes up to here are exact multiples of 16, in one-page runs
BIG_RUN = 64 * 1024  # run size of the classes above TINY_MAX
LARGE_THRESHOLD = 0xFE000  # larger blocks get a region of their own (HC-11, HC-13)
MAX_REQUEST = 2**62  # anything larger cannot be satisfied: fail before doing arithmetic on it
COMMIT_STEP = 64 * 1024
DECOMMIT_SLACK = 2 * COMMIT_STEP
MIN_COMMIT = 0x400 * 8  # a new heap commits at least this (HW-01: dwCommittedSize 0x2000)
FIRST_EXTENSION = 0x100000  # growable heaps add segments of 1 MiB, doubling (HC-08)
MAX_EXTENSION = 0xFD0000
TAIL_FILL = 0xAB
FREE_FILL = 0xFE
SLOT_FREE = 0xFFFF  # size marker of a free slot in a run

# Size classes: every multiple of 16 up to 1 KiB, then four per power of two up to 16 KiB.
CLASS_SIZES = [0] + list(range(ALIGN, TINY_MAX + 1, ALIGN)) + [
    (4 + step) << (power - 2) for power in range(10, 14) for step in range(1, 5)]
_CLASS_OF = bytes(next(i for i, c in enumerate(CLASS_SIZES) if c >= extent) if extent else 1
                  for extent in range(0, SMALL_MAX + 1, ALIGN))  # indexed by extent // 16


def _round_up(value, unit):
    return -(-value // unit) * unit


def _large_pages(size):
    """Bytes a large block keeps committed: its pages, never fewer than one."""
    return max(_round_up(size, PAGE), PAGE)


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
    """(reserve, commit, growable) of a new heap's first segment, as HeapCreate sizes it:
    a growable heap (maximum 0) reserves initial + 64 KiB (HC-07); a fixed one its maximum
    rounded up to 0x2000 (HC-06). Both commit the initial size, at least MIN_COMMIT."""
    if initial > MAX_REQUEST or maximum > MAX_REQUEST:
        _fail(WinError.ERROR_NOT_ENOUGH_MEMORY, "heap size too large")
    initial = _round_up(initial, PAGE)
    if maximum:
        reserve = _round_up(max(maximum, initial), 0x2000)
    else:
        reserve = initial + GRANULE
    return reserve, min(max(initial, MIN_COMMIT), reserve), not maximum


def _fail(code, message=None):
    raise_for(code, message)  # the exception class that fits the code (MemoryError, ValueError)


class PageSource:
    """What a heap needs from below. `memory` is a writable memoryview of the whole segment;
    addresses index it. The client's source speaks to the daemon; the daemon's (for the
    global heap) calls the page table directly."""

    memory = None

    def reserve(self, size):
        """Reserve a region of `size` bytes for this heap; return its base."""
        raise NotImplementedError

    def commit(self, address, size):
        raise NotImplementedError

    def decommit(self, address, size):
        raise NotImplementedError

    def release(self, base):
        raise NotImplementedError


class Segment:
    __slots__ = ("base", "reserved", "committed_end", "start")

    def __init__(self, base, reserved, committed_end, start):
        self.base = base
        self.reserved = reserved
        self.committed_end = committed_end
        self.start = start  # first usable address (after the header in the first segment)

    @property
    def end(self):
        return self.base + self.reserved


class Run:
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
    """One heap: its segments, free ranges, runs, medium and large blocks."""

    def __init__(self, source, base, reserved, committed, *, flags=0, growable=True):
        self.source = source
        self.memory = source.memory
        self.flags = flags
        self.growable = growable
        self.checking = bool(flags & (HEAP_TAIL_CHECKING_ENABLED | HEAP_FREE_CHECKING_ENABLED))
        self.tail = ALIGN if self.checking else 0
        self.protect = 0x40 if flags & HEAP_CREATE_ENABLE_EXECUTE else 0x04
        self.lock = threading.RLock()
        self.base = base
        self.segments = [Segment(base, reserved, base + committed, base + HEAP_HEADER)]
        self.segment_bases = {base}  # free ranges never coalesce across a segment start
        self.initial_commit = committed
        self.grown = False  # committed past the start since the heap was last empty
        self.next_extension = FIRST_EXTENSION
        self.free_start = {}  # start -> end of every free range
        self.free_end = {}  # end -> start
        self.bins = [set() for _ in range(_bin_of(MAX_REQUEST) + 1)]
        self.bitmap = 0
        self.runs = {}  # page number -> Run, for every page of every run
        self.run_set = set()
        self.current = [None] * len(CLASS_SIZES)  # the run each class allocates from
        self.partial = [[] for _ in CLASS_SIZES]  # runs with free slots, not current
        self.medium = {}  # address -> requested size
        self.large = {}  # address -> requested size (the region base is the address)
        # Freed large regions kept committed for the next large block, up to this many bytes
        # (0: none). The global heap sets it: a pool that allocates, fills and frees big
        # arrays then reuses pages that are already backed and mapped.
        self.large_cache_limit = 0
        self.large_cache = {}  # region base -> committed bytes
        self.live = 0
        if self.checking:
            self._fill(base + HEAP_HEADER, committed - HEAP_HEADER, FREE_FILL)
        self._add_free(base + HEAP_HEADER, base + committed)

    # ---- free ranges ---------------------------------------------------------------------

    def _add_free(self, start, end):
        """Insert free [start, end), coalescing with neighbours in the same segment."""
        if start >= end:
            return
        left = self.free_end.get(start)
        if left is not None and not self._is_segment_start(start):
            self._unlink(left, start)
            start = left
        right = self.free_start.get(end)
        if right is not None and not self._is_segment_start(end):
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

    def _is_segment_start(self, address):
        return address in self.segment_bases

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

    def _carve(self, size, align=ALIGN):
        """Take `size` bytes at `align` alignment from the free ranges, growing the commit or
        the heap if needed. Returns the address."""
        start = self._find_fit(size + align - ALIGN)
        if start is None:
            start = self._grow(size + align - ALIGN)
        end = self.free_start[start]
        self._unlink(start, end)
        address = _round_up(start, align)
        self._add_free(start, address)
        self._add_free(address + size, end)
        return address

    def _grow(self, size):
        """Make a free range of at least `size` bytes by committing more of a segment, or by
        adding a segment to a growable heap. Returns its start."""
        for segment in self.segments:
            top = self.free_end.get(segment.committed_end, segment.committed_end)
            if top + size <= segment.end:
                self._commit_to(segment, min(_round_up(top + size, COMMIT_STEP), segment.end))
                return top
        if not self.growable:
            _fail(WinError.ERROR_NOT_ENOUGH_MEMORY, "the heap is full (fixed maximum size)")
        reserve = max(self.next_extension, _round_up(size, GRANULE))
        self.next_extension = min(self.next_extension * 2, MAX_EXTENSION)
        base = self.source.reserve(reserve)
        segment = Segment(base, reserve, base, base)
        self.segments.append(segment)
        self.segment_bases.add(base)
        try:
            self._commit_to(segment, min(_round_up(base + size, COMMIT_STEP), segment.end))
        except ShmheapError:
            self.segments.pop()
            self.segment_bases.discard(base)
            self.source.release(base)
            raise
        return base

    def _commit_to(self, segment, new_end):
        self.grown = True  # may hold more than the starting commit: reset when empty
        old_end = segment.committed_end
        self.source.commit(old_end, new_end - old_end)
        segment.committed_end = new_end
        if self.checking:
            self._fill(old_end, new_end - old_end, FREE_FILL)
        self._add_free(old_end, new_end)

    def _trim(self, segment):
        """Decommit the free top of `segment` beyond the slack; release an empty extension."""
        top = self.free_end.get(segment.committed_end)
        if top is None:
            return
        if segment is not self.segments[0] and top == segment.start:
            self._unlink(top, segment.committed_end)
            self.segments.remove(segment)
            self.segment_bases.discard(segment.base)
            self.source.release(segment.base)
            return
        floor = self.base + self.initial_commit if segment is self.segments[0] else segment.base
        if segment.committed_end - max(top, floor) <= DECOMMIT_SLACK:
            return
        new_end = max(_round_up(top, COMMIT_STEP) + COMMIT_STEP, floor)
        if new_end < segment.committed_end:
            self._shrink_commit(segment, top, new_end)

    def _shrink_commit(self, segment, top, new_end):
        self._unlink(top, segment.committed_end)
        self.source.decommit(new_end, segment.committed_end - new_end)
        segment.committed_end = new_end
        self._add_free(top, new_end)

    def _segment_of(self, address):
        for segment in self.segments:
            if segment.base <= address < segment.end:
                return segment
        return None

    def _reset_when_empty(self):
        """No live block left: go back to the starting commit. Called only when there is
        something to give back, so a heap already there keeps its runs, and a loop of alloc
        and free inside the initial commit costs no run setup."""
        self.grown = False
        first = self.segments[0]
        if len(self.segments) == 1 and first.committed_end == self.base + self.initial_commit:
            return  # trimmed back already: keep the runs
        for run in list(self.run_set):
            self._dissolve(run)
        self.current = [None] * len(CLASS_SIZES)
        self.partial = [[] for _ in CLASS_SIZES]
        for segment in self.segments[1:]:
            self._trim(segment)
        top = self.free_end.get(first.committed_end)
        floor = self.base + self.initial_commit
        if top is not None and first.committed_end > floor:
            self._shrink_commit(first, top, floor)

    # ---- blocks --------------------------------------------------------------------------

    def _extent(self, size):
        """Bytes a small or medium block of `size` occupies: 16-aligned, plus the checked
        tail, never 0 (a 0-byte block is still a distinct block, HA-01)."""
        return ((size + 15) & ~15) + self.tail or ALIGN

    def alloc(self, size, zero=False):
        """A block of exactly `size` bytes (HeapSize reports `size`); raises ShmheapError."""
        extent = ((size + 15) & ~15) + self.tail or ALIGN  # self._extent(size), inlined: hot path
        if extent <= SMALL_MAX:  # the hot path: a pop from the class's current run
            cls = _CLASS_OF[extent >> 4]
            run = self.current[cls]
            if run is None or not run.free:
                run = self._next_run(cls)
            slot = run.free.pop()
            run.sizes[slot] = size
            run.live += 1
            address = run.base + slot * run.block
        elif size <= LARGE_THRESHOLD:
            address = self._carve(extent)
            self.medium[address] = size
        elif size <= MAX_REQUEST:
            address = self._alloc_large(size)
        else:
            _fail(WinError.ERROR_NOT_ENOUGH_MEMORY, f"cannot allocate {size} bytes")
        self.live += 1
        if zero:
            self._fill(address, size, 0)
        if self.tail and size <= LARGE_THRESHOLD:
            self._fill(address + size, extent - size, TAIL_FILL)
        return address

    def _next_run(self, cls):
        partial = self.partial[cls]
        while partial:
            run = partial.pop()
            if run.free and run in self.run_set:
                self.current[cls] = run
                return run
        size = PAGE if CLASS_SIZES[cls] <= TINY_MAX else BIG_RUN
        base = self._carve(size, PAGE)
        run = Run(base, size, cls)
        self.run_set.add(run)
        for page in range(base // PAGE, (base + size) // PAGE):
            self.runs[page] = run
        self.current[cls] = run
        return run

    def _dissolve(self, run):
        self.run_set.discard(run)
        for page in range(run.base // PAGE, (run.base + run.size) // PAGE):
            del self.runs[page]
        self._add_free(run.base, run.base + run.size)

    def _alloc_large(self, size):
        if not self.growable:
            _fail(WinError.ERROR_NOT_ENOUGH_MEMORY, "a fixed-size heap takes no block this large")
        reserve = _round_up(size, PAGE)
        for base, kept in self.large_cache.items():
            if reserve <= kept <= 2 * reserve:  # reuse, wasting at most half
                del self.large_cache[base]
                if kept > reserve:
                    self.source.decommit(base + reserve, kept - reserve)
                self.large[base] = size
                return base
        base = self.source.reserve(reserve)
        try:
            self.source.commit(base, reserve)
        except ShmheapError:
            self.source.release(base)
            raise
        self.large[base] = size
        return base

    def _locate(self, address):
        """('small', run, slot) / ('medium', None, None) / ('large', None, None) for a live
        block starting at `address`; raises ERROR_INVALID_PARAMETER otherwise (HF-02, HF-03)."""
        run = self.runs.get(address // PAGE)
        if run is not None:
            slot, offset = divmod(address - run.base, run.block)
            if offset == 0 and run.sizes[slot] != SLOT_FREE:
                return "small", run, slot
        elif address in self.medium:
            return "medium", None, None
        elif address in self.large:
            return "large", None, None
        _fail(WinError.ERROR_INVALID_PARAMETER, f"{address:#x} is not a live block of this heap")

    def is_small(self, address):
        """True if `address` lies in a run (a small block's slot)."""
        return address // PAGE in self.runs

    def size(self, address):
        kind, run, slot = self._locate(address)
        if kind == "small":
            return run.sizes[slot]
        return self.medium[address] if kind == "medium" else self.large[address]

    def free(self, address):
        run = self.runs.get(address >> 12)  # address // PAGE
        if run is not None:  # the hot path: a push onto the run's free stack
            slot, offset = divmod(address - run.base, run.block)
            sizes = run.sizes
            if offset or sizes[slot] == SLOT_FREE:
                _fail(WinError.ERROR_INVALID_PARAMETER, f"{address:#x} is not a live block of this heap")
            if self.checking:
                self._fill(address, run.block, FREE_FILL)
            sizes[slot] = SLOT_FREE
            run.free.append(slot)
            run.live -= 1
            if self.current[run.cls] is not run:
                cls = run.cls
                if run.live == 0:
                    self._dissolve(run)
                    self._trim(self._segment_of(run.base))
                elif len(run.free) == 1:
                    self.partial[cls].append(run)
        elif address in self.medium:
            extent = self._extent(self.medium.pop(address))
            if self.checking:
                self._fill(address, extent, FREE_FILL)
            self._add_free(address, address + extent)
            self._trim(self._segment_of(address))
        elif address in self.large:
            kept = _large_pages(self.large.pop(address))
            if kept <= self.large_cache_limit:
                self.flush_large_cache()  # keep the latest only: bounded, and the likeliest reused
                self.large_cache[address] = kept
            else:
                self.source.release(address)
        else:
            _fail(WinError.ERROR_INVALID_PARAMETER, f"{address:#x} is not a live block of this heap")
        self.live -= 1
        if self.live == 0 and self.grown:
            self._reset_when_empty()

    def realloc(self, address, size, zero=False, in_place_only=False):
        """Resize a block, in place when possible (else moved, unless `in_place_only`).
        The first min(old, new) bytes are kept; with `zero` any growth reads zero (HR-04).
        A refusal leaves the block as it was (HR-02, HR-08)."""
        kind, run, slot = self._locate(address)
        if size > MAX_REQUEST:
            _fail(WinError.ERROR_NOT_ENOUGH_MEMORY, f"cannot allocate {size} bytes")
        old = self.size(address)
        if self._resize_in_place(kind, address, run, slot, old, size):
            if zero and size > old:
                self._fill(address + old, size - old, 0)
            return address
        if in_place_only:
            _fail(WinError.ERROR_NOT_ENOUGH_MEMORY, "cannot resize in place")
        new = self.alloc(size, zero=zero)
        count = min(old, size)
        self.memory[new:new + count] = self.memory[address:address + count]
        self.free(address)
        return new

    def _resize_in_place(self, kind, address, run, slot, old, size):
        extent = self._extent(size)
        if kind == "small":
            if extent > run.block:
                return False
            run.sizes[slot] = size
        elif kind == "medium":
            if size > LARGE_THRESHOLD:
                return False
            old_extent = self._extent(old)
            if extent > old_extent:
                end = address + old_extent
                need = address + extent
                next_end = self.free_start.get(end)
                if next_end is None or next_end < need:
                    segment = self._segment_of(address)
                    top = next_end if next_end is not None else end
                    if top != segment.committed_end or need > segment.end:
                        return False
                    self._commit_to(segment, min(_round_up(need, COMMIT_STEP), segment.end))
                    next_end = self.free_start[end]
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

    def flush_large_cache(self):
        """Release the freed large regions kept for reuse; returns the bytes they held."""
        freed = sum(self.large_cache.values())
        for base in self.large_cache:
            self.source.release(base)
        self.large_cache.clear()
        return freed

    def destroy(self):
        """Give every segment and large block back; the heap is unusable afterwards."""
        self.flush_large_cache()
        for address in list(self.large):
            self.source.release(address)
        for segment in self.segments:
            self.source.release(segment.base)
        self.large.clear()
        self.medium.clear()
        self.runs.clear()
        self.run_set.clear()
        self.segments = []
        self.live = 0

    def blocks(self):
        """(address, size) of every live block, in no particular order."""
        for run in self.run_set:
            for slot, size in enumerate(run.sizes):
                if size != SLOT_FREE:
                    yield run.base + slot * run.block, size
        yield from self.medium.items()
        yield from self.large.items()

    def alloc_below(self, size, limit):
        """A block of `size` bytes at an address below `limit`, or None: the lowest free slot
        of the size class's runs, or the lowest free range that fits. For compaction, which
        is explicit and rare, so it may scan."""
        extent = self._extent(size)
        if extent <= SMALL_MAX:
            cls = _CLASS_OF[extent >> 4]
            runs = sorted((r for r in self.run_set if r.cls == cls and r.free and r.base < limit),
                          key=lambda r: r.base)
            if not runs:
                return None
            run = runs[0]
            slot = min(run.free)
            if run.base + slot * run.block >= limit:
                return None
            run.free.remove(slot)
            run.sizes[slot] = size
            run.live += 1
            address = run.base + slot * run.block
        elif size <= LARGE_THRESHOLD:
            starts = sorted(s for s, e in self.free_start.items() if e - s >= extent and s < limit)
            if not starts or starts[0] + extent > limit:
                return None
            address = starts[0]
            end = self.free_start[address]
            self._unlink(address, end)
            self._add_free(address + extent, end)
            self.medium[address] = size
        else:
            return None
        self.live += 1
        if self.tail:
            self._fill(address + size, extent - size, TAIL_FILL)
        return address

    def walk(self):
        """HeapWalk's entries in order: per segment a region entry, then its busy blocks and
        free ranges by address, then its uncommitted range; large blocks last (HW-01..HW-03).
        Each entry is (kind, address, size, overhead, region_index, segment)."""
        for index, segment in enumerate(self.segments):
            yield "region", segment.base, segment.committed_end - segment.base, 0, index, segment
            items = [(start, "free", end - start, 0) for start, end in self.free_start.items()
                     if segment.base <= start < segment.end]
            items += [(a, "busy", s, self._extent(s) - s) for a, s in self.medium.items()
                      if segment.base <= a < segment.end]
            for run in self.run_set:
                if segment.base <= run.base < segment.end:
                    items += [(run.base + slot * run.block, "busy", size, run.block - size)
                              for slot, size in enumerate(run.sizes) if size != SLOT_FREE]
            for address, kind, size, overhead in sorted(items):
                yield kind, address, size, overhead, index, segment
            if segment.committed_end < segment.end:
                yield ("uncommitted", segment.committed_end, segment.end - segment.committed_end,
                       0, index, segment)
        for address, size in sorted(self.large.items()):
            yield "large", address, size, 0, 64, None

    def validate(self, address=None):
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
        for run in self.run_set:
            for slot in run.free:
                start = run.base + slot * run.block
                yield start, start + run.block

    def _tail_intact(self, address, size):
        if not self.tail or address in self.large:
            return True
        return self._is_filled(address + size, self._extent(size) - size, TAIL_FILL)

    def largest_free(self):
        """HeapCompact's answer: the largest committed free range."""
        return max((end - start for start, end in self.free_start.items()), default=0)

    def compact(self):
        """Dissolve empty runs and decommit free tops; return the largest free range."""
        for run in list(self.run_set):
            if run.live == 0:
                cls = run.cls
                if self.current[cls] is run:
                    self.current[cls] = None
                self._dissolve(run)
        for segment in list(self.segments):
            self._trim(segment)
        return self.largest_free()

    @property
    def committed(self):
        return sum(segment.committed_end - segment.base for segment in self.segments) + sum(
            _large_pages(size) for size in self.large.values()) + sum(self.large_cache.values())

    @property
    def reserved(self):
        return sum(segment.reserved for segment in self.segments) + sum(
            _round_up(size, PAGE) for size in self.large.values())

    def _fill(self, address, length, byte):
        if length > 0:
            self.memory[address:address + length] = bytes([byte]) * length

    def _is_filled(self, address, length, byte):
        return length <= 0 or self.memory[address:address + length] == bytes([byte]) * length

    # ---- invariants ----------------------------------------------------------------------

    def check(self):
        """Walk everything; raise RuntimeError naming each broken invariant."""
        problems = []
        spans = []  # (start, end, what) inside segments' committed parts
        for start, end in self.free_start.items():
            if self.free_end.get(end) != start:
                problems.append(f"free range {start:#x} missing from free_end")
            if start not in self.bins[_bin_of(end - start)]:
                problems.append(f"free range {start:#x} not in its bin")
            if start % ALIGN or end % ALIGN or end <= start:
                problems.append(f"free range {start:#x}-{end:#x} misaligned or empty")
            if end in self.free_start and not self._is_segment_start(end):
                problems.append(f"free ranges at {start:#x} and {end:#x} not coalesced")
            spans.append((start, end, "free"))
        if len(self.free_end) != len(self.free_start):
            problems.append("free_end has stale entries")
        if sum(len(b) for b in self.bins) != len(self.free_start):
            problems.append("bins hold ranges that are not free")
        live = len(self.medium) + len(self.large)
        for page, run in self.runs.items():
            if not run.base <= page * PAGE < run.base + run.size or run not in self.run_set:
                problems.append(f"run {run.base:#x} filed under page {page}")
        if sum(run.size // PAGE for run in self.run_set) != len(self.runs):
            problems.append("runs are not filed under exactly their pages")
        for run in self.run_set:
            used = sum(1 for s in run.sizes if s != SLOT_FREE)
            if used != run.live or used + len(run.free) != len(run.sizes):
                problems.append(f"run {run.base:#x} counts disagree")
            if any(run.sizes[slot] != SLOT_FREE for slot in run.free):
                problems.append(f"run {run.base:#x} lists a busy slot as free")
            live += used
            spans.append((run.base, run.base + run.size, "run"))
        for address, size in self.medium.items():
            spans.append((address, address + self._extent(size), "block"))
        if live != self.live:
            problems.append(f"live count {self.live} != walked {live}")
        for segment in self.segments:
            spans.append((segment.base, segment.start, "header"))
        spans.sort()
        for (s1, e1, w1), (s2, e2, w2) in zip(spans, spans[1:]):
            if s2 < e1:
                problems.append(f"{w1} {s1:#x}-{e1:#x} overlaps {w2} {s2:#x}-{e2:#x}")
        covered = sum(e - s for s, e, _ in spans)
        committed = sum(segment.committed_end - segment.base for segment in self.segments)
        if covered != committed:
            problems.append(f"blocks + free + headers = {covered}, committed = {committed}")
        for s, e, what in spans:
            segment = self._segment_of(s)
            if segment is None or e > segment.committed_end:
                problems.append(f"{what} {s:#x}-{e:#x} outside committed memory")
        if problems:
            raise RuntimeError("heap inconsistent: " + "; ".join(problems[:10]))
        return {"live": self.live, "committed": self.committed, "free_ranges": len(self.free_start)}
