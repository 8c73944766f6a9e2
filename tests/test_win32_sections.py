"""Named file mappings of the facade (`shmheap.win32`: CreateFileMapping, OpenFileMapping,
MapViewOfFile, UnmapViewOfFile, CloseHandle) against the contract (../shared/DESIGN.md, "Global
memory, sections, clipboard"): pagefile-backed sections only (hFile INVALID_HANDLE_VALUE),
opened by name from any process, views at 64 KiB offsets that show the same bytes at the same
address in every process, FILE_MAP_READ views read-only, and reference counting per process:
a section lives while any process holds a handle or a view, and vanishes (name gone, pages
given back to the machine) when the last is closed or its holder exits.

Failure returns 0 / FALSE and sets GetLastError(); results and errors are Win32's
(ERROR_ALREADY_EXISTS on opening an existing name, ERROR_FILE_NOT_FOUND for a missing one,
ERROR_MAPPED_ALIGNMENT for an offset off the 64 KiB grid, ERROR_ACCESS_DENIED for views past
the end or write views of read-only sections, ERROR_INVALID_HANDLE / ERROR_INVALID_ADDRESS for
handles and addresses that name nothing). Multi-process tests run real processes
(multiprocessing, spawn) that serve Win32 calls over a pipe (`Peer`).
"""

import uuid

import pytest

from shmheap.constants import (
    FILE_MAP_ALL_ACCESS, FILE_MAP_READ, FILE_MAP_WRITE, INVALID_HANDLE_VALUE, MEM_COMMIT, MEM_FREE,
    MEM_MAPPED, MEM_PRIVATE, MEM_RESERVE, PAGE_READONLY, PAGE_READWRITE,
)
from shmheap.errors import ShmheapPermissionError, WinError

from win32_checks import call, expect, ok, pattern

from conftest import wait_until

GRANULE = 0x10000
SIZE = 4 * GRANULE  # the sections' size in most tests
MiB = 2**20

ERROR_SUCCESS = WinError.ERROR_SUCCESS
ERROR_FILE_NOT_FOUND = WinError.ERROR_FILE_NOT_FOUND
ERROR_ACCESS_DENIED = WinError.ERROR_ACCESS_DENIED
ERROR_INVALID_HANDLE = WinError.ERROR_INVALID_HANDLE
ERROR_INVALID_PARAMETER = WinError.ERROR_INVALID_PARAMETER
ERROR_ALREADY_EXISTS = WinError.ERROR_ALREADY_EXISTS
ERROR_INVALID_ADDRESS = WinError.ERROR_INVALID_ADDRESS
ERROR_MAPPED_ALIGNMENT = WinError.ERROR_MAPPED_ALIGNMENT


# ---- helpers ---------------------------------------------------------------------------------


def unique_name(tag="map"):
    return f"shmheap-test-{tag}-{uuid.uuid4().hex}"


def create(w, name, size=SIZE, protect=PAGE_READWRITE):
    """A new section: a non-zero handle and the last error set to ERROR_SUCCESS."""
    h, error = call(w, w.CreateFileMapping, INVALID_HANDLE_VALUE, None, protect, size >> 32,
                    size & 0xFFFFFFFF, name)
    assert h, f"CreateFileMapping({name!r}, {size:#x}) failed with error {error}"
    assert error == ERROR_SUCCESS, f"a new section set the last error to {error}"
    return h


def open_mapping(w, name, access=FILE_MAP_ALL_ACCESS):
    h, error = call(w, w.OpenFileMapping, access, False, name)
    assert h, f"OpenFileMapping({name!r}) failed with error {error}"
    return h


def map_view(w, h, access=FILE_MAP_ALL_ACCESS, offset=0, size=0):
    return ok(w, w.MapViewOfFile, h, access, offset >> 32, offset & 0xFFFFFFFF, size)


def gone(w, name):
    """True if no section made under this name lives any more (the daemon's list: the name
    itself goes earlier, with the last handle, FM-45)."""
    return not any(row["name"] == name for row in _client().section_list())


