"""`shmheap bench`: what shmheap costs next to the nearest thing without it.

Each comparison is printed as medians with the ratio shmheap / baseline:

    echo round trip   Client.echo(1) against a real shmheapd, versus a bare Unix-socket
                      msgpack echo server in another Python process (the floor for any RPC
                      written in Python on this machine).
    pipelining        echo_many of 1000 values (one pipelined write) versus 1000 single
                      echoes, per request.
    64 KiB memory     VirtualAlloc + touch + VirtualFree versus the stdlib's
                      multiprocessing.shared_memory.SharedMemory create + touch + close + unlink.
    idle clients      the echo round trip with 500 more connections open and idle, versus
                      none (the daemon's cost per request must not grow with its clients).
    concurrency       small requests per second in total from 8 client processes at once.
    heap blocks       HeapAlloc + HeapFree (or Block alloc + free) at 16 B .. 256 KiB on the
                      heaps users make without tuning (HeapCreate(0, 0, 0), GetProcessHeap(),
                      create_heap(name)) and on a heap with a 1 MiB initial commit, versus the
                      stdlib's shared-memory allocator, multiprocessing.heap.BufferWrapper; each
                      row also counts the daemon requests its timed loops sent.
    bytes             a 4-byte win32.write, and a 4-byte win32.view, of committed pages
                      versus the same slice assignment / slice of a plain memoryview (the
                      access check is the mapping's: no round trip).
    metadata          Python memory the allocator holds per live 64-byte block (tracemalloc),
                      with a million live blocks, versus BufferWrapper's per live buffer.

and sharing between real processes (spawn start method, started
before timing and kept for the whole run):

    4 KiB exchange    per exchange: allocate, write, hand to a long-lived peer process through
                      a multiprocessing Pipe, read there, reply, free. shmheap sends the pickled
                      SharedBuffer from Client.share(4096) and frees it; the baseline creates a
                      SharedMemory, sends its name (the peer attaches, reads, closes), then
                      closes and unlinks it.
    pool array        per task: a 64 MiB float64 array (8 MiB with --quick) handed to a
                      multiprocessing.Pool(1) worker that returns its sum. One-shot: allocate,
                      fill, hand over, sum, free. Steady state: one buffer allocated once and
                      refilled for every task. shmheap passes the SharedBuffer from
                      Client.share_array to pool.apply; the baselines pickle the array itself
                      through pool.apply, or pass a SharedMemory's name (one-shot: created and
                      unlinked per task; steady: created once, the worker attaching per task).
                      Each of the three is timed once per batch; shmheap's figure is set
                      against both baselines.
    batch allocation  per buffer: Client.share_many([64] * 10000), one round trip, versus
                      10,000 Client.share(64) calls. Freeing them afterwards is not timed.

and files and the C runtime:

    file read         per read of a whole 256 MiB file (16 MiB with --quick), in the page
                      cache: open, map or read, zlib.crc32 over every byte, close. shmheap:
                      CreateFile + CreateFileMapping + MapViewOfFile, crc32 of the view,
                      UnmapViewOfFile + CloseHandle; baselines: open().read(), and Python's
                      mmap.mmap of the file.
    malloc            malloc + free of 64 B (shmheap.crt, the process's CRT heap) versus
                      HeapAlloc + HeapFree on GetProcessHeap(): the layer above the heap.

Each row prints as it finishes, with its goal and whether this run met it.

The machine may be small and shared, so every figure is the median over batches (the mean
within a batch), with the fastest batch beside it; shmheap and baseline batches alternate so
drift in the machine's load hits both alike, and the collector is off while timing. The run
starts its own daemon on a private socket and stops it at the end.
"""

import argparse
import contextlib
import functools
import gc
import importlib.util
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from array import array
from multiprocessing import heap as mp_heap
from multiprocessing import shared_memory

import msgpack

import shmheap
from shmheap import crt, win32

START_TIMEOUT = 15.0  # seconds for a child server to accept
RECV_SIZE = 64 * 1024  # as shmheap's client and daemon


# ---- the two servers -------------------------------------------------------------------------

def _serve_bare_echo(path):
    """The baseline server: accept one connection, send every msgpack frame straight back."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    conn, _ = listener.accept()
    unpacker = msgpack.Unpacker(raw=False)
    buffer = bytearray(RECV_SIZE)  # reused, as the daemon does: fair to both
    view = memoryview(buffer)
    while received := conn.recv_into(buffer):
        unpacker.feed(view[:received])
        for frame in unpacker:
            conn.sendall(msgpack.packb(frame))
    return 0


def _wait_accepting(path, proc, what, log=None):
    """Poll until `path` accepts a connection; fail early if `proc` died, late at a deadline.
    The error quotes `log`, since the folder holding it is removed on the way out."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            said = open(log, errors="replace").read()[-2000:] if log else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening\n{said}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return probe
        except OSError:
            probe.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {path} within {START_TIMEOUT}s")
        time.sleep(0.01)


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- timing ----------------------------------------------------------------------------------

