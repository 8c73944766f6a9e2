"""Global memory: GlobalAlloc's objects, in the daemon's global heap, valid in every process.

The global heap is the same block allocator the clients use (shmheap/heap.py), run here over
the page table (PageTablePages); its regions belong to the system and are shared, so every
process can view its blocks. Moveable objects have stamped handles (shmheap/moveable.py): a
freed handle is stale forever, never taken for a newer object. Lock counts live here, so they
are the same in every process.

Ownership, in the spirit of Win16: an object belongs to the process that allocated it and is
freed when that process goes, unless it was allocated (or later modified) with
GMEM_DDESHARE / GMEM_SHARE, in which case it lives until some process frees it. Any process
may lock, read, write, resize or free any object whose handle it has been given.

Every call returns its Win32 value or raises ShmheapError with the Win32 code.
Lifetimes across processes: a process *holds* an object it allocated, attached (a received
SharedBuffer) or locked; it may touch the pages of what it holds and nothing else of the
global heap (`access_runs`, what its mapping is told). Freeing an object drops the caller's
holds; if another process still holds it, or a pickled copy is on its way (a *pin*, taken
when a SharedBuffer is pickled and consumed when it is attached, or lapsed after
PIN_SECONDS), the object is *doomed*: gone for every Win32 call, but its memory is neither
reused nor decommitted until the last holder lets go or dies. Each object has a serial
number, so a pickled buffer whose object is gone is refused, never taken for a newer one at
the same address.

"""

import itertools
import mmap
import time
from bisect import bisect_left, bisect_right, insort

from shmheap.constants import GMEM_DDESHARE, GMEM_MODIFY, PAGE_READWRITE
from shmheap.errors import WinError, raise_for
from shmheap.heap import PURGE_DELAY, Heap, PageSource, heap_layout
from shmheap.moveable import ADDRESS_MASK, GLOBAL, MoveableTable
from shmheap.segment import PAGE_SIZE, pages_in

from .pagetable import SYSTEM

READ_WRITE = mmap.PROT_READ | mmap.PROT_WRITE

# The global heap's starting commit, which it keeps when empty: room for a 64 KiB slab of
# page-sized buffers and a few small ones, so sharing one buffer at a time does not commit and
# decommit a slab per buffer.
GLOBAL_HEAP_INITIAL = 192 * 1024
MAX_BATCH = 100_000
# A freed large object's region (up to this size) stays committed for the next one, for at
# most LARGE_CACHE_SECONDS unused, or until a commit needs the memory (PageTable.reclaim).
LARGE_CACHE_LIMIT = 256 * 2**20
LARGE_CACHE_SECONDS = 2.0
PIN_SECONDS = 60.0  # a pickled SharedBuffer keeps its object this long, waiting to be attached


class PageTablePages(PageSource):
    """The page source of a heap the daemon runs itself (the global heap): regions and
    commits straight from the page table, owned by `owner` (SYSTEM for shared memory)."""

    def __init__(self, pagetable, owner, memory, protect=PAGE_READWRITE, kind="global", shared=False):
        self.pagetable = pagetable
        self.owner = owner
        self.memory = memory
        self.protect = protect
        self.kind = kind
        self.shared = shared  # regions every process may view

    def reserve(self, size):
        return self.pagetable.reserve(self.owner, size, self.protect, kind=self.kind, shared=self.shared).base

    def _pages(self, address, size):
        region = self.pagetable.region_at(address)
        first = (address - region.base) // PAGE_SIZE
        return region, first, first + pages_in(size)

    def commit(self, address, size):
        region, first, last = self._pages(address, size)
        self.pagetable.commit(region, first, last, self.protect)

    def decommit(self, address, size):
        region, first, last = self._pages(address, size)
        self.pagetable.decommit(region, first, last)

    def release(self, base):
        self.pagetable.release(self.pagetable.region_at(base))


