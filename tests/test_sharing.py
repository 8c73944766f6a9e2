"""Shared buffers across real processes: pools under every start method, ownership when the
producer dies, batch allocation, zero-copy numpy views."""

import concurrent.futures
import multiprocessing
import os
import pickle
import signal

import pytest

import shmheap
from shmheap.errors import ShmheapMemoryError, WinError
from shmheap_clients import pool as pool_program

from conftest import wait_until


def total(buffer):
    return float(buffer.numpy("float64").sum())


def fill_and_report(buffer, value):
    buffer.numpy("float64")[:] = value
    return os.getpid()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_pool_program_under_every_start_method(daemon, monkeypatch, method):
    monkeypatch.setenv("SHMHEAP_SOCKET", daemon.socket)
    assert pool_program.run(2, 4, 4096, method, out=lambda line: None) == 0
    with shmheap.connect(daemon.socket, autostart=False) as c:
        assert c.status()["global_objects"] == 0  # the program freed what it shared


def test_process_pool_executor_reads_and_writes_in_place(daemon, monkeypatch):
    monkeypatch.setenv("SHMHEAP_SOCKET", daemon.socket)
    with shmheap.connect(daemon.socket, autostart=False) as c:
        buffers = c.share_many([8 * 1000] * 4, zero=True)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as executor:
            pids = list(executor.map(fill_and_report, buffers, [1.5, 2.5, 3.5, 4.5]))
            sums = list(executor.map(total, buffers))
        assert os.getpid() not in pids
        assert sums == [1500.0, 2500.0, 3500.0, 4500.0]
        assert [float(b.numpy("float64")[0]) for b in buffers] == [1.5, 2.5, 3.5, 4.5]  # in place
        for buffer in buffers:
            buffer.free()


def test_pickled_buffer_is_a_few_bytes_and_copies_nothing(client):
    buffer, array = client.share_array((1000, 1000))
    array[:] = 7
    payload = pickle.dumps(buffer)
    assert len(payload) < 200
    again = pickle.loads(payload)
    assert again.address == buffer.address and again.owner is False
    view = again.numpy("float64", (1000, 1000))
    view[3, 4] = 42  # the same bytes, not a copy
    assert array[3, 4] == 42
    buffer.free()


def _producer(socket_path, conn):
    with shmheap.connect(socket_path, autostart=False) as c:
        mortal = c.share(4096)
        kept = c.share(4096, keep=True)
        mortal.view()[:4] = b"dies"
        kept.view()[:4] = b"stay"
        conn.send((pickle.dumps(mortal), pickle.dumps(kept)))
        conn.recv()  # until killed


def test_buffers_die_with_their_producer_unless_kept(daemon, client):
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child = context.Process(target=_producer, args=(daemon.socket, child_end))
    child.start()
    mortal, kept = (pickle.loads(p) for p in parent_end.recv())
    assert bytes(mortal.view()[:4]) == b"dies" and bytes(kept.view()[:4]) == b"stay"
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)

    def mortal_gone():
        try:
            client.global_size(mortal.address)
            return False
        except shmheap.ShmheapValueError as exc:
            return exc.winerror == WinError.ERROR_INVALID_HANDLE

    wait_until(mortal_gone, what="the dead producer's buffer to be freed")
    assert client.global_size(kept.address) == 4096
    assert bytes(kept.view()[:4]) == b"stay"
    kept.free()  # any process may free a kept buffer
    with pytest.raises(shmheap.ShmheapError) as info:
        kept.free()  # a freed fixed object is no object: an invalid handle, or (once its
    assert info.value.winerror in (WinError.ERROR_INVALID_HANDLE, WinError.ERROR_NOACCESS)  # pages went) no memory
    client.check()


def test_batch_allocation_is_one_round_trip_and_all_or_nothing(client):
    buffers = client.share_many([100] * 10_000)
    spans = sorted((b.address, b.address + b.size) for b in buffers)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert client.status()["global_objects"] == 10_000
    client.free_many(buffers)
    assert client.status()["global_objects"] == 0
    with pytest.raises(ShmheapMemoryError):
        client.share_many([100] * 10 + [2**62])  # the last cannot be had: none are kept
    assert client.status()["global_objects"] == 0
    client.check()


def test_pool_cli_runs_as_a_program(daemon):
    import subprocess
    import sys

    env = dict(os.environ, SHMHEAP_SOCKET=daemon.socket)
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "pool", "--workers", "2",
                           "--buffers", "3", "--count", "1000"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 checked, 0 wrong" in proc.stdout


def test_a_freed_large_buffer_is_reused_then_given_back(daemon, client):
    baseline = daemon.resident_bytes()
    first = client.share(8 << 20)
    first.free()
    assert daemon.resident_bytes() - baseline >= 8 << 20  # kept for the next large buffer
    again = client.share(8 << 20)
    assert again.address == first.address  # the same pages, already backed
    again.free()
    wait_until(lambda: daemon.resident_bytes() == baseline, what="the kept pages to be given back")
    client.check()


def test_kept_pages_give_way_to_a_commit_that_needs_them(make_daemon):
    daemon = make_daemon("--commit-limit", "24M")
    with shmheap.connect(daemon.socket, autostart=False) as c:
        c.share(16 << 20).free()  # 16 MiB kept committed for reuse
        address = c.virtual_alloc(0, 16 << 20, 0x3000, 0x04)  # needs them back
        assert c.virtual_query(address).State == 0x1000
        c.check()
