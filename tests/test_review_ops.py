"""An adversarial review of three changes: sharing with other users (daemon/access.py and its
callers), heap usage reports for `shmheap stat`, and `shmheapd --systemd-unit`.

It found nine bugs, all fixed (folder modes after a grant, file sections borrowed across
users, the purger and heap destroys racing, largest free range across holes, unread replies of
the flusher, unit quoting and abbreviations, impossible ids); the tests hold them fixed,
beside the behaviour the review looked at and found right. Tests that need other uids
run only as root (they setuid in forked children, as tests/test_access_control.py does)."""

import json
import multiprocessing
import os
import shlex
import shutil
import struct
import subprocess
import sys
import threading
import time

import posix_ipc
import pytest

import shmheap
from shmheap import connection
from shmheap.errors import WinError
from conftest import as_user, become, connect_code, receive, wait_until

MiB = 2**20
NOBODY, STRANGER = 65534, 65533
spawn = multiprocessing.get_context("spawn")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to be another uid")
ACL = "system.posix_acl_access"




def _stat_code(path):
    """A child body: 0 if `path` can be stat'ed (its folder searched), 10 if refused."""
    def body():
        try:
            os.stat(path)
            return 0
        except PermissionError:
            return 10
        except OSError:
            return 11
    return body


def _acl_entries(path):
    """The (tag, permissions, id) entries of `path`'s access ACL ([] if it has none)."""
    try:
        raw = os.getxattr(path, ACL)
    except OSError:
        return []
    return [struct.unpack_from("<HHI", raw, offset) for offset in range(4, len(raw), 8)]


def _folder(short_dir, name="f"):
    os.chmod(short_dir, 0o711)  # others may pass through the test's folder (not list it)
    folder = os.path.join(short_dir, name)
    os.mkdir(folder, 0o700)
    return folder


# ---- sharing with other users ----------------------------------------------------------------

def test_a_restart_without_sharing_leaves_the_socket_folder_the_owners_alone(short_dir, make_daemon):
    folder = _folder(short_dir)
    shared = make_daemon("--allow-uid", str(NOBODY), folder=folder)
    assert shared.stop() == 0
    private = make_daemon(folder=folder)
    assert _acl_entries(folder) == []  # the grant was taken away...
    if os.geteuid() == 0:  # ...so a member of the folder's group must not reach the socket
        group = os.stat(folder).st_gid
        assert as_user(NOBODY, _stat_code(private.socket), groups=[group]) == 10
    assert os.stat(folder).st_mode & 0o077 == 0, oct(os.stat(folder).st_mode)  # as it was: 0700


def test_a_shared_restart_gives_the_folders_group_nothing(short_dir, make_daemon):
    folder = _folder(short_dir)
    first = make_daemon("--allow-uid", str(NOBODY), folder=folder)
    assert first.stop() == 0
    second = make_daemon("--allow-uid", str(STRANGER), folder=folder)
    if os.geteuid() == 0:  # NOBODY is no longer let in, but is in the folder's group here
        group = os.stat(folder).st_gid
        assert as_user(NOBODY, _stat_code(second.socket), groups=[group]) == 10
    group_obj = [perm for tag, perm, _ in _acl_entries(folder) if tag == 0x04]
    assert group_obj == [0], _acl_entries(folder)


def test_a_shared_daemon_grants_exactly_the_users_let_in(short_dir, make_daemon):
    """ACL entries on the socket, the folder and the segment: owner, the named user with the
    stated permissions, and nothing for group or others."""
    folder = _folder(short_dir)
    daemon = make_daemon("--allow-uid", str(NOBODY), folder=folder)
    shm = posix_ipc.SharedMemory(daemon.segment)
    try:
        segment_acl = _acl_entries(shm.fd)
    finally:
        shm.close_fd()
    for acl, permissions in ((_acl_entries(daemon.socket), 0o6), (segment_acl, 0o6)):
        named = [(perm, uid) for tag, perm, uid in acl if tag == 0x02]
        assert named == [(permissions, NOBODY)], acl
        assert [perm for tag, perm, _ in acl if tag in (0x04, 0x20)] == [0, 0], acl  # group, other
    named = [(perm, uid) for tag, perm, uid in _acl_entries(folder) if tag == 0x02]
    assert named == [(0o1, NOBODY)]


