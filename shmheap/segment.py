"""The segment: one POSIX shared-memory object that is the address space of every process.

Glossary (each term is used in this one sense across shmheap):

    segment   the POSIX shm object the daemon creates; mapped whole by every process.
    page      a 4 KiB OS page, the unit of commit, decommit and protection.
    granule   64 KiB, the allocation granularity: regions start on one.
    region    a reservation made at granule alignment; its pages are each reserved or
              committed. A heap's regions are its own; the page table's describe everyone's.
    run       in the page table, a stretch of a region's pages that share one state (reserved,
              or committed with one protection).
    slab      in a heap, a page or 64 KiB of committed memory cut into equal slots of one size
              class, for small blocks.
    block     a heap allocation carved out of committed pages.
    base      the virtual address at which every process maps the segment, chosen by its
              daemon (at random in a wide range, so two daemons' segments do not collide).
    address   a real pointer, base + an offset into the segment: the same number names the
              same bytes in every process, and ctypes, cffi or numpy can use it. 0 is NULL.
    handle    an integer naming an object: a heap (its first region's base), a global object
              (its address if fixed, a stamped table slot if moveable), a section.
    owner     who a region or object belongs to: a process (by pid) or the system (0).
    commit    backing pages with memory (posix_fallocate); decommit gives it back (MADV_REMOVE).
    purge     a heap giving back, a delay after the frees that left them, the pages it keeps
              committed for reuse (shmheap/heap.py).
    hold      a process's claim on a global object it allocated, attached or locked: what it
              may touch, and what keeps the object's memory (daemon/handles.py).
    post      to send a request without waiting for its reply, which the next call reads
              (shmheap/connection.py); a deferred request waits for a later write instead.
    opener    the process holding the clipboard open; the *owner process* is the one that
              last emptied it, asked to *render* the formats it *promised* (set with no data).
    format    a clipboard data type (CF_* or registered); a *synthesized* one is made by the
              clipboard from another (text formats, daemon/clipboard.py).
    park      the daemon answers a request later, when something happens (a clipboard wait).

Layout: the first 64 KiB are the header below and are never handed out, so no valid address
is below base + HEADER_SIZE. The rest is sparse: only committed pages cost memory.

Mapping: `map_at` maps the segment at its base with MAP_FIXED_NOREPLACE (through ctypes, as
Python's mmap cannot choose an address), refusing to replace anything already mapped there,
and `address_space` gives a memoryview whose index is the address, so `memory[p:p + n]` are
the n bytes at pointer p. The daemon maps its segment read-write; a client maps it with no
access and opens what it may touch as the daemon says (shmheap/mapping.py).
"""

import ctypes
import errno
import hashlib
import mmap
import os
import random
import stat
import struct
from bisect import bisect_left, bisect_right

import posix_ipc

from .errors import WinError, raise_for

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # unit of commit and protection (4096 on x86-64)
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1  # address >> PAGE_SHIFT is its page number
ALLOCATION_GRANULARITY = 64 * 1024  # Win32 reservation granularity
HEADER_SIZE = ALLOCATION_GRANULARITY  # offsets below this are never valid addresses
DEFAULT_SIZE = 64 * 2**30  # sparse; only committed pages cost memory
MAX_SIZE = 1 << 40  # a segment ends below BASE_HIGHEST + MAX_SIZE < 2**47, the user space
# Bases are 2 MiB aligned in [16 TiB, 80 TiB): far from where Linux puts binaries (0x55...),
# the heap and shared libraries (0x7f...). A process maps several segments (its daemons'),
# each where its own daemon chose: at this grain two 256 MiB ones overlap about once in
# 130,000 draws, and a clash is a clear error (Client._on_open).
BASE_LOWEST = 0x1000_0000_0000
BASE_HIGHEST = 0x5000_0000_0000
BASE_ALIGN = 1 << 21

MAGIC = b"SHMHEAP\0"
LAYOUT_VERSION = 2
# magic, layout version, page size, granularity, segment size, daemon pid, boot generation, base
_HEADER = struct.Struct("<8sIIIQQQQ")


class Header:
    __slots__ = ("layout_version", "page_size", "granularity", "size", "daemon_pid", "generation", "base")

    def __init__(self, layout_version, page_size, granularity, size, daemon_pid, generation, base):
        self.layout_version = layout_version
        self.page_size = page_size
        self.granularity = granularity
        self.size = size
        self.daemon_pid = daemon_pid
        self.generation = generation
        self.base = base


