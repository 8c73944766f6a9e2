"""The page table: the VirtualAlloc layer, owned by the daemon.

Theory of operation
-------------------
The segment is one address space shared by every process. Its usable part, [start, end) (the
addresses above its header, up to base + size), is cut into *regions* (reservations). A region starts on a 64 KiB granule and ends on a page;
the granules it touches belong to it alone, so the tail of its last granule is free but cannot
be reserved (as on Windows, where a granule holds at most one allocation).

Three structures describe it, and `check()` proves they agree:

    free extents   sorted, granule-aligned, coalesced [start, end) ranges no region touches.
                   Reservation is first fit, from the bottom or (MEM_TOP_DOWN) from the top.
    regions        base -> Region, plus `bases`, sorted, to find the region of an address by
                   bisection. A region knows its owner (a pid; 0 is the system), its kind, the
                   protection given at reservation, and its pages as *runs*: parallel lists
                   `starts`/`values` where values[i] holds for pages starts[i] .. starts[i+1]-1.
                   A value is 0 for a reserved page, else the committed page's protection.
                   Neighbouring runs always differ, so a region of one state is one run and
                   every operation costs O(runs touched), not O(pages).
    commit totals  bytes committed overall and per owner, checked against the two limits
                   before anything is committed.

Commit is real: the backing `posix_fallocate`s the pages before the table says committed, so a
commit that cannot be backed fails with ERROR_COMMITMENT_LIMIT now rather than a SIGBUS later.
Decommit is real too: `MADV_REMOVE` punches the pages out of tmpfs, and a later commit reads
zeros. Every mutation validates first and changes state only once it cannot fail (or undoes
its partial work), so a refused call leaves the table exactly as it was.

Win32 argument semantics (flags, rounding, error codes) live in `virtual_*` at the bottom,
following ../shared/reference/win32_semantics.md rows VA-*, VF-*, VQ-*, VP-*.
"""

import errno
import mmap
import os
from bisect import bisect_left, bisect_right

from shmheap.constants import (
    AT_ROUND_TO_PAGE, MEM_COMMIT, MEM_DECOMMIT, MEM_FREE, MEM_LARGE_PAGES, MEM_MAPPED,
    MEM_PHYSICAL, MEM_PRIVATE, MEM_RELEASE, MEM_RESERVE, MEM_RESET, MEM_RESET_UNDO,
    MEM_TOP_DOWN, MEM_WRITE_WATCH, PAGE_BASE_MASK, PAGE_CACHE_MODIFIERS, PAGE_EXECUTE,
    PAGE_EXECUTE_READ, PAGE_EXECUTE_READWRITE, PAGE_GUARD, PAGE_NOACCESS, PAGE_NOCACHE,
    PAGE_READABLE, PAGE_READONLY, PAGE_READWRITE, PAGE_WRITABLE, PAGE_WRITECOMBINE,
)
from shmheap.errors import ShmheapError, WinError, raise_for
from shmheap import segment
from shmheap.segment import ALLOCATION_GRANULARITY, PAGE_SIZE, Runs, pages_in, round_down, round_up

GRANULE = ALLOCATION_GRANULARITY
RESERVED = 0  # run value of a reserved (uncommitted) page
SYSTEM = 0  # owner of regions no process owns (global heap, clipboard)

_BASE_PROTECTIONS = {PAGE_NOACCESS, PAGE_READONLY, PAGE_READWRITE, PAGE_EXECUTE,
                     PAGE_EXECUTE_READ, PAGE_EXECUTE_READWRITE}
_ALLOC_TYPES = MEM_COMMIT | MEM_RESERVE | MEM_RESET | MEM_RESET_UNDO | MEM_TOP_DOWN | MEM_WRITE_WATCH


