"""The clipboard, the Pythonic way: `client.clipboard.copy("text")` in one process,
`client.clipboard.paste()` in another. The daemon holds it (daemon/clipboard.py); the data
lives in global memory, and only its handle crosses the socket.

Formats are given as ints (the CF_* constants, or a registered format's value) or as names:
a CF_* name ("CF_UNICODETEXT"), "text" (CF_UNICODETEXT), or any other name, which is
registered (RegisterClipboardFormat). `copy` takes str (as CF_UNICODETEXT: the clipboard
makes CF_TEXT, CF_OEMTEXT and CF_LOCALE from it), bytes or any buffer (under `format`, by
default BINARY_FORMAT), or a dict of several formats at once. `paste` gives str for the text
formats and bytes for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .constants import CF_OEMTEXT, CF_TEXT, CF_UNICODETEXT, CLIPBOARD_FORMAT_NAMES, GMEM_FIXED
from .errors import ShmheapError, WinError, raise_for

BINARY_FORMAT = "application/octet-stream"  # the registered format bytes go under by default
OPEN_TIMEOUT = 2.0  # seconds copy and paste retry while another process has the clipboard open
TEXT_CODECS = {CF_UNICODETEXT: "utf-16-le", CF_TEXT: "cp1252", CF_OEMTEXT: "cp437"}

if TYPE_CHECKING:  # for annotations only: client.py imports this module when it is used
    from .client import Client


@dataclass(frozen=True)
class Format:
    """A format on the clipboard: its value, its name, its size in bytes (None until a
    promised format is rendered or a synthesized one converted) and whether the clipboard
    made it from another (synthesized)."""
    id: int
    name: str
    size: int | None
    synthesized: bool


class Clipboard:
    """One client's view of the daemon's clipboard: copy, paste, the formats on it, waiting for
    a change, and rendering formats this process promised."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._registered = {}  # name.casefold() -> its registered format

    # ---- formats ---------------------------------------------------------------------------

    def format_id(self, format: int | str) -> int:
        """The value of a format given as an int or a name (registering the name if new)."""
        if isinstance(format, int):
            if not 0 < format <= 0xFFFFFFFF:
                raise_for(WinError.ERROR_INVALID_PARAMETER, f"{format} is no clipboard format")
            return format
        if format.lower() == "text":
            return CF_UNICODETEXT
        if format.upper() in CLIPBOARD_FORMAT_NAMES:
            return CLIPBOARD_FORMAT_NAMES[format.upper()]
        key = format.casefold()
        if key not in self._registered:  # registered for the daemon's life: ask once
            self._registered[key] = self.client.clipboard_register(format)
        return self._registered[key]

    def format_name(self, fmt: int) -> str:
        """A format's name: its CF_* name, its registered name, or "#value" for any other."""
        for name, value in CLIPBOARD_FORMAT_NAMES.items():
            if value == fmt:
                return name
        try:
            return self.client.clipboard_format_name(fmt)
        except ShmheapError:
            return f"#{fmt}"

    def formats(self) -> list[Format]:
        """The formats on the clipboard, in the order they were set, synthesized ones last."""
        info = self.client.clipboard_info()
        return [Format(fmt, name or self.format_name(fmt), size, synthesized)
                for fmt, name, size, synthesized in info["formats"]]

    @property
    def sequence(self) -> int:
        """GetClipboardSequenceNumber: moves on every change."""
        return self.client.clipboard_info()["sequence"]

    # ---- copy and paste ------------------------------------------------------------------

    def copy(self, data: str | bytes | bytearray | memoryview | dict[int | str, object] | None,
             format: int | str | None = None) -> int:
        """Put `data` on the clipboard, replacing what was there; returns the sequence number
        after. `data`: str, bytes-like, or {format: data} for several formats at once; None
        promises `format`, rendered by this process's `on_render` callback when asked for.
        Two round trips: the objects and the opening in one, the formats in the other."""
        items = [self._encode(fmt, value) for fmt, value in (data.items() if isinstance(data, dict) else [(format, data)])]
        payloads = [payload for _, payload in items if payload is not None]
        made, opened = self.client.connection.call_many(
            [("global_alloc_many", (GMEM_FIXED, [len(p) for p in payloads])), ("clipboard_open", (0,))],
            return_exceptions=True)
        if isinstance(made, ShmheapError):
            if not isinstance(opened, ShmheapError):
                self.client.clipboard_close()
            raise made
        handles = [handle for handle, _ in made]
        free_them = [("global_free", (handle,)) for handle in handles]
        if isinstance(opened, ShmheapError):
            try:
                _open(self.client, opened)
            except BaseException:
                self.client.connection.call_many(free_them, return_exceptions=True)
                raise
        try:  # open from here on
            for handle, payload in zip(handles, payloads):
                self.client.view(handle, len(payload), write=True)[:] = payload
        except BaseException:
            self.client.connection.call_many([*free_them, ("clipboard_close", ())], return_exceptions=True)
            raise
        pending = iter(handles)
        formats = [(fmt, 0 if payload is None else next(pending)) for fmt, payload in items]
        results = self.client.connection.call_many(
            [("clipboard_empty", ()), *[("clipboard_set", pair) for pair in formats], ("clipboard_close", ())],
            return_exceptions=True)
        taken = [handle for (_, handle), result in zip(formats, results[1:-1]) if handle and result == handle]
        refused = [handle for handle in handles if handle not in taken]
        if refused:
            self.client.connection.call_many([("global_free", (handle,)) for handle in refused], return_exceptions=True)
        failure = next((result for result in results if isinstance(result, ShmheapError)), None)
        if failure is not None:
            raise failure
        return results[-1]

    def paste(self, format: int | str | None = None, *, timeout: float | None = None) -> str | bytes:
        """What the clipboard holds in `format` (None: text if there is any, else the first
        format): str for text formats, bytes otherwise. A format that is not there raises
        ShmheapLookupError (ERROR_NOT_FOUND); `timeout` bounds waiting for a render. Two round
        trips when nothing is to be rendered."""
        fmt = CF_UNICODETEXT if format is None else self.format_id(format)
        opened, handle = self.client.connection.call_many(
            [("clipboard_open", (0,)), ("clipboard_get", (fmt, 0))], return_exceptions=True)
        if isinstance(opened, ShmheapError):
            _open(self.client, opened)
            handle = self.client.connection.call_many([("clipboard_get", (fmt, 0))], return_exceptions=True)[0]
        try:  # open from here on
            if isinstance(handle, ShmheapError):
                if format is None and handle.winerror == WinError.ERROR_NOT_FOUND:
                    fmt = self.client.clipboard_enum(0)  # no text: the first format
                    if fmt == 0:
                        raise_for(WinError.ERROR_NOT_FOUND, "the clipboard is empty")
                    handle = self.client.clipboard_get(fmt, timeout=timeout)
                elif handle.winerror == WinError.ERROR_IO_PENDING:
                    handle = self.client.clipboard_get(fmt, timeout=timeout)  # rendered first
                else:
                    raise handle
            pointer, size = self.client.connection.call_many([("global_lock", (handle,)), ("global_size", (handle,))])
            data = bytes(self.client.view(pointer, size))
            self.client.connection.post("global_unlock", handle)
        finally:
            self.client.connection.post("clipboard_close")
        if fmt in TEXT_CODECS:
            text = data.decode(TEXT_CODECS[fmt], errors="replace")
            return text.split("\0", 1)[0]  # C strings: the text ends at the first NUL
        return data

    def clear(self) -> None:
        """EmptyClipboard: every format goes (and the clipboard frees their memory)."""
        with self._opened():
            self.client.clipboard_empty()

    def wait(self, after: int | None = None, timeout: float | None = None) -> int | None:
        """Block until the clipboard changes after sequence number `after` (None: from now);
        returns the new sequence number, or None if `timeout` seconds pass first. The daemon
        answers when it moves: no polling."""
        if after is None:
            after = self.sequence
        return self.client.clipboard_wait(after, timeout)

    def on_render(self, callback: Callable[[int], object] | None) -> None:
        """Render promised formats on request: `callback(fmt)` runs on a thread of its own
        and returns the data (str or bytes-like; or None if it called SetClipboardData
        itself). None stops rendering."""
        if callback is None:
            self.client.clipboard_on_render(None)
            return

        def render(fmt):
            data = callback(fmt)
            if data is not None:
                _, payload = self._encode(fmt, data)
                handle = self._global_object(payload)
                try:
                    self.client.clipboard_set(fmt, handle)
                except BaseException:
                    self.client.global_free(handle)
                    raise
        self.client.clipboard_on_render(render)

    # ---- the parts ---------------------------------------------------------------------------

    def _encode(self, format, data):
        """(format value, bytes or None) for `data` given for `format`."""
        if data is None:
            if format is None:
                raise_for(WinError.ERROR_INVALID_PARAMETER, "a promised format needs a format")
            return self.format_id(format), None
        if isinstance(data, str):
            fmt = CF_UNICODETEXT if format is None else self.format_id(format)
            if fmt not in TEXT_CODECS:
                return fmt, data.encode()  # text under another format: UTF-8, as it is
            return fmt, (data + "\0").encode(TEXT_CODECS[fmt], errors="replace")  # a C string
        payload = memoryview(data).cast("B")
        fmt = self.format_id(BINARY_FORMAT if format is None else format)
        if fmt == CF_UNICODETEXT and len(payload) < 2:  # refused now, before anything changes (CB-62)
            raise_for(WinError.ERROR_INVALID_PARAMETER, "CF_UNICODETEXT needs at least one character")
        return fmt, payload

    def _global_object(self, payload):
        """A GMEM_FIXED global object holding `payload`, made as `copy` makes them: one
        round trip, and its handle is its address, written in place."""
        ((handle, _),) = self.client.global_alloc_many(GMEM_FIXED, [len(payload)])
        try:
            self.client.view(handle, len(payload), write=True)[:] = payload
        except BaseException:
            self.client.global_free(handle)
            raise
        return handle

    def _read(self, handle):
        pointer = self.client.global_lock(handle)
        try:
            return bytes(self.client.view(pointer, self.client.global_size(handle)))
        finally:
            self.client.global_unlock(handle)

    def _opened(self):
        return _Opened(self.client)


def _open(client, refusal):
    """OpenClipboard for this process, after `refusal`: retried while another process holds
    it (up to OPEN_TIMEOUT)."""
    deadline = time.monotonic() + OPEN_TIMEOUT
    while refusal.winerror == WinError.ERROR_ACCESS_DENIED and time.monotonic() < deadline:
        time.sleep(0.005)
        try:
            client.clipboard_open(0)
            return
        except ShmheapError as exc:
            refusal = exc
    raise refusal


class _Opened:
    """The clipboard open for this process (retried while another holds it), closed at the
    end."""

    def __init__(self, client):
        self.client = client

    def __enter__(self):
        try:
            self.client.clipboard_open(0)
        except ShmheapError as exc:
            _open(self.client, exc)
        return self

    def __exit__(self, *exc):
        self.client.clipboard_close()
