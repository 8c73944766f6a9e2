"""Moveable memory objects: the LocalAlloc (and GlobalAlloc) semantics over a Heap.

A fixed object is a plain heap block: its handle is its address. A moveable object has a
handle that stays put while its data may move: as on Windows, the handle is the address of
the pointer field of a 16-byte slot in a handle table (so handles are 8 mod 16, fixed
pointers 0 mod 16, and the 8 bytes at a handle hold the current data pointer, GL-04).
The table's slots live in heap blocks of TABLE_CHUNK slots; lock counts, flags and the
authoritative pointer are kept out of band in `entries`. At most MAX_HANDLES moveable objects
exist at once (GL-02). Freed slots are reused oldest first. A table made with `stamped`
(the global one, whose handles cross processes) also puts a generation count for the slot in
the handle's bits above STAMP_SHIFT, so a stale handle is recognised as stale and is never
taken for the newer object in its slot (the pointer is then at `handle & ADDRESS_MASK`).

Every operation returns (value, error): `error` None leaves the caller's last error alone,
anything else is stored (ERROR_SUCCESS included, where Windows sets it). Values and errors
follow ../shared/reference/win32_semantics.md rows GL-01..GL-40; where Local and Global
differ, `Flavor` says how.
"""

from collections import deque

from .constants import (GMEM_DDESHARE, GMEM_DISCARDABLE, GMEM_DISCARDED, GMEM_INVALID_HANDLE,
                        GMEM_MODIFY, GMEM_MOVEABLE, GMEM_ZEROINIT, LMEM_DISCARDABLE)
from .errors import ShmheapError, WinError

SLOT = 16
TABLE_CHUNK = 256
MAX_HANDLES = 65536
MAX_LOCKS = 255  # the lock count saturates (GL-07)
STAMP_SHIFT = 40  # segments stay below 1 TiB, so addresses fit under the generation stamp
ADDRESS_MASK = (1 << STAMP_SHIFT) - 1


class Flavor:
    """Where LocalAlloc and GlobalAlloc differ."""

    def __init__(self, name, discardable, zero_size_fixed, unlock_fixed, unlock_stale,
                 garbage_error):
        self.name = name
        self.discardable = discardable  # flag bits that mean discardable, as reported
        self.zero_size_fixed = zero_size_fixed  # size a 0-byte fixed object really gets (GL-15)
        self.unlock_fixed = unlock_fixed  # (value, error) of unlocking a fixed object
        self.unlock_stale = unlock_stale  # (value, error) of unlocking a freed handle
        self.garbage_error = garbage_error  # error of Flags/Handle/Lock on a non-object


LOCAL = Flavor("Local", LMEM_DISCARDABLE, 0, (False, WinError.ERROR_NOT_LOCKED),
               (False, WinError.ERROR_INVALID_HANDLE), WinError.ERROR_NOACCESS)
GLOBAL = Flavor("Global", GMEM_DISCARDABLE, 1, (True, None),
                (True, WinError.ERROR_INVALID_HANDLE), WinError.ERROR_INVALID_HANDLE)


class Entry:
    __slots__ = ("pointer", "flags", "locks")

    def __init__(self, pointer, flags):
        self.pointer = pointer
        self.flags = flags  # GMEM_DISCARDABLE / GMEM_DDESHARE bits as allocated
        self.locks = 0


