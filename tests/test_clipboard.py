"""The clipboard across real processes: Win32 rows (docs/clipboard_semantics.md, CB-*), the
Pythonic client.clipboard, waiting, delayed rendering, and `shmheap clip` in a shell."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

import shmheap
from shmheap import connection
from shmheap.constants import (CF_LOCALE, CF_OEMTEXT, CF_TEXT, CF_UNICODETEXT, CF_WAVE, GMEM_FIXED,
                               GMEM_MOVEABLE, GMEM_ZEROINIT)
from shmheap.errors import WinError
from conftest import receive, wait_until
from win32_checks import enumerate_formats, expect, global_text, ok, open_emptied_with, read_global

spawn = multiprocessing.get_context("spawn")
MiB = 2**20


# ---- opening, owning, setting ------------------------------------------------------------------

def test_nobody_can_set_or_empty_a_clipboard_that_no_process_holds_open(win32):
    w = win32
    handle = global_text(w, b"data\0")
    sequence = w.GetClipboardSequenceNumber()
    expect(w, w.SetClipboardData, CF_TEXT, handle, result=0, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)  # CB-16
    expect(w, w.EmptyClipboard, result=False, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)  # CB-10
    expect(w, w.CloseClipboard, result=False, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)  # CB-01
    expect(w, w.GetClipboardData, CF_TEXT, result=0, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)  # CB-26
    assert w.GetClipboardSequenceNumber() == sequence and w.CountClipboardFormats() == 0
    assert read_global(w, handle) == b"data\0"  # refused: still the caller's
    assert w.GlobalFree(handle) == 0


def test_a_second_opener_is_refused_and_let_in_when_the_holder_is_killed(win32, peers):
    w = win32
    holder = peers()
    assert holder.ok("OpenClipboard", 7)
    expect(w, w.OpenClipboard, 0, result=False, error=WinError.ERROR_ACCESS_DENIED)  # CB-04
    expect(w, w.OpenClipboard, 7, result=False, error=WinError.ERROR_ACCESS_DENIED)  # another process's window
    assert w.GetOpenClipboardWindow() == 7
    # While it is open, any process may set data (CB-17), but only the opener empties it (CB-11).
    expect(w, w.EmptyClipboard, result=False, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)
    assert w.SetClipboardData(CF_WAVE, global_text(w, b"wave")) != 0
    holder.kill()
    wait_until(lambda: w.OpenClipboard(3), what="the dead holder's clipboard to close")
    assert w.GetOpenClipboardWindow() == 3
    assert w.GetClipboardData(CF_WAVE) != 0  # what was set survives the holder
    ok(w, w.EmptyClipboard)
    assert w.GetClipboardOwner() == 3  # EmptyClipboard makes the opener the owner (CB-12)
    ok(w, w.OpenClipboard, 3)  # opens are not counted (CB-02) ...
    ok(w, w.CloseClipboard)
    expect(w, w.CloseClipboard, result=False, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)  # ... one close
    assert w.GetClipboardOwner() == 3 and w.GetOpenClipboardWindow() == 0
    expect(w, w.OpenClipboard, 2**40, result=False, error=WinError.ERROR_INVALID_WINDOW_HANDLE)  # CB-06


def test_text_copied_by_a_process_that_exits_is_pasted_by_another(win32, peers):
    w = win32
    writer = peers()
    handle = writer.ok("GlobalAlloc", GMEM_MOVEABLE, 12)
    pointer = writer.ok("GlobalLock", handle)
    writer.call("write", pointer, b"hello there\0")
    writer.call("GlobalUnlock", handle)
    for call in (("OpenClipboard", 0), ("EmptyClipboard",), ("SetClipboardData", CF_TEXT, handle), ("CloseClipboard",)):
        assert writer.ok(*call)
    writer.close()  # the writer exits: its data is the clipboard's, and stays
    ok(w, w.OpenClipboard, 0)
    assert w.GetClipboardData(CF_TEXT) == handle  # the same handle in every process
    assert read_global(w, handle) == b"hello there\0"
    unicode = ok(w, w.GetClipboardData, CF_UNICODETEXT)  # synthesized from CF_TEXT at close
    assert read_global(w, unicode) == "hello there\0".encode("utf-16-le")
    assert read_global(w, ok(w, w.GetClipboardData, CF_OEMTEXT)) == b"hello there\0"
    assert int.from_bytes(read_global(w, ok(w, w.GetClipboardData, CF_LOCALE)), "little") == 0x0409
    ok(w, w.CloseClipboard)


def test_formats_enumerate_in_the_order_set_then_the_synthesized_ones(win32):
    w = win32
    custom = ok(w, w.RegisterClipboardFormat, "shmheap test format")
    ok(w, w.OpenClipboard, 0)
    ok(w, w.EmptyClipboard)
    for fmt in (custom, CF_UNICODETEXT, CF_WAVE):
        assert w.SetClipboardData(fmt, global_text(w, "x\0".encode("utf-16-le")))
    assert enumerate_formats(w) == [custom, CF_UNICODETEXT, CF_WAVE]  # nothing synthesized while open
    assert w.GetLastError() == WinError.ERROR_SUCCESS  # the end of the list (CB-39)
    ok(w, w.CloseClipboard)
    ok(w, w.OpenClipboard, 0)
    assert enumerate_formats(w) == [custom, CF_UNICODETEXT, CF_WAVE, CF_LOCALE, CF_TEXT, CF_OEMTEXT]  # CB-53/54
    assert w.SetClipboardData(custom, global_text(w, b"again"))  # set again: it keeps its place (CB-23)
    assert enumerate_formats(w)[:3] == [custom, CF_UNICODETEXT, CF_WAVE]
    expect(w, w.EnumClipboardFormats, 0xDEAD, result=0, error=WinError.ERROR_SUCCESS)  # CB-40
    ok(w, w.CloseClipboard)
    expect(w, w.EnumClipboardFormats, 0, result=0, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)  # CB-38
    assert w.CountClipboardFormats() == 6  # counting needs no opening (CB-41)


def test_the_sequence_number_moves_on_every_change_and_on_nothing_else(win32, peers):
    w = win32
    reader = peers()
    start = w.GetClipboardSequenceNumber()
    ok(w, w.OpenClipboard, 0)
    ok(w, w.CloseClipboard)
    assert w.GetClipboardSequenceNumber() == start  # CB-48
    ok(w, w.OpenClipboard, 0)
    ok(w, w.EmptyClipboard)
    ok(w, w.EmptyClipboard)
    assert w.GetClipboardSequenceNumber() == start + 2  # CB-49: even when empty
    handle = global_text(w, b"text\0")
    assert w.SetClipboardData(CF_TEXT, handle) == handle
    assert w.GetClipboardSequenceNumber() == start + 3  # CB-50
    ok(w, w.CloseClipboard)
    assert w.GetClipboardSequenceNumber() == start + 5  # CB-51: CF_LOCALE, and the other text formats
    assert reader.call("GetClipboardSequenceNumber")[0] == start + 5  # one number for every process
    assert reader.ok("OpenClipboard", 0)
    for fmt in (CF_TEXT, CF_UNICODETEXT, CF_LOCALE):
        assert reader.ok("GetClipboardData", fmt)
    assert reader.ok("IsClipboardFormatAvailable", CF_OEMTEXT)
    assert reader.ok("CloseClipboard")
    assert w.GetClipboardSequenceNumber() == start + 5  # reads move nothing (CB-52)


def test_replacing_a_format_frees_the_old_block_and_only_the_clipboard_frees_its_blocks(win32):
    w = win32
    old = open_emptied_with(w, CF_WAVE, b"old")
    expect(w, w.GlobalFree, old, result=old, error=WinError.ERROR_ACCESS_DENIED)  # the clipboard's (CB-37)
    new = global_text(w, b"new")
    assert w.SetClipboardData(CF_WAVE, new) == new
    expect(w, w.GlobalSize, old, result=0, error=WinError.ERROR_INVALID_HANDLE)  # freed (CB-34)
    assert read_global(w, ok(w, w.GetClipboardData, CF_WAVE)) == b"new"
    ok(w, w.EmptyClipboard)
    expect(w, w.GlobalSize, new, result=0, error=WinError.ERROR_INVALID_HANDLE)  # freed (CB-35)
    ok(w, w.CloseClipboard)


def test_a_handle_that_is_not_a_global_handle_is_refused_and_changes_nothing(win32, peers):
    w = win32
    kept = open_emptied_with(w, CF_WAVE, b"kept")
    sequence = w.GetClipboardSequenceNumber()
    heap_block = ok(w, w.HeapAlloc, w.GetProcessHeap(), 0, 37)
    empty_moveable = ok(w, w.GlobalAlloc, GMEM_MOVEABLE, 0)
    freed = ok(w, w.GlobalAlloc, GMEM_FIXED | GMEM_ZEROINIT, 8)
    w.GlobalFree(freed)
    theirs = peers().ok("GlobalAlloc", GMEM_MOVEABLE, 16)  # valid here too, but not ours to give
    for bad in (heap_block, empty_moveable, freed, 0xDEADBEEF0, kept + 16, theirs):
        expect(w, w.SetClipboardData, CF_WAVE, bad, result=0, error=WinError.ERROR_INVALID_HANDLE)  # CB-28/29
    expect(w, w.SetClipboardData, 0, kept, result=0, error=WinError.ERROR_CLIPBOARD_NOT_OPEN)  # CB-20
    assert w.GetClipboardSequenceNumber() == sequence
    assert w.GetClipboardData(CF_WAVE) == kept and read_global(w, kept) == b"kept"
    assert w.HeapFree(w.GetProcessHeap(), 0, heap_block)  # still the caller's
    assert w.GlobalFree(empty_moveable) == 0
    ok(w, w.CloseClipboard)


def test_registered_formats_and_their_names(win32, peers):
    w = win32
    fmt = ok(w, w.RegisterClipboardFormat, "My Cool Format")
    assert 0xC000 <= fmt <= 0xFFFF  # CB-68
    assert w.RegisterClipboardFormat("MY COOL FORMAT") == fmt  # CB-69: case-insensitive
    assert peers().ok("RegisterClipboardFormat", "my cool format") == fmt  # in every process
    assert w.GetClipboardFormatName(fmt) == "My Cool Format"  # as first registered
    assert w.RegisterClipboardFormat("#1234") == 1234  # CB-70
    expect(w, w.RegisterClipboardFormat, "", result=0, error=WinError.ERROR_INVALID_NAME)  # CB-72
    expect(w, w.RegisterClipboardFormat, None, result=0, error=WinError.ERROR_INVALID_PARAMETER)
    expect(w, w.RegisterClipboardFormat, "x" * 256, result=0, error=WinError.ERROR_INVALID_PARAMETER)
    expect(w, w.GetClipboardFormatName, CF_TEXT, result=None, error=WinError.ERROR_INVALID_HANDLE)  # CB-73
    expect(w, w.GetClipboardFormatName, 0xFFFF, result=None, error=WinError.ERROR_INVALID_HANDLE)


def test_availability_and_priority_need_no_opening(win32):
    w = win32
    expect(w, w.GetPriorityClipboardFormat, [CF_TEXT, CF_WAVE], result=0)  # empty clipboard (CB-47)
    ok(w, w.OpenClipboard, 0)
    ok(w, w.EmptyClipboard)
    w.SetClipboardData(CF_WAVE, global_text(w, b"w"))
    expect(w, w.GetClipboardData, CF_TEXT, result=0, error=WinError.ERROR_NOT_FOUND)  # CB-27
    ok(w, w.CloseClipboard)
    assert w.IsClipboardFormatAvailable(CF_WAVE) and not w.IsClipboardFormatAvailable(CF_TEXT)
    assert not w.IsClipboardFormatAvailable(0)  # CB-42
    assert w.GetPriorityClipboardFormat([CF_TEXT, CF_WAVE]) == CF_WAVE
    assert w.GetPriorityClipboardFormat([CF_TEXT]) == -1
    assert w.GetPriorityClipboardFormat([]) == -1


# ---- the Pythonic clipboard, waiting, rendering --------------------------------------------------

def _waiter(socket_path, after, timeout, conn):
    with shmheap.connect(socket_path, autostart=False) as client:
        conn.send("waiting")
        started = time.monotonic()
        moved = client.clipboard.wait(after, timeout=timeout)
        conn.send((moved, time.monotonic() - started))


def test_a_waiter_in_another_process_wakes_on_change_and_times_out_cleanly(daemon, client):
    clipboard = client.clipboard
    sequence = clipboard.sequence
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_waiter, args=(daemon.socket, sequence, 30.0, theirs))
    child.start()
    assert receive(ours) == "waiting"
    time.sleep(0.2)  # let it park at the daemon (no answer comes until a change)
    assert not ours.poll(0)
    after = clipboard.copy("wake up")
    moved, waited = receive(ours)
    assert sequence < moved <= after and waited < 30
    child.join(10)

    child = spawn.Process(target=_waiter, args=(daemon.socket, clipboard.sequence, 0.3, theirs))
    child.start()
    assert receive(ours) == "waiting"
    moved, waited = receive(ours)
    assert moved is None and 0.3 <= waited < 5  # a clean timeout, well within its bound
    child.join(10)
    assert clipboard.wait(clipboard.sequence - 1, timeout=0) == clipboard.sequence  # moved already: at once
    assert clipboard.paste() == "wake up"  # the waiters left nothing behind
    client.check()


def _renderer(socket_path, conn):
    client = shmheap.connect(socket_path, autostart=False)
    asked = []

    def render(fmt):
        asked.append(fmt)
        return f"rendered by {os.getpid()} for {fmt}, request {len(asked)}"
    client.clipboard.on_render(render)
    client.clipboard.copy({"text": None, "application/x-later": None})
    conn.send(os.getpid())
    time.sleep(120)  # the main thread is busy elsewhere; the render thread answers


def test_delayed_rendering_asks_the_owner_and_fails_cleanly_when_it_is_gone(daemon, client):
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_renderer, args=(daemon.socket, theirs), daemon=True)
    child.start()
    pid = receive(ours)
    clipboard = client.clipboard
    later = clipboard.format_id("application/x-later")
    assert [f.id for f in clipboard.formats()] == [CF_UNICODETEXT, later, CF_LOCALE, CF_TEXT, CF_OEMTEXT]
    assert all(f.size is None for f in clipboard.formats())  # promised, nothing rendered yet
    sequence = clipboard.sequence
    assert clipboard.paste(later) == f"rendered by {pid} for {later}, request 1".encode()
    assert clipboard.paste("CF_TEXT") == f"rendered by {pid} for {CF_UNICODETEXT}, request 2"  # its source (CB-65)
    assert clipboard.paste(later) == f"rendered by {pid} for {later}, request 1".encode()  # rendered once
    assert clipboard.sequence == sequence  # rendering is no change (CB-66)

    # Its owner dies: what it rendered is the clipboard's, and stays.
    os.kill(pid, signal.SIGKILL)
    child.join(10)
    wait_until(lambda: clipboard.formats()[0].size is not None and client.status()["processes"] and
               pid not in [p["pid"] for p in client.status()["processes"]], what="the renderer to be gone")
    assert clipboard.paste(later) == f"rendered by {pid} for {later}, request 1".encode()
    client.check()


def _promise_and_exit(socket_path, conn):
    client = shmheap.connect(socket_path, autostart=False)
    client.clipboard.on_render(lambda fmt: None)  # it never renders
    client.clipboard.copy({"text": None, CF_WAVE: b"real"})
    conn.send("promised")
    conn.poll(60)  # until told to die
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_promise_whose_owner_goes_is_dropped_and_the_reader_fails_cleanly(daemon, client):
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_promise_and_exit, args=(daemon.socket, theirs), daemon=True)
    child.start()
    assert receive(ours) == "promised"
    clipboard = client.clipboard
    started = time.monotonic()
    with pytest.raises(shmheap.ShmheapError) as info:
        clipboard.paste("text", timeout=0.5)  # the owner is there, but does not render
    assert info.value.winerror == WinError.ERROR_TIMEOUT and time.monotonic() - started < 5
    sequence = clipboard.sequence
    ours.send("die")
    child.join(10)
    wait_until(lambda: clipboard.sequence > sequence, what="the dead owner's promise to be dropped")
    assert [f.id for f in clipboard.formats()] == [CF_WAVE]  # text and what came from it went (CB-14)
    with pytest.raises(shmheap.ShmheapLookupError) as info:
        clipboard.paste("text")
    assert info.value.winerror == WinError.ERROR_NOT_FOUND
    assert clipboard.paste(CF_WAVE) == b"real"
    client.check()


def test_a_promise_nobody_renders_fails_the_reader_at_once(daemon, client):
    clipboard = client.clipboard
    clipboard.copy(None, format="nobody renders this")  # no on_render in this process
    with pytest.raises(shmheap.ShmheapLookupError):
        clipboard.paste("nobody renders this")
    assert clipboard.formats() == []


def _big_copier(socket_path, size, conn):
    with shmheap.connect(socket_path, autostart=False) as client:
        before = list(connection.traffic)
        client.clipboard.copy(bytes(range(256)) * (size // 256), format="big")
        conn.send(sum(connection.traffic) - sum(before))


def test_64_mib_passes_between_processes_with_only_handles_crossing_the_socket(daemon, client):
    size = 64 * MiB
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_big_copier, args=(daemon.socket, size, theirs))
    child.start()
    copier_wire = receive(ours, timeout=60)
    child.join(30)
    before = sum(connection.traffic)
    data = client.clipboard.paste("big")
    paster_wire = sum(connection.traffic) - before
    assert len(data) == size and data[:512] == bytes(range(256)) * 2 and data[-1] == 255
    assert copier_wire < 64 * 1024 and paster_wire < 64 * 1024  # handles, not bytes
    client.clipboard.clear()
    client.check()


def test_pythonic_copy_and_paste_of_text_bytes_and_many_formats(client):
    clipboard = client.clipboard
    clipboard.copy("naïve text ✓")
    assert clipboard.paste() == "naïve text ✓"
    assert clipboard.paste("CF_TEXT") == "naïve text ?"  # what cp1252 can say
    clipboard.copy(b"\x00\x01\x02")
    assert clipboard.paste() == b"\x00\x01\x02"  # no text: the first format
    sequence = clipboard.copy({"text": "both", "application/json": b'{"a": 1}'})
    assert clipboard.sequence == sequence
    assert clipboard.paste() == "both" and clipboard.paste("application/json") == b'{"a": 1}'
    with pytest.raises(shmheap.ShmheapValueError):
        clipboard.copy("x", format=0)
    assert clipboard.paste("application/json") == b'{"a": 1}'  # a refused copy changes nothing
    clipboard.clear()
    with pytest.raises(shmheap.ShmheapLookupError):
        clipboard.paste()
    client.check()


# ---- shmheap clip in a shell ---------------------------------------------------------------------

def _shell(daemon, command, stdin=None):
    env = dict(os.environ, SHMHEAP_SOCKET=daemon.socket)
    return subprocess.run(command, shell=True, env=env, input=stdin, capture_output=True, timeout=60)


def test_shmheap_clip_round_trips_through_shell_pipelines(daemon):
    copied = _shell(daemon, "echo hello | shmheap clip copy")
    assert copied.returncode == 0, copied.stderr
    pasted = _shell(daemon, "shmheap clip paste")  # another process, another shell
    assert pasted.returncode == 0 and pasted.stdout == b"hello\n"
    listed = _shell(daemon, "shmheap clip list").stdout.decode()
    assert "CF_UNICODETEXT" in listed and "CF_TEXT" in listed
    binary = bytes(range(256))
    assert _shell(daemon, f"{sys.executable} -c \"import sys; sys.stdout.buffer.write(bytes(range(256)))\""
                          " | shmheap clip copy").returncode == 0
    assert _shell(daemon, "shmheap clip paste").stdout == binary
    missing = _shell(daemon, "shmheap clip paste --format CF_WAVE")
    assert missing.returncode == 1 and missing.stdout == b""
    assert len(missing.stderr.decode().strip().splitlines()) == 1 and "1168" in missing.stderr.decode()
    assert _shell(daemon, "shmheap clip clear").returncode == 0
    assert _shell(daemon, "shmheap clip paste").returncode == 1


# ---- rendering the Win32 way, and the daemon's bound ------------------------------------------

def _win32_renderer(socket_path, conn):
    """A Windows-style owner: promises CF_TEXT, and renders it in its WM_RENDERFORMAT role
    with GlobalAlloc and SetClipboardData, the clipboard not opened by it."""
    os.environ["SHMHEAP_SOCKET"] = socket_path
    from shmheap import win32 as w

    def render(fmt):
        data = f"rendered for format {fmt}\0".encode()
        handle = w.GlobalAlloc(GMEM_MOVEABLE, len(data))
        w.write(w.GlobalLock(handle), data)
        w.GlobalUnlock(handle)
        assert w.SetClipboardData(fmt, handle) == handle, w.GetLastError()
    w.SetClipboardRenderer(render)
    assert w.OpenClipboard(5) and w.EmptyClipboard()
    assert w.SetClipboardData(CF_TEXT, 0) == 0 and w.CloseClipboard()
    conn.send("promised")
    conn.poll(120)


def test_an_owner_renders_through_the_win32_calls_on_a_thread_of_its_own(win32):
    w = win32
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_win32_renderer, args=(os.environ["SHMHEAP_SOCKET"], theirs), daemon=True)
    child.start()
    try:
        assert receive(ours) == "promised"
        assert w.GetClipboardOwner() == 5
        sequence = w.GetClipboardSequenceNumber()
        ok(w, w.OpenClipboard, 0)
        assert read_global(w, ok(w, w.GetClipboardData, CF_TEXT)) == b"rendered for format 1\0"
        unicode = ok(w, w.GetClipboardData, CF_UNICODETEXT)  # converted from the rendered source
        assert read_global(w, unicode) == "rendered for format 1\0".encode("utf-16-le")
        ok(w, w.CloseClipboard)
        assert w.GetClipboardSequenceNumber() == sequence  # rendering is no change (CB-66)
    finally:
        ours.send("done")
        child.join(10)


def test_a_render_that_never_comes_fails_the_reader_at_the_daemons_bound(make_kernel):
    from shmheapd.clipboard import RENDER_TIMEOUT
    from shmheapd.sessions import Session

    kernel = make_kernel(64 * MiB, 64 * MiB, 64 * MiB)
    answers = []
    kernel.respond = lambda *reply: answers.append(reply)
    owner, reader = Session(None, 101, 0), Session(None, 102, 0)
    kernel.attach(owner)
    kernel.attach(reader)

    def call(session, op, *args, msgid=1):
        kernel.request = (session, msgid)
        return kernel.ops[op](session.pid, *args)

    call(owner, "clipboard_open", 0)
    call(owner, "clipboard_empty")
    call(owner, "clipboard_set", CF_WAVE, 0)
    call(owner, "clipboard_close")
    listener = Session(None, 101, 0)
    kernel.attach(listener)
    assert call(listener, "clipboard_listen", 1, msgid=7) is not None  # parked
    call(reader, "clipboard_open", 0)
    sequence = kernel.clipboard.sequence
    with pytest.raises(shmheap.ShmheapError) as info:
        call(reader, "clipboard_get", CF_WAVE, 0)  # may not wait: asked to come back
    assert info.value.winerror == WinError.ERROR_IO_PENDING and answers == []
    from shmheapd.clipboard import PENDING
    assert call(reader, "clipboard_get", CF_WAVE, 1, msgid=9) is PENDING
    assert answers == [(listener, 7, 0, CF_WAVE)]  # the owner's listener is asked
    kernel.housekeeping(time.monotonic() + RENDER_TIMEOUT / 2)
    assert len(answers) == 1  # not yet
    kernel.housekeeping(time.monotonic() + RENDER_TIMEOUT + 1)
    assert answers[1][:3] == (reader, 9, WinError.ERROR_NOT_FOUND)
    assert not call(reader, "clipboard_available", CF_WAVE)  # no longer listed
    assert kernel.clipboard.sequence == sequence + 1
    kernel.check()
