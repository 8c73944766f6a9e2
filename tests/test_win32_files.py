"""File-backed mappings (CreateFile, GetFileSize, CreateFileMapping(hFile), MapViewOfFile,
FlushViewOfFile, UnmapViewOfFile, CloseHandle) with real files and real processes, against
docs/file_mapping_semantics.md (rows FM-xx, from Wine's conformance tests run on Windows),
and the Pythonic `client.map_file`.

A view of a file section is the file itself mapped over a region of the segment (reserved,
never committed there): the same address in every process, bytes shared through the page
cache, writes landing in the file, and nothing of it in tmpfs or in the daemon's commit."""

import ctypes
import os
import signal
import socket
import stat
import uuid

import pytest

import shmheap
from shmheap.constants import (CREATE_ALWAYS, CREATE_NEW, FILE_MAP_READ, FILE_MAP_WRITE, FILE_SHARE_READ,
                               FILE_SHARE_WRITE,
                               GENERIC_READ, GENERIC_WRITE, INVALID_HANDLE_VALUE, MEM_COMMIT, MEM_FREE, MEM_MAPPED,
                               OPEN_ALWAYS, OPEN_EXISTING, PAGE_READONLY, PAGE_READWRITE, PAGE_WRITECOPY,
                               TRUNCATE_EXISTING)
from shmheap.errors import WinError
from win32_checks import call, expect, ok

from conftest import as_user, in_forked_child, wait_until

GRANULE = 0x10000
RW = GENERIC_READ | GENERIC_WRITE
E = WinError