@needs_root
def test_a_user_let_in_before_a_restart_without_sharing_is_refused_after_it(short_dir, make_daemon):
    """The socket and the segment are new at each start: the old grant goes with them."""
    folder = _folder(short_dir)
    shared = make_daemon("--allow-uid", str(NOBODY), folder=folder)
    assert as_user(NOBODY, connect_code(shared.socket)) == 0
    assert shared.stop() == 0
    private = make_daemon(folder=folder)
    assert as_user(NOBODY, connect_code(private.socket)) == 10

    def open_segment():
        try:
            posix_ipc.SharedMemory(private.segment).close_fd()
            return 0
        except posix_ipc.PermissionsError:
            return 10
    assert as_user(NOBODY, open_segment) == 10


@needs_root
def test_only_users_let_in_may_open_the_segment_itself(short_dir, make_daemon):
    """The second way in, around the socket: shm_open of the segment by its (guessable) name."""
    daemon = make_daemon("--allow-uid", str(NOBODY), folder=_folder(short_dir))

    def open_segment():
        try:
            shm = posix_ipc.SharedMemory(daemon.segment)
        except posix_ipc.PermissionsError:
            return 10
        shm.close_fd()
        return 0
    assert as_user(NOBODY, open_segment) == 0
    assert as_user(STRANGER, open_segment) == 10


@needs_root
def test_a_user_let_in_cannot_read_the_owners_files_through_a_named_file_section(short_dir, make_daemon):
    daemon = make_daemon("--allow-uid", str(NOBODY), folder=_folder(short_dir))
    private = os.path.join(short_dir, "private")
    os.mkdir(private, 0o700)
    secret = os.path.join(private, "secret")
    with open(secret, "wb") as f:
        f.write(b"the owner's secret".ljust(4096, b"."))
    os.chmod(secret, 0o600)
    assert as_user(NOBODY, _stat_code(secret)) == 10  # NOBODY's own uid cannot reach it
    with shmheap.connect(daemon.socket, autostart=False) as owner:
        with owner.map_file(secret, "r+", name="review secret"):
            def steal(client):
                try:
                    view = client.map_file(None, "r", name="review secret")
                except shmheap.ShmheapError as exc:
                    return 10 if exc.winerror == WinError.ERROR_ACCESS_DENIED else 11
                with view:
                    return 20 if bytes(memoryview(view)[:18]) == b"the owner's secret" else 21
            assert as_user(NOBODY, connect_code(daemon.socket, steal)) == 10


@pytest.mark.parametrize("option", [["--allow-uid", "-1"], ["--allow-uid", str(2**32)],
                                    ["--allow-group", str(2**32)]])
