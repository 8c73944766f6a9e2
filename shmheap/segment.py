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
    address   an integer offset into the segment; the same bytes in every process. 0 is NULL.
    handle    an integer naming an object: a heap (its first region's base), a global object
              (its address if fixed, a stamped table slot if moveable), a section.
    owner     who a region or object belongs to: a process (by pid) or the system (0).
    commit    backing pages with memory (posix_fallocate); decommit gives it back (MADV_REMOVE).

Layout: the first 64 KiB are the header below and are never handed out, so no valid address
is below `MIN_ADDRESS`. The rest is sparse: only committed pages cost memory.
"""

import hashlib
import mmap
import os
import struct

import posix_ipc

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")  # unit of commit and protection (4096 on x86-64)
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1  # address >> PAGE_SHIFT is its page number
ALLOCATION_GRANULARITY = 64 * 1024  # Win32 reservation granularity
HEADER_SIZE = ALLOCATION_GRANULARITY  # offsets below this are never valid addresses
MIN_ADDRESS = HEADER_SIZE  # lpMinimumApplicationAddress, as on Windows
DEFAULT_SIZE = 64 * 2**30  # sparse; only committed pages cost memory

MAGIC = b"SHMHEAP\0"
LAYOUT_VERSION = 1
# magic, layout version, page size, granularity, segment size, daemon pid, boot generation
_HEADER = struct.Struct("<8sIIIQQQ")


class Header:
    __slots__ = ("layout_version", "page_size", "granularity", "size", "daemon_pid", "generation")

    def __init__(self, layout_version, page_size, granularity, size, daemon_pid, generation):
        self.layout_version = layout_version
        self.page_size = page_size
        self.granularity = granularity
        self.size = size
        self.daemon_pid = daemon_pid
        self.generation = generation


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


def default_socket_path():
    """`$SHMHEAP_SOCKET`, else `$XDG_RUNTIME_DIR/shmheap/shmheapd.sock`, else /tmp/shmheap-$UID/."""
    path = os.environ.get("SHMHEAP_SOCKET")
    if path:
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = os.path.join(runtime, "shmheap") if runtime else f"/tmp/shmheap-{os.getuid()}"
    return os.path.join(folder, "shmheapd.sock")


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
    """Create the segment (mode 0600, exclusive), sparse to `size`, and write its header.

    Returns the posix_ipc object; the caller owns its fd and must unlink it at shutdown.
    """
    if size % ALLOCATION_GRANULARITY or size <= HEADER_SIZE:
        raise ValueError(f"segment size must be a multiple of 64 KiB above 64 KiB, got {size}")
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    header = _HEADER.pack(MAGIC, LAYOUT_VERSION, PAGE_SIZE, ALLOCATION_GRANULARITY, size,
                          daemon_pid, generation)
    os.pwrite(shm.fd, header, 0)
    return shm


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


def map_segment(name, size):
    """Map the whole segment shared and read-write; returns the mmap (the fd is closed)."""
    shm = posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        shm.close_fd()
