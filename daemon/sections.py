"""Sections: CreateFileMapping's objects, backed by the segment or by a real file.

A section is one region owned by the system. A pagefile-backed one
(CreateFileMapping(INVALID_HANDLE_VALUE, ...)) is committed whole when created. A file-backed
one (CreateFileMapping(hFile, ...)) is a region of kind "file", reserved and never committed
in the segment: each process that maps a view maps the file itself over the region's pages
(shmheap/files.py), so tmpfs holds none of it and the same address names the same file bytes
in every process. The daemon keeps the file open (the descriptor the creator passed with
SCM_RIGHTS) for as long as the section lives, and hands a duplicate to each process that maps
it. Processes reach a section through handles and views, both counted per process:

    handles  CreateFileMapping / OpenFileMapping add one, CloseHandle removes one. A process
             may map views with no more access than its handles were opened with (FM-42,
             FM-43); the creator's handles have all access.
    views    MapViewOfFile adds one at base + offset (the segment is one address space, so a
             view is the section's own bytes, the same address in every process);
             UnmapViewOfFile of any address inside a view removes it (FM-59). A process
             may touch the pages of its views and no others of the region, each as the
             views over it allow (FILE_MAP_READ alone: read-only). Views at one address
             are counted together, with the largest size and any write access among them.

The name goes with the last handle, even while views remain (FM-45): a later OpenFileMapping
fails and a new CreateFileMapping of the name makes a new section. The section itself
vanishes when no process holds a handle or a view, whether they closed them or exited. A
section handle is a small even number (a Win32 handle is a multiple of 4), the same in every
process, and never reused while the daemon runs.
"""

import fcntl
import itertools
import os
import stat

from shmheap.constants import (FILE_MAP_ALL_ACCESS, FILE_MAP_COPY, FILE_MAP_EXECUTE, FILE_MAP_READ,
                               FILE_MAP_WRITE, PAGE_EXECUTE_READ, PAGE_EXECUTE_READWRITE,
                               PAGE_EXECUTE_WRITECOPY, PAGE_READONLY, PAGE_READWRITE, PAGE_WRITECOPY)
from shmheap.errors import WinError, raise_for
from shmheap.segment import ALLOCATION_GRANULARITY, PAGE_SIZE

from .pagetable import SYSTEM

_PROTECTIONS = {PAGE_READONLY, PAGE_READWRITE, PAGE_EXECUTE_READ, PAGE_EXECUTE_READWRITE}
# A file section may also be copy-on-write (PAGE_WRITECOPY: FM-24, FM-25).
_FILE_PROTECTIONS = _PROTECTIONS | {PAGE_WRITECOPY, PAGE_EXECUTE_WRITECOPY}
_WRITABLE = {PAGE_READWRITE, PAGE_EXECUTE_READWRITE}
_READ_ONLY_TWIN = {PAGE_WRITECOPY: PAGE_READONLY, PAGE_EXECUTE_WRITECOPY: PAGE_EXECUTE_READ}
MAX_NAME = 260
MAX_FILE_SIZE = 1 << 40  # a file section's size is bounded as the segment is


class Section:
    __slots__ = ("handle", "name", "region", "size", "protect", "handles", "rights", "views", "fd", "uid")

    def __init__(self, handle, name, region, size, protect, fd=None, uid=None):
        self.handle = handle
        self.name = name
        self.region = region
        self.size = size  # exact bytes (a file section's need not be whole pages: FM-28)
        self.protect = protect
        self.handles = {}  # pid -> open handle count
        self.rights = {}  # pid -> the union of its handles' FILE_MAP_* access
        self.views = {}  # pid -> {address: [count, writable, size]}
        self.fd = fd  # the file of a file-backed section, else None
        self.uid = uid  # a file section's creator's: the file is that user's to show