def _alternate(batch_functions, batches):
    """Run the batch functions in turn, `batches` rounds (after one untimed warm-up each).
    Each returns its mean in seconds per operation; returns one list of microseconds per
    function."""
    for batch in batch_functions:
        batch()
    figures = [[] for _ in batch_functions]
    gc.disable()  # a collection landing in one batch but not the other is noise, not cost
    try:
        for _ in range(batches):
            for batch, times in zip(batch_functions, figures):
                times.append(batch() * 1e6)
    finally:
        gc.enable()
    return figures


def _row(ours, theirs):
    """The figures of one table row from the microseconds of each batch."""
    shmheap_us, baseline_us = statistics.median(ours), statistics.median(theirs)
    return {"shmheap_us": shmheap_us, "shmheap_min_us": min(ours),
            "baseline_us": baseline_us, "baseline_min_us": min(theirs),
            "ratio": shmheap_us / baseline_us}


def _compare(shmheap_batch, baseline_batch, batches):
    """Run the two batch functions alternately; returns the figures for one table row."""
    return _row(*_alternate([shmheap_batch, baseline_batch], batches))


def _per_op(function, n):
    """A batch: call `function` n times; the mean seconds per call."""
    def batch():
        start = time.perf_counter()
        for _ in range(n):
            function()
        return (time.perf_counter() - start) / n
    return batch


def _bare_echo_call(sock):
    """One round trip to the bare server, done the way Connection.call does it: pack one request,
    send it, read until one whole reply has been unpacked."""
    unpacker = msgpack.Unpacker(raw=False)
    packer = msgpack.Packer()
    buffer = bytearray(RECV_SIZE)
    view = memoryview(buffer)
    msgid = 0

    def call():
        nonlocal msgid
        msgid += 1
        sock.sendall(packer.pack([msgid, "echo", 1]))
        while True:
            unpacker.feed(view[:sock.recv_into(buffer)])
            for reply in unpacker:
                return reply
    return call


def _pipelined(client, n):
    values = list(range(n))

    def batch():
        start = time.perf_counter()
        client.echo_many(values)
        return (time.perf_counter() - start) / n
    return batch


def _singles(client, n):
    def batch():
        start = time.perf_counter()
        for i in range(n):
            client.echo(i)
        return (time.perf_counter() - start) / n
    return batch


def _virtual_alloc_pair():
    address = win32.VirtualAlloc(0, 65536, win32.MEM_COMMIT | win32.MEM_RESERVE, win32.PAGE_READWRITE)
    if not address:
        raise RuntimeError(f"VirtualAlloc failed: error {win32.GetLastError()}")
    with win32.view(address, 1, write=True) as view:  # checked by the mapping: no round trip
        view[0] = 1
    if not win32.VirtualFree(address, 0, win32.MEM_RELEASE):
        raise RuntimeError(f"VirtualFree failed: error {win32.GetLastError()}")


def _shared_memory_pair():
    shm = shared_memory.SharedMemory(create=True, size=65536)
    shm.buf[0] = 1
    shm.close()
    shm.unlink()


def _byte_rows(n, batches):
    """A 4-byte write and a 4-byte view through the facade, against a plain memoryview."""
    address = win32.VirtualAlloc(0, 65536, win32.MEM_COMMIT | win32.MEM_RESERVE, win32.PAGE_READWRITE)
    plain = memoryview(bytearray(65536))
    payload = b"abcd"

    def facade_write():
        win32.write(address + 64, payload)

    def plain_write():
        plain[64:68] = payload

    rows = {"write4": _compare(_per_op(facade_write, n), _per_op(plain_write, n), batches),
            "view4": _compare(_per_op(lambda: win32.view(address + 64, 4), n),
                              _per_op(lambda: plain[64:68], n), batches)}
    win32.VirtualFree(address, 0, win32.MEM_RELEASE)
    return rows


def _buffer_wrapper_pair(size):
    def pair():
        wrapper = mp_heap.BufferWrapper(size)
        del wrapper  # its finalizer returns the block to the arena
    return pair


