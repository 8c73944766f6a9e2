"""Daemon faults and exhaustion: a dead daemon is an error at once and never silently
replaced; a restarted one clears its predecessor's leftovers; running out of descriptors
refuses new connections and keeps serving; a connection that never says hello is dropped."""

import os
import resource
import signal
import socket
import time

import pytest

import shmheap
from shmheap.constants import MEM_COMMIT, MEM_RESERVE, PAGE_READWRITE
from shmheapd.server import peer_is_listening
from conftest import wait_until


def _raw_connections(path, count):
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(path)
        sockets.append(sock)
    return sockets


def _closed_by_daemon(sock):
    """True once the daemon has closed this connection (without our saying anything)."""
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except ConnectionResetError:
        return True


def test_out_of_descriptors_the_daemon_refuses_new_connections_and_keeps_serving(make_daemon):
    daemon = make_daemon(start=False)

    def few_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    daemon.start(preexec_fn=few_files)
    with shmheap.connect(daemon.socket, autostart=False) as client:
        address = client.virtual_alloc(0, 65536)
        client.view(address, 5, write=True)[:] = b"alive"
        crowd = _raw_connections(daemon.socket, 100)  # more than it has descriptors for
        try:
            wait_until(lambda: sum(_closed_by_daemon(sock) for sock in crowd) >= 30,
                       what="the daemon to refuse the connections it has no descriptor for")
            assert daemon.proc.poll() is None  # still up ...
            assert client.echo("still here") == "still here"  # ... still serving
            assert bytes(client.view(address, 5)) == b"alive"
            client.check()
        finally:
            for sock in crowd:
                sock.close()
        # Descriptors back: new clients are let in again.
        wait_until(lambda: _connects(daemon.socket), what="a new client to be let in")


def _connects(path):
    try:
        with shmheap.connect(path, autostart=False) as other:
            return other.echo(1) == 1
    except shmheap.ShmheapError:
        return False


def test_a_connection_that_never_says_hello_is_dropped(make_daemon):
    daemon = make_daemon("--handshake-timeout", "0.5")
    (silent,) = _raw_connections(daemon.socket, 1)
    started = time.monotonic()
    wait_until(lambda: _closed_by_daemon(silent), timeout=10, what="the silent connection to be dropped")
    assert time.monotonic() - started >= 0.4
    silent.close()
    assert _connects(daemon.socket)


def test_when_the_daemon_dies_every_call_fails_at_once_and_none_is_started_in_its_place(make_daemon, monkeypatch):
    daemon = make_daemon()
    monkeypatch.setenv("SHMHEAP_SOCKET", daemon.socket)
    client = shmheap.connect(daemon.socket)  # may autostart: it did not need to
    client.virtual_alloc(0, 65536)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(shmheap.ProtocolError):
            client.virtual_alloc(0, 65536, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
        assert time.monotonic() - started < 2  # an error at once, not a hang
    assert not peer_is_listening(daemon.socket)  # no replacement with default settings
    client.close()

    # A daemon started again on that socket clears the dead one's socket and segment.
    assert daemon.segment_exists() and os.path.lexists(daemon.socket)
    daemon.start()
    with shmheap.connect(daemon.socket, autostart=False) as fresh:
        assert fresh.status()["committed"] == fresh.memory_status()["committed"]
        assert fresh.status()["global_objects"] == 0
        fresh.check()
