"""`shmheap stat` against what test processes made: the numbers must match exactly."""

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

import shmheap
from shmheap.constants import PAGE_READWRITE
from conftest import receive, wait_until

MiB = 2**20
spawn = multiprocessing.get_context("spawn")


def _maker(socket_path, conn):
    client = shmheap.connect(socket_path, autostart=False)
    client.create_heap("stat me", initial=MiB)
    region = client.virtual_alloc(0, MiB)
    objects = [client.global_alloc(0, 1000) for _ in range(3)]
    section, _ = client.section_create(PAGE_READWRITE, 65536, "stat section")
    conn.send((os.getpid(), region, objects, section))
    conn.recv()  # hold it all until the test has looked


def _stat(socket_path, *args):
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "stat", "--json", "--socket", socket_path,
                           *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_stat_json_matches_what_the_processes_made(daemon, client):
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_maker, args=(daemon.socket, theirs), daemon=True)
    child.start()
    try:
        pid, region, objects, section = receive(ours)
        before = (client.memory_status()["committed"], daemon.resident_bytes())
        stat = _stat(daemon.socket)
        after = (client.memory_status()["committed"], daemon.resident_bytes())
        status = client.status()
        assert stat["schema"] == 1 and stat["daemon"]["pid"] == daemon.proc.pid
        row = next(p for p in stat["processes"] if p["pid"] == pid)
        regions = [r for r in status["regions"] if r[2] == pid]
        assert row["reserved"] == sum(size for _, size, _, _, _ in regions)
        assert row["committed"] == next(p["committed"] for p in status["processes"] if p["pid"] == pid)
        assert row["heaps"] == 3 and row["global_objects"] == 3 and row["connections"] == 1
        assert (row["private_reserved"], row["private_committed"]) == (MiB, MiB)  # the VirtualAlloc
        mine = [h for h in stat["heaps"] if h["owner"] == pid]
        assert row["heap_reserved"] == sum(h["reserved"] for h in mine)
        assert row["heap_committed"] == sum(h["committed"] for h in mine)
        assert row["reserved"] == row["private_reserved"] + row["heap_reserved"]
        assert row["command"] in ("python3", "python") or row["command"].startswith("python")
        heap = next(h for h in stat["heaps"] if h["name"] == "stat me")
        assert heap["owner"] == pid and heap["committed"] == MiB
        assert stat["global"]["objects"] == 3 and stat["global"]["bytes"] == 3000 and stat["global"]["shared"] == 0
        assert [(s["name"], s["size"], s["holders"]) for s in stat["sections"]] == [("stat section", 65536, 1)]
        totals = stat["totals"]
        # Nothing else allocates meanwhile but the stat command's own connection (its process
        # heap); the daemon's purge may give pages back: between the two, less that.
        own = sum(p["committed"] for p in stat["processes"] if p["pid"] not in (pid, client.pid))
        assert before[0] >= totals["committed"] - own >= after[0]
        assert before[1] >= totals["resident"] - own >= after[1]
        own_reserved = sum(p["reserved"] for p in stat["processes"] if p["pid"] not in (pid, client.pid))
        assert totals["reserved"] - own_reserved == sum(size for _, size, _, _, _ in status["regions"])
        assert sum(p["committed"] for p in stat["processes"]) <= totals["committed"]
        assert stat["clipboard"]["formats"] == []
    finally:
        ours.send("done")
        child.join(10)


def _fragmenter(socket_path, conn):
    client = shmheap.connect(socket_path, autostart=False)
    heap = client.create_heap("fragmented", initial=MiB)
    blocks = [heap.alloc(3000) for _ in range(100)]
    for block in blocks[::2]:
        block.free()  # a free range between every two live blocks
    smalls = [heap.alloc(24) for _ in range(10)]
    conn.send((os.getpid(), heap.handle, heap._heap.usage()))
    conn.recv()  # no more changes: the heap's last report is the one we sent
    del smalls