def _metadata_per_block(make, count):
    """Bytes of Python memory that `count` live objects from `make()` hold, per object,
    less what holding their handles costs the caller (ints in an array, or a list)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = make(count)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    holder = held.itemsize * len(held) + 64 if isinstance(held, array) else sys.getsizeof(held)
    return held, (after - before - holder) / count


def _metadata(client, count, baseline_count):
    heap = client.heap_create(0, 0, 0)

    def fill(n):
        addresses = array("Q", bytes(8 * n))
        for i in range(n):
            addresses[i] = heap.alloc(64)
        return addresses

    addresses, ours = _metadata_per_block(fill, count)
    for address in addresses:
        heap.free(address)
    client.heap_destroy(heap)
    wrappers, theirs = _metadata_per_block(
        lambda n: [mp_heap.BufferWrapper(64) for _ in range(n)], baseline_count)
    del wrappers
    return {"shmheap_bytes": ours, "baseline_bytes": theirs, "count": count,
            "baseline_count": baseline_count, "ratio": ours / theirs}


# ---- sharing between processes --------------------------------------------------------------
#
# The peers and the pool worker run in spawn children, so what they run is module-level
# functions found by import. Received SharedBuffers reattach in the child through its own
# mapping of the segment (one connection, opened on the first buffer: during the warm-up).
#
# SharedMemory and the resource tracker (Python 3.11): attaching by name registers the name
# with the resource tracker, and the usual advice is to unregister it again in the attaching
# process (resource_tracker.unregister(shm._name, "shared_memory")) so that process's tracker
# does not unlink the segment, with a "leaked shared_memory" warning, when it exits. That
# advice is for a process with a tracker of its own. A spawn child shares its parent's tracker
# (multiprocessing hands it the tracker's pipe): the child's REGISTER of a name the parent
# created is a no-op, and the parent's unlink() unregisters it once. Were the child to
# unregister too, the parent's unlink would send a second UNREGISTER for a name the tracker no
# longer holds, and the tracker prints a KeyError traceback for every exchange. So the children
# below attach, read and close, and never unregister: that is what keeps the run quiet.

SHARE_SIZE = 4096  # bytes handed over per exchange in the two-process row
SHARE_MANY_SIZE = 64  # bytes per buffer in the batch-allocation row
SPAWN = multiprocessing.get_context("spawn")  # what a pool on any platform can rely on


def _peer_read_shared_buffers(conn):
    """The shmheap side's peer: Connection.recv unpickles each SharedBuffer (reattaching it,
    no round trip); read its bytes and reply with the first. None ends it."""
    while (buffer := conn.recv()) is not None:
        data = bytes(buffer.view())
        conn.send(data[0])


def _peer_read_shared_memory(conn):
    """The baseline's peer: attach each SharedMemory by name, read its bytes, close it (the
    creator unlinks; no unregister, see above) and reply with the first. None ends it."""
    while (name := conn.recv()) is not None:
        shm = shared_memory.SharedMemory(name)
        data = bytes(shm.buf[:SHARE_SIZE])
        shm.close()
        conn.send(data[0])


def _start_peer(stack, target):
    """A long-lived spawn child running `target(conn)`; stopped when `stack` closes."""
    ours, theirs = SPAWN.Pipe()
    proc = SPAWN.Process(target=target, args=(theirs,), daemon=True)
    proc.start()
    theirs.close()
    stack.callback(_stop_peer, proc, ours)
    return ours


def _stop_peer(proc, conn):
    try:
        conn.send(None)
    except OSError:
        pass  # it is gone already
    proc.join(10)
    if proc.is_alive():
        proc.terminate()
        proc.join()
    conn.close()


def _tags():
    """Yields a tag (1..255) for each exchange; the payload's first byte is set to it and the
    peer replies with the first byte it read, so a stale or unshared read fails loudly."""
    while True:
        yield from range(1, 256)


def _check_reply(reply, tag):
    if reply != tag:
        raise RuntimeError(f"the peer read {reply!r}, not the {tag} that was written")


SHARE_PAYLOAD = bytes(range(256)) * (SHARE_SIZE // 256)


def _share_exchange(client, conn):
    """One shmheap exchange: allocate, write, send the pickled SharedBuffer, peer reads, free."""
    tags = _tags()

    def exchange():
        tag = next(tags)
        buffer = client.share(SHARE_SIZE)
        view = buffer.view()
        view[:] = SHARE_PAYLOAD
        view[0] = tag
        conn.send(buffer)
        _check_reply(conn.recv(), tag)
        buffer.free()
    return exchange


def _shared_memory_exchange(conn):
    """One baseline exchange: create, write, send the name, peer attaches and reads; close,
    unlink."""
    tags = _tags()

    def exchange():
        tag = next(tags)
        shm = shared_memory.SharedMemory(create=True, size=SHARE_SIZE)
        shm.buf[:SHARE_SIZE] = SHARE_PAYLOAD
        shm.buf[0] = tag
        conn.send(shm.name)
        reply = conn.recv()
        shm.close()
        shm.unlink()
        _check_reply(reply, tag)
    return exchange


# The pool worker's side: each returns the sum of the float64 values it was handed.

def _sum_shared_buffer(buffer):
    """A SharedBuffer, reattached on unpickling: sum its bytes where they are, no copy."""
    return float(buffer.numpy("float64").sum())


def _sum_array(array):
    """An array pickled whole through the pool's pipe."""
    return float(array.sum())


def _sum_shared_memory(name, count):
    """A SharedMemory by name: attach, sum, close (the parent unlinks; no unregister, see
    above)."""
    import numpy

    shm = shared_memory.SharedMemory(name)
    array = numpy.ndarray((count,), "float64", buffer=shm.buf)
    total = float(array.sum())
    del array  # close() refuses while an array still exports the mapping
    shm.close()
    return total


