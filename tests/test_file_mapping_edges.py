"""Adversarial edges of file-backed mappings (CreateFile + CreateFileMapping(hFile) +
MapViewOfFile, and client.map_file), with real files, real processes and raw sockets.

What is held to (docs/file_mapping_semantics.md and the design contract):
  * the memory model: a file view is the file mapped over a region of the segment, the same
    address in every process; a process that holds no view of it (after UnmapViewOfFile, in a
    forked child, after death) faults on a raw touch; once the section is gone the address
    is the segment's again (VirtualAlloc there works and reads zeros, and never reaches the
    file); no file view changes the daemon's commit or what tmpfs holds;
  * descriptors on the wire (SCM_RIGHTS): whatever a peer sends, the daemon keeps no
    descriptor past the section or the connection it came with, never uses a descriptor for
    a request it did not come with, and goes on serving everyone else;
  * sizes, names, handles and FlushViewOfFile at their edges;
  * the daemon's own walkers (client.check()) after every scenario.

Twelve bugs this file found were fixed (descriptors of refused requests, leaked descriptors,
writable descriptors for readers, a hole left by a refused mmap, a file grown by a failed
create, views counted per client, whole sections opened for one view, FM-56's errors)."""

import array
import ctypes
import os
import signal
import socket
import time
import uuid

import msgpack
import pytest

import shmheap
from shmheap.constants import (CREATE_ALWAYS, FILE_MAP_READ, FILE_MAP_WRITE, FILE_SHARE_READ,
                               FILE_SHARE_WRITE, GENERIC_READ, GENERIC_WRITE, INVALID_HANDLE_VALUE, MEM_COMMIT,
                               MEM_FREE, MEM_MAPPED, MEM_RELEASE, MEM_RESERVE, OPEN_EXISTING, PAGE_READONLY,
                               PAGE_READWRITE, PAGE_WRITECOPY)
from shmheap.errors import WinError
from shmheap.files import FILE_HANDLE_BASE
from shmheap.protocol import PROTOCOL_VERSION
from win32_checks import call, expect, ok

from conftest import wait_until

GRANULE = 0x10000
PAGE = 0x1000
RW = GENERIC_READ | GENERIC_WRITE
SHARE_ALL = FILE_SHARE_READ | FILE_SHARE_WRITE
E = WinError
DEADLINE = 20.0


# ---- helpers ----------------------------------------------------------------------------------

def _file(folder, data=b"", name=None):
    path = os.path.join(str(folder), name or f"f-{uuid.uuid4().hex[:8]}")
    with open(path, "wb") as f:
        f.write(data)
    return path


