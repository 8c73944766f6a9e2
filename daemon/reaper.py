"""The reaper: releases everything a process held when its last connection closes.

Theory of operation: a process that exits, crashes or is SIGKILLed has its sockets closed by
the kernel; the server sees end-of-file on the last one and calls `release_process` once. The
walk goes from the layers on top to the pages below, so nothing is freed while something above
still points into it:

    1. heaps: every heap the process created, with all its regions (HeapDestroy).
    2. private regions (VirtualAlloc), decommitted (MADV_REMOVE) and unreserved.

Later layers (heaps, global blocks, sections, clipboard) insert their step above the pages.
"""

import logging

log = logging.getLogger("shmheapd.reaper")


def release_process(pid, heaps, pagetable):
    heap_count = heaps.release_owner(pid)
    regions, freed = pagetable.release_owner(pid)
    if regions or heap_count:
        log.info("pid %d gone: released %d heaps, %d regions, %d bytes committed",
                 pid, heap_count, regions, freed)
    return regions, freed
