"""Private heaps as Python objects: PrivateHeap and its Blocks, the page source that feeds a
private heap's allocator from the daemon, and the purger that gives freed pages back.

A private heap's allocator (shmheap/heap.py) runs in this process, so `alloc` and
`Block.free` make no round trip unless the heap's commit must change; only then does
DaemonPages ask the daemon, which records every region and commit under the heap's handle.
Pages a free leaves go back to the daemon PURGE_DELAY seconds later, from the process's purger
thread, so a loop that allocates and frees makes no request at all, and a process that frees
and then sleeps keeps no free pages committed for long.
"""

import os
import threading
import time
import weakref

from .connection import background
from .errors import ShmheapError, WinError, raise_for
from .heap import PageSource
from .segment import as_array


class DaemonPages(PageSource):
    """A private heap's page source: regions and commits from the daemon, by RPC."""

    def __init__(self, client, handle):
        self.client = client
        self.handle = handle
        self.memory = client.memory
        self.requests = 0  # sent for this heap: a steady alloc/free loop sends none

    def reserve(self, size):
        self.requests += 1
        return self.client.heap_extend(self.handle, size)

    def commit(self, address, size):
        self.requests += 1
        self.client.heap_commit(self.handle, address, size)

    def decommit(self, address, size):
        self.requests += 1
        self.client.heap_decommit(self.handle, address, size)

    def release(self, base):
        self.requests += 1
        self.client.heap_release(self.handle, base)


class PrivateHeap:
    """A heap of this process. Blocks come from an allocator running here, so `alloc` and
    `Block.free` make no round trip to the daemon unless the heap's commit must change."""

    def __init__(self, client, heap):
        self.client = client
        self._heap = heap

    @property
    def handle(self):
        return self._heap.base

    def _live(self):
        """The allocator, if this heap is still one of this process's (not destroyed, and
        not a parent's heap seen from a forked child)."""
        heap = self._heap
        if self.client.heaps.get(heap.base) is not heap:
            raise_for(WinError.ERROR_INVALID_HANDLE, "heap destroyed or of another process")
        return heap

    def alloc(self, size, *, zero=False):
        if size < 0:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "size must not be negative")
        heap = self._live()
        with heap.lock:
            return Block(self, heap.alloc(size, zero=zero))

    def validate(self):
        with self._heap.lock:
            return self._heap.validate()

    def compact(self):
        with self._heap.lock:
            return self._heap.compact()

    @property
    def committed(self):
        return self._heap.committed

    @property
    def live_blocks(self):
        return self._heap.live

    def destroy(self):
        with self._heap.lock:
            self.client.heap_destroy(self._heap)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._heap is not self.client.process_heap and self._heap.alive:
            self.destroy()


class Block:
    """A heap block: `address` and exact `size`, with zero-copy views of its bytes."""

    __slots__ = ("heap", "address", "__weakref__")

    def __init__(self, heap, address):
        self.heap = heap
        self.address = address

    @property
    def size(self):
        heap = self.heap._live()
        with heap.lock:
            return heap.size(self.address)

    def view(self):
        """A writable memoryview of the block's bytes (no copy, no round trip)."""
        return self.heap.client.memory[self.address:self.address + self.size]

    def numpy(self, dtype="uint8", shape=None):
        """A numpy array over the block's bytes (no copy). Needs numpy (the `numpy` extra)."""
        return as_array(self.view(), dtype, shape)

    def resize(self, size, *, zero=False, in_place=False):
        """HeapReAlloc: keeps the first min(old, new) bytes; the address may change unless
        `in_place`, which raises MemoryError if the block cannot grow where it is."""
        heap = self.heap._live()
        with heap.lock:
            self.address = heap.realloc(self.address, size, zero=zero, in_place_only=in_place)
        return self

    def free(self):
        heap = self.heap._live()
        with heap.lock:
            heap.free(self.address)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()

    def __repr__(self):
        return f"Block(address={self.address:#x}, size={self.size})"


class Purger:
    """One thread per process runs each heap's purge when it is due (Heap.purge_due). It
    takes a heap's lock only if it is free: a thread holding HeapLock is never waited on
    (its heap is purged on a later round)."""

    def __init__(self):
        self.heaps = weakref.WeakSet()  # heaps with a purge due
        self.wakeup = threading.Condition()
        self.thread = None

    def due(self, heap):
        """Heap.on_purge_due: `heap` has a purge due at heap.purge_due."""
        with self.wakeup:
            self.heaps.add(heap)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="shmheap purger", daemon=True)
                self.thread.start()
            self.wakeup.notify()

    def purge_now(self, besides=None):
        """Commit pressure: purge every heap with a purge due (but `besides`, whose lock the
        caller holds) whose lock is free; True if any was purged."""
        with self.wakeup:
            due = [heap for heap in self.heaps if heap is not besides and heap.purge_due is not None]
        purged = [self._purge(heap, force=True) and heap.purge_due is None for heap in due]
        return any(purged)

    def _run(self):
        while True:
            with self.wakeup:
                now = time.monotonic()
                dues = {heap: heap.purge_due for heap in self.heaps}  # read once: others may purge
                due = [heap for heap, when in dues.items() if when is None or when <= now]
                if not due:
                    self.wakeup.wait(min(dues.values()) - now if dues else None)
                    continue
            for heap in due:
                if self._purge(heap):
                    with self.wakeup:
                        if heap.purge_due is None:
                            self.heaps.discard(heap)
            time.sleep(0.01)  # heaps whose lock was taken: try again shortly, not at once

    @staticmethod
    def _purge(heap, force=False):
        """Purge `heap` unless a thread holds its lock or a HEAP_NO_SERIALIZE call is under
        way (say `purging` first, then look: see win32._unless_held); True if it needs no
        more of this round."""
        token = object()  # one per attempt: commit pressure may try while the purger works
        heap.purging.add(token)
        try:
            if heap.unlocked_calls or not heap.lock.acquire(blocking=False):
                return False
            try:
                if heap.alive and heap.purge_due is not None:
                    with background():
                        if force:
                            heap.purge()
                        else:
                            heap.purge_when_idle()
            except ShmheapError:
                pass  # the connection went: the heap went with it (Client._on_drop)
            finally:
                heap.lock.release()
        finally:
            heap.purging.discard(token)
        return True


purger = Purger()


def purge_later(heap):
    """Heap.on_purge_due for this process's heaps: this process's purger runs it."""
    purger.due(heap)


def purge_now(besides=None):
    """Heap.on_short_of_commit, and VirtualAlloc's, for this process: give back every
    purge that is due now."""
    return purger.purge_now(besides)


def _after_fork_in_child():
    global purger
    purger = Purger()  # the thread did not come along; the parent's heaps are not ours


os.register_at_fork(after_in_child=_after_fork_in_child)