def _pattern(n, seed=3):
    return bytes((i * 7 + seed + i // 251) & 0xFF for i in range(n))


def _read_file(path, n=None, offset=0):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if n is None else f.read(n)


def _open(w, path, access=RW, disposition=OPEN_EXISTING, share=SHARE_ALL):
    return ok(w, w.CreateFile, path, access, share, None, disposition, 0, None)


def _section(w, path, protect=PAGE_READWRITE, size=0, name=None, access=RW):
    """(file handle, section handle) over `path`."""
    h = _open(w, path, access)
    m, error = call(w, w.CreateFileMapping, h, None, protect, size >> 32, size & 0xFFFFFFFF, name)
    assert m, f"CreateFileMapping failed with {error}"
    return h, m


def _daemon_fds(daemon):
    return sorted(os.listdir(f"/proc/{daemon.proc.pid}/fd"), key=int)


def _fd_count(daemon):
    return len(_daemon_fds(daemon))


def _settles_at(daemon, baseline, what="the daemon's descriptors to return to their count"):
    """Wait (with a deadline) until the daemon holds `baseline` descriptors again."""
    try:
        wait_until(lambda: _fd_count(daemon) <= baseline, DEADLINE, what=what)
    except AssertionError:
        raise AssertionError(f"{what}: {baseline} before, {_fd_count(daemon)} now: "
                             f"{_describe_fds(daemon)}") from None


def _describe_fds(daemon):
    out = []
    for fd in _daemon_fds(daemon):
        try:
            out.append(os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def _holds(daemon, path):
    real = os.path.realpath(path)
    return real in [os.path.realpath(p) for p in _describe_fds(daemon) if p.startswith("/")]


def _alive(daemon, client=None):
    assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
    if client is not None:
        assert client.echo("still here") == "still here"
        client.check()


def run_forked(body, timeout=DEADLINE):
    """Run body() in a forked child; returns ("exit", code) or ("signal", number). body's
    return value is the exit code; an exception is exit code 99."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            import faulthandler
            faulthandler.disable()  # a fault is the expected end, not a crash report
            code = body()
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code if isinstance(code, int) else 98)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child did not end within {timeout}s")
        time.sleep(0.01)
    if os.WIFSIGNALED(status):
        return ("signal", os.WTERMSIG(status))
    return ("exit", os.WEXITSTATUS(status))


SEGV = ("signal", signal.SIGSEGV)
BUS = ("signal", signal.SIGBUS)


def _raw_read(address):
    return ctypes.string_at(address, 1)


def _raw_write(address, value=0x55):
    ctypes.memset(address, value, 1)


class RawPeer:
    """A socket to the daemon with hand-made frames, sending descriptors beside them; every
    wait has a deadline."""

    def __init__(self, path, greet=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.next_id = 0
        self.received_fds = []
        if greet:
            assert self.call("hello", PROTOCOL_VERSION, {"pid": os.getpid()})[1] == 0

    def send(self, op, *args, fds=(), data=None):
        self.next_id += 1
        payload = data if data is not None else msgpack.packb([self.next_id, op, *args])
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)))] if fds else []
        self.sock.sendmsg([payload], ancillary)
        return self.next_id

    def reply(self, msgid):
        deadline = time.monotonic() + DEADLINE
        while True:
            for frame in self.unpacker:
                if frame[0] == msgid:
                    return frame
            if time.monotonic() > deadline:
                raise AssertionError(f"no reply to {msgid}")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data, ancillary, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.received_fds += array.array("i", payload[:len(payload) - len(payload) % 4])
            if not data:
                raise ConnectionError("closed by the daemon")
            self.unpacker.feed(data)

    def call(self, op, *args, fds=()):
        return self.reply(self.send(op, *args, fds=fds))

    def dropped(self, seconds=DEADLINE):
        """True once the daemon closes the connection."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.received_fds += array.array("i", payload[:len(payload) - len(payload) % 4])
            if not data:
                return True
        return False

    def close(self):
        self.sock.close()
        for fd in self.received_fds:
            os.close(fd)
        self.received_fds = []


# ---- the memory model -----------------------------------------------------------------------------

def test_after_the_last_view_the_address_is_the_segment_again(win32, daemon, tmp_path):
    """Unmap and close: the section goes; VirtualAlloc at its address works, reads zeros,
    and what is written there never reaches the file; commit and tmpfs follow only the
    VirtualAlloc."""
    data = _pattern(3 * GRANULE + 77)
    path = _file(tmp_path, data)
    client = shmheap.default_client()
    before = (client.memory_status()["committed"], daemon.resident_bytes())
    h, m = _section(win32, path)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    assert win32.read(view, 64) == data[:64]
    win32.write(view + 3 * GRANULE, b"tail")
    assert (client.memory_status()["committed"], daemon.resident_bytes()) == before
    expect(win32, win32.UnmapViewOfFile, view + 5, result=True)
    assert view not in client.mapping.file_views
    for handle in (m, h):
        expect(win32, win32.CloseHandle, handle, result=True)
    assert client.check()["sections"] == 0
    assert win32.VirtualQuery(view).State == MEM_FREE
    again = ok(win32, win32.VirtualAlloc, view, 4 * GRANULE, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    assert again == view
    assert win32.read(view, 4 * GRANULE) == bytes(4 * GRANULE)  # the segment's zeros, not the file
    win32.write(view, b"S" * (4 * GRANULE))
    assert _read_file(path) == data[:3 * GRANULE] + b"tail" + data[3 * GRANULE + 4:]
    assert client.memory_status()["committed"] == before[0] + 4 * GRANULE
    expect(win32, win32.VirtualFree, view, 0, MEM_RELEASE, result=True)
    assert (client.memory_status()["committed"], daemon.resident_bytes()) == before


def test_a_view_unmapped_while_its_handle_stays_faults_in_that_process(daemon, tmp_path):
    """The section lives on (its handle is open), but this process has no view: a raw
    touch of the old address is an access violation, read or write."""
    path = _file(tmp_path, _pattern(2 * GRANULE))

    def child(write):
        def body():
            from shmheap import win32 as w
            os.environ["SHMHEAP_SOCKET"] = daemon.socket
            shmheap.close_default()
            h, m = _section(w, path)
            view = ok(w, w.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
            _raw_write(view + 10, 0x41)  # allowed while the view lives
            assert w.UnmapViewOfFile(view)
            assert w.VirtualQuery(view).Type == MEM_MAPPED  # the section is still there
            (_raw_write if write else _raw_read)(view + 10)
            return 3
        return body

    assert run_forked(child(True)) == SEGV
    assert run_forked(child(False)) == SEGV
    assert _read_file(path, 1, 10) == b"A"
    with shmheap.connect(daemon.socket, autostart=False) as c:
        wait_until(lambda: c.check()["sections"] == 0, DEADLINE, what="the dead children's sections to go")


def test_a_forked_child_of_a_viewer_holds_no_view(win32, daemon, tmp_path):
    """fork() of a process with a live file view: the child is another process and holds
    nothing; it faults on the view until it maps it itself, and then sees the same bytes at
    the same address."""
    path = _file(tmp_path, _pattern(GRANULE))
    name = f"fork-{uuid.uuid4().hex}"
    h, m = _section(win32, path, name=name)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    win32.write(view, b"parent")

    assert run_forked(lambda: _raw_read(view) and 3) == SEGV  # no connection at all

    def connected_but_unmapped():
        c = shmheap.connect(daemon.socket, autostart=False)
        c.echo(1)
        _raw_write(view)
        return 3

    assert run_forked(connected_but_unmapped) == SEGV

    def maps_it_itself():
        with shmheap.connect(daemon.socket, autostart=False) as c:
            with c.map_file(None, "r+", name=name) as mine:
                if mine.address != view or bytes(mine[:6]) != b"parent":
                    return 1
                mine[6:11] = b"child"
        return 0

    assert run_forked(maps_it_itself) == ("exit", 0)
    assert win32.read(view, 11) == b"parentchild"
    assert view in shmheap.default_client().mapping.file_views  # the parent's view is untouched
    for handle in (m, h):
        win32.CloseHandle(handle)
    expect(win32, win32.UnmapViewOfFile, view, result=True)


def test_two_clients_of_one_process_share_a_file_view(daemon, tmp_path):
    """Two connections of one process share its mapping: one client's view going (or the
    whole client) leaves the other's working."""
    path = _file(tmp_path, _pattern(2 * GRANULE))
    name = f"two-{uuid.uuid4().hex}"
    a = shmheap.connect(daemon.socket, autostart=False)
    b = shmheap.connect(daemon.socket, autostart=False)
    try:
        assert a.mapping is b.mapping
        va = a.map_file(path, "r+", name=name)
        vb = b.map_file(None, "r+", name=name)
        assert va.address == vb.address
        va.close()
        vb[0:3] = b"bbb"  # still this process's
        assert bytes(vb[0:3]) == b"bbb" and _read_file(path, 3) == b"bbb"
        a.close()
        vb[3:6] = b"BBB"
        assert _read_file(path, 6) == b"bbbBBB"
        b.check()
        vb.close()
        assert b.check()["sections"] == 0
        assert vb.address not in b.mapping.file_views
    finally:
        a.close()
        b.close()


def test_a_view_of_a_closed_client_lives_with_the_process_until_it_ends(daemon, tmp_path):
    """A client closed with its view still mapped: the view is the process's (sections are
    counted per process), so it lives while another client of the process is connected,
    and goes when the process's last connection does."""
    path = _file(tmp_path, _pattern(GRANULE))
    a = shmheap.connect(daemon.socket, autostart=False)
    b = shmheap.connect(daemon.socket, autostart=False)
    try:
        view = a.map_file(path, "r+")
        address = view.address
        a.close()  # the view was never closed
        b.check()
        assert address in b.mapping.file_views
    finally:
        b.close()
    with shmheap.connect(daemon.socket, autostart=False) as c:
        assert c.check()["sections"] == 0
        assert not c.mapping.file_views


def test_flush_of_a_view_another_client_of_the_process_unmapped(daemon, tmp_path):
    path = _file(tmp_path, _pattern(GRANULE))
    a = shmheap.connect(daemon.socket, autostart=False)
    b = shmheap.connect(daemon.socket, autostart=False)
    try:
        view = a.map_file(path, "r+")
        b.section_unmap(view.address)  # the process's only view goes
        assert view.address not in a.mapping.file_views
        with pytest.raises(shmheap.ShmheapError) as info:
            a.section_flush(view.address, 0)
        assert info.value.winerror == E.ERROR_INVALID_ADDRESS
    finally:
        a.close()
        b.close()


def test_a_killed_viewer_leaves_the_section_to_the_others(win32, daemon, peers, tmp_path):
    path = _file(tmp_path, _pattern(2 * GRANULE))
    name = f"killed-{uuid.uuid4().hex}"
    h, m = _section(win32, path, name=name)
    peer = peers()
    theirs = peer.ok("OpenFileMapping", FILE_MAP_WRITE, False, name)
    their_view = peer.map(theirs, FILE_MAP_WRITE)
    peer.call("write", their_view + 100, b"peer was here")
    peer.kill()
    client = shmheap.default_client()
    wait_until(lambda: all(p != peer.pid for row in client.section_list() for p, _ in row["views"]), DEADLINE,
               what="the killed peer's view to go")
    client.check()
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, 0, 0)
    assert view == their_view and win32.read(view + 100, 13) == b"peer was here"
    for handle in (m, h):
        win32.CloseHandle(handle)
    win32.UnmapViewOfFile(view)
    assert client.check()["sections"] == 0


def test_file_view_activity_never_touches_commit_or_tmpfs(win32, daemon, peers, tmp_path):
    client = shmheap.default_client()
    peer = peers()
    before = (client.memory_status()["committed"], daemon.resident_bytes())
    for size in (1, PAGE - 1, PAGE, GRANULE - 1, GRANULE, GRANULE + 1, 5 * GRANULE + 3):
        path = _file(tmp_path, _pattern(size))
        name = f"acct-{uuid.uuid4().hex}"
        h, m = _section(win32, path, name=name)
        view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
        win32.view(view, size, write=True)[:] = b"\xAA" * size
        theirs = peer.ok("OpenFileMapping", FILE_MAP_WRITE, False, name)
        their_view = peer.map(theirs, FILE_MAP_WRITE)
        peer.call("write", their_view, b"\xBB")
        expect(win32, win32.FlushViewOfFile, view, 0, result=True)
        assert (client.memory_status()["committed"], daemon.resident_bytes()) == before, size
        peer.ok("UnmapViewOfFile", their_view)
        peer.ok("CloseHandle", theirs)
        for handle in (m, h):
            win32.CloseHandle(handle)
        win32.UnmapViewOfFile(view)
        assert _read_file(path) == b"\xBB" + b"\xAA" * (size - 1)
    assert (client.memory_status()["committed"], daemon.resident_bytes()) == before
    assert client.check()["sections"] == 0


# ---- a file changed under its views by another program ---------------------------------------------

def test_a_file_truncated_under_a_live_view(win32, daemon, tmp_path):
    """Another program truncates the file while views are live. Linux then raises SIGBUS in
    a process that touches a page past the new end (Windows refuses the truncation,
    ERROR_USER_MAPPED_FILE: FM-15 — shmheap cannot stop another program). What must hold:
    the daemon never touches the file's pages and goes on; flush, unmap and close still
    work; the file grown again is readable again."""
    path = _file(tmp_path, _pattern(2 * GRANULE))
    name = f"trunc-{uuid.uuid4().hex}"
    baseline = _fd_count(daemon)
    h, m = _section(win32, path, name=name)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    win32.write(view, b"before")
    os.truncate(path, 100)  # "another program"

    def touch_past_the_end():
        with shmheap.connect(daemon.socket, autostart=False) as c:
            with c.map_file(None, "r+", name=name) as theirs:
                _raw_read(theirs.address + GRANULE)
        return 3

    assert run_forked(touch_past_the_end) == BUS  # documented: SIGBUS, as for any mmap
    client = shmheap.default_client()
    _alive(daemon, client)
    assert win32.read(view, 6) == b"before"  # below the new end: fine
    result, error = call(win32, win32.FlushViewOfFile, view, 0)
    assert result is True or error == E.ERROR_INVALID_ADDRESS
    os.truncate(path, 2 * GRANULE)
    assert win32.read(view + GRANULE, 16) == bytes(16)  # grown again: zeros, no fault
    for handle in (m, h):
        expect(win32, win32.CloseHandle, handle, result=True)
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    assert client.check()["sections"] == 0
    _settles_at(daemon, baseline)


def test_a_file_deleted_and_replaced_under_its_section(win32, daemon, tmp_path):
    """The path is unlinked and a new file made under the same name: the section goes on
    with the file it was made over (the daemon's descriptor), as a new view shows."""
    path = _file(tmp_path, b"old" * 1000)
    name = f"unlinked-{uuid.uuid4().hex}"
    h, m = _section(win32, path, name=name)
    win32.CloseHandle(h)
    os.unlink(path)
    _file(tmp_path, b"new" * 1000, name=os.path.basename(path))

    def maps_it():
        with shmheap.connect(daemon.socket, autostart=False) as c:
            with c.map_file(None, "r", name=name) as v:
                return 0 if bytes(v[:3]) == b"old" else 1

    assert run_forked(maps_it) == ("exit", 0)
    win32.CloseHandle(m)
    assert shmheap.default_client().check()["sections"] == 0


# ---- descriptors on the wire -------------------------------------------------------------------------

def _special_descriptors(tmp_path):
    """(what, fd, expected Win32 code) of descriptors that are no regular file to map."""
    made = []
    r, w = os.pipe()
    made += [("pipe read end", r), ("pipe write end", w)]
    a, b = socket.socketpair()
    made += [("socket", a.detach()), ("socket peer", b.detach())]
    made.append(("/dev/zero", os.open("/dev/zero", os.O_RDWR)))
    made.append(("/dev/null", os.open("/dev/null", os.O_RDONLY)))
    made.append(("folder", os.open(str(tmp_path), os.O_RDONLY)))
    made.append(("eventfd", os.eventfd(0)))
    return made


def test_descriptors_that_are_no_regular_file_are_refused_and_closed(daemon, client, tmp_path):
    baseline = _fd_count(daemon)
    for what, fd in _special_descriptors(tmp_path):
        try:
            for protect, size in ((PAGE_READONLY, 4096), (PAGE_READWRITE, 0), (PAGE_READWRITE, 1 << 20)):
                with pytest.raises(shmheap.ShmheapError) as info:
                    client.connection.call_passing_fd("file_mapping_create", protect, size, None, send_fd=fd)
                assert info.value.winerror in (E.ERROR_INVALID_HANDLE, E.ERROR_ACCESS_DENIED), what
        finally:
            os.close(fd)
    _alive(daemon, client)
    assert client.check()["sections"] == 0
    _settles_at(daemon, baseline)


def test_an_o_path_descriptor_is_no_open_file(daemon, client, tmp_path):
    path = _file(tmp_path, b"p" * 8192)
    fd = os.open(path, os.O_PATH)
    try:
        with pytest.raises(shmheap.ShmheapError) as info:
            client.connection.call_passing_fd("file_mapping_create", PAGE_READONLY, 0, None, send_fd=fd)
        assert info.value.winerror in (E.ERROR_INVALID_HANDLE, E.ERROR_ACCESS_DENIED)
    finally:
        os.close(fd)
        client.check()


def test_a_write_only_descriptor_maps_nothing(daemon, client, tmp_path):
    path = _file(tmp_path, b"w" * 8192)
    baseline = _fd_count(daemon)
    fd = os.open(path, os.O_WRONLY)
    try:
        for protect in (PAGE_READONLY, PAGE_READWRITE, PAGE_WRITECOPY):
            with pytest.raises(shmheap.ShmheapError) as info:
                client.file_mapping_create(fd, protect, 0)
            assert info.value.winerror == E.ERROR_ACCESS_DENIED
    finally:
        os.close(fd)
    _settles_at(daemon, baseline)


def test_create_of_an_existing_name_keeps_no_descriptor(win32, daemon, tmp_path):
    path = _file(tmp_path, _pattern(GRANULE))
    name = f"again-{uuid.uuid4().hex}"
    h, m = _section(win32, path, name=name)
    baseline = _fd_count(daemon)
    for _ in range(20):
        again, error = call(win32, win32.CreateFileMapping, h, None, PAGE_READWRITE, 0, 0, name)
        assert again == m and error == E.ERROR_ALREADY_EXISTS
        expect(win32, win32.CloseHandle, again, result=True)
    _settles_at(daemon, baseline)
    for handle in (m, h):
        win32.CloseHandle(handle)


def test_a_descriptor_of_a_refused_request_is_never_used_by_a_later_one(win32, daemon, tmp_path):
    first = _file(tmp_path, b"FIRST" * 1000)
    second = _file(tmp_path, b"SECOND" * 1000)
    h1 = _open(win32, first)
    h2 = _open(win32, second)
    # A name of the wrong type (bytes) is refused by the protocol's argument check.
    result, error = call(win32, win32.CreateFileMapping, h1, None, PAGE_READWRITE, 0, 0, b"bytes-name")
    assert result == 0 and error != 0
    m, error = call(win32, win32.CreateFileMapping, h2, None, PAGE_READWRITE, 0, 0, None)
    assert m and error == E.ERROR_SUCCESS
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, 0, 0)
    try:
        assert win32.read(view, 6) == b"SECOND"
    finally:
        win32.UnmapViewOfFile(view)
        for handle in (m, h1, h2):
            win32.CloseHandle(handle)


def test_extra_descriptors_with_a_create_are_not_used_by_the_next(daemon, client, tmp_path):
    paths = [_file(tmp_path, tag * 4096) for tag in (b"A", b"B", b"C")]
    fds = [os.open(p, os.O_RDWR) for p in paths]
    raw = RawPeer(daemon.socket)
    try:
        first = raw.call("file_mapping_create", PAGE_READONLY, 0, None, fds=fds[:2])
        assert first[1] == 0
        second = raw.call("file_mapping_create", PAGE_READONLY, 0, None, fds=fds[2:])
        assert second[1] == 0
        got = raw.call("file_mapping_file", second[2][0])
        assert got[1] == 0 and raw.received_fds
        assert os.fstat(raw.received_fds[-1]).st_ino == os.stat(paths[2]).st_ino
    finally:
        raw.close()
        for fd in fds:
            os.close(fd)
    client.check()


def test_garbage_with_descriptors_drops_the_peer_and_closes_them(daemon, client, tmp_path):
    """Unauthenticated and greeted peers send descriptors with garbage, with too many, with
    bad frames: each is dropped or refused, the daemon closes every descriptor it got, and
    serves the others."""
    path = _file(tmp_path, b"g" * 4096)
    baseline = _fd_count(daemon)
    fds = [os.open(path, os.O_RDONLY) for _ in range(200)]
    try:
        for greet, data, count in ((False, b"\xc1\xc1\xc1", 1), (False, b"\x90", 200), (True, b"\xc1", 3),
                                   (True, b"\x93\x01\xa4echo", 5), (True, msgpack.packb([1, 2, 3]), 1),
                                   (True, msgpack.packb("not a request"), 2)):
            raw = RawPeer(daemon.socket, greet=greet)
            try:
                raw.send(None, data=data, fds=fds[:count])
                if not greet or data == b"\xc1":  # garbage: dropped (a bad request is only refused)
                    assert raw.dropped(), (greet, data, count)
            finally:
                raw.close()
            _alive(daemon, client)
        # A greeted peer that sends a descriptor with a valid request that takes none, and
        # then hangs up: the descriptor goes with the connection.
        for _ in range(3):
            raw = RawPeer(daemon.socket)
            assert raw.call("echo", "x", fds=fds[:2])[1] == 0
            raw.close()
        # Ungreeted: a create is refused before the handshake; its descriptor goes too.
        raw = RawPeer(daemon.socket, greet=False)
        assert raw.call("file_mapping_create", PAGE_READONLY, 0, None, fds=fds[:1])[1] == E.ERROR_ACCESS_DENIED
        raw.close()
    finally:
        for fd in fds:
            os.close(fd)
    _alive(daemon, client)
    _settles_at(daemon, baseline)
    assert client.check()["sections"] == 0


def test_descriptor_requests_interleaved_with_pipelined_ones(daemon, client, tmp_path):
    """A raw peer pipelines echoes and a file_mapping_file in one write: the reply that carries
    the descriptor is never mixed up with another; the daemon keeps no extra descriptor."""
    path = _file(tmp_path, _pattern(GRANULE))
    baseline = _fd_count(daemon)
    fd = os.open(path, os.O_RDWR)
    raw = RawPeer(daemon.socket)
    try:
        created = raw.call("file_mapping_create", PAGE_READWRITE, 0, None, fds=[fd])
        assert created[1] == 0
        handle = created[2][0]
        frames = b"".join(msgpack.packb([100 + i, "echo", "x" * 1000]) for i in range(50))
        frames += msgpack.packb([999, "file_mapping_file", handle])
        frames += b"".join(msgpack.packb([200 + i, "echo", i]) for i in range(50))
        raw.sock.sendall(frames)
        reply = raw.reply(999)
        assert reply[1] in (0, E.ERROR_BUSY)
        for i in range(50):
            assert raw.reply(200 + i)[1] == 0
        if reply[1] == 0:
            assert len(raw.received_fds) == 1
            assert os.fstat(raw.received_fds[0]).st_ino == os.stat(path).st_ino
        else:
            assert not raw.received_fds
        assert raw.call("section_close", handle)[1] == 0
    finally:
        raw.close()
        os.close(fd)
    _settles_at(daemon, baseline)
    client.check()


def test_file_mapping_file_only_for_file_sections_this_process_holds(win32, daemon, peers, tmp_path):
    client = shmheap.default_client()
    conn = client.connection
    peer = peers()
    baseline = _fd_count(daemon)
    pagefile = call(win32, win32.CreateFileMapping, INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0, GRANULE, None)[0]
    assert pagefile
    with pytest.raises(shmheap.ShmheapError) as info:
        conn.call_passing_fd("file_mapping_file", pagefile)
    assert info.value.winerror == E.ERROR_INVALID_HANDLE
    path = _file(tmp_path, _pattern(GRANULE))
    ph = peer.ok("CreateFile", path, RW, SHARE_ALL, None, OPEN_EXISTING, 0, None)
    theirs, _ = peer.call("CreateFileMapping", ph, None, PAGE_READWRITE, 0, 0, None)
    assert theirs
    for handle in (theirs, theirs + 4, 0, FILE_HANDLE_BASE, 2**64 - 1):
        with pytest.raises(shmheap.ShmheapError) as info:
            conn.call_passing_fd("file_mapping_file", handle)
        assert info.value.winerror == E.ERROR_INVALID_HANDLE, handle
    h, m = _section(win32, path)
    for _ in range(30):
        _, fd = conn.call_passing_fd("file_mapping_file", m)
        try:
            assert os.fstat(fd).st_ino == os.stat(path).st_ino
        finally:
            os.close(fd)
    _alive(daemon, client)
    for handle in (m, h, pagefile):
        win32.CloseHandle(handle)
    peer.ok("CloseHandle", theirs)
    peer.ok("CloseHandle", ph)
    _settles_at(daemon, baseline)


def test_a_read_only_holder_gets_no_writable_descriptor(win32, daemon, tmp_path):
    path = _file(tmp_path, _pattern(GRANULE))
    name = f"ro-{uuid.uuid4().hex}"
    h, m = _section(win32, path, protect=PAGE_READONLY, name=name)  # the file is open read-write
    try:
        def reader():
            with shmheap.connect(daemon.socket, autostart=False) as c:
                handle = c.section_open(FILE_MAP_READ, name)
                _, fd = c.connection.call_passing_fd("file_mapping_file", handle)
                mode = os.fstat(fd) and (os.O_ACCMODE & __import__("fcntl").fcntl(fd, __import__("fcntl").F_GETFL))
                return 0 if mode == os.O_RDONLY else 1
        assert run_forked(reader) == ("exit", 0)
    finally:
        for handle in (m, h):
            win32.CloseHandle(handle)


# ---- sizes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1 << 40) + 1, 1 << 41, 2**63, 2**64 - 1])
def test_sizes_past_a_tebibyte_fail_cleanly_and_leave_the_file(win32, daemon, tmp_path, size):
    path = _file(tmp_path, b"q" * 5000)
    baseline = _fd_count(daemon)
    h = _open(win32, path)
    for protect in (PAGE_READWRITE, PAGE_READONLY):
        expect(win32, win32.CreateFileMapping, h, None, protect, size >> 32, size & 0xFFFFFFFF, None,
               result=0, error=E.ERROR_NOT_ENOUGH_MEMORY)
    assert os.path.getsize(path) == 5000
    win32.CloseHandle(h)
    _settles_at(daemon, baseline)
    shmheap.default_client().check()


def test_a_section_larger_than_the_address_space_left_does_not_grow_the_file(win32, daemon, tmp_path):
    path = _file(tmp_path, b"q" * 5000)
    h = _open(win32, path)
    size = 1 << 30  # past the test daemon's 256 MiB segment, far below the 1 TiB limit
    try:
        expect(win32, win32.CreateFileMapping, h, None, PAGE_READWRITE, 0, size, None,
               result=0, error=E.ERROR_NOT_ENOUGH_MEMORY)
        assert os.path.getsize(path) == 5000
    finally:
        win32.CloseHandle(h)
        shmheap.default_client().check()


def test_a_section_that_fills_the_address_space_left(win32, daemon, tmp_path):
    """As big as fits: the views work at its last granule, commit and tmpfs stay put; the
    next one does not fit, and everything comes back when it goes."""
    client = shmheap.default_client()
    before = (client.memory_status()["committed"], daemon.resident_bytes())
    path = _file(tmp_path, b"")
    h = _open(win32, path)
    size = 128 << 20
    m = ok_with_success(win32, h, PAGE_READWRITE, size)
    assert os.path.getsize(path) == size  # sparse
    last = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, size - GRANULE, 0)
    win32.write(last + GRANULE - 4, b"end!")
    assert _read_file(path, 4, size - 4) == b"end!"
    assert (client.memory_status()["committed"], daemon.resident_bytes()) == before
    expect(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, size, 0, result=0, error=E.ERROR_ACCESS_DENIED)
    expect(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, size - GRANULE, GRANULE + 1, result=0,
           error=E.ERROR_ACCESS_DENIED)
    win32.UnmapViewOfFile(last)
    for handle in (m, h):
        win32.CloseHandle(handle)
    assert (client.memory_status()["committed"], daemon.resident_bytes()) == before
    assert client.check()["sections"] == 0


@pytest.mark.parametrize("size", [4 * GRANULE, 4 * GRANULE + 100, 4 * GRANULE + PAGE])
def test_views_at_the_last_granule_and_past_the_end(win32, tmp_path, size):
    data = _pattern(size)
    path = _file(tmp_path, data)
    h, m = _section(win32, path, protect=PAGE_READONLY, access=GENERIC_READ)
    last_offset = (size - 1) // GRANULE * GRANULE
    tail = ok(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, last_offset, 0)
    assert win32.read(tail, size - last_offset) == data[last_offset:]
    info = win32.VirtualQuery(tail)
    assert info.State == MEM_COMMIT and info.Type == MEM_MAPPED and info.Protect == PAGE_READONLY
    assert info.RegionSize == (size - last_offset + PAGE - 1) // PAGE * PAGE
    if size % PAGE:  # the rest of the last page reads as zeros, as the file system gives it
        end = tail + size - last_offset
        assert win32.read(end, PAGE - size % PAGE) == bytes(PAGE - size % PAGE)
    exact = ok(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, last_offset, size - last_offset)
    assert exact == tail
    for offset, length in ((size - last_offset + last_offset, 0), (last_offset, size - last_offset + 1),
                           (last_offset + GRANULE, 0), (0, size + 1), (1 << 32, 0), (1 << 40, 0),
                           (2**64 - GRANULE, 0), (last_offset, 2**64 - 1)):
        if offset == size and size % GRANULE:
            continue  # not a granule: an alignment error first
        expect(win32, win32.MapViewOfFile, m, FILE_MAP_READ, offset >> 32, offset & 0xFFFFFFFF, length,
               result=0, error=E.ERROR_ACCESS_DENIED)
    for view in (exact, tail):
        expect(win32, win32.UnmapViewOfFile, view, result=True)
    for handle in (m, h):
        win32.CloseHandle(handle)
    assert shmheap.default_client().check()["sections"] == 0


def test_a_read_only_file_and_write_only_handles(win32, short_dir):
    path = _file(short_dir, b"r" * 8192)
    os.chmod(path, 0o444)
    reader = _open(win32, path, GENERIC_READ)
    expect(win32, win32.CreateFileMapping, reader, None, PAGE_READWRITE, 0, 0, None,
           result=0, error=E.ERROR_ACCESS_DENIED)
    expect(win32, win32.CreateFileMapping, reader, None, PAGE_READWRITE, 0, 1 << 20, None,
           result=0, error=E.ERROR_ACCESS_DENIED)
    m = ok_with_success(win32, reader, PAGE_READONLY)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, 0, 0)
    expect(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0, result=0, error=E.ERROR_ACCESS_DENIED)
    assert win32.read(view, 4) == b"rrrr"
    assert run_forked(lambda: _raw_write(view) or 3) == SEGV  # (a fork has no view anyway)
    win32.UnmapViewOfFile(view)
    win32.CloseHandle(m)
    os.chmod(path, 0o644)
    writer = _open(win32, path, GENERIC_WRITE)
    for protect in (PAGE_READONLY, PAGE_READWRITE, PAGE_WRITECOPY):
        expect(win32, win32.CreateFileMapping, writer, None, protect, 0, 0, None,
               result=0, error=E.ERROR_ACCESS_DENIED)  # FM-26: mapping needs read access
    assert os.path.getsize(path) == 8192
    for handle in (reader, writer):
        win32.CloseHandle(handle)
    shmheap.default_client().check()


def ok_with_success(w, file_handle, protect, size=0, name=None):
    m, error = call(w, w.CreateFileMapping, file_handle, None, protect, size >> 32, size & 0xFFFFFFFF, name)
    assert m and error == E.ERROR_SUCCESS, error
    return m


def test_a_read_only_view_is_read_only_in_its_process(win32, daemon, tmp_path):
    """OpenFileMapping(FILE_MAP_READ) in another process: its view reads, and a raw write
    there faults and never reaches the file."""
    path = _file(tmp_path, _pattern(GRANULE))
    name = f"readonly-view-{uuid.uuid4().hex}"
    h, m = _section(win32, path, name=name)

    def reader(write):
        def body():
            with shmheap.connect(daemon.socket, autostart=False) as c:
                handle = c.section_open(FILE_MAP_READ, name)
                try:
                    c.section_map(handle, FILE_MAP_WRITE)
                    return 1
                except shmheap.ShmheapError as exc:
                    if exc.winerror != E.ERROR_ACCESS_DENIED:
                        return 2
                address = c.section_map(handle, FILE_MAP_READ)
                if ctypes.string_at(address, 4) != _pattern(4):
                    return 4
                if write:
                    _raw_write(address, 0x00)
                return 0
        return body

    assert run_forked(reader(False)) == ("exit", 0)
    assert run_forked(reader(True)) == SEGV
    assert _read_file(path, 4) == _pattern(4)
    for handle in (m, h):
        win32.CloseHandle(handle)


def _unmappable_regular_file():
    """A regular file the kernel refuses to mmap (a sysfs attribute), or None."""
    for path in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/profiling", "/sys/power/state"):
        if os.path.isfile(path) and os.access(path, os.R_OK) and os.path.getsize(path) > 0:
            return path
    return None


def test_a_view_the_kernel_refuses_to_map_leaves_the_segment_whole(daemon, tmp_path):
    """A regular file whose file system refuses mmap: CreateFileMapping may succeed (it is a
    regular file), MapViewOfFile must fail with an error, and the process's segment mapping
    must be whole afterwards: once the section is gone, VirtualAlloc at its address works
    and reads zeros, and the client closes cleanly."""
    path = _unmappable_regular_file()
    if path is None:
        pytest.skip("no readable sysfs attribute here")
    baseline = _fd_count(daemon)

    def body():
        from shmheap.files import files
        c = shmheap.connect(daemon.socket, autostart=False)
        fh, _ = files.create(path, GENERIC_READ, SHARE_ALL, OPEN_EXISTING)
        try:
            handle, _ = c.file_mapping_create(files.get(fh).fd, PAGE_READONLY, 0)
        finally:
            files.close(fh)
        base = c._section(handle)[0]
        try:
            c.section_map(handle, FILE_MAP_READ)
            return 10  # mapped after all: not the case this test is about
        except shmheap.ShmheapError:
            pass
        c.section_close(handle)
        if c.check()["sections"] != 0 or c.mapping.file_views:
            return 11
        if c.virtual_alloc(base, GRANULE, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE) != base:
            return 12
        if ctypes.string_at(base, 16) != bytes(16):
            return 13
        c.virtual_free(base, 0, MEM_RELEASE)
        c.close()
        return 0

    outcome = run_forked(body)
    if outcome == ("exit", 10):
        pytest.skip(f"{path} maps here")
    with shmheap.connect(daemon.socket, autostart=False) as c:
        wait_until(lambda: c.check()["sections"] == 0, DEADLINE, what="the child's section to go")
    _settles_at(daemon, baseline + 1)  # (+ this connection)
    assert outcome == ("exit", 0)


# ---- names -------------------------------------------------------------------------------------------

def test_a_file_create_of_a_pagefile_sections_name_is_that_section(win32, daemon, tmp_path):
    """FM-34: a live name gives a new handle to the section already there, whatever backs
    it; the file is neither mapped nor changed."""
    name = f"mixed-{uuid.uuid4().hex}"
    path = _file(tmp_path, b"file bytes" * 100)
    pagefile, error = call(win32, win32.CreateFileMapping, INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0, GRANULE,
                           name)
    assert pagefile and error == E.ERROR_SUCCESS
    h = _open(win32, path)
    again, error = call(win32, win32.CreateFileMapping, h, None, PAGE_READWRITE, 0, 3 * GRANULE, name)
    assert again == pagefile and error == E.ERROR_ALREADY_EXISTS
    view = ok(win32, win32.MapViewOfFile, again, FILE_MAP_WRITE, 0, 0, 0)
    assert win32.read(view, 10) == bytes(10)  # the pagefile section's zeros
    win32.write(view, b"pagefile")
    assert view not in shmheap.default_client().mapping.file_views
    assert _read_file(path) == b"file bytes" * 100
    win32.UnmapViewOfFile(view)
    for handle in (again, pagefile, h):
        expect(win32, win32.CloseHandle, handle, result=True)
    assert shmheap.default_client().check()["sections"] == 0


def test_a_pagefile_create_of_a_file_sections_name_is_that_section(win32, peers, tmp_path):
    name = f"mixed2-{uuid.uuid4().hex}"
    path = _file(tmp_path, b"FILE" * 2000)
    h, m = _section(win32, path, name=name)
    peer = peers()
    theirs, error = peer.call("CreateFileMapping", INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0, 5 * GRANULE, name)
    assert theirs == m and error == E.ERROR_ALREADY_EXISTS
    their_view = peer.map(theirs, FILE_MAP_WRITE)
    assert peer.ok("read", their_view, 4) == b"FILE"  # the file, mapped in the peer
    peer.call("write", their_view, b"PEER")
    assert _read_file(path, 4) == b"PEER"
    peer.ok("UnmapViewOfFile", their_view)
    peer.ok("CloseHandle", theirs)
    for handle in (m, h):
        win32.CloseHandle(handle)
    assert shmheap.default_client().check()["sections"] == 0


def test_a_name_reused_while_the_old_sections_view_lives(win32, daemon, tmp_path):
    """FM-45 with files: the name goes with the last handle; a new section of that name over
    another file is unrelated; each view keeps its own file."""
    name = f"reuse-{uuid.uuid4().hex}"
    one, two = _file(tmp_path, b"one" * 30000), _file(tmp_path, b"two" * 30000)
    h1, m1 = _section(win32, one, name=name)
    v1 = ok(win32, win32.MapViewOfFile, m1, FILE_MAP_WRITE, 0, 0, 0)
    expect(win32, win32.CloseHandle, m1, result=True)
    expect(win32, win32.OpenFileMapping, FILE_MAP_READ, False, name, result=0, error=E.ERROR_FILE_NOT_FOUND)
    h2 = _open(win32, two)
    m2 = ok_with_success(win32, h2, PAGE_READWRITE, name=name)
    v2 = ok(win32, win32.MapViewOfFile, m2, FILE_MAP_WRITE, 0, 0, 0)
    assert v2 != v1
    assert win32.read(v1, 3) == b"one" and win32.read(v2, 3) == b"two"
    win32.write(v1, b"ONE")
    win32.write(v2, b"TWO")
    expect(win32, win32.UnmapViewOfFile, v1, result=True)
    assert win32.read(v2, 3) == b"TWO"
    expect(win32, win32.UnmapViewOfFile, v2, result=True)
    for handle in (m2, h1, h2):
        win32.CloseHandle(handle)
    assert _read_file(one, 3) == b"ONE" and _read_file(two, 3) == b"TWO"
    client = shmheap.default_client()
    assert client.check()["sections"] == 0 and not client.mapping.file_views
    # and the name is free once more, for a fresh file section
    h3, m3 = _section(win32, one, name=name)
    for handle in (m3, h3):
        win32.CloseHandle(handle)


def test_a_killed_creator_while_another_process_holds_only_a_view(win32, daemon, peers, tmp_path):
    path = _file(tmp_path, _pattern(2 * GRANULE))
    name = f"creator-{uuid.uuid4().hex}"
    peer = peers()
    ph = peer.ok("CreateFile", path, RW, SHARE_ALL, None, OPEN_EXISTING, 0, None)
    pm, _ = peer.call("CreateFileMapping", ph, None, PAGE_READWRITE, 0, 0, name)
    assert pm
    peer.map(pm, FILE_MAP_WRITE)
    m = ok(win32, win32.OpenFileMapping, FILE_MAP_WRITE, False, name)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    expect(win32, win32.CloseHandle, m, result=True)  # only the view is left here
    peer.kill()
    client = shmheap.default_client()
    wait_until(lambda: all(pid != peer.pid for row in client.section_list() for pid, _ in row["handles"] + row["views"]),
               DEADLINE, what="the killed creator's holds to go")
    client.check()
    win32.write(view + GRANULE, b"survivor")
    assert win32.read(view, 16) == _pattern(16)
    assert _read_file(path, 8, GRANULE) == b"survivor"
    assert _holds(daemon, path)
    expect(win32, win32.OpenFileMapping, FILE_MAP_READ, False, name, result=0, error=E.ERROR_FILE_NOT_FOUND)
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    assert client.check()["sections"] == 0
    wait_until(lambda: not _holds(daemon, path), DEADLINE, what="the daemon to close the file")


# ---- handles -----------------------------------------------------------------------------------------

def test_close_handle_of_values_between_file_and_section_handles(win32, tmp_path):
    path = _file(tmp_path, _pattern(GRANULE))
    h, m = _section(win32, path)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    for value in (m + 1, m + 2, m + 4, h + 1, h + 2, h + 4, h - 4, FILE_HANDLE_BASE - 4, FILE_HANDLE_BASE + 1,
                  0x7FFFFFFF, 2**32, 2**63, 2**64 - 2, view, 3):
        expect(win32, win32.CloseHandle, value, result=False, error=E.ERROR_INVALID_HANDLE)
    expect(win32, win32.CloseHandle, INVALID_HANDLE_VALUE, result=True)
    expect(win32, win32.CloseHandle, 2**64 - 1, result=True)  # the same pseudo-handle, unsigned
    expect(win32, win32.GetFileSizeEx, m, result=None, error=E.ERROR_INVALID_HANDLE)  # a section is no file
    expect(win32, win32.MapViewOfFile, h, FILE_MAP_READ, 0, 0, 0, result=0, error=E.ERROR_INVALID_HANDLE)  # FM-57
    expect(win32, win32.CreateFileMapping, m, None, PAGE_READONLY, 0, 0, None, result=0,
           error=E.ERROR_INVALID_HANDLE)  # a section is no file to map
    assert win32.read(view, 8) == _pattern(8)  # none of that touched them
    assert win32.GetFileSizeEx(h) == GRANULE
    expect(win32, win32.CloseHandle, h, result=True)
    expect(win32, win32.CloseHandle, h, result=False, error=E.ERROR_INVALID_HANDLE)  # FM-20
    expect(win32, win32.CreateFileMapping, h, None, PAGE_READONLY, 0, 0, None, result=0,
           error=E.ERROR_INVALID_HANDLE)
    expect(win32, win32.CloseHandle, m, result=True)
    expect(win32, win32.CloseHandle, m, result=False, error=E.ERROR_INVALID_HANDLE)
    win32.write(view, b"still")  # FM-68
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    assert _read_file(path, 5) == b"still"
    assert shmheap.default_client().check()["sections"] == 0


def test_another_processes_section_handle_is_not_ours(win32, peers, tmp_path):
    path = _file(tmp_path, _pattern(GRANULE))
    peer = peers()
    ph = peer.ok("CreateFile", path, RW, SHARE_ALL, None, OPEN_EXISTING, 0, None)
    theirs, _ = peer.call("CreateFileMapping", ph, None, PAGE_READWRITE, 0, 0, None)
    assert theirs
    expect(win32, win32.MapViewOfFile, theirs, FILE_MAP_READ, 0, 0, 0, result=0, error=E.ERROR_INVALID_HANDLE)
    expect(win32, win32.CloseHandle, theirs, result=False, error=E.ERROR_INVALID_HANDLE)
    # and the file handle number: this process's table has none of the peer's
    expect(win32, win32.GetFileSizeEx, ph, result=None, error=E.ERROR_INVALID_HANDLE)
    their_view = peer.map(theirs, FILE_MAP_READ)  # untouched by our attempts
    assert peer.ok("read", their_view, 8) == _pattern(8)
    peer.ok("UnmapViewOfFile", their_view)
    peer.ok("CloseHandle", theirs)
    peer.ok("CloseHandle", ph)
    assert shmheap.default_client().check()["sections"] == 0


# ---- FlushViewOfFile ---------------------------------------------------------------------------------

def test_flush_of_pagefile_views_interiors_and_past_the_view(win32, tmp_path):
    pagefile = call(win32, win32.CreateFileMapping, INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0, 2 * GRANULE,
                    None)[0]
    assert pagefile
    pview = ok(win32, win32.MapViewOfFile, pagefile, FILE_MAP_WRITE, 0, 0, 0)
    for address, size in ((pview, 0), (pview + 1, 1), (pview + 2 * GRANULE - 1, 0), (pview + 5, 10 * GRANULE)):
        expect(win32, win32.FlushViewOfFile, address, size, result=True)  # FM-64: nothing to write
    expect(win32, win32.FlushViewOfFile, pview + 2 * GRANULE, 0, result=False, error=E.ERROR_INVALID_ADDRESS)
    path = _file(tmp_path, _pattern(3 * GRANULE))
    h, m = _section(win32, path)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, GRANULE, GRANULE)
    win32.write(view + 10, b"flushed")
    for address, size in ((view + 10, 7), (view + PAGE + 3, 0), (view + GRANULE - 1, 1), (view + 10, 100 * GRANULE)):
        expect(win32, win32.FlushViewOfFile, address, size, result=True)
    assert _read_file(path, 7, GRANULE + 10) == b"flushed"
    for address in (view - 1, view + GRANULE, view - GRANULE, 0, 2**64 - 1):
        expect(win32, win32.FlushViewOfFile, address, 0, result=False, error=E.ERROR_INVALID_ADDRESS)
    win32.UnmapViewOfFile(view)
    win32.UnmapViewOfFile(pview)
    for handle in (m, h, pagefile):
        win32.CloseHandle(handle)
    assert shmheap.default_client().check()["sections"] == 0


