"""`shmheap bench`: what shmheap costs next to the nearest thing without it.

Three comparisons, each printed as medians with the ratio shmheap / baseline:

    echo round trip   Client.call("echo", 1) against a real shmheapd, versus a bare Unix-socket
                      msgpack echo server in another Python process (the floor for any RPC
                      written in Python on this machine).
    pipelining        call_many of 1000 echoes versus 1000 single calls, per request.
    64 KiB memory     VirtualAlloc + touch + VirtualFree versus the stdlib's
                      multiprocessing.shared_memory.SharedMemory create + touch + close + unlink.
    heap blocks       HeapAlloc + HeapFree of 64 B and 4 KiB on a private heap versus the
                      stdlib's shared-memory allocator, multiprocessing.heap.BufferWrapper.
    metadata          Python memory the allocator holds per live 64-byte block (tracemalloc),
                      with a million live blocks, versus BufferWrapper's per live buffer.

The machine may be small and shared, so every figure is the median over batches (the mean
within a batch), with the fastest batch beside it; shmheap and baseline batches alternate so
drift in the machine's load hits both alike. The run starts its own daemon on a private socket
and stops it at the end.
"""

import argparse
import gc
import json
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

from shmheap import client as client_module
from shmheap import win32

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

def _compare(shmheap_batch, baseline_batch, batches):
    """Run the two batch functions alternately (one warm-up each, untimed). Each returns its
    mean in seconds per operation; returns the microsecond figures for one table row."""
    shmheap_batch(), baseline_batch()
    ours, theirs = [], []
    gc.disable()  # a collection landing in one batch but not the other is noise, not cost
    try:
        for _ in range(batches):
            ours.append(shmheap_batch() * 1e6)
            theirs.append(baseline_batch() * 1e6)
    finally:
        gc.enable()
    shmheap_us, baseline_us = statistics.median(ours), statistics.median(theirs)
    return {"shmheap_us": shmheap_us, "shmheap_min_us": min(ours),
            "baseline_us": baseline_us, "baseline_min_us": min(theirs),
            "ratio": shmheap_us / baseline_us}


def _per_op(function, n):
    """A batch: call `function` n times; the mean seconds per call."""
    def batch():
        start = time.perf_counter()
        for _ in range(n):
            function()
        return (time.perf_counter() - start) / n
    return batch


