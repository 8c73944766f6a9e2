"""Files: the process's file handles (CreateFile), for file-backed sections, and mapped files
as Python buffers (`map_file`).

A file handle is this process's own, as on Windows: an open descriptor in a table here,
never seen by the daemon until CreateFileMapping passes its descriptor along (SCM_RIGHTS).
Handle values are multiples of 4 from FILE_HANDLE_BASE, far above the section handles the
daemon numbers from 4, so CloseHandle tells the two apart by value.

CreateFile's creation dispositions map onto open(2) flags; its errors onto the Win32 codes
Windows gives (docs/file_mapping_semantics.md, FM-01..FM-23). Share modes are checked
against the other handles this process holds on the same file: Linux has no mandatory
sharing between processes, so another process's open is not seen (a documented limit).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import os
import stat
import threading
from typing import TYPE_CHECKING, Any

from .constants import (CREATE_ALWAYS, CREATE_NEW, FILE_MAP_READ, FILE_MAP_WRITE, FILE_SHARE_READ,
                        FILE_SHARE_WRITE, GENERIC_ALL, GENERIC_READ, GENERIC_WRITE, OPEN_ALWAYS, OPEN_EXISTING,
                        PAGE_READONLY, PAGE_READWRITE, TRUNCATE_EXISTING)
from .errors import WinError, raise_for
from .segment import as_array

if TYPE_CHECKING:
    from .client import Client

FILE_HANDLE_BASE = 0x40000000
_DISPOSITIONS = {
    CREATE_NEW: os.O_CREAT | os.O_EXCL,
    CREATE_ALWAYS: os.O_CREAT | os.O_TRUNC,
    OPEN_EXISTING: 0,
    OPEN_ALWAYS: os.O_CREAT,
    TRUNCATE_EXISTING: os.O_TRUNC,
}
_ERRORS = {  # errno -> Win32 code, as Windows reports the same failure
    errno.ENOENT: WinError.ERROR_FILE_NOT_FOUND,
    errno.ENOTDIR: WinError.ERROR_PATH_NOT_FOUND,
    errno.EEXIST: WinError.ERROR_FILE_EXISTS,
    errno.EACCES: WinError.ERROR_ACCESS_DENIED,
    errno.EPERM: WinError.ERROR_ACCESS_DENIED,
    errno.EISDIR: WinError.ERROR_ACCESS_DENIED,
    errno.EROFS: WinError.ERROR_ACCESS_DENIED,
    errno.ETXTBSY: WinError.ERROR_SHARING_VIOLATION,
    errno.ENAMETOOLONG: WinError.ERROR_FILENAME_EXCED_RANGE,
    errno.ELOOP: WinError.ERROR_INVALID_NAME,
    errno.EMFILE: WinError.ERROR_TOO_MANY_OPEN_FILES,
    errno.ENFILE: WinError.ERROR_TOO_MANY_OPEN_FILES,
    errno.ENOSPC: WinError.ERROR_DISK_FULL,
}


class FileHandle:
    """An open file: its descriptor, what it was opened for and with which sharing."""

    __slots__ = ("fd", "path", "readable", "writable", "share", "identity")

    def __init__(self, fd: int, path: str, readable: bool, writable: bool, share: int, identity: tuple[int, int]):
        self.fd = fd
        self.path = path
        self.readable = readable
        self.writable = writable
        self.share = share
        self.identity = identity  # (device, inode): the same file under any name


def _win32_error(exc: OSError, path: str) -> None:
    code = _ERRORS.get(exc.errno, WinError.ERROR_ACCESS_DENIED)
    if code == WinError.ERROR_FILE_NOT_FOUND and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        code = WinError.ERROR_PATH_NOT_FOUND  # the folder is missing, not the file (FM-07)
    raise_for(code, f"{path}: {exc.strerror}")


class Files:
    """The process's file handles."""

    def __init__(self) -> None:
        self.handles: dict[int, FileHandle] = {}
        self._numbers = itertools.count(FILE_HANDLE_BASE, 4)
        self._lock = threading.Lock()

    def create(self, path: str, access: int, share: int, disposition: int) -> tuple[int, bool]:
        """CreateFile: (handle, whether the file existed). Raises ShmheapError with the Win32
        code of the failure; nothing is opened or created then."""
        if disposition not in _DISPOSITIONS:
            raise_for(WinError.ERROR_INVALID_PARAMETER, f"creation disposition {disposition}")
        if access & GENERIC_ALL:
            access |= GENERIC_READ | GENERIC_WRITE
        readable, writable = bool(access & GENERIC_READ), bool(access & GENERIC_WRITE)
        if disposition == TRUNCATE_EXISTING and not writable:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "TRUNCATE_EXISTING needs GENERIC_WRITE (FM-10)")
        if not path:
            raise_for(WinError.ERROR_PATH_NOT_FOUND, "an empty path")
        try:
            found = os.stat(path)
        except OSError:
            found = None  # (open below says why, if it is more than "not there")
        if found is not None and stat.S_ISDIR(found.st_mode):  # whatever the disposition (FM-08)
            raise_for(WinError.ERROR_ACCESS_DENIED, f"{path} is a folder")
        mode = os.O_RDWR if readable and writable else os.O_WRONLY if writable else os.O_RDONLY
        with self._lock:
            if found is not None:
                self._check_sharing(path, (found.st_dev, found.st_ino), readable, writable, share)
            try:
                fd = os.open(path, mode | _DISPOSITIONS[disposition] | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                _win32_error(exc, path)
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):  # (made a folder since the check above)
                os.close(fd)
                raise_for(WinError.ERROR_ACCESS_DENIED, f"{path} is a folder")
            handle = next(self._numbers)
            self.handles[handle] = FileHandle(fd, path, readable, writable, share, (info.st_dev, info.st_ino))
        return handle, found is not None

    def _check_sharing(self, path: str, identity: tuple[int, int], readable: bool, writable: bool,
                       share: int) -> None:
        """ERROR_SHARING_VIOLATION if an open handle of ours on the file (`identity`: device,
        inode) does not share what this open asks, or this open does not share what it holds
        (FM-13)."""
        for other in self.handles.values():
            if other.identity != identity:
                continue
            if ((readable and not other.share & FILE_SHARE_READ) or (writable and not other.share & FILE_SHARE_WRITE)
                    or (other.readable and not share & FILE_SHARE_READ)
                    or (other.writable and not share & FILE_SHARE_WRITE)):
                raise_for(WinError.ERROR_SHARING_VIOLATION, f"{path} is open here without that sharing")

    def get(self, handle: int) -> FileHandle:
        """The open file of `handle`; ERROR_INVALID_HANDLE if it is none of ours."""
        found = self.handles.get(handle)
        if found is None:
            raise_for(WinError.ERROR_INVALID_HANDLE, f"no file handle {handle:#x} in this process")
        return found

    def is_file_handle(self, handle: int) -> bool:
        """Whether `handle` is one of ours (else it may be a section's)."""
        return handle in self.handles

    def close(self, handle: int) -> None:
        """CloseHandle of a file: its mappings and views keep the file open (FM-69)."""
        with self._lock:
            os.close(self.get(handle).fd)
            del self.handles[handle]

    def size(self, handle: int) -> int:
        """The file's size in bytes (GetFileSizeEx)."""
        return os.fstat(self.get(handle).fd).st_size


