"""Access control both ways: the socket folder must be the user's alone (daemon and
autostarting client refuse anything else), the client talks only to a daemon of its own
uid (or root's), and one process cannot use another's private heaps, regions or clipboard
session."""

import os
import subprocess
import sys

import pytest

import shmheap
from shmheap import connection
from shmheap.constants import MEM_DECOMMIT, MEM_RELEASE, PAGE_READONLY
from shmheap.errors import WinError
from shmheapd.server import peer_is_listening
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
