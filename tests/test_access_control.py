"""Access control both ways: the socket folder must be the user's alone (daemon and
autostarting client refuse anything else), the client talks only to a daemon of its own
uid (or root's), and one process cannot use another's private heaps, regions or clipboard
session."""

import os
import signal
import subprocess
import sys

import pytest

import shmheap
from shmheap import connection
from shmheap.constants import MEM_DECOMMIT, MEM_RELEASE, PAGE_READONLY
from shmheap.errors import WinError
from shmheapd.main import main as daemon_main
from shmheapd.server import peer_is_listening
from conftest import Daemon, as_user, become, connect_code, wait_until
from win32_checks import expect


def _folder(short_dir, name, mode):
    folder = os.path.join(short_dir, name)
    os.mkdir(folder)
    os.chmod(folder, mode)
    return folder


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_client_will_not_autostart_into_a_folder_others_can_write(short_dir, mode):
    folder = _folder(short_dir, "open", mode)
    path = os.path.join(folder, "d.sock")
    with pytest.raises(shmheap.ShmheapPermissionError) as info:
        shmheap.connect(path)
    assert info.value.winerror == WinError.ERROR_ACCESS_DENIED and "writable by others" in str(info.value)
    assert os.listdir(folder) == []  # no daemon, no log, no lock file
    assert not peer_is_listening(path)


def test_a_client_will_not_autostart_through_a_symlinked_folder(short_dir):
    real = _folder(short_dir, "real", 0o700)
    link = os.path.join(short_dir, "link")
    os.symlink(real, link)
    with pytest.raises(shmheap.ShmheapPermissionError) as info:
        shmheap.connect(os.path.join(link, "d.sock"))
    assert "symlink" in str(info.value)
    assert os.listdir(real) == []