def name_gone(w, name):
    """True if OpenFileMapping of the name fails with ERROR_FILE_NOT_FOUND."""
    h, error = call(w, w.OpenFileMapping, FILE_MAP_READ, False, name)
    if h:
        w.CloseHandle(h)  # do not keep it alive by looking
        return False
    assert error == ERROR_FILE_NOT_FOUND, f"OpenFileMapping({name!r}) failed with {error}"
    return True


def _client():
    from shmheap import client as client_module
    return client_module.default_client()


def connected_baseline(w, daemon):
    """The daemon's resident bytes once this process is connected (its process heap counts)."""
    w.GetSystemInfo()  # connects
    return daemon.resident_bytes()


# ---- another real process serving Win32 calls ----------------------------------------------------


# ---- CreateFileMapping / OpenFileMapping ---------------------------------------------------------

def test_create_new_then_open_existing_name(win32):
    name = unique_name()
    h = create(win32, name)
    assert h % 4 == 0
    again, error = call(win32, win32.CreateFileMapping, INVALID_HANDLE_VALUE, None, PAGE_READWRITE,
                        0, SIZE, name)
    assert again == h and error == ERROR_ALREADY_EXISTS
    assert open_mapping(win32, name) == h
    other = create(win32, unique_name())
    assert other != h
    # Every handle counts: three on the first section, so three closes.
    for _ in range(3):
        expect(win32, win32.CloseHandle, h, result=True)
    assert gone(win32, name)
    expect(win32, win32.CloseHandle, other, result=True)


def test_invalid_handle_value_as_minus_one(win32):
    name = unique_name()
    h, error = call(win32, win32.CreateFileMapping, -1, None, PAGE_READWRITE, 0, SIZE, name)
    assert h and error == ERROR_SUCCESS  # (HANDLE)-1 is INVALID_HANDLE_VALUE
    expect(win32, win32.CloseHandle, h, result=True)


@pytest.mark.parametrize("file_handle", [0, 3, 0x1234, INVALID_HANDLE_VALUE - 1])
def test_a_real_file_handle_is_refused(win32, file_handle):
    name = unique_name()
    expect(win32, win32.CreateFileMapping, file_handle, None, PAGE_READWRITE, 0, SIZE, name,
           result=0, error=ERROR_INVALID_HANDLE)
    assert gone(win32, name)


def test_open_of_a_missing_name(win32):
    expect(win32, win32.OpenFileMapping, FILE_MAP_ALL_ACCESS, False, unique_name(), result=0,
           error=ERROR_FILE_NOT_FOUND)
    name = unique_name()
    expect(win32, win32.CloseHandle, create(win32, name), result=True)
    expect(win32, win32.OpenFileMapping, FILE_MAP_READ, False, name, result=0,
           error=ERROR_FILE_NOT_FOUND)


def test_zero_size_pagefile_section_is_refused(win32):
    name = unique_name()
    expect(win32, win32.CreateFileMapping, INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0, 0, name,
           result=0, error=ERROR_INVALID_PARAMETER)
    assert gone(win32, name)


# ---- MapViewOfFile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [1, 0x1000, GRANULE + 0x1000, GRANULE // 2])
def test_view_offsets_must_be_multiples_of_64k(win32, offset):
    h = create(win32, unique_name())
    expect(win32, win32.MapViewOfFile, h, FILE_MAP_ALL_ACCESS, 0, offset, 0x1000, result=0,
           error=ERROR_MAPPED_ALIGNMENT)
    assert ERROR_MAPPED_ALIGNMENT == 1132
    assert map_view(win32, h, offset=GRANULE, size=0x1000)  # on the grid it works


def test_view_size_0_maps_to_the_end(win32):
    h = create(win32, unique_name())
    base = map_view(win32, h)
    info = win32.VirtualQuery(base)
    assert (info.BaseAddress, info.AllocationBase, info.RegionSize) == (base, base, SIZE)
    view = map_view(win32, h, offset=2 * GRANULE)
    info = win32.VirtualQuery(view)
    assert info.AllocationBase == base and info.RegionSize == SIZE - 2 * GRANULE
    # Both views show the section's bytes, to its last one.
    win32.write(base + SIZE - 4, b"tail")
    assert win32.read(view + SIZE - 2 * GRANULE - 4, 4) == b"tail"
    win32.write(view, b"third granule")
    assert win32.read(base + 2 * GRANULE, 13) == b"third granule"