def test_flush_after_one_of_two_views_at_one_address_is_unmapped(win32, tmp_path):
    path = _file(tmp_path, _pattern(GRANULE))
    h, m = _section(win32, path)
    first = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    second = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    assert first == second  # base + offset (the one address space; FM-53 differs)
    try:
        expect(win32, win32.UnmapViewOfFile, first, result=True)
        win32.write(second, b"live")  # the second view is still mapped
        expect(win32, win32.FlushViewOfFile, second, 0, result=True)
    finally:
        win32.UnmapViewOfFile(second)
        for handle in (m, h):
            win32.CloseHandle(handle)


def test_flush_inside_the_larger_of_two_views_at_one_address(win32, tmp_path):
    path = _file(tmp_path, _pattern(3 * GRANULE))
    h, m = _section(win32, path)
    whole = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    small = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, GRANULE)
    assert small == whole
    try:
        win32.write(whole + 2 * GRANULE, b"deep")
        expect(win32, win32.FlushViewOfFile, whole + 2 * GRANULE, 4, result=True)
    finally:
        win32.UnmapViewOfFile(small)
        win32.UnmapViewOfFile(whole)
        for handle in (m, h):
            win32.CloseHandle(handle)


def test_two_views_of_one_process_unmapped_one_by_one(win32, tmp_path):
    """Views at different offsets of one file section: the file stays mapped until the
    last goes, whichever order."""
    path = _file(tmp_path, _pattern(3 * GRANULE))
    h, m = _section(win32, path)
    client = shmheap.default_client()
    a = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, GRANULE)
    b = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 2 * GRANULE, 0)
    expect(win32, win32.UnmapViewOfFile, a, result=True)
    assert a in client.mapping.file_views  # the region stays the file's
    win32.write(b, b"second")
    assert _read_file(path, 6, 2 * GRANULE) == b"second"
    expect(win32, win32.UnmapViewOfFile, b + 17, result=True)
    assert not client.mapping.file_views
    for handle in (m, h):
        win32.CloseHandle(handle)
    assert client.check()["sections"] == 0


