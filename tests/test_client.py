"""The client and its connection, through the Pythonic API: the stub's calls raise with the
Win32 code, batches report every failure, and a client whose daemon died gets errors, never a
silently started replacement."""

import os

import pytest

import shmheap
from shmheap.constants import (FILE_MAP_ALL_ACCESS, FILE_MAP_READ, MEM_COMMIT, MEM_DECOMMIT,
                               MEM_RELEASE, MEM_RESERVE, PAGE_READONLY, PAGE_READWRITE)
from shmheap.errors import (ProtocolError, ShmheapMemoryError, ShmheapPermissionError,
                            ShmheapValueError, WinError)

MiB = 2**20


def test_virtual_memory_through_the_client(client):
    address = client.virtual_alloc(0, MiB)  # committed read-write by default
    info = client.virtual_query(address)
    assert (info.BaseAddress, info.RegionSize, info.State, info.Protect) == (address, MiB, MEM_COMMIT, PAGE_READWRITE)
    client.view(address, 4, write=True)[:] = b"page"
    assert client.virtual_protect(address, 4096, PAGE_READONLY) == PAGE_READWRITE
    assert client.view(address, 4).readonly and bytes(client.view(address, 4)) == b"page"
    with pytest.raises(ShmheapPermissionError) as info:
        client.view(address, 4, write=True)
    assert info.value.winerror == WinError.ERROR_NOACCESS
    client.virtual_free(address + 65536, 65536, MEM_DECOMMIT)
    assert client.virtual_query(address + 65536).State == MEM_RESERVE
    client.virtual_free(address, 0, MEM_RELEASE)
    with pytest.raises(ShmheapValueError) as info:
        client.virtual_free(address, 0, MEM_RELEASE)
    assert info.value.winerror == WinError.ERROR_INVALID_ADDRESS
    with pytest.raises(ShmheapValueError):
        client.virtual_alloc(0, 2**40)  # past the segment's end: refused, nothing changes
    big = client.virtual_alloc(0, 200 * MiB, MEM_RESERVE)
    with pytest.raises(ShmheapMemoryError):
        client.virtual_alloc(0, 200 * MiB, MEM_RESERVE)  # fits the segment, not what is left
    client.virtual_free(big, 0, MEM_RELEASE)
    # what is left: the process heap and the C runtime's, both made at connect
    assert client.memory_status()["process_committed"] == client.heap.committed + client.crt_heap.committed
    client.check()


def test_sections_through_the_client(client):
    handle, existed = client.section_create(PAGE_READWRITE, MiB, "pythonic")
    assert not existed
    assert client.section_create(PAGE_READWRITE, MiB, "pythonic") == (handle, True)
    assert client.section_open(FILE_MAP_READ, "pythonic") == handle
    view = client.section_map(handle, FILE_MAP_ALL_ACCESS)
    client.view(view, 5, write=True)[:] = b"named"
    (listed,) = client.section_list()
    assert (listed["name"], listed["address"], listed["size"]) == ("pythonic", view, MiB)
    assert listed["handles"] == [[client.pid, 3]]
    client.section_unmap(view)
    with pytest.raises(ShmheapValueError):
        client.section_unmap(view)  # no view left there
    for _ in range(3):
        client.section_close(handle)
    with pytest.raises(ShmheapValueError) as info:
        client.section_close(handle)
    assert info.value.winerror == WinError.ERROR_INVALID_HANDLE
    assert client.section_list() == []  # gone with its last holder
    with pytest.raises(ShmheapValueError) as info:
        client.section_open(FILE_MAP_READ, "pythonic")
    assert info.value.winerror == WinError.ERROR_FILE_NOT_FOUND
    client.check()