def _per_task(task, n, count):
    """A batch: n tasks, each handed a fill value (1..7, so every sum is exact) and checked."""
    values = itertools.cycle(range(1, 8))

    def batch():
        start = time.perf_counter()
        for _ in range(n):
            value = next(values)
            total = task(value)
            if total != value * count:
                raise RuntimeError(f"the worker summed {total}, expected {value * count}")
        return (time.perf_counter() - start) / n
    return batch


def _one_shot_tasks(client, pool, count):
    """Per task: allocate, fill, hand over, the worker sums, free. shmheap, pickle, SharedMemory."""
    import numpy

    def shmheap_task(value):
        buffer, array = client.share_array((count,), "float64")
        array.fill(value)
        del array
        total = pool.apply(_sum_shared_buffer, (buffer,))
        buffer.free()
        return total

    def pickle_task(value):
        array = numpy.empty(count, "float64")
        array.fill(value)
        return pool.apply(_sum_array, (array,))

    def shared_memory_task(value):
        shm = shared_memory.SharedMemory(create=True, size=count * 8)
        array = numpy.ndarray((count,), "float64", buffer=shm.buf)
        array.fill(value)
        del array
        total = pool.apply(_sum_shared_memory, (shm.name, count))
        shm.close()
        shm.unlink()
        return total
    return shmheap_task, pickle_task, shared_memory_task


def _steady_tasks(client, pool, count, stack):
    """Per task: refill one buffer allocated once (freed when `stack` closes) and hand it over."""
    import numpy

    buffer, shared_array = client.share_array((count,), "float64")
    stack.callback(buffer.free)

    def shmheap_task(value):
        shared_array.fill(value)
        return pool.apply(_sum_shared_buffer, (buffer,))

    private_array = numpy.empty(count, "float64")

    def pickle_task(value):
        private_array.fill(value)
        return pool.apply(_sum_array, (private_array,))

    shm = shared_memory.SharedMemory(create=True, size=count * 8)
    arrays = [numpy.ndarray((count,), "float64", buffer=shm.buf)]

    def release():
        arrays.clear()  # close() refuses while an array still exports the mapping
        shm.close()
        shm.unlink()
    stack.callback(release)

    def shared_memory_task(value):
        arrays[0].fill(value)
        return pool.apply(_sum_shared_memory, (shm.name, count))
    return shmheap_task, pickle_task, shared_memory_task


def _pool_rows(client, pool, count, tasks, batches):
    """The four pool rows. Each method is timed once per batch (shmheap, pickle, SharedMemory,
    in turn); shmheap's figures are set against both baselines. The steady-state buffers live
    only while their rows are timed."""
    one_shot = _alternate([_per_task(task, tasks, count)
                           for task in _one_shot_tasks(client, pool, count)], batches)
    with contextlib.ExitStack() as stack:
        steady = _alternate([_per_task(task, tasks, count)
                             for task in _steady_tasks(client, pool, count, stack)], batches)
    results = {}
    for mode, (ours, pickled, shm) in (("oneshot", one_shot), ("steady", steady)):
        results[f"pool_{mode}_pickle"] = _row(ours, pickled)
        results[f"pool_{mode}_shm"] = _row(ours, shm)
    return results


def _share_many_batch(client, n):
    """A batch: n buffers in one share_many round trip; the mean seconds per buffer. Freeing
    them afterwards is not timed."""
    def batch():
        start = time.perf_counter()
        buffers = client.share_many([SHARE_MANY_SIZE] * n)
        elapsed = time.perf_counter() - start
        client.free_many(buffers)
        return elapsed / n
    return batch


def _share_singles_batch(client, n):
    """A batch: n single share calls; the mean seconds per buffer (freeing not timed)."""
    def batch():
        start = time.perf_counter()
        buffers = [client.share(SHARE_MANY_SIZE) for _ in range(n)]
        elapsed = time.perf_counter() - start
        client.free_many(buffers)
        return elapsed / n
    return batch


def _have_numpy():
    return importlib.util.find_spec("numpy") is not None


# ---- default heaps, and many clients ------------------------------------------------------

HEAP_SIZES = [16, 64, 1024, 4096, 64 * 1024, 256 * 1024]
HEAP_FORMS = [
    # key, label: the heaps users get without tuning first, the sized one beside them
    ("create", "HeapCreate(0,0,0)"),
    ("process", "GetProcessHeap()"),
    ("block", "create_heap(name) Block"),
    ("sized", "HeapCreate(0,1MiB,0)"),
]


def _size_label(size):
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def _heap_forms(client):
    """form key -> (pair(size) factory, the heap's page source) over heaps made the way
    users make them; the page source counts the daemon requests made for its heap."""
    created, sized = win32.HeapCreate(0, 0, 0), win32.HeapCreate(0, 1 << 20, 0)
    process = win32.GetProcessHeap()
    named = client.create_heap("bench")

    def facade(heap):
        return (lambda size: lambda: win32.HeapFree(heap, 0, win32.HeapAlloc(heap, 0, size)),
                client.heaps[heap].source)

    def block_pair(size):
        return lambda: named.alloc(size).free()
    return {"create": facade(created), "process": facade(process),
            "block": (block_pair, client.heaps[named.handle].source), "sized": facade(sized)}


