"""The daemon as a process: start-up, shutdown, stale state, refusal, and bad input on the
socket, against real daemons and raw sockets."""

import os
import signal
import socket
import stat
import subprocess
import sys

import msgpack
import pytest

from shmheap import connect
from shmheap.constants import MEM_COMMIT, MEM_RESERVE, PAGE_READWRITE
from shmheap.errors import ShmheapPermissionError, ShmheapValueError, WinError
from shmheap.protocol import PROTOCOL_VERSION

from conftest import Daemon, as_user


def raw_socket(daemon, hello=True):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(daemon.socket)
    if hello:
        sock.sendall(msgpack.packb([1, "hello", PROTOCOL_VERSION, {}]))
        assert read_frame(sock)[1] == 0
    return sock


def read_frame(sock):
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        data = sock.recv(65536)
        if not data:
            return None
        unpacker.feed(data)
        for frame in unpacker:
            return frame


def is_dropped(sock):
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_socket_is_private_and_dir_created_0700(make_daemon, short_dir):
    daemon = make_daemon(folder=os.path.join(short_dir, "new"))
    assert stat.S_IMODE(os.stat(daemon.folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


def test_sigterm_unlinks_socket_and_segment(daemon):
    assert daemon.segment_exists()
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.socket)
    assert not daemon.segment_exists()


def test_second_daemon_on_a_live_socket_refuses(daemon, client):
    rival = Daemon(daemon.folder, size="64M")
    rival.args[rival.args.index("--log-file") + 1] += ".rival"
    proc = subprocess.run([sys.executable, "-m", "shmheapd", *rival.args], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    assert client.echo("still here") == "still here"


def test_stale_socket_and_segment_of_a_killed_daemon_are_replaced(make_daemon):
    first = make_daemon()
    with connect(first.socket, autostart=False) as c:
        generation = c.info["generation"]
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert os.path.exists(first.socket) and first.segment_exists()  # left behind by the dead
    second = make_daemon(folder=first.folder)
    with connect(second.socket, autostart=False) as c:
        assert c.info["generation"] != generation
        assert c.info["daemon_pid"] == second.proc.pid
        assert all(r[2] in (c.pid, 0) for r in c.status()["regions"])  # nothing of the dead one's


def test_idle_daemon_exits_and_cleans_up(make_daemon):
    daemon = make_daemon("--idle-exit", "0.3")
    with connect(daemon.socket, autostart=False) as c:
        c.echo(1)
    assert daemon.proc.wait(timeout=10) == 0
    assert not os.path.exists(daemon.socket) and not daemon.segment_exists()


def test_garbage_and_bad_frames_leave_others_served(daemon, client):
    address = client.virtual_alloc(0, 65536, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    client.view(address, 4, write=True)[:] = b"keep"

    cases = [
        b"\xc1\xc1\xc1\xc1",  # not msgpack at all
        msgpack.packb({"op": "echo"}),  # msgpack, but not a request
        msgpack.packb(["x", "echo", 1]),  # no msgid
        b"\xc6" + (64 << 20).to_bytes(4, "big") + b"\0" * (2 << 20),  # a 64 MiB frame
        b"\x92\x01\xa3\xff\xfe\xfd",  # [1, <a str that is not UTF-8>]
    ]
    for payload in cases:
        sock = raw_socket(daemon, hello=False)
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped mid-send: as good as dropped after
        else:
            assert is_dropped(sock), payload[:16]
        sock.close()

    sock = raw_socket(daemon, hello=False)
    sock.sendall(msgpack.packb([5, "virtual_query", 65536]))  # before the handshake
    assert read_frame(sock)[:2] == [5, WinError.ERROR_ACCESS_DENIED]
    sock.sendall(msgpack.packb([6, "hello", PROTOCOL_VERSION + 99, {}]))
    assert read_frame(sock)[:2] == [6, WinError.ERROR_NOT_SUPPORTED]
    sock.close()

    sock = raw_socket(daemon)  # well framed but wrong: answered, connection kept
    sock.sendall(msgpack.packb([7, "no_such_op"]) + msgpack.packb([8, "virtual_alloc", "a", 1, 2, 3])
                 + msgpack.packb([9, "virtual_free", address + 0x1000, 0, 0x8000]) + msgpack.packb([10, "echo", "ok"]))
    replies = []
    unpacker = msgpack.Unpacker(raw=False)
    while len(replies) < 4:
        unpacker.feed(sock.recv(65536))
        replies.extend(unpacker)
    assert [r[:2] for r in replies] == [[7, WinError.ERROR_INVALID_FUNCTION],
                                        [8, WinError.ERROR_INVALID_PARAMETER],
                                        [9, WinError.ERROR_INVALID_ADDRESS],  # not a region base
                                        [10, 0]]
    sock.close()

    assert bytes(client.view(address, 4)) == b"keep"
    assert client.echo("alive") == "alive"
    client.check()
    assert daemon.proc.poll() is None


def test_pipelined_errors_do_not_hide_neighbours(client):
    requests = [("echo", (i,)) if i % 3 else ("virtual_query", (2**63,)) for i in range(300)]
    replies = client.connection.call_many(requests, return_exceptions=True)
    for i, reply in enumerate(replies):
        if i % 3:
            assert reply == i
        else:
            assert isinstance(reply, ShmheapValueError) and reply.winerror == WinError.ERROR_INVALID_PARAMETER
    with pytest.raises(ShmheapValueError):  # without return_exceptions the first failure raises
        client.connection.call_many(requests)
    assert client.echo("after") == "after"  # every reply was read: the stream is in step


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another uid")
def test_other_uid_is_refused(daemon, client):
    # Let the other uid reach the socket through the folders: SO_PEERCRED alone must stop it.
    os.chmod(os.path.dirname(daemon.folder), 0o755)
    os.chmod(daemon.folder, 0o755)
    os.chmod(daemon.socket, 0o666)
    def child():
        try:
            connect(daemon.socket, autostart=False)
        except ShmheapPermissionError as exc:
            return 0 if exc.winerror == WinError.ERROR_ACCESS_DENIED else 2
        return 3

    assert as_user(65534, child) == 0, "a client of another uid was not refused with ERROR_ACCESS_DENIED"
    assert "refused pid" in daemon.log_text()
    assert client.echo(1) == 1


def test_a_commit_limit_too_small_for_the_daemon_itself_is_one_line_and_exit_1(short_dir):
    daemon = Daemon(short_dir, "--commit-limit", "64K")
    proc = subprocess.run([sys.executable, "-m", "shmheapd", *daemon.args], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "[WinError 1455]" in proc.stderr, proc.stderr
    assert not os.path.exists(daemon.socket) and not daemon.segment_exists()


def test_idle_daemon_stays_up_while_shared_memory_lives(make_daemon):
    daemon = make_daemon("--idle-exit", "0.3")
    with connect(daemon.socket, autostart=False) as c:
        kept = c.share(64, keep=True)  # GMEM_SHARE: meant to outlive this process
        kept.view()[:4] = b"kept"
        mortal = c.share(64)
        address = kept.address
    with pytest.raises(subprocess.TimeoutExpired):
        daemon.proc.wait(timeout=1.5)  # five idle periods: it stays
    assert "staying up: 1 shared global objects" in daemon.log_text()
    with connect(daemon.socket, autostart=False) as c:
        c.global_lock(address)  # a process touches global memory it holds
        assert bytes(c.view(address, 4)) == b"kept"
        with pytest.raises(ShmheapValueError):
            c.global_size(mortal.address)  # the unshared one went with its process
        c.global_free(address)
    assert daemon.proc.wait(timeout=10) == 0  # nothing left to lose: it exits
    assert "nothing meant to outlive them: exiting" in daemon.log_text()
    assert not os.path.exists(daemon.socket) and not daemon.segment_exists()
