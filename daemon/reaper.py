"""The reaper: releases everything a process held when its last connection closes.

Theory of operation: a process that exits, crashes or is SIGKILLed has its sockets closed by
the operating system; the server sees end-of-file on the last one, and the kernel
(kernel.py) calls `release_process` once. The
walk goes from the layers on top to the pages below, so nothing is freed while something above
still points into it:

    1. the clipboard, if it had it open or owned it (its formats not yet rendered go); then
       global objects it allocated and did not share (GMEM_DDESHARE ones, and what it gave
       the clipboard, outlive it).
    2. its section handles and views; a section nobody holds any more is released.
    3. heaps: every heap the process created, with all its regions (HeapDestroy).
    4. private regions (VirtualAlloc), decommitted (MADV_REMOVE) and unreserved.
"""

import logging

log = logging.getLogger("shmheapd.reaper")


def release_process(pid, kernel):
    """Release what process `pid` held in each of the kernel's services, top down."""
    kernel.clipboard.release_owner(pid)
    objects = kernel.global_memory.release_owner(pid)
    sections = kernel.sections.release_owner(pid)
    heap_count = kernel.heaps.release_owner(pid)
    regions, freed = kernel.pagetable.release_owner(pid)
    if regions or heap_count or objects or sections:
        log.info("pid %d gone: released %d global objects, %d section holds, %d heaps,"
                 " %d regions, %d bytes committed", pid, objects, sections, heap_count, regions, freed)
    return regions, freed