# ---- the Pythonic form --------------------------------------------------------------------------------

def test_map_file_edges(daemon, client, tmp_path):
    path = _file(tmp_path, b"")
    with pytest.raises(shmheap.ShmheapError) as info:
        client.map_file(path, "r")  # an empty file, size 0 (FM-29)
    assert info.value.winerror == E.ERROR_FILE_INVALID
    with pytest.raises(shmheap.ShmheapError) as info:
        client.map_file(path, "w+")  # w+ needs a size
    assert info.value.winerror == E.ERROR_INVALID_PARAMETER
    with pytest.raises(shmheap.ShmheapError) as info:
        client.map_file(None, "r")  # neither a path nor a name
    assert info.value.winerror == E.ERROR_INVALID_PARAMETER
    with client.map_file(path, "w+", size=1) as one:
        assert len(one) == 1 and bytes(one) == b"\0"
        one[0] = 0x7A
    assert _read_file(path) == b"z"
    with client.map_file(path, "r+", size=3 * GRANULE + 5) as grown:  # r+ with a size extends
        assert len(grown) == 3 * GRANULE + 5 and grown[0] == 0x7A
    assert os.path.getsize(path) == 3 * GRANULE + 5
    with pytest.raises(shmheap.ShmheapError) as info:
        client.map_file(path, "r", size=4 * GRANULE)  # read-only and larger than the file: FM-31
    assert info.value.winerror == E.ERROR_NOT_ENOUGH_MEMORY
    with client.map_file(path, "r") as ro:
        assert ro[0] == 0x7A and len(ro) == 3 * GRANULE + 5
    assert client.check()["sections"] == 0 and not client.mapping.file_views


