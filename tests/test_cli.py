"""The `shmheap` tool as a newcomer runs it: the demo autostarts its own daemon."""

import os
import subprocess
import sys

from conftest import wait_until


def test_demo_autostarts_a_daemon_and_every_step_holds(short_dir):
    socket_path = os.path.join(short_dir, "demo", "d.sock")
    env = dict(os.environ, SHMHEAP_SOCKET=socket_path, SHMHEAP_IDLE_EXIT="1")
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "demo"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in range(1, 9):
        assert f"\n{step}. " in "\n" + proc.stdout
    assert "Done: page table consistent" in proc.stdout
    wait_until(lambda: not os.path.exists(socket_path), what="the demo's idle daemon to exit")


def test_status_lists_processes_heaps_and_regions(daemon, client):
    client.create_heap("inspect me", initial=1 << 20)
    env = dict(os.environ, SHMHEAP_SOCKET=daemon.socket)
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "status"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"shmheapd pid {daemon.proc.pid}" in proc.stdout
    assert str(client.pid) in proc.stdout
    heap_lines = [line for line in proc.stdout.splitlines() if "inspect me" in line]
    assert len(heap_lines) == 1 and str(client.pid) in heap_lines[0]
    assert "1,048,576" in heap_lines[0]  # its committed bytes: the initial size


def test_status_without_a_daemon_is_one_line_and_exit_1(short_dir):
    env = dict(os.environ, SHMHEAP_SOCKET=os.path.join(short_dir, "none", "d.sock"))
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "status"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "no shmheapd" in proc.stderr, proc.stderr