def _file(folder, data=b"", name=None):
    path = os.path.join(str(folder), name or f"f-{uuid.uuid4().hex[:8]}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _open(w, path, access=RW, disposition=OPEN_EXISTING, share=0):
    return ok(w, w.CreateFile, path, access, share, None, disposition, 0, None)


def _pattern(n):
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


# ---- CreateFile (FM-01..FM-13) -------------------------------------------------------------------

def test_creation_dispositions_and_their_last_errors(win32, tmp_path):
    existing = _file(tmp_path, b"twelve bytes")
    missing = os.path.join(tmp_path, "missing")
    expect(win32, win32.CreateFile, existing, RW, 0, None, CREATE_NEW, 0, None,
           result=INVALID_HANDLE_VALUE, error=E.ERROR_FILE_EXISTS)  # FM-01
    h, error = call(win32, win32.CreateFile, existing, RW, 0, None, OPEN_ALWAYS, 0, None)
    assert h != INVALID_HANDLE_VALUE and error == E.ERROR_ALREADY_EXISTS  # FM-04
    assert win32.GetFileSizeEx(h) == 12
    expect(win32, win32.CloseHandle, h, result=True)
    h, error = call(win32, win32.CreateFile, existing, RW, 0, None, CREATE_ALWAYS, 0, None)
    assert h != INVALID_HANDLE_VALUE and error == E.ERROR_ALREADY_EXISTS  # FM-02: truncated
    assert win32.GetFileSizeEx(h) == 0
    win32.CloseHandle(h)
    expect(win32, win32.CreateFile, missing, RW, 0, None, OPEN_EXISTING, 0, None,
           result=INVALID_HANDLE_VALUE, error=E.ERROR_FILE_NOT_FOUND)  # FM-03
    expect(win32, win32.CreateFile, os.path.join(missing, "x"), RW, 0, None, OPEN_EXISTING, 0, None,
           result=INVALID_HANDLE_VALUE, error=E.ERROR_PATH_NOT_FOUND)  # FM-07
    h, error = call(win32, win32.CreateFile, missing, RW, 0, None, OPEN_ALWAYS, 0, None)
    assert h != INVALID_HANDLE_VALUE and error == E.ERROR_SUCCESS and os.path.exists(missing)  # FM-05
    win32.CloseHandle(h)
    with open(existing, "wb") as f:
        f.write(b"data")
    h = _open(win32, existing, RW, TRUNCATE_EXISTING)  # FM-06
    assert win32.GetFileSizeEx(h) == 0
    win32.CloseHandle(h)
    expect(win32, win32.CreateFile, existing, GENERIC_READ, 0, None, TRUNCATE_EXISTING, 0, None,
           result=INVALID_HANDLE_VALUE, error=E.ERROR_INVALID_PARAMETER)  # FM-10
    expect(win32, win32.CreateFile, existing, RW, 0, None, 0, 0, None,
           result=INVALID_HANDLE_VALUE, error=E.ERROR_INVALID_PARAMETER)  # FM-09
    for disposition in (OPEN_EXISTING, CREATE_NEW):  # FM-08: a folder
        expect(win32, win32.CreateFile, str(tmp_path), GENERIC_READ, 0, None, disposition, 0, None,
               result=INVALID_HANDLE_VALUE, error=E.ERROR_ACCESS_DENIED)


def test_a_read_only_file_is_not_opened_for_writing(win32, short_dir):
    """FM-11. Root may write anything, so when we are root another user tries it."""
    os.chmod(short_dir, 0o711)
    path = _file(short_dir, b"read only")
    os.chmod(path, 0o444)

    def attempt():
        from shmheap import win32 as w
        h, error = call(w, w.CreateFile, path, RW, 0, None, OPEN_EXISTING, 0, None)
        reader, _ = call(w, w.CreateFile, path, GENERIC_READ, FILE_SHARE_READ, None, OPEN_EXISTING, 0, None)
        return 0 if h == INVALID_HANDLE_VALUE and error == E.ERROR_ACCESS_DENIED and reader != h else 1

    if os.geteuid() == 0:
        assert as_user(65534, attempt) == 0
    else:
        assert attempt() == 0


def test_share_modes_between_this_processes_handles(win32, tmp_path):
    """FM-13, among one process's handles (Linux shares files freely between processes)."""
    path = _file(tmp_path, b"shared?")
    first = _open(win32, path, GENERIC_READ, share=FILE_SHARE_READ)
    second = _open(win32, path, GENERIC_READ, share=FILE_SHARE_READ)  # both read, both share read
    expect(win32, win32.CreateFile, path, RW, FILE_SHARE_READ, None, OPEN_EXISTING, 0, None,
           result=INVALID_HANDLE_VALUE, error=E.ERROR_SHARING_VIOLATION)  # they do not share write
    for h in (first, second):
        expect(win32, win32.CloseHandle, h, result=True)
    expect(win32, win32.CloseHandle, _open(win32, path, RW), result=True)  # free again


def test_file_sizes_and_handles(win32, tmp_path):
    path = _file(tmp_path, b"x" * 100_000)
    h = _open(win32, path, GENERIC_READ)
    assert win32.GetFileSize(h) == (100_000, 0) and win32.GetFileSizeEx(h) == 100_000
    expect(win32, win32.CloseHandle, h, result=True)
    expect(win32, win32.CloseHandle, h, result=False, error=E.ERROR_INVALID_HANDLE)  # FM-20
    expect(win32, win32.GetFileSizeEx, h, result=None, error=E.ERROR_INVALID_HANDLE)
    assert win32.GetFileSize(h) == (0xFFFFFFFF, 0) and win32.GetLastError() == E.ERROR_INVALID_HANDLE
    expect(win32, win32.CloseHandle, 0, result=False, error=E.ERROR_INVALID_HANDLE)  # FM-21
    expect(win32, win32.CloseHandle, INVALID_HANDLE_VALUE, result=True)  # FM-22: the pseudo-handle


# ---- CreateFileMapping over a file (FM-24..FM-36) -------------------------------------------------

def test_what_the_files_access_allows(win32, tmp_path):
    path = _file(tmp_path, b"content" * 1000)
    reader = _open(win32, path, GENERIC_READ, share=FILE_SHARE_READ | FILE_SHARE_WRITE)
    expect(win32, win32.CreateFileMapping, reader, None, PAGE_READWRITE, 0, 0, None,
           result=0, error=E.ERROR_ACCESS_DENIED)  # FM-25
    for protect in (PAGE_READONLY, PAGE_WRITECOPY):
        m, error = call(win32, win32.CreateFileMapping, reader, None, protect, 0, 0, None)
        assert m and error == E.ERROR_SUCCESS
        win32.CloseHandle(m)
    writer_only = _open(win32, path, GENERIC_WRITE, share=FILE_SHARE_READ | FILE_SHARE_WRITE)
    expect(win32, win32.CreateFileMapping, writer_only, None, PAGE_READONLY, 0, 0, None,
           result=0, error=E.ERROR_ACCESS_DENIED)  # FM-26: no read access
    expect(win32, win32.CreateFileMapping, reader, None, 0x40 | 0x04, 0, 0, None,
           result=0, error=E.ERROR_INVALID_PARAMETER)  # FM-27: two base protections
    expect(win32, win32.CreateFileMapping, 0x40000FFC, None, PAGE_READONLY, 0, 0, None,
           result=0, error=E.ERROR_INVALID_HANDLE)  # no such file handle
    for h in (reader, writer_only):
        win32.CloseHandle(h)


def test_sizes_empty_larger_and_exact(win32, tmp_path):
    empty = _open(win32, _file(tmp_path))
    expect(win32, win32.CreateFileMapping, empty, None, PAGE_READWRITE, 0, 0, None,
           result=0, error=E.ERROR_FILE_INVALID)  # FM-29
    m, error = call(win32, win32.CreateFileMapping, empty, None, PAGE_READWRITE, 0, 0x1000, None)
    assert m and error == E.ERROR_SUCCESS and win32.GetFileSizeEx(empty) == 0x1000  # FM-30: extended
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    assert win32.read(view, 0x1000) == bytes(0x1000)
    win32.UnmapViewOfFile(view)
    win32.CloseHandle(m)
    path = _file(tmp_path, b"y" * 0x3456)
    reader = _open(win32, path, GENERIC_READ)
    expect(win32, win32.CreateFileMapping, reader, None, PAGE_READONLY, 0, 0x3457, None,
           result=0, error=E.ERROR_NOT_ENOUGH_MEMORY)  # FM-31: not extended
    assert os.path.getsize(path) == 0x3456
    m = call(win32, win32.CreateFileMapping, reader, None, PAGE_READONLY, 0, 0, None)[0]
    expect(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, 0, 0x3457, result=0,
           error=E.ERROR_ACCESS_DENIED)  # FM-51: the exact size is the limit
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, 0, 0x3456)
    info = win32.VirtualQuery(view)  # FM-54
    assert (info.BaseAddress, info.AllocationBase, info.State, info.Type, info.Protect, info.RegionSize) == (
        view, view, MEM_COMMIT, MEM_MAPPED, PAGE_READONLY, 0x4000)
    assert view % GRANULE == 0  # FM-53
    expect(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0, result=0, error=E.ERROR_ACCESS_DENIED)  # FM-47
    for h in (m, reader, empty):
        win32.CloseHandle(h)
    win32.UnmapViewOfFile(view)


