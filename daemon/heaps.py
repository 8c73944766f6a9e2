"""The heap registry: every heap a process created, with the regions it holds.

The block allocator itself runs in the client (shmheap/heap.py); the daemon only hands out
the heap's regions and commits, and keeps this registry so that `shmheap status` can list
heaps, a heap handle of another process is refused, and a dead process's heaps go with it.
A heap's handle is the base of its first region (so it is 64 KiB aligned, HC-01).
"""

import time

from shmheap.constants import HEAP_CREATE_ENABLE_EXECUTE, PAGE_EXECUTE_READWRITE, PAGE_READWRITE
from shmheap.errors import ShmheapError, WinError

from .pagetable import PAGE_SIZE


class HeapRecord:
    __slots__ = ("handle", "name", "owner", "flags", "maximum", "created", "regions", "protect")

    def __init__(self, handle, name, owner, flags, maximum, protect):
        self.handle = handle
        self.name = name
        self.owner = owner
        self.flags = flags
        self.maximum = maximum
        self.created = time.time()
        self.regions = {handle}
        self.protect = protect


class Heaps:
    def __init__(self, pagetable):
        self.pagetable = pagetable
        self.by_handle = {}

    def create(self, owner, name, flags, reserve, commit, maximum):
        if not name:
            raise ShmheapError(WinError.ERROR_INVALID_PARAMETER, "a heap needs a name")
        if any(h.owner == owner and h.name == name for h in self.by_handle.values()):
            raise ShmheapError(WinError.ERROR_ALREADY_EXISTS, f"this process has a heap named {name!r}")
        if commit > reserve or not reserve:
            raise ShmheapError(WinError.ERROR_INVALID_PARAMETER, "commit must fit the reservation")
        protect = PAGE_EXECUTE_READWRITE if flags & HEAP_CREATE_ENABLE_EXECUTE else PAGE_READWRITE
        region = self.pagetable.reserve(owner, reserve, protect, kind="heap")
        try:
            self.pagetable.commit(region, 0, -(-commit // PAGE_SIZE), protect)
        except ShmheapError:
            self.pagetable.release(region)
            raise
        record = HeapRecord(region.base, name, owner, flags, maximum, protect)
        self.by_handle[record.handle] = record
        return record.handle

    def _own(self, owner, handle):
        record = self.by_handle.get(handle)
        if record is None or record.owner != owner:
            raise ShmheapError(WinError.ERROR_INVALID_HANDLE, f"no heap {handle:#x} in this process")
        return record

    def _region(self, record, address, size):
        region = self.pagetable.region_at(address)
        if region is None or region.base not in record.regions or address + size > region.end:
            raise ShmheapError(WinError.ERROR_INVALID_ADDRESS, f"{address:#x} is not in this heap")
        if address % PAGE_SIZE or size % PAGE_SIZE or not size:
            raise ShmheapError(WinError.ERROR_INVALID_PARAMETER, "heap commits are whole pages")
        return region

    def extend(self, owner, handle, size):
        """Reserve another region for the heap (a growth segment or a large block)."""
        record = self._own(owner, handle)
        region = self.pagetable.reserve(owner, size, record.protect, kind="heap")
        record.regions.add(region.base)
        return region.base

    def commit(self, owner, handle, address, size):
        record = self._own(owner, handle)
        region = self._region(record, address, size)
        first = (address - region.base) // PAGE_SIZE
        self.pagetable.commit(region, first, first + size // PAGE_SIZE, record.protect)

    def decommit(self, owner, handle, address, size):
        record = self._own(owner, handle)
        region = self._region(record, address, size)
        first = (address - region.base) // PAGE_SIZE
        self.pagetable.decommit(region, first, first + size // PAGE_SIZE)

    def release(self, owner, handle, base):
        record = self._own(owner, handle)
        if base == record.handle or base not in record.regions:
            raise ShmheapError(WinError.ERROR_INVALID_ADDRESS, f"{base:#x} is no extra region of this heap")
        record.regions.discard(base)
        self.pagetable.release(self.pagetable.regions[base])

    def destroy(self, owner, handle):
        record = self._own(owner, handle)
        self._drop(record)

    def _drop(self, record):
        del self.by_handle[record.handle]
        for base in sorted(record.regions):
            self.pagetable.release(self.pagetable.regions[base])

    def release_owner(self, owner):
        """Destroy every heap of a process that is gone; returns how many."""
        mine = [record for record in self.by_handle.values() if record.owner == owner]
        for record in mine:
            self._drop(record)
        return len(mine)

    def list(self):
        rows = []
        for record in self.by_handle.values():
            regions = [self.pagetable.regions[base] for base in record.regions]
            rows.append({"handle": record.handle, "name": record.name, "owner": record.owner,
                         "flags": record.flags, "maximum": record.maximum,
                         "reserved": sum(r.size for r in regions),
                         "committed": sum(r.committed_pages for r in regions) * PAGE_SIZE,
                         "created": record.created})
        return rows


class PageTablePages:
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
        region = self.pagetable.reserve(self.owner, size, self.protect, kind=self.kind)
        region.shared = self.shared
        return region.base

    def _pages(self, address, size):
        region = self.pagetable.region_at(address)
        first = (address - region.base) // PAGE_SIZE
        return region, first, first + -(-size // PAGE_SIZE)

    def commit(self, address, size):
        region, first, last = self._pages(address, size)
        self.pagetable.commit(region, first, last, self.protect)

    def decommit(self, address, size):
        region, first, last = self._pages(address, size)
        self.pagetable.decommit(region, first, last)

    def release(self, base):
        self.pagetable.release(self.pagetable.regions[base])
