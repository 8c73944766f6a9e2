"""The clipboard at its edges: the daemon's Clipboard driven in-process
through the kernel's op table (make_kernel, deterministic interleavings of several processes
and their parked requests), and over the wire against real daemons.

Each regression test names the defect it caught first."""

import multiprocessing
import os
import subprocess
import threading
import time

import pytest

import shmheap
from shmheap.constants import (CF_LOCALE, CF_OEMTEXT, CF_TEXT, CF_UNICODETEXT, CF_WAVE, GMEM_MOVEABLE)
from shmheap.errors import ShmheapError, WinError
from shmheapd.clipboard import PENDING, RENDER_TIMEOUT
from shmheapd.sessions import Session
from conftest import wait_until
from win32_checks import enumerate_formats, ok, open_emptied_with, read_global

spawn = multiprocessing.get_context("spawn")
MiB = 2**20
P, Q, R = 1001, 1002, 1003  # three client processes


# ---- the kernel in-process, with parked requests recorded -----------------------------------------

class Harness:
    """The daemon's kernel with fake connections: `call` runs an op as the server does
    (kernel.request set), `replies` records what parked requests were answered with."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.replies = {}  # (session, msgid) -> (error, result)
        kernel.respond = lambda session, msgid, error, result: self.replies.__setitem__((session, msgid), (error, result))
        self._ids = iter(range(1, 10**9))

    def session(self, pid):
        session = Session(None, pid, 0)
        self.kernel.attach(session)
        return session

    def call(self, session, op, *args):
        """(msgid, result): result is PENDING for a parked request; raises ShmheapError."""
        msgid = next(self._ids)
        self.kernel.begin()
        self.kernel.request = (session, msgid)
        return msgid, self.kernel.ops[op](session.pid, *args)

    def op(self, session, op, *args):
        return self.call(session, op, *args)[1]

    def global_object(self, session, data):
        handle = self.op(session, "global_alloc", GMEM_MOVEABLE, len(data))
        pointer = self.op(session, "global_lock", handle)
        self.kernel.global_memory.heap.memory[pointer:pointer + len(data)] = data
        self.op(session, "global_unlock", handle)
        return handle


@pytest.fixture
def h(make_kernel):
    return Harness(make_kernel(64 * MiB, 32 * MiB, 32 * MiB))


def _promise(h, owner, *formats):
    """`owner` opens, empties, promises `formats` and closes the clipboard."""
    h.op(owner, "clipboard_open", 0)
    h.op(owner, "clipboard_empty")
    for fmt in formats:
        h.op(owner, "clipboard_set", fmt, 0)
    h.op(owner, "clipboard_close")


# Regression: a reader waiting for a format
# synthesized from a promised source (CF_TEXT from promised CF_UNICODETEXT) gets it through
# `self._converted(wanted)`, which indexes `self.synthesized[wanted]`. If any process set that
# format for real meanwhile (allowed while the clipboard is open, CB-17), `set` deleted it from
# `synthesized`: the owner's rendering SetClipboardData raises KeyError out of the handler
# (ERROR_GEN_FAILURE to the renderer, although the clipboard took its handle), and the readers,
# already popped from `self.readers`, are never answered: their GetClipboardData hangs forever.
def test_a_reader_of_a_converted_format_is_answered_when_that_format_was_set_meanwhile(h):
    owner, listener, setter = h.session(P), h.session(P), h.session(Q)
    reader, reader_wait = h.session(R), h.session(R)
    _promise(h, owner, CF_UNICODETEXT)
    listen_id, parked = h.call(listener, "clipboard_listen", 1)
    assert parked is PENDING
    h.op(reader, "clipboard_open", 0)
    get_id, parked = h.call(reader_wait, "clipboard_get", CF_TEXT, 1)
    assert parked is PENDING
    assert h.replies[(listener, listen_id)] == (0, CF_UNICODETEXT)  # the owner is asked for the source (CB-65)
    real_text = h.global_object(setter, b"real\0")
    assert h.op(setter, "clipboard_set", CF_TEXT, real_text) == real_text  # CB-17: anyone, while open
    rendered = h.global_object(owner, "rendered\0".encode("utf-16-le"))
    try:
        h.op(owner, "clipboard_set", CF_UNICODETEXT, rendered)  # the owner renders (CB-66)
    except ShmheapError:
        pass
    except Exception as exc:  # the server turns this into ERROR_GEN_FAILURE
        pytest.fail(f"the renderer's SetClipboardData crashed the handler: {exc!r}")
    finally:
        assert (reader_wait, get_id) in h.replies, "the reader's GetClipboardData is never answered"
    assert h.replies[(reader_wait, get_id)][0] == 0
    h.kernel.check()


# Regression: a promised format that a process other than the
# owner sets while a reader waits for it (CB-17 allows it) is taken as an ordinary change:
# `_rendered` is not called, so the reader is not answered; and housekeeping cannot fail it
# either (`_drop_unrendered` skips a format that has data), so the reader stays in
# `self.readers` forever (GetClipboardData with no timeout hangs, and housekeeping reports a
# deadline in the past on every tick).
def test_a_reader_is_answered_when_another_process_sets_the_promised_format(h):
    owner, listener, setter = h.session(P), h.session(P), h.session(Q)
    reader, reader_wait = h.session(R), h.session(R)
    _promise(h, owner, CF_WAVE)
    h.call(listener, "clipboard_listen", 1)
    h.op(reader, "clipboard_open", 0)
    get_id, parked = h.call(reader_wait, "clipboard_get", CF_WAVE, 1)
    assert parked is PENDING
    wave = h.global_object(setter, b"wave")
    assert h.op(setter, "clipboard_set", CF_WAVE, wave) == wave
    h.kernel.housekeeping(time.monotonic() + RENDER_TIMEOUT + 1)  # past any render deadline
    assert (reader_wait, get_id) in h.replies, "the reader is never answered, not even at the deadline"
    assert h.kernel.clipboard.readers == {}
    h.kernel.check()


# Regression: a render request queued for the owner
# (`to_render`) stays queued when every reader of that format has gone (its connection closed:
# a client-side timeout). The owner's next clipboard_listen is answered at once with a format
# nobody asked for, and its rendering SetClipboardData then counts as a change (the sequence
# number moves, CB-52/CB-66 say +0 for rendering).
def test_a_render_request_goes_when_its_readers_go(h):
    owner, listener = h.session(P), h.session(P)
    reader, reader_wait = h.session(R), h.session(R)
    _promise(h, owner, CF_WAVE, CF_TEXT)
    h.call(listener, "clipboard_listen", 1)
    h.op(reader, "clipboard_open", 0)
    h.call(reader_wait, "clipboard_get", CF_WAVE, 1)  # the listener is told: CF_WAVE
    h.call(reader_wait, "clipboard_get", CF_TEXT, 1)  # queued: the listener is busy
    h.kernel.detach(reader_wait)  # the reader gives up (its waiting connection closes)
    assert h.kernel.clipboard.readers == {}
    listen_id, answer = h.call(listener, "clipboard_listen", 1)
    assert answer is PENDING, f"the owner is asked to render format {answer} that nobody waits for"


# Regression: `_synthesize`, run on every CloseClipboard after a change,
# synthesizes from scratch: CF_LOCALE and the missing text formats are "added" again even when
# they are there already (synthesized at an earlier close), so the sequence number moves +2
# more on every close after any change. Windows (Wine's synthesize_formats, which looks at the
# format map including synthesized formats) adds nothing then and moves +0 (CB-51: "+0 when
# nothing is synthesized"). It also frees every converted text object a reader may be using.
def test_closing_after_an_unrelated_change_synthesizes_nothing_new(win32):
    w = win32
    open_emptied_with(w, CF_TEXT, b"hello\0")
    ok(w, w.CloseClipboard)
    start = w.GetClipboardSequenceNumber()
    ok(w, w.OpenClipboard, 0)
    wave = ok(w, w.GlobalAlloc, GMEM_MOVEABLE, 4)
    assert w.SetClipboardData(CF_WAVE, wave) == wave
    assert w.GetClipboardSequenceNumber() == start + 1  # CB-50
    ok(w, w.CloseClipboard)
    assert w.GetClipboardSequenceNumber() == start + 1, "CloseClipboard re-synthesized formats already there"


def test_the_text_formats_synthesized_once_keep_their_data_and_order_across_closes(win32):
    """Not a Windows row as such, but what the sequence test above relies on: the listing
    after a second close is the same."""
    w = win32
    open_emptied_with(w, CF_TEXT, b"hi\0")
    ok(w, w.CloseClipboard)
    ok(w, w.OpenClipboard, 0)
    assert w.SetClipboardData(CF_WAVE, ok(w, w.GlobalAlloc, GMEM_MOVEABLE, 4))
    ok(w, w.CloseClipboard)
    ok(w, w.OpenClipboard, 0)
    assert enumerate_formats(w) == [CF_TEXT, CF_WAVE, CF_LOCALE, CF_OEMTEXT, CF_UNICODETEXT]
    assert read_global(w, ok(w, w.GetClipboardData, CF_UNICODETEXT)) == "hi\0".encode("utf-16-le")
    ok(w, w.CloseClipboard)


# Regression: `name[1:].isdigit()` is true for digits int() does not take
# ("#²", "#³", "#①"): int() raises ValueError out of the handler, which the server answers with
# ERROR_GEN_FAILURE (and logs a traceback) instead of registering the name or refusing it.
def test_registering_a_name_with_unusual_digits_does_not_crash_the_handler(win32):
    w = win32
    result, error = w.RegisterClipboardFormat("#\u00b2"), w.GetLastError()
    assert error != WinError.ERROR_GEN_FAILURE, "RegisterClipboardFormat('#²') crashed the daemon's handler"
    assert result == 0 or 0xC000 <= result <= 0xFFFF


# Regression: Clipboard.copy empties the clipboard before setting the formats, so a format the
# daemon refuses after the empty (here a CF_UNICODETEXT of one byte, CB-62) used to destroy what
# was on the clipboard; the client now refuses it before anything changes.
def test_a_copy_the_daemon_refuses_leaves_the_clipboard_as_it_was(client):
    clipboard = client.clipboard
    clipboard.copy("kept")
    sequence = clipboard.sequence
    with pytest.raises(ShmheapError) as info:
        clipboard.copy(b"x", format="text")  # one byte of CF_UNICODETEXT: refused (CB-62)
    assert info.value.winerror == WinError.ERROR_INVALID_PARAMETER
    assert clipboard.paste() == "kept", "the refused copy emptied the clipboard"
    assert clipboard.sequence == sequence
    client.check()


# ---- the client's connections: the shared round-trip lock and the side connections ---------------

def _settle_race(socket_path, seconds, conn):
    """A thread waits on the clipboard (side connections, own locks) while the main thread
    posts and calls on the main connection: report what went wrong, if anything."""
    client = shmheap.connect(socket_path, autostart=False)
    stop = threading.Event()
    problems = []

    def waiter():
        while not stop.is_set():
            try:
                client.clipboard_wait(0, timeout=1.0)  # answered at once: sequence > 0
            except Exception as exc:  # noqa: BLE001 — reported
                problems.append(f"waiter: {exc!r}")
                return
    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    deadline = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < deadline and not problems:
            i += 1
            client.connection.post("echo", i)  # as paste() posts its unlock and close
            if i % 2:
                time.sleep(0.0002)  # the application does something else before its next call
            got = client.connection.call("echo", -i)
            if got != -i:
                problems.append(f"main: echo {-i} returned {got!r}")
    except Exception as exc:  # noqa: BLE001 — reported
        problems.append(f"main: {exc!r} after {i} rounds")
    stop.set()
    thread.join(5)
    conn.send(problems)


# Regression: `call_waiting` runs `_begin()` under the
# connection's OWN lock, and `_begin` calls `_settle()`, which reads the posted replies of the
# process's other connections (`other._collect_posted()` recv()s on the main socket) without
# the shared round-trip lock those connections are guarded by. A clipboard wait (or the render
# thread's clipboard_listen) on one thread and any call on the main connection on another then
# read the same socket at once: a reply is stolen (the main call blocks forever in recv) or
# taken out of order (ProtocolError, connection dropped). Access changes also get applied
# outside the lock that orders them.
def test_waiting_on_a_side_connection_does_not_read_the_main_connection_unlocked(daemon):
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_settle_race, args=(daemon.socket, 8.0, theirs), daemon=True)
    child.start()
    try:
        if not ours.poll(30):
            pytest.fail("a call on the main connection hung: its reply was read by the waiting thread")
        problems = ours.recv()
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)
    assert problems == []


# ---- the wire: parked requests, misuse, and what other clients see ---------------------------------

def _raw_session(socket_path):
    """A raw connection that said hello: (connection) for call/call_waiting."""
    from shmheap.connection import Connection
    connection = Connection(socket_path, autostart=False, own_lock=True)
    connection.ensure_open()
    return connection


def test_pipelining_after_a_parked_wait_gets_its_replies_and_the_wait_is_answered_later(daemon, client):
    """A malicious or careless client parks a wait on a connection and keeps talking on it:
    the later requests are answered at once, and the wait when the sequence moves."""
    import socket as socket_module
    from shmheap.protocol import Decoder, encode_request, hello_request, parse_reply

    sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(daemon.socket)
    decoder = Decoder()

    def read_replies(n):
        got = {}
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            for frame in decoder.feed(sock.recv(65536)):
                msgid, error, result, _ = parse_reply(frame)
                got[msgid] = (error, result)
        return got

    try:
        sock.sendall(encode_request(1, *hello_request(os.getpid())))
        assert read_replies(1)[1][0] == 0
        sequence = client.clipboard.sequence
        sock.sendall(encode_request(2, "clipboard_wait", [sequence]) + encode_request(3, "echo", ["after"])
                     + encode_request(4, "clipboard_wait", [sequence]))
        got = read_replies(1)
        assert got == {3: (0, "after")}  # the echo is not held up behind the parked waits
        client.clipboard.copy("change")
        got = read_replies(2)
        assert set(got) == {2, 4} and all(error == 0 and result > sequence for error, result in got.values())
    finally:
        sock.close()
    wait_until(lambda: len(client.status()["processes"]) == 1, what="the raw connection to go")
    client.check()


def test_a_connection_closed_with_parked_requests_leaves_nothing_parked(make_kernel):
    """Every kind of parked request (wait, listen, a reader's get) goes with its connection."""
    h = Harness(make_kernel(64 * MiB, 32 * MiB, 32 * MiB))
    owner, listener = h.session(P), h.session(P)
    reader, reader_wait, waiter = h.session(R), h.session(R), h.session(Q)
    _promise(h, owner, CF_WAVE)
    h.call(listener, "clipboard_listen", 1)
    h.op(reader, "clipboard_open", 0)
    h.call(reader_wait, "clipboard_get", CF_WAVE, 1)
    h.call(waiter, "clipboard_wait", 10**9)
    for session in (reader_wait, waiter):
        h.kernel.detach(session)
    clip = h.kernel.clipboard
    assert clip.waiters == [] and clip.readers == {}
    h.kernel.detach(listener)
    assert clip.listeners == {}
    h.kernel.detach(reader)
    assert clip.opener is None
    h.kernel.detach(owner)  # the owner goes: its promise goes with it (CB-14)
    assert clip.formats == {} and clip.owner_pid is None
    h.kernel.check()


def test_a_reader_waits_no_longer_than_the_render_bound_when_the_owner_never_renders(make_kernel):
    h = Harness(make_kernel(64 * MiB, 32 * MiB, 32 * MiB))
    owner, listener = h.session(P), h.session(P)
    reader, reader_wait = h.session(R), h.session(R)
    _promise(h, owner, CF_UNICODETEXT)
    h.call(listener, "clipboard_listen", 1)
    h.op(reader, "clipboard_open", 0)
    sequence = h.kernel.clipboard.sequence
    get_id, _ = h.call(reader_wait, "clipboard_get", CF_OEMTEXT, 1)
    due = h.kernel.housekeeping(time.monotonic())
    assert due is not None and 0 < due <= RENDER_TIMEOUT
    h.kernel.housekeeping(time.monotonic() + RENDER_TIMEOUT + 0.5)
    assert h.replies[(reader_wait, get_id)][0] == WinError.ERROR_NOT_FOUND
    assert h.kernel.clipboard.formats == {} and h.kernel.clipboard.synthesized == {}  # CB-14: with its conversions
    assert h.kernel.clipboard.sequence == sequence + 1
    assert h.kernel.housekeeping(time.monotonic()) is None
    h.kernel.check()


def test_many_parked_waits_on_one_connection_are_all_answered_once_up_to_a_bound(make_kernel):
    from shmheapd.clipboard import MAX_PARKED

    h = Harness(make_kernel(64 * MiB, 32 * MiB, 32 * MiB))
    owner, waiter = h.session(P), h.session(Q)
    sequence = h.kernel.clipboard.sequence
    ids = [h.call(waiter, "clipboard_wait", sequence)[0] for _ in range(MAX_PARKED - 1)]
    later = h.call(waiter, "clipboard_wait", sequence + 5)[0]
    with pytest.raises(ShmheapError) as info:  # one more would let a client grow the daemon at will
        h.op(waiter, "clipboard_wait", sequence)
    assert info.value.winerror == WinError.ERROR_NOT_ENOUGH_MEMORY
    h.op(owner, "clipboard_open", 0)
    h.op(owner, "clipboard_empty")
    assert all(h.replies[(waiter, i)] == (0, sequence + 1) for i in ids)
    assert (waiter, later) not in h.replies and len(h.kernel.clipboard.waiters) == 1


def _cli(daemon, command, stdin=None):
    env = dict(os.environ, SHMHEAP_SOCKET=daemon.socket)
    return subprocess.run(command, shell=True, env=env, input=stdin, capture_output=True, timeout=60)


# Regression: `copy --format CF_TEXT` (or any text format) decodes stdin as UTF-8
# and the UnicodeDecodeError is not caught (only ShmheapError and OSError are): bytes that are
# not UTF-8 end the command with a Python traceback instead of a one-line message.
def test_clip_copy_of_bytes_that_are_not_utf8_under_a_text_format_fails_with_one_line(daemon):
    result = _cli(daemon, "shmheap clip copy --format CF_TEXT", stdin=b"caf\xe9\n")
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    assert result.returncode in (0, 1) and len(result.stderr.decode().strip().splitlines()) <= 1


def test_clip_watch_prints_a_line_per_change_and_stops_after_a_quiet_spell(daemon, client):
    env = dict(os.environ, SHMHEAP_SOCKET=daemon.socket)
    watch = subprocess.Popen(["shmheap", "clip", "watch", "--timeout", "3"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = watch.stdout.readline()
        assert first.startswith(b"sequence ") and b"watching" in first
        client.clipboard.copy("one")
        line = watch.stdout.readline()
        assert b"CF_UNICODETEXT" in line
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 0 and b"no change within 3" in out, err
    client.check()
