"""`shmheap pool`: a worker pool that shares numpy buffers instead of pickling them.

The parent fills shared buffers, hands them (by handle, a few bytes each) to a
multiprocessing pool, and the workers transform them in place and return a checksum; the
parent then checks both the checksums and the bytes it can see. Nothing is copied between
processes: every process maps the same segment.

Ownership: the parent allocates the buffers (one round trip for the whole batch) and frees
them once the results are in; workers only borrow them.
"""

import argparse
import multiprocessing
import os
import sys
import time

import numpy

import shmheap
from shmheap.segment import SOCKET_ENV

from .cli import SOCKET_HELP, positive


def transform(buffer, index):
    """In a worker: square buffer `index` in place and return the sum of the squares."""
    array = buffer.numpy("float64")
    numpy.multiply(array, array, out=array)
    return index, float(array.sum())


def expected_values(index, count):
    return numpy.arange(count, dtype="float64") + index


def run(workers, buffers, count, start_method, out=print):
    with shmheap.connect() as client:
        shared = client.share_many([count * 8] * buffers)  # one round trip for the batch
        try:
            for index, buffer in enumerate(shared):
                buffer.numpy("float64")[:] = expected_values(index, count)
            started = time.perf_counter()
            with multiprocessing.get_context(start_method).Pool(workers) as pool:
                results = pool.starmap(transform, [(buffer, index) for index, buffer in enumerate(shared)])
            elapsed = time.perf_counter() - started
            failures = 0
            for index, total in results:
                squares = expected_values(index, count) ** 2
                seen = shared[index].numpy("float64")
                if not numpy.array_equal(seen, squares) or total != float(squares.sum()):
                    failures += 1
            out(f"{buffers} buffers of {count:,} float64 ({count * 8 / 2**20:.1f} MiB each) through"
                f" {workers} {start_method} workers in {elapsed:.3f} s: "
                f"{buffers - failures} checked, {failures} wrong")
            return failures
        finally:
            client.free_many(shared)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="shmheap pool", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=positive(int), default=2, help="worker processes")
    parser.add_argument("--buffers", type=positive(int), default=8, help="buffers handed to the workers")
    parser.add_argument("--count", type=positive(int), default=1 << 20, help="float64 values per buffer")
    parser.add_argument("--start-method", default="spawn",
                        choices=multiprocessing.get_all_start_methods())
    parser.add_argument("--socket", help=SOCKET_HELP + "; started there if none listens")
    args = parser.parse_args(argv)
    if args.socket:
        os.environ[SOCKET_ENV] = args.socket  # the workers reattach buffers on the same daemon
    try:
        failures = run(args.workers, args.buffers, args.count, args.start_method)
    except shmheap.ShmheapError as exc:
        print(f"shmheap pool: {exc}", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