def test_stat_shows_what_lies_inside_each_heap_as_its_process_reports_it(daemon):
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_fragmenter, args=(daemon.socket, theirs), daemon=True)
    child.start()
    try:
        pid, handle, (blocks, free, largest) = receive(ours)
        assert blocks == 60 and 0 < largest < free  # as the child's heap counts them
        def reported():
            heap = next(h for h in _stat(daemon.socket)["heaps"] if h["handle"] == handle)
            return heap if heap["blocks"] == blocks else None  # reports come about once a second
        heap = wait_until(reported, timeout=15, interval=0.2, what="the heap's report")
        assert heap["owner"] == pid and heap["name"] == "fragmented"
        assert (heap["free"], heap["largest_free"]) == (free, largest)
        assert heap["fragmentation"] == round(1 - largest / free, 3) > 0
        assert 0 <= heap["reported"] < 10
        assert heap["free"] + blocks * 16 <= heap["committed"] == MiB
    finally:
        ours.send("done")
        child.join(10)


def test_a_report_that_cannot_be_true_is_refused(daemon, client):
    heap = client.create_heap("honest", initial=MiB)
    with pytest.raises(shmheap.ShmheapValueError):
        client.connection.call("heap_report", heap.handle, 1, 2 * MiB, 1, 0)  # more free than committed
    with pytest.raises(shmheap.ShmheapValueError):
        client.connection.call("heap_report", heap.handle, 0, 100, 200, 0)  # a range larger than the free bytes
    with pytest.raises(shmheap.ShmheapError):
        client.connection.call("heap_report", heap.handle + 65536, 0, 0, 0, 0)  # no such heap of ours


def test_a_reports_age_is_from_when_it_was_true_not_from_when_it_came(daemon, client):
    heap = client.create_heap("aged", initial=MiB)
    client.heap_report(heap.handle, 0, 4096, 4096, when=time.time() - 30)  # computed, then held back
    assert client.echo(1) == 1  # (it rides with this call)
    row = next(h for h in client.stat()["heaps"] if h["handle"] == heap.handle)
    assert row["free"] == 4096 and 29 <= row["reported"] < 60
    client.heap_report(heap.handle, 0, 8192, 4096, when=time.time() + 3600)  # a clock ahead: now
    row = next(h for h in client.stat()["heaps"] if h["handle"] == heap.handle)
    assert row["free"] == 8192 and 0 <= row["reported"] < 5


def test_stat_tables_and_watch(daemon, client):
    client.create_heap("shown", initial=MiB)
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "stat", "--socket", daemon.socket],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "shown" in proc.stdout and f"shmheapd pid {daemon.proc.pid}" in proc.stdout
    watcher = subprocess.Popen([sys.executable, "-m", "shmheap_clients.cli", "stat", "--json", "--watch", "0.2",
                                "--socket", daemon.socket], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
    finally:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=10)
    assert out.count('"schema": 1') >= 2  # refreshed


def test_stat_without_a_daemon_is_one_line(short_dir):
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "stat", "--socket",
                           os.path.join(short_dir, "none.sock")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "shmheap stat:" in proc.stderr


def test_a_failing_report_is_a_warning_and_the_purger_goes_on(daemon, client):
    import warnings

    from shmheap import private_heap

    heap = client.create_heap("failing reports", initial=MiB)

    def broken(*figures):
        raise RuntimeError("report path broken on purpose")

    heap._heap.source.report = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heap.alloc(64)  # a change: the next round reports it, and fails
        wait_until(lambda: any("report path broken" in str(w.message) for w in caught), timeout=10,
                   what="the warning")
        del heap._heap.source.report  # the method again, for the rest of the test
    assert private_heap.purger.thread.is_alive()
    blocks = [heap.alloc(64 * 1024) for _ in range(32)]
    grown = heap.committed
    for block in blocks:
        block.free()
    wait_until(lambda: heap.committed < grown, timeout=10, what="the purge after a failed report")
