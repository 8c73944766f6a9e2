"""`shmheap stress`: many processes hammer one daemon at once, check every byte, and can be
killed at random; the daemon must lose nothing of the survivors and keep nothing of the dead.

Each worker runs a seeded random mix of operations on objects of its own: private heap
blocks (HeapAlloc), LocalAlloc, VirtualAlloc regions, global objects (fixed and moveable),
shared buffers, named sections, and the clipboard. Every object is filled with a pattern
derived from its identity (worker, generation, number), checked on every touch and before it
is freed. Objects also travel between workers, through the parent: shared buffers by address
and serial, moveable global handles and section names; the receiver checks the bytes (an
object its maker freed or took with it to its death is gone, which is no failure: a stale
handle must be refused, never read as another object's bytes). Each worker talks to the
parent on a pipe of its own, so a worker killed mid-message spoils nothing but its own pipe.

`--chaos RATE` SIGKILLs random workers at that rate per second and starts new ones. At the
end the workers stop, the daemon reclaims the dead ones' memory, and the report compares its
committed bytes and the segment's tmpfs bytes with the start: anything more is leaked.
Exit status 0 only with no verification failure, no leaked byte and the daemon's invariant
check passing.
"""

import argparse
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import shmheap

from .cli import positive

KINDS = ("heap", "local", "virtual", "global", "share", "section", "clipboard")
REPORT_EVERY = 0.5  # seconds between a worker's progress reports
LIVE_PER_KIND = 8  # objects a worker keeps of each kind at most
SIZES = (16, 100, 1000, 4096, 20000, 70000)
RECLAIM_TIMEOUT = 15.0  # seconds the daemon has to give back the dead workers' memory
SAMPLES = 2000  # latency samples a worker keeps per kind between reports