files = Files()  # the process's: file handles outlive connections, as descriptors do


# ---- the Pythonic form: a mapped file as a buffer ----------------------------------------

_MODES = {  # mode -> (CreateFile access, disposition, section protection, view access)
    "r": (GENERIC_READ, OPEN_EXISTING, PAGE_READONLY, FILE_MAP_READ),
    "r+": (GENERIC_READ | GENERIC_WRITE, OPEN_EXISTING, PAGE_READWRITE, FILE_MAP_WRITE),
    "w+": (GENERIC_READ | GENERIC_WRITE, CREATE_ALWAYS, PAGE_READWRITE, FILE_MAP_WRITE),
}


class _FileViewMethods:
    """What a FileView adds to its bytes (a ctypes array over the view: the buffer protocol,
    so memoryview(), numpy.frombuffer() and numpy.asarray() take it with no copy)."""

    def view(self) -> memoryview:
        """A memoryview of the view's bytes (no copy), writable if the view is."""
        return memoryview(self).cast("B")

    def numpy(self, dtype: Any = "uint8", shape: Any = None) -> Any:
        """A numpy array over the view's bytes (no copy). Needs numpy."""
        return as_array(self.view(), dtype, shape)

    def flush(self) -> None:
        """FlushViewOfFile of the whole view: start writing its dirty pages to the file."""
        self.client.section_flush(self.address, 0)

    def close(self) -> None:
        """Unmap the view and close the mapping's handle: the bytes are no longer this
        process's to touch (a view kept past this faults, as on Windows). Idempotent."""
        if self.handle is None:
            return
        handle, self.handle = self.handle, None
        try:
            self.client.section_unmap(self.address)
        finally:
            self.client.section_close(handle)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileView(address={self.address:#x}, size={self.size}, name={self.name!r})"


@functools.lru_cache(maxsize=64)
def _file_view_type(size: int) -> type:
    return type("FileView", (ctypes.c_ubyte * size, _FileViewMethods), {})


def map_file(client: Client, path: str | None, mode: str = "r", name: str | None = None, size: int = 0) -> Any:
    """A view of a whole file section as a FileView: `path` opened with `mode` ("r" read-only,
    "r+" read-write, "w+" created or truncated, then `size` bytes), named `name` for other
    processes to map (path None: the existing section of that name). `size` 0 is the file's
    size; a larger one extends a writable file. Raises ShmheapError with the Win32 code."""
    if mode not in _MODES:
        raise_for(WinError.ERROR_INVALID_PARAMETER, f"mode must be one of {sorted(_MODES)}, not {mode!r}")
    access, disposition, protect, view_access = _MODES[mode]
    if path is None:
        if not name:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "a path, or the name of a file section")
        handle = client.section_open(view_access, name)
    else:
        if mode == "w+" and not size:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "mode 'w+' makes a new file: give its size")
        file_handle, _ = files.create(os.fspath(path), access, FILE_SHARE_READ | FILE_SHARE_WRITE, disposition)
        try:
            handle, _ = client.file_mapping_create(files.get(file_handle).fd, protect, size, name)
        finally:
            files.close(file_handle)  # the section keeps the file open
    try:
        address = client.section_map(handle, view_access, 0, 0)
    except BaseException:
        client.section_close(handle)
        raise
    length = client._section(handle)[1]  # a view of the whole section
    view = _file_view_type(length).from_address(address)
    view.client, view.handle, view.address, view.size, view.name = client, handle, address, length, name
    return view
