"""`shmheap demo`: what shmheap does, shown with real processes against the embedded daemon.

Each step prints what it did and what the daemon or the kernel says about it; a step whose
outcome is not what shmheap promises raises, so the demo doubles as a smoke test.
"""

import argparse
import ctypes
import faulthandler
import importlib.util
import multiprocessing
import os
import signal
import tempfile

import shmheap
from shmheap import win32
from shmheap.segment import SOCKET_ENV
from shmheap.win32 import (FILE_MAP_WRITE, GENERIC_READ, GENERIC_WRITE, MEM_COMMIT, MEM_DECOMMIT, MEM_MAPPED,
                           MEM_RELEASE, MEM_RESERVE, OPEN_EXISTING, PAGE_READONLY, PAGE_READWRITE)

from .cli import SOCKET_HELP

MiB = 2**20
_STATES = {0x1000: "MEM_COMMIT", 0x2000: "MEM_RESERVE", 0x10000: "MEM_FREE"}


def _say(text):
    print(text, flush=True)


def _expect(condition, what):
    if not condition:
        raise SystemExit(f"demo: unexpected outcome: {what}")


def _resident():
    return shmheap.default_client().memory_status()["resident"]


def _show_query(address):
    info = win32.VirtualQuery(address)
    _say(f"    {info.BaseAddress:#012x}  {info.RegionSize:>9,} bytes  {_STATES[info.State]:<11}"
         f"  protect={info.Protect:#x}")


def _receive(conn, what, timeout=30.0):
    if not conn.poll(timeout):
        raise SystemExit(f"demo: no answer from {what} within {timeout:.0f} s")
    return conn.recv()


def _reader(address, conn):
    """A second process: the parent's global object by pointer, with ctypes, and an answer
    written beside it."""
    from shmheap import win32 as w

    w.GlobalLock(address)  # a fixed object's handle is its pointer: the lock opens its pages here
    message = ctypes.string_at(address, 32).rstrip(b"\0")
    ctypes.memmove(address + 64, f"pid {os.getpid()} was here".encode().ljust(24), 24)
    w.GlobalUnlock(address)
    conn.send(message)


def _intruder(address):
    """A process that writes to another process's private page: an access violation."""
    from shmheap import win32 as w

    w.GetSystemInfo()  # connected, so the segment is mapped here, with nothing of the parent's open
    faulthandler.enable()  # shows where the fault happened, on stderr, before the process dies
    ctypes.memset(address, 0x55, 1)