def _heap_row(pair, source, size, n, batches):
    """One default-heap row, with the daemon requests its timed loops sent for the heap
    (none is the goal)."""
    ours, theirs = _per_op(pair, n), _per_op(_buffer_wrapper_pair(size), n)
    ours()  # the warm-up: the first pair may commit
    before = source.requests
    row = _compare(ours, theirs, batches)
    row["requests"] = source.requests - before
    return row


def _echo_for(path, seconds, start, counts):
    """A concurrent client: echo as fast as it can for `seconds` after `start` is set."""
    client = shmheap.connect(path, autostart=False)
    start.wait(60)
    deadline = time.perf_counter() + seconds
    done = 0
    while time.perf_counter() < deadline:
        client.echo(done)
        done += 1
    counts.put(done)
    client.close()


def _concurrent_rate(path, procs, seconds):
    """Small requests per second, in total, from `procs` client processes at once."""
    start, counts = SPAWN.Event(), SPAWN.Queue()
    children = [SPAWN.Process(target=_echo_for, args=(path, seconds, start, counts)) for _ in range(procs)]
    for child in children:
        child.start()
    time.sleep(1.0)  # let them connect: their start-up is not timed
    start.set()
    total = sum(counts.get(timeout=60 + seconds) for _ in children)
    for child in children:
        child.join(30)
    return total / seconds


def _idle_clients_row(client, path, idle, n, batches):
    """The echo round trip with `idle` more connections open (and idle) against none."""
    from shmheap.connection import Connection

    quiet = _per_op(lambda: client.echo(1), n)
    opened = []
    crowded_figures, quiet_figures = [], []
    try:
        for _ in range(batches):
            quiet_figures.append(quiet() * 1e6)
            while len(opened) < idle:
                connection = Connection(path, autostart=False)
                connection.ensure_open()
                opened.append(connection)
            crowded_figures.append(quiet() * 1e6)
            for connection in opened:
                connection.close()
            opened.clear()
    finally:
        for connection in opened:
            connection.close()
    return _row(crowded_figures, quiet_figures)


# ---- the clipboard between two processes ----------------------------------------------------
#
# One exchange: the parent asks a peer (over a pipe) to hand over `size` bytes, then reads them
# as bytes. shmheap: the peer copies them to the clipboard, the parent pastes. The baselines:
# the bytes sent through the pipe, or written to a SharedMemory whose name is sent.

CLIP_FORMAT = "application/x-shmheap-bench"


def _peer_clip(socket_path, conn):
    """The shmheap side's peer: copy `size` bytes to the clipboard per request."""
    client = shmheap.connect(socket_path, autostart=False)
    while (size := conn.recv()) is not None:
        client.clipboard.copy(_payload(size), format=CLIP_FORMAT)
        conn.send(True)
    client.close()


def _peer_clip_pipe(conn):
    while (size := conn.recv()) is not None:
        conn.send_bytes(_payload(size))


def _peer_clip_shared_memory(conn):
    """SharedMemory per exchange: create, write, send the name; the reader unlinks."""
    while (size := conn.recv()) is not None:
        shm = shared_memory.SharedMemory(create=True, size=size)
        shm.buf[:size] = _payload(size)
        conn.send(shm.name)
        shm.close()


