"""The heap registry: every heap a process created, with the regions it holds.

The block allocator itself runs in the client (shmheap/heap.py); the daemon only hands out
the heap's regions and commits, and keeps this registry so that `shmheap status` can list
heaps, a heap handle of another process is refused, and a dead process's heaps go with it.
What lies inside a heap (its blocks and free ranges) only its owner knows: the owner reports
it now and then (`report`), and `shmheap stat` shows the latest report with its age.
A heap's handle is the base of its first region (so it is 64 KiB aligned, HC-01).
"""

import time

from shmheap.constants import HEAP_CREATE_ENABLE_EXECUTE, PAGE_EXECUTE_READWRITE, PAGE_READWRITE
from shmheap.errors import WinError, raise_for
from shmheap.heap import ALIGN  # the smallest extent of a block
from shmheap.segment import PAGE_SIZE



class HeapRecord:
    __slots__ = ("handle", "name", "owner", "flags", "maximum", "created", "regions", "protect", "session", "usage")

    def __init__(self, handle, name, owner, flags, maximum, protect, session=None):
        self.handle = handle
        self.session = session  # the connection that made it: its allocator state lives there
        self.name = name
        self.owner = owner
        self.flags = flags
        self.maximum = maximum
        self.created = time.time()
        self.regions = {handle}
        self.protect = protect
        self.usage = None  # the owner's latest report (Heaps.report)


class Heaps:
    def __init__(self, pagetable):
        self.pagetable = pagetable
        self.by_handle = {}

    def create(self, owner, name, flags, reserve, commit, maximum, session=None):
        if not name:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "a heap needs a name")
        if any(h.owner == owner and h.name == name for h in self.by_handle.values()):
            raise_for(WinError.ERROR_ALREADY_EXISTS, f"this process has a heap named {name!r}")
        if commit > reserve or not reserve:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "commit must fit the reservation")
        protect = PAGE_EXECUTE_READWRITE if flags & HEAP_CREATE_ENABLE_EXECUTE else PAGE_READWRITE
        region = self.pagetable.allocate(owner, reserve, protect, commit, kind="heap")
        record = HeapRecord(region.base, name, owner, flags, maximum, protect, session)
        self.by_handle[record.handle] = record
        return record.handle

    def _own(self, owner, handle):
        record = self.by_handle.get(handle)
        if record is None or record.owner != owner:
            raise_for(WinError.ERROR_INVALID_HANDLE, f"no heap {handle:#x} in this process")
        return record

    def _pages(self, record, address, size):
        """The heap's region holding [address, address+size) and its page range."""
        region = self.pagetable.region_at(address)
        if region is None or region.base not in record.regions or address + size > region.end:
            raise_for(WinError.ERROR_INVALID_ADDRESS, f"{address:#x} is not in this heap")
        if address % PAGE_SIZE or size % PAGE_SIZE or not size:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "heap commits are whole pages")
        first = (address - region.base) // PAGE_SIZE
        return region, first, first + size // PAGE_SIZE

    def extend(self, owner, handle, size):
        """Reserve another region for the heap (a growth region or a large block)."""
        record = self._own(owner, handle)
        region = self.pagetable.reserve(owner, size, record.protect, kind="heap")
        record.regions.add(region.base)
        return region.base

    def commit(self, owner, handle, address, size):
        record = self._own(owner, handle)
        region, first, last = self._pages(record, address, size)
        self.pagetable.commit(region, first, last, record.protect)

    def decommit(self, owner, handle, address, size):
        region, first, last = self._pages(self._own(owner, handle), address, size)
        self.pagetable.decommit(region, first, last)

    def release(self, owner, handle, base):
        record = self._own(owner, handle)
        if base == record.handle or base not in record.regions:
            raise_for(WinError.ERROR_INVALID_ADDRESS, f"{base:#x} is no extra region of this heap")
        record.regions.discard(base)
        self.pagetable.release(self.pagetable.region_at(base))

    def report(self, owner, handle, blocks, free, largest_free, when_ms):
        """The owner says what its heap held at `when_ms` (ms since the epoch: a report may
        wait for a call to carry it): live blocks, committed free bytes, the largest free
        range. Kept as told (the owner alone knows); figures that cannot be true of the heap
        are refused."""
        record = self._own(owner, handle)
        committed = sum(self.pagetable.region_at(base).committed for base in record.regions)
        if largest_free > free or free > committed or blocks * ALIGN + free > committed:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "a heap report larger than the heap")
        record.usage = {"blocks": blocks, "free": free,
                        "largest_free": largest_free, "as_of": min(when_ms / 1000, time.time())}

    def destroy(self, owner, handle):
        self._drop(self._own(owner, handle))

    def _drop(self, record):
        del self.by_handle[record.handle]
        for base in sorted(record.regions):
            self.pagetable.release(self.pagetable.region_at(base))

    def release_session(self, session):
        """A connection closed while its process lives on: the heaps made through it go (no
        other connection holds their allocator state, so nothing could use them again).
        Returns how many."""
        mine = [record for record in self.by_handle.values() if record.session is session]
        for record in mine:
            self._drop(record)
        return len(mine)

    def release_owner(self, owner):
        """Destroy every heap of a process that is gone; returns how many."""
        mine = [record for record in self.by_handle.values() if record.owner == owner]
        for record in mine:
            self._drop(record)
        return len(mine)

    def list(self):
        rows = []
        for record in self.by_handle.values():
            regions = [self.pagetable.region_at(base) for base in record.regions]
            rows.append({"handle": record.handle, "name": record.name, "owner": record.owner,
                         "flags": record.flags, "maximum": record.maximum,
                         "reserved": sum(r.size for r in regions),
                         "committed": sum(r.committed for r in regions),
                         "created": record.created, "usage": record.usage})
        return rows

    def check(self):
        """Walk the registry; raise RuntimeError naming each broken invariant: every region of
        a heap is a live heap region of the heap's owner, starting where the table says, no
        region is in two heaps, every heap region of the page table is in a heap, and names
        are unique per process."""
        problems = []
        seen = {}
        for handle, record in self.by_handle.items():
            if handle != record.handle or handle not in record.regions:
                problems.append(f"heap {handle:#x} is not filed under its first region")
            for base in record.regions:
                region = self.pagetable.region_at(base)
                if region is None or region.base != base or region.kind != "heap" or region.owner != record.owner:
                    problems.append(f"heap {handle:#x} lists {base:#x}, no heap region of its owner")
                if base in seen:
                    problems.append(f"region {base:#x} is in heaps {seen[base]:#x} and {handle:#x}")
                seen[base] = handle
        heap_regions = {region.base for region in self.pagetable.regions_in_order() if region.kind == "heap"}
        if heap_regions != set(seen):
            problems.append(f"heap regions of no heap: {sorted(heap_regions - set(seen))[:5]}")
        names = [(record.owner, record.name) for record in self.by_handle.values()]
        if len(names) != len(set(names)):
            problems.append("two heaps of one process share a name")
        if problems:
            raise RuntimeError("heap registry inconsistent: " + "; ".join(problems[:10]))
        return {"heaps": len(self.by_handle)}