def test_the_daemon_refuses_a_folder_others_can_write_in_one_line(short_dir):
    folder = _folder(short_dir, "open", 0o777)
    proc = subprocess.run([sys.executable, "-m", "shmheapd", "--socket", os.path.join(folder, "d.sock"),
                           "--size", "64M"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "writable by others" in proc.stderr
    assert os.listdir(folder) == []


def test_a_missing_folder_is_made_ours_alone(short_dir):
    path = os.path.join(short_dir, "new", "d.sock")
    with shmheap.connect(path) as client:  # autostarts the daemon there
        assert client.echo(1) == 1
        assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
        daemon_pid = client.status()["daemon_pid"]
    os.kill(daemon_pid, 15)


def test_the_client_refuses_a_daemon_of_another_uid(daemon, monkeypatch):
    # We cannot be two users here without root: be another one in the client's eyes instead.
    # The daemon runs as the real uid; a client that believes it is uid 4242 must refuse it
    # before the handshake (and so before mapping any segment the listener might name).
    real = os.getuid()
    other = 4242 if real != 4242 else 4243
    monkeypatch.setattr(connection.os, "getuid", lambda: other)
    if real == 0:
        monkeypatch.setattr(connection, "_TRUSTED_UIDS", ())  # root's daemon is trusted: not here
    sent = list(connection.traffic)
    with pytest.raises(shmheap.ShmheapPermissionError) as info:
        shmheap.connect(daemon.socket, autostart=False)
    assert f"runs as uid {real}" in str(info.value)
    assert connection.traffic[0] == sent[0]  # not even the hello went out


def test_a_process_cannot_use_anothers_private_heaps_regions_or_clipboard_session(win32, peers):
    w = win32
    other = peers()
    heap = other.ok("HeapCreate", 0, 0, 0)
    block = other.ok("HeapAlloc", heap, 0, 64)
    region = other.ok("VirtualAlloc", 0, 65536, 0x3000, 4)
    expect(w, w.HeapAlloc, heap, 0, 64, result=0, error=WinError.ERROR_INVALID_HANDLE)
    expect(w, w.HeapFree, heap, 0, block, result=False, error=WinError.ERROR_INVALID_HANDLE)
    expect(w, w.HeapDestroy, heap, result=False, error=WinError.ERROR_INVALID_HANDLE)
    # Not in this process's address space, as another process's memory is not on Windows.
    expect(w, w.VirtualFree, region, 0, MEM_RELEASE, result=False, error=WinError.ERROR_INVALID_ADDRESS)
    expect(w, w.VirtualFree, region, 4096, MEM_DECOMMIT, result=False, error=WinError.ERROR_INVALID_ADDRESS)
    expect(w, w.VirtualProtect, region, 4096, PAGE_READONLY, result=0, error=WinError.ERROR_INVALID_ADDRESS)
    assert other.call("write", region, b"intact")[0] is None
    assert other.ok("OpenClipboard", 9)  # its clipboard session: not ours to use
    expect(w, w.EmptyClipboard, result=False, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)
    expect(w, w.CloseClipboard, result=False, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)
    expect(w, w.GetClipboardData, 1, result=0, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)
    # All of it still works for its owner.
    assert other.ok("HeapFree", heap, 0, block) and other.ok("HeapDestroy", heap)
    assert other.ok("VirtualFree", region, 0, MEM_RELEASE) and other.ok("CloseClipboard")


# ---- sharing with other users (--allow-uid, --allow-group) -------------------------------------
# These take other uids, which needs root; a user's own daemon and clients are all the tests
# above. NOBODY stands for the user let in, STRANGER for one who is not.

NOBODY, STRANGER, CREW = 65534, 65533, 65532
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to be another uid")




def _reachable(short_dir):
    os.chmod(short_dir, 0o711)  # others may pass through the test's folder (not list it)


def _widen_by_hand(daemon):
    os.chmod(daemon.folder, 0o711)
    os.chmod(daemon.socket, 0o666)


@needs_root
def test_another_user_is_refused_by_default_by_the_files_themselves(short_dir, make_daemon):
    _reachable(short_dir)
    daemon = make_daemon()
    assert os.stat(daemon.socket).st_mode & 0o077 == 0 and os.stat(daemon.folder).st_mode & 0o077 == 0
    assert as_user(NOBODY, connect_code(daemon.socket)) == 10
    assert "refused pid" not in daemon.log_text()  # the kernel refused it: the daemon saw nothing


@needs_root
def test_a_user_let_in_shares_memory_with_the_owner_and_no_one_else_gets_in(short_dir, make_daemon):
    _reachable(short_dir)
    daemon = make_daemon("--allow-uid", str(NOBODY))
    with shmheap.connect(daemon.socket, autostart=False) as owner:
        shared = owner.share(64)
        shared.view()[:5] = b"owner"

        def work(client):
            view = client.view(client.global_lock(shared.address), 64)
            if bytes(view[:5]) != b"owner":
                return 20
            view[:5] = b"guest"
            client.global_unlock(shared.address)
            address = client.virtual_alloc(0, 1 << 16)  # its own memory too
            client.view(address, 5)[:] = b"pages"
            return 0

        assert as_user(NOBODY, connect_code(daemon.socket, work)) == 0
        assert bytes(shared.view()[:5]) == b"guest"
        assert as_user(STRANGER, connect_code(daemon.socket)) == 10
        # and a stranger who reaches the socket anyway (its mode widened by hand) is refused
        # by the daemon, which checks every peer's credentials itself
        _widen_by_hand(daemon)
        assert as_user(STRANGER, connect_code(daemon.socket)) == 10
        assert "refused pid" in daemon.log_text()
        assert owner.echo(1) == 1


@needs_root
def test_a_group_let_in_admits_its_members_by_their_supplementary_groups(short_dir, make_daemon):
    _reachable(short_dir)
    daemon = make_daemon("--allow-group", str(CREW))
    assert as_user(NOBODY, connect_code(daemon.socket), groups=[CREW]) == 0
    assert as_user(NOBODY, connect_code(daemon.socket)) == 10
    _widen_by_hand(daemon)
    assert as_user(STRANGER, connect_code(daemon.socket)) == 10
    assert "refused pid" in daemon.log_text()  # the daemon's own check


@needs_root
def test_a_users_own_daemon_shared_with_another_is_trusted_only_when_the_client_says_so(short_dir):
    _reachable(short_dir)
    folder = os.path.join(short_dir, "nobody")
    os.mkdir(folder, 0o700)
    os.chown(folder, NOBODY, NOBODY)
    daemon = Daemon(folder, "--allow-uid", str(STRANGER))
    # The daemon runs as NOBODY in a forked child: NOBODY cannot exec this root-owned Python.
    pid = os.fork()
    if pid == 0:
        try:
            become(NOBODY)
            os._exit(daemon_main(daemon.args))
        finally:
            os._exit(99)
    try:
        wait_until(lambda: peer_is_listening(daemon.socket) or os.waitpid(pid, os.WNOHANG)[0],
                   what="nobody's daemon to listen")
        assert peer_is_listening(daemon.socket), daemon.log_text()
        assert as_user(STRANGER, connect_code(daemon.socket)) == 10  # "runs as uid 65534"
        trusting = {connection.DAEMON_UID_ENV: str(NOBODY)}
        assert as_user(STRANGER, connect_code(daemon.socket), env=trusting) == 0
        assert as_user(CREW, connect_code(daemon.socket), env=trusting) == 10  # not let in
    finally:
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, daemon.log_text()
    assert not os.path.exists(daemon.socket) and not daemon.segment_exists()


def test_an_unknown_group_is_the_parsers_one_line_error(short_dir):
    proc = subprocess.run([sys.executable, "-m", "shmheapd", "--socket", os.path.join(short_dir, "d.sock"),
                           "--allow-group", "no-such-group-here"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no group named 'no-such-group-here'" in proc.stderr
    assert "Traceback" not in proc.stderr
