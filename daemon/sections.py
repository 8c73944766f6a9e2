"""Named sections: CreateFileMapping(INVALID_HANDLE_VALUE, ..., name) backed by the segment.

A section is one region, committed whole when created (a pagefile-backed section commits at
creation), owned by the system. Processes reach it through handles and views, both counted
per process:

    handles  CreateFileMapping / OpenFileMapping add one, CloseHandle removes one.
    views    MapViewOfFile adds one at base + offset (the segment is one address space, so a
             view is the section's own bytes, the same address in every process);
             UnmapViewOfFile removes one. A process's rights on the region are the union of
             its views' (FILE_MAP_READ alone gives read-only views).

The section vanishes when no process holds a handle or a view, whether they closed them or
exited. A section handle is a small even number (a Win32 handle is a multiple of 4), the same
in every process, and never reused while the daemon runs.
"""

import itertools

from shmheap.constants import (FILE_MAP_ALL_ACCESS, FILE_MAP_COPY, FILE_MAP_EXECUTE, FILE_MAP_READ,
                               FILE_MAP_WRITE, PAGE_EXECUTE_READ, PAGE_EXECUTE_READWRITE,
                               PAGE_READONLY, PAGE_READWRITE)
from shmheap.errors import WinError, raise_for
from shmheap.segment import ALLOCATION_GRANULARITY

from .pagetable import SYSTEM

_PROTECTIONS = {PAGE_READONLY, PAGE_READWRITE, PAGE_EXECUTE_READ, PAGE_EXECUTE_READWRITE}
MAX_NAME = 260


class Section:
    __slots__ = ("handle", "name", "region", "size", "protect", "handles", "views")

    def __init__(self, handle, name, region, size, protect):
        self.handle = handle
        self.name = name
        self.region = region
        self.size = size
        self.protect = protect
        self.handles = {}  # pid -> open handle count
        self.views = {}  # pid -> {address: [count, writable]}


