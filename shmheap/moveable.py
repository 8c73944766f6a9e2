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

Every call returns its Win32 value on success and raises ShmheapError with the Win32 code
on failure; the Win32 facade turns that into the call's failure value and last error. Values
and errors follow ../shared/reference/win32_semantics.md rows GL-01..GL-40; where Local and
Global differ, `Flavor` says how.
"""

from collections import deque

from .constants import (GMEM_DDESHARE, GMEM_DISCARDABLE, GMEM_DISCARDED,
                        GMEM_MODIFY, GMEM_MOVEABLE, GMEM_ZEROINIT, LMEM_DISCARDABLE)
from .errors import ShmheapError, WinError, raise_for

SLOT = 16
TABLE_CHUNK = 256
MAX_HANDLES = 65536
MAX_LOCKS = 255  # the lock count saturates (GL-07)
STAMP_SHIFT = 48  # addresses are user-space pointers, below 2**47: the stamp sits above them
ADDRESS_MASK = (1 << STAMP_SHIFT) - 1
MAX_GENERATION = (1 << (64 - STAMP_SHIFT)) - 1  # a slot handed out this often is retired


class Flavor:
    """Where LocalAlloc and GlobalAlloc differ."""

    def __init__(self, name, discardable, zero_size_fixed, unlock_fixed_error, garbage_error):
        self.name = name
        self.discardable = discardable  # flag bits that mean discardable, as reported
        self.zero_size_fixed = zero_size_fixed  # size a 0-byte fixed object really gets (GL-15)
        # Unlocking a fixed object (or any non-handle): Global says TRUE, Local fails (GL-13/14)
        self.unlock_fixed_error = unlock_fixed_error
        # Flags/Handle/Lock of a value that was never memory of ours (GL-20, GL-21)
        self.garbage_error = garbage_error


LOCAL = Flavor("Local", LMEM_DISCARDABLE, 0, WinError.ERROR_NOT_LOCKED, WinError.ERROR_NOACCESS)
GLOBAL = Flavor("Global", GMEM_DISCARDABLE, 1, None, WinError.ERROR_INVALID_HANDLE)


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
        self.retired = 0  # slots whose generations are spent
        self.chunks = set()  # the heap blocks holding the slots

    # ---- classification ------------------------------------------------------------------

    def is_block(self, value):
        """True if `value` is a live block of the heap that is a fixed object (the table's
        own chunks are blocks too, but no object: freeing one would free live handles)."""
        if value in self.chunks:
            return False
        try:
            self.heap.size(value)
            return True
        except ShmheapError:
            return False

    def _not_an_object(self, value):
        """The error for a value that names no object: a freed handle or a pointer into the
        heap is an invalid handle; anything else was never memory of ours."""
        if value % SLOT == 8 or self.heap.holds(value):
            return WinError.ERROR_INVALID_HANDLE
        return WinError.ERROR_NOACCESS

    def _refuse(self, value):
        """Raise for a value that names no object, as Flags, Handle and Lock report it."""
        error = self._not_an_object(value)
        if error == WinError.ERROR_NOACCESS:
            error = self.flavor.garbage_error
        raise_for(error, f"{value:#x} is no {self.flavor.name} memory object")

    # ---- handle slots --------------------------------------------------------------------

    def _new_handle(self):
        if not self.free_handles:
            if len(self.chunks) * TABLE_CHUNK >= MAX_HANDLES:
                raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "the handle table is full")
            chunk = self.heap.alloc(TABLE_CHUNK * SLOT, zero=True)
            self.chunks.add(chunk)
            self.free_handles.extend(chunk + i * SLOT + 8 for i in range(TABLE_CHUNK))
        slot = self.free_handles.popleft()
        if not self.stamped:
            return slot
        generation = self.generations[slot] = self.generations.get(slot, 0) + 1
        return slot | generation << STAMP_SHIFT

    def _release_slot(self, slot, first=False):
        """A slot is free again (reused oldest first), unless its generation count is spent:
        then it is retired, so no stamp is ever handed out twice."""
        if self.stamped and self.generations[slot] >= MAX_GENERATION:
            self.retired += 1
        elif first:
            self.free_handles.appendleft(slot)
        else:
            self.free_handles.append(slot)

    def _set_pointer(self, handle, entry, pointer):
        """Point a moveable object at new data (allocation, realloc, discard, compaction)."""
        self.by_pointer.pop(entry.pointer, None)
        entry.pointer = pointer
        if pointer:
            self.by_pointer[pointer] = handle
        slot = handle & ADDRESS_MASK
        self.heap.memory[slot:slot + 8] = pointer.to_bytes(8, "little")

    # ---- the calls -----------------------------------------------------------------------

    def alloc(self, flags, size):
        zero = bool(flags & GMEM_ZEROINIT)
        if not flags & GMEM_MOVEABLE:
            return self.heap.alloc(size or self.flavor.zero_size_fixed, zero=zero)
        handle = self._new_handle()
        try:
            pointer = self.heap.alloc(size, zero=zero) if size else 0
        except ShmheapError:
            self._release_slot(handle & ADDRESS_MASK, first=True)
            raise
        entry = self.entries[handle] = Entry(0, flags & (self.flavor.discardable | GMEM_DDESHARE))
        self._set_pointer(handle, entry, pointer)
        return handle

    def lock(self, handle):
        """The data pointer; a moveable object's lock count goes up (saturating, GL-07)."""
        entry = self.entries.get(handle)
        if entry is not None:
            if not entry.pointer:
                raise_for(WinError.ERROR_DISCARDED, f"object {handle:#x} is discarded")
            entry.locks = min(entry.locks + 1, MAX_LOCKS)
            return entry.pointer
        if self.is_block(handle):
            return handle
        self._refuse(handle)

    def unlock(self, handle):
        """True while the object stays locked, False once its count reaches 0 (GL-06)."""
        entry = self.entries.get(handle)
        if entry is not None:
            if entry.locks == 0:
                raise_for(WinError.ERROR_NOT_LOCKED, f"object {handle:#x} is not locked")
            entry.locks -= 1
            return bool(entry.locks)
        if handle % SLOT == 8:
            raise_for(WinError.ERROR_INVALID_HANDLE, f"{handle:#x} is a freed or forged handle")
        if self.flavor.unlock_fixed_error:
            raise_for(self.flavor.unlock_fixed_error, f"{handle:#x} has no lock count")
        return True

    def flags(self, handle):
        entry = self.entries.get(handle)
        if entry is not None:
            return entry.locks | entry.flags | (0 if entry.pointer else GMEM_DISCARDED)
        if self.is_block(handle):
            return 0
        self._refuse(handle)

    def size(self, handle):
        entry = self.entries.get(handle)
        if entry is None and handle in self.by_pointer:
            entry = self.entries[self.by_pointer[handle]]  # GL-23: the data pointer will do
        if entry is not None:
            return self.heap.size(entry.pointer) if entry.pointer else 0
        if self.is_block(handle):
            return self.heap.size(handle)
        raise_for(WinError.ERROR_INVALID_HANDLE, f"{handle:#x} is no {self.flavor.name} memory object")

    def free(self, handle):
        """Free an object whatever its lock count (GL-40); freeing NULL does nothing."""
        if handle == 0:
            return
        entry = self.entries.pop(handle, None)
        if entry is not None:
            if entry.pointer:
                self.by_pointer.pop(entry.pointer, None)
                self.heap.free(entry.pointer)
            slot = handle & ADDRESS_MASK
            self.heap.memory[slot:slot + 8] = bytes(8)
            self._release_slot(slot)
            return
        if self.is_block(handle) and handle not in self.by_pointer:
            self.heap.free(handle)
            return
        raise_for(self._not_an_object(handle), f"{handle:#x} is no {self.flavor.name} memory object")

    def handle(self, pointer):
        if pointer in self.by_pointer:
            return self.by_pointer[pointer]
        if pointer in self.entries or self.is_block(pointer):
            return pointer
        self._refuse(pointer)

    def realloc(self, handle, size, flags, pinned=False):
        """`pinned`: another process holds the object, so neither its place nor its size may
        change (only a moveable object's flags, with MODIFY)."""
        entry = self.entries.get(handle)
        if pinned and not (entry is not None and flags & GMEM_MODIFY):
            raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, f"{handle:#x} is held by another process")
        if entry is None:
            if handle == 0:
                raise_for(WinError.ERROR_INVALID_HANDLE, "NULL handle")
            if not self.is_block(handle) or handle in self.by_pointer:
                raise_for(self._not_an_object(handle), f"{handle:#x} is no {self.flavor.name} memory object")
            return self._realloc_fixed(handle, size, flags)
        if flags & GMEM_MODIFY:  # change flags only; size and data untouched (GL-34)
            if flags & self.flavor.discardable:
                entry.flags |= self.flavor.discardable
            return handle
        if flags & self.flavor.discardable:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "DISCARDABLE needs MODIFY")  # GL-33
        zero = bool(flags & GMEM_ZEROINIT)
        if size == 0:
            if entry.locks:
                raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "a locked object cannot be discarded")
            if not flags & GMEM_MOVEABLE:
                raise_for(WinError.ERROR_INVALID_PARAMETER, "discarding needs MOVEABLE")
            if entry.pointer:  # discard (GL-36)
                self.heap.free(entry.pointer)
                self._set_pointer(handle, entry, 0)
            return handle
        if not entry.pointer:  # a discarded object comes back (GL-24)
            self._set_pointer(handle, entry, self.heap.alloc(size, zero=zero))
        else:
            in_place = bool(entry.locks) and not flags & GMEM_MOVEABLE  # GL-32, GL-33, GL-35
            pointer = self.heap.realloc(entry.pointer, size, zero=zero, in_place_only=in_place)
            self._set_pointer(handle, entry, pointer)
        return handle

    def _realloc_fixed(self, pointer, size, flags):
        if flags & GMEM_MODIFY:
            if flags & GMEM_MOVEABLE and self.flavor is GLOBAL:
                return self._make_moveable(pointer, flags)  # GL-30
            return pointer  # GL-25, GL-31
        if flags & self.flavor.discardable:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "DISCARDABLE needs MODIFY")  # GL-29
        zero = bool(flags & GMEM_ZEROINIT)  # (a realloc to 0 is 0 bytes: GL-28, GL-29)
        small = self.heap.is_small(pointer)
        if flags & GMEM_MOVEABLE and small:
            # A small fixed block always relocates when resized (GL-28).
            new = self.heap.alloc(size, zero=zero)
            count = min(size, self.heap.size(pointer))
            self.heap.memory[new:new + count] = self.heap.memory[pointer:pointer + count]
            self.heap.free(pointer)
            return new
        if small:
            raise_for(WinError.ERROR_NOT_ENOUGH_MEMORY, "a small fixed block resizes only with MOVEABLE")  # GL-26, GL-27
        return self.heap.realloc(pointer, size, zero=zero, in_place_only=not flags & GMEM_MOVEABLE)  # GL-29

    def _make_moveable(self, pointer, flags):
        handle = self._new_handle()
        entry = self.entries[handle] = Entry(0, flags & (self.flavor.discardable | GMEM_DDESHARE))
        self._set_pointer(handle, entry, pointer)
        return handle

    def discard(self, handle):
        return self.realloc(handle, 0, GMEM_MOVEABLE)

    def compact(self, keep=()):
        """Move every unlocked moveable object as low as the heap allows (GlobalCompact), so
        free space coalesces; contents are copied, handles stay; those in `keep` stay too.
        Returns the largest free range after the heap gave unused pages back."""
        heap = self.heap
        for handle, entry in sorted(self.entries.items(), key=lambda item: item[1].pointer):
            if entry.locks or not entry.pointer or handle in keep:
                continue
            size = heap.size(entry.pointer)
            new = heap.alloc_below(size, entry.pointer)
            if new is not None:
                heap.memory[new:new + size] = heap.memory[entry.pointer:entry.pointer + size]
                old = entry.pointer
                self._set_pointer(handle, entry, new)
                heap.free(old)
        return heap.compact()

    # ---- invariants ----------------------------------------------------------------------

    def check(self):
        """Walk the table; raise RuntimeError naming each broken invariant: every entry's
        pointer is a live block recorded in by_pointer and stored in its slot, no free slot
        is in use, and lock counts are in range."""
        problems = []
        slots_in_use = set()
        for handle, entry in self.entries.items():
            slot = handle & ADDRESS_MASK
            slots_in_use.add(slot)
            if slot % SLOT != 8 or not any(c <= slot < c + TABLE_CHUNK * SLOT for c in self.chunks):
                problems.append(f"handle {handle:#x} is not a slot of the table")
            if self.stamped and handle >> STAMP_SHIFT != self.generations.get(slot):
                problems.append(f"handle {handle:#x} carries a stale generation")
            if int.from_bytes(self.heap.memory[slot:slot + 8], "little") != entry.pointer:
                problems.append(f"slot of {handle:#x} does not hold its pointer")
            if entry.pointer and (self.by_pointer.get(entry.pointer) != handle
                                  or not self.is_block(entry.pointer)):
                problems.append(f"data of {handle:#x} is not a live, indexed block")
            if not 0 <= entry.locks <= MAX_LOCKS:
                problems.append(f"lock count of {handle:#x} out of range")
        if len(self.by_pointer) != sum(1 for e in self.entries.values() if e.pointer):
            problems.append("by_pointer holds pointers of no entry")
        if slots_in_use & set(self.free_handles):
            problems.append("a slot in use is on the free list")
        if len(slots_in_use) + len(self.free_handles) + self.retired != len(self.chunks) * TABLE_CHUNK:
            problems.append("slots in use + free + retired != table capacity")
        if problems:
            raise RuntimeError(f"{self.flavor.name} handle table inconsistent: " + "; ".join(problems[:10]))
        return {"objects": len(self.entries), "slots": len(self.chunks) * TABLE_CHUNK}
