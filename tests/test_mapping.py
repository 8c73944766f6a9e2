"""Each process's mapping is its MMU: a page is accessible in a process exactly while the
daemon says that process may touch it. Stale views and pointers fault (SIGSEGV, in a child
process), the tmpfs pages stay exactly what the daemon counts as committed whatever a process
does with them, and checked views make no round trip."""

import ctypes
import faulthandler
import multiprocessing
import os
import signal
import threading

import pytest

import shmheap
from shmheap.constants import (FILE_MAP_READ, GMEM_MOVEABLE, MEM_COMMIT, MEM_DECOMMIT, MEM_RELEASE, MEM_RESERVE,
                               PAGE_GUARD, PAGE_READONLY, PAGE_READWRITE)
from shmheap.errors import GuardPageError, ShmheapPermissionError, WinError
from shmheap.connection import Connection
from shmheap.moveable import ADDRESS_MASK
from shmheap.segment import Runs

from conftest import receive, touch_in_child, wait_until

MiB = 2**20
PAGE = 4096
HEADER_RESIDENT = PAGE  # the segment's header page is in tmpfs, and no commit of anyone's
spawn = multiprocessing.get_context("spawn")


def assert_commit_exact(daemon, client, gone_pid):
    """Once the daemon has seen `gone_pid` go: tmpfs holds exactly what the daemon counts."""
    wait_until(lambda: gone_pid not in [p["pid"] for p in client.status()["processes"]],
               what="the daemon to see the child gone")
    assert daemon.resident_bytes() == client.status()["committed"] + HEADER_RESIDENT