def test_a_named_file_section_opened_again_is_the_same(win32, tmp_path):
    path = _file(tmp_path, b"z" * 5000)
    name = f"file-{uuid.uuid4().hex}"
    h = _open(win32, path)
    m, error = call(win32, win32.CreateFileMapping, h, None, PAGE_READWRITE, 0, 0, name)
    assert m and error == E.ERROR_SUCCESS
    again, error = call(win32, win32.CreateFileMapping, h, None, PAGE_READWRITE, 0, 99999, name)
    assert again == m and error == E.ERROR_ALREADY_EXISTS  # FM-34: the size asked is ignored
    assert os.path.getsize(path) == 5000
    for handle in (again, m, h):
        expect(win32, win32.CloseHandle, handle, result=True)


# ---- views (FM-46..FM-63) -----------------------------------------------------------------------

def test_views_at_offsets_show_the_files_bytes_and_write_into_it(win32, tmp_path):
    data = _pattern(4 * GRANULE + 1234)
    path = _file(tmp_path, data)
    h = _open(win32, path)
    m = call(win32, win32.CreateFileMapping, h, None, PAGE_READWRITE, 0, 0, None)[0]
    whole = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    second = ok(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, 2 * GRANULE, 1000)
    assert second == whole + 2 * GRANULE  # base + offset: the same bytes, the same address
    assert win32.read(second, 1000) == data[2 * GRANULE:2 * GRANULE + 1000]
    for offset in (1, 0x1000, 0x1234):  # FM-49
        expect(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, offset, 0, result=0,
               error=E.ERROR_MAPPED_ALIGNMENT)
    expect(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, 5 * GRANULE, 0, result=0,
           error=E.ERROR_ACCESS_DENIED)  # FM-52: past the end
    win32.write(whole + 10, b"WRITTEN")
    expect(win32, win32.FlushViewOfFile, whole, 0, result=True)  # FM-64, FM-65
    with open(path, "rb") as f:
        assert f.read(17)[10:] == b"WRITTEN"  # FM-55: in the file
    expect(win32, win32.CloseHandle, h, result=True)  # FM-69: the file handle may go
    expect(win32, win32.CloseHandle, m, result=True)  # FM-68: and the mapping's
    win32.write(whole + 20, b"AFTER")
    assert win32.read(whole, 25)[20:] == b"AFTER"
    expect(win32, win32.UnmapViewOfFile, second + 500, result=True)  # FM-59: from inside
    expect(win32, win32.UnmapViewOfFile, whole, result=True)
    expect(win32, win32.UnmapViewOfFile, whole, result=False, error=E.ERROR_INVALID_ADDRESS)  # FM-61
    expect(win32, win32.FlushViewOfFile, whole, 0, result=False, error=E.ERROR_INVALID_ADDRESS)  # FM-66
    assert win32.VirtualQuery(whole).State == MEM_FREE  # FM-58
    with open(path, "rb") as f:
        assert f.read(25)[20:] == b"AFTER"