def test_an_impossible_id_is_the_parsers_one_line_error(short_dir, option):
    proc = subprocess.run([sys.executable, "-m", "shmheapd", "--socket", os.path.join(short_dir, "d.sock"),
                           *option], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2


def test_a_client_refuses_a_listener_of_another_uid_unless_told(short_dir, monkeypatch):
    """_daemon_uid: a listener that is neither ours nor root's is refused before the hello,
    also when SHMHEAP_DAEMON_UID names some third uid."""
    if os.geteuid() != 0:
        pytest.skip("needs root to listen as another uid")
    import socket

    os.chmod(short_dir, 0o777)
    path = os.path.join(short_dir, "fake.sock")
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            become(NOBODY)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(4)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        for trusted in (None, str(STRANGER)):
            if trusted:
                monkeypatch.setenv(connection.DAEMON_UID_ENV, trusted)
            with pytest.raises(shmheap.ShmheapError) as caught:
                shmheap.connect(path, autostart=False, timeout=5)
            assert caught.value.winerror == WinError.ERROR_ACCESS_DENIED
            assert f"uid {NOBODY}" in str(caught.value)
    finally:
        os.write(done_w, b"1")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


# ---- heap usage reports ------------------------------------------------------------------------

def _churn_heaps(socket_path, conn):
    """Create and destroy heaps from two threads while the purger reports 300 others; sends
    (whether the purger thread still runs, what killed a thread)."""
    from shmheap import private_heap

    errors = []
    threading.excepthook = lambda args: errors.append(repr(args.exc_value))
    sys.setswitchinterval(1e-6)  # thread switches anywhere, as on a busy machine
    client = shmheap.connect(socket_path, autostart=False)
    kept = [client.create_heap(f"kept {i}", initial=4096) for i in range(300)]
    for heap in kept[::2]:
        heap.alloc(16)
    deadline = time.monotonic() + 10

    def churn(thread):
        for i in range(10**6):
            if time.monotonic() > deadline or errors or not private_heap.purger.thread.is_alive():
                return
            heap = client.create_heap(f"churn {thread}.{i}", initial=4096)
            heap.alloc(16)
            heap.destroy()
    threads = [threading.Thread(target=churn, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conn.send((private_heap.purger.thread.is_alive(), errors[:3]))
    client.close()


def test_the_purger_survives_heaps_made_while_it_reports(make_daemon):
    daemon = make_daemon(size="1G")
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_churn_heaps, args=(daemon.socket, theirs), daemon=True)
    child.start()
    try:
        alive, errors = receive(ours, timeout=90)
    finally:
        child.join(30)
        if child.exitcode is None:
            child.kill()
    assert alive and not errors, errors


def _true_largest_committed_free(heap):
    """The longest run of committed free bytes among the heap's free ranges (holes cut out)."""
    best = 0
    for start, end in heap.free_start.items():
        position = start
        for hole in sorted(h for h in heap.holes if h < end and heap.holes[h] > start):
            best = max(best, hole - position)
            position = heap.holes[hole]
        best = max(best, end - position)
    return best


def _heap_row(client, handle):
    return next(h for h in client.stat()["heaps"] if h["handle"] == handle)


def test_stat_largest_free_range_is_committed_bytes_after_a_purge_punched_holes(client):
    heap = client.create_heap("holey", maximum=4 * MiB)  # fixed: commits 8 KiB to start with
    blocks = [heap.alloc(200_000) for _ in range(8)]
    for block in blocks[1:7:2]:
        block.free()  # three 200 KB free ranges between live blocks
    heap.compact()  # the purge: their inner pages are given back (holes)
    inner = heap._heap
    with inner.lock:
        assert inner.holes, "the purge punched no hole: the scenario did not happen"
        figures = inner.usage()
        true_largest = _true_largest_committed_free(inner)
    blocks_, free, _ = figures
    row = wait_until(lambda: (lambda r: r if (r["blocks"], r["free"]) == (blocks_, free) else None)(
        _heap_row(client, heap.handle)), timeout=15, interval=0.1, what="the heap's report")
    assert row["largest_free"] == true_largest, (row, true_largest)
    assert row["fragmentation"] == round(1 - true_largest / free, 3)


def test_stat_figures_match_the_heap_and_reports_stop_when_it_is_idle(client):
    heap = client.create_heap("steady", initial=MiB)
    blocks = [heap.alloc(size) for size in (24, 3000, 3000, 70_000, 2 * MiB)]
    blocks[1].free()
    blocks[4].free()
    heap.compact()
    with heap._heap.lock:
        figures = heap._heap.usage()
    row = wait_until(lambda: (lambda r: r if (r["blocks"], r["free"], r["largest_free"]) == figures else None)(
        _heap_row(client, heap.handle)), timeout=15, interval=0.1, what="the heap's report")
    assert row["free"] + row["blocks"] * 16 <= row["committed"] == heap.committed
    # Idle from now on: no more reports (about one a second while a heap changes).
    wait_until(lambda: not client.connection.deferred, timeout=10, what="the last report to go")
    sent = client.connection.reports_sent
    quiet_until = time.monotonic() + 3.5
    while time.monotonic() < quiet_until:
        assert client.connection.reports_sent == sent, "reports go on for an idle heap"
        time.sleep(0.1)


def test_reports_ride_apart_from_requests_in_a_loop_that_needs_none(client):
    heap = client.create_heap("loop", initial=MiB)
    for _ in range(3):
        heap.alloc(100).free()
    heap.compact()
    client.echo(1)  # settle anything outstanding
    requests, reports = client.requests_sent, client.connection.reports_sent
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # the heap changes all along: reported about once a second
        for _ in range(100):
            heap.alloc(100).free()
        time.sleep(0.01)
    wait_until(lambda: client.connection.reports_sent > reports, timeout=10, what="a report")
    assert client.requests_sent == requests


def test_a_report_for_a_heap_destroyed_meanwhile_breaks_nothing(client):
    heap = client.create_heap("gone", initial=MiB)
    handle = heap.handle
    heap.destroy()
    client.heap_report(handle, 0, 0, 0)  # as the purger may, after the destroy went out
    assert client.echo(7) == 7  # rides with it; its refusal is dropped
    assert client.connection.late_error is None and client.connection.is_open
    again = client.create_heap("gone", initial=MiB)
    assert again.alloc(10).size == 10 and client.check()


def test_deferred_reports_the_flusher_sends_leave_a_bounded_number_of_replies_unread(client):
    heap = client.create_heap("reported", initial=MiB)
    for _ in range(connection.MAX_POSTED + 100):
        client.heap_report(heap.handle, 0, 0, 0)  # what the purger does, about once a second
        client.connection.flush_deferred()  # what the flusher does with it
    assert len(client.connection.posted) <= connection.MAX_POSTED


def test_stat_json_shows_a_reported_heaps_figures_and_an_unreported_ones_nulls(daemon, client):
    from shmheap.constants import HEAP_NO_SERIALIZE

    reported = client.create_heap("told", initial=MiB)
    reported.alloc(100)
    quiet = client.create_heap("untold", initial=MiB, flags=HEAP_NO_SERIALIZE)
    wait_until(lambda: _heap_row(client, reported.handle)["blocks"] == 1, timeout=15, what="the report")
    proc = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "stat", "--json", "--socket",
                           daemon.socket], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {h["handle"]: h for h in json.loads(proc.stdout)["heaps"]}
    assert rows[quiet.handle]["reported"] is None and rows[quiet.handle]["fragmentation"] is None
    assert rows[reported.handle]["blocks"] == 1 and rows[reported.handle]["reported"] >= 0
    table = subprocess.run([sys.executable, "-m", "shmheap_clients.cli", "stat", "--socket", daemon.socket],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "untold" in table.stdout, table.stderr


# ---- shmheapd --systemd-unit ---------------------------------------------------------------------

def _unit(*args, python=sys.executable, cwd=None):
    proc = subprocess.run([python, "-m", "shmheapd", "--systemd-unit", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _exec_words(unit):
    (line,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart="):])


def test_abbreviated_options_do_not_leak_into_the_unit():
    # shmheapd takes no abbreviations (allow_abbrev=False): an abbreviated option is the
    # parser's one-line error, never an option passed into the unit under another spelling.
    proc = subprocess.run([sys.executable, "-m", "shmheapd", "--systemd-unit", "--soc", "/elsewhere.sock",
                           "--idle", "30"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --soc /elsewhere.sock --idle 30" in proc.stderr
    assert "Traceback" not in proc.stderr and "ExecStart" not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "shmheapd", "--systemd-unit", "--socket", "/elsewhere.sock",
                           "--idle-exit", "30"], capture_output=True, text=True, timeout=60)
    words = _exec_words(proc.stdout)
    assert not [word for word in words if word.startswith("--sys")], words
    assert "/elsewhere.sock" not in words and "30" not in words, words


def _interpreter_at(short_dir, folder_name):
    """This Python, reachable by a path in a folder named `folder_name` (a symlink)."""
    folder = os.path.join(short_dir, folder_name)
    os.mkdir(folder)
    python = os.path.join(folder, "python3")
    os.symlink(os.path.realpath(sys.executable), python)
    return python


def _verify(short_dir, unit):
    path = os.path.join(short_dir, "shmheapd.service")
    with open(path, "w") as f:
        f.write(unit)
    return subprocess.run(["systemd-analyze", "verify", "--user", path], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": short_dir})


needs_systemd_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")


@needs_systemd_analyze
def test_an_interpreter_path_with_spaces_and_percent_signs_is_quoted_as_systemd_reads_it(short_dir):
    python = _interpreter_at(short_dir, "my env 100%")
    unit = _unit("--size", "1G", python=python)
    checked = _verify(short_dir, unit)
    assert checked.returncode == 0, checked.stderr
    words = _exec_words(unit.replace("%%", "%"))
    assert words[0] == python and words[-2:] == ["--size", "1G"]


@needs_systemd_analyze
def test_an_interpreter_path_with_a_dollar_sign_is_one_systemd_can_run(short_dir):
    python = _interpreter_at(short_dir, "env$1")
    checked = _verify(short_dir, _unit(python=python))
    assert checked.returncode == 0, checked.stderr