class Backing:
    """The only code that calls posix_fallocate, madvise and fstat on the segment.

    Preconditions, checked by the page table before every call: address and length are
    page-aligned, non-zero and inside the segment, which this process maps at `base`; commit
    is only asked of pages the table holds reserved, decommit only of pages it holds
    committed.
    """

    def __init__(self, fd, base):
        self.fd = fd
        self.base = base

    def commit(self, address, length):
        """Allocate tmpfs pages for the range; raises OSError (ENOSPC) if they cannot be had."""
        os.posix_fallocate(self.fd, address - self.base, length)

    def decommit(self, address, length):
        """Punch the range out of tmpfs: its memory returns to the machine, its bytes read 0."""
        segment.remove(address, length)

    def resident_bytes(self):
        return os.fstat(self.fd).st_blocks * 512


class Region(Runs):
    """One reservation. Pages are runs; see the module docstring. Other layers read its
    fields; only the page table changes them."""

    __slots__ = ("base", "size", "owner", "kind", "alloc_protect", "shared", "viewers", "committed_pages")

    def __init__(self, base, size, owner, kind, alloc_protect):
        super().__init__(size // PAGE_SIZE, RESERVED)
        self.base = base
        self.size = size  # a multiple of PAGE_SIZE
        self.owner = owner
        self.kind = kind  # "private" (VirtualAlloc); later layers add their own
        self.alloc_protect = alloc_protect
        self.shared = False  # visible to every process (the global heap)
        self.viewers = None  # a section's: pid -> writable, for the processes with views (grant)
        self.committed_pages = 0

    @property
    def end(self):
        return self.base + self.size

    def count_committed(self, first, last):
        return sum(stop - start for start, stop, value in self.runs(first, last) if value != RESERVED)

    @property
    def committed(self):
        """Bytes committed in the region."""
        return self.committed_pages * PAGE_SIZE


class PageTable:
    def __init__(self, base, size, backing, commit_limit, process_commit_limit, reclaim=None,
                 shared_access=None):
        self.base = base  # where the segment is mapped
        self.start = base + segment.HEADER_SIZE  # the lowest address a region may have
        self.end = base + size
        self.backing = backing
        self.commit_limit = commit_limit
        self.process_commit_limit = process_commit_limit
        self.regions = {}
        self.bases = []
        self.free_starts = [self.start]
        self.free_ends = [self.end]
        self.committed = 0  # bytes, all owners
        self.committed_by_owner = {}
        self.regions_by_owner = {}
        # Called when a commit would pass the limit: gives back memory kept only as a cache
        # (the global heap's freed large regions); returns the bytes it freed.
        self.reclaim = reclaim or (lambda: 0)
        # (pid, start, end) -> access runs: what a process may touch in a shared region (the
        # global heap's: the pages of what it holds). Without it, all committed pages.
        self.shared_access = shared_access
        # Address ranges whose access may have changed since `take_touched`: what the reply
        # to the current request must bring the caller's mapping up to date on.
        self.touched = []

    # ---- address-space primitives ---------------------------------------------------------

    def region_at(self, address):
        """The region holding `address`, or None."""
        i = bisect_right(self.bases, address) - 1
        if i >= 0:
            region = self.regions[self.bases[i]]
            if address < region.end:
                return region
        return None

    def _find_free(self, span, top_down):
        ranges = zip(self.free_starts, self.free_ends)
        if top_down:
            ranges = reversed(list(ranges))
        for start, end in ranges:
            if end - start >= span:
                return end - span if top_down else start
        return None

    def _take(self, start, end):
        """Remove granule-aligned [start, end) from the free extent that holds it, or fail."""
        i = bisect_right(self.free_starts, start) - 1
        if i < 0 or end > self.free_ends[i]:
            raise_for(WinError.ERROR_INVALID_ADDRESS, "address range already reserved")
        free_start, free_end = self.free_starts[i], self.free_ends[i]
        pieces = [(s, e) for s, e in ((free_start, start), (end, free_end)) if e > s]
        self.free_starts[i:i + 1] = [s for s, _ in pieces]
        self.free_ends[i:i + 1] = [e for _, e in pieces]

    def _give(self, start, end):
        """Return granule-aligned [start, end) to the free extents, coalescing neighbours."""
        i = bisect_left(self.free_starts, start)
        if i > 0 and self.free_ends[i - 1] == start:
            i -= 1
            start = self.free_starts[i]
            del self.free_starts[i], self.free_ends[i]
        if i < len(self.free_starts) and self.free_starts[i] == end:
            end = self.free_ends[i]
            del self.free_starts[i], self.free_ends[i]
        self.free_starts.insert(i, start)
        self.free_ends.insert(i, end)

    def reserve(self, owner, size, protect, address=0, top_down=False, kind="private", shared=False):
        """Reserve a region of `size` bytes (rounded up to pages) at `address` (rounded down to
        a granule) or, with address 0, wherever first fit finds room. Returns the Region.
        A `shared` region is visible to every process (the global heap's)."""
        if address:
            base = round_down(address, GRANULE)
            end = round_up(address + size, PAGE_SIZE)
            if base < self.start or end > self.end:
                raise_for(WinError.ERROR_INVALID_PARAMETER, "address outside the user address space")
        else:
            size = round_up(size, PAGE_SIZE)
            if size > self.end - self.start:
                raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "larger than the address space")
            base = self._find_free(round_up(size, GRANULE), top_down)
            if base is None:
                raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "no free address range that large")
            end = base + size
        self._take(base, round_up(end, GRANULE))
        region = Region(base, end - base, owner, kind, protect)
        region.shared = shared
        self.regions[base] = region
        self.bases.insert(bisect_left(self.bases, base), base)
        self.regions_by_owner.setdefault(owner, set()).add(base)
        return region

    def allocate(self, owner, size, protect, commit=None, address=0, top_down=False, kind="private"):
        """Reserve a region as `reserve` does and commit its first `commit` bytes (rounded up
        to pages; None: all of it): both or neither. Returns the Region."""
        region = self.reserve(owner, size, protect, address, top_down, kind)
        try:
            self.commit(region, 0, region.pages if commit is None else pages_in(commit), protect)
        except ShmheapError:
            self.release(region)
            raise
        return region

    def commit(self, region, first, last, protect):
        """Commit pages [first, last) of `region` with `protect`. Already committed pages only
        change protection. Limits are checked and backing allocated before any state flips."""
        fresh = [(start, stop) for start, stop, value in region.runs(first, last) if value == RESERVED]
        new_bytes = sum(stop - start for start, stop in fresh) * PAGE_SIZE
        if new_bytes:
            owner_total = self.committed_by_owner.get(region.owner, 0) + new_bytes
            if region.owner != SYSTEM and owner_total > self.process_commit_limit:
                raise_for(WinError.ERROR_COMMITMENT_LIMIT, "process commit limit reached")
            if self.committed + new_bytes > self.commit_limit and not (
                    self.reclaim() and self.committed + new_bytes <= self.commit_limit):
                raise_for(WinError.ERROR_COMMITMENT_LIMIT, "commit limit reached")
            done = []
            try:
                for start, stop in fresh:
                    self.backing.commit(region.base + start * PAGE_SIZE, (stop - start) * PAGE_SIZE)
                    done.append((start, stop))
            except OSError as exc:
                for start, stop in done:
                    self.backing.decommit(region.base + start * PAGE_SIZE, (stop - start) * PAGE_SIZE)
                code = WinError.ERROR_COMMITMENT_LIMIT if exc.errno == errno.ENOSPC else WinError.ERROR_NOT_ENOUGH_MEMORY
                raise_for(code, f"segment cannot back the commit: {exc.strerror}")
            self._count(region, new_bytes)
        region.set_pages(first, last, protect)
        self._touch_pages(region, first, last)

    def decommit(self, region, first, last):
        """Decommit pages [first, last); reserved pages in the range are left as they are."""
        freed = 0
        for start, stop, value in list(region.runs(first, last)):
            if value != RESERVED:
                self.backing.decommit(region.base + start * PAGE_SIZE, (stop - start) * PAGE_SIZE)
                freed += (stop - start) * PAGE_SIZE
        region.set_pages(first, last, RESERVED)
        self._touch_pages(region, first, last)
        self._count(region, -freed)
        return freed

    def release(self, region):
        """Decommit and unreserve a whole region; returns the bytes it had committed."""
        freed = self.decommit(region, 0, region.pages)
        del self.regions[region.base]
        del self.bases[bisect_left(self.bases, region.base)]
        owned = self.regions_by_owner[region.owner]
        owned.discard(region.base)
        if not owned:
            del self.regions_by_owner[region.owner]
        self._give(region.base, round_up(region.end, GRANULE))
        return freed

    def release_owner(self, owner):
        """Release every region `owner` holds (process exit). Returns (regions, bytes)."""
        regions = self.regions_of(owner)
        freed = sum(self.release(region) for region in regions)
        return len(regions), freed

    def grant(self, region, pid, spans):
        """Let process `pid` see into `region` (a section it maps) where its views are: spans
        [(first page, stop page, writable), ...]; nothing else of the region."""
        if region.viewers is None:
            region.viewers = {}
        region.viewers[pid] = sorted(spans)
        self.touch(region.base, region.end)

    def revoke(self, region, pid):
        """Process `pid` no longer sees into `region` (its last view is gone)."""
        if region.viewers:
            region.viewers.pop(pid, None)
        self.touch(region.base, region.end)

    # ---- what each process may touch ------------------------------------------------------

    def touch(self, start, end):
        """The access to [start, end) may have changed, or the caller is handed a pointer into
        it: the reply to this request brings the caller's mapping up to date there."""
        self.touched.append((round_down(start, PAGE_SIZE), round_up(end, PAGE_SIZE)))

    def _touch_pages(self, region, first, last):
        self.touched.append((region.base + first * PAGE_SIZE, region.base + last * PAGE_SIZE))

    def take_touched(self):
        """The ranges touched since the last call, merged and sorted."""
        spans, self.touched = self.touched, []
        if len(spans) == 1:
            return spans
        spans.sort()
        merged = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged

    def access_runs(self, pid, start, end):
        """What process `pid` may do with the pages of [start, end), as [address, length, prot]
        runs: its own committed pages as their protection allows (a guard page: nothing until
        touched through a checked view), shared regions' committed pages, the sections it
        views as its views allow (FILE_MAP_READ: read only); nothing anywhere else."""
        region = self.region_at(start)
        if region is not None and region.shared and end <= region.end and self.shared_access is not None:
            return self.shared_access(pid, start, end)  # the common case: within the global heap
        out = []

        def add(a, b, prot):
            if b <= a:
                return
            if out and out[-1][0] + out[-1][1] == a and out[-1][2] == prot:
                out[-1][1] += b - a
            else:
                out.append([a, b - a, prot])

        start, end = max(start, self.base), min(end, self.end)
        cursor = start
        i = max(bisect_right(self.bases, start) - 1, 0)
        while cursor < end:
            region = self.regions[self.bases[i]] if i < len(self.bases) else None
            if region is None or region.base >= end:
                add(cursor, end, 0)
                break
            i += 1
            if region.end <= cursor:
                continue
            add(cursor, region.base, 0)
            cursor = max(cursor, region.base)
            stop = min(round_up(region.end, PAGE_SIZE), end)
            if region.shared and self.shared_access is not None:
                for address, length, prot in self.shared_access(pid, cursor, stop):
                    add(address, address + length, prot)
            elif region.viewers is not None and pid in region.viewers:
                # A section the process has views of: their pages, as the views allow; none
                # of the rest. A file section's pages are the file's, mapped over the region by
                # each viewer (sections.py): never committed here, all as the section allows.
                first, last = (cursor - region.base) // PAGE_SIZE, pages_in(stop - region.base)
                for a, b, writable in _view_pieces(region.viewers[pid], first, last):
                    start_a, stop_b = region.base + a * PAGE_SIZE, region.base + b * PAGE_SIZE
                    if writable is None:
                        add(start_a, stop_b, 0)
                    elif region.kind == "file":
                        add(start_a, stop_b, _prot(region.alloc_protect, writable))
                    else:
                        for run_start, run_stop, value in region.runs(a, b):
                            add(region.base + run_start * PAGE_SIZE, region.base + run_stop * PAGE_SIZE,
                                _prot(value, writable))
            elif _visible(region, pid):
                writable = True
                first = (cursor - region.base) // PAGE_SIZE
                for run_start, run_stop, value in region.runs(first, pages_in(stop - region.base)):
                    add(max(region.base + run_start * PAGE_SIZE, cursor),
                        min(region.base + run_stop * PAGE_SIZE, stop), _prot(value, writable))
            else:
                add(cursor, stop, 0)
            cursor = stop
        return out

    # ---- what the table holds -------------------------------------------------------------

    def regions_in_order(self):
        """Every region, by address."""
        return [self.regions[base] for base in self.bases]

    def regions_of(self, owner):
        """The regions `owner` holds, by address."""
        return [self.regions[base] for base in sorted(self.regions_by_owner.get(owner, ()))]

    def committed_by(self, owner):
        """Bytes committed in the regions `owner` holds."""
        return self.committed_by_owner.get(owner, 0)

    def free_bytes(self):
        """Address space no region holds."""
        return sum(end - start for start, end in zip(self.free_starts, self.free_ends))

    def resident_bytes(self):
        """Bytes of the segment that tmpfs holds (fstat st_blocks): what commit costs."""
        return self.backing.resident_bytes()

    def _count(self, region, delta):
        self.committed += delta
        region.committed_pages += delta // PAGE_SIZE
        total = self.committed_by_owner.get(region.owner, 0) + delta
        if total:
            self.committed_by_owner[region.owner] = total
        else:
            self.committed_by_owner.pop(region.owner, None)

    # ---- invariants -----------------------------------------------------------------------

    def check(self):
        """Walk the whole table; raise RuntimeError naming every broken invariant.
        committed == sum of region commits == sum of per-owner totals; regions and free extents
        tile the address space without overlap; runs are sorted, in range and coalesced."""
        problems = []
        spans = [(s, e, "free") for s, e in zip(self.free_starts, self.free_ends)]
        for i in range(1, len(self.free_starts)):
            if self.free_starts[i] <= self.free_ends[i - 1]:
                problems.append(f"free extents {i - 1},{i} overlap or are not coalesced")
        by_owner = {}
        if self.bases != sorted(self.regions):
            problems.append("bases out of sync with regions")
        for base, region in self.regions.items():
            spans.append((base, round_up(region.end, GRANULE), "region"))
            if base % GRANULE or region.size % PAGE_SIZE or region.size <= 0:
                problems.append(f"region {base:#x} misaligned")
            if region.starts[0] != 0 or any(b <= a for a, b in zip(region.starts, region.starts[1:])):
                problems.append(f"region {base:#x} runs unsorted")
            if region.starts[-1] >= region.pages:
                problems.append(f"region {base:#x} run past its end")
            if any(a == b for a, b in zip(region.values, region.values[1:])):
                problems.append(f"region {base:#x} runs not coalesced")
            pages = region.count_committed(0, region.pages)
            if pages != region.committed_pages:
                problems.append(f"region {base:#x} counts {region.committed_pages} pages, has {pages}")
            by_owner[region.owner] = by_owner.get(region.owner, 0) + pages * PAGE_SIZE
            if base not in self.regions_by_owner.get(region.owner, ()):
                problems.append(f"region {base:#x} missing from its owner's set")
        by_owner = {owner: total for owner, total in by_owner.items() if total}
        if by_owner != self.committed_by_owner:
            problems.append(f"per-owner commit {self.committed_by_owner} != walked {by_owner}")
        if sum(by_owner.values()) != self.committed:
            problems.append(f"committed {self.committed} != walked {sum(by_owner.values())}")
        spans.sort()
        cursor = self.start
        for start, end, what in spans:
            if start != cursor:
                problems.append(f"{what} at {start:#x}: gap or overlap (expected {cursor:#x})")
            cursor = end
        if cursor != self.end:
            problems.append(f"address space ends at {cursor:#x}, not {self.end:#x}")
        if problems:
            raise RuntimeError("page table inconsistent: " + "; ".join(problems))
        return {"regions": len(self.regions), "free_extents": len(self.free_starts),
                "committed": self.committed}

    # ---- Win32 semantics ------------------------------------------------------------------

    def _own_region(self, owner, address, on_view=WinError.ERROR_INVALID_ADDRESS):
        """The caller's region at `address`. A section's region the caller has a view of is
        refused with `on_view` (the error Windows gives that call on a view, FM-56), any
        other region not its own with ERROR_INVALID_ADDRESS."""
        region = self.region_at(address)
        if region is not None and region.viewers is not None and owner in region.viewers:
            raise_for(on_view, f"{address:#x} is in a view of a section")
        if region is None or region.owner != owner:
            raise_for(WinError.ERROR_INVALID_ADDRESS, f"no region of this process at {address:#x}")
        return region

    def _page_range(self, owner, address, size, on_view=WinError.ERROR_INVALID_ADDRESS):
        """The caller's region and page range [first, last) covering [address, address+size),
        which must lie in one region (VA-17, VA-18, VF-12)."""
        if address + size > self.end:
            raise_for(WinError.ERROR_INVALID_ADDRESS, "range past the end of the address space")
        region = self._own_region(owner, address, on_view)
        end = round_up(address + size, PAGE_SIZE)
        if end > region.end:
            raise_for(WinError.ERROR_INVALID_ADDRESS, "range crosses the end of its region")
        return region, (address - region.base) // PAGE_SIZE, (end - region.base) // PAGE_SIZE

    def virtual_alloc(self, owner, address, size, alloc_type, protect):
        """VirtualAlloc: returns the address of the reserved region or committed pages."""
        if alloc_type & ~_ALLOC_TYPES or alloc_type & (AT_ROUND_TO_PAGE | MEM_LARGE_PAGES | MEM_PHYSICAL):
            raise_for(WinError.ERROR_INVALID_PARAMETER, "unknown allocation type bits")
        if alloc_type & (MEM_RESET | MEM_RESET_UNDO):
            if alloc_type not in (MEM_RESET, MEM_RESET_UNDO):
                raise_for(WinError.ERROR_INVALID_PARAMETER, "MEM_RESET combines with no other type")
            return self._reset(owner, address, size)
        if not alloc_type & (MEM_COMMIT | MEM_RESERVE):
            raise_for(WinError.ERROR_INVALID_PARAMETER, "allocation type needs MEM_COMMIT or MEM_RESERVE")
        if alloc_type & MEM_WRITE_WATCH:
            if not alloc_type & MEM_RESERVE:
                raise_for(WinError.ERROR_INVALID_PARAMETER, "MEM_WRITE_WATCH needs MEM_RESERVE")
            raise_for(WinError.ERROR_NOT_SUPPORTED, "write watching is not implemented")
        check_protection(protect)
        if size == 0:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "size must not be 0")
        if address and address < self.start:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "address below the lowest user address")
        if (address or self.base) + size > self.end:  # NULL: larger than the whole segment
            raise_for(WinError.ERROR_INVALID_PARAMETER if alloc_type & MEM_RESERVE or not address
                  else WinError.ERROR_INVALID_ADDRESS, "range past the end of the address space")
        if alloc_type & MEM_RESERVE or not address:
            # MEM_COMMIT with no address implies MEM_RESERVE (VA-04).
            commit = None if alloc_type & MEM_COMMIT else 0
            return self.allocate(owner, size, protect, commit, address, bool(alloc_type & MEM_TOP_DOWN)).base
        region, first, last = self._page_range(owner, address, size, on_view=WinError.ERROR_ACCESS_DENIED)
        self.commit(region, first, last, protect)
        return region.base + first * PAGE_SIZE

    def _reset(self, owner, address, size):
        # MEM_RESET says the contents are no longer needed; keeping them is a valid outcome
        # (VA-13) and the only one that keeps commit real: punching the pages out would let a
        # later write fault in memory that was never fallocated.
        if size == 0:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "size must not be 0")
        region, first, _ = self._page_range(owner, address, size)
        return region.base + first * PAGE_SIZE

    def virtual_free(self, owner, address, size, free_type):
        if free_type == MEM_RELEASE:
            if size:
                raise_for(WinError.ERROR_INVALID_PARAMETER, "MEM_RELEASE takes size 0")
            region = self._own_region(owner, address)
            if round_down(address, PAGE_SIZE) != region.base:
                raise_for(WinError.ERROR_INVALID_ADDRESS, "MEM_RELEASE needs the region base")
            if region.kind != "private":
                raise_for(WinError.ERROR_INVALID_ADDRESS, f"region belongs to a {region.kind}")
            self.release(region)
        elif free_type == MEM_DECOMMIT:
            if size == 0:
                region = self._own_region(owner, address)
                if round_down(address, PAGE_SIZE) != region.base:
                    raise_for(WinError.ERROR_INVALID_ADDRESS, "size 0 decommits from the region base only")
                first, last = 0, region.pages
            else:
                region, first, last = self._page_range(owner, address, size, on_view=WinError.ERROR_INVALID_PARAMETER)
            if region.kind != "private":
                raise_for(WinError.ERROR_INVALID_ADDRESS, f"region belongs to a {region.kind}")
            self.decommit(region, first, last)
        else:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "free type must be MEM_DECOMMIT or MEM_RELEASE")
        return True

    def virtual_query(self, owner, address):
        """MEMORY_BASIC_INFORMATION as a tuple: (BaseAddress, AllocationBase, AllocationProtect,
        RegionSize, State, Protect, Type)."""
        if address >= self.end:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "address past the end of the address space")
        page = round_down(address, PAGE_SIZE)
        region = self.region_at(address)
        if region is None:
            i = bisect_right(self.bases, address)
            gap_end = self.bases[i] if i < len(self.bases) else self.end
            return (page, 0, 0, gap_end - page, MEM_FREE, PAGE_NOACCESS, 0)
        kind = MEM_MAPPED if region.kind in ("section", "file") else MEM_PRIVATE
        index = (page - region.base) // PAGE_SIZE
        writable = True
        view_stop = region.pages
        if region.viewers is not None and owner in region.viewers:  # where its views are
            _, view_stop, writable = next(_view_pieces(region.viewers[owner], index, region.pages))
        if not _visible(region, owner) or writable is None:
            # Another process's memory, or a section's pages out of this one's views: visible
            # as taken, never as accessible.
            return (page, region.base, PAGE_NOACCESS, region.end - page, MEM_RESERVE, 0, kind)
        _, stop, value = next(region.runs(index, region.pages))
        if region.kind == "file":  # the file's pages, committed as far as the view goes (FM-54)
            stop, value = region.pages, region.alloc_protect
        stop = min(stop, view_stop)
        state = MEM_RESERVE if value == RESERVED else MEM_COMMIT
        alloc_protect = region.alloc_protect
        if not writable:
            alloc_protect = value = PAGE_READONLY  # this process's views here are FILE_MAP_READ
        return (page, region.base, alloc_protect, (stop - index) * PAGE_SIZE, state, value, kind)

    def virtual_protect(self, owner, address, size, protect):
        """VirtualProtect: returns the old protection of the first page."""
        check_protection(protect)
        if size == 0:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "size must not be 0")
        # A view's protection is its access (FILE_MAP_*), the same for the whole view here:
        # Windows lets a compatible protection through (FM-56); here none changes it.
        region, first, last = self._page_range(owner, address, size, on_view=WinError.ERROR_INVALID_PARAMETER)
        runs = list(region.runs(first, last))
        if any(value == RESERVED for _, _, value in runs):
            raise_for(WinError.ERROR_INVALID_ADDRESS, "range holds uncommitted pages")
        old = runs[0][2]
        for start, stop, value in runs:
            # Cache modifiers are fixed when pages are committed (VA-09, modern Windows).
            region.set_pages(start, stop, (protect & ~PAGE_CACHE_MODIFIERS) | (value & PAGE_CACHE_MODIFIERS))
        self._touch_pages(region, first, last)
        return old

    def access(self, owner, address, size, want_write):
        """Check that [address, address+size) may be viewed. Returns True if it is writable,
        False if read-only; fails with ERROR_NOACCESS otherwise. Touching PAGE_GUARD pages
        clears their guard and fails once with STATUS_GUARD_PAGE_VIOLATION (VA-07)."""
        if size == 0 or address + size > self.end:
            raise_for(WinError.ERROR_NOACCESS, "empty view or range past the end of the address space")
        self.touch(address, address + size)  # the reply tells the caller's mapping about it
        region = self.region_at(address)
        if region is None or not _visible(region, owner) or address + size > region.end:
            raise_for(WinError.ERROR_NOACCESS, f"no accessible memory at {address:#x}+{size:#x}")
        first = (address - region.base) // PAGE_SIZE
        last = (round_up(address + size, PAGE_SIZE) - region.base) // PAGE_SIZE
        runs = list(region.runs(first, last))
        guarded = [(start, stop, value) for start, stop, value in runs if value & PAGE_GUARD]
        if guarded:
            for start, stop, value in guarded:
                region.set_pages(start, stop, value & ~PAGE_GUARD)
            self._touch_pages(region, first, last)
            raise_for(WinError.STATUS_GUARD_PAGE_VIOLATION, "guard page touched; guard cleared")
        prots = [prot for _, _, prot in self.access_runs(owner, region.base + first * PAGE_SIZE,
                                                           region.base + last * PAGE_SIZE)]
        if not all(prots):  # (in the global heap: pages of nothing this process holds)
            raise_for(WinError.ERROR_NOACCESS, "range holds uncommitted or no-access pages")
        writable = all(prot & mmap.PROT_WRITE for prot in prots)
        if want_write and not writable:
            raise_for(WinError.ERROR_NOACCESS, "range holds read-only pages")
        return writable