@functools.lru_cache(maxsize=2)
def _payload(size):
    return bytes(range(256)) * (size // 256)


def _clip_rows(client, peers, size, n, batches):
    """(shmheap vs pipe, shmheap vs SharedMemory) rows for exchanges of `size` bytes."""
    clip, pipe, shm = peers

    def ours():
        clip.send(size)
        conn_recv(clip)
        _check_size(client.clipboard.paste(CLIP_FORMAT), size)

    def through_pipe():
        pipe.send(size)
        _check_size(pipe.recv_bytes(), size)

    def through_shared_memory():
        shm.send(size)
        block = shared_memory.SharedMemory(conn_recv(shm))
        _check_size(bytes(block.buf[:size]), size)
        block.close()
        block.unlink()
    mine, piped, shared = _alternate([_per_op(ours, n), _per_op(through_pipe, n),
                                      _per_op(through_shared_memory, n)], batches)
    return _row(mine, piped), _row(mine, shared)


def conn_recv(conn, timeout=60.0):
    if not conn.poll(timeout):
        raise RuntimeError(f"no answer from the peer within {timeout:.0f} s")
    return conn.recv()


def _check_size(data, size):
    if len(data) != size or data[-1] != 255:
        raise RuntimeError(f"the exchange delivered {len(data)} bytes, not the {size} sent")


# ---- files and the C runtime -----------------------------------------------------------------

def _file_rows(folder, mib, batches):
    """Read a whole file (in the page cache) three ways, alternately: through a mapped view,
    with open().read(), with mmap.mmap; zlib.crc32 reads every byte of each. Returns the
    rows against each baseline, from the same run."""
    import mmap
    import zlib

    path = os.path.join(folder, "read.dat")
    chunk = bytes(range(256)) * 4096
    with open(path, "wb") as f:
        for _ in range(mib * 2**20 // len(chunk)):
            f.write(chunk)
    expected = zlib.crc32(open(path, "rb").read())

    def mapped_view():
        handle = win32.CreateFile(path, win32.GENERIC_READ, win32.FILE_SHARE_READ, None, win32.OPEN_EXISTING, 0, None)
        mapping = win32.CreateFileMapping(handle, None, win32.PAGE_READONLY, 0, 0, None)
        win32.CloseHandle(handle)
        view = win32.MapViewOfFile(mapping, win32.FILE_MAP_READ, 0, 0, 0)
        crc = zlib.crc32(win32.view(view, mib * 2**20))
        win32.UnmapViewOfFile(view)
        win32.CloseHandle(mapping)
        return crc

    def read_all():
        with open(path, "rb") as f:
            return zlib.crc32(f.read())

    def python_mmap():
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return zlib.crc32(mapped)

    def timed(read):
        def batch():
            start = time.perf_counter()
            if read() != expected:
                raise RuntimeError("a file read gave other bytes")
            return time.perf_counter() - start
        return batch

    ours, by_read, by_mmap = _alternate([timed(mapped_view), timed(read_all), timed(python_mmap)], batches)
    os.unlink(path)
    return {"file_read": _row(ours, by_read), "file_mmap": _row(ours, by_mmap)}


def _malloc_pair():
    crt.free(crt.malloc(64))


def _heap_alloc_pair():
    heap = win32.GetProcessHeap()
    win32.HeapFree(heap, 0, win32.HeapAlloc(heap, 0, 64))


# ---- the run ---------------------------------------------------------------------------------

# key, operation, what is compared, goal: the ratio at or below which it is met (None: none)
ROWS = [
    ("echo", "echo round trip", "Client.echo vs bare msgpack socket", 1.5),
    ("pipeline", "echo x1000, per request", "echo_many vs 1000 x Client.echo", None),
    ("idle500", "echo, 500 idle clients", "with them vs without", 1.10),
    ("alloc64k", "64 KiB alloc+touch+free", "VirtualAlloc/Free vs SharedMemory", 2.0),
    ("write4", "4 B write", "win32.write vs memoryview[a:b] = ", 3.0),
    ("view4", "4 B view", "win32.view vs memoryview[a:b]", 3.0),
]


def rows(settings):
    """Every timed row, in the order they run and print (labels carry this run's sizes)."""
    array = f"{settings['pool_mib']} MiB to pool,"
    heap_rows = [(f"heap_{form}_{size}", f"{_size_label(size)} alloc+free", f"{label} vs BufferWrapper", 0.25)
                 for size in HEAP_SIZES for form, label in HEAP_FORMS]
    return ROWS + heap_rows + [
        ("share4k", "4 KiB share, per exchange", "share+Pipe vs SharedMemory+name", 0.5),
        ("clip1k_pipe", "1 KiB copy+paste", "clipboard vs Pipe", None),
        ("clip1k_shm", "1 KiB copy+paste", "clipboard vs SharedMemory", None),
        ("clip64m_pipe", f"{settings['clip_mib']} MiB copy+paste", "clipboard vs Pipe", None),
        ("clip64m_shm", f"{settings['clip_mib']} MiB copy+paste", "clipboard vs SharedMemory", None),
        ("pool_oneshot_pickle", f"{array} one-shot", "SharedBuffer vs pickled array", None),
        ("pool_oneshot_shm", f"{array} one-shot", "SharedBuffer vs SharedMemory", 1.0),
        ("pool_steady_pickle", f"{array} steady", "SharedBuffer vs pickled array", 1 / 20),
        ("pool_steady_shm", f"{array} steady", "SharedBuffer vs SharedMemory", 1.0),
        ("share_many", f"{settings['share_many_n']:,} shares, per buffer",
         f"share_many vs {settings['share_many_n']:,} x share", None),
        ("file_read", f"{settings['file_mib']} MiB file read", "mapped view vs open().read()", None),
        ("file_mmap", f"{settings['file_mib']} MiB file read", "mapped view vs mmap.mmap", None),
        ("malloc64", "64 B malloc+free", "crt.malloc/free vs HeapAlloc/HeapFree", None),
    ]


CONCURRENT_GOAL = 20_000  # small requests per second from 8 client processes at once


def run(folder, *, batches, echo_n, pipeline_n, alloc_n, heap_n, live_blocks, baseline_live,
        share_n, pool_mib, pool_tasks, pool_batches, share_many_n, concurrent_procs,
        concurrent_seconds, idle_clients, clip_n, clip_big_n, clip_mib, file_mib):
    """Yield (key, figures) for each row as it finishes."""
    daemon_sock = os.path.join(folder, "d.sock")
    bare_sock = os.path.join(folder, "bare.sock")
    procs = []
    previous_env = os.environ.get("SHMHEAP_SOCKET")
    try:
        log_path = os.path.join(folder, "shmheapd.log")
        with open(log_path, "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shmheapd", "--socket", daemon_sock, "--size", "1G"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        _wait_accepting(daemon_sock, procs[-1], "shmheapd", log_path).close()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "shmheap_clients.bench", "--serve-bare-echo", bare_sock],
            stdin=subprocess.DEVNULL))
        bare = _wait_accepting(bare_sock, procs[-1], "the bare echo server")

        # The facade's default connection must be ours, not an autostarted daemon's.
        os.environ["SHMHEAP_SOCKET"] = daemon_sock
        shmheap.close_default()
        client = shmheap.default_client()

        with bare:
            yield "echo", _compare(_per_op(lambda: client.echo(1), echo_n),
                                   _per_op(_bare_echo_call(bare), echo_n), batches)
        yield "pipeline", _compare(_pipelined(client, pipeline_n), _singles(client, pipeline_n), batches)
        yield "idle500", _idle_clients_row(client, daemon_sock, idle_clients, echo_n, batches)
        yield "concurrent", {"ops_per_second": _concurrent_rate(daemon_sock, concurrent_procs, concurrent_seconds),
                             "procs": concurrent_procs}
        yield "alloc64k", _compare(_per_op(_virtual_alloc_pair, alloc_n),
                                   _per_op(_shared_memory_pair, alloc_n), batches)
        yield from _byte_rows(heap_n * 4, batches).items()
        forms = _heap_forms(client)
        for size in HEAP_SIZES:
            for form, _ in HEAP_FORMS:
                make_pair, source = forms[form]
                yield f"heap_{form}_{size}", _heap_row(make_pair(size), source, size, heap_n, batches)

        # Sharing between processes. The children are started here and waited for by the
        # warm-up batch (their start-up is never timed), and stopped before the daemon is.
        with contextlib.ExitStack() as children:
            peer = _start_peer(children, _peer_read_shared_buffers)
            baseline_peer = _start_peer(children, _peer_read_shared_memory)
            yield "share4k", _compare(_per_op(_share_exchange(client, peer), share_n),
                                      _per_op(_shared_memory_exchange(baseline_peer), share_n), batches)
        with contextlib.ExitStack() as children:
            peers = (_start_peer(children, functools.partial(_peer_clip, daemon_sock)),
                     _start_peer(children, _peer_clip_pipe), _start_peer(children, _peer_clip_shared_memory))
            for key, size, n in (("clip1k", 1024, clip_n), ("clip64m", clip_mib * 2**20, clip_big_n)):
                vs_pipe, vs_shm = _clip_rows(client, peers, size, n, batches)
                yield f"{key}_pipe", vs_pipe
                yield f"{key}_shm", vs_shm
        if _have_numpy():
            with SPAWN.Pool(1) as pool:
                yield from _pool_rows(client, pool, pool_mib * 2**20 // 8, pool_tasks, pool_batches).items()
        yield "share_many", _compare(_share_many_batch(client, share_many_n),
                                     _share_singles_batch(client, share_many_n), batches)
        yield from _file_rows(folder, file_mib, batches).items()
        yield "malloc64", _compare(_per_op(_malloc_pair, heap_n), _per_op(_heap_alloc_pair, heap_n), batches)
        yield "metadata", _metadata(client, live_blocks, baseline_live)
    finally:
        shmheap.close_default()
        if previous_env is None:
            os.environ.pop("SHMHEAP_SOCKET", None)
        else:
            os.environ["SHMHEAP_SOCKET"] = previous_env
        for proc in reversed(procs):
            _stop(proc)


def _us(figure):
    """Microseconds as printed: two decimals, none from a millisecond up (the column holds
    a 64 MiB task's figure)."""
    return f"{figure:.2f}" if figure < 1000 else f"{figure:.0f}"


def _verdict(ratio, goal):
    if goal is None:
        return ""
    return f"goal <= {goal:.3g}: {'met' if ratio <= goal else 'NOT met'}"


def print_header(settings):
    print(f"shmheap bench: microseconds per operation, median of {settings['batches']} batches"
          f" ({settings['pool_batches']} for the pool rows; fastest batch in brackets);"
          f" ratio = shmheap / baseline, lower is better", flush=True)
    print(f"{'operation':<25} {'shmheap vs baseline':<40} {'shmheap':>16} {'baseline':>16} {'ratio':>7}  goal",
          flush=True)


def print_row(key, row, labels):
    """One finished row, as it finishes."""
    if key == "metadata":
        print(f"{'metadata per live block':<25} {'64 B blocks vs BufferWrapper(64)':<40}"
              f" {row['shmheap_bytes']:>14.1f} B {row['baseline_bytes']:>14.1f} B {row['ratio']:>7.3f}", flush=True)
        return
    if key == "concurrent":
        rate = row["ops_per_second"]
        print(f"{'small requests/s':<25} {str(row['procs']) + ' client processes at once':<40}"
              f" {rate:>16,.0f} {'':>16} {'':>7}  goal >= {CONCURRENT_GOAL:,}/s:"
              f" {'met' if rate >= CONCURRENT_GOAL else 'NOT met'}", flush=True)
        return
    operation, versus, goal = labels[key]
    ours = f"{_us(row['shmheap_us'])} ({_us(row['shmheap_min_us'])})"
    theirs = f"{_us(row['baseline_us'])} ({_us(row['baseline_min_us'])})"
    verdict = _verdict(row["ratio"], goal)
    if "requests" in row:
        verdict += f", {row['requests']} daemon requests" + ("" if not row["requests"] else " (goal: none)")
    print(f"{operation:<25} {versus:<40} {ours:>16} {theirs:>16} {row['ratio']:>7.2f}  {verdict}", flush=True)


def print_footer(results, settings):
    print(f"batches of {settings['echo_n']} round trips, {settings['pipeline_n']} pipelined requests,"
          f" {settings['alloc_n']} VirtualAlloc pairs, {settings['heap_n']} heap pairs,"
          f" {settings['share_n']} exchanges, {settings['share_many_n']:,} shared buffers;"
          f" metadata with {results['metadata']['count']:,} live blocks vs"
          f" {results['metadata']['baseline_count']:,} buffers")
    print("heap rows: alloc+free pairs on heaps made as users make them (no sizes given), the"
          " sized heap beside them; the goal is 4x faster than BufferWrapper with no daemon request")
    print(f"clipboard rows: a peer process copies, this one pastes (bytes in hand at the end);"
          f" Pipe: the peer sends the bytes; SharedMemory: the peer writes a new one and sends its"
          f" name, this one reads it and unlinks ({settings['clip_n']} and {settings['clip_big_n']}"
          f" exchanges a batch)")
    if "pool_steady_shm" not in results:
        print("pool rows skipped: they need numpy (the numpy extra)")
        return
    count = settings["pool_mib"] * 2**20 // 8
    print(f"pool rows: arrays of {settings['pool_mib']} MiB ({count:,} float64), batches of"
          f" {settings['pool_tasks']} tasks to one spawn worker; shmheap's one-shot and steady"
          f" figures are each measured once and set against both baselines")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (a smoke test, ~seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--serve-bare-echo", metavar="SOCKET", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.serve_bare_echo:
        return _serve_bare_echo(args.serve_bare_echo)
    if args.json:
        try:  # fail now, not after the run
            with open(args.json, "a"):
                pass
        except OSError as exc:
            print(f"shmheap bench: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
            return 1

    if args.quick:
        settings = {"batches": 3, "echo_n": 200, "pipeline_n": 1000, "alloc_n": 30,
                    "heap_n": 300, "live_blocks": 20_000, "baseline_live": 5_000,
                    "share_n": 50, "pool_mib": 8, "pool_tasks": 2, "pool_batches": 3,
                    "share_many_n": 10_000, "concurrent_procs": 8, "concurrent_seconds": 0.5,
                    "idle_clients": 50, "clip_n": 20, "clip_big_n": 1, "clip_mib": 8,
                    "file_mib": 16}
    else:
        settings = {"batches": 15, "echo_n": 2000, "pipeline_n": 1000, "alloc_n": 300,
                    "heap_n": 3000, "live_blocks": 1_000_000, "baseline_live": 100_000,
                    "share_n": 500, "pool_mib": 64, "pool_tasks": 2, "pool_batches": 11,
                    "share_many_n": 10_000, "concurrent_procs": 8, "concurrent_seconds": 3.0,
                    "idle_clients": 500, "clip_n": 200, "clip_big_n": 2, "clip_mib": 64,
                    "file_mib": 256}
    labels = {key: (operation, versus, goal) for key, operation, versus, goal in rows(settings)}
    results = {}
    # A short path of our own: Unix socket paths are limited to 108 bytes.
    folder = tempfile.mkdtemp(prefix="shb", dir="/tmp")
    try:
        print_header(settings)
        for key, row in run(folder, **settings):
            results[key] = row
            print_row(key, row, labels)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_footer(results, settings)
    if args.json:
        table = [{"key": key, "operation": operation, "versus": versus, "goal": goal, **results[key]}
                 for key, operation, versus, goal in rows(settings) if key in results]
        table.append({"key": "concurrent", "goal": CONCURRENT_GOAL, **results["concurrent"]})
        table.append({"key": "metadata", **results["metadata"]})
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "python": sys.version.split()[0], "rows": table}, f, indent=2)
    return 0



if __name__ == "__main__":
    sys.exit(main())
