"""The clipboard: one per daemon, shared by every process of its clients (Windows keeps one
per window station), following docs/clipboard_semantics.md (rows CB-*).

Theory of operation
-------------------
Opening is per process: at most one process holds the clipboard open (the *opener*), and a
second process's OpenClipboard is refused (ERROR_ACCESS_DENIED) until the opener closes it
or goes. A "window" is any int a caller picks as its identity; EmptyClipboard makes the
opener's window the owner's (CB-12), and the opener's process the *owner process*, which is
the one asked to render promised formats.

Data per format is a global object (daemon/handles.py) that SetClipboardData hands to the
clipboard: no process owns it any more (it outlives its maker), the setter lets go of it,
and only the clipboard frees it, when the format is replaced or the clipboard emptied
(GlobalFree of it is refused). Every process reads the same object through the same handle:
only handles cross the socket.

Formats keep the order they were first set. Closing after a change synthesizes the text
formats Windows does (CB-53..56): CF_LOCALE, then whichever of CF_TEXT, CF_OEMTEXT and
CF_UNICODETEXT is missing, listed after the formats set; their bytes are converted on first
read (code pages 1252 and 437, the 0x0409 locale's, CB-57/58) into GMEM_FIXED objects of the
clipboard's own.

The sequence number moves on every change (EmptyClipboard, SetClipboardData, synthesis at
close, formats dropped), never on reads or on rendering (CB-48..52).

Two requests are answered later, when something happens (the server parks them, `PENDING`):

    clipboard_wait     until the sequence number passes a value: AddClipboardFormatListener's
                       role, with no polling (a client times out by closing its connection).
    clipboard_listen   a process's render thread waits here for a format to render.

A GetClipboardData of a promised format (SetClipboardData(fmt, 0)) parks too: the owner
process's listener is answered with the format (WM_RENDERFORMAT's role), the owner renders
with SetClipboardData without opening the clipboard (CB-66; the sequence number stays), and
the reader gets the handle. If the owner has no listener, goes, or does not render within
RENDER_TIMEOUT, the reader gets ERROR_NOT_FOUND and the format is dropped (with what was
synthesized from it, CB-14).
"""

import time

from shmheap.constants import (CF_LOCALE, CF_OEMTEXT, CF_REGISTERED_FIRST, CF_REGISTERED_LAST,
                               CF_TEXT, CF_UNICODETEXT)
from shmheap.errors import ShmheapError, WinError, raise_for

PENDING = object()  # an op's result when its reply is sent later (Clipboard.respond)
RENDER_TIMEOUT = 10.0  # seconds an owner process has to render a format asked for
LOCALE = 0x0409  # CF_LOCALE's LCID: en-US (CB-57); its code pages below
ANSI, OEM = "cp1252", "cp437"
TEXT_FORMATS = (CF_TEXT, CF_OEMTEXT, CF_UNICODETEXT)  # the order synthesized ones are listed in
# Which format a missing text format is converted from, in order of preference (CB-60).
TEXT_SOURCES = {CF_TEXT: (CF_OEMTEXT, CF_UNICODETEXT), CF_OEMTEXT: (CF_UNICODETEXT, CF_TEXT),
                CF_UNICODETEXT: (CF_TEXT, CF_OEMTEXT)}
MAX_NAME = 255  # characters in a registered format's name (atom names, CB-72)
MAX_WINDOW = 0xFFFFFFFF  # a window handle is 32 bits wide (CB-06)
MAX_PARKED = 64  # requests one connection may have waiting at the daemon