def round_up(value, unit):
    return -(-value // unit) * unit


def round_down(value, unit):
    return value - value % unit


def pages_in(size):
    """Whole pages needed to hold `size` bytes."""
    return -(-size // PAGE_SIZE)


def as_array(view, dtype="uint8", shape=None):
    """A numpy array over the bytes of `view` (no copy). Needs numpy (the `numpy` extra)."""
    import numpy

    array = numpy.frombuffer(view, dtype=dtype)
    return array if shape is None else array.reshape(shape)


class Runs:
    """`pages` pages as runs of one value each: parallel sorted lists where values[i] holds
    for pages starts[i] .. starts[i+1]-1 and no two neighbours are equal, so every operation
    costs O(runs touched), not O(pages). The page table keeps a region's page states so;
    a client keeps what its own mapping allows so."""

    __slots__ = ("pages", "starts", "values")

    def __init__(self, pages, value):
        self.pages = pages
        self.starts = [0]
        self.values = [value]

    def runs(self, first, last):
        """(start, stop, value) for the runs overlapping pages [first, last), clipped to it."""
        starts, values = self.starts, self.values
        i = bisect_right(starts, first) - 1
        while i < len(starts) and starts[i] < last:
            stop = starts[i + 1] if i + 1 < len(starts) else self.pages
            yield max(starts[i], first), min(stop, last), values[i]
            i += 1

    def set_pages(self, first, last, value):
        """Give pages [first, last) one value, splicing and re-coalescing the runs."""
        if first >= last:
            return
        starts, values = self.starts, self.values
        lo = bisect_left(starts, first)
        hi = bisect_right(starts, last)
        new_starts, new_values = [first], [value]
        if last < self.pages:
            new_starts.append(last)
            new_values.append(values[hi - 1])
        starts[lo:hi] = new_starts
        values[lo:hi] = new_values
        # Only the runs around the splice can now equal a neighbour.
        for i in range(min(lo + 2, len(starts) - 1), max(lo - 1, 0), -1):
            if values[i] == values[i - 1]:
                del starts[i], values[i]


SOCKET_ENV = "SHMHEAP_SOCKET"  # the socket of the daemon a process uses unless told otherwise


def default_socket_path():
    """`$SHMHEAP_SOCKET`, else `$XDG_RUNTIME_DIR/shmheap/shmheapd.sock`, else /tmp/shmheap-$UID/."""
    path = os.environ.get(SOCKET_ENV)
    if path:
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = os.path.join(runtime, "shmheap") if runtime else f"/tmp/shmheap-{os.getuid()}"
    return os.path.join(folder, "shmheapd.sock")


def check_private_dir(folder, create=False):
    """The socket's folder must be this user's alone: a directory (not a symlink) owned by
    this uid, writable by nobody else. Made so (0700) if missing and `create`. Raises
    ShmheapPermissionError (ERROR_ACCESS_DENIED) saying what is wrong: a folder another user
    controls could hold a socket, a log or a lock file of theirs."""
    if create and not os.path.lexists(folder):
        os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass  # another process made it meanwhile: checked below like any other
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        raise_for(WinError.ERROR_ACCESS_DENIED, f"the socket folder {folder} does not exist")
    if stat.S_ISLNK(info.st_mode):
        raise_for(WinError.ERROR_ACCESS_DENIED, f"the socket folder {folder} is a symlink: refused")
    if not stat.S_ISDIR(info.st_mode):
        raise_for(WinError.ERROR_ACCESS_DENIED, f"the socket folder {folder} is not a directory")
    if info.st_uid != os.getuid():
        raise_for(WinError.ERROR_ACCESS_DENIED, f"the socket folder {folder} belongs to uid {info.st_uid}, not to us: refused")
    if info.st_mode & 0o022:
        raise_for(WinError.ERROR_ACCESS_DENIED, f"the socket folder {folder} is writable by others"
                  f" (mode {stat.S_IMODE(info.st_mode):o}): refused; make it 0700")


def segment_name(socket_path):
    """The shm name for the daemon on `socket_path`: per user and per socket, so two daemons never collide."""
    digest = hashlib.sha1(os.path.abspath(socket_path).encode()).hexdigest()[:16]
    return f"/shmheap-{os.getuid()}-{digest}"


def parse_size(text):
    """'64G' -> 68719476736. Accepts a plain byte count or a K/M/G/T suffix (powers of 1024)."""
    text = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if text and text[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(text[-1]) + 1)
        text = text[:-1]
    try:
        value = int(float(text) * scale)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if value < 0:
        raise ValueError(f"size must not be negative: {text!r}")
    return value


def round_size(size):
    """Segment sizes are whole granules."""
    return max(round_up(size, ALLOCATION_GRANULARITY), 2 * ALLOCATION_GRANULARITY)


def create(name, size, daemon_pid, generation):
    """Create the segment (mode 0600, exclusive), sparse to `size`, map it read-write at a
    base chosen at random (retrying where something is mapped already) and write its header.

    Returns (the posix_ipc object, the base); the caller owns the fd, must unmap the segment
    and unlink it at shutdown.
    """
    if size % ALLOCATION_GRANULARITY or size <= HEADER_SIZE or size > MAX_SIZE:
        raise ValueError(f"segment size must be a multiple of 64 KiB above 64 KiB, at most 1 TiB, got {size}")
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        for attempt in range(64):
            base = random.randrange(BASE_LOWEST // BASE_ALIGN, BASE_HIGHEST // BASE_ALIGN) * BASE_ALIGN
            try:
                map_at(name, base, size, mmap.PROT_READ | mmap.PROT_WRITE, shm.fd)
                break
            except FileExistsError:
                continue  # something lives there in this process: try elsewhere
        else:
            raise OSError(f"no free place to map a segment of {size} bytes")
        header = _HEADER.pack(MAGIC, LAYOUT_VERSION, PAGE_SIZE, ALLOCATION_GRANULARITY, size,
                              daemon_pid, generation, base)
        os.pwrite(shm.fd, header, 0)
    except BaseException:
        shm.close_fd()
        unlink_quietly(name)
        raise
    return shm, base


def unlink_quietly(name):
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def read_header(fd):
    raw = os.pread(fd, _HEADER.size, 0)
    if len(raw) < _HEADER.size:
        raise ValueError("segment too small to hold a header")
    magic, *fields = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError("not a shmheap segment (bad magic)")
    header = Header(*fields)
    if header.layout_version != LAYOUT_VERSION:
        raise ValueError(f"segment layout {header.layout_version}, expected {LAYOUT_VERSION}")
    return header


# ---- mapping at the base -----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_memory_at = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_at.restype = ctypes.py_object
_memory_at.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17: fail with EEXIST rather than replace a mapping
_MAP_FIXED = 0x10  # replace what is mapped there: a file view over the segment's own pages
_MS_ASYNC = 1
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = 2**64 - 1
_PYBUF_WRITE = 0x200

def map_at(name, base, size, prot, fd=None, owner=None):
    """Map segment `name` (or the open `fd`) shared at exactly `base` with `prot`. Raises
    FileExistsError if something is mapped in the way, PermissionError if the segment is not
    `owner`'s (the daemon's uid), OSError for other failures."""
    shm = posix_ipc.SharedMemory(name) if fd is None else None
    try:
        if shm is not None and owner is not None and os.fstat(shm.fd).st_uid != owner:
            raise PermissionError(errno.EACCES, f"segment {name} is not the daemon's (uid {owner})")
        got = _libc.mmap(base, size, prot, mmap.MAP_SHARED | _MAP_FIXED_NOREPLACE,
                         fd if shm is None else shm.fd, 0)
    finally:
        if shm is not None:
            shm.close_fd()
    if got in (None, _MAP_FAILED):
        _raise_errno(f"cannot map the segment at {base:#x}")
    if got != base:  # a kernel older than 4.17 takes the flag as a hint
        _libc.munmap(got, size)
        raise OSError(errno.EEXIST, f"cannot map the segment at {base:#x} (the kernel chose {got:#x})")


def map_file_over(address, length, fd, offset):
    """Map `length` bytes of the file `fd` from `offset` shared at exactly `address`, over the
    segment's pages there, with no access yet (the daemon's grant opens them): a view of a
    file section. Raises OSError."""
    got = _libc.mmap(address, length, 0, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    if got in (None, _MAP_FAILED):
        _raise_errno(f"cannot map the file at {address:#x}")


def map_segment_over(name, base, address, length):
    """Put the segment `name` (mapped at `base`) back at [address, address+length), no access:
    the last view of a file section there is gone, and the address space is the segment's
    again. Raises OSError."""
    shm = posix_ipc.SharedMemory(name)
    try:
        got = _libc.mmap(address, length, 0, mmap.MAP_SHARED | _MAP_FIXED, shm.fd, address - base)
    finally:
        shm.close_fd()
    if got in (None, _MAP_FAILED):
        _raise_errno(f"cannot map the segment back at {address:#x}")


def flush(address, length):
    """msync(MS_ASYNC): start writing the dirty pages of a file view to the file."""
    if _libc.msync(address, length, _MS_ASYNC):
        _raise_errno(f"cannot flush {address:#x}+{length:#x}")


def unmap(base, size):
    """Unmap a segment: a stale pointer into it then faults rather than reach memory that is
    gone."""
    _libc.munmap(base, size)


def protect(address, length, prot):
    """mprotect: what this process may do with [address, address+length) from now on."""
    if _libc.mprotect(address, length, prot):
        _raise_errno(f"cannot protect {address:#x}+{length:#x}")


def _raise_errno(what):
    error = ctypes.get_errno()
    raise (FileExistsError if error == errno.EEXIST else OSError)(error, f"{what}: {os.strerror(error)}")


def address_space(end):
    """A writable memoryview whose index is the address: memory[p:p + n] are the n bytes at
    pointer p. Only what is mapped may be touched (the segments this process attached)."""
    return _memory_at(None, end, _PYBUF_WRITE)


def remove(address, length):
    """MADV_REMOVE: punch [address, address+length) of a mapped segment out of tmpfs."""
    if _libc.madvise(address, length, mmap.MADV_REMOVE):
        _raise_errno(f"cannot remove {address:#x}+{length:#x}")
