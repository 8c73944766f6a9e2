"""Private heaps as Python objects: PrivateHeap and its Blocks, the page source that feeds a
private heap's allocator from the daemon, and the purger that gives freed pages back.

A private heap's allocator (shmheap/heap.py) runs in this process, so `alloc` and
`Block.free` make no round trip unless the heap's commit must change; only then does
DaemonPages ask the daemon, which records every region and commit under the heap's handle.
Pages a free leaves go back to the daemon PURGE_DELAY seconds later, from the process's purger
thread, so a loop that allocates and frees makes no request at all, and a process that frees
and then sleeps keeps no free pages committed for long.

The same thread tells the daemon what each heap holds (live blocks, free bytes, the largest
free range) about once every REPORT_SECONDS while the heap changes, as a deferred request that
rides with the next call: only this process knows what lies inside its heaps, and
`shmheap stat` shows the latest report.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any

from .connection import background
from .errors import ShmheapError, WinError, raise_for
from .heap import PageSource
from .segment import as_array

if TYPE_CHECKING:
    from .client import Client
    from .heap import Heap


class DaemonPages(PageSource):
    """A private heap's page source: regions and commits from the daemon, by RPC."""

    def __init__(self, client: Client, handle: int) -> None:
        self.client = client
        self.handle = handle
        self.memory = client.memory
        self.requests = 0  # sent for this heap: a steady alloc/free loop sends none

    def reserve(self, size: int) -> int:
        """Reserve another region for the heap (heap_extend); returns its base."""
        self.requests += 1
        return self.client.heap_extend(self.handle, size)

    def commit(self, address: int, size: int) -> None:
        """Commit pages of one of the heap's regions."""
        self.requests += 1
        self.client.heap_commit(self.handle, address, size)

    def decommit(self, address: int, size: int) -> None:
        """Give pages of one of the heap's regions back to the daemon."""
        self.requests += 1
        self.client.heap_decommit(self.handle, address, size)

    def release(self, base: int) -> None:
        """Release one of the heap's extra regions."""
        self.requests += 1
        self.client.heap_release(self.handle, base)

    def report(self, blocks: int, free: int, largest_free: int) -> None:
        """Tell the daemon what the heap holds (a deferred request: no round trip of its own)."""
        self.client.heap_report(self.handle, blocks, free, largest_free)


class PrivateHeap:
    """A heap of this process. Blocks come from an allocator running here, so `alloc` and
    `Block.free` make no round trip to the daemon unless the heap's commit must change."""

    def __init__(self, client: Client, heap: Heap) -> None:
        self.client = client
        self._heap = heap

    @property
    def handle(self) -> int:
        """The heap's handle (HeapCreate's): the base of its first region."""
        return self._heap.base

    def _live(self):
        """The allocator, if this heap is still one of this process's (not destroyed, and
        not a parent's heap seen from a forked child)."""
        heap = self._heap
        if self.client.heaps.get(heap.base) is not heap:
            raise_for(WinError.ERROR_INVALID_HANDLE, "heap destroyed or of another process")
        return heap

    def alloc(self, size: int, *, zero: bool = False) -> Block:
        """A block of exactly `size` bytes (zero-filled with `zero`); MemoryError with the
        Win32 code if the heap cannot hold it."""
        if size < 0:
            raise_for(WinError.ERROR_INVALID_PARAMETER, "size must not be negative")
        heap = self._live()
        with heap.lock:
            return Block(self, heap.alloc(size, zero=zero))

    def validate(self) -> bool:
        """HeapValidate of the whole heap: True if its structure, tails and free fill hold."""
        with self._heap.lock:
            return self._heap.validate()

    def compact(self) -> int:
        """HeapCompact: give back free pages now; returns the largest free range."""
        with self._heap.lock:
            return self._heap.compact()

    @property
    def committed(self) -> int:
        """Bytes the heap has committed."""
        return self._heap.committed

    @property
    def live_blocks(self) -> int:
        """How many blocks are allocated."""
        return self._heap.live

    def destroy(self) -> None:
        """HeapDestroy: every page of the heap goes back, whatever is still allocated."""
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

    def __init__(self, heap: PrivateHeap, address: int) -> None:
        self.heap = heap
        self.address = address

    @property
    def size(self) -> int:
        """The block's exact size (HeapSize)."""
        heap = self.heap._live()
        with heap.lock:
            return heap.size(self.address)

    def view(self) -> memoryview:
        """A writable memoryview of the block's bytes (no copy, no round trip)."""
        return self.heap.client.memory[self.address:self.address + self.size]

    def numpy(self, dtype: Any = "uint8", shape: Any = None) -> Any:
        """A numpy array over the block's bytes (no copy). Needs numpy (the `numpy` extra)."""
        return as_array(self.view(), dtype, shape)

    def resize(self, size: int, *, zero: bool = False, in_place: bool = False) -> Block:
        """HeapReAlloc: keeps the first min(old, new) bytes; the address may change unless
        `in_place`, which raises MemoryError if the block cannot grow where it is."""
        heap = self.heap._live()
        with heap.lock:
            self.address = heap.realloc(self.address, size, zero=zero, in_place_only=in_place)
        return self

    def free(self) -> None:
        """HeapFree: the block goes back to its heap."""
        heap = self.heap._live()
        with heap.lock:
            heap.free(self.address)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()

    def __repr__(self):
        return f"Block(address={self.address:#x}, size={self.size})"