def test_two_processes_share_a_files_bytes_through_a_named_mapping(win32, peers, tmp_path):
    path = _file(tmp_path, _pattern(3 * GRANULE))
    name = f"shared-file-{uuid.uuid4().hex}"
    h = _open(win32, path)
    m = call(win32, win32.CreateFileMapping, h, None, PAGE_READWRITE, 0, 0, name)[0]
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    win32.write(view, b"from the parent")
    peer = peers()
    theirs = peer.ok("OpenFileMapping", FILE_MAP_WRITE, False, name)
    their_view = peer.ok("MapViewOfFile", theirs, FILE_MAP_WRITE, 0, 0, 0)
    assert their_view == view  # the same pointer names the same bytes in both processes
    assert peer.ok("read", their_view, 15) == b"from the parent"
    assert peer.ok("read", their_view + GRANULE, 64) == _pattern(3 * GRANULE)[GRANULE:GRANULE + 64]
    peer.call("write", their_view + 100, b"from the child")
    assert win32.read(view + 100, 14) == b"from the child"
    info = peer.ok("VirtualQuery", their_view)
    assert info["Type"] == MEM_MAPPED and info["State"] == MEM_COMMIT
    peer.expect("UnmapViewOfFile", their_view, result=True)
    peer.expect("CloseHandle", theirs, result=True)
    for handle in (m, h):
        win32.CloseHandle(handle)
    win32.UnmapViewOfFile(view)
    with open(path, "rb") as f:
        assert f.read(114)[100:] == b"from the child"