def _bare_echo_call(sock):
    """One round trip to the bare server, done the way Client.call does it: pack one request,
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
    requests = [("echo", (i,)) for i in range(n)]

    def batch():
        start = time.perf_counter()
        client.call_many(requests)
        return (time.perf_counter() - start) / n
    return batch


def _singles(client, n):
    def batch():
        start = time.perf_counter()
        for i in range(n):
            client.call("echo", i)
        return (time.perf_counter() - start) / n
    return batch


def _virtual_alloc_pair():
    address = win32.VirtualAlloc(0, 65536, win32.MEM_COMMIT | win32.MEM_RESERVE, win32.PAGE_READWRITE)
    if not address:
        raise RuntimeError(f"VirtualAlloc failed: error {win32.GetLastError()}")
    with win32.view(address, 1, write=True) as view:  # the facade's checked view: one RPC more
        view[0] = 1
    if not win32.VirtualFree(address, 0, win32.MEM_RELEASE):
        raise RuntimeError(f"VirtualFree failed: error {win32.GetLastError()}")


def _shared_memory_pair():
    shm = shared_memory.SharedMemory(create=True, size=65536)
    shm.buf[0] = 1
    shm.close()
    shm.unlink()


def _heap_pair(heap, size):
    def pair():
        win32.HeapFree(heap, 0, win32.HeapAlloc(heap, 0, size))
    return pair


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


# ---- the run ---------------------------------------------------------------------------------

ROWS = [
    # key, operation, what the baseline is
    ("echo", "echo round trip", "Client.call vs bare msgpack socket"),
    ("pipeline", "echo x1000, per request", "call_many vs 1000 x Client.call"),
    ("alloc64k", "64 KiB alloc+touch+free", "VirtualAlloc/Free vs SharedMemory"),
    ("heap64", "64 B block alloc+free", "HeapAlloc/Free vs BufferWrapper"),
    ("heap4k", "4 KiB block alloc+free", "HeapAlloc/Free vs BufferWrapper"),
]


def run(folder, *, batches, echo_n, pipeline_n, alloc_n, heap_n, live_blocks, baseline_live):
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

        # The facade's default connection must be ours, not an autostarted daemon's. Every row
        # uses that one Client: a process gets one process heap, so a second connection from
        # the same pid is refused at its handshake.
        os.environ["SHMHEAP_SOCKET"] = daemon_sock
        client_module.close_default()
        client = client_module.default_client()

        results = {}
        with bare:
            results["echo"] = _compare(_per_op(lambda: client.call("echo", 1), echo_n),
                                       _per_op(_bare_echo_call(bare), echo_n), batches)
            results["pipeline"] = _compare(_pipelined(client, pipeline_n),
                                           _singles(client, pipeline_n), batches)
            results["alloc64k"] = _compare(_per_op(_virtual_alloc_pair, alloc_n),
                                           _per_op(_shared_memory_pair, alloc_n), batches)
        # A private heap whose initial commit holds the working set, as a worker would size it.
        heap = win32.HeapCreate(0, 1 << 20, 0)
        for key, size in (("heap64", 64), ("heap4k", 4096)):
            results[key] = _compare(_per_op(_heap_pair(heap, size), heap_n),
                                    _per_op(_buffer_wrapper_pair(size), heap_n), batches)
        win32.HeapDestroy(heap)
        results["metadata"] = _metadata(client, live_blocks, baseline_live)
        return results
    finally:
        client_module.close_default()
        if previous_env is None:
            os.environ.pop("SHMHEAP_SOCKET", None)
        else:
            os.environ["SHMHEAP_SOCKET"] = previous_env
        for proc in reversed(procs):
            _stop(proc)


def print_table(results, settings):
    print(f"shmheap bench: microseconds per operation, median of {settings['batches']} batches"
          f" (fastest batch in brackets); ratio = shmheap / baseline")
    print(f"{'operation':<25} {'shmheap vs baseline':<35} {'shmheap':>16} {'baseline':>16} {'ratio':>7}")
    for key, operation, versus in ROWS:
        row = results[key]
        ours = f"{row['shmheap_us']:.2f} ({row['shmheap_min_us']:.2f})"
        theirs = f"{row['baseline_us']:.2f} ({row['baseline_min_us']:.2f})"
        print(f"{operation:<25} {versus:<35} {ours:>16} {theirs:>16} {row['ratio']:>7.2f}")
    meta = results["metadata"]
    print(f"{'metadata per live block':<25} {'64 B blocks vs BufferWrapper(64)':<35}"
          f" {meta['shmheap_bytes']:>14.1f} B {meta['baseline_bytes']:>14.1f} B {meta['ratio']:>7.3f}")
    print(f"batches of {settings['echo_n']} round trips, {settings['pipeline_n']} pipelined requests,"
          f" {settings['alloc_n']} VirtualAlloc pairs, {settings['heap_n']} heap pairs;"
          f" metadata with {meta['count']:,} live blocks vs {meta['baseline_count']:,} buffers")
    print("row 2 compares shmheap with itself (what pipelining buys); in row 3 the shmheap touch"
          " goes through win32.view, a third round trip")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (a smoke test, ~seconds)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--serve-bare-echo", metavar="SOCKET", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    if args.serve_bare_echo:
        return _serve_bare_echo(args.serve_bare_echo)

    if args.quick:
        settings = {"batches": 3, "echo_n": 200, "pipeline_n": 1000, "alloc_n": 30,
                    "heap_n": 1000, "live_blocks": 20_000, "baseline_live": 5_000}
    else:
        settings = {"batches": 15, "echo_n": 2000, "pipeline_n": 1000, "alloc_n": 300,
                    "heap_n": 20_000, "live_blocks": 1_000_000, "baseline_live": 100_000}
    # A short path of our own: Unix socket paths are limited to 108 bytes.
    folder = tempfile.mkdtemp(prefix="shb", dir="/tmp")
    try:
        results = run(folder, **settings)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(results, settings)
    if args.json:
        rows = [{"key": key, "operation": operation, "versus": versus, **results[key]}
                for key, operation, versus in ROWS]
        rows.append({"key": "metadata", **results["metadata"]})
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "python": sys.version.split()[0], "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