REPORT_SECONDS = 1.0  # a heap that changes tells the daemon what it holds about this often


class Purger:
    """One thread per process runs each heap's purge when it is due (Heap.purge_due), and
    reports each watched heap that changed since its last report. It takes a heap's lock
    only if it is free: a thread holding HeapLock is never waited on (its heap is purged or
    reported on a later round)."""

    def __init__(self) -> None:
        self.heaps = weakref.WeakSet()  # heaps with a purge due
        self.watched = weakref.WeakKeyDictionary()  # heap -> `changes` at its last report
        self.next_report = 0.0
        self.wakeup = threading.Condition()
        self.thread = None

    def _start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="shmheap purger", daemon=True)
            self.thread.start()
        self.wakeup.notify()

    def due(self, heap: Heap) -> None:
        """Heap.on_purge_due: `heap` has a purge due at heap.purge_due."""
        with self.wakeup:
            self.heaps.add(heap)
            self._start()

    def watch(self, heap: Heap) -> None:
        """Report `heap` to the daemon from now on, whenever it has changed."""
        with self.wakeup:
            self.watched[heap] = None
            self._start()

    def purge_now(self, besides: Heap | None = None) -> bool:
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
                report = now >= self.next_report and len(self.watched) > 0
                if not due and not report:
                    wake = min([*dues.values(), self.next_report] if self.watched else dues.values(), default=None)
                    self.wakeup.wait(None if wake is None else wake - now)
                    continue
            if report:
                self.next_report = now + REPORT_SECONDS
                try:
                    self._report()
                except Exception as exc:  # a report is not worth the thread: purges go on
                    warnings.warn(f"shmheap: heap usage reports failed: {exc!r}", RuntimeWarning, stacklevel=1)
            for heap in due:
                if self._purge(heap):
                    with self.wakeup:
                        if heap.purge_due is None:
                            self.heaps.discard(heap)
            time.sleep(0.01)  # heaps whose lock was taken: try again shortly, not at once

    def _report(self):
        with self.wakeup:  # watch() adds heaps from other threads
            watched = list(self.watched.items())
        for heap, reported in watched:
            if heap.changes == reported and heap.alive:
                continue
            with _if_free(heap) as free:
                if not free:
                    continue  # in use: next round
                alive = heap.alive
                if alive:  # queued under the lock: it goes out before any destroy of the heap
                    changes = heap.changes
                    heap.source.report(*heap.usage())
            with self.wakeup:
                if alive:
                    self.watched[heap] = changes
                else:
                    self.watched.pop(heap, None)

    @staticmethod
    def _purge(heap, force=False):
        """Purge `heap` unless it is in use; True if it needs no more of this round."""
        with _if_free(heap) as free:
            if not free:
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
        return True


@contextlib.contextmanager
def _if_free(heap):
    """Hold `heap`'s lock if no thread holds it and no HEAP_NO_SERIALIZE call is under way
    (say `purging` first, then look: see win32._unless_held); yields whether it does."""
    token = object()  # one per attempt: commit pressure may try while the purger works
    heap.purging.add(token)
    try:
        if heap.unlocked_calls or not heap.lock.acquire(blocking=False):
            yield False
            return
        try:
            yield True
        finally:
            heap.lock.release()
    finally:
        heap.purging.discard(token)


purger = Purger()


def purge_later(heap: Heap) -> None:
    """Heap.on_purge_due for this process's heaps: this process's purger runs it."""
    purger.due(heap)


def watch(heap: Heap) -> None:
    """Report `heap` to the daemon while it changes (a heap of this process's)."""
    purger.watch(heap)


def purge_now(besides: Heap | None = None) -> bool:
    """Heap.on_short_of_commit, and VirtualAlloc's, for this process: give back every
    purge that is due now."""
    return purger.purge_now(besides)


def _after_fork_in_child():
    global purger
    purger = Purger()  # the thread did not come along; the parent's heaps are not ours


os.register_at_fork(after_in_child=_after_fork_in_child)