def test_file_views_cost_no_commit_and_nothing_in_tmpfs(win32, daemon, tmp_path):
    size = 16 << 20
    path = _file(tmp_path, b"\1" * size)
    client = shmheap.default_client()
    before = (client.memory_status()["committed"], daemon.resident_bytes())
    h = _open(win32, path)
    m = call(win32, win32.CreateFileMapping, h, None, PAGE_READWRITE, 0, 0, None)[0]
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    win32.view(view, size, write=True)[::4096] = b"\2" * (size // 4096)  # touch every page
    assert (client.memory_status()["committed"], daemon.resident_bytes()) == before
    assert client.check()["sections"] == 1
    for handle in (m, h):
        win32.CloseHandle(handle)
    win32.UnmapViewOfFile(view)
    assert (client.memory_status()["committed"], daemon.resident_bytes()) == before


def _daemon_holds(daemon, path):
    fd_dir = f"/proc/{daemon.proc.pid}/fd"
    return any(os.path.realpath(os.path.join(fd_dir, fd)) == os.path.realpath(path) for fd in os.listdir(fd_dir))


def test_the_daemon_keeps_the_file_open_exactly_while_the_section_lives(win32, daemon, peers, tmp_path):
    path = _file(tmp_path, b"held" * 5000)
    name = f"held-{uuid.uuid4().hex}"
    peer = peers()
    h = peer.ok("CreateFile", path, RW, 0, None, OPEN_EXISTING, 0, None)
    m, _ = peer.call("CreateFileMapping", h, None, PAGE_READWRITE, 0, 0, name)
    peer.ok("MapViewOfFile", m, FILE_MAP_WRITE, 0, 0, 0)
    peer.expect("CloseHandle", h, result=True)
    assert _daemon_holds(daemon, path)
    peer.kill()  # its handle and view die with it: the section and the daemon's file go
    wait_until(lambda: not _daemon_holds(daemon, path), 20, what="the dead process's file section to go")
    expect(win32, win32.OpenFileMapping, FILE_MAP_READ, False, name, result=0, error=E.ERROR_FILE_NOT_FOUND)


def test_a_view_touched_after_unmap_is_an_access_violation(daemon, tmp_path):
    path = _file(tmp_path, b"gone" * 5000)

    def child():
        import faulthandler
        faulthandler.disable()
        client = shmheap.connect(daemon.socket, autostart=False)
        view = client.map_file(path, "r+")
        address = view.address
        view.view()[:4] = b"here"
        view.close()
        ctypes.memset(address, 0x55, 1)  # must fault
        return 3

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            child()
        finally:
            os._exit(3)
    os.close(write_end)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    with open(path, "rb") as f:
        assert f.read(4) == b"here"


# ---- the Pythonic form --------------------------------------------------------------------------

def test_map_file_is_a_zero_copy_buffer_for_numpy_in_every_process(daemon, client, tmp_path):
    numpy = pytest.importorskip("numpy")
    path = os.path.join(tmp_path, "array.f64")
    name = f"array-{uuid.uuid4().hex}"
    with client.map_file(path, "w+", name=name, size=8 * 1000) as mapped:
        array = numpy.frombuffer(mapped, dtype=numpy.float64)
        array[:] = numpy.arange(1000)
        assert mapped.numpy("float64")[999] == 999.0 and len(memoryview(mapped)) == 8000

        def other():
            with shmheap.connect(daemon.socket, autostart=False) as c:
                with c.map_file(None, "r+", name=name) as theirs:
                    values = theirs.numpy("float64")
                    ok_values = theirs.address == mapped.address and values[500] == 500.0
                    values[0] = -1.0
                    return 0 if ok_values else 1

        assert in_forked_child(other) == 0
        assert array[0] == -1.0
        mapped.flush()
    assert numpy.fromfile(path)[[0, 999]].tolist() == [-1.0, 999.0]
    mapped.close()  # idempotent
    with pytest.raises(shmheap.ShmheapValueError) as info:
        client.map_file(os.path.join(tmp_path, "nothing"), "r")
    assert info.value.winerror == E.ERROR_FILE_NOT_FOUND
    with pytest.raises(shmheap.ShmheapValueError):
        client.map_file(path, "rw")
    with pytest.raises(shmheap.ShmheapValueError) as info:
        client.map_file(None, "r+", name=name)  # the name went with the last handle (FM-45)
    assert info.value.winerror == E.ERROR_FILE_NOT_FOUND
    client.check()


# ---- descriptors on the wire ---------------------------------------------------------------------

def test_descriptors_on_the_wire_are_checked(daemon, client, tmp_path):
    conn = client.connection
    with pytest.raises(shmheap.ShmheapValueError) as info:
        conn.call("file_mapping_create", PAGE_READWRITE, 0, None)  # no descriptor came
    assert info.value.winerror == E.ERROR_INVALID_HANDLE
    folder = os.open(str(tmp_path), os.O_RDONLY)
    try:
        with pytest.raises(shmheap.ShmheapValueError):
            conn.call_passing_fd("file_mapping_create", PAGE_READONLY, 4096, None, send_fd=folder)
    finally:
        os.close(folder)
    # A peer that floods descriptors no request takes is dropped; the daemon and others go on.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(daemon.socket)
    files = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]
    try:
        import array
        raw.sendmsg([b"\x90"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", files))])
        raw.settimeout(10)
        assert raw.recv(100) == b""  # closed by the daemon
    finally:
        raw.close()
        for fd in files:
            os.close(fd)
    assert client.echo("alive") == "alive" and client.check()
    assert stat.S_ISSOCK(os.stat(daemon.socket).st_mode)