def _stale_write(socket_path, what, conn):
    """Commit and write 16 MiB, keep a view, take the pages away (`what`), then write through
    the view: this must fault."""
    client = shmheap.connect(socket_path, autostart=False)
    address = client.virtual_alloc(0, 16 * MiB)
    view = client.view(address, 16 * MiB, write=True)
    view[::PAGE] = b"x" * (16 * MiB // PAGE)
    if what == "protect":
        client.virtual_protect(address, 16 * MiB, PAGE_READONLY)
    elif what == "decommit":
        client.virtual_free(address, 16 * MiB, MEM_DECOMMIT)
    else:
        client.virtual_free(address, 0, MEM_RELEASE)
    conn.send(client.memory_status()["process_committed"])
    faulthandler.enable()
    view[::PAGE] = b"y" * (16 * MiB // PAGE)  # every page: without the fault, 16 MiB comes back
    conn.send("survived")
    conn.recv()


@pytest.mark.parametrize("what", ["protect", "decommit", "release"])
def test_a_view_kept_past_its_pages_faults_and_commit_stays_exact(daemon, client, what):
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_stale_write, args=(daemon.socket, what, child_end))
    child.start()
    committed = receive(parent_end)
    child.join(30)
    assert child.exitcode == -signal.SIGSEGV, "a write through a stale view did not fault"
    if what == "protect":
        assert committed >= 16 * MiB  # still committed, only read-only
    assert_commit_exact(daemon, client, child.pid)
    client.check()


def test_virtual_protect_takes_effect_on_views_taken_before(client, daemon):
    address = client.virtual_alloc(0, 2 * PAGE)
    view = client.view(address, 2 * PAGE, write=True)
    view[:4] = b"rw!!"
    client.virtual_protect(address, PAGE, PAGE_READONLY)
    assert client.view(address, 4).readonly and bytes(view[:4]) == b"rw!!"  # still readable
    with pytest.raises(ShmheapPermissionError):
        client.view(address, 4, write=True)  # the checked view refuses at once
    view[PAGE:PAGE + 4] = b"ok!!"  # the second page is still read-write
    client.virtual_protect(address, PAGE, PAGE_READWRITE)
    view[:4] = b"back"
    assert bytes(client.view(address, 4)) == b"back"


def test_guard_pages_fault_raw_and_raise_once_through_a_checked_view(client, daemon):
    address = client.virtual_alloc(0, 2 * PAGE)
    client.virtual_protect(address + PAGE, PAGE, PAGE_READWRITE | PAGE_GUARD)
    with pytest.raises(GuardPageError):
        client.view(address + PAGE, 4, write=True)
    client.view(address + PAGE, 4, write=True)[:] = b"open"  # the guard went with the first touch
    guarded = client.virtual_alloc(0, PAGE, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE | PAGE_GUARD)
    assert touch_in_child(daemon.socket, guarded) == -signal.SIGSEGV  # not even its owner's


def _owner_of_a_private_page(socket_path, conn):
    client = shmheap.connect(socket_path, autostart=False)
    address = client.virtual_alloc(0, PAGE)
    client.view(address, 4, write=True)[:] = b"mine"
    handle, _ = client.section_create(PAGE_READWRITE, 64 * 1024, "mapping-test")
    view = client.section_map(handle, FILE_MAP_READ | 0x2)
    client.view(view, 7, write=True)[:] = b"section"
    conn.send((address, view))
    conn.recv()


def test_other_processes_memory_faults_and_read_only_views_refuse_writes(daemon, client):
    parent_end, child_end = spawn.Pipe()
    owner = spawn.Process(target=_owner_of_a_private_page, args=(daemon.socket, child_end))
    owner.start()
    private, section_view = receive(parent_end)
    try:
        assert touch_in_child(daemon.socket, private, write=False) == -signal.SIGSEGV
        with pytest.raises(ShmheapPermissionError) as info:
            client.view(private, 4)
        assert info.value.winerror == WinError.ERROR_NOACCESS
        assert touch_in_child(daemon.socket, section_view, write=False) == -signal.SIGSEGV  # no view of ours
        handle = client.section_open(FILE_MAP_READ, "mapping-test")
        mine = client.section_map(handle, FILE_MAP_READ)
        assert mine == section_view and bytes(client.view(mine, 7)) == b"section"
        assert client.view(mine, 7).readonly  # FILE_MAP_READ: read only
        client.section_unmap(mine)
        client.section_close(handle)
    finally:
        parent_end.send("done")
        owner.join(30)
    assert owner.exitcode == 0


def test_a_forked_child_holds_none_of_its_parents_pages(client):
    address = client.virtual_alloc(0, PAGE)
    client.view(address, 4, write=True)[:] = b"mine"
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()
        ctypes.string_at(address, 1)  # the parent's page: no access here
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    assert bytes(client.view(address, 4)) == b"mine"  # the parent's own access is untouched


def test_a_checked_view_of_memory_it_holds_makes_no_round_trip(client, daemon):
    address = client.virtual_alloc(0, PAGE)
    client.view(address, 4, write=True)[:] = b"warm"  # the mapping knows the page now
    done = []
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # a round trip now would never come back
    try:
        worker = threading.Thread(target=lambda: done.append(bytes(client.view(address, 4))))
        worker.start()
        worker.join(10)
        assert done == [b"warm"], "view() waited on the stopped daemon"
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
        worker.join(10)


def _stale_after_a_lost_connection(socket_path, conn):
    client = shmheap.connect(socket_path, autostart=False)
    address = client.virtual_alloc(0, 8 * MiB)
    view = client.view(address, 8 * MiB, write=True)
    view[::PAGE] = b"x" * (8 * MiB // PAGE)
    with pytest.raises(shmheap.ProtocolError):
        client.echo(b"x" * (2 << 20))  # past the frame limit: the daemon drops us, and frees it all
    client.echo(0)  # reconnected: the hello's reply carries everything this process may touch
    conn.send("dropped")
    faulthandler.enable()
    view[::PAGE] = b"y" * (8 * MiB // PAGE)
    conn.send("survived")


def test_a_lost_connection_takes_the_access_with_it(daemon, client):
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_stale_after_a_lost_connection, args=(daemon.socket, child_end))
    child.start()
    assert receive(parent_end) == "dropped"
    child.join(30)
    assert child.exitcode == -signal.SIGSEGV
    assert_commit_exact(daemon, client, child.pid)
    client.check()


def _write_own_handle_slot(socket_path, conn):
    """Hold an unlocked moveable global object: its pointer slot reads, but only the daemon
    writes it, so a write faults."""
    client = shmheap.connect(socket_path, autostart=False)
    handle = client.global_alloc(GMEM_MOVEABLE, 64)
    conn.send((handle, ctypes.c_uint64.from_address(handle & ADDRESS_MASK).value))
    faulthandler.enable()
    ctypes.c_uint64.from_address(handle & ADDRESS_MASK).value = 0


def test_a_moveable_objects_pointer_slot_is_read_only_to_its_holder(daemon, client):
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_write_own_handle_slot, args=(daemon.socket, child_end))
    child.start()
    handle, slot_value = receive(parent_end)
    child.join(30)
    assert child.exitcode == -signal.SIGSEGV
    assert slot_value != 0  # the slot read back the object's data pointer
    assert_commit_exact(daemon, client, child.pid)
    client.check()


def _two_clients_in_threads(socket_path, seconds, conn):
    """Two clients of one process take turns on the same pages from two threads; afterwards
    the mapping must be exactly what a new handshake says this process may touch."""
    import random
    import time

    clients = [shmheap.connect(socket_path, autostart=False) for _ in range(2)]
    for client in clients:  # widen the window between a reply's arrival and its access applied
        apply = client.connection._apply_access
        client.connection._apply_access = lambda changes, apply=apply: (time.sleep(random.random() / 500), apply(changes))
    deadline = time.monotonic() + seconds

    def churn(client):
        while time.monotonic() < deadline:
            address = client.virtual_alloc(0, 64 * 1024)
            ctypes.memset(address, 0x74, 64 * 1024)  # a raw pointer: no view to ask the daemon again
            client.virtual_free(address, 0, MEM_RELEASE)

    faulthandler.enable()
    threads = [threading.Thread(target=churn, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    mapping = clients[0].mapping
    truth = Runs(mapping.size // PAGE, 0)
    # A bare connection's handshake brings everything this process may touch, and asks for nothing.
    Connection(socket_path, autostart=False, on_access=lambda changes: [
        truth.set_pages((a - mapping.base) // PAGE, (a + n - mapping.base) // PAGE, prot) for a, n, prot in changes
    ]).ensure_open()
    pages = mapping.size // PAGE
    conn.send(list(mapping.runs(0, pages)) == list(truth.runs(0, pages)))


def test_two_clients_of_one_process_keep_its_mapping_in_the_daemons_order(daemon, client):
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_two_clients_in_threads, args=(daemon.socket, 3.0, child_end))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "a raw write faulted: the mapping took an older access change last"
    assert receive(parent_end), "the mapping drifted from what the daemon says this process may touch"


def _posted_release_then_other_client(socket_path, conn):
    """A region one client releases (posted, its reply unread) and another client of the same
    process gets next: the first client's late reply must not close it under the second."""
    first = shmheap.connect(socket_path, autostart=False)
    second = shmheap.connect(socket_path, autostart=False)
    base = first.virtual_alloc(0, 64 * 1024)
    first.virtual_free(base, 0, MEM_RELEASE)
    again = second.virtual_alloc(0, 64 * 1024)
    first.memory_status()  # the first client speaks again
    faulthandler.enable()
    ctypes.memset(again, 0x61, 64 * 1024)
    conn.send(again == base)


def test_a_posted_reply_read_late_does_not_close_another_clients_pages(daemon, client):
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_posted_release_then_other_client, args=(daemon.socket, child_end))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "the second client's region was closed by the first one's old reply"
    receive(parent_end)
