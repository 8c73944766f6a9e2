"""The LocalAlloc and GlobalAlloc families described once (`Api`), for the GL-* rows of
../shared/reference/win32_semantics.md section 7 that hold for both: the function names (found
with getattr on the win32 facade, prefix "Local" or "Global"), the flag constants, and the
per-flavor expected values where the rows (or the design) differ. Both families share one
implementation (shmheap/moveable.py, flavors LOCAL and GLOBAL)."""

import dataclasses

from shmheap.constants import (
    GHND, GMEM_DISCARDABLE, GMEM_DISCARDED, GMEM_FIXED, GMEM_INVALID_HANDLE, GMEM_LOCKCOUNT,
    GMEM_MODIFY, GMEM_MOVEABLE, GMEM_ZEROINIT, GPTR, LHND, LMEM_DISCARDABLE, LMEM_DISCARDED,
    LMEM_FIXED, LMEM_INVALID_HANDLE, LMEM_LOCKCOUNT, LMEM_MODIFY, LMEM_MOVEABLE, LMEM_ZEROINIT,
    LPTR,
)

from win32_checks import SENTINEL, call, expect, ok

FUNCTIONS = ("Alloc", "Free", "ReAlloc", "Size", "Lock", "Unlock", "Flags", "Handle", "Discard")

from shmheap.moveable import STAMP_SHIFT  # global handles carry a generation count above this bit


@dataclasses.dataclass(frozen=True)
class Api:
    prefix: str
    FIXED: int
    MOVEABLE: int
    ZEROINIT: int
    MODIFY: int
    DISCARDABLE: int
    DISCARDED: int
    INVALID_HANDLE: int
    LOCKCOUNT: int
    HND: int
    PTR: int
    address_mask: int  # handle -> address of its pointer slot
    zero_size_fixed: int  # GL-15: the size of a zero-size fixed block
    exact_discardable: object  # GL-34: the exact flag reported for discardable, or None
    heap_blocks_are_objects: bool  # GL-38: a process-heap block is a fixed object of this API
    heap: str  # where the data blocks live, for dirty() and data_freed()

    def __str__(self):
        return self.prefix

    def fn(self, w, name):
        return getattr(w, self.prefix + name)

    def bind(self, w):
        return Bound(self, w)

    # ---- checks shared by both families ------------------------------------------------------

    def expect_size(self, w, h):
        """Size that succeeds (0 is a valid size): the last error must stay untouched."""
        fn = self.fn(w, "Size")
        size, error = call(w, fn, h)
        assert error == SENTINEL, f"{fn.__name__}({h:#x}) set the last error to {error}"
        return size

    def expect_flags(self, w, h):
        fn = self.fn(w, "Flags")
        flags, error = call(w, fn, h)
        assert error == SENTINEL and flags != self.INVALID_HANDLE, (
            f"{fn.__name__}({h:#x}) failed: {error}")
        return flags

    def lock_count(self, w, h):
        return self.expect_flags(w, h) & self.LOCKCOUNT

    def slot(self, w, h):
        """The data pointer stored in a moveable handle's pointer slot (GL-04)."""
        return int.from_bytes(w.read(h & self.address_mask, 8), "little")

    def peek(self, w, h, size, offset=0):
        """The data of a moveable object, reached as a program must: lock, read, unlock (a
        process touches global data only while it has it locked)."""
        p = ok(w, self.fn(w, "Lock"), h)
        try:
            return w.read(p + offset, size)
        finally:
            self.fn(w, "Unlock")(h)

    def poke(self, w, h, data, offset=0):
        """Write a moveable object's data: lock, write, unlock."""
        p = ok(w, self.fn(w, "Lock"), h)
        try:
            w.write(p + offset, data)
        finally:
            self.fn(w, "Unlock")(h)

    def dirty(self, w, size, count=2, byte=0xCC):
        """Leave freed, dirty blocks of `size` in the API's heap so zero-fill checks mean
        something."""
        blocks = [ok(w, self.fn(w, "Alloc"), self.FIXED, size) for _ in range(count)]
        for p in blocks:
            w.write(p, bytes([byte]) * size)
        for p in blocks:
            expect(w, self.fn(w, "Free"), p, result=0)

    def data_freed(self, w, p):
        """Whether the data block at `p` went back to its heap."""
        if self.heap == "process":
            w.SetLastError(SENTINEL)
            return w.HeapValidate(w.GetProcessHeap(), 0, p) is False
        size, _ = call(w, self.fn(w, "Size"), p)
        return size == 0


class Bound:
    """An Api bound to a win32 facade: m.Alloc is win32.LocalAlloc or win32.GlobalAlloc, the
    constants are the API's, and the checks take no `w`."""

    def __init__(self, api, w):
        self.api = api
        self.w = w
        for name in FUNCTIONS:
            setattr(self, name, api.fn(w, name))

    def __getattr__(self, name):
        return getattr(self.api, name)

    def size(self, h):
        return self.api.expect_size(self.w, h)

    def flags(self, h):
        return self.api.expect_flags(self.w, h)

    def lock_count(self, h):
        return self.api.lock_count(self.w, h)

    def slot(self, h):
        return self.api.slot(self.w, h)

    def dirty(self, size, **kw):
        self.api.dirty(self.w, size, **kw)

    def peek(self, h, size, offset=0):
        return self.api.peek(self.w, h, size, offset)

    def poke(self, h, data, offset=0):
        self.api.poke(self.w, h, data, offset)

    def data_freed(self, p):
        return self.api.data_freed(self.w, p)


LOCAL = Api(
    "Local", FIXED=LMEM_FIXED, MOVEABLE=LMEM_MOVEABLE, ZEROINIT=LMEM_ZEROINIT, MODIFY=LMEM_MODIFY,
    DISCARDABLE=LMEM_DISCARDABLE, DISCARDED=LMEM_DISCARDED, INVALID_HANDLE=LMEM_INVALID_HANDLE,
    LOCKCOUNT=LMEM_LOCKCOUNT, HND=LHND, PTR=LPTR,
    address_mask=-1, zero_size_fixed=0, exact_discardable=None, heap_blocks_are_objects=True,
    heap="process",
)

GLOBAL = Api(
    "Global", FIXED=GMEM_FIXED, MOVEABLE=GMEM_MOVEABLE, ZEROINIT=GMEM_ZEROINIT, MODIFY=GMEM_MODIFY,
    DISCARDABLE=GMEM_DISCARDABLE, DISCARDED=GMEM_DISCARDED, INVALID_HANDLE=GMEM_INVALID_HANDLE,
    LOCKCOUNT=GMEM_LOCKCOUNT, HND=GHND, PTR=GPTR,
    address_mask=(1 << STAMP_SHIFT) - 1, zero_size_fixed=1, exact_discardable=GMEM_DISCARDABLE,
    heap_blocks_are_objects=False, heap="global",
)

FLAVORS = (LOCAL, GLOBAL)
