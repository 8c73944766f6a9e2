"""Helpers shared by the Win32 conformance suites: calls checked against the last error, and
a real second process that runs Win32 calls on request (for cross-process rows)."""

import dataclasses
import multiprocessing
import os
import signal

from shmheap.constants import FILE_MAP_ALL_ACCESS, GMEM_MOVEABLE

SENTINEL = 0xDEADBEEF  # stored with SetLastError before a call: "untouched" means still this

spawn = multiprocessing.get_context("spawn")


def _show(args):
    return tuple(hex(a) if isinstance(a, int) and not isinstance(a, bool) else a for a in args)


def call(w, fn, *args):
    """(result, GetLastError()) of fn(*args), with the sentinel stored before the call."""
    w.SetLastError(SENTINEL)
    result = fn(*args)
    return result, w.GetLastError()


def ok(w, fn, *args):
    """Call fn(*args); assert a non-zero result with the last error untouched."""
    result, error = call(w, fn, *args)
    assert result, f"{fn.__name__}{_show(args)} failed with error {error}"
    assert error == SENTINEL, f"{fn.__name__}{_show(args)} succeeded but set the last error to {error}"
    return result


def expect(w, fn, *args, result, error=SENTINEL):
    """Call fn(*args); assert its exact result (and type) and the last error afterwards
    (SENTINEL: untouched)."""
    got, got_error = call(w, fn, *args)
    assert type(got) is type(result) and got == result, (
        f"{fn.__name__}{_show(args)} returned {got!r}, expected {result!r}")
    assert got_error == error, (
        f"{fn.__name__}{_show(args)}: GetLastError() = {got_error}, expected {int(error)}")


# ---- global objects with data, as a Windows program makes clipboard data ----------------------

def global_text(w, data):
    """A moveable global object holding `data`, as a Windows program makes clipboard data."""
    handle = ok(w, w.GlobalAlloc, GMEM_MOVEABLE, len(data))
    pointer = ok(w, w.GlobalLock, handle)
    w.write(pointer, data)
    w.GlobalUnlock(handle)
    return handle


def read_global(w, handle):
    pointer = ok(w, w.GlobalLock, handle)
    data = bytes(w.view(pointer, w.GlobalSize(handle)))
    w.GlobalUnlock(handle)
    return data


def open_emptied_with(w, fmt, data):
    """Open and empty the clipboard, set `fmt` to a new object holding `data`: its handle."""
    ok(w, w.OpenClipboard, 0)
    ok(w, w.EmptyClipboard)
    handle = global_text(w, data)
    assert w.SetClipboardData(fmt, handle) == handle
    return handle


def enumerate_formats(w):
    formats, fmt = [], 0
    while fmt := w.EnumClipboardFormats(fmt):
        formats.append(fmt)
    return formats


def pattern(size, seed=1):
    unit = bytes((i * 7 + seed) & 0xFF for i in range(251))
    return (unit * (size // 251 + 1))[:size]


def _serve(socket_path, conn):
    """In a spawned process: run win32 calls sent over the pipe and answer each with
    ("ok", result, GetLastError()) (the sentinel is stored before every call) or
    ("raised", exception class name, winerror)."""
    os.environ["SHMHEAP_SOCKET"] = socket_path
    from shmheap import win32

    win32.GetSystemInfo()  # connect now, so the process heap exists before the test goes on
    conn.send(("ready", os.getpid()))
    while True:
        request = conn.recv()
        if request is None:
            break
        name, args = request
        try:
            win32.SetLastError(SENTINEL)
            result = getattr(win32, name)(*args)
            error = win32.GetLastError()
            if dataclasses.is_dataclass(result):
                result = dataclasses.asdict(result)
            elif isinstance(result, memoryview):
                result = (bytes(result), result.readonly)
            conn.send(("ok", result, error))
        except Exception as exc:  # reported to the test, which decides
            conn.send(("raised", type(exc).__name__, int(getattr(exc, "winerror", 0) or 0)))


class Peer:
    """A real process (spawn) connected to the test's daemon through SHMHEAP_SOCKET."""

    def __init__(self, socket_path):
        self.conn, child_end = spawn.Pipe()
        self.proc = spawn.Process(target=_serve, args=(socket_path, child_end), daemon=True)
        self.proc.start()
        child_end.close()
        tag, self.pid = self._reply()
        assert tag == "ready" and self.pid == self.proc.pid

    def _reply(self, timeout=60):
        if not self.conn.poll(timeout):
            raise AssertionError(f"peer {self.proc.pid} did not answer within {timeout}s")
        return self.conn.recv()

    def call(self, name, *args):
        """(result, GetLastError()) of win32.<name>(*args) in the peer."""
        self.conn.send((name, args))
        reply = self._reply()
        assert reply[0] == "ok", f"peer: {name}{_show(args)} raised {reply[1]} (winerror {reply[2]})"
        return reply[1], reply[2]

    def ok(self, name, *args):
        result, error = self.call(name, *args)
        assert result, f"peer: {name}{_show(args)} failed with error {error}"
        assert error == SENTINEL, f"peer: {name}{_show(args)} set the last error to {error}"
        return result

    def expect(self, name, *args, result, error=SENTINEL):
        got, got_error = self.call(name, *args)
        assert type(got) is type(result) and got == result, (
            f"peer: {name}{_show(args)} returned {got!r}, expected {result!r}")
        assert got_error == error, (
            f"peer: {name}{_show(args)}: GetLastError() = {got_error}, expected {int(error)}")

    def raises(self, name, *args):
        """(exception class name, winerror) of a call that must raise in the peer."""
        self.conn.send((name, args))
        reply = self._reply()
        assert reply[0] == "raised", f"peer: {name}{_show(args)} did not raise: {reply!r}"
        return reply[1], reply[2]

    def map(self, h, access=FILE_MAP_ALL_ACCESS, offset=0, size=0):
        return self.ok("MapViewOfFile", h, access, offset >> 32, offset & 0xFFFFFFFF, size)

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)
        assert self.proc.exitcode == -signal.SIGKILL

    def close(self):
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()