class GlobalMemory:
    def __init__(self, pagetable, memory):
        reserve, commit, _ = heap_layout(GLOBAL_HEAP_INITIAL, 0)
        source = PageTablePages(pagetable, SYSTEM, memory, shared=True)
        self.pagetable = pagetable
        # Freed pages go back a purge delay after the frees, on the server's tick (housekeeping),
        # as a client's heap gives them back on its purger thread: a burst of frees (processes
        # killed by the dozen) leaves nothing committed behind, a loop costs no commit churn.
        self.heap = Heap(source, source.allocate(reserve, commit), reserve, commit,
                         large_cache_limit=LARGE_CACHE_LIMIT, purge_delay=PURGE_DELAY,
                         on_purge_due=lambda heap: None, cache_by_time=True)
        self.cached_since = None  # since when the large cache has sat unused
        self.cache_uses_seen = 0
        self.table = MoveableTable(self.heap, GLOBAL, stamped=True)
        self.owners = {}  # object (moveable handle or fixed pointer) -> pid; shared ones absent
        self.holds = {}  # object -> {pid: count}: allocations and attachments
        self.locks = {}  # object -> {pid: count}: GlobalLock calls not yet unlocked
        self.pins = {}  # object -> [expiry, ...]: pickled copies not yet attached
        self.pin_deadline = float("inf")  # no pin lapses before this
        self.doomed = set()  # freed, but held or pinned still
        self.clipboard = set()  # objects the clipboard holds: no process owns or frees them
        self.serials = {}  # object -> serial number
        self._serial = itertools.count(1)
        self.spans = {}  # pid -> {start: [end, count]}: the bytes it may touch
        self.span_starts = {}  # pid -> sorted starts of its spans

    @property
    def live_objects(self):
        return self.heap.live - len(self.table.chunks)  # the handle table's own blocks aside

    @property
    def shared_objects(self):
        """Objects no process owns (GMEM_SHARE / GMEM_DDESHARE, or doomed ones pinned by a
        pickled copy): they outlive their makers."""
        moveable_with_data = sum(1 for entry in self.table.entries.values() if entry.pointer)
        return self.live_objects - moveable_with_data + len(self.table.entries) - len(self.owners)

    # ---- what each process may touch ------------------------------------------------------

    def _spans_of(self, value, locked):
        """The bytes a hold on `value` opens, with the access: a fixed object's own, read and
        write; a moveable object's pointer slot, read-only (only the daemon moves data), and
        its data, read and write, while locked."""
        if value in self.table.entries:
            slot = value & ADDRESS_MASK
            pointer = self.table.entries[value].pointer
            spans = [(slot, slot + 8, mmap.PROT_READ)]
            if locked and pointer:
                spans.append((pointer, pointer + max(self.heap.size(pointer), 1), READ_WRITE))
            return spans
        return [(value, value + max(self.heap.size(value), 1), READ_WRITE)]

    def _open(self, pid, spans):
        mine = self.spans.setdefault(pid, {})
        starts = self.span_starts.setdefault(pid, [])
        for start, end, prot in spans:
            if start in mine:
                mine[start][1] += 1
            else:
                mine[start] = [end, 1, prot]
                insort(starts, start)
            self.pagetable.touch(start, end)

    def _close(self, pid, spans):
        mine = self.spans.get(pid, {})
        for start, end, _ in spans:
            held = mine.get(start)
            if held is None:
                continue
            held[1] -= 1
            if not held[1]:
                del mine[start]
                starts = self.span_starts[pid]
                del starts[bisect_left(starts, start)]
            self.pagetable.touch(start, end)

    def access_runs(self, pid, start, end):
        """What `pid` may do with the global heap's pages in [start, end): on the pages of
        what it holds, the most any span on the page allows; nothing elsewhere.
        [[address, length, prot], ...] runs."""
        runs = []
        mine, starts = self.spans.get(pid, {}), self.span_starts.get(pid, [])
        i = max(bisect_right(starts, start) - 1, 0)
        cursor = start
        while i < len(starts) and starts[i] < end:
            span_start = starts[i]
            span_end, _, prot = mine[span_start]
            i += 1
            lo = max(span_start - span_start % PAGE_SIZE, start)
            hi = min(-(-span_end // PAGE_SIZE) * PAGE_SIZE, end)
            if lo < cursor and runs and prot & ~runs[-1][2]:
                # The page this span starts on is open already, for less: give it the more.
                shared = cursor - lo
                runs[-1][1] -= shared
                if not runs[-1][1]:
                    runs.pop()
                cursor = lo
            if hi <= cursor:
                continue
            lo = max(lo, cursor)
            if lo > cursor:
                runs.append([cursor, lo - cursor, 0])
            if runs and runs[-1][2] == prot and runs[-1][0] + runs[-1][1] == lo:
                runs[-1][1] += hi - lo
            else:
                runs.append([lo, hi - lo, prot])
            cursor = hi
            if prot == READ_WRITE:
                # Skip the spans on pages already open for all: those that start before `hi`
                # end before it (spans are disjoint), but the last, which may run on.
                i = max(i, bisect_left(starts, hi) - 1)
        if cursor < end:
            runs.append([cursor, end - cursor, 0])
        return runs

    # ---- holds -----------------------------------------------------------------------------

    def _hold(self, table, value, pid, locked):
        counts = table.setdefault(value, {})
        counts[pid] = counts.get(pid, 0) + 1
        self._open(pid, self._spans_of(value, locked))

    def _unhold(self, table, value, pid, locked, every=False):
        counts = table.get(value, {})
        n = counts.get(pid, 0)
        for _ in range(n if every else min(n, 1)):
            self._close(pid, self._spans_of(value, locked))
        if n and (every or n == 1):
            del counts[pid]
        elif n:
            counts[pid] = n - 1
        if not counts:
            table.pop(value, None)

    def _held_by_others(self, value, pid):
        """Does another process touch the object's data? A fixed object's while it holds it
        (or a copy is pinned); a moveable object's only while it has it locked: unlocked,
        its data may move, and only its pointer slot is anyone's to read."""
        if any(p != pid for p in self.locks.get(value, ())):
            return True
        if value in self.table.entries:
            return False
        return any(p != pid for p in self.holds.get(value, ())) or bool(self.pins.get(value))

    def _live(self, value):
        """Raise for an object that is freed, even if it lives on for its holders."""
        if value in self.doomed:
            raise_for(WinError.ERROR_INVALID_HANDLE, f"{value:#x} was freed")

    def _not_the_clipboards(self, value):
        if value in self.clipboard:
            raise_for(WinError.ERROR_ACCESS_DENIED, f"{value:#x} is the clipboard's (CB-37): only it frees or resizes it")

    def _bury(self, value):
        """Free a doomed or released object for good once nobody holds or pins it."""
        if value in self.holds or value in self.locks or self.pins.get(value):
            return
        self.doomed.discard(value)
        self.pins.pop(value, None)
        self.serials.pop(value, None)
        self.owners.pop(value, None)
        self.table.free(value)

    # ---- the calls ---------------------------------------------------------------------------

    def alloc(self, pid, flags, size):
        value = self.table.alloc(flags, size)
        if not flags & GMEM_DDESHARE:
            self.owners[value] = pid
        self.serials[value] = next(self._serial)
        self._hold(self.holds, value, pid, False)
        return value

    def alloc_many(self, pid, flags, sizes):
        """Allocate every size or none: returns [[handle, serial], ...], or raises the first
        failure."""
        if len(sizes) > MAX_BATCH:
            raise_for(WinError.ERROR_INVALID_PARAMETER, f"at most {MAX_BATCH} per batch")
        made = []
        try:
            for size in sizes:
                made.append(self.alloc(pid, flags, size))
        except BaseException:
            for handle in made:
                self.free(pid, handle)
            raise
        return [[handle, self.serials[handle]] for handle in made]

    def free(self, pid, handle):
        """GlobalFree: the caller's holds and locks go; the object goes with them unless
        another process holds it or a pickled copy is on its way (then it is doomed)."""
        if handle == 0:
            return
        self._not_the_clipboards(handle)
        if handle in self.doomed and (self.holds.get(handle, {}).get(pid) or self.locks.get(handle, {}).get(pid)):
            self._let_go(pid, handle)  # a holder of a freed object lets go
            self._bury(handle)
            return
        self._live(handle)
        if handle not in self.serials:
            self.table.free(handle)  # not an object: raises with the Win32 code
            return
        self._let_go(pid, handle)
        self.owners.pop(handle, None)
        if handle in self.table.entries:
            # A moveable object's other holders hold only its pointer slot, in a table page
            # that is never given back: they let go of it with the object.
            for other in list(self.holds.get(handle, ())):
                self._unhold(self.holds, handle, other, False, every=True)
        self.doomed.add(handle)
        self._bury(handle)  # now, unless another process still holds it

    def _let_go(self, pid, value):
        """Every hold and lock `pid` has on `value` goes."""
        self._unhold(self.holds, value, pid, False, every=True)
        self._unhold(self.locks, value, pid, True, every=True)

    def realloc(self, pid, handle, size, flags):
        """GlobalReAlloc. An object another process holds stays where it is: a change that
        would move it fails (ERROR_NOT_ENOUGH_MEMORY) rather than pull it from under them."""
        self._live(handle)
        self._not_the_clipboards(handle)
        held = self.holds.get(handle, {}).get(pid, 0)
        locked = self.locks.get(handle, {}).get(pid, 0)
        for _ in range(held):  # the caller's spans close while the object may move ...
            self._close(pid, self._spans_of(handle, False))
        for _ in range(locked):
            self._close(pid, self._spans_of(handle, True))
        try:
            value = self.table.realloc(handle, size, flags, pinned=self._held_by_others(handle, pid))
        except BaseException:
            self._rekey(pid, handle, handle, 0, held, locked)
            raise
        return self._rekey(pid, handle, value, flags, held, locked)  # ... and open where it is

    def _rekey(self, pid, handle, value, flags, held, locked):
        """After a realloc: the object may be at a new address or have become moveable; its
        records follow it, and the caller's spans open where it is now."""
        if value != handle:
            for table in (self.holds, self.locks, self.pins, self.serials):
                if handle in table:
                    table[value] = table.pop(handle)
            owner = self.owners.pop(handle, None)
            if owner is not None:
                self.owners[value] = owner
        if flags & GMEM_MODIFY and flags & GMEM_DDESHARE:
            self.owners.pop(value, None)  # shared from now on
        for _ in range(held):
            self._open(pid, self._spans_of(value, False))
        for _ in range(locked):
            self._open(pid, self._spans_of(value, True))
        return value

    def size(self, pid, handle):
        self._live(self.table.by_pointer.get(handle, handle))  # (GL-23: a data pointer will do)
        return self.table.size(handle)

    def lock(self, pid, handle):
        self._live(handle)
        pointer = self.table.lock(handle)
        if handle in self.serials:
            self._hold(self.locks, handle, pid, True)
        return pointer

    def unlock(self, pid, handle):
        if handle in self.doomed:
            if not self.locks.get(handle, {}).get(pid):
                raise_for(WinError.ERROR_INVALID_HANDLE, f"{handle:#x} was freed")  # GL-18
            self._unhold(self.locks, handle, pid, True)  # freed by another while we held it
            self._bury(handle)
            return False
        if handle in self.table.entries and not self.locks.get(handle, {}).get(pid):
            # A process lets go of its own locks only: another's lock keeps the data where its
            # pointer is (on Windows every lock is the one process's own).
            raise_for(WinError.ERROR_NOT_LOCKED, f"this process has no lock on {handle:#x}")
        if handle in self.serials:
            self._unhold(self.locks, handle, pid, True)
        return self.table.unlock(handle)

    def flags(self, pid, handle):
        self._live(handle)
        return self.table.flags(handle)

    def handle(self, pid, pointer):
        handle = self.table.handle(pointer)
        self._live(handle)
        return handle

    def compact(self, pid, min_free=0):
        """GlobalCompact; `min_free` is only a hint on Windows too, and is not used. Locked
        objects (whoever locked them) stay where they are."""
        return self.table.compact(keep=self.locks)

    def attach(self, pid, pointer, serial):
        """A process takes a hold on a fixed object it was handed (a SharedBuffer unpickled):
        it may touch it until it lets go. Refused if the object is gone (or is another by
        now), or was freed and no pickled copy is on its way."""
        if self.serials.get(pointer) != serial or pointer in self.table.entries:
            raise_for(WinError.ERROR_INVALID_HANDLE, f"buffer {pointer:#x} is gone")
        pins = self.pins.get(pointer)
        if pins:
            pins.pop(0)
        elif pointer in self.doomed:
            raise_for(WinError.ERROR_INVALID_HANDLE, f"buffer {pointer:#x} was freed")
        self._hold(self.holds, pointer, pid, False)

    def release(self, pid, pointer, serial):
        """A process lets go of a fixed object it attached."""
        if self.serials.get(pointer) != serial or not self.holds.get(pointer, {}).get(pid):
            raise_for(WinError.ERROR_INVALID_HANDLE, f"no hold on buffer {pointer:#x}")
        self._unhold(self.holds, pointer, pid, False)
        if pointer in self.doomed:
            self._bury(pointer)

    def pin(self, pid, pointer, serial, now):
        """A SharedBuffer is pickled: keep the object for the copy until it is attached, or
        for PIN_SECONDS."""
        if self.serials.get(pointer) != serial or pointer in self.table.entries or (
                pointer in self.doomed and not self.holds.get(pointer, {}).get(pid)):
            raise_for(WinError.ERROR_INVALID_HANDLE, f"buffer {pointer:#x} is gone")
        self.pins.setdefault(pointer, []).append(now + PIN_SECONDS)
        self.pin_deadline = min(self.pin_deadline, now + PIN_SECONDS)

    def housekeeping(self, now):
        """Let pins lapse, and release the large-region cache once it has sat unused long
        enough. Returns the seconds until it should be called again, or None."""
        if now >= self.pin_deadline:  # some pin lapses: walk them (not on every loop)
            for value, pins in list(self.pins.items()):
                pins[:] = [expiry for expiry in pins if expiry > now]
                if not pins:
                    del self.pins[value]
                    if value in self.doomed:
                        self._bury(value)
            self.pin_deadline = min((min(pins) for pins in self.pins.values()), default=float("inf"))
        due = [self.pin_deadline - now] if self.pins else []
        if self.heap.purge_due is not None:  # (on the heap's own clock)
            if time.monotonic() >= self.heap.purge_due:
                self.heap.purge_when_idle()
            if self.heap.purge_due is not None:
                due.append(self.heap.purge_due - time.monotonic())
        if not self.heap.large_cache:
            self.cached_since = None
        else:
            if self.cached_since is None or self.heap.large_cache_uses != self.cache_uses_seen:
                self.cached_since = now  # unused since now: a cache in use is kept
                self.cache_uses_seen = self.heap.large_cache_uses
            if now - self.cached_since >= LARGE_CACHE_SECONDS:
                self.release_cache()
            else:
                due.append(self.cached_since + LARGE_CACHE_SECONDS - now)
        return min(due) if due else None

    def release_cache(self):
        """Give back the freed large regions kept for reuse (under commit pressure, or when
        they sat unused); returns the bytes they held."""
        self.cached_since = None
        return self.heap.flush_large_cache()

    # ---- the clipboard's objects (daemon/clipboard.py) ---------------------------------------

    def clipboard_take(self, pid, handle):
        """SetClipboardData hands `handle` to the clipboard: a live global object with data,
        the caller's or shared (a discarded or empty moveable one is refused, CB-28; so is
        anything else, CB-29, and another process's object: a handle of its own on Windows). No
        process owns it any more and the setter's holds and locks on it go: it may not touch
        it after (CB-37), and it outlives its maker."""
        entry = self.table.entries.get(handle)
        if (handle not in self.serials or handle in self.doomed or handle in self.clipboard
                or (entry is not None and not entry.pointer)):
            raise_for(WinError.ERROR_INVALID_HANDLE, f"{handle:#x} is no global object with data the clipboard can take")
        if self.owners.get(handle, pid) != pid:  # another process's object is not this one's to give
            raise_for(WinError.ERROR_INVALID_HANDLE, f"{handle:#x} belongs to another process")
        self.owners.pop(handle, None)
        self._let_go(pid, handle)
        self.clipboard.add(handle)

    def clipboard_alloc(self, data):
        """A GMEM_FIXED object of the clipboard's own holding `data` (a synthesized format,
        CB-36)."""
        value = self.table.alloc(0, len(data))
        self.serials[value] = next(self._serial)
        self.heap.memory[value:value + len(data)] = data
        self.clipboard.add(value)
        return value

    def clipboard_data(self, handle):
        """The bytes of an object the clipboard holds, in place."""
        entry = self.table.entries.get(handle)
        pointer = entry.pointer if entry is not None else handle
        return self.heap.memory[pointer:pointer + self.table.size(handle)] if pointer else memoryview(b"")

    def clipboard_free(self, handle):
        """The clipboard lets go (a format replaced or emptied): the object goes, once no
        process holds it locked."""
        self.clipboard.discard(handle)
        self.free(SYSTEM, handle)

    def release_owner(self, pid):
        """A process is gone: its holds and locks go, and so does every unshared object it
        owned, unless another process holds it or a copy is on its way. Returns how many
        objects it owned."""
        for table in (self.holds, self.locks):
            for value in [v for v, counts in table.items() if pid in counts]:
                del table[value][pid]
                if not table[value]:
                    del table[value]
                if value in self.doomed:
                    self._bury(value)
        self.spans.pop(pid, None)
        self.span_starts.pop(pid, None)
        mine = [value for value, owner in self.owners.items() if owner == pid]
        for value in mine:
            del self.owners[value]
            if value in self.holds or value in self.locks or self.pins.get(value):
                self.doomed.add(value)
            else:
                self._bury(value)
        return len(mine)

    def check(self):
        """The global heap's and the handle table's walks, and: every object with a record
        is live, every doomed one is still held or pinned, and each process's spans are
        exactly what its holds and locks open."""
        self.heap.check()
        self.table.check()
        problems = []
        dead = [v for v in self.serials if v not in self.table.entries and not self.table.is_block(v)]
        if dead:  # (and the walk below would stumble on them)
            raise RuntimeError(f"global memory inconsistent: records of freed objects {dead[:5]}")
        for table in (self.owners, self.holds, self.locks, self.pins):
            if set(table) - set(self.serials):
                problems.append(f"records of objects with no serial {sorted(set(table) - set(self.serials))[:5]}")
        if any(not (v in self.holds or v in self.locks or self.pins.get(v)) for v in self.doomed):
            problems.append("a doomed object nobody holds")
        if self.doomed & set(self.owners):
            problems.append("a doomed object has an owner")
        if self.clipboard - set(self.serials) or self.clipboard & (self.doomed | set(self.owners)):
            problems.append("a clipboard object is gone, doomed or owned")
        expected = {}
        for table, locked in ((self.holds, False), (self.locks, True)):
            for value, counts in table.items():
                for pid, n in counts.items():
                    for start, end, prot in self._spans_of(value, locked):
                        span = expected.setdefault(pid, {}).setdefault(start, [end, 0, prot])
                        span[1] += n
        if expected != {pid: spans for pid, spans in self.spans.items() if spans}:
            problems.append("the processes' spans differ from their holds")
        if any(sorted(self.spans.get(pid, {})) != starts for pid, starts in self.span_starts.items()):
            problems.append("span starts out of order")
        if problems:
            raise RuntimeError("global memory inconsistent: " + "; ".join(problems))
        return {"global_objects": self.live_objects}
