"""Real processes against a real daemon: shared bytes, reclaim on death, limits across
processes, fork, threads and autostart."""

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import pytest

import shmheap
from shmheap import client as client_module
from shmheap.constants import MEM_COMMIT, MEM_DECOMMIT, MEM_RELEASE, MEM_RESERVE, PAGE_READWRITE
from shmheap.errors import ShmheapMemoryError, WinError

from conftest import in_forked_child, receive, touch_in_child, wait_until

MiB = 2**20
# every client commits its process heap and its C runtime heap at connect
HEAP = client_module._PROCESS_HEAP_COMMIT + client_module._CRT_HEAP_COMMIT
spawn = multiprocessing.get_context("spawn")


def private_regions(client):
    """Regions made by VirtualAlloc (every client also holds its process heap's region)."""
    return [r for r in client.status()["regions"] if r[3] == "private"]


def alloc(client, size):
    return client.virtual_alloc(0, size, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)


def _peer(socket_path, shared, conn):
    """In another process: read the parent's global object by pointer, write an answer beside
    it, and publish a private region of our own with a pattern in it."""
    with shmheap.connect(socket_path, autostart=False) as c:
        c.global_lock(shared)  # a fixed object's lock opens its pages here
        seen = ctypes.string_at(shared, 5)
        ctypes.memmove(shared + 8, b"answer", 6)
        own = alloc(c, 65536)
        c.view(own, 4, write=True)[:] = b"mine"
        conn.send((seen, own, c.pid))
        conn.recv()  # keep our region alive until the parent has looked


def test_two_processes_see_each_others_writes_at_the_same_address(daemon, client):
    shared = client.global_alloc(0, 64)
    client.view(shared, 5, write=True)[:] = b"hello"
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_peer, args=(daemon.socket, shared, child_end))
    child.start()
    seen, own, child_pid = receive(parent_end)
    assert seen == b"hello"
    assert ctypes.string_at(shared + 8, 6) == b"answer"  # the same pointer in both processes
    assert child_pid == child.pid and child_pid != client.pid
    with pytest.raises(shmheap.ShmheapPermissionError):
        client.view(own, 4)  # the checked view refuses another process's private pages
    assert touch_in_child(daemon.socket, own) == -signal.SIGSEGV  # and a raw touch faults
    parent_end.send("done")
    child.join(10)
    assert child.exitcode == 0


def _hog(socket_path, size, conn):
    with shmheap.connect(socket_path, autostart=False) as c:
        address = alloc(c, size)
        c.view(address, size, write=True)[::4096] = b"x" * (size // 4096)  # touch every page
        conn.send(address)
        conn.recv()  # wait to be killed


def test_sigkilled_client_is_reclaimed_and_pages_punched_out(daemon, client):
    baseline = daemon.resident_bytes()
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_hog, args=(daemon.socket, 32 * MiB, child_end))
    child.start()
    address = receive(parent_end)
    assert daemon.resident_bytes() - baseline == 32 * MiB + HEAP  # its pages and the heaps made at connect
    assert any(r[0] == address and r[2] == child.pid for r in private_regions(client))
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    wait_until(lambda: daemon.resident_bytes() == baseline, what="the dead client's pages to go")
    status = client.status()
    # Only our process and CRT heaps and the system's global heap are left.
    assert sorted((r[2], r[3]) for r in status["regions"]) == [(0, "global"), (client.pid, "heap"),
                                                               (client.pid, "heap")]
    assert child.pid not in [p["pid"] for p in status["processes"]]
    assert f"pid {child.pid} gone: released 0 global objects, 0 section holds, 2 heaps, 1 regions" \
        in daemon.log_text()
    assert client.virtual_query(address).State == 0x10000  # MEM_FREE
    client.check()


def test_decommit_then_commit_reads_zeros(daemon, client):
    address = alloc(client, 4 * 65536)
    client.view(address, 4 * 65536, write=True)[:] = b"\xab" * (4 * 65536)
    before = daemon.resident_bytes()
    client.virtual_free(address + 65536, 2 * 65536, MEM_DECOMMIT)
    assert before - daemon.resident_bytes() == 2 * 65536
    client.virtual_alloc(address + 65536, 2 * 65536, MEM_COMMIT, PAGE_READWRITE)
    assert bytes(client.view(address + 65536, 2 * 65536)) == bytes(2 * 65536)
    assert bytes(client.view(address, 65536)) == b"\xab" * 65536  # neighbours untouched


