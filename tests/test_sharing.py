"""Shared buffers across real processes: pools under every start method, ownership when the
producer dies, batch allocation, zero-copy numpy views."""

import concurrent.futures
import gc
import multiprocessing
import os
import pickle
import signal

import pytest

import shmheap
from shmheap.errors import ShmheapMemoryError, WinError
from shmheap_clients import pool as pool_program

from conftest import receive, wait_until


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
    with pytest.raises(shmheap.ShmheapValueError) as info:
        kept.free()  # freeing twice is refused at once, by the buffer itself
    assert info.value.winerror == WinError.ERROR_INVALID_HANDLE
    with pytest.raises(shmheap.ShmheapValueError):
        client.global_size(kept.address)  # the daemon let it go
    client.check()


def test_a_free_does_not_wait_and_sends_nothing_more(daemon):
    client = shmheap.connect(daemon.socket, autostart=False)
    buffer = client.share(4096)
    sent = client.requests_sent
    buffer.free()
    del buffer
    gc.collect()
    assert client.requests_sent == sent + 1  # the free; its hold went with it (no release after)
    assert client.echo(1) == 1  # one wait for the free's reply and the echo's
    assert client.requests_sent == sent + 2
    assert client.status()["global_objects"] == 0
    client.close()


def test_a_free_the_daemon_refuses_is_raised_by_the_next_call_or_close(daemon):
    creator = shmheap.connect(daemon.socket, autostart=False)
    buffer = creator.share(4096)
    copy = pickle.loads(pickle.dumps(buffer))  # a second hold, through this process's client
    client = copy.client                       # for that daemon
    buffer.free()  # lets go of every hold of this process: the buffer is gone
    copy.free()  # posted: the daemon refuses it
    assert client.echo(1) == 1  # carries the refusal's reply
    with pytest.raises(shmheap.ShmheapValueError) as info:
        client.echo(2)
    assert info.value.winerror == WinError.ERROR_INVALID_HANDLE
    assert client.echo(3) == 3  # raised once

    again = creator.share(64)
    copy = pickle.loads(pickle.dumps(again))
    again.free()
    copy.free()
    creator.close()
    with pytest.raises(shmheap.ShmheapValueError):
        client.close()  # nothing came after: close raises it
    assert client.closed


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


# ---- lifetimes across processes ----------------------------------------------------------

spawn = multiprocessing.get_context("spawn")


def _make_and_return(socket_path, conn):
    with shmheap.connect(socket_path, autostart=False) as c:
        buffer = c.share(4096)
        buffer.view()[:10] = b"from child"
        conn.send(pickle.dumps(buffer))  # pickling pins it for the copy on its way
    # and the worker is gone before the parent has looked


def test_a_buffer_a_worker_returns_outlives_the_worker(daemon, client):
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_make_and_return, args=(daemon.socket, child_end))
    child.start()
    data = receive(parent_end)
    child.join(30)
    assert child.exitcode == 0
    wait_until(lambda: child.pid not in [p["pid"] for p in client.status()["processes"]],
               what="the daemon to see the worker gone")
    buffer = pickle.loads(data)
    assert bytes(buffer.view()[:10]) == b"from child"
    buffer.free()
    client.check()


def _hold_until_told(socket_path, data, conn):
    buffer = pickle.loads(data)  # a hold of this process
    view = buffer.view()
    conn.send("holding")
    conn.recv()  # meanwhile its creator frees it and allocates more
    conn.send(bytes(view[:8]))
    conn.recv()
    client = buffer.client
    del view, buffer
    gc.collect()
    client.echo(0)  # the release goes with the next call
    conn.send("released")
    conn.recv()


def test_a_buffer_freed_by_its_creator_lives_for_its_holders(daemon, client):
    buffer = client.share(4096)
    buffer.view()[:8] = b"original"
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_hold_until_told, args=(daemon.socket, pickle.dumps(buffer), child_end))
    child.start()
    try:
        assert receive(parent_end) == "holding"
        buffer.free()
        with pytest.raises(shmheap.ShmheapValueError) as info:
            client.global_size(buffer.address)  # gone for every call ...
        assert info.value.winerror == WinError.ERROR_INVALID_HANDLE
        others = client.share_many([4096] * 64)  # ... but its memory is not handed out again
        assert buffer.address not in {other.address for other in others}
        for other in others:
            other.view()[:8] = b"newer!!!"
        parent_end.send("read")
        assert receive(parent_end) == b"original"  # the holder still sees its bytes
        assert client.status()["global_objects"] == 65
        parent_end.send("let go")
        assert receive(parent_end) == "released"
        assert client.status()["global_objects"] == 64  # with the last holder it went
        client.free_many(others)
    finally:
        parent_end.send("done")
        child.join(30)
    assert child.exitcode == 0
    client.check()


def test_a_stale_pickled_buffer_is_refused_never_aliased(daemon, client):
    buffer = client.share(64)
    data = pickle.dumps(buffer)
    copy = pickle.loads(data)  # attached (the pin is used up), then let go
    del copy
    gc.collect()
    client.echo(0)
    buffer.free()
    with pytest.raises(shmheap.ShmheapValueError) as info:
        pickle.loads(data)  # its object is gone
    assert info.value.winerror == WinError.ERROR_INVALID_HANDLE
    newer = [client.share(64) for _ in range(64)]  # one of them may well take its address
    with pytest.raises(shmheap.ShmheapValueError):
        pickle.loads(data)  # never taken for a newer object at the same address
    client.free_many(newer)
    client.check()


def _drop_and_idle(socket_path, data, conn):
    buffer = pickle.loads(data)  # attached: this process holds the buffer
    conn.send(bytes(buffer.view()[:4]))
    del buffer  # its hold goes with its next call; none comes, so the flusher sends it
    gc.collect()
    conn.recv()  # idle until told (a deadline is the parent's)


def test_an_idle_process_lets_go_of_a_buffer_it_dropped(daemon, client):
    buffer = client.share(4096)
    buffer.view()[:4] = b"idle"
    parent_end, child_end = spawn.Pipe()
    child = spawn.Process(target=_drop_and_idle, args=(daemon.socket, pickle.dumps(buffer), child_end))
    child.start()
    try:
        assert receive(parent_end, timeout=60) == b"idle"
        buffer.free()  # the child still held it when it dropped it: doomed, not gone
        wait_until(lambda: client.status()["global_objects"] == 0, timeout=10,
                   what="the idle child's hold to go, and the buffer with it")
        assert child.is_alive()  # it went while the child idled, not when it exited
    finally:
        parent_end.send("done")
        child.join(30)
    client.check()
