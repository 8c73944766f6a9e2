"""Exhaustion: the commit limit reached by several processes at once, the segment's tmpfs
full, a thousand connections. Each gets a clean error (never a SIGBUS) or is served, and
nobody else is stalled."""

import errno
import multiprocessing
import resource

import pytest

import shmheap
from shmheap.connection import Connection
from shmheap.errors import ShmheapError, WinError
from conftest import receive

MiB = 2**20
spawn = multiprocessing.get_context("spawn")


def _grab_until_refused(socket_path, conn):
    """Commit 1 MiB regions, touching every page, until the daemon refuses; report how
    many, then give them back when told."""
    client = shmheap.connect(socket_path, autostart=False)
    regions, refusal = [], None
    conn.send("ready")
    receive(conn)  # all start together
    while refusal is None:
        try:
            address = client.virtual_alloc(0, MiB)
        except ShmheapError as exc:
            refusal = int(exc.winerror)
            break
        client.view(address, MiB, write=True)[:] = bytes([len(regions) & 0xFF]) * MiB  # no SIGBUS
        regions.append(address)
    intact = all(bytes(client.view(a, 16)) == bytes([i & 0xFF]) * 16 for i, a in enumerate(regions))
    conn.send((len(regions), refusal, intact))
    receive(conn)
    for address in regions:
        client.virtual_free(address, 0, 0x8000)
    client.close()
    conn.send("done")


def test_the_commit_limit_reached_by_several_processes_at_once(make_daemon):
    daemon = make_daemon("--commit-limit", "40M")
    with shmheap.connect(daemon.socket, autostart=False) as observer:
        baseline = observer.memory_status()["committed"]
        ends = []
        for _ in range(4):
            ours, theirs = spawn.Pipe()
            spawn.Process(target=_grab_until_refused, args=(daemon.socket, theirs), daemon=True).start()
            assert receive(ours) == "ready"
            ends.append(ours)
        for end in ends:
            end.send("go")
        results = [receive(end, timeout=60) for end in ends]
        assert all(refusal == WinError.ERROR_COMMITMENT_LIMIT and intact for _, refusal, intact in results), results
        status = observer.memory_status()
        assert status["committed"] <= 40 * MiB and sum(n for n, _, _ in results) * MiB >= 40 * MiB - 8 * MiB
        assert observer.echo("not stalled") == "not stalled"
        assert daemon.resident_bytes() == status["committed"] + 4096  # tmpfs holds what is counted
        for end in ends:
            end.send("free")
        assert all(receive(end) == "done" for end in ends)
        assert observer.memory_status()["committed"] <= baseline + 64 * 1024
        observer.check()


def test_a_full_tmpfs_is_a_clean_commit_error_that_changes_nothing(make_kernel):
    # /dev/shm here is far larger than a test may fill: the page table's backing is told
    # what a full tmpfs says (posix_fallocate: ENOSPC), on a real segment.
    kernel = make_kernel(64 * MiB, 64 * MiB, 64 * MiB)
    from shmheapd.sessions import Session

    kernel.attach(Session(None, 4242, 0))
    backing = kernel.pagetable.backing
    real_commit = backing.commit

    def full(address, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    backing.commit = full
    committed, resident = kernel.pagetable.committed, kernel.pagetable.resident_bytes()
    with pytest.raises(ShmheapError) as info:
        kernel.ops["virtual_alloc"](4242, 0, 4 * MiB, 0x1000 | 0x2000, 4)
    assert info.value.winerror == WinError.ERROR_COMMITMENT_LIMIT
    assert kernel.pagetable.committed == committed and kernel.pagetable.resident_bytes() == resident
    backing.commit = real_commit
    kernel.ops["virtual_alloc"](4242, 0, 4 * MiB, 0x1000 | 0x2000, 4)  # room again: it works
    kernel.check()


def test_a_thousand_connections_are_served(daemon):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1200
    if soft < wanted:  # this process's own end of each connection needs a descriptor too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    connections = []
    try:
        for _ in range(1000):
            connection = Connection(daemon.socket, autostart=False)
            connection.ensure_open()
            connections.append(connection)
        with shmheap.connect(daemon.socket, autostart=False) as client:
            assert client.echo("and one more") == "and one more"
            assert sum(row["connections"] for row in client.status()["processes"]) >= 1001
            address = client.virtual_alloc(0, MiB)
            client.view(address, 4, write=True)[:] = b"fine"
            assert bytes(client.view(address, 4)) == b"fine"
            assert all(c.call("echo", i) == i for i, c in enumerate(connections[::100]))
            client.check()
    finally:
        for connection in connections:
            connection.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
