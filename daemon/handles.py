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
"""

from shmheap.constants import GMEM_DDESHARE, GMEM_MODIFY, PAGE_READWRITE
from shmheap.errors import WinError, raise_for
from shmheap.heap import Heap, PageSource, heap_layout
from shmheap.moveable import ADDRESS_MASK, GLOBAL, MoveableTable
from shmheap.segment import PAGE_SIZE, pages_in

from .pagetable import SYSTEM

# The global heap's starting commit, which it keeps when empty: room for a 64 KiB slab of
# page-sized buffers and a few small ones, so sharing one buffer at a time does not commit and
# decommit a slab per buffer.
GLOBAL_HEAP_INITIAL = 192 * 1024
MAX_BATCH = 100_000
# A freed large object's region (up to this size) stays committed for the next one, for at
# most LARGE_CACHE_SECONDS unused, or until a commit needs the memory (PageTable.reclaim).
LARGE_CACHE_LIMIT = 256 * 2**20
LARGE_CACHE_SECONDS = 2.0


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
        source = self.source = PageTablePages(pagetable, SYSTEM, memory, shared=True)
        self.heap = Heap(source, source.allocate(reserve, commit), reserve, commit,
                         large_cache_limit=LARGE_CACHE_LIMIT)
        self.cached_since = None
        self.table = MoveableTable(self.heap, GLOBAL, stamped=True)
        self.owners = {}  # object (moveable handle or fixed pointer) -> pid; shared ones absent

    @property
    def live_objects(self):
        return self.heap.live - len(self.table.chunks)  # the handle table's own blocks aside

    @property
    def shared_objects(self):
        """Objects no process owns (GMEM_SHARE / GMEM_DDESHARE): they outlive their makers."""
        moveable_with_data = sum(1 for entry in self.table.entries.values() if entry.pointer)
        return self.live_objects - moveable_with_data + len(self.table.entries) - len(self.owners)

    def alloc(self, pid, flags, size):
        value = self.table.alloc(flags, size)
        if not flags & GMEM_DDESHARE:
            self.owners[value] = pid
        self._hand_out(value)
        return value

    def _hand_out(self, value):
        """The caller gets a pointer (a fixed object's, or a moveable one's slot): its reply
        opens the pages to it (PageTable.touch)."""
        pointer = value & ADDRESS_MASK
        if self.table.is_block(pointer):
            self.source.pagetable.touch(pointer, pointer + max(self.heap.size(pointer), 1))
        else:
            self.source.pagetable.touch(pointer, pointer + 8)

    def alloc_many(self, pid, flags, sizes):
        """Allocate every size or none: returns the handles, or raises the first failure."""
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
        return made

    def free(self, pid, handle):
        self.table.free(handle)
        self.owners.pop(handle, None)

    def realloc(self, pid, handle, size, flags):
        value = self.table.realloc(handle, size, flags)
        self._hand_out(value)
        if value != handle:  # a fixed block moved, or became a moveable object
            owner = self.owners.pop(handle, None)
            if owner is not None:
                self.owners[value] = owner
        if flags & GMEM_MODIFY and flags & GMEM_DDESHARE:
            self.owners.pop(value, None)  # shared from now on
        return value

    def size(self, pid, handle):
        return self.table.size(handle)

    def lock(self, pid, handle):
        pointer = self.table.lock(handle)
        self._hand_out(pointer)
        return pointer

    def unlock(self, pid, handle):
        return self.table.unlock(handle)

    def flags(self, pid, handle):
        return self.table.flags(handle)

    def handle(self, pid, pointer):
        return self.table.handle(pointer)

    def compact(self, pid, min_free=0):
        """GlobalCompact; `min_free` is only a hint on Windows too, and is not used."""
        return self.table.compact()

    def housekeeping(self, now):
        """Release the large-region cache once it has sat unused long enough. Returns the
        seconds until it should be called again, or None when there is nothing to watch."""
        if not self.heap.large_cache:
            self.cached_since = None
            return None
        if self.cached_since is None:
            self.cached_since = now
        if now - self.cached_since >= LARGE_CACHE_SECONDS:
            self.release_cache()
            return None
        return self.cached_since + LARGE_CACHE_SECONDS - now

    def release_cache(self):
        """Give back the freed large regions kept for reuse (under commit pressure, or when
        they sat unused); returns the bytes they held."""
        self.cached_since = None
        return self.heap.flush_large_cache()

    def release_owner(self, pid):
        """Free every unshared object of a process that is gone; returns how many."""
        mine = [value for value, owner in self.owners.items() if owner == pid]
        for value in mine:
            self.free(pid, value)
        return len(mine)

    def check(self):
        """The global heap's and the handle table's walks, and: every owned object is live."""
        self.heap.check()
        self.table.check()
        dead = [value for value in self.owners
                if value not in self.table.entries and not self.table.is_block(value)]
        if dead:
            raise RuntimeError(f"global memory inconsistent: owners of freed objects {dead[:5]}")
        return {"global_objects": self.live_objects}