def pattern(identity, size):
    """The bytes an object of `identity` holds: its digest, repeated."""
    unit = hashlib.blake2b(identity.encode(), digest_size=32).digest()
    return (unit * (size // 32 + 1))[:size]


class Failure(Exception):
    """A verification failure: bytes that are not what their maker wrote, or an error an
    operation must not give."""


# ---- a worker --------------------------------------------------------------------------------

class Worker:
    def __init__(self, socket_path, index, generation, seed, kinds, conn):
        os.environ["SHMHEAP_SOCKET"] = socket_path
        from shmheap import win32

        self.w = win32
        self.client = shmheap.default_client()
        self.rng = random.Random(f"{seed}/{index}/{generation}")
        self.name = f"w{index}g{generation}"
        self.kinds = kinds
        self.conn = conn  # to the parent: reports and posts out, objects of others in
        self.count = 0
        self.live = {kind: [] for kind in KINDS}  # kind -> [(object, size, identity), ...]
        self.heap = win32.HeapCreate(0, 0, 0)
        self.ops, self.failures, self.latency = 0, [], {}

    def identity(self):
        self.count += 1
        return f"{self.name}/{self.count}"

    def run(self, deadline, max_ops):
        last_report = time.monotonic()
        done = 0
        while time.monotonic() < deadline and (max_ops is None or done < max_ops):
            kind = self.rng.choice(self.kinds)
            try:
                getattr(self, f"_{kind}")()
            except Failure as exc:
                self.failures.append(f"{kind}: {exc}")
            except shmheap.ProtocolError:
                raise  # the daemon is gone: the parent says so
            except shmheap.ShmheapError as exc:
                self.failures.append(f"{kind}: unexpected {exc}")
            self.ops += 1
            done += 1
            if time.monotonic() - last_report >= REPORT_EVERY:
                self.report()
                last_report = time.monotonic()
        self.report()

    def report(self):
        # (sampled with the module's generator: the worker's own draws are its mix)
        samples = {kind: (len(values), max(values), random.sample(values, min(len(values), SAMPLES)))
                   for kind, values in self.latency.items()}
        self.conn.send(("progress", self.name, self.ops, self.failures, samples))
        self.ops, self.failures, self.latency = 0, [], {}

    # -- helpers

    def _timed(self, kind, function, *args):
        """function(*args), its latency counted for `kind`: the call that makes an object."""
        started = time.perf_counter()
        result = function(*args)
        self.latency.setdefault(kind, []).append(time.perf_counter() - started)
        return result

    def _check(self, data, identity, what):
        if bytes(data) != pattern(identity, len(data)):
            raise Failure(f"{what} {identity}: the bytes are not what its maker wrote")

    def _keep_or_free(self, kind, item, free):
        """Keep a new object, letting go of the oldest beyond LIVE_PER_KIND."""
        live = self.live[kind]
        live.append(item)
        if len(live) > LIVE_PER_KIND or self.rng.random() < 0.3:
            free(live.pop(self.rng.randrange(len(live))))

    def _touch_one(self, kind, read):
        if self.live[kind]:
            obj, size, identity = self.rng.choice(self.live[kind])
            self._check(read(obj, size), identity, kind)

    # -- the kinds: each makes an object, checks one it holds, and lets one go

    def _heap(self):
        w, size, identity = self.w, self.rng.choice(SIZES), self.identity()
        block = self._timed("HeapAlloc", w.HeapAlloc, self.heap, 0, size)
        if not block:
            raise Failure(f"HeapAlloc({size}) failed: {w.GetLastError()}")
        w.write(block, pattern(identity, size))
        self._touch_one("heap", lambda b, n: w.read(b, n))

        def free(item):
            self._check(w.read(item[0], item[1]), item[2], "heap block")
            if not w.HeapFree(self.heap, 0, item[0]):
                raise Failure(f"HeapFree failed: {w.GetLastError()}")
        self._keep_or_free("heap", (block, size, identity), free)

    def _local(self):
        w = self.w
        self._moveable("local", w.LocalAlloc, w.LMEM_MOVEABLE, w.LocalLock, w.LocalUnlock, w.LocalFree)

    def _virtual(self):
        w, identity = self.w, self.identity()
        size = self.rng.choice((4096, 65536, 300000))
        base = self._timed("VirtualAlloc", w.VirtualAlloc, 0, size, w.MEM_COMMIT | w.MEM_RESERVE, w.PAGE_READWRITE)
        if not base:
            raise Failure(f"VirtualAlloc({size}) failed: {w.GetLastError()}")
        w.write(base, pattern(identity, size))
        self._touch_one("virtual", lambda b, n: w.read(b, n))

        def free(item):
            self._check(w.read(item[0], item[1]), item[2], "region")
            if not w.VirtualFree(item[0], 0, w.MEM_RELEASE):
                raise Failure(f"VirtualFree failed: {w.GetLastError()}")
        self._keep_or_free("virtual", (base, size, identity), free)

    def _global(self):
        w = self.w
        self._moveable("global", w.GlobalAlloc, w.GMEM_MOVEABLE, w.GlobalLock, w.GlobalUnlock, w.GlobalFree,
                       post=True)

    def _moveable(self, kind, alloc, flags, lock, unlock, free, post=False):
        """A LocalAlloc or GlobalAlloc object: moveable, its bytes written and read under its
        lock; a global one is sometimes posted for another worker to look at."""
        w, size, identity = self.w, self.rng.choice(SIZES), self.identity()
        handle = self._timed(alloc.__name__, alloc, flags, size)

        def read(h, n):
            data = w.read(lock(h), n)
            unlock(h)
            return data
        w.write(lock(handle), pattern(identity, size))
        unlock(handle)
        if post:
            if self.rng.random() < 0.3:
                self.conn.send(("post", kind, handle, size, identity))  # another worker may look
            self._receive()
        self._touch_one(kind, read)

        def release(item):
            self._check(read(item[0], item[1]), item[2], f"{kind} object")
            if free(item[0]):  # NULL on success
                raise Failure(f"{free.__name__} failed: {w.GetLastError()}")
        self._keep_or_free(kind, (handle, size, identity), release)

    def _share(self):
        size, identity = self.rng.choice(SIZES), self.identity()
        buffer = self._timed("share", self.client.share, size)
        buffer.view()[:] = pattern(identity, size)
        if self.rng.random() < 0.5:
            self.conn.send(("post", "share", (buffer.address, buffer.serial), size, identity))
        self._receive()
        self._touch_one("share", lambda b, n: b.view())
        self._keep_or_free("share", (buffer, size, identity), lambda item: (
            self._check(item[0].view(), item[2], "shared buffer"), item[0].free()))

    def _section(self):
        w, size, identity = self.w, self.rng.choice((4096, 65536)), self.identity()
        name = f"stress-{identity}"
        handle = self._timed("CreateFileMapping", w.CreateFileMapping, w.INVALID_HANDLE_VALUE, None,
                             w.PAGE_READWRITE, 0, size, name)
        view = w.MapViewOfFile(handle, w.FILE_MAP_ALL_ACCESS, 0, 0, 0)
        w.write(view, pattern(identity, size))
        if self.rng.random() < 0.5:
            self.conn.send(("post", "section", name, size, identity))
        self._receive()
        self._touch_one("section", lambda v, n: w.read(v[1], n))

        def free(item):
            (section, mapped), n, ident = item
            self._check(w.read(mapped, n), ident, "section view")
            if not (w.UnmapViewOfFile(mapped) and w.CloseHandle(section)):
                raise Failure(f"unmapping a section failed: {w.GetLastError()}")
        self._keep_or_free("section", ((handle, view), size, identity), free)

    def _clipboard(self):
        identity = self.identity()
        clipboard = self.client.clipboard
        data = identity.encode() + b":" + pattern(identity, self.rng.choice(SIZES))
        try:
            if self.rng.random() < 0.5:
                self._timed("clip copy", clipboard.copy, data, "shmheap-stress")
            else:
                pasted = self._timed("clip paste", clipboard.paste, "shmheap-stress")
                maker, _, body = pasted.partition(b":")
                if body != pattern(maker.decode(), len(body)):
                    raise Failure(f"the clipboard holds bytes {maker!r} did not write")
        except shmheap.ShmheapError as exc:
            # Another process held it open too long, or nothing was copied yet: no failure.
            if exc.winerror not in (shmheap.WinError.ERROR_ACCESS_DENIED, shmheap.WinError.ERROR_NOT_FOUND):
                raise

    def _receive(self):
        """Look at an object another worker posted, if any: its bytes must be its maker's,
        or it must be gone (refused as such)."""
        if not self.conn.poll():
            return
        _, kind, obj, size, identity = self.conn.recv()
        w = self.w
        if kind == "share":
            address, serial = obj
            try:
                self.client.global_attach(address, serial)
            except shmheap.ShmheapValueError:
                return  # its maker freed it: refused, as a stale buffer must be
            try:
                self._check(self.client.view(address, size), identity, "received buffer")
            finally:
                self.client.global_release(address, serial)
        elif kind == "global":
            pointer = w.GlobalLock(obj)
            if not pointer:
                return  # freed by its maker (or it died): the stale handle is refused
            try:
                self._check(w.read(pointer, size), identity, "received global object")
            finally:
                w.GlobalUnlock(obj)
        elif kind == "section":
            handle = w.OpenFileMapping(w.FILE_MAP_READ, False, obj)
            if not handle:
                return  # its maker closed it
            view = w.MapViewOfFile(handle, w.FILE_MAP_READ, 0, 0, 0)
            try:
                self._check(w.read(view, size), identity, "received section")
            finally:
                w.UnmapViewOfFile(view)
                w.CloseHandle(handle)


def _worker_main(socket_path, index, generation, seed, kinds, deadline, max_ops, conn):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    try:
        worker = Worker(socket_path, index, generation, seed, kinds, conn)
        worker.run(deadline, max_ops)
        conn.send(("done", worker.name))
    except shmheap.ProtocolError as exc:
        conn.send(("daemon gone", f"w{index}g{generation}", str(exc)))


# ---- the run ---------------------------------------------------------------------------------

def _daemon_figures(client):
    status = client.memory_status()
    return status["committed"], status["resident"]


def _reclaimed(client, pid, timeout=10.0):
    """Seconds until the daemon no longer lists `pid` (the reaper released all it held),
    polled every 2 ms."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if all(row["pid"] != pid for row in client.status()["processes"]):
            break
        time.sleep(0.002)
    return time.perf_counter() - started


def _summary_ms(seconds):
    ordered = sorted(seconds)
    if not ordered:
        return {"count": 0}
    return {"count": len(ordered), "median": ordered[len(ordered) // 2] * 1e3, "max": ordered[-1] * 1e3}


def _percentiles(samples):
    ordered = sorted(samples)
    if not ordered:
        return {"p50_us": 0.0, "p99_us": 0.0}
    return {"p50_us": ordered[len(ordered) // 2] * 1e6,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6}


def run(args, socket_path, out):
    context = multiprocessing.get_context("spawn")
    client = shmheap.connect(socket_path, autostart=False)
    committed_before, resident_before = _daemon_figures(client)
    rng = random.Random(f"{args.seed}/chaos")
    seconds = args.seconds if args.ops is None else 3600.0
    deadline = time.monotonic() + seconds
    per_worker = None if args.ops is None else max(1, args.ops // args.procs)
    kinds = tuple(args.mix)
    procs, conns, generations = {}, {}, {}

    def start(index):
        generations[index] = generations.get(index, -1) + 1
        ours, theirs = context.Pipe()
        proc = context.Process(target=_worker_main, args=(
            socket_path, index, generations[index], args.seed, kinds, deadline, per_worker, theirs), daemon=True)
        proc.start()
        theirs.close()
        procs[index], conns[index] = proc, ours

    for index in range(args.procs):
        start(index)
    ops, failures, killed, latency, counts, maxima = 0, [], 0, {}, {}, {}
    done = set()  # workers that finished their run
    reclaim_times = []  # seconds from a SIGKILL to the daemon having released all of the process's
    started = time.monotonic()
    next_kill = started + rng.expovariate(args.chaos) if args.chaos else float("inf")
    last_shown, last_probe, daemon_gone = 0.0, 0.0, None
    while conns:
        by_conn = {conn: index for index, conn in conns.items()}
        for conn in multiprocessing.connection.wait(list(by_conn), timeout=0.1):
            index = by_conn[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                conn.close()  # its worker is gone: done, or killed by us, or else a failure
                del conns[index]
                procs[index].join(5)
                if index not in done and procs[index].exitcode != 0:
                    failures.append(f"worker {index} died on its own (exit code {procs[index].exitcode})")
                continue
            if message[0] == "done":
                done.add(index)
            if message[0] == "progress":
                _, name, n, failed, samples = message
                ops += n
                failures += [f"{name} {f}" for f in failed]
                for kind, (count, peak, values) in samples.items():
                    counts[kind] = counts.get(kind, 0) + count
                    maxima[kind] = max(maxima.get(kind, 0.0), peak)
                    latency.setdefault(kind, []).extend(values)
            elif message[0] == "post":
                others = [i for i in conns if i != index and procs[i].is_alive()]
                if others:
                    try:
                        conns[rng.choice(others)].send(message)
                    except OSError:
                        pass  # that worker just died: the object stays its maker's
            elif message[0] == "daemon gone":
                daemon_gone = message[2]
        now = time.monotonic()
        if daemon_gone is None and now - last_probe >= 1.0:
            last_probe = now
            try:
                client.echo(0)
            except shmheap.ProtocolError as exc:
                daemon_gone = str(exc)
        if daemon_gone is not None:
            for proc in procs.values():
                proc.kill()
            out.write("\n")
            print(f"shmheap stress: the daemon went away mid-run: {daemon_gone}", file=sys.stderr)
            return None
        if now >= next_kill:
            if now < deadline:
                index = rng.randrange(args.procs)
                if procs[index].is_alive():
                    os.kill(procs[index].pid, signal.SIGKILL)
                    reclaim_times.append(_reclaimed(client, procs[index].pid))
                    procs[index].join(5)
                    killed += 1
                    if index in conns:
                        conns.pop(index).close()
                    start(index)
            next_kill = now + rng.expovariate(args.chaos)
        if now - last_shown >= 1.0:
            last_shown = now
            elapsed = now - started
            line = (f"{elapsed:6.1f} s  {ops:>10,} ops  {ops / max(elapsed, 1e-9):>9,.0f} ops/s"
                    f"  {len(failures)} failures  {killed} killed")
            if out.isatty():
                out.write("\r" + line)
                out.flush()
            elif int(elapsed) % 5 == 0:
                out.write(line + "\n")
                out.flush()
        if now > deadline + 30:  # a worker that does not stop is a failure too
            for index in list(conns):
                if procs[index].is_alive():
                    procs[index].kill()
                    failures.append(f"worker {procs[index].pid} did not stop")
                conns.pop(index).close()
    for proc in procs.values():
        proc.join(10)
    elapsed = time.monotonic() - started
    if out.isatty():
        out.write("\n")
    client.clipboard.clear()
    stopped = time.monotonic()
    reclaim_deadline = stopped + RECLAIM_TIMEOUT
    while True:
        committed_after, resident_after = _daemon_figures(client)
        if (committed_after <= committed_before and resident_after <= resident_before) or (
                time.monotonic() > reclaim_deadline):
            break
        time.sleep(0.1)
    settled = time.monotonic() - stopped
    try:
        client.check()
        check = "passed"
    except shmheap.ShmheapError as exc:
        check = f"FAILED: {exc}"
        failures.append(f"daemon check: {exc}")
    client.close()
    return {
        "ops": ops, "seconds": round(elapsed, 3), "ops_per_second": ops / elapsed if elapsed else 0.0,
        "procs": args.procs, "seed": args.seed, "mix": list(kinds), "chaos": args.chaos,
        "failures": len(failures), "failure_messages": failures[:20], "killed": killed,
        "committed_before": committed_before, "committed_after": committed_after,
        "resident_before": resident_before, "resident_after": resident_after, "settled_seconds": round(settled, 2),
        "leaked_bytes": max(0, committed_after - committed_before, resident_after - resident_before),
        "check": check,
        "reclaim_ms": _summary_ms(reclaim_times),
        "latency": {kind: {**_percentiles(values), "max_us": maxima[kind] * 1e6, "count": counts[kind]}
                    for kind, values in sorted(latency.items())},
    }


def print_report(report, out):
    out.write(f"shmheap stress: {report['ops']:,} operations in {report['seconds']:.1f} s"
              f" ({report['ops_per_second']:,.0f}/s) by {report['procs']} workers, seed {report['seed']},"
              f" chaos {report['chaos']}/s: {report['killed']} killed\n")
    out.write(f"{'call (latency)':<18} {'count':>10} {'p50 µs':>10} {'p99 µs':>10} {'max µs':>10}\n")
    for kind, row in report["latency"].items():
        out.write(f"{kind:<18} {row['count']:>10,} {row['p50_us']:>10.1f} {row['p99_us']:>10.1f} {row['max_us']:>10.0f}\n")
    if report["reclaim_ms"]["count"]:
        reclaim = report["reclaim_ms"]
        out.write(f"SIGKILL to released: median {reclaim['median']:.1f} ms, max {reclaim['max']:.1f} ms"
                  f" over {reclaim['count']} kills\n")
    out.write(f"daemon committed {report['committed_before']:,} -> {report['committed_after']:,} bytes;"
              f" segment in tmpfs {report['resident_before']:,} -> {report['resident_after']:,} bytes"
              f" ({report['settled_seconds']:.1f} s after the workers stopped)\n")
    out.write(f"verification failures: {report['failures']}; leaked bytes: {report['leaked_bytes']:,};"
              f" daemon check: {report['check']}\n")
    for message in report["failure_messages"]:
        out.write(f"  {message}\n")


def _mix(text):
    kinds = tuple(kind.strip() for kind in text.split(",")) if text != "all" else KINDS
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kinds {unknown}; choose from {', '.join(KINDS)} or all")
    return kinds


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap stress", description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=positive(int), default=(os.cpu_count() or 1) * 4,
                        help="worker processes (default: CPUs x 4)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=positive(float), default=10.0, help="run this long (default 10)")
    length.add_argument("--ops", type=positive(int), default=None, help="or this many operations in all")
    parser.add_argument("--seed", type=int, default=1, help="the same seed gives the same mix")
    parser.add_argument("--mix", type=_mix, default=KINDS, help=f"kinds, comma-separated: {','.join(KINDS)} (default all)")
    parser.add_argument("--chaos", type=float, default=0.0, help="SIGKILL random workers at this rate per second")
    parser.add_argument("--socket", help="the daemon to stress (default: one of its own, started here)")
    parser.add_argument("--json", metavar="PATH", help="also write the report to PATH as JSON")
    args = parser.parse_args(argv)
    if args.chaos < 0:
        parser.error("--chaos must not be negative")
    if args.json:
        try:
            with open(args.json, "a"):
                pass
        except OSError as exc:
            print(f"shmheap stress: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
            return 1
    folder = daemon = None
    try:
        if args.socket:
            socket_path = os.path.abspath(args.socket)
        else:
            folder = tempfile.mkdtemp(prefix="shs", dir="/tmp")
            socket_path = os.path.join(folder, "d.sock")
            daemon = subprocess.Popen([sys.executable, "-m", "shmheapd", "--socket", socket_path, "--size", "4G",
                                       "--log-file", os.path.join(folder, "shmheapd.log")],
                                      stdin=subprocess.DEVNULL)
            _wait_for(socket_path, daemon)
        report = run(args, socket_path, sys.stdout)
    except shmheap.ShmheapError as exc:
        print(f"shmheap stress: {exc}", file=sys.stderr)
        return 1
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if report is None:
        return 1
    print_report(report, sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["failures"] == 0 and report["leaked_bytes"] == 0 and report["check"] == "passed" else 1


def _wait_for(socket_path, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise shmheap.ShmheapError(shmheap.WinError.ERROR_GEN_FAILURE, "the daemon did not start")
        try:
            shmheap.connect(socket_path, autostart=False).close()
            return
        except shmheap.ProtocolError:
            time.sleep(0.05)
    raise shmheap.ShmheapError(shmheap.WinError.ERROR_TIMEOUT, "the daemon did not come up")


if __name__ == "__main__":
    sys.exit(main())
