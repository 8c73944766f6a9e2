"""Fixtures: every test gets its own real daemon, on its own short socket path (Unix socket
paths are limited to 108 bytes) and so its own segment; teardown stops it with SIGTERM and
asserts that the socket and segment are gone."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import uuid

import posix_ipc
import pytest

import shmheap
from shmheap import segment
from shmheap.errors import WinError
from shmheapd.kernel import Kernel
from shmheapd.server import peer_is_listening


def wait_until(predicate, timeout=10.0, interval=0.01, what="condition"):
    """Poll `predicate` until it is truthy or the deadline passes (no bare sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def in_forked_child(body):
    """Run `body()` in a forked child and return the small int it returns (1 if it raised):
    for tests of what a forked process may and may not do with its parent's objects."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    try:
        return os.read(read_end, 1)[0]
    finally:
        os.waitpid(pid, 0)
        os.close(read_end)


def become(uid, groups=()):
    """Turn this (forked) process into user `uid`: primary group `uid`, plus `groups`; needs
    root."""
    os.setgroups(list(groups))
    os.setgid(uid)
    os.setuid(uid)


def as_user(uid, body, groups=(), env=None):
    """Run body() in a forked child turned into `uid` (become), with `env` added to its
    environment. Returns what in_forked_child does."""
    def child():
        become(uid, groups)
        os.environ.update(env or {})
        return body()
    return in_forked_child(child)


def finish(child, timeout=30.0):
    """Wait up to `timeout` for a multiprocessing child to end, killing it if it does not."""
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join(timeout)


def connect_code(socket_path, work=None):
    """A child body for as_user: 0 if it connects (and `work(client)` returns 0), 10 if
    refused with ERROR_ACCESS_DENIED, 11 for any other error."""
    def body():
        try:
            with shmheap.connect(socket_path, autostart=False) as client:
                return work(client) if work else 0
        except shmheap.ShmheapError as exc:
            return 10 if exc.winerror == WinError.ERROR_ACCESS_DENIED else 11
        except Exception:
            return 11
    return body


def receive(conn, timeout=30.0):
    """conn.recv() with a deadline."""
    if not conn.poll(timeout):
        raise AssertionError(f"no message within {timeout}s")
    return conn.recv()


def _touch(socket_path, address, write):
    import ctypes
    import faulthandler

    shmheap.connect(socket_path, autostart=False)  # mapped here, with what this process may touch
    faulthandler.enable()
    if write:
        ctypes.memset(address, 0x55, 1)
    else:
        ctypes.string_at(address, 1)


def touch_in_child(socket_path, address, write=True, timeout=30.0):
    """Touch `address` with a raw pointer in a new process connected to the daemon; returns
    its exit code (-SIGSEGV: an access violation)."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_touch, args=(socket_path, address, write))
    child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        raise AssertionError(f"the child touching {address:#x} did not end within {timeout}s")
    return child.exitcode


class Daemon:
    """A real shmheapd process on a private socket."""

    def __init__(self, folder, *args, size="256M"):
        self.folder = folder
        self.socket = os.path.join(folder, "d.sock")
        self.segment = segment.segment_name(self.socket)
        self.log = os.path.join(folder, "daemon.log")
        self.args = ["--socket", self.socket, "--size", size, "--log-level", "DEBUG",
                     "--log-file", self.log, *args]
        self.proc = None

    def start(self, timeout=10.0, preexec_fn=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "shmheapd", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
        wait_until(lambda: peer_is_listening(self.socket) or self.proc.poll() is not None, timeout,
                   what="the daemon to listen")
        if self.proc.poll() is not None:
            out, err = self.proc.communicate()
            raise AssertionError(f"daemon exited {self.proc.returncode}: {err.decode()}")
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        if self.proc:
            self.proc.stdout.close()
            self.proc.stderr.close()
        return self.proc.returncode if self.proc else None

    def resident_bytes(self):
        """st_blocks of the segment, as the kernel counts its tmpfs pages."""
        shm = posix_ipc.SharedMemory(self.segment)
        try:
            return os.fstat(shm.fd).st_blocks * 512
        finally:
            shm.close_fd()

    def segment_exists(self):
        try:
            posix_ipc.SharedMemory(self.segment).close_fd()
            return True
        except posix_ipc.ExistentialError:
            return False

    def log_text(self):
        with open(self.log) as f:
            return f.read()


@pytest.fixture
def make_kernel():
    """Factory: make_kernel(size, commit_limit, process_commit_limit) builds the daemon's
    kernel in this process, as shmheapd does, on a segment of its own; closed (and its
    segment unlinked) at teardown."""
    made = []

    def make(size, commit_limit, process_commit_limit):
        kernel = Kernel(f"/shmheap-test-{uuid.uuid4().hex[:12]}", size, commit_limit, process_commit_limit)
        made.append(kernel)
        return kernel

    yield make
    for kernel in made:
        kernel.close()


@pytest.fixture
def short_dir():
    folder = tempfile.mkdtemp(prefix="shm", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def make_daemon(short_dir):
    """Factory: make_daemon(*args, size=...) starts another daemon in this test's folder."""
    made = []

    def make(*args, size="256M", start=True, folder=None):
        folder = folder or tempfile.mkdtemp(prefix="d", dir=short_dir)
        daemon = Daemon(folder, *args, size=size)
        made.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in made:
        if daemon.proc is not None and daemon.proc.poll() is None:
            assert daemon.stop() == 0, daemon.log_text()
            assert not os.path.exists(daemon.socket), "socket left behind"
            assert not daemon.segment_exists(), "segment left behind"


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()


@pytest.fixture
def client(daemon):
    with shmheap.connect(daemon.socket, autostart=False) as c:
        yield c


def bind_win32(daemon, monkeypatch):
    """Yield the Win32 facade bound to `daemon` (through SHMHEAP_SOCKET); at teardown the
    daemon must still be consistent. For fixtures: `yield from bind_win32(...)`."""
    monkeypatch.setenv("SHMHEAP_SOCKET", daemon.socket)
    shmheap.close_default()
    from shmheap import win32 as facade
    shmheap.default_client()  # connect now: a refused connection is a setup error
    facade.SetLastError(0)
    yield facade
    client = shmheap.default_client()
    client.check()  # the daemon's walkers: page table, heaps, global memory, sections, sessions
    client.local_objects.check()  # and this process's: LocalAlloc's handle table, its heaps
    for heap in client.heaps.values():
        with heap.lock:  # the purger thread may be at work on it
            heap.check()
    shmheap.close_default()


@pytest.fixture
def win32(daemon, monkeypatch):
    """The Win32 facade bound to this test's daemon."""
    yield from bind_win32(daemon, monkeypatch)


@pytest.fixture
def peers(daemon):
    """Factory: peers() starts another real process that runs Win32 calls on request, bound
    to this test's daemon (see win32_checks.Peer)."""
    from win32_checks import Peer

    made = []

    def make():
        peer = Peer(daemon.socket)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()
