"""The segment as every process maps it: at the base its daemon chose, so that an address is
a real pointer, the same number for the same bytes in every process, usable by ctypes and
numpy; a process that cannot map it there is told why."""

import ctypes
import mmap

import numpy
import posix_ipc
import pytest

import shmheap
from shmheap import segment
from shmheap.errors import WinError

from win32_checks import ok


def test_a_global_pointer_works_with_ctypes_in_every_process(win32, peers):
    handle = ok(win32, win32.GlobalAlloc, win32.GMEM_MOVEABLE, 64)
    pointer = ok(win32, win32.GlobalLock, handle)
    ctypes.memmove(pointer, b"written by ctypes", 17)  # a real pointer: no facade in between
    peer = peers()
    theirs = peer.ok("GlobalLock", handle)
    assert theirs == pointer  # the same number in the other process
    assert peer.ok("read", theirs, 17) == b"written by ctypes"
    peer.call("write", theirs + 32, b"answer")
    assert ctypes.string_at(pointer + 32, 6) == b"answer"
    assert ok(win32, win32.GlobalUnlock, handle) is True  # the peer's lock still holds it
    assert peer.call("GlobalUnlock", handle) == (False, 0)  # the count reached 0


def test_numpy_views_a_heap_block_by_pointer_with_no_copy(win32):
    heap = win32.GetProcessHeap()
    pointer = ok(win32, win32.HeapAlloc, heap, win32.HEAP_ZERO_MEMORY, 8 * 1000)
    array = numpy.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_double)), shape=(1000,))
    array[:] = numpy.arange(1000)
    assert array.ctypes.data == pointer
    assert win32.read(pointer + 8 * 999, 8) == numpy.float64(999).tobytes()
    win32.write(pointer, numpy.float64(-1).tobytes())
    assert array[0] == -1.0  # the same bytes, both ways
    del array
    ok(win32, win32.HeapFree, heap, 0, pointer)


def test_addresses_lie_at_the_base_the_daemon_chose(client, daemon):
    info = client.system_info()
    base = info["base"]
    assert segment.BASE_LOWEST <= base < segment.BASE_HIGHEST and base % segment.BASE_ALIGN == 0
    shm = posix_ipc.SharedMemory(daemon.segment)
    try:
        assert segment.read_header(shm.fd).base == base  # recorded in the header too
    finally:
        shm.close_fd()
    address = client.virtual_alloc(0, 65536)
    assert base + segment.HEADER_SIZE <= address < base + info["size"]
    client.view(address, 5, write=True)[:] = b"bytes"
    assert ctypes.string_at(address, 5) == b"bytes"


def test_one_process_maps_two_daemons_at_their_own_bases(make_daemon):
    first, second = make_daemon(), make_daemon()
    with shmheap.connect(first.socket, autostart=False) as a, shmheap.connect(second.socket, autostart=False) as b:
        assert a.info["base"] != b.info["base"]
        pa, pb = a.virtual_alloc(0, 4096), b.virtual_alloc(0, 4096)
        ctypes.memmove(pa, b"first", 5)
        ctypes.memmove(pb, b"second", 6)
        assert bytes(a.view(pa, 5)) == b"first" and bytes(b.view(pb, 6)) == b"second"
        with shmheap.connect(first.socket, autostart=False) as again:  # one mapping, two clients
            assert bytes(again.raw_view(pa, 5)) == b"first"
        assert ctypes.string_at(pa, 5) == b"first"  # still mapped for `a`


def test_a_process_that_cannot_map_at_the_base_is_told_why(daemon):
    shm = posix_ipc.SharedMemory(daemon.segment)
    try:
        header = segment.read_header(shm.fd)
    finally:
        shm.close_fd()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    squatter = libc.mmap(header.base + (1 << 20), 4096, mmap.PROT_READ,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100000, -1, 0)  # MAP_FIXED_NOREPLACE
    assert squatter == header.base + (1 << 20)
    try:
        with pytest.raises(shmheap.ShmheapError) as info:
            shmheap.connect(daemon.socket, autostart=False)
        assert info.value.winerror == WinError.ERROR_INVALID_ADDRESS
        assert "cannot map the segment" in str(info.value) and f"{header.base:#x}" in str(info.value)
    finally:
        libc.munmap(squatter, 4096)
    with shmheap.connect(daemon.socket, autostart=False) as client:  # with the way clear it maps
        assert client.info["base"] == header.base