def test_global_objects_through_the_client(client):
    handle = client.global_alloc(0x0042, 100)  # GHND: moveable, zeroed
    pointer = client.global_lock(handle)
    assert bytes(client.view(pointer, 100)) == bytes(100)
    assert client.global_flags(handle) == 1 and client.global_handle(pointer) == handle
    assert client.global_unlock(handle) is False  # the count reached 0
    with pytest.raises(ShmheapValueError) as info:
        client.global_unlock(handle)
    assert info.value.winerror == WinError.ERROR_NOT_LOCKED
    assert client.global_realloc(handle, 5000, 0x0002) == handle and client.global_size(handle) == 5000
    assert client.global_compact() > 0
    client.global_free(handle)
    with pytest.raises(ShmheapValueError) as info:
        client.global_size(handle)
    assert info.value.winerror == WinError.ERROR_INVALID_HANDLE
    client.check()


def test_free_many_frees_all_it_can_then_reports_the_first_failure(client):
    buffers = client.share_many([64] * 5)
    buffers[2].free()
    with pytest.raises(ShmheapValueError) as info:
        client.free_many(buffers)
    assert info.value.winerror == WinError.ERROR_INVALID_HANDLE
    assert client.status()["global_objects"] == 0  # the four live ones went all the same
    client.check()


def test_echo_many_is_one_batch_in_order(client):
    assert client.echo_many(range(1000)) == list(range(1000))
    assert client.echo_many([]) == []


def test_a_client_whose_daemon_died_gets_errors_not_a_new_daemon(make_daemon):
    daemon = make_daemon()
    client = shmheap.connect(daemon.socket)  # autostart allowed: it applies to the first connect
    try:
        assert daemon.stop() == 0
        with pytest.raises(ProtocolError):
            client.echo(1)
        with pytest.raises(ProtocolError):
            client.echo(1)  # the reconnect finds nothing listening, and starts nothing
        assert not os.path.exists(daemon.socket)
        make_daemon(folder=daemon.folder)  # a new daemon on the same socket is another one
        with pytest.raises(ProtocolError) as info:
            client.echo(1)
        assert "restarted" in str(info.value)
    finally:
        client.close()


def test_a_closed_client_refuses_calls(daemon):
    client = shmheap.connect(daemon.socket, autostart=False)
    client.close()
    assert client.closed
    with pytest.raises(ProtocolError):
        client.echo(1)


def test_the_facade_reconnects_after_a_lost_connection_with_memory_of_its_own(win32, daemon):
    client = shmheap.default_client()
    old_heap = win32.GetProcessHeap()
    assert win32.HeapAlloc(old_heap, 0, 64)
    with pytest.raises(ProtocolError):
        client.echo(b"x" * (2 << 20))  # past the frame limit: the daemon drops the connection
    # The daemon released what that connection held. The next call reconnects, with a new
    # process heap whose every block is in this process's own memory.
    pointer = win32.HeapAlloc(win32.GetProcessHeap(), 0, 64)
    assert pointer and win32.VirtualQuery(pointer).State == MEM_COMMIT
    regions = {base: owner for base, _, owner, _, _ in shmheap.default_client().status()["regions"]}
    assert regions[win32.VirtualQuery(pointer).AllocationBase] == shmheap.default_client().pid
    assert len(shmheap.default_client().heap_list()) == 2  # the old process and CRT heaps are gone


def test_the_facade_opens_a_new_client_after_the_default_one_is_closed(win32):
    first = shmheap.default_client()
    first.close()
    address = win32.VirtualAlloc(0, 4096, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    assert address and shmheap.default_client() is not first
    assert win32.HeapAlloc(win32.GetProcessHeap(), 0, 16)


def test_a_forked_childs_first_process_heap_has_the_plain_name(daemon):
    client = shmheap.connect(daemon.socket, autostart=False)
    pid = os.fork()
    if pid == 0:
        try:
            child = shmheap.connect(daemon.socket, autostart=False)
            names = [row["name"] for row in child.heap_list() if row["owner"] == os.getpid()]
            os._exit(0 if names == ["process heap", "crt heap"] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    client.close()