def test_map_file_view_close_is_idempotent_and_faults_after(daemon, tmp_path):
    path = _file(tmp_path, _pattern(GRANULE))

    def body():
        c = shmheap.connect(daemon.socket, autostart=False)
        v = c.map_file(path, "r")
        address = v.address
        v.close()
        v.close()
        if address in c.mapping.file_views or c.check()["sections"] != 0:
            return 1
        _raw_read(address)
        return 3

    assert run_forked(body) == SEGV


def test_create_always_over_a_mapped_file(win32, tmp_path):
    """FM-15 asks ERROR_USER_MAPPED_FILE for CREATE_ALWAYS over a file with a live section;
    shmheap checks sharing only among this process's handles. Whatever it answers, a live
    view must not be left past the end of the file it shows without the call saying so."""
    path = _file(tmp_path, _pattern(GRANULE))
    h, m = _section(win32, path)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_READ, 0, 0, 0)
    win32.CloseHandle(h)
    again, error = call(win32, win32.CreateFile, path, RW, SHARE_ALL, None, CREATE_ALWAYS, 0, None)
    if again != INVALID_HANDLE_VALUE:
        win32.CloseHandle(again)
    # Record the outcome; the view itself must not be touched past the new end here.
    assert (again == INVALID_HANDLE_VALUE and error in (E.ERROR_USER_MAPPED_FILE, E.ERROR_SHARING_VIOLATION)) or (
        again != INVALID_HANDLE_VALUE and os.path.getsize(path) == 0)
    os.truncate(path, GRANULE)
    win32.UnmapViewOfFile(view)
    win32.CloseHandle(m)
    assert shmheap.default_client().check()["sections"] == 0