@pytest.mark.parametrize("offset,size", [
    (0, SIZE + 1),
    (0, SIZE + GRANULE),
    (SIZE - GRANULE, GRANULE + 1),
    (SIZE, 0),
    (SIZE, 0x1000),
    (SIZE + GRANULE, 0),
    (1 << 32, 0),
])
def test_views_past_the_end_are_refused(win32, offset, size):
    h = create(win32, unique_name())
    expect(win32, win32.MapViewOfFile, h, FILE_MAP_ALL_ACCESS, offset >> 32, offset & 0xFFFFFFFF,
           size, result=0, error=ERROR_ACCESS_DENIED)
    assert map_view(win32, h, offset=SIZE - GRANULE, size=GRANULE)  # up to the end is fine
    assert map_view(win32, h, size=SIZE)


@pytest.mark.parametrize("access", [FILE_MAP_WRITE, FILE_MAP_ALL_ACCESS, FILE_MAP_WRITE | FILE_MAP_READ])
def test_write_view_of_a_read_only_section_is_refused(win32, access):
    h = create(win32, unique_name(), protect=PAGE_READONLY)
    expect(win32, win32.MapViewOfFile, h, access, 0, 0, 0, result=0, error=ERROR_ACCESS_DENIED)
    view = map_view(win32, h, FILE_MAP_READ)
    mv = win32.view(view, SIZE)
    assert mv.readonly is True
    assert bytes(mv[:64]) == bytes(64)  # a new section reads zeros
    with pytest.raises(ShmheapPermissionError):
        win32.write(view, b"no")


def test_read_only_view_of_a_read_write_section(win32, peers):
    name = unique_name()
    h = create(win32, name)
    view = map_view(win32, h, FILE_MAP_READ)
    mv = win32.view(view, 0x1000)
    assert mv.readonly is True
    with pytest.raises(ShmheapPermissionError):
        win32.write(view, b"nope")
    with pytest.raises(ShmheapPermissionError):
        win32.view(view, 16, write=True)
    with pytest.raises(TypeError):
        mv[0:4] = b"nope"  # the memoryview itself refuses
    # A writer elsewhere is seen through the read-only view.
    peer = peers()
    writer = peer.map(open_mapping_in(peer, name), FILE_MAP_WRITE)
    assert writer == view
    peer.call("write", writer + 100, b"written elsewhere")
    assert win32.read(view + 100, 17) == b"written elsewhere"
    assert bytes(mv[100:117]) == b"written elsewhere"
    mv.release()


def open_mapping_in(peer, name, access=FILE_MAP_ALL_ACCESS):
    return peer.ok("OpenFileMapping", access, False, name)