class Sections:
    def __init__(self, pagetable):
        self.pagetable = pagetable
        self.by_handle = {}
        self.by_name = {}
        self._handles = itertools.count(4, 4)

    def create(self, pid, protect, size, name):
        """Returns [handle, existed]: an existing name gives a new handle to that section."""
        if name is not None and len(name) > MAX_NAME:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "name too long")
        if name and name in self.by_name:
            section = self.by_name[name]
            section.handles[pid] = section.handles.get(pid, 0) + 1
            return [section.handle, True]
        if protect & 0xFF not in _PROTECTIONS:
            raise_for(WinError.ERROR_INVALID_PARAMETER, f"invalid section protection {protect:#x}")
        if size == 0:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "a pagefile-backed section needs a size")
        region = self.pagetable.allocate(SYSTEM, size, protect & 0xFF, kind="section")
        section = Section(next(self._handles), name, region, size, protect & 0xFF)
        section.handles[pid] = 1
        self.by_handle[section.handle] = section
        if name:
            self.by_name[name] = section
        return [section.handle, False]

    def open(self, pid, access, name):
        section = self.by_name.get(name)
        if section is None:
            raise_for(WinError.ERROR_FILE_NOT_FOUND, f"no section named {name!r}")
        self._check_access(section, access)
        section.handles[pid] = section.handles.get(pid, 0) + 1
        return section.handle

    def _held(self, pid, handle):
        section = self.by_handle.get(handle)
        if section is None or not section.handles.get(pid):
            raise_for(WinError.ERROR_INVALID_HANDLE, f"no section handle {handle} in this process")
        return section

    @staticmethod
    def _check_access(section, access):
        if access & ~(FILE_MAP_ALL_ACCESS | FILE_MAP_EXECUTE):
            raise_for(WinError.ERROR_INVALID_PARAMETER, f"invalid access {access:#x}")
        if access & FILE_MAP_WRITE and section.protect == PAGE_READONLY:
            raise_for(WinError.ERROR_ACCESS_DENIED, "the section is read-only")

    def map(self, pid, handle, access, offset, size):
        section = self._held(pid, handle)
        self._check_access(section, access)
        if not access & (FILE_MAP_READ | FILE_MAP_WRITE | FILE_MAP_COPY):
            raise_for(WinError.ERROR_INVALID_PARAMETER, "a view needs FILE_MAP_READ or FILE_MAP_WRITE")
        if offset % ALLOCATION_GRANULARITY:
            raise_for(WinError.ERROR_MAPPED_ALIGNMENT, "view offsets are multiples of 64 KiB")
        size = size or section.size - offset  # 0 maps to the end of the section
        if offset + size > section.size or offset >= section.size:
            raise_for(WinError.ERROR_ACCESS_DENIED, "view past the end of the section")
        address = section.region.base + offset
        writable = bool(access & (FILE_MAP_WRITE | FILE_MAP_COPY))
        view = section.views.setdefault(pid, {}).setdefault(address, [0, False])
        view[0] += 1
        view[1] = view[1] or writable
        self._grant(section, pid)
        return address

    def _grant(self, section, pid):
        """The process sees the section's pages while it has views, writable if one is."""
        views = section.views.get(pid)
        if views:
            self.pagetable.grant(section.region, pid, any(writable for _, writable in views.values()))
        else:
            self.pagetable.revoke(section.region, pid)
            section.views.pop(pid, None)

    def unmap(self, pid, address):
        for section in self.by_handle.values():
            views = section.views.get(pid)
            if views and address in views:
                views[address][0] -= 1
                if not views[address][0]:
                    del views[address]
                self._grant(section, pid)
                self._collect(section)
                return True
        raise_for(WinError.ERROR_INVALID_ADDRESS, f"no view of this process at {address:#x}")

    def close(self, pid, handle):
        section = self._held(pid, handle)
        section.handles[pid] -= 1
        if not section.handles[pid]:
            del section.handles[pid]
        self._collect(section)
        return True

    def _collect(self, section):
        if section.handles or section.views:
            return
        del self.by_handle[section.handle]
        if section.name:
            del self.by_name[section.name]
        self.pagetable.release(section.region)

    def release_owner(self, pid):
        """Drop every handle and view of a process that is gone; returns how many sections
        it held."""
        held = [s for s in self.by_handle.values() if pid in s.handles or pid in s.views]
        for section in held:
            section.handles.pop(pid, None)
            section.views.pop(pid, None)
            self.pagetable.revoke(section.region, pid)
            self._collect(section)
        return len(held)

    @property
    def count(self):
        return len(self.by_handle)

    def check(self):
        """Walk the sections; raise RuntimeError naming each broken invariant: names and
        handles agree, each section's region is a live, wholly committed section region,
        counts are positive, a section nobody holds is gone, and the page table lets exactly
        the processes with views see in, writable as their views are."""
        problems = []
        for handle, section in self.by_handle.items():
            region = section.region
            if section.handle != handle or (section.name and self.by_name.get(section.name) is not section):
                problems.append(f"section {handle} is filed wrongly")
            if (self.pagetable.region_at(region.base) is not region or region.kind != "section"
                    or region.committed_pages != region.pages):
                problems.append(f"section {handle} has no live, committed region")
            if not section.handles and not section.views:
                problems.append(f"section {handle} is held by nobody")
            if any(count <= 0 for count in section.handles.values()) or any(
                    not views or any(count <= 0 for count, _ in views.values())
                    for views in section.views.values()):
                problems.append(f"section {handle} has a count that is not positive")
            granted = {pid: any(writable for _, writable in views.values())
                       for pid, views in section.views.items()}
            if granted != (region.viewers or {}):
                problems.append(f"section {handle}: viewers {region.viewers} != views {granted}")
        if len(self.by_name) != sum(1 for s in self.by_handle.values() if s.name):
            problems.append("a name maps to no live section")
        if problems:
            raise RuntimeError("sections inconsistent: " + "; ".join(problems[:10]))
        return {"sections": len(self.by_handle)}

    def list(self):
        return [{"handle": s.handle, "name": s.name, "address": s.region.base, "size": s.size,
                 "protect": s.protect, "handles": sorted(s.handles.items()),
                 "views": sorted((pid, len(v)) for pid, v in s.views.items())}
                for s in self.by_handle.values()]  # pairs, not maps: wire map keys are strings