# ---- what other processes and the VirtualAlloc layer may do to a file view -----------------------------

def test_virtual_calls_on_a_file_view_neither_commit_nor_change_it(win32, daemon, tmp_path):
    """FM-56: VirtualAlloc(MEM_COMMIT), VirtualFree and VirtualProtect on a file view fail
    (the codes are Windows' or ERROR_INVALID_ADDRESS), and nothing is committed in tmpfs."""
    client = shmheap.default_client()
    path = _file(tmp_path, _pattern(2 * GRANULE))
    h, m = _section(win32, path)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    before = (client.memory_status()["committed"], daemon.resident_bytes())
    result, error = call(win32, win32.VirtualAlloc, view, GRANULE, MEM_COMMIT, PAGE_READWRITE)
    assert result == 0 and error in (E.ERROR_ACCESS_DENIED, E.ERROR_INVALID_ADDRESS)
    result, error = call(win32, win32.VirtualAlloc, view, GRANULE, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
    assert result == 0 and error in (E.ERROR_INVALID_ADDRESS, E.ERROR_ACCESS_DENIED)
    for size, kind in ((GRANULE, 0x4000), (0, MEM_RELEASE)):  # MEM_DECOMMIT, MEM_RELEASE
        result, error = call(win32, win32.VirtualFree, view, size, kind)
        assert result is False and error in (E.ERROR_INVALID_PARAMETER, E.ERROR_INVALID_ADDRESS)
    assert (client.memory_status()["committed"], daemon.resident_bytes()) == before
    win32.write(view, b"still")  # the view is as it was: writable, the file's
    assert _read_file(path, 5) == b"still"
    win32.UnmapViewOfFile(view)
    for handle in (m, h):
        win32.CloseHandle(handle)
    assert client.check()["sections"] == 0


def test_virtual_calls_on_a_file_view_answer_as_windows(win32, tmp_path):
    path = _file(tmp_path, _pattern(2 * GRANULE))
    h, m = _section(win32, path)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    try:
        expect(win32, win32.VirtualAlloc, view, GRANULE, MEM_COMMIT, PAGE_READWRITE,
               result=0, error=E.ERROR_ACCESS_DENIED)
        expect(win32, win32.VirtualFree, view, GRANULE, 0x4000, result=False, error=E.ERROR_INVALID_PARAMETER)
        # Windows lets a compatible protection through; here a view's protection is its
        # access, the same for the whole view, and VirtualProtect refuses to change it.
        expect(win32, win32.VirtualProtect, view, PAGE, PAGE_READONLY, result=0, error=E.ERROR_INVALID_PARAMETER)
    finally:
        win32.UnmapViewOfFile(view)
        for handle in (m, h):
            win32.CloseHandle(handle)


def test_no_other_process_unmaps_my_view(win32, daemon, peers, tmp_path):
    """UnmapViewOfFile of my view's address from a peer or from my forked child (which holds
    no view) fails with ERROR_INVALID_ADDRESS, and my view lives on."""
    path = _file(tmp_path, _pattern(GRANULE))
    name = f"mine-{uuid.uuid4().hex}"
    h, m = _section(win32, path, name=name)
    view = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
    peer = peers()
    peer.expect("UnmapViewOfFile", view, result=False, error=E.ERROR_INVALID_ADDRESS)
    peer.expect("FlushViewOfFile", view, 0, result=False, error=E.ERROR_INVALID_ADDRESS)

    def child():
        from shmheap import win32 as w
        w.SetLastError(0)
        if w.UnmapViewOfFile(view) or w.GetLastError() != E.ERROR_INVALID_ADDRESS:
            return 1
        if w.FlushViewOfFile(view, 0) or w.GetLastError() != E.ERROR_INVALID_ADDRESS:
            return 2
        return 0

    assert run_forked(child) == ("exit", 0)
    win32.write(view, b"mine")
    assert win32.read(view, 4) == b"mine" and view in shmheap.default_client().mapping.file_views
    expect(win32, win32.UnmapViewOfFile, view, result=True)
    for handle in (m, h):
        win32.CloseHandle(handle)
    assert shmheap.default_client().check()["sections"] == 0


def test_many_file_sections_come_and_go_with_no_descriptor_left(win32, daemon, peers, tmp_path):
    """Churn: sections over many files, views in two processes, closed in every order; the
    daemon ends with the descriptors it began with and a consistent table."""
    peer = peers()
    baseline = _fd_count(daemon)
    paths = [_file(tmp_path, _pattern(GRANULE + i * 999, seed=i)) for i in range(12)]
    for round_ in range(3):
        live = []
        for i, path in enumerate(paths):
            name = f"churn-{round_}-{i}-{uuid.uuid4().hex[:6]}"
            h, m = _section(win32, path, name=name)
            v = ok(win32, win32.MapViewOfFile, m, FILE_MAP_WRITE, 0, 0, 0)
            theirs = peer.ok("OpenFileMapping", FILE_MAP_READ, False, name)
            tv = peer.map(theirs, FILE_MAP_READ)
            assert tv == v and peer.ok("read", tv, 8) == _pattern(8, seed=i)
            live.append((h, m, v, theirs, tv))
        for k, (h, m, v, theirs, tv) in enumerate(live):
            steps = [lambda: win32.CloseHandle(h), lambda: win32.CloseHandle(m), lambda: win32.UnmapViewOfFile(v),
                     lambda: peer.ok("UnmapViewOfFile", tv), lambda: peer.ok("CloseHandle", theirs)]
            for step in (steps if k % 2 else steps[::-1]):
                assert step()
        client = shmheap.default_client()
        assert client.check()["sections"] == 0 and not client.mapping.file_views
    _settles_at(daemon, baseline)


def test_a_view_at_an_offset_opens_only_that_view(daemon, tmp_path):
    path = _file(tmp_path, _pattern(3 * GRANULE))

    def body():
        from shmheap.files import files
        c = shmheap.connect(daemon.socket, autostart=False)
        fh, _ = files.create(path, RW, SHARE_ALL, OPEN_EXISTING)
        handle, _ = c.file_mapping_create(files.get(fh).fd, PAGE_READWRITE, 0)
        files.close(fh)
        view = c.section_map(handle, FILE_MAP_WRITE, GRANULE, GRANULE)
        if ctypes.string_at(view, 4) != _pattern(3 * GRANULE)[GRANULE:GRANULE + 4]:
            return 1
        _raw_read(view - GRANULE)  # offset 0: no view of this process
        return 3

    assert run_forked(body) == SEGV