def _hog(size, conn):
    """A process that commits and touches `size` bytes, then waits to be killed."""
    with shmheap.connect(autostart=False) as c:
        address = c.virtual_alloc(0, size, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
        c.view(address, size, write=True)[::4096] = b"\1" * (size // 4096)
        conn.send(address)
        conn.recv()


def _global_peer(handle, conn):
    """Another process: lock the parent's moveable global object by handle and answer in it."""
    from shmheap import win32 as w

    pointer = w.GlobalLock(handle)
    seen = w.read(pointer, 11)
    w.write(pointer, b"child wrote")
    w.GlobalUnlock(handle)
    mapping = w.OpenFileMapping(w.FILE_MAP_ALL_ACCESS, False, "demo-mapping")
    view = w.MapViewOfFile(mapping, w.FILE_MAP_READ, 0, 0, 0)
    conn.send((seen, w.read(view, 12)))
    w.UnmapViewOfFile(view)
    w.CloseHandle(mapping)


def _file_peer(name, conn):
    """Another process: map the named file mapping, read the parent's bytes, write its own."""
    from shmheap import win32 as w

    mapping = w.OpenFileMapping(w.FILE_MAP_WRITE, False, name)
    view = w.MapViewOfFile(mapping, w.FILE_MAP_WRITE, 0, 0, 0)
    seen = w.read(view, 20)
    w.write(view + 4096, f"page 2 by pid {os.getpid()}".encode())
    conn.send((view, seen, w.VirtualQuery(view).Type))
    w.UnmapViewOfFile(view)
    w.CloseHandle(mapping)


def _have_numpy():
    try:
        return importlib.util.find_spec("numpy") is not None
    except ValueError:  # imports of it are blocked (sys.modules["numpy"] is None)
        return False


def _clip_writer(socket_path):
    """A process that puts text on the clipboard and exits."""
    with shmheap.connect(socket_path, autostart=False) as client:
        client.clipboard.copy(f"copied by pid {os.getpid()}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap demo", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help=SOCKET_HELP + "; started there if none listens")
    args = parser.parse_args(argv)
    if args.socket:
        os.environ[SOCKET_ENV] = args.socket  # for the facade's connection and every child's
    spawn = multiprocessing.get_context("spawn")
    client = shmheap.default_client()  # autostarts the embedded daemon if none listens
    info = client.info
    _say(f"1. Connected to shmheapd pid {info['daemon_pid']} on {client.path}")
    _say(f"   segment {info['segment']}: {info['size']:,} bytes virtual, page {info['page_size']},"
         f" granularity {info['granularity']:,}; we are pid {client.pid}")

    _say("\n2. VirtualAlloc: reserve 1 MiB, commit 256 KiB of it, make one page read-only")
    base = win32.VirtualAlloc(0, MiB, MEM_RESERVE, PAGE_READWRITE)
    _expect(base, f"reserve failed, error {win32.GetLastError()}")
    win32.VirtualAlloc(base, 256 * 1024, MEM_COMMIT, PAGE_READWRITE)
    win32.VirtualProtect(base + 4096, 4096, PAGE_READONLY)
    win32.write(base, b"greetings")
    for address in (base, base + 4096, base + 8192, base + 256 * 1024):
        _show_query(address)

    _say("\n3. Addresses are pointers, the same in every process; private pages stay private")
    shared = win32.GlobalAlloc(win32.GMEM_ZEROINIT, 4096)
    ctypes.memmove(shared, b"greetings from the parent", 25)  # no facade: a plain C pointer
    parent_end, child_end = spawn.Pipe()
    reader = spawn.Process(target=_reader, args=(shared, child_end))
    reader.start()
    seen = _receive(parent_end, "the reader")
    reader.join(30)
    answer = ctypes.string_at(shared + 64, 24).decode().strip()
    _say(f"   child {reader.pid} read {seen!r} at {shared:#x}; parent reads back {answer!r}")
    _expect(seen == b"greetings from the parent" and answer.startswith(f"pid {reader.pid}"), "shared bytes")
    intruder = spawn.Process(target=_intruder, args=(base,))
    intruder.start()
    intruder.join(30)
    _say(f"   child {intruder.pid} wrote to the parent's private page {base:#x}: stopped by"
         f" signal {-intruder.exitcode} ({signal.Signals(-intruder.exitcode).name}); the page is intact")
    _expect(intruder.exitcode == -signal.SIGSEGV and win32.read(base, 9) == b"greetings", "an access violation")
    win32.GlobalFree(shared)

    _say("\n4. Commit is real memory; decommit gives it back to the machine (tmpfs st_blocks)")
    before = _resident()
    big = win32.VirtualAlloc(0, 64 * MiB, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE)
    committed = _resident()
    win32.VirtualFree(big, 64 * MiB, MEM_DECOMMIT)
    after = _resident()
    _say(f"   resident: {before / MiB:.2f} MiB -> commit 64 MiB -> {committed / MiB:.2f} MiB"
         f" -> decommit -> {after / MiB:.2f} MiB")
    _expect(committed - before == 64 * MiB and after == before, "commit/decommit accounting")
    win32.VirtualFree(big, 0, MEM_RELEASE)

    _say("\n5. A process killed with SIGKILL loses everything it held")
    parent_end, child_end = spawn.Pipe()
    hog = spawn.Process(target=_hog, args=(32 * MiB, child_end))
    hog.start()
    hog_address = _receive(parent_end, "the hog")
    held = _resident()
    os.kill(hog.pid, signal.SIGKILL)
    hog.join()
    for _ in range(500):
        if win32.VirtualQuery(hog_address).State == 0x10000:
            break
        multiprocessing.connection.wait([], 0.01)
    _say(f"   resident with child {hog.pid} alive: {held / MiB:.2f} MiB; after SIGKILL: {_resident() / MiB:.2f} MiB")
    _show_query(hog_address)
    _expect(win32.VirtualQuery(hog_address).State == 0x10000, "reclaim of a killed process")

    _say("\n6. Bad input is refused with the Win32 error and changes nothing")
    for call, args in [("VirtualAlloc", (0, 4096, MEM_COMMIT, 0x3)),  # two base protections
                       ("VirtualFree", (base, 4096, MEM_RELEASE)),  # MEM_RELEASE takes size 0
                       ("VirtualFree", (base + 4096, 0, MEM_RELEASE)),  # not the region base
                       ("VirtualProtect", (base + 512 * 1024, 4096, PAGE_READONLY))]:  # uncommitted
        result = getattr(win32, call)(*args)
        _say(f"   {call}{tuple(hex(a) for a in args)} -> {result}, GetLastError() = {win32.GetLastError()}")
    try:
        win32.view(base + 512 * 1024, 16)
    except shmheap.ShmheapPermissionError as exc:
        _say(f"   view of reserved pages -> {exc}")
    _expect(win32.read(base, 9) == b"greetings", "data intact after refused calls")
    win32.VirtualFree(base, 0, MEM_RELEASE)

    _say("\n7. GlobalAlloc and a named file mapping: handles valid in every process")
    handle = win32.GlobalAlloc(win32.GHND, 64)
    win32.write(win32.GlobalLock(handle), b"parent said")
    win32.GlobalUnlock(handle)
    mapping = win32.CreateFileMapping(win32.INVALID_HANDLE_VALUE, None, PAGE_READWRITE, 0, MiB, "demo-mapping")
    view = win32.MapViewOfFile(mapping, win32.FILE_MAP_ALL_ACCESS, 0, 0, 0)
    win32.write(view, b"mapped bytes")
    parent_end, child_end = spawn.Pipe()
    peer = spawn.Process(target=_global_peer, args=(handle, child_end))
    peer.start()
    seen, mapped = _receive(parent_end, "the global peer")
    peer.join()
    back = win32.read(win32.GlobalLock(handle), 11)
    win32.GlobalUnlock(handle)
    _say(f"   child locked handle {handle:#x}: read {seen!r}, wrote {back!r}; read the mapping: {mapped!r}")
    _expect(seen == b"parent said" and back == b"child wrote" and mapped == b"mapped bytes", "global sharing")
    win32.GlobalFree(handle)
    win32.UnmapViewOfFile(view)
    win32.CloseHandle(mapping)

    _say("\n8. A worker pool sharing numpy buffers: handed over by handle, processed in place")
    if not _have_numpy():
        _say("   skipped: numpy is not installed (pip install 'shmheap[numpy]')")
    else:
        from . import pool

        _expect(pool.run(2, 4, 1 << 18, "spawn", out=lambda line: _say("   " + line)) == 0, "pool results")

    _say("\n9. The clipboard: a process copies and exits; another pastes (only a handle crosses)")
    writer = spawn.Process(target=_clip_writer, args=(client.path,))
    writer.start()
    writer.join(30)
    _expect(writer.exitcode == 0, "the clipboard writer")
    text = client.clipboard.paste()
    formats = ", ".join(f.name for f in client.clipboard.formats())
    _say(f"   child {writer.pid} copied and exited; we pasted {text!r}")
    _say(f"   formats: {formats} (the last three made from the first, as Windows does)")
    _expect(text == f"copied by pid {writer.pid}", "the pasted text")
    client.clipboard.clear()

    _say("\n10. A file's bytes shared by two processes through a named mapping, with no copy")
    with tempfile.TemporaryDirectory(prefix="shmheap-demo-") as folder:
        path = os.path.join(folder, "shared.dat")
        with open(path, "wb") as f:
            f.write(b"file bytes on disk..".ljust(64 * 1024, b"."))
        hfile = win32.CreateFile(path, GENERIC_READ | GENERIC_WRITE, 0, None, OPEN_EXISTING, 0, None)
        name = f"demo-file-{os.getpid()}"
        mapping = win32.CreateFileMapping(hfile, None, PAGE_READWRITE, 0, 0, name)
        win32.CloseHandle(hfile)  # the mapping keeps the file open
        view = win32.MapViewOfFile(mapping, FILE_MAP_WRITE, 0, 0, 0)
        parent_end, child_end = spawn.Pipe()
        peer = spawn.Process(target=_file_peer, args=(name, child_end))
        peer.start()
        their_view, seen, their_type = _receive(parent_end, "the file peer")
        peer.join()
        wrote = win32.read(view + 4096, 64).rstrip(b"\0").rstrip(b".")
        win32.FlushViewOfFile(view, 0)
        _say(f"   {path}: mapped at {view:#x} here and at {their_view:#x} in child {peer.pid}"
             f" (Type {their_type:#x}, MEM_MAPPED)")
        _say(f"   the child read {seen!r} and wrote {wrote!r}, which the file now holds")
        win32.UnmapViewOfFile(view)
        win32.CloseHandle(mapping)
        with open(path, "rb") as f:
            in_file = f.read()[4096:4096 + len(wrote)]
        _expect(their_view == view and seen == b"file bytes on disk.." and in_file == wrote
                and their_type == MEM_MAPPED, "a file shared through a named mapping")

    _say("\n11. The layers: malloc -> HeapAlloc -> VirtualAlloc, and COM's allocator on the process heap")
    from shmheap import com, crt

    crt_heap, process_heap = crt._get_heap_handle(), win32.GetProcessHeap()
    heaps = []
    win32.GetProcessHeaps(16, heaps)
    small, large = crt.malloc(100), crt.malloc(2 * MiB)
    for what, pointer in (("malloc(100)", small), ("malloc(2 MiB)", large)):
        info = win32.VirtualQuery(pointer)
        _say(f"   {what} = {pointer:#x}: HeapSize(crt heap) {win32.HeapSize(crt_heap, 0, pointer):,};"
             f" VirtualQuery: region {info.AllocationBase:#x}, {info.RegionSize:,} bytes"
             f" {_STATES.get(info.State, hex(info.State))}")
    task = com.CoTaskMemAlloc(64)
    refused = win32.HeapFree(process_heap, 0, small)
    _say(f"   GetProcessHeaps: {', '.join(hex(h) for h in heaps)} (the process heap, then the CRT heap {crt_heap:#x})")
    _say(f"   CoTaskMemAlloc(64) = {task:#x}: HeapSize(GetProcessHeap()) {win32.HeapSize(process_heap, 0, task)}")
    _say(f"   HeapFree(GetProcessHeap(), malloc'd block) -> {refused}, GetLastError() = {win32.GetLastError()}:"
         f" a block freed on the wrong heap is refused and stays intact")
    _expect(win32.VirtualQuery(small).AllocationBase == crt_heap and crt_heap in heaps and process_heap in heaps
            and win32.VirtualQuery(large).AllocationBase not in (crt_heap, process_heap)
            and win32.HeapSize(process_heap, 0, task) == 64 and not refused and crt._msize(small) == 100,
            "the layers above the heaps")
    crt.free(small)
    crt.free(large)
    com.CoTaskMemFree(task)

    _say("\n12. What the daemon holds now (shmheap map and shmheap stat show more)")
    from . import map as page_map

    page_map_now = client.page_map()
    drawn, scale, counts = page_map.tally(page_map_now, cells=256)
    for line in page_map.render_text(drawn, scale, counts, page_map_now["page_size"], width=64):
        _say("   " + line)
    stat = client.stat()
    totals = stat["totals"]
    _say(f"   committed {totals['committed']:,} bytes, {totals['resident']:,} in tmpfs (the segment's header"
         f" page besides); what the demo freed goes back within seconds, as the heaps' purge delay says")
    me = next(p for p in stat["processes"] if p["pid"] == client.pid)
    _say(f"   this process: private memory {me['private_committed']:,} of {me['private_reserved']:,} bytes"
         f" committed, heaps {me['heap_committed']:,} of {me['heap_reserved']:,}, {me['heaps']} heaps,"
         f" {me['global_objects']} global objects")
    for heap in (h for h in stat["heaps"] if h["owner"] == client.pid):
        inside = "not reported yet" if heap["reported"] is None else (
            f"{heap['blocks']:,} blocks, {heap['free']:,} bytes free, largest free range {heap['largest_free']:,},"
            f" fragmentation {heap['fragmentation']:.2f} (as this process reported {heap['reported']:.1f} s ago)")
        _say(f"     heap {heap['name']!r}: {heap['committed']:,} bytes committed; {inside}")
    client.check()
    _say("\nDone: page table consistent. The embedded daemon exits on its own when idle.")
    return 0