def _prot(value, writable):
    """The mapping's protection for a page of state `value` (0: reserved)."""
    if value == RESERVED or value & PAGE_GUARD or not value & PAGE_READABLE:
        return 0
    return mmap.PROT_READ | mmap.PROT_WRITE if writable and value & PAGE_WRITABLE else mmap.PROT_READ


def _view_pieces(spans, first, stop):
    """Pages [first, stop) in pieces (first, stop, writable) by a process's view spans:
    writable True or False where a view covers them (True if any covering view writes), None
    where none does."""
    edges = sorted({first, stop, *(min(max(edge, first), stop) for a, b, _ in spans for edge in (a, b))})
    for a, b in zip(edges, edges[1:]):
        covering = [writable for start, end, writable in spans if start <= a and b <= end]
        yield a, b, (any(covering) if covering else None)


def _visible(region, owner):
    """May process `owner` see into `region`: its own, shared, or a section it has a view of."""
    return (region.owner == owner or region.shared
            or (region.viewers is not None and owner in region.viewers))


def check_protection(protect):
    """Exactly one base protection, plus at most one cache modifier and PAGE_GUARD (VA-05)."""
    base = protect & PAGE_BASE_MASK
    modifiers = protect & ~PAGE_BASE_MASK
    if (base not in _BASE_PROTECTIONS
            or modifiers & ~(PAGE_GUARD | PAGE_NOCACHE | PAGE_WRITECOMBINE)
            or modifiers & PAGE_CACHE_MODIFIERS == PAGE_CACHE_MODIFIERS
            or (base == PAGE_NOACCESS and modifiers)
            or (modifiers & PAGE_GUARD and modifiers & PAGE_NOCACHE)):
        raise_for(WinError.ERROR_INVALID_PARAMETER, f"invalid page protection {protect:#x}")