class MoveableTable:
    def __init__(self, heap, flavor, *, stamped=False):
        self.heap = heap
        self.flavor = flavor
        self.stamped = stamped
        self.generations = {}  # slot -> times it has been handed out
        self.entries = {}  # handle -> Entry
        self.by_pointer = {}  # data pointer -> handle
        self.free_handles = deque()
        self.chunks = []

    # ---- classification ------------------------------------------------------------------

    def _is_block(self, value):
        try:
            self.heap.size(value)
            return True
        except ShmheapError:
            return False

    def _not_an_object(self, value):
        """The error for a value that names no object: a freed handle or a pointer into the
        heap is an invalid handle; anything else was never memory of ours."""
        if value % SLOT == 8 or self.heap._segment_of(value) is not None:
            return WinError.ERROR_INVALID_HANDLE
        return WinError.ERROR_NOACCESS

    # ---- handle slots --------------------------------------------------------------------

    def _new_handle(self):
        if not self.free_handles:
            if len(self.chunks) * TABLE_CHUNK >= MAX_HANDLES:
                raise ShmheapError(WinError.ERROR_NOT_ENOUGH_MEMORY, "the handle table is full")
            chunk = self.heap.alloc(TABLE_CHUNK * SLOT, zero=True)
            self.chunks.append(chunk)
            self.free_handles.extend(chunk + i * SLOT + 8 for i in range(TABLE_CHUNK))
        slot = self.free_handles.popleft()
        if not self.stamped:
            return slot
        generation = self.generations[slot] = self.generations.get(slot, 0) + 1
        return slot | generation << STAMP_SHIFT

    def _set_pointer(self, handle, entry, pointer):
        self.by_pointer.pop(entry.pointer, None)
        entry.pointer = pointer
        if pointer:
            self.by_pointer[pointer] = handle
        slot = handle & ADDRESS_MASK
        self.heap.memory[slot:slot + 8] = pointer.to_bytes(8, "little")

    # ---- the calls -----------------------------------------------------------------------

    def alloc(self, flags, size):
        zero = bool(flags & GMEM_ZEROINIT)
        try:
            if not flags & GMEM_MOVEABLE:
                return self.heap.alloc(size or self.flavor.zero_size_fixed, zero=zero), None
            handle = self._new_handle()
            try:
                pointer = self.heap.alloc(size, zero=zero) if size else 0
            except ShmheapError:
                self.free_handles.appendleft(handle & ADDRESS_MASK)
                raise
        except ShmheapError as exc:
            return 0, exc.winerror
        entry = self.entries[handle] = Entry(0, flags & (self.flavor.discardable | GMEM_DDESHARE))
        self._set_pointer(handle, entry, pointer)
        return handle, None

    def lock(self, handle):
        entry = self.entries.get(handle)
        if entry is not None:
            if not entry.pointer:
                return 0, WinError.ERROR_DISCARDED
            entry.locks = min(entry.locks + 1, MAX_LOCKS)
            return entry.pointer, None
        if self._is_block(handle):
            return handle, None
        error = self._not_an_object(handle)
        if error == WinError.ERROR_NOACCESS and self.flavor is LOCAL:
            return 0, None  # GL-21: LocalLock of a non-object leaves the error alone
        return 0, WinError.ERROR_INVALID_HANDLE

    def unlock(self, handle):
        entry = self.entries.get(handle)
        if entry is not None:
            if entry.locks == 0:
                return False, WinError.ERROR_NOT_LOCKED
            entry.locks -= 1
            return (True, None) if entry.locks else (False, WinError.ERROR_SUCCESS)
        if handle % SLOT == 8:
            return self.flavor.unlock_stale
        return self.flavor.unlock_fixed

    def flags(self, handle):
        entry = self.entries.get(handle)
        if entry is not None:
            return entry.locks | entry.flags | (0 if entry.pointer else GMEM_DISCARDED), None
        if self._is_block(handle):
            return 0, None
        error = self._not_an_object(handle)
        if error == WinError.ERROR_NOACCESS and self.flavor is GLOBAL:
            error = WinError.ERROR_INVALID_HANDLE
        return GMEM_INVALID_HANDLE, error

    def size(self, handle):
        entry = self.entries.get(handle)
        if entry is None and handle in self.by_pointer:
            entry = self.entries[self.by_pointer[handle]]  # GL-23: the data pointer will do
        if entry is not None:
            return (self.heap.size(entry.pointer) if entry.pointer else 0), None
        if self._is_block(handle):
            return self.heap.size(handle), None
        return 0, WinError.ERROR_INVALID_HANDLE

    def free(self, handle):
        if handle == 0:
            return 0, None
        entry = self.entries.pop(handle, None)
        if entry is not None:  # freed whatever its lock count (GL-40)
            if entry.pointer:
                self.by_pointer.pop(entry.pointer, None)
                self.heap.free(entry.pointer)
            slot = handle & ADDRESS_MASK
            self.heap.memory[slot:slot + 8] = bytes(8)
            self.free_handles.append(slot)
            return 0, None
        if self._is_block(handle) and handle not in self.by_pointer:
            self.heap.free(handle)
            return 0, None
        return handle, self._not_an_object(handle)

    def handle(self, pointer):
        if pointer in self.by_pointer:
            return self.by_pointer[pointer], None
        if pointer in self.entries or self._is_block(pointer):
            return pointer, None
        error = self._not_an_object(pointer)
        if error == WinError.ERROR_NOACCESS and self.flavor is GLOBAL:
            error = WinError.ERROR_INVALID_HANDLE
        return 0, error

    def realloc(self, handle, size, flags):
        entry = self.entries.get(handle)
        if entry is None:
            if handle == 0 or not self._is_block(handle) or handle in self.by_pointer:
                return 0, (WinError.ERROR_INVALID_HANDLE if handle == 0 else self._not_an_object(handle))
            return self._realloc_fixed(handle, size, flags)
        if flags & GMEM_MODIFY:  # change flags only; size and data untouched (GL-34)
            if flags & self.flavor.discardable:
                entry.flags |= self.flavor.discardable
            return handle, None
        if flags & self.flavor.discardable:
            return 0, WinError.ERROR_INVALID_PARAMETER  # GL-33
        zero = bool(flags & GMEM_ZEROINIT)
        if size == 0:
            if entry.locks or not flags & GMEM_MOVEABLE:
                return 0, WinError.ERROR_NOT_ENOUGH_MEMORY if entry.locks else WinError.ERROR_INVALID_PARAMETER
            if entry.pointer:  # discard (GL-36)
                self.heap.free(entry.pointer)
                self._set_pointer(handle, entry, 0)
            return handle, None
        try:
            if not entry.pointer:  # a discarded object comes back (GL-24)
                self._set_pointer(handle, entry, self.heap.alloc(size, zero=zero))
            else:
                in_place = bool(entry.locks) and not flags & GMEM_MOVEABLE  # GL-32, GL-33, GL-35
                pointer = self.heap.realloc(entry.pointer, size, zero=zero, in_place_only=in_place)
                self._set_pointer(handle, entry, pointer)
        except ShmheapError as exc:
            return 0, exc.winerror
        return handle, None

    def _realloc_fixed(self, pointer, size, flags):
        if flags & GMEM_MODIFY:
            if flags & GMEM_MOVEABLE and self.flavor is GLOBAL:
                try:
                    return self._make_moveable(pointer, flags), None  # GL-30
                except ShmheapError as exc:
                    return 0, exc.winerror
            return pointer, None  # GL-25, GL-31
        if flags & self.flavor.discardable:
            return 0, WinError.ERROR_INVALID_PARAMETER  # GL-29
        zero = bool(flags & GMEM_ZEROINIT)  # (a realloc to 0 is 0 bytes: GL-28, GL-29)
        small = self.heap.is_small(pointer)
        try:
            if flags & GMEM_MOVEABLE and small:
                # A small fixed block always relocates when resized (GL-28).
                new = self.heap.alloc(size, zero=zero)
                count = min(size, self.heap.size(pointer))
                self.heap.memory[new:new + count] = self.heap.memory[pointer:pointer + count]
                self.heap.free(pointer)
                return new, None
            if small:
                return 0, WinError.ERROR_NOT_ENOUGH_MEMORY  # GL-26, GL-27
            return self.heap.realloc(pointer, size, zero=zero,
                                     in_place_only=not flags & GMEM_MOVEABLE), None  # GL-29
        except ShmheapError as exc:
            return 0, exc.winerror

    def _make_moveable(self, pointer, flags):
        handle = self._new_handle()
        entry = self.entries[handle] = Entry(0, flags & (self.flavor.discardable | GMEM_DDESHARE))
        self._set_pointer(handle, entry, pointer)
        return handle

    def discard(self, handle):
        return self.realloc(handle, 0, GMEM_MOVEABLE)
