"""Global memory: GlobalAlloc's objects, in the daemon's global heap, valid in every process.

The global heap is the same block allocator the clients use (shmheap/heap.py), run here over
the page table; its regions belong to the system and are shared, so every process can view
its blocks. Moveable objects have stamped handles (shmheap/moveable.py): a freed handle is
stale forever, never taken for a newer object. Lock counts live here, so they are the same in
every process.

Ownership, in the spirit of Win16: an object belongs to the process that allocated it and is
freed when that process goes, unless it was allocated (or later modified) with
GMEM_DDESHARE / GMEM_SHARE, in which case it lives until some process frees it. Any process
may lock, read, write, resize or free any object whose handle it has been given.
"""

from shmheap.constants import GMEM_DDESHARE, GMEM_MODIFY
from shmheap.errors import ShmheapError, WinError
from shmheap.heap import Heap, heap_layout
from shmheap.moveable import GLOBAL, MoveableTable

from .heaps import PageTablePages
from .pagetable import SYSTEM

# The global heap's starting commit, which it keeps when empty: room for a 64 KiB run of
# page-sized buffers and a few small ones, so sharing one buffer at a time does not commit and
# decommit a run per buffer.
GLOBAL_HEAP_INITIAL = 192 * 1024
MAX_BATCH = 100_000
# A freed large object's region (up to this size) stays committed for the next one, for at
# most LARGE_CACHE_SECONDS unused, or until a commit needs the memory (PageTable.reclaim).
LARGE_CACHE_LIMIT = 256 * 2**20
LARGE_CACHE_SECONDS = 2.0


class GlobalMemory:
    def __init__(self, pagetable, memory):
        reserve, commit, _ = heap_layout(GLOBAL_HEAP_INITIAL, 0)
        source = PageTablePages(pagetable, SYSTEM, memory, kind="global", shared=True)
        base = source.reserve(reserve)
        source.commit(base, commit)
        self.heap = Heap(source, base, reserve, commit)
        self.heap.large_cache_limit = LARGE_CACHE_LIMIT
        pagetable.reclaim = self.heap.flush_large_cache
        self.cached_since = None
        self.table = MoveableTable(self.heap, GLOBAL, stamped=True)
        self.owners = {}  # object (moveable handle or fixed pointer) -> pid; shared ones absent

    def alloc(self, pid, flags, size):
        value, error = self.table.alloc(flags, size)
        if value and not flags & GMEM_DDESHARE:
            self.owners[value] = pid
        return value, error

    def alloc_many(self, pid, flags, sizes):
        """Allocate every size or none: returns the handles, or raises the first failure."""
        if len(sizes) > MAX_BATCH:
            raise ShmheapError(WinError.ERROR_INVALID_PARAMETER, f"at most {MAX_BATCH} per batch")
        made = []
        for size in sizes:
            value, error = self.alloc(pid, flags, size)
            if not value:
                for handle in made:
                    self.free(pid, handle)
                raise ShmheapError(error or WinError.ERROR_NOT_ENOUGH_MEMORY, "batch allocation failed")
            made.append(value)
        return made

    def free(self, pid, handle):
        value, error = self.table.free(handle)
        if value == 0:
            self.owners.pop(handle, None)
        return value, error

    def realloc(self, pid, handle, size, flags):
        value, error = self.table.realloc(handle, size, flags)
        if value and value != handle:  # a fixed block moved, or became a moveable object
            owner = self.owners.pop(handle, None)
            if owner is not None:
                self.owners[value] = owner
        if value and flags & GMEM_MODIFY and flags & GMEM_DDESHARE:
            self.owners.pop(value, None)  # shared from now on
        return value, error

    def housekeeping(self, now):
        """Release the large-region cache once it has sat unused long enough. Returns the
        seconds until it should be called again, or None when there is nothing to watch."""
        if not self.heap.large_cache:
            self.cached_since = None
            return None
        if self.cached_since is None:
            self.cached_since = now
        if now - self.cached_since >= LARGE_CACHE_SECONDS:
            self.heap.flush_large_cache()
            self.cached_since = None
            return None
        return self.cached_since + LARGE_CACHE_SECONDS - now

    def release_owner(self, pid):
        """Free every unshared object of a process that is gone; returns how many."""
        mine = [value for value, owner in self.owners.items() if owner == pid]
        for value in mine:
            self.free(pid, value)
        return len(mine)

    def compact(self, pid):
        """GlobalCompact: move every unlocked moveable object as low as the heap allows, so
        free space coalesces; contents are copied, handles stay. Returns the largest free
        range after giving unused pages back."""
        table, heap = self.table, self.heap
        for handle, entry in sorted(table.entries.items(), key=lambda item: item[1].pointer):
            if entry.locks or not entry.pointer:
                continue
            size = heap.size(entry.pointer)
            new = heap.alloc_below(size, entry.pointer)
            if new is not None:
                heap.memory[new:new + size] = heap.memory[entry.pointer:entry.pointer + size]
                old = entry.pointer
                table._set_pointer(handle, entry, new)
                heap.free(old)
        return heap.compact()