class Clipboard:
    def __init__(self, global_memory, respond):
        self.memory = global_memory
        self.respond = respond  # (session, msgid, error, result): answers a parked request
        self.opener = None  # pid of the process holding it open
        self.open_window = 0
        self.owner_window = 0  # GetClipboardOwner
        self.owner_pid = None  # the process asked to render (the one that last emptied it)
        self.formats = {}  # format -> handle (0: promised, not rendered yet), in the order set
        self.synthesized = {}  # format -> handle (0: not converted yet), listed after `formats`
        self.changed = False  # since it was opened: close synthesizes
        self.sequence = 1
        self.names = {}  # registered format -> its name as first registered
        self.by_name = {}  # name.casefold() -> registered format
        self.waiters = []  # (session, msgid, after): clipboard_wait requests parked
        self.listeners = {}  # pid -> {session: msgid or None}: render threads (msgid: parked)
        self.to_render = {}  # pid -> [format, ...] asked for while no listener was parked
        self.readers = {}  # source format -> [(session, msgid, wanted format, deadline)]

    # ---- opening --------------------------------------------------------------------------

    def open(self, pid, window):
        """OpenClipboard(window): for this process, if nobody else has it open. Opens are
        not counted (CB-02); a second window of the opener is refused (CB-03)."""
        if window > MAX_WINDOW:
            raise_for(WinError.ERROR_INVALID_WINDOW_HANDLE, f"{window:#x} is no window handle")
        if self.opener is None:
            self.opener, self.open_window, self.changed = pid, window, False
        elif self.opener != pid or self.open_window != window:
            raise_for(WinError.ERROR_ACCESS_DENIED, f"the clipboard is open (pid {self.opener})")

    def close(self, pid):
        """CloseClipboard: synthesizes the missing text formats if anything changed."""
        self._opened_by(pid)
        self._close()
        return self.sequence

    def _close(self):
        if self.changed:
            self._synthesize()
        self.opener, self.open_window, self.changed = None, 0, False

    def _opened_by(self, pid):
        if self.opener != pid:
            raise_for(WinError.ERROR_CLIPBOARD_NOT_OPEN, "this process does not have the clipboard open")

    # ---- changing it ----------------------------------------------------------------------

    def empty(self, pid):
        """EmptyClipboard: every format goes; the opener becomes the owner (CB-12)."""
        self._opened_by(pid)
        self._drop(list(self.formats))
        self.owner_window, self.owner_pid = self.open_window, pid
        self.changed = True
        self._bump()

    def set(self, pid, fmt, handle):
        """SetClipboardData: any process, while some process has the clipboard open (CB-17).
        `handle` 0 promises the format (delayed rendering). The owner process rendering a
        format a reader waits for does not move the sequence number (CB-66). Returns the
        handle."""
        if self.opener is None or fmt == 0:
            raise_for(WinError.ERROR_CLIPBOARD_NOT_OPEN, "nobody has the clipboard open")  # CB-16, CB-20
        old = self.formats.get(fmt)
        if handle and handle != old:
            if fmt == CF_UNICODETEXT and self.memory.table.size(handle) < 2:
                raise_for(WinError.ERROR_INVALID_PARAMETER, "CF_UNICODETEXT needs at least one character")  # CB-62
            self.memory.clipboard_take(pid, handle)
        if old and old != handle:
            self.memory.clipboard_free(old)
        # The owner rendering a format a reader asked for is no change (CB-66); anyone else
        # setting it is, and answers the reader all the same.
        quiet = handle and old == 0 and pid == self.owner_pid and self._asked_for(fmt)
        self.formats[fmt] = handle  # a format set again keeps its place (CB-23)
        if fmt in self.synthesized:
            del self.synthesized[fmt]
        if fmt in TEXT_FORMATS:
            self._forget_conversions()  # made from the text it replaces
        if not quiet:
            self.changed = True
            self._bump()
        if handle:
            self._answer_readers(fmt)
        return handle

    def _drop(self, formats):
        """Formats go, and with them every conversion; readers waiting for them fail."""
        for queue in self.to_render.values():
            queue[:] = [fmt for fmt in queue if fmt not in formats]
        for fmt in formats:
            handle = self.formats.pop(fmt)
            if handle:
                self.memory.clipboard_free(handle)
            for session, msgid, _, _ in self.readers.pop(fmt, ()):
                self.respond(session, msgid, WinError.ERROR_NOT_FOUND, f"format {fmt} was dropped")
        self._forget_conversions()
        self.synthesized = {}

    def _forget_conversions(self):
        """Converted text depends on what it came from: it is made again when next read."""
        for fmt, handle in self.synthesized.items():
            if handle:
                self.memory.clipboard_free(handle)
                self.synthesized[fmt] = 0

    def _synthesize(self, bump=True):
        """At close: CF_LOCALE and the missing text formats, if any text format is there and
        they are not yet; +1 to the sequence number for each of the two added (CB-51)."""
        if not any(fmt in self.formats for fmt in TEXT_FORMATS):
            return
        there = {*self.formats, *self.synthesized}  # made at an earlier close: kept as they are
        if CF_LOCALE not in there:
            self.synthesized[CF_LOCALE] = 0
            if bump:
                self._bump()
        missing = [fmt for fmt in TEXT_FORMATS if fmt not in there]
        for fmt in missing:
            self.synthesized[fmt] = 0
        if missing and bump:
            self._bump()

    def _bump(self):
        self.sequence += 1
        waiting, self.waiters = self.waiters, []
        for session, msgid, after in waiting:
            if self.sequence > after:
                self.respond(session, msgid, 0, self.sequence)
            else:
                self.waiters.append((session, msgid, after))

    # ---- reading it -----------------------------------------------------------------------

    def get(self, pid, request, fmt, wait=True):
        """GetClipboardData, for the opener only (CB-25, CB-26): the handle, the same in every
        process. A promised format (or one converted from it) is rendered first by the owner
        process: then the answer comes later (PENDING), or, unless `wait`, at once with
        ERROR_IO_PENDING (the client asks again on a connection that may wait)."""
        self._opened_by(pid)
        if fmt in self.formats:
            if self.formats[fmt]:
                return self.formats[fmt]
            return self._ask_render(request, fmt, fmt, wait)
        if fmt not in self.synthesized:
            raise_for(WinError.ERROR_NOT_FOUND, f"no format {fmt} on the clipboard")  # CB-27
        if fmt == CF_LOCALE:
            return self._converted(fmt)
        source = self._source_of(fmt)
        if not self.formats[source]:
            return self._ask_render(request, source, fmt, wait)  # the source, not the format (CB-65)
        return self._converted(fmt)

    def _source_of(self, fmt):
        return next(source for source in TEXT_SOURCES[fmt] if source in self.formats)

    def _converted(self, fmt):
        """The synthesized format's object, made on first read."""
        if not self.synthesized[fmt]:
            if fmt == CF_LOCALE:
                data = LOCALE.to_bytes(4, "little")
            else:
                source = self._source_of(fmt)
                data = convert_text(bytes(self.memory.clipboard_data(self.formats[source])), source, fmt)
            self.synthesized[fmt] = self.memory.clipboard_alloc(data)
        return self.synthesized[fmt]

    def available(self, pid, fmt):
        """IsClipboardFormatAvailable: any process, open or not (CB-41, CB-42)."""
        return fmt != 0 and (fmt in self.formats or fmt in self.synthesized)

    def enum(self, pid, fmt):
        """EnumClipboardFormats: the format after `fmt` (0: the first), 0 after the last or
        for a format not there (CB-39, CB-40); the opener only (CB-38)."""
        self._opened_by(pid)
        order = [*self.formats, *self.synthesized]
        if fmt == 0:
            return order[0] if order else 0
        if fmt not in order:
            return 0
        i = order.index(fmt) + 1
        return order[i] if i < len(order) else 0

    def priority(self, pid, formats):
        """GetPriorityClipboardFormat: the first of `formats` that is there; 0 if the
        clipboard is empty; -1 if none is (CB-47)."""
        if not self.formats and not self.synthesized:
            return 0
        return next((fmt for fmt in formats if self.available(pid, fmt)), -1)

    def info(self, pid):
        """What GetClipboardSequenceNumber, GetClipboardOwner and GetOpenClipboardWindow tell,
        and every format with its name and size (None: not rendered or converted yet)."""
        rows = []
        for fmt, handle in [*self.formats.items(), *self.synthesized.items()]:
            size = self.memory.table.size(handle) if handle else None
            rows.append([fmt, self.names.get(fmt), size, fmt in self.synthesized])
        return {"sequence": self.sequence, "owner": self.owner_window, "owner_pid": self.owner_pid,
                "open_window": self.open_window, "opener": self.opener, "formats": rows}

    # ---- registered formats ---------------------------------------------------------------

    def register(self, pid, name):
        """RegisterClipboardFormat: the same name (case-insensitively) gives the same value,
        in every process (CB-68, CB-69); "#1234" names 1234 (CB-70)."""
        if not name:
            raise_for(WinError.ERROR_INVALID_NAME, "a format needs a name")
        if len(name) > MAX_NAME:
            raise_for(WinError.ERROR_INVALID_PARAMETER, f"format names are at most {MAX_NAME} characters")
        digits = name[1:]
        if name.startswith("#") and digits.isascii() and digits.isdigit() and 0 < int(digits) < CF_REGISTERED_FIRST:
            return int(name[1:])
        key = name.casefold()
        if key not in self.by_name:
            fmt = CF_REGISTERED_FIRST + len(self.names)
            if fmt > CF_REGISTERED_LAST:
                raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "every registered format value is taken")
            self.by_name[key] = fmt
            self.names[fmt] = name
        return self.by_name[key]

    def format_name(self, pid, fmt):
        """GetClipboardFormatName: the name as first registered; ERROR_INVALID_HANDLE for a
        value nobody registered, standard formats included (CB-73, CB-75)."""
        if fmt not in self.names:
            raise_for(WinError.ERROR_INVALID_HANDLE, f"format {fmt} is not a registered one")
        return self.names[fmt]

    # ---- waiting and rendering --------------------------------------------------------------

    def wait(self, pid, request, after):
        """The sequence number once it is past `after`: now, or when it moves (PENDING)."""
        if self.sequence > after:
            return self.sequence
        self._room_to_park(request[0])
        self.waiters.append((*request, after))
        return PENDING

    def listen(self, pid, request, wait=True):
        """A process's render thread asks for the next format to render: PENDING until one
        is asked for, or, unless `wait`, 0 at once. Its connection is the process's listener
        from now on."""
        session, msgid = request
        listeners = self.listeners.setdefault(pid, {})
        if listeners.get(session) is not None:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "this connection is listening already")
        listeners[session] = None
        queue = self.to_render.get(pid)
        if queue:
            return queue.pop(0)
        if not wait:
            return 0
        listeners[session] = msgid
        return PENDING

    def _room_to_park(self, session):
        parked = sum(1 for waiter in self.waiters if waiter[0] is session) + sum(
            1 for readers in self.readers.values() for reader in readers if reader[0] is session)
        if parked >= MAX_PARKED:
            raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, f"{MAX_PARKED} requests of this connection wait already")

    def _ask_render(self, request, source, wanted, wait):
        """A reader waits for the owner process to render `source` (then gets `wanted`)."""
        if not wait:
            raise_for(WinError.ERROR_IO_PENDING, f"format {source} is to be rendered: ask on a connection that waits")
        owner = self.owner_pid
        if owner is None or not self.listeners.get(owner):
            self._drop_unrendered([source])
            raise_for(WinError.ERROR_NOT_FOUND, f"format {source} was promised, but its owner cannot render it")
        self._room_to_park(request[0])
        first = source not in self.readers
        self.readers.setdefault(source, []).append((*request, wanted, time.monotonic() + RENDER_TIMEOUT))
        if first:
            parked = [(session, msgid) for session, msgid in self.listeners[owner].items() if msgid is not None]
            if parked:
                session, msgid = parked[0]
                self.listeners[owner][session] = None
                self.respond(session, msgid, 0, source)
            else:
                self.to_render.setdefault(owner, []).append(source)
        return PENDING

    def _asked_for(self, fmt):
        return fmt in self.readers or any(wanted == fmt for readers in self.readers.values()
                                          for _, _, wanted, _ in readers)

    def _answer_readers(self, fmt):
        """`fmt` has data now: the readers waiting for it, as the format they want or as the
        source of the one they want, get their answer."""
        for source in list(self.readers):
            ready = [reader for reader in self.readers[source] if source == fmt or reader[2] == fmt]
            if not ready:
                continue
            self._forget_readers(source, ready)
            for session, msgid, wanted, _ in ready:
                try:
                    if self.formats.get(wanted):
                        handle = self.formats[wanted]
                    elif wanted in self.synthesized:
                        handle = self._converted(wanted)
                    else:
                        raise_for(WinError.ERROR_NOT_FOUND, f"format {wanted} is gone")
                except ShmheapError as exc:
                    self.respond(session, msgid, exc.winerror, exc.args[0])
                else:
                    self.respond(session, msgid, 0, handle)

    def _forget_readers(self, source, readers):
        """Readers of `source` are answered or gone: with the last of them, so is the request
        to render it."""
        rest = [reader for reader in self.readers.get(source, ()) if reader not in readers]
        if rest:
            self.readers[source] = rest
            return
        self.readers.pop(source, None)
        for queue in self.to_render.values():
            if source in queue:
                queue.remove(source)

    def _drop_unrendered(self, formats):
        """Promised formats that will not be rendered go, with what is synthesized from them
        (CB-14): the sequence number moves if anything went."""
        formats = [fmt for fmt in formats if fmt in self.formats and not self.formats[fmt]]
        if not formats:
            return
        self._drop(formats)
        self._synthesize(bump=False)  # what is left still converts
        self._bump()

    def housekeeping(self, now):
        """Readers whose owner did not render in time fail; returns the seconds until the
        next deadline, or None."""
        late = [fmt for fmt, readers in self.readers.items() if any(deadline <= now for *_, deadline in readers)]
        self._drop_unrendered(late)
        for fmt in late:  # the format got data meanwhile, but not from a render: answer anyway
            if self.formats.get(fmt):
                self._answer_readers(fmt)
        deadlines = [deadline for readers in self.readers.values() for *_, deadline in readers]
        return min(deadlines) - now if deadlines else None

    # ---- connections and processes that go ---------------------------------------------------

    def detach(self, session):
        """A connection closed: its parked requests go with it."""
        self.waiters = [waiter for waiter in self.waiters if waiter[0] is not session]
        for source in list(self.readers):
            self._forget_readers(source, [reader for reader in self.readers[source] if reader[0] is session])
        listeners = self.listeners.get(session.pid)
        if listeners is not None:
            listeners.pop(session, None)
            if not listeners:
                del self.listeners[session.pid]
                if session.pid == self.owner_pid:
                    self._drop_unrendered(list(self.readers))  # nobody left to render them

    def release_owner(self, pid):
        """A process is gone: closed if it had it open (CB-07); if it was the owner, the owner
        is gone and so are its formats not yet rendered (CB-14)."""
        self.to_render.pop(pid, None)
        self.listeners.pop(pid, None)
        if self.opener == pid:
            self._close()
        if self.owner_pid == pid:
            self.owner_pid, self.owner_window = None, 0
            self._drop_unrendered([fmt for fmt, handle in self.formats.items() if not handle])

    def check(self):
        held = {handle for handle in [*self.formats.values(), *self.synthesized.values()] if handle}
        if held != self.memory.clipboard:
            raise RuntimeError("the clipboard's formats and the objects it holds differ")
        if set(self.formats) & set(self.synthesized):
            raise RuntimeError("a clipboard format is both set and synthesized")
        return {"clipboard_formats": len(self.formats) + len(self.synthesized)}


def convert_text(data, source, target):
    """Text bytes of format `source` as format `target`: every byte converted, NULs
    included (CB-59); characters a code page lacks become '?'."""
    if source == CF_UNICODETEXT:
        text = data[:len(data) // 2 * 2].decode("utf-16-le", errors="replace")
    else:
        text = data.decode(ANSI if source == CF_TEXT else OEM, errors="replace")
    if target == CF_UNICODETEXT:
        return text.encode("utf-16-le")
    return text.encode(ANSI if target == CF_TEXT else OEM, errors="replace")