def _spans(section, views):
    """A process's views of `section` as page spans of its region: [(first, stop, writable)]."""
    base = section.region.base
    return [((address - base) // PAGE_SIZE, -(-(address - base + size) // PAGE_SIZE), writable)
            for address, (_, writable, size) in views.items()]


def _needs(access):
    """The handle rights a view of `access` needs: FILE_MAP_WRITE maps through a write handle;
    FILE_MAP_READ or FILE_MAP_COPY alone through a read handle (FM-42..FM-44)."""
    return FILE_MAP_WRITE if access & FILE_MAP_WRITE else FILE_MAP_READ


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
            self._add_handle(section, pid, FILE_MAP_ALL_ACCESS)
            return [section.handle, True]
        if protect & 0xFF not in _PROTECTIONS:
            raise_for(WinError.ERROR_INVALID_PARAMETER, f"invalid section protection {protect:#x}")
        if size == 0:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "a pagefile-backed section needs a size")
        region = self.pagetable.allocate(SYSTEM, size, protect & 0xFF, kind="section")
        return [self._file(Section(next(self._handles), name, region, size, protect & 0xFF), pid), False]

    def _file(self, section, pid):
        """A new section, filed, with its creator's handle; returns its handle."""
        self._add_handle(section, pid, FILE_MAP_ALL_ACCESS)
        self.by_handle[section.handle] = section
        if section.name:
            self.by_name[section.name] = section
        return section.handle

    @staticmethod
    def _add_handle(section, pid, access):
        section.handles[pid] = section.handles.get(pid, 0) + 1
        section.rights[pid] = section.rights.get(pid, 0) | access

    @staticmethod
    def _check_user(section, uid):
        """A file section is its creator's user's (and root's): the file was opened with that
        user's rights, which another user let into the daemon may not borrow (on Windows a
        named object's default DACL admits its creator). Pagefile sections are shared by
        every user the daemon lets in."""
        if section.fd is not None and uid not in (section.uid, 0):
            raise_for(WinError.ERROR_ACCESS_DENIED, "a file section of another user")

    def create_file(self, pid, fd, protect, size, name, uid=None):
        """CreateFileMapping(hFile, ...): a section over the open file `fd` (this call's to
        keep or close). Returns [handle, existed, size]: an existing name gives a new handle
        to that section and `fd` is closed. The file's own open mode decides what it allows
        (FM-24..FM-31): PAGE_READWRITE needs it open for writing, and extends it to `size`;
        a read-only or copy-on-write section may not be larger than the file; size 0 is
        the file's size, and an empty file cannot be mapped so."""
        try:
            if name is not None and len(name) > MAX_NAME:
                raise_for(WinError.ERROR_INVALID_PARAMETER, "name too long")
            if name and name in self.by_name:
                section = self.by_name[name]
                self._check_user(section, uid)
                self._add_handle(section, pid, FILE_MAP_ALL_ACCESS)
                os.close(fd)  # the section has its file already
                return [section.handle, True, section.size]
            protect &= 0xFF
            if protect not in _FILE_PROTECTIONS:
                raise_for(WinError.ERROR_INVALID_PARAMETER, f"invalid section protection {protect:#x}")
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise_for(WinError.ERROR_INVALID_HANDLE, "not a regular file")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            mode = flags & os.O_ACCMODE
            if flags & os.O_PATH or mode == os.O_WRONLY or (protect in _WRITABLE and mode != os.O_RDWR):
                raise_for(WinError.ERROR_ACCESS_DENIED, "the file is not open for "
                          + ("reading and writing" if protect in _WRITABLE else "reading"))
            if size == 0:
                size = info.st_size
                if size == 0:
                    raise_for(WinError.ERROR_FILE_INVALID, "an empty file cannot be mapped with size 0")
            if size > MAX_FILE_SIZE:
                raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "a file section of at most 1 TiB")
            if size > info.st_size and protect not in _WRITABLE:
                raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "larger than the file, which only a"
                          " read-write section may extend")
            # Copy-on-write views would need a private mapping per view: here they are read-only.
            region = self.pagetable.reserve(SYSTEM, size, _READ_ONLY_TWIN.get(protect, protect), kind="file")
            if size > info.st_size:  # extended only once nothing else can fail (FM-30)
                try:
                    os.ftruncate(fd, size)
                except OSError as exc:
                    self.pagetable.release(region)
                    raise_for(WinError.ERROR_DISK_FULL, f"cannot extend the file: {exc.strerror}")
        except BaseException:
            os.close(fd)
            raise
        handle = self._file(Section(next(self._handles), name, region, size, protect, fd, uid), pid)
        return [handle, False, size]

    def query(self, pid, handle):
        """What a process needs to map views of a section it holds: [base, size, protect,
        file-backed]."""
        section = self._held(pid, handle)
        return [section.region.base, section.size, section.protect, section.fd is not None]

    def file_of(self, pid, handle, uid=None):
        """(descriptor, owned) of a file section the process holds, for the reply to carry
        (SCM_RIGHTS): the process maps the file itself. A process that may only read (the
        section, or every handle it holds, is read-only) gets a read-only descriptor of its
        own, opened anew (`owned`: the caller closes it once sent), so the kernel refuses it
        a writable mapping; the others get the section's."""
        section = self._held(pid, handle)
        if section.fd is None:
            raise_for(WinError.ERROR_INVALID_HANDLE, "a pagefile-backed section has no file")
        self._check_user(section, uid)
        if section.protect in _WRITABLE and section.rights[pid] & FILE_MAP_WRITE:
            return section.fd, False
        try:
            return os.open(f"/proc/self/fd/{section.fd}", os.O_RDONLY | os.O_CLOEXEC), True
        except OSError as exc:
            raise_for(WinError.ERROR_ACCESS_DENIED, f"cannot reopen the file read-only: {exc.strerror}")

    def open(self, pid, access, name, uid=None):
        section = self.by_name.get(name)
        if section is None:
            raise_for(WinError.ERROR_FILE_NOT_FOUND, f"no section named {name!r}")
        self._check_user(section, uid)
        self._check_access(section, access)
        self._add_handle(section, pid, access)
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
        if access & FILE_MAP_WRITE and section.protect not in _WRITABLE:
            raise_for(WinError.ERROR_ACCESS_DENIED, "the section is read-only")

    def map(self, pid, handle, access, offset, size):
        section = self._held(pid, handle)
        self._check_access(section, access)
        if not access & (FILE_MAP_READ | FILE_MAP_WRITE | FILE_MAP_COPY):
            raise_for(WinError.ERROR_INVALID_PARAMETER, "a view needs FILE_MAP_READ or FILE_MAP_WRITE")
        if not section.rights[pid] & _needs(access):
            raise_for(WinError.ERROR_ACCESS_DENIED, "more access than this process's handles were opened with")
        if offset % ALLOCATION_GRANULARITY:
            raise_for(WinError.ERROR_MAPPED_ALIGNMENT, "view offsets are multiples of 64 KiB")
        size = size or section.size - offset  # 0 maps to the end of the section
        if offset + size > section.size or offset >= section.size:
            raise_for(WinError.ERROR_ACCESS_DENIED, "view past the end of the section")
        address = section.region.base + offset
        writable = bool(access & FILE_MAP_WRITE) or bool(access & FILE_MAP_COPY and section.fd is None)
        view = section.views.setdefault(pid, {}).setdefault(address, [0, False, 0])
        view[0] += 1
        view[1] = view[1] or writable
        view[2] = max(view[2], size)
        self._grant(section, pid)
        return address

    def _grant(self, section, pid):
        """The process sees the section's pages while it has views, writable if one is."""
        views = section.views.get(pid)
        if views:
            self.pagetable.grant(section.region, pid, _spans(section, views))
        else:
            self.pagetable.revoke(section.region, pid)
            section.views.pop(pid, None)

    def unmap(self, pid, address):
        """Unmap the process's view holding `address` (its base or any byte inside, FM-59);
        returns [the view's base, whether the process still has a view of the section]."""
        region = self.pagetable.region_at(address)
        for section in self.by_handle.values():
            views = section.views.get(pid)
            if not views or section.region is not region:
                continue
            # The view starting nearest below the address: views of one section may overlap
            # here (each is base + offset), and the innermost is the one asked for.
            base = address if address in views else max(
                (start for start, (_, _, size) in views.items() if start <= address < start + size), default=None)
            if base is None:
                break
            views[base][0] -= 1
            if not views[base][0]:
                del views[base]
            self._grant(section, pid)
            still = pid in section.views
            self._collect(section)
            return [base, still]
        raise_for(WinError.ERROR_INVALID_ADDRESS, f"no view of this process at {address:#x}")

    def close(self, pid, handle):
        section = self._held(pid, handle)
        section.handles[pid] -= 1
        if not section.handles[pid]:
            del section.handles[pid]
            del section.rights[pid]
        self._collect(section)
        return True

    def _collect(self, section):
        """The name goes with the last handle (FM-45); the section with the last view too."""
        if not section.handles and section.name and self.by_name.get(section.name) is section:
            del self.by_name[section.name]
        if section.handles or section.views:
            return
        del self.by_handle[section.handle]
        self.pagetable.release(section.region)
        if section.fd is not None:
            os.close(section.fd)
            section.fd = None

    def release_owner(self, pid):
        """Drop every handle and view of a process that is gone; returns how many sections
        it held."""
        held = [s for s in self.by_handle.values() if pid in s.handles or pid in s.views]
        for section in held:
            section.handles.pop(pid, None)
            section.rights.pop(pid, None)
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
            named = section.name and section.handles  # (the name goes with the last handle)
            if section.handle != handle or (named and self.by_name.get(section.name) is not section):
                problems.append(f"section {handle} is filed wrongly")
            backed = region.kind == "section" and region.committed_pages == region.pages and section.fd is None
            mapped = region.kind == "file" and region.committed_pages == 0 and section.fd is not None
            if self.pagetable.region_at(region.base) is not region or not (backed or mapped):
                problems.append(f"section {handle} has no live region of its kind")
            if set(section.rights) != set(section.handles):
                problems.append(f"section {handle}: rights {sorted(section.rights)} != handles")
            if section.name and not section.handles and self.by_name.get(section.name) is section:
                problems.append(f"section {handle} keeps its name with no handle")
            if not section.handles and not section.views:
                problems.append(f"section {handle} is held by nobody")
            if any(count <= 0 for count in section.handles.values()) or any(
                    not views or any(count <= 0 for count, _, _ in views.values())
                    for views in section.views.values()):
                problems.append(f"section {handle} has a count that is not positive")
            granted = {pid: sorted(_spans(section, views)) for pid, views in section.views.items()}
            if granted != (region.viewers or {}):
                problems.append(f"section {handle}: viewers {region.viewers} != views {granted}")
        if any(self.by_handle.get(s.handle) is not s for s in self.by_name.values()):
            problems.append("a name maps to no live section")
        if problems:
            raise RuntimeError("sections inconsistent: " + "; ".join(problems[:10]))
        return {"sections": len(self.by_handle)}

    def list(self):
        return [{"handle": s.handle, "name": s.name, "address": s.region.base, "size": s.size,
                 "protect": s.protect, "file": s.fd is not None, "handles": sorted(s.handles.items()),
                 "views": sorted((pid, len(v)) for pid, v in s.views.items())}
                for s in self.by_handle.values()]  # pairs, not maps: wire map keys are strings