def _commit(socket_path, size, conn):
    with shmheap.connect(socket_path, autostart=False) as c:
        try:
            conn.send(("ok", alloc(c, size)))
        except ShmheapMemoryError as exc:
            conn.send(("refused", int(exc.winerror)))
        conn.recv()


def test_commit_limits_across_processes(make_daemon):
    # Room for 768 KiB and the heaps made at connect (72 KiB) per process; the two processes
    # together get less.
    daemon = make_daemon("--commit-limit", "1168K", "--process-commit-limit", "840K")
    with shmheap.connect(daemon.socket, autostart=False) as c:
        with pytest.raises(ShmheapMemoryError) as info:
            alloc(c, 1 * MiB)  # over this process's limit
        assert info.value.winerror == WinError.ERROR_COMMITMENT_LIMIT
        first = alloc(c, 768 * 1024)
        parent_end, child_end = spawn.Pipe()
        child = spawn.Process(target=_commit, args=(daemon.socket, 512 * 1024, child_end))
        child.start()
        assert parent_end.recv() == ("refused", WinError.ERROR_COMMITMENT_LIMIT)  # global limit
        parent_end.send("bye")
        child.join(10)
        c.virtual_free(first, 0, MEM_RELEASE)
        parent_end, child_end = spawn.Pipe()
        child = spawn.Process(target=_commit, args=(daemon.socket, 512 * 1024, child_end))
        child.start()
        assert parent_end.recv()[0] == "ok"
        parent_end.send("bye")
        child.join(10)
        c.check()


def test_fork_child_opens_its_own_connection(daemon, client):
    mine = alloc(client, 65536)
    def child():
        address = alloc(client, 65536)  # reconnects under the child's pid
        return 0 if client.pid == os.getpid() and address != mine else 2

    assert in_forked_child(child) == 0
    assert client.pid == os.getpid()
    wait_until(lambda: [r[0] for r in private_regions(client)] == [mine],
               what="the child's region to be reaped")
    assert client.virtual_query(mine).State == MEM_COMMIT


def test_fork_child_cannot_use_its_parents_heaps(daemon, client):
    heap = client.create_heap("parent's", initial=65536)
    block = heap.alloc(100)
    block.view()[:5] = b"mine!"
    def child():
        try:
            heap.alloc(10)
            return 2  # the parent's heap must be refused here
        except shmheap.ShmheapValueError as exc:
            if exc.winerror != WinError.ERROR_INVALID_HANDLE:
                return 3
        return 0 if client.heap.alloc(100).address != block.address else 4  # ours works

    assert in_forked_child(child) == 0
    assert bytes(block.view()[:5]) == b"mine!"
    heap.destroy()


def test_threads_share_one_connection(client):
    errors = []

    def work():
        try:
            for _ in range(100):
                address = alloc(client, 8192)
                client.view(address, 8, write=True)[:] = address.to_bytes(8, "little")
                assert bytes(client.view(address, 8)) == address.to_bytes(8, "little")
                client.virtual_free(address, 0, MEM_RELEASE)
        except Exception as exc:  # reported below with the thread's failure
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert private_regions(client) == []
    client.check()


def test_many_clients_at_once(daemon, client):
    script = ("import shmheap, sys\n"
              "from shmheap.constants import *\n"
              "with shmheap.connect(sys.argv[1], autostart=False) as c:\n"
              "    for _ in range(50):\n"
              "        a = c.virtual_alloc(0, 65536, MEM_COMMIT|MEM_RESERVE, PAGE_READWRITE)\n"
              "        c.view(a, 1, write=True)[0] = 7\n"
              "        c.virtual_free(a, 0, MEM_RELEASE)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, daemon.socket]) for _ in range(6)]
    assert [p.wait(60) for p in procs] == [0] * 6
    assert private_regions(client) == []
    client.check()


def test_autostart_starts_an_embedded_daemon_that_exits_when_idle(short_dir, monkeypatch):
    path = os.path.join(short_dir, "auto", "a.sock")
    monkeypatch.setenv("SHMHEAP_SOCKET", path)
    monkeypatch.setenv("SHMHEAP_IDLE_EXIT", "0.5")
    with shmheap.connect() as c:  # nothing listens: starts one
        assert c.echo("up") == "up"
        daemon_pid = c.info["daemon_pid"]
        assert c.path == path
    wait_until(lambda: not os.path.exists(path), what="the idle daemon to exit")
    wait_until(lambda: not _alive(daemon_pid), what="the idle daemon process to end")
    client_module.close_default()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by us, its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"
