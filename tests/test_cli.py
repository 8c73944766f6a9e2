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
    for step in range(1, 11):
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


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shmheap_clients.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_every_daemon_command_without_a_daemon_is_one_line_and_exit_1(short_dir):
    missing = os.path.join(short_dir, "none", "d.sock")
    for command in ("status", "check", "stop", "stat", "map"):
        proc = _cli(command, "--socket", missing)
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and f"shmheap {command}:" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_version():
    import shmheap

    for program in (["-m", "shmheap_clients.cli"], ["-m", "shmheapd"]):
        proc = subprocess.run([sys.executable, *program, "--version"], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and proc.stdout.strip().endswith(shmheap.__version__), proc.stdout


def test_stop_shuts_the_daemon_down_cleanly(daemon):
    with open(f"/proc/{daemon.proc.pid}/comm") as f:
        assert f.read().strip() == "shmheapd"  # what pgrep and top show
    proc = _cli("stop", "--socket", daemon.socket)
    assert proc.returncode == 0 and str(daemon.proc.pid) in proc.stdout, proc.stderr
    assert daemon.proc.wait(10) == 0
    assert not os.path.exists(daemon.socket) and not daemon.segment_exists()
    assert "asked the daemon to stop" in daemon.log_text()


def test_sighup_shuts_the_daemon_down_cleanly(daemon):
    import signal

    daemon.proc.send_signal(signal.SIGHUP)  # its terminal closed
    assert daemon.proc.wait(10) == 0
    assert not os.path.exists(daemon.socket) and not daemon.segment_exists()


def test_check_reads_as_text(daemon):
    proc = _cli("check", "--socket", daemon.socket)
    assert proc.returncode == 0 and "the daemon's invariants hold" in proc.stdout and "{" not in proc.stdout


def test_a_daemon_that_cannot_start_says_why_at_once(short_dir, monkeypatch):
    import time

    import shmheap

    folder = os.path.join(short_dir, "tiny")
    monkeypatch.setenv("SHMHEAP_SOCKET", os.path.join(folder, "d.sock"))
    # The autostarted daemon reads its options from the command line only; a commit limit it
    # cannot live with makes it exit at once, as a full /dev/shm would.
    from shmheap import connection

    real = connection.subprocess.Popen

    def with_tiny_limit(args, **kwargs):
        return real([*args, "--commit-limit", "64K"], **kwargs)

    monkeypatch.setattr(connection.subprocess, "Popen", with_tiny_limit)
    started = time.monotonic()
    try:
        shmheap.connect(os.path.join(folder, "d.sock"))
        raise AssertionError("connected to a daemon that cannot have started")
    except shmheap.ProtocolError as exc:
        message = str(exc)
    assert time.monotonic() - started < 8  # not the 10 s connect timeout
    assert "could not start" in message and "1455" in message, message  # the daemon's own words
    assert os.stat(os.path.join(folder, "shmheapd.log")).st_mode & 0o777 == 0o600


def test_the_demo_runs_without_numpy_and_says_what_it_skipped(short_dir):
    env = dict(os.environ, SHMHEAP_SOCKET=os.path.join(short_dir, "bare", "d.sock"), SHMHEAP_IDLE_EXIT="1")
    script = "import sys; sys.modules['numpy'] = None; from shmheap_clients import cli; sys.exit(cli.main(['demo']))"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped: numpy is not installed" in proc.stdout and "Done: page table consistent" in proc.stdout


def test_bad_arguments_are_the_parsers_one_line_errors():
    for args in (["pool", "--workers", "0"], ["pool", "--count", "-5"], ["pool", "--buffers", "x"]):
        proc = _cli(*args)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("shmheap pool: error:"), proc.stderr
        assert "Traceback" not in proc.stderr


def test_status_leaves_itself_out(daemon, client):
    proc = _cli("status", "--socket", daemon.socket)
    pids = [line.split()[0] for line in proc.stdout.splitlines()[2:] if line.split() and line.split()[0].isdigit()]
    assert str(client.pid) in pids and len(pids) == 1, proc.stdout  # the test's client; not the command


def test_elsewhere_than_linux_the_import_says_so():
    script = "import sys; sys.platform = 'darwin'; import shmheap"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "ImportError: shmheap runs on Linux only, not on darwin" in proc.stderr


def test_the_package_says_it_is_typed():
    import importlib.resources

    assert importlib.resources.files("shmheap").joinpath("py.typed").is_file()


def test_the_systemd_unit_runs_the_daemon_it_describes(short_dir):
    import shlex
    import shutil
    import signal

    from shmheap import segment

    proc = subprocess.run([sys.executable, "-m", "shmheapd", "--systemd-unit", "--size", "512M",
                           "--socket", "/ignored.sock", "--log-level", "WARNING"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    unit = proc.stdout
    (line,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert "ignored" not in line and line.count("--socket") == 1
    if shutil.which("systemd-analyze"):  # where systemd is at hand, it must accept the unit
        path = os.path.join(short_dir, "shmheapd.service")
        with open(path, "w") as f:
            f.write(unit)
        checked = subprocess.run(["systemd-analyze", "verify", "--user", path], capture_output=True, text=True,
                                 timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": short_dir})
        assert checked.returncode == 0, checked.stderr
    # Run the command the unit runs, %t being the user's runtime folder.
    runtime = os.path.join(short_dir, "run")
    os.mkdir(runtime, 0o700)
    command = shlex.split(line[len("ExecStart="):].replace("%t", runtime))
    assert command[0] == sys.executable and "512M" in command
    daemon = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    socket_path = os.path.join(runtime, "shmheap", "shmheapd.sock")
    try:
        import shmheap

        wait_until(lambda: os.path.exists(socket_path) or daemon.poll() is not None, what="the unit's daemon")
        with shmheap.connect(socket_path, autostart=False) as client:
            assert client.info["size"] == 512 << 20 and client.echo(1) == 1
    finally:
        daemon.send_signal(signal.SIGTERM)  # systemctl stop
        assert daemon.wait(10) == 0, daemon.stderr.read()
        daemon.stderr.close()
    assert not os.path.exists(socket_path) and not os.path.exists("/dev/shm" + segment.segment_name(socket_path))


def test_socket_goes_before_or_after_a_clip_command(daemon, client):
    client.clipboard.copy("where the socket option goes")
    for args in (["clip", "--socket", daemon.socket, "paste"], ["clip", "paste", "--socket", daemon.socket]):
        proc = _cli(*args)
        assert proc.returncode == 0 and proc.stdout == "where the socket option goes", (args, proc.stderr)


def test_pool_runs_on_the_daemon_its_socket_names(daemon, client):
    import re

    before = set(re.findall(r"pid (\d+) connected", daemon.log_text()))
    proc = _cli("pool", "--workers", "2", "--buffers", "3", "--count", "1000", "--socket", daemon.socket)
    assert proc.returncode == 0 and "3 checked, 0 wrong" in proc.stdout, proc.stderr
    pids = set(re.findall(r"pid (\d+) connected", daemon.log_text())) - before
    # The pool and its workers (at least one: a worker that starts late may find the three
    # buffers done) talked to this daemon.
    assert len(pids) >= 2
