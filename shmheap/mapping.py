"""The mapping: this process's view of one segment, and what it may touch there: its MMU.

Theory of operation
-------------------
A client maps the segment at its base with no access at all, then opens exactly what the
daemon says this process may touch: its own committed pages with their protection, the views
of sections it maps, the global memory it uses. Every reply of the daemon may carry *access
changes* for the caller, runs of [address, length, prot] computed from the daemon's page
table after the request (protocol.py); the connection hands them here and `apply` makes them
true with mprotect before the call returns. So a page is accessible exactly while the daemon
says so: a view or a pointer kept past VirtualFree, a write to a page made read-only, a touch
of another process's memory or of a guard page is an access violation (SIGSEGV), as on
Windows, and no stale write can bring back a page the daemon decommitted.

The mapping also remembers what it allows, as page runs (segment.Runs), so a checked view
(`Client.view`) answers without a round trip; only a view of memory this process was never
told about asks the daemon, once.

File views are the one exception to "the segment is mapped everywhere": a view of a
file-backed section is the file itself, mapped over the section's region (reserved in the
segment, never committed there), the same address in every process that maps it. The mapping
keeps them (`file_views`), the one place that tells file pages from segment pages: it maps
the file over the region before the daemon's grant opens it (`map_file`), and the segment
back when the process's last view of it goes (`unmap_file`), so the address space is the
segment's again and tmpfs never holds a byte of a file.

One Mapping per segment per process, whatever number of clients use it (`acquire` /
`release` count them). In a forked child every page is closed again: the child is another
process, which holds nothing until its own connection says so.
"""

import mmap
import os
from bisect import bisect_right

from . import segment
from .segment import PAGE_SHIFT, PAGE_SIZE, Runs

NONE, READ, WRITE = 0, mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE

_mappings = {}  # (segment name, base) -> Mapping


class Mapping(Runs):
    __slots__ = ("name", "base", "size", "users", "last_run", "file_views", "views")

    def __init__(self, name, base, size, owner=None):
        super().__init__(size >> PAGE_SHIFT, NONE)
        segment.map_at(name, base, size, NONE, owner=owner)
        self.name = name
        self.base = base
        self.size = size
        self.users = 0
        # The last run `allows` found, (start address, end address, prot): a view inside it is
        # checked with two compares (Client.view reads it directly).
        self.last_run = (0, 0, NONE)
        self.file_views = {}  # region base -> length: file sections mapped over the segment here
        # The process's views of sections, as the daemon counts them (per process, whatever
        # client mapped them): view base -> [section handle, largest size, count].
        self.views = {}

    def map_file(self, address, length, fd):
        """Map the file `fd` over [address, address+length) (a file section's region, not
        yet open to this process), unless it is mapped there already; no access until the
        daemon's grant. True if it mapped it now."""
        if address in self.file_views:
            return False
        try:
            segment.map_file_over(address, length, fd, 0)
        except OSError:
            # MAP_FIXED may have unmapped the range before the file system refused: the
            # segment goes back there, or the address space would have a hole.
            segment.map_segment_over(self.name, self.base, address, length)
            raise
        self.file_views[address] = length
        self.set_pages((address - self.base) >> PAGE_SHIFT, (address - self.base + length) >> PAGE_SHIFT, NONE)
        self.last_run = (0, 0, NONE)
        return True

    def unmap_file(self, address):
        """The process's last view of the file section at `address` is gone (its pages closed
        already): the segment goes back over the region."""
        length = self.file_views.pop(address, None)
        if length is not None:
            segment.map_segment_over(self.name, self.base, address, length)

    def file_view_at(self, address):
        """(region base, length) of the file view holding `address`, or None."""
        for start, length in self.file_views.items():
            if start <= address < start + length:
                return start, length
        return None

    def apply(self, changes):
        """Make the daemon's access changes true: [[address, length, prot], ...], in order.
        The runs take them all first; then only the pages whose protection differs from
        what it was before the batch are given it, so a batch that closes and reopens the
        same pages (a hold let go, then taken again), or that says what is true already (a
        close this process made itself), costs no page-table walk."""
        ranges = sorted({((address - self.base) >> PAGE_SHIFT, (address - self.base + length) >> PAGE_SHIFT)
                         for address, length, _ in changes})
        before = [list(self.runs(first, last)) for first, last in ranges]
        for address, length, prot in changes:
            first = (address - self.base) >> PAGE_SHIFT
            self.set_pages(first, first + (length >> PAGE_SHIFT), prot)
        for (first, last), old in zip(ranges, before):
            for start, stop, prot in _differences(old, list(self.runs(first, last))):
                segment.protect(self.base + (start << PAGE_SHIFT), (stop - start) << PAGE_SHIFT, prot)
        self.last_run = (0, 0, NONE)

    def allows(self, address, size):
        """What every byte of [address, address+size) allows: WRITE, READ or NONE."""
        start, end, prot = self.last_run
        if start <= address and address + size <= end:
            return prot
        if size <= 0 or address < self.base or address + size > self.base + self.size:
            return NONE
        first = (address - self.base) >> PAGE_SHIFT
        last = (address + size - self.base + PAGE_SIZE - 1) >> PAGE_SHIFT
        i = bisect_right(self.starts, first) - 1
        stop = self.starts[i + 1] if i + 1 < len(self.starts) else self.pages
        if last <= stop:  # one run holds it all: remember it, so a view nearby costs two compares
            self.last_run = (self.base + (self.starts[i] << PAGE_SHIFT), self.base + (stop << PAGE_SHIFT),
                          self.values[i])
            return self.values[i]
        return min(prot for _, _, prot in self.runs(first, last))

    def close(self, start, end):
        """No access to the pages of [start, end) (page-aligned) from now on: what this
        process gives up by a request it does not wait for (Connection.post)."""
        self.set_pages((start - self.base) >> PAGE_SHIFT, (end - self.base) >> PAGE_SHIFT, NONE)
        segment.protect(start, end - start, NONE)
        self.last_run = (0, 0, NONE)

    def close_all(self):
        """No access to anything (a forked child starts so); file views give way to the
        segment."""
        segment.protect(self.base, self.size, NONE)
        for address in list(self.file_views):
            self.unmap_file(address)
        self.views.clear()
        self.starts, self.values = [0], [NONE]
        self.last_run = (0, 0, NONE)


def _differences(old, new):
    """The runs of `new` (start, stop, value) over the pages where its value differs from
    `old`'s; both cover the same pages, in order."""
    out = []
    i = 0
    for start, stop, value in new:
        while start < stop:
            while old[i][1] <= start:
                i += 1
            end = min(stop, old[i][1])
            if old[i][2] != value:
                if out and out[-1][1] == start and out[-1][2] == value:
                    out[-1] = (out[-1][0], end, value)
                else:
                    out.append((start, end, value))
            start = end
    return out


def acquire(name, base, size, owner=None):
    """The mapping of segment `name` at `base` in this process, made on first use (of a
    segment `owner` owns: the daemon's uid)."""
    mapping = _mappings.get((name, base))
    if mapping is None:
        mapping = _mappings[(name, base)] = Mapping(name, base, size, owner)
    mapping.users += 1
    return mapping


def release(mapping):
    """One user fewer; the last unmaps the segment."""
    mapping.users -= 1
    if not mapping.users:
        del _mappings[(mapping.name, mapping.base)]
        segment.unmap(mapping.base, mapping.size)


def _after_fork_in_child():
    for mapping in _mappings.values():
        mapping.close_all()


os.register_at_fork(after_in_child=_after_fork_in_child)