def test_virtual_query_of_a_view_is_mapped(win32):
    h = create(win32, unique_name())
    view = map_view(win32, h)
    info = win32.VirtualQuery(view + 0x1000)
    assert info.Type == MEM_MAPPED
    assert info.State == MEM_COMMIT
    assert info.Protect == PAGE_READWRITE
    assert info.AllocationBase == view
    private = ok(win32, win32.VirtualAlloc, 0, GRANULE, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    assert win32.VirtualQuery(private).Type == MEM_PRIVATE  # for contrast


def test_virtual_query_of_a_read_only_view_shows_read_only(win32):
    h = create(win32, unique_name())
    view = map_view(win32, h, FILE_MAP_READ)
    info = win32.VirtualQuery(view)
    assert info.Type == MEM_MAPPED and info.State == MEM_COMMIT
    assert info.Protect == PAGE_READONLY
    assert info.AllocationProtect == PAGE_READONLY


def test_map_needs_a_handle_of_this_process(win32, peers):
    name = unique_name()
    h = create(win32, name)
    view = map_view(win32, h)
    peer = peers()
    peer.expect("MapViewOfFile", h, FILE_MAP_ALL_ACCESS, 0, 0, 0, result=0, error=ERROR_INVALID_HANDLE)
    peer.expect("CloseHandle", h, result=False, error=ERROR_INVALID_HANDLE)
    assert peer.raises("read", view, 4)[0] == "ShmheapPermissionError"  # no view, no access
    expect(win32, win32.MapViewOfFile, 0x7FF0, FILE_MAP_ALL_ACCESS, 0, 0, 0, result=0,
           error=ERROR_INVALID_HANDLE)
    # The section is unharmed: ours still works.
    win32.write(view, b"still here")
    assert open_mapping(win32, name) == h


# ---- two processes ---------------------------------------------------------------------------------

def test_two_processes_map_one_name_and_see_each_others_writes(win32, peers):
    name = unique_name()
    h = create(win32, name)
    view = map_view(win32, h)
    win32.write(view, b"from the parent")
    peer = peers()
    theirs, error = peer.call("CreateFileMapping", INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0,
                              SIZE, name)
    assert theirs == h and error == ERROR_ALREADY_EXISTS  # the same handle value everywhere
    their_view = peer.map(theirs)
    assert their_view == view  # the same address in every process
    assert peer.ok("read", their_view, 15) == b"from the parent"
    peer.call("write", their_view + SIZE - 14, b"from the child")
    assert win32.read(view + SIZE - 14, 14) == b"from the child"
    info = peer.ok("VirtualQuery", their_view)
    assert info["Type"] == MEM_MAPPED and info["State"] == MEM_COMMIT


# ---- reference counting ------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["close then unmap", "unmap then close"])
def test_section_lives_until_last_handle_and_view_go(win32, daemon, order):
    baseline = connected_baseline(win32, daemon)
    name = unique_name()
    h = create(win32, name, size=MiB)
    assert daemon.resident_bytes() - baseline >= MiB  # committed at creation
    view = map_view(win32, h)
    second = map_view(win32, h)  # a second view of the same range counts too
    assert second == view
    win32.write(view, pattern(MiB))
    if order == "close then unmap":
        expect(win32, win32.CloseHandle, h, result=True)
        assert not gone(win32, name)  # the views hold it
        assert name_gone(win32, name)  # but its name went with the last handle (FM-45)
        expect(win32, win32.UnmapViewOfFile, view, result=True)
        assert win32.read(view, 64) == pattern(64)  # one view left
        assert not gone(win32, name)
        expect(win32, win32.UnmapViewOfFile, view, result=True)
    else:
        expect(win32, win32.UnmapViewOfFile, view, result=True)
        expect(win32, win32.UnmapViewOfFile, view, result=True)
        with pytest.raises(ShmheapPermissionError):
            win32.read(view, 4)  # no view left, no access
        assert not gone(win32, name)  # the handle holds it
        assert map_view(win32, h) == view
        assert win32.read(view, MiB) == pattern(MiB)  # contents kept meanwhile
        expect(win32, win32.UnmapViewOfFile, view, result=True)
        expect(win32, win32.CloseHandle, h, result=True)
    assert gone(win32, name)
    assert daemon.resident_bytes() == baseline
    assert win32.VirtualQuery(view).State == MEM_FREE
    with pytest.raises(ShmheapPermissionError):
        win32.read(view, 4)
    # A new section of the same name starts afresh.
    h2 = create(win32, name, size=MiB)
    assert win32.read(map_view(win32, h2), 64) == bytes(64)


def test_section_survives_while_another_process_holds_it(win32, peers, daemon):
    peer = peers()
    baseline = connected_baseline(win32, daemon)  # both processes connected
    name = unique_name()
    h = create(win32, name, size=MiB)
    view = map_view(win32, h)
    theirs = open_mapping_in(peer, name)
    their_view = peer.map(theirs)
    # We let go entirely; the peer's handle and view keep the section.
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    expect(win32, win32.CloseHandle, h, result=True)
    assert not gone(win32, name)
    peer.call("write", their_view, b"kept alive")
    # The peer keeps only its view.
    peer.expect("CloseHandle", theirs, result=True)
    assert not gone(win32, name)
    assert peer.ok("read", their_view, 10) == b"kept alive"
    assert name_gone(win32, name)  # the last handle took the name (FM-45); the view keeps the rest
    # Its last view goes: so does the section, and its memory.
    peer.expect("UnmapViewOfFile", their_view, result=True)
    assert gone(win32, name)
    assert peer.call("OpenFileMapping", FILE_MAP_READ, False, name) == (0, ERROR_FILE_NOT_FOUND)
    assert daemon.resident_bytes() == baseline


def test_the_name_goes_with_the_last_handle_while_views_remain(win32, peers):
    """FM-45 (Wine's test_MapViewOfFile, "close named mapping handle without unmapping"):
    with every handle closed, the view still shows the bytes, OpenFileMapping of the name
    fails, and CreateFileMapping of the name makes a new section."""
    name = unique_name()
    h = create(win32, name)
    view = map_view(win32, h)
    win32.write(view, b"old section")
    peer = peers()
    theirs = open_mapping_in(peer, name)
    peer.expect("CloseHandle", theirs, result=True)
    expect(win32, win32.CloseHandle, h, result=True)
    assert win32.read(view, 11) == b"old section"
    assert win32.VirtualQuery(view).State == MEM_COMMIT
    expect(win32, win32.OpenFileMapping, FILE_MAP_READ, False, name, result=0, error=ERROR_FILE_NOT_FOUND)
    assert peer.call("OpenFileMapping", FILE_MAP_READ, False, name) == (0, ERROR_FILE_NOT_FOUND)
    fresh = create(win32, name)  # ERROR_SUCCESS: a new section, not the old one
    assert fresh != h
    fresh_view = map_view(win32, fresh)
    assert fresh_view != view and win32.read(fresh_view, 11) == bytes(11)
    assert win32.read(view, 11) == b"old section"  # the old one lives on in its view
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    expect(win32, win32.UnmapViewOfFile, fresh_view, result=True)
    expect(win32, win32.CloseHandle, fresh, result=True)
    assert gone(win32, name)


def test_a_view_asks_no_more_than_the_handles_of_its_process_allow(win32, peers):
    """FM-42, FM-43: a FILE_MAP_READ handle maps no write view; a FILE_MAP_WRITE handle no
    read-only one; the creator's handle maps either."""
    name = unique_name()
    h = create(win32, name)
    peer = peers()
    reader, _ = peer.call("OpenFileMapping", FILE_MAP_READ, False, name)
    assert reader
    assert peer.call("MapViewOfFile", reader, FILE_MAP_WRITE, 0, 0, 0) == (0, ERROR_ACCESS_DENIED)
    read_view = peer.map(reader, access=FILE_MAP_READ)
    assert peer.ok("VirtualQuery", read_view)["Protect"] == PAGE_READONLY
    other = peers()
    writer, _ = other.call("OpenFileMapping", FILE_MAP_WRITE, False, name)
    assert other.call("MapViewOfFile", writer, FILE_MAP_READ, 0, 0, 0) == (0, ERROR_ACCESS_DENIED)
    write_view = other.map(writer, access=FILE_MAP_WRITE)
    other.call("write", write_view, b"written")
    assert peer.ok("read", read_view, 7) == b"written"
    assert win32.read(map_view(win32, h, access=FILE_MAP_READ), 7) == b"written"  # the creator: any access


def test_unmap_of_an_address_inside_a_view_unmaps_that_view(win32):
    """FM-59: UnmapViewOfFile(view + 100), (view + 4096), (view + 4096 + 100) each unmap the
    whole view; the next is FM-61's 'no view here'."""
    h = create(win32, unique_name())
    for inside in (100, 4096, 4096 + 100):
        view = map_view(win32, h)
        expect(win32, win32.UnmapViewOfFile, view + inside, result=True)
        with pytest.raises(ShmheapPermissionError):
            win32.read(view, 4)
        expect(win32, win32.UnmapViewOfFile, view, result=False, error=ERROR_INVALID_ADDRESS)


def test_section_vanishes_when_its_only_holder_is_killed(win32, peers, daemon):
    baseline = connected_baseline(win32, daemon)
    name = unique_name()
    peer = peers()
    h, error = peer.call("CreateFileMapping", INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0, MiB, name)
    assert h and error == ERROR_SUCCESS
    view = peer.map(h)
    peer.call("write", view, b"doomed")
    assert daemon.resident_bytes() - baseline >= MiB
    # Looking from here (and letting go again) leaves the peer the only holder.
    ours = open_mapping(win32, name)
    assert win32.read(map_view(win32, ours), 6) == b"doomed"
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    expect(win32, win32.CloseHandle, ours, result=True)
    assert not gone(win32, name)
    pid = peer.pid
    peer.kill()
    wait_until(lambda: daemon.resident_bytes() == baseline, 20,
               what="the killed holder's section and heap to be given back")
    assert gone(win32, name)
    assert win32.VirtualQuery(view).State == MEM_FREE
    assert f"pid {pid} gone: released 0 global objects, 1 section holds" in daemon.log_text()


def test_section_survives_its_creator_exiting_while_a_view_remains(win32, peers):
    name = unique_name()
    peer = peers()
    h, _ = peer.call("CreateFileMapping", INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0, SIZE, name)
    peer.call("write", peer.map(h), b"left behind")
    ours = open_mapping(win32, name)
    view = map_view(win32, ours)
    expect(win32, win32.CloseHandle, ours, result=True)  # we keep only a view
    peer.kill()
    # Wait until the daemon has dropped the peer's holds (its process heap region goes too).
    wait_until(lambda: peer.pid not in [p["pid"] for p in _status(win32)["processes"]], 20,
               what="the killed creator to be released")
    assert win32.read(view, 11) == b"left behind"
    win32.write(view, b"still mine")
    assert not gone(win32, name)
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    assert gone(win32, name)


def _status(w):
    from shmheap import client as client_module
    return client_module.default_client().status()


# ---- CloseHandle / UnmapViewOfFile errors ----------------------------------------------------------

def test_close_handle_twice(win32):
    name = unique_name()
    h = create(win32, name)
    expect(win32, win32.CloseHandle, h, result=True)
    expect(win32, win32.CloseHandle, h, result=False, error=ERROR_INVALID_HANDLE)
    # Also while a view keeps the section alive: the handle is still closed.
    h = create(win32, name)
    view = map_view(win32, h)
    expect(win32, win32.CloseHandle, h, result=True)
    expect(win32, win32.CloseHandle, h, result=False, error=ERROR_INVALID_HANDLE)
    expect(win32, win32.MapViewOfFile, h, FILE_MAP_READ, 0, 0, 0, result=0, error=ERROR_INVALID_HANDLE)
    assert not gone(win32, name) and name_gone(win32, name)
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    assert gone(win32, name)


@pytest.mark.parametrize("value", [0, 4, 0x7FFC, 0xDEADBEE0])
def test_close_of_a_handle_never_opened(win32, value):
    expect(win32, win32.CloseHandle, value, result=False, error=ERROR_INVALID_HANDLE)


def test_unmap_of_an_address_that_is_no_view(win32):
    h = create(win32, unique_name())
    view = map_view(win32, h)
    private = ok(win32, win32.VirtualAlloc, 0, GRANULE, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    for address in (private, 0x12340000, 0):
        expect(win32, win32.UnmapViewOfFile, address, result=False, error=ERROR_INVALID_ADDRESS)
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    expect(win32, win32.UnmapViewOfFile, view, result=False, error=ERROR_INVALID_ADDRESS)
    # The section (held by its handle) and the private region are untouched.
    assert map_view(win32, h) == view
    win32.write(private, b"private")
    assert win32.read(private, 7) == b"private"
