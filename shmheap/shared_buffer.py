"""SharedBuffer: bytes in global memory that every connected process can use, with no copy.

Lifetime, as users of Ray's object store expect: a buffer lives while some process holds it.
The process that creates it holds it (and owns it: it dies with that process unless made
with keep=True); a process that unpickles it holds it too. A process's hold lasts until its
SharedBuffer object and every view or numpy array over it are gone (then the hold goes with
its next call, or within about two seconds if it makes none), or until it exits. `free()` lets
go of this process's hold and frees the buffer for everyone else's calls, without waiting
for the daemon; its memory stays, unmoved and unreused, for the processes still holding it.
Pickling pins the buffer for the copy on its way (for 60 s), so a buffer a worker creates and
returns outlives the worker. A pickled buffer whose memory is really gone is refused
(ShmheapValueError, ERROR_INVALID_HANDLE), never taken for a newer one.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from typing import TYPE_CHECKING, Any

from .errors import WinError, raise_for
from .segment import as_array

if TYPE_CHECKING:  # for annotations only: client.py imports this module; numpy is optional
    from numpy import ndarray

    from .client import Client


class SharedBuffer:
    """Bytes in global memory at `address` (its handle), `size` long, usable with no copy from
    any process that holds it; pickle it to hand it to another process."""

    __slots__ = ("client", "address", "size", "serial", "owner", "session", "_hold", "__weakref__")

    def __init__(self, client: Client, address: int, size: int, serial: int, *, owner: bool = True) -> None:
        self.client = client
        self.address = address
        self.size = size
        self.serial = serial  # the object's number: a newer one at this address is another
        self.owner = owner  # made by this process (a received copy is not the owner)
        self.session = client.session  # the connection the hold was made on
        # This process's hold goes with the object (and every view over it): with its next
        # call, or the flusher's. The creator's object stays allocated, owned, until freed or its process exits.
        self._hold = weakref.finalize(self, client.global_release, address, serial, later=True)

    @property
    def handle(self) -> int:
        """The global object's handle, the same in every process (for the Win32 calls)."""
        return self.address  # a fixed global object's handle is its address

    def view(self) -> memoryview:
        """A writable memoryview of the buffer's bytes (no copy). It keeps this buffer, and
        so this process's hold on it, alive for as long as it (or an array over it) lives."""
        self.client.view(self.address, self.size, write=True)  # open, or raise
        # The exporter is a ctypes array that holds this buffer; its type is one per power of
        # two (ctypes keeps every array type it makes forever), and the slice is exact.
        array = _byte_array(max(self.size, 1).bit_length()).from_address(self.address)
        array.buffer = self
        return memoryview(array).cast("B")[:self.size]

    def numpy(self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None) -> ndarray:
        """A numpy array over the buffer's bytes (no copy). Needs numpy (the `numpy` extra)."""
        return as_array(self.view(), dtype, shape)

    def free(self) -> None:
        """GlobalFree: this process lets go, and no call can use the buffer any more; its
        memory goes once no other process holds it. Freeing it twice raises
        ShmheapValueError (ERROR_INVALID_HANDLE). While this process holds the buffer (the
        usual case) it does not wait for the daemon: its access to the buffer's own pages
        ends at once, and should the daemon refuse (another copy in this process freed it
        first) the error is raised by the client's next call but one, or its close."""
        if not self._hold.detach():  # its hold goes with the free: no release follows
            raise_for(WinError.ERROR_INVALID_HANDLE, f"{self!r} was freed already")
        if self.session == self.client.session:
            self.client.global_free_posted(self.address, self.size)
        else:  # held through a connection that is gone (fork, loss): free it by handle, waiting
            self.client.global_free(self.address)

    def __enter__(self) -> SharedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owner and self._hold.alive:
            self.free()

    def __reduce__(self):
        if not self._hold.alive:
            raise_for(WinError.ERROR_INVALID_HANDLE, f"{self!r} was freed")
        self.client.global_pin(self.address, self.serial, wait=self.session != self.client.session)
        return _reattach, (self.address, self.size, self.serial, self.client.path)

    def __repr__(self) -> str:
        return f"SharedBuffer(address={self.address:#x}, size={self.size})"


@functools.lru_cache(maxsize=None)
def _byte_array(bits):
    return ctypes.c_ubyte * (1 << bits)


def _reattach(address, size, serial, path):
    """Unpickling a SharedBuffer: hold it through this process's client for `path`."""
    from .client import client_for  # client.py imports this module: resolve at call time

    client = client_for(path)
    client.global_attach(address, serial)
    return SharedBuffer(client, address, size, serial, owner=False)
